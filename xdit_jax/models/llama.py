"""The Llama decoder stack — transformers' ``LlamaModel`` up to ``last_hidden_state`` — in Flax NNX, used
as a text encoder.

HunyuanVideo's ``text_encoder`` is a ``LlamaModel`` (the text part of llava-llama-3-8b: hidden 4096, 32
layers, 32 query heads and 8 key/value heads, intermediate 14336, vocab 128320, rope_theta 500000). Its
pipeline tokenizes the prompt inside a chat template, runs the model with ``output_hidden_states=True``
and takes ``hidden_states[-3]`` (the input of the last two layers), then crops the template's tokens
(:func:`llama_prompt_embeds`, diffusers' ``HunyuanVideoPipeline._get_llama_prompt_embeds``)::

    out = model(ids, attention_mask=mask)                            # out.last_hidden_state (B, L, hidden)
    out = model(ids, attention_mask=mask, output_hidden_states=True) # out.hidden_states: N + 1 arrays
    states = model.hidden_state(ids, mask, -3)                       # hidden_states[-3], layers 1..N-2 only

``hidden_states`` are transformers 5's: the embeddings, then the output of each layer, the last entry
replaced by ``last_hidden_state`` (the output of the final ``norm``). ``output_hidden_states`` and the
index of :meth:`LlamaModel.hidden_state` are static Python values.

Submodules carry the transformers names (``embed_tokens``, ``layers.{i}.self_attn.{q,k,v,o}_proj``,
``layers.{i}.mlp.{gate,up,down}_proj``, ``layers.{i}.{input,post_attention}_layernorm``, ``norm``), so
:func:`xdit_jax.keymap.map_state_dict` derives the key map; ``layers`` is stacked on a leading layer
axis and run with one scan. A ``LlamaForCausalLM`` (and llava's language model saved so) holds the same
keys under ``model.``; those load too, ``lm_head.weight`` ignored, as are the ``rotary_emb.inv_freq``
buffers old transformers versions saved.

Positions are ``0 .. L-1`` for every row (transformers' default ``position_ids``; right padding, as
the HunyuanVideo tokenizer pads). Rotary embeddings: the default RoPE (``rope_scaling`` None /
``"default"``) or Llama 3.1's ``"llama3"`` frequency scaling, as transformers computes its
``inv_freq``; other RoPE types are refused. Attention is causal, and with an ``attention_mask`` (B, L)
(1: attend) a padded key is removed too — transformers' ``create_causal_mask``: query ``i`` attends to
key ``j`` iff ``j <= i`` and ``mask[j] != 0``. With right padding every query keeps key 0, so padded
positions get defined outputs (they attend to the valid keys), equal to transformers' there.
Grouped-query attention: query head ``h`` reads key/value head ``h // (heads / kv_heads)`` (transformers'
``repeat_kv``).

Precision: parameters and activations in ``dtype`` (fp32 or bf16); the rotary angles and rotation,
attention scores and softmax, the residual sums inside a layer, the SiLU gate and the RMSNorm statistics
in fp32. Inference only: no KV cache, no dropout, no ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import RMSNorm, linear, stack_modules

ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    # Defaults are transformers' LlamaConfig defaults (Llama 2 7B), so a config.json that omits a key reads alike.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None (default RoPE) or the rope_scaling dict as (key, value) pairs sorted by key (hashable: the
    # config is static data of the module); "rope_type" (or the older "type") names the kind.
    rope_scaling: tuple | None = None
    attention_bias: bool = False
    # Qwen2 (Qwen2.5-VL's language model, xdit_jax.models.qwen2_5_vl): biases on q/k/v only, not on o_proj
    qkv_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    # Qwen3 (xdit_jax.models.qwen3): an RMSNorm over each head of q and of k (q_norm / k_norm) before the rotation
    qk_norm: bool = False
    # GLM (xdit_jax.models.glm): the rotation on the first partial_rotary_factor x head_dim features of each head
    # only, of interleaved pairs (2i, 2i + 1) instead of the two halves; gate and up in one gate_up_proj
    partial_rotary_factor: float = 1.0
    rope_interleaved: bool = False
    fused_gate_up: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"Llama {name} must be a positive integer, got {v!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Llama num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention).")
        if self.head_dim % 2:
            raise ValueError(f"Llama head_dim {self.head_dim} must be even (rotary embeddings rotate pairs).")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} must "
                             "give an even rotary width in [2, head_dim].")
        if self.hidden_act != "silu":
            raise ValueError(f"Unsupported Llama hidden_act {self.hidden_act!r}; only 'silu' (SwiGLU) is supported.")
        params = self.rope_params
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"Unsupported Llama rope type {kind!r} (rope_scaling {params}); supported: "
                             f"{list(ROPE_TYPES)} (None / 'default': plain RoPE; 'llama3': Llama 3.1's scaling).")
        if kind == "llama3":
            absent = [k for k in _LLAMA3_KEYS if params.get(k) is None]
            if absent:
                raise ValueError(f"Llama rope_scaling of type 'llama3' lacks {absent} (got {params}).")
            if not params["low_freq_factor"] < params["high_freq_factor"]:
                raise ValueError(f"Llama 'llama3' rope_scaling needs low_freq_factor < high_freq_factor, got {params}.")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"Llama partial_rotary_factor {params['partial_rotary_factor']} is not supported.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Read the ``config.json`` of a transformers ``LlamaModel`` / ``LlamaForCausalLM`` (model_type ``llama``):
        transformers 4's ``rope_theta`` + ``rope_scaling`` or transformers 5's ``rope_parameters`` (a dict holding
        ``rope_type``, ``rope_theta`` and the scaling keys); unknown keys are ignored. An unsupported rope type,
        activation or head layout raises ``ValueError``."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"Expected a Llama config (model_type 'llama'), got model_type {model_type!r}.")
        kw = known_fields(cls, d, exclude=("rope_scaling",))
        scaling = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"Llama rope_scaling must be a dict or null, got {scaling!r}.")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            kw["rope_scaling"] = scaling
        return cls(**kw)

    @property
    def rope_params(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def rotary_dim(self) -> int:
        """The rotated features of each head (transformers' ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        p = self.rope_params
        return p.get("rope_type", p.get("type", "default"))


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """(rotary_dim // 2,) float32 inverse frequencies, as transformers' ``LlamaRotaryEmbedding`` computes
    them (``compute_default_rope_parameters`` / ``_compute_llama3_parameters``); float64 here, rounded once."""
    dim = getattr(cfg, "rotary_dim", cfg.head_dim)  # (Gemma 2's config: the whole head)
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_type == "llama3":
        p = cfg.rope_params
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary_cos_sin(cfg: LlamaConfig, length: int):
    """(L, rotary_dim) float32 cos and sin for positions ``0 .. L-1``: the frequencies repeated twice (the two
    halves), or each twice in a row where ``cfg.rope_interleaved`` (GLM's pairs)."""
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(cfg))[None]
    emb = jnp.repeat(freqs, 2, axis=-1) if getattr(cfg, "rope_interleaved", False) else jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin, interleaved: bool = False):
    """transformers' ``apply_rotary_pos_emb`` (rotate_half: the two halves of each head); ``x`` (B, L, H, D),
    computed in float32, returned in ``x``'s dtype; ``cos`` / ``sin`` (L, R) for every row, or (B, L, R) per row
    (Qwen2.5-VL's multimodal positions). ``R`` < ``D`` (a partial rotary factor): the first ``R`` features are
    rotated, the rest pass. ``interleaved``: GLM's rotation of the pairs ``(2i, 2i + 1)``."""
    r = cos.shape[-1]
    xf = x.astype(jnp.float32)
    xr, rest = xf[..., :r], xf[..., r:]
    if interleaved:
        pairs = xr.reshape(*xr.shape[:-1], r // 2, 2)
        rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)
    else:
        rot = jnp.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], axis=-1)
    cos, sin = (cos[:, :, None], sin[:, :, None]) if cos.ndim == 3 else (cos[:, None], sin[:, None])
    out = xr * cos + rot * sin
    if r < xf.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)


class LlamaOutput(NamedTuple):
    """``LlamaModel``'s output (``out[0]`` is the last hidden state, as transformers)."""

    last_hidden_state: jax.Array  # (B, L, hidden), after the final norm
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, layers 1..N-1, last_hidden_state


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        bias = cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias
        self.q_proj = linear(h, self.n_heads * d, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = linear(h, self.n_kv * d, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = linear(h, self.n_kv * d, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = linear(self.n_heads * d, h, bias=bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.interleaved = cfg.rope_interleaved

    def __call__(self, x, cos, sin, allowed):
        """``allowed``: bool (B or 1, 1, 1, L, L): query i may attend to key j."""
        b, l, _ = x.shape
        g = self.n_heads // self.n_kv
        q = self.q_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin, self.interleaved), apply_rotary(k, cos, sin, self.interleaved)
        v = self.v_proj(x).reshape(b, l, self.n_kv, self.head_dim)
        q = q.reshape(b, l, self.n_kv, g, self.head_dim)  # query head h = kv head (h // g), member h % g
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed, scores * (self.head_dim ** -0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, l, self.n_heads * self.head_dim)
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; ``cfg.fused_gate_up``: GLM's one ``gate_up_proj`` (the gate its
    first half)."""

    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = linear(h, 2 * i, bias=bias, dtype=dtype, rngs=rngs)
        else:
            self.gate_proj = linear(h, i, bias=bias, dtype=dtype, rngs=rngs)
            self.up_proj = linear(h, i, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = linear(i, h, bias=bias, dtype=dtype, rngs=rngs)
        self.fused = cfg.fused_gate_up

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        return self.down_proj(y.astype(gate.dtype))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = LlamaMLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, h, cos, sin, allowed):
        """Pre-norm block; the residual stream inside the block is fp32, rounded to ``dtype`` once."""
        f32 = jnp.float32
        r = h.astype(f32) + self.self_attn(self.input_layernorm(h), cos, sin, allowed).astype(f32)
        r = r + self.mlp(self.post_attention_layernorm(r).astype(self.dtype)).astype(f32)
        return r.astype(self.dtype)


def attention_allowed(length: int, attention_mask=None):
    """Bool (1 or B, 1, 1, L, L) for the (B, kv_heads, group, Lq, Lk) scores: causal, and (when given)
    key ``j`` not padded."""
    causal = jnp.asarray(np.tril(np.ones((length, length), bool)))[None, None, None]
    if attention_mask is None:
        return causal
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape (batch, {length}), got {tuple(mask.shape)}.")
    return causal & (mask != 0)[:, None, None, None, :]


class LlamaModel(nnx.Module):
    """``model(input_ids, attention_mask=None, output_hidden_states=False) -> LlamaOutput``
    (``last_hidden_state``, ``hidden_states``), arrays in ``dtype``; ``model.hidden_state(input_ids,
    attention_mask, index)``: ``hidden_states[index]`` alone, running only the layers it needs."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = stack_modules(lambda r: LlamaDecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers,
                                    rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def _run(self, input_ids, attention_mask, stop: int, collect: bool, inputs_embeds=None, rope=None):
        """(embeddings, output of layer ``stop``, stacked outputs of layers 1..stop or None). ``inputs_embeds``
        (B, L, hidden): the embeddings instead of ``input_ids``' (Qwen2.5-VL's image features in place);
        ``rope``: (cos, sin) (B, L, head_dim) tables instead of positions ``0 .. L-1``."""
        if inputs_embeds is not None:
            h0 = jnp.asarray(inputs_embeds).astype(self.dtype)
        else:
            input_ids = jnp.asarray(input_ids, jnp.int32)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
            h0 = self.embed_tokens(input_ids)
        length = h0.shape[1]
        allowed = attention_allowed(length, attention_mask)
        cos, sin = rotary_cos_sin(self.cfg, length) if rope is None else rope
        graphdef, state = nnx.split(self.layers)

        def body(x, i):
            # each layer's weights are read out of the full stack: a partial run copies no slice of it
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            y = layer(x, cos, sin, allowed)
            return y, (y if collect else None)

        h, per_layer = jax.lax.scan(body, h0, jnp.arange(stop, dtype=jnp.int32))
        return h0, h, per_layer

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False, inputs_embeds=None,
                 rope=None) -> LlamaOutput:
        n = self.cfg.num_hidden_layers
        h0, h, per_layer = self._run(input_ids, attention_mask, n, output_hidden_states, inputs_embeds, rope)
        last = self.norm(h)
        hidden = None
        if output_hidden_states:
            hidden = (h0,) + tuple(per_layer[i] for i in range(n - 1)) + (last,)
        return LlamaOutput(last, hidden)

    def hidden_state(self, input_ids, attention_mask=None, index: int = -1):
        """``hidden_states[index]`` of ``__call__(..., output_hidden_states=True)`` (0: the embeddings, ``i``:
        layer ``i``'s output, the last: ``last_hidden_state``; negative counts from the end), running only
        the first ``index`` layers. HunyuanVideo: ``index=-3`` (``num_hidden_layers_to_skip=2``)."""
        n = self.cfg.num_hidden_layers
        if not -(n + 1) <= index <= n:
            raise IndexError(f"hidden_states has {n + 1} entries (embeddings and {n} layers); got index {index}.")
        stop = index % (n + 1)
        if stop == n:
            return self(input_ids, attention_mask).last_hidden_state
        return self._run(input_ids, attention_mask, stop, False)[1]


# --- checkpoint conversion ---------------------------------------------------------------------

TORCH_IGNORE: list[str] = [
    r"(^|\.)rotary_emb\.inv_freq$",  # a buffer transformers < 4.38 saved (per layer)
]
CAUSAL_LM_IGNORE = r"^lm_head\.weight$"  # LlamaForCausalLM's head (tied or not): not part of the encoder


def is_prefixed(flat) -> bool:
    """Whether the state dict holds the ``LlamaModel`` under ``model.`` (``LlamaForCausalLM``)."""
    return any(k.startswith("model.") for k in flat)


def params_from_torch(flat: dict[str, np.ndarray], cfg: LlamaConfig, dtype=None) -> dict:
    """Params pure dict for :class:`LlamaModel` from a transformers ``LlamaModel`` state dict (numpy arrays),
    or a ``LlamaForCausalLM`` one (``model.*`` keys; ``lm_head.weight`` ignored).

    ``dtype``: cast the floating tensors to it (``None``: float32).
    """
    mdtype = jnp.float32 if dtype is None else dtype
    prefixed = is_prefixed(flat)
    return map_state_dict(
        flat,
        expected_shapes(lambda: LlamaModel(cfg, dtype=mdtype)),
        stacked={"layers": cfg.num_hidden_layers},
        renames=[(r"^", "model.")] if prefixed else [],
        ignore=TORCH_IGNORE + [CAUSAL_LM_IGNORE],
        dtype=dtype,
        what="Llama text encoder checkpoint" + (" (LlamaForCausalLM, model.*)" if prefixed else ""),
    )


def build(cfg: LlamaConfig, params: dict, dtype=jnp.float32) -> LlamaModel:
    """A :class:`LlamaModel` holding ``params`` (from :func:`params_from_torch`; ``{}``: abstract shapes)."""
    return build_module(lambda: LlamaModel(cfg, dtype=dtype), params)


# --- HunyuanVideo's prompt template ------------------------------------------------------------

# diffusers' HunyuanVideo DEFAULT_PROMPT_TEMPLATE (pipelines/hunyuan_video/pipeline_hunyuan_video.py): the
# system prompt in Llama 3's chat format; crop_start 95 = the tokens before the user's prompt (with the
# Llama 3 tokenizer's <|begin_of_text|>).
HUNYUAN_VIDEO_TEMPLATE = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": 95,
}


def template_crop_start(tokenizer, template: dict) -> int:
    """``template["crop_start"]``, or (when it is None / absent) diffusers' count: the template's tokens, as
    the tokenizer gives them with ``padding="max_length"`` and no ``max_length``, less 2 (the ``{}``
    placeholder and ``<|eot_id|>``)."""
    crop_start = template.get("crop_start")
    if crop_start is not None:
        return int(crop_start)
    ids = tokenizer(template["template"], padding="max_length", return_tensors="np", return_length=False,
                    return_overflowing_tokens=False, return_attention_mask=False)["input_ids"]
    return int(ids.shape[-1]) - 2


def tokenize_with_template(tokenizer, prompts: str | list[str], max_sequence_length: int = 256,
                           template: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, attention mask) (B, max_sequence_length + crop_start) of ``template.format(prompt)`` for each
    prompt, right-padded and truncated, and ``crop_start`` — what ``_get_llama_prompt_embeds`` feeds the
    encoder."""
    template = HUNYUAN_VIDEO_TEMPLATE if template is None else template
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    crop_start = template_crop_start(tokenizer, template)
    enc = tokenizer([template["template"].format(p) for p in prompts], max_length=max_sequence_length + crop_start,
                    padding="max_length", truncation=True, return_tensors="np", return_length=False,
                    return_overflowing_tokens=False, return_attention_mask=True)
    return enc["input_ids"], enc["attention_mask"], crop_start


def llama_prompt_embeds(tokenizer, model: LlamaModel, prompts: str | list[str], max_sequence_length: int = 256,
                        template: dict | None = None, num_hidden_layers_to_skip: int = 2, encode=None):
    """diffusers' ``HunyuanVideoPipeline._get_llama_prompt_embeds`` (``num_videos_per_prompt=1``): (prompt
    embeds (B, max_sequence_length, hidden) in the model's dtype, attention mask (B, max_sequence_length)
    int) — ``hidden_states[-(num_hidden_layers_to_skip + 1)]`` of the templated prompts with the first
    ``crop_start`` (template) positions cropped from both.

    ``encode``: ``fn(ids, mask) -> states`` to run instead of the model (a pipeline's jitted function);
    ``None``: ``model.hidden_state`` jitted here, running only the layers needed."""
    ids, mask, crop_start = tokenize_with_template(tokenizer, prompts, max_sequence_length, template)
    if encode is None:
        index = -(num_hidden_layers_to_skip + 1)
        graphdef, state = nnx.split(model)

        @jax.jit
        def encode_fn(state, ids, mask):
            return nnx.merge(graphdef, state).hidden_state(ids, mask, index)

        states = encode_fn(state, jnp.asarray(ids), jnp.asarray(mask))
    else:
        states = encode(jnp.asarray(ids), jnp.asarray(mask))
    if crop_start > 0:
        states, mask = states[:, crop_start:], mask[:, crop_start:]
    return states, mask


# --- tokenizer ---------------------------------------------------------------------------------

LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<pad>", "<unk>")


def train_tokenizer(corpus, vocab_size: int = 300):
    """A small Llama-3-like ``transformers.PreTrainedTokenizerFast`` trained on ``corpus`` with the ``tokenizers``
    library (no download): BPE over Metaspace words, the chat special tokens of :data:`LLAMA3_SPECIAL_TOKENS`
    kept whole (ids 0..6), ``<|begin_of_text|>`` prepended to every text, right padding with ``<pad>``,
    ``model_max_length`` unset (as the HunyuanVideo tokenizer's). A stand-in for tests and random-weight runs:
    characters the corpus lacks become ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                                      show_progress=False))
    bos = LLAMA3_SPECIAL_TOKENS[0]
    t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                     special_tokens=[(bos, t.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")
