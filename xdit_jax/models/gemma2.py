"""The Gemma 2 decoder stack — transformers' ``Gemma2Model`` up to ``last_hidden_state`` — in Flax NNX, used as
SANA's text encoder (gemma-2-2b-it: hidden 2304, 26 layers, 8 query / 4 key-value heads of 256, intermediate
9216, vocab 256000).

What differs from Llama (:mod:`xdit_jax.models.llama`, whose rotary tables, rotation and causal/padding mask
this reuses): RMSNorm scales by ``(1 + weight)`` (statistics and product in float32, then cast); the token
embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the parameter dtype, as transformers); the
attention logits are scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped (``cap * tanh(s / cap)``,
``attn_logit_softcapping``); layers of ``layer_types`` ``"sliding_attention"`` (by default every even-indexed
layer) see only the last ``sliding_window`` keys (key ``j`` for query ``i`` iff ``i - sliding_window < j <=
i``); each layer norms the attention and MLP outputs again (``post_attention_layernorm``,
``post_feedforward_layernorm``) besides the pre-norms (``input_layernorm``, ``pre_feedforward_layernorm``);
the MLP is GeGLU with tanh-GELU (``gelu_pytorch_tanh``). Positions ``0 .. L-1``; padded keys (mask 0) removed.

:func:`gemma_prompt_embeds` is diffusers' ``SanaPipeline._get_gemma_prompt_embeds`` + ``encode_prompt``'s token
selection; :func:`train_tokenizer` a GemmaTokenizerFast-compatible stand-in trained offline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import gelu_tanh, linear, stack_modules
from xdit_jax.models.llama import apply_rotary, attention_allowed, rotary_cos_sin

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    # transformers' Gemma2Config defaults (gemma-2-2b's widths)
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple | None = None
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", tuple("sliding_attention" if (i + 1) % 2 else "full_attention"
                                                          for i in range(self.num_hidden_layers)))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"Gemma 2 layer_types must name {self.num_hidden_layers} layers of {LAYER_TYPES}; "
                             f"got {self.layer_types}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Gemma 2 num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}.")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Unsupported Gemma 2 hidden_activation {self.hidden_activation!r}; only "
                             "'gelu_pytorch_tanh'.")
        if self.use_bidirectional_attention:
            raise ValueError("Gemma 2 with use_bidirectional_attention=True is not supported (causal only).")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gemma2Config":
        """A transformers ``Gemma2Config`` json (model_type ``gemma2``): transformers 4's ``rope_theta`` or 5's
        ``rope_parameters``; only the default RoPE."""
        if d.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"Expected a Gemma 2 config (model_type 'gemma2'), got {d.get('model_type')!r}.")
        kw = known_fields(cls, d)
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        for spec in (rp, scaling):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise ValueError(f"Unsupported Gemma 2 rope type {kind!r}; only the default RoPE.")
        if "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        if kw.get("layer_types") is not None:
            kw["layer_types"] = tuple(kw["layer_types"])
        return cls(**kw)

    @property
    def rope_type(self) -> str:  # for llama.rotary_cos_sin
        return "default"


class GemmaRMSNorm(nnx.Module):
    """``x / rms(x) * (1 + weight)`` in float32, cast to the input dtype (leaf ``scale`` = torch ``weight``)."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Gemma2Attention(nnx.Module):
    def __init__(self, cfg: Gemma2Config, *, dtype, rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        bias = cfg.attention_bias
        self.q_proj = linear(h, self.n_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = linear(h, self.n_kv * d, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = linear(h, self.n_kv * d, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = linear(self.n_heads * d, h, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, allowed):
        b, l, _ = x.shape
        g = self.n_heads // self.n_kv
        q = apply_rotary(self.q_proj(x).reshape(b, l, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, l, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, l, self.n_kv, self.head_dim)
        q = q.reshape(b, l, self.n_kv, g, self.head_dim)
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * self.scaling
        if self.softcap is not None:
            s = jnp.tanh(s / self.softcap) * self.softcap
        s = jnp.where(allowed, s, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, l, self.n_heads * self.head_dim)
        return self.o_proj(out)


class Gemma2MLP(nnx.Module):
    def __init__(self, cfg: Gemma2Config, *, dtype, rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(h, i, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = linear(h, i, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = linear(i, h, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma2Config, *, dtype, rngs):
        self.dtype = dtype
        self.self_attn = Gemma2Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = Gemma2MLP(cfg, dtype=dtype, rngs=rngs)
        n = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = n(), n()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = n(), n()

    def __call__(self, h, cos, sin, allowed):
        f32 = jnp.float32
        a = self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, allowed))
        r = h.astype(f32) + a.astype(f32)
        m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(r.astype(self.dtype))))
        return (r + m.astype(f32)).astype(self.dtype)


def sliding_allowed(length: int, window: int | None, attention_mask=None):
    """:func:`llama.attention_allowed` (causal and not padded) restricted to keys ``j > i - window``."""
    allowed = attention_allowed(length, attention_mask)
    if window is None or window >= length:
        return allowed
    i = np.arange(length)
    band = jnp.asarray(i[None, :] > i[:, None] - window)[None, None, None]
    return allowed & band


class Gemma2Model(nnx.Module):
    """``model(input_ids, attention_mask=None) -> last_hidden_state`` (B, L, hidden) in ``dtype``."""

    def __init__(self, cfg: Gemma2Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = stack_modules(lambda r: Gemma2DecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers,
                                    rngs)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, input_ids, attention_mask=None):
        return self.norm(self._run(input_ids, attention_mask, self.cfg.num_hidden_layers))

    def hidden_state(self, input_ids, attention_mask=None, index: int = -1):
        """``hidden_states[index]`` of transformers' ``output_hidden_states=True`` (0: the embeddings, ``i``: layer
        ``i``'s output, the last: ``last_hidden_state`` (normed); negative counts from the end), running only the
        layers it needs. Lumina 2: ``index=-2``."""
        n = self.cfg.num_hidden_layers
        if not -(n + 1) <= index <= n:
            raise IndexError(f"hidden_states has {n + 1} entries (embeddings and {n} layers); got index {index}.")
        stop = index % (n + 1)
        return self(input_ids, attention_mask) if stop == n else self._run(input_ids, attention_mask, stop)

    def _run(self, input_ids, attention_mask, stop: int):
        """The first ``stop`` layers' output (not normed)."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        length = input_ids.shape[1]
        scale = jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)  # transformers rounds it to the weights' dtype
        h = self.embed_tokens(input_ids) * scale
        full = attention_allowed(length, attention_mask)
        sliding = sliding_allowed(length, cfg.sliding_window, attention_mask)
        is_sliding = jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])
        cos, sin = rotary_cos_sin(cfg, length)
        graphdef, state = nnx.split(self.layers)
        if stop == 0:
            return h
        state = jax.tree.map(lambda a: a[:stop], state)

        def body(x, xs):
            layer_state, slide = xs
            allowed = jnp.where(slide, sliding, full)
            return nnx.merge(graphdef, layer_state)(x, cos, sin, allowed), None

        h, _ = jax.lax.scan(body, h, (state, is_sliding[:stop]))
        return h


# --- checkpoint conversion ---------------------------------------------------------------------

def params_from_torch(flat: dict[str, np.ndarray], cfg: Gemma2Config, dtype=None) -> dict:
    """Params of :class:`Gemma2Model` from a transformers ``Gemma2Model`` state dict (or a ``Gemma2ForCausalLM``
    one: ``model.*`` keys, ``lm_head.weight`` ignored)."""
    mdtype = jnp.float32 if dtype is None else dtype
    prefixed = any(k.startswith("model.") for k in flat)
    return map_state_dict(flat, expected_shapes(lambda: Gemma2Model(cfg, dtype=mdtype)),
                          stacked={"layers": cfg.num_hidden_layers},
                          renames=[(r"^", "model.")] if prefixed else [],
                          ignore=[r"^lm_head\.weight$", r"(^|\.)rotary_emb\.inv_freq$"], dtype=dtype,
                          what="Gemma 2 text encoder checkpoint")


def build(cfg: Gemma2Config, params: dict, dtype=jnp.float32) -> Gemma2Model:
    return build_module(lambda: Gemma2Model(cfg, dtype=dtype), params)


# --- SANA's prompt encoding --------------------------------------------------------------------

# diffusers SanaPipeline.__call__'s default complex_human_instruction
SANA_COMPLEX_HUMAN_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]


def tokenize_prompts(tokenizer, prompts, max_sequence_length: int = 300, complex_human_instruction=None):
    """(ids, mask) as ``_get_gemma_prompt_embeds`` feeds the encoder: right padding to ``max_sequence_length``,
    or with a complex human instruction (joined by newlines, prefixed to each prompt) to its token count + ``
    max_sequence_length - 2``; truncated."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenizer.padding_side = "right"
    if not complex_human_instruction:
        max_length = max_sequence_length
    else:
        chi = "\n".join(complex_human_instruction)
        prompts = [chi + p for p in prompts]
        max_length = len(tokenizer.encode(chi)) + max_sequence_length - 2
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def gemma_prompt_embeds(tokenizer, encode, prompts, max_sequence_length: int = 300, complex_human_instruction=None,
                        select: bool = True):
    """diffusers' SANA prompt encoding: (embeds (B, L, hidden), mask (B, L) int). ``encode(ids, mask)`` runs the
    encoder (a jitted :class:`Gemma2Model`). ``select``: ``encode_prompt``'s selection of the positive prompt's
    tokens, the first (BOS) and the last ``max_sequence_length - 1`` (diffusers selects for the prompt, not for
    the negative prompt, which it encodes without the instruction at ``max_sequence_length``)."""
    ids, mask = tokenize_prompts(tokenizer, prompts, max_sequence_length, complex_human_instruction)
    states = encode(jnp.asarray(ids), jnp.asarray(mask))
    if select:
        index = np.asarray([0] + list(range(-max_sequence_length + 1, 0))) % ids.shape[1]
        states, mask = states[:, index], mask[:, index]
    return states, mask


# --- tokenizer ---------------------------------------------------------------------------------

GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0..4 as GemmaTokenizer's


def train_tokenizer(corpus, vocab_size: int = 300):
    """A small ``GemmaTokenizer`` (transformers 5's fast Gemma tokenizer) whose BPE vocabulary and merges are trained
    on ``corpus`` offline with the ``tokenizers`` library, under Gemma's own normalizer (spaces -> ``▁``) and
    pre-tokenizer, so that it tokenizes the same after ``save_pretrained`` / ``from_pretrained``: ``<bos>``
    prepended (no ``<eos>``), pad id 0. A stand-in for tests and random-weight runs (as
    :func:`xdit_jax.models.llama.train_tokenizer`); characters the corpus lacks fall back to bytes (absent: unk)."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(GEMMA_SPECIAL_TOKENS),
                                                      show_progress=False))
    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, padding_side="right", add_bos_token=True,
                          add_eos_token=False)
