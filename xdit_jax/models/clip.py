"""CLIP in Flax NNX: transformers' text encoders (``CLIPTextModel``, ``CLIPTextModelWithProjection``)
and vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``).

Flux takes the pooled output of CLIP-L (``CLIPTextModel``, openai/clip-vit-large-patch14); SD3 and
SDXL take the penultimate layer's hidden states and the projected pooled output of their CLIP
encoders (``CLIPTextModelWithProjection``). What a pipeline calls (``ids`` (B, 77) from the CLIP
tokenizer with ``padding="max_length"``; diffusers passes no attention mask to CLIP)::

    out = model(ids)                                   # Flux: out.pooler_output  (B, hidden)
    out = model(ids, output_hidden_states=True)        # SD3:  out.hidden_states[-2] (B, L, hidden)
                                                       #       out.text_embeds      (B, projection_dim)

Wan 2.1 image-to-video conditions on the penultimate hidden states of laion's CLIP ViT-H/14 vision
tower (``image_encoder``: hidden 1280, 32 layers, 16 heads, patch 14, ``gelu``, image 224 -> 16 x 16
patches + the class token = 257 tokens). ``pixel_values`` (B, 3, 224, 224) channels-first, as
``CLIPImageProcessor`` makes them::

    out = model(pixel_values, output_hidden_states=True)   # diffusers: out.hidden_states[-2] (B, 257, 1280)
    states = model.penultimate(pixel_values)               # the same, without running the last layer

``output_hidden_states`` is a static Python bool: close over it in the jitted function (the
pipelines' ``_text_encoder_fn`` passes only ``attention_mask``, enough for Flux). The outputs are
NamedTuples (pytrees), so they pass through ``jax.jit`` / ``nnx.jit`` as they are.

Submodules carry the transformers names (``text_model.embeddings.token_embedding``,
``text_model.encoder.layers.{i}.self_attn.q_proj``, ``text_model.final_layer_norm``,
``text_projection``; ``vision_model.embeddings.{patch_embedding, class_embedding,
position_embedding}``, ``vision_model.pre_layrnorm`` (sic), ``vision_model.encoder.layers.{i}``,
``vision_model.post_layernorm``, ``visual_projection``), so :func:`xdit_jax.keymap.map_state_dict`
derives the key map; ``*.encoder.layers`` is stacked on a leading layer axis and run with one scan
(both towers share the layer code). Checkpoints on the hub (and transformers 4's ``save_pretrained``)
hold ``text_model.*`` / ``vision_model.*`` keys; transformers 5 saves a ``CLIPTextModel`` /
``CLIPVisionModel`` without that prefix (the ``WithProjection`` classes keep it) — both load. The
``embeddings.position_ids`` buffer older files hold is ignored, and so is a ``visual_projection.weight``
read as a plain ``CLIPVisionModel`` (as transformers does: Wan's model_index.json names
``CLIPVisionModel``; its weights may have been saved with the projection).

Text attention is causal always; an ``attention_mask`` (B, L) (1: attend) removes padded keys too, as
transformers combines them: a query attends to key ``j`` iff ``j <= i`` and ``mask[j] != 0``.
Disallowed scores are set to ``finfo(float32).min`` (fp32). With right padding (what CLIP
tokenizers produce) every query keeps key 0, so every row is defined. A row with no allowed key
(a left-padded query whose own and earlier keys are all masked) then attends uniformly to *every*
key, as transformers' eager attention does; its default SDPA path may differ there. Such rows never
reach the pooled output unless the EOS itself is masked. Vision attention is unmasked (every query
attends to every key).

Pooled output (transformers' rule, kept exactly): with ``eos_token_id == 2`` (configs written before
transformers PR #24773 — CLIP-L in the Flux checkpoints is one) the hidden state at the argmax of
``input_ids`` (the EOS is the highest id of CLIP's vocabulary); otherwise the first position whose id
equals ``eos_token_id`` (position 0 if there is none). The vision tower's pooled output is
``post_layernorm`` of the class token's last state; its ``last_hidden_state`` is the last layer's output
*without* ``post_layernorm`` (transformers' ``CLIPVisionModel``), and its ``hidden_states`` are
``(pre_layrnorm(embeddings), layer 1, ..., layer N)`` — ``hidden_states[-1] == last_hidden_state``.
The image must have the config's ``image_size`` (transformers' ``interpolate_pos_encoding`` is not
supported).

Precision: parameters and activations in ``dtype`` (fp32 or bf16); attention scores, softmax,
the residual sums inside a layer, the activation function, the LayerNorm statistics and the sum of
the vision embeddings (patches + class token + positions, normalized by ``pre_layrnorm`` before the
rounding) in fp32. Inference only (no dropout). No full ``CLIPModel`` (the two towers with the
contrastive head).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import LayerNorm, linear, stack_modules

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # openai CLIP (CLIP-L)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, as torch's default (laion CLIP-G)
}


class _CLIPTowerConfig:
    """What the shared layers read from either tower's config (``hidden_size``, ``intermediate_size``,
    ``num_attention_heads``, ``num_hidden_layers``, ``hidden_act``, ``layer_norm_eps``)."""

    hidden_size: int
    num_attention_heads: int
    hidden_act: str

    def _validate_tower(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"Unsupported CLIP hidden_act {self.hidden_act!r}; expected one of {sorted(_ACTS)} "
                             "('quick_gelu': openai CLIP, 'gelu': laion CLIP).")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def act_fn(self):
        return _ACTS[self.hidden_act]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_CLIPTowerConfig):
    # Defaults are transformers' CLIPTextConfig defaults, so a config.json that omits a key reads alike.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    # Which module the config builds (not a config.json key): the conversion table maps the class
    # names "CLIPTextModel" / "CLIPTextModelWithProjection" to this class / the subclass below.
    with_projection: ClassVar[bool] = False

    def __post_init__(self):
        self._validate_tower()
        if type(self.eos_token_id) is not int:  # not None, a list, or a bool
            raise ValueError(f"CLIP eos_token_id must be one integer (the pooled output is read at the EOS), "
                             f"got {self.eos_token_id!r}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Read the ``config.json`` ``CLIPTextModel[WithProjection].save_pretrained`` writes (model_type
        ``clip_text_model``); unknown keys are ignored. A full ``CLIPModel`` config (text and vision
        towers) and an unsupported ``hidden_act`` raise ``ValueError``."""
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"Expected a CLIP text encoder config (model_type 'clip_text_model'), got model_type "
                             f"{model_type!r}; a full CLIPModel (text and vision) is not supported.")
        return cls(**known_fields(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """The config of a ``CLIPTextModelWithProjection`` (the same config.json; builds the projection)."""

    with_projection: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_CLIPTowerConfig):
    # Defaults are transformers' CLIPVisionConfig defaults (openai/clip-vit-base-patch32).
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    # "CLIPVisionModel" / "CLIPVisionModelWithProjection" map to this class / the subclass below.
    with_projection: ClassVar[bool] = False

    def __post_init__(self):
        self._validate_tower()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_channels", "image_size",
                     "patch_size", "projection_dim"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"CLIP vision {name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.patch_size > self.image_size:
            raise ValueError(f"CLIP vision patch_size {self.patch_size} exceeds image_size {self.image_size}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Read the ``config.json`` ``CLIPVisionModel[WithProjection].save_pretrained`` writes (model_type
        ``clip_vision_model``); unknown keys are ignored. A full ``CLIPModel`` config (with a
        ``vision_config``) and an unsupported ``hidden_act`` raise ``ValueError``."""
        if "vision_config" in d or "text_config" in d:
            raise ValueError("Got a full CLIPModel config (text_config / vision_config): only the vision tower "
                             "(model_type 'clip_vision_model', CLIPVisionModel[WithProjection]) is supported; "
                             "pass its vision_config.")
        model_type = d.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"Expected a CLIP vision tower config (model_type 'clip_vision_model'), got model_type "
                             f"{model_type!r}.")
        return cls(**known_fields(cls, d))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image: the patches and the class token."""
        return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class CLIPVisionWithProjectionConfig(CLIPVisionConfig):
    """The config of a ``CLIPVisionModelWithProjection`` (the same config.json; builds the projection)."""

    with_projection: ClassVar[bool] = True


class CLIPTextOutput(NamedTuple):
    """``CLIPTextModel``'s output (``out[0]`` is the last hidden state, as transformers)."""

    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at the EOS position
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer (before final_layer_norm)


class CLIPTextModelOutput(NamedTuple):
    """``CLIPTextModelWithProjection``'s output (``out[0]`` is ``text_embeds``, as transformers);
    ``pooler_output`` (not in transformers' output) is the unprojected pooled state."""

    text_embeds: jax.Array  # (B, projection_dim)
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooler_output: jax.Array | None = None


class CLIPVisionOutput(NamedTuple):
    """``CLIPVisionModel``'s output (``out[0]`` is the last hidden state, as transformers)."""

    last_hidden_state: jax.Array  # (B, num_positions, hidden): the last layer's output (no post_layernorm)
    pooler_output: jax.Array  # (B, hidden): post_layernorm(last_hidden_state[:, 0])
    hidden_states: tuple[jax.Array, ...] | None = None  # pre_layrnorm(embeddings), then each layer's output


class CLIPVisionModelOutput(NamedTuple):
    """``CLIPVisionModelWithProjection``'s output (``out[0]`` is ``image_embeds``, as transformers);
    ``pooler_output`` (not in transformers' output) is the unprojected pooled state."""

    image_embeds: jax.Array  # (B, projection_dim)
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooler_output: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        length = input_ids.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"Sequence length {length} exceeds CLIP max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}.")
        tokens = self.token_embedding(input_ids).astype(jnp.float32)
        positions = self.position_embedding.embedding[...][:length].astype(jnp.float32)
        return (tokens + positions).astype(self.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: _CLIPTowerConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.k_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.v_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.q_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.out_proj = linear(h, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, allowed=None):
        """``allowed``: bool, broadcastable to (B, 1, L, L): query i may attend to key j (``None``: every
        query attends to every key — the vision tower)."""
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if allowed is not None:
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.n_heads * self.head_dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: _CLIPTowerConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.act = cfg.act_fn

    def __call__(self, x):
        y = self.fc1(x)
        return self.fc2(self.act(y.astype(jnp.float32)).astype(y.dtype))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: _CLIPTowerConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, h, allowed=None):
        """Pre-norm block; the residual stream inside the block is fp32, rounded to ``dtype`` once."""
        f32 = jnp.float32
        r = h.astype(f32) + self.self_attn(self.layer_norm1(h), allowed).astype(f32)
        r = r + self.mlp(self.layer_norm2(r).astype(self.dtype)).astype(f32)
        return r.astype(self.dtype)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: _CLIPTowerConfig, *, dtype, rngs: nnx.Rngs):
        self.num_layers = cfg.num_hidden_layers
        self.layers = stack_modules(lambda r: CLIPEncoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers, rngs)

    def __call__(self, h, allowed=None, collect: bool = False, stop: int | None = None):
        """(the output of the last layer run, the stacked outputs of every layer run (n, B, L, D) or None).

        ``stop``: run only the first ``stop`` layers (static; ``None``: all). The scan walks layer indices
        and reads each layer's weights out of the full stack, so a partial run copies no slice of it."""
        n = self.num_layers if stop is None else stop
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"Cannot run {n} of the {self.num_layers} CLIP encoder layers.")
        graphdef, state = nnx.split(self.layers)

        def body(x, i):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            y = layer(x, allowed)
            return y, (y if collect else None)

        return jax.lax.scan(body, h, jnp.arange(n, dtype=jnp.int32))


def attention_allowed(length: int, attention_mask=None):
    """Bool (1 or B, 1, L, L): causal, and (when given) key ``j`` not padded — transformers'
    ``create_causal_mask`` combination."""
    causal = jnp.asarray(np.tril(np.ones((length, length), bool)))[None, None]
    if attention_mask is None:
        return causal
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape (batch, {length}), got {tuple(mask.shape)}.")
    return causal & (mask != 0)[:, None, None, :]


def eos_positions(input_ids, eos_token_id: int):
    """(B,) index of the pooled token: transformers' two rules (see the module docstring)."""
    if eos_token_id == 2:  # legacy configs: the highest id (argmax gives the first of equal maxima)
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
    """transformers 4's ``CLIPTextTransformer`` (the ``text_model`` of both classes)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        h0 = self.embeddings(input_ids)
        allowed = attention_allowed(input_ids.shape[1], attention_mask)
        h, per_layer = self.encoder(h0, allowed, collect=output_hidden_states)
        last = self.final_layer_norm(h)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.cfg.eos_token_id)]
        hidden = None
        if output_hidden_states:
            hidden = (h0,) + tuple(per_layer[i] for i in range(per_layer.shape[0]))
        return CLIPTextOutput(last, pooled, hidden)


class CLIPTextModel(nnx.Module):
    """``model(input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput``
    (``last_hidden_state``, ``pooler_output``, ``hidden_states``), arrays in ``dtype``."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nnx.Module):
    """``model(input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextModelOutput``
    (``text_embeds``, ``last_hidden_state``, ``hidden_states``, ``pooler_output``), arrays in ``dtype``."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)
        self.text_projection = linear(cfg.hidden_size, cfg.projection_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextModelOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextModelOutput(self.text_projection(out.pooler_output), out.last_hidden_state, out.hidden_states,
                                   out.pooler_output)


class CLIPVisionEmbeddings(nnx.Module):
    """Patches (a Conv2d of stride ``patch_size``, no bias), the class token first, plus the positions."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), dtype) * d ** -0.5)
        self.position_embedding = nnx.Embed(cfg.num_positions, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values):
        """(B, C, H, W) channels-first -> (B, num_positions, hidden) in float32 (the sum is not rounded)."""
        cfg = self.cfg
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != cfg.num_channels:
            raise ValueError(f"pixel_values must have shape (batch, {cfg.num_channels}, height, width) "
                             f"(channels first, as transformers), got {shape}.")
        if shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"Input image size ({shape[2]}*{shape[3]}) doesn't match the CLIP vision model "
                             f"({cfg.image_size}*{cfg.image_size}); resize the image (CLIPImageProcessor does).")
        patches = self.patch_embedding(jnp.transpose(pixel_values, (0, 2, 3, 1)))  # (B, gh, gw, D), row-major
        patches = patches.reshape(shape[0], -1, cfg.hidden_size).astype(jnp.float32)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (shape[0], 1, cfg.hidden_size))
        positions = self.position_embedding.embedding[...].astype(jnp.float32)
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nnx.Module):
    """transformers 4's ``CLIPVisionTransformer`` (the ``vision_model`` of both classes)."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def _embed(self, pixel_values):
        return self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values))).astype(self.dtype)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        h0 = self._embed(pixel_values)
        last, per_layer = self.encoder(h0, collect=output_hidden_states)
        pooled = self.post_layernorm(last[:, 0])
        hidden = None
        if output_hidden_states:
            hidden = (h0,) + tuple(per_layer[i] for i in range(per_layer.shape[0]))
        return CLIPVisionOutput(last, pooled, hidden)

    def hidden_state(self, pixel_values, index: int):
        """``hidden_states[index]`` of ``__call__(pixel_values, output_hidden_states=True)`` (0: the
        normalized embeddings, ``i``: layer ``i``'s output; negative counts from the end), running only
        the layers it needs."""
        n = self.cfg.num_hidden_layers
        if not -(n + 1) <= index <= n:
            raise IndexError(f"hidden_states has {n + 1} entries (embeddings and {n} layers); got index {index}.")
        return self.encoder(self._embed(pixel_values), stop=index % (n + 1))[0]


class _VisionTower:
    """What both vision classes share (their ``vision_model`` is a :class:`CLIPVisionTransformer`)."""

    vision_model: CLIPVisionTransformer

    def penultimate(self, pixel_values):
        """``hidden_states[-2]`` (the input of the last layer; Wan 2.1's image conditioning) (B,
        num_positions, hidden) in ``dtype``, running the first ``num_hidden_layers - 1`` layers only."""
        return self.vision_model.hidden_state(pixel_values, -2)

    def hidden_state(self, pixel_values, index: int):
        """``hidden_states[index]``, running only the layers it needs (:meth:`CLIPVisionTransformer.hidden_state`)."""
        return self.vision_model.hidden_state(pixel_values, index)


class CLIPVisionModel(_VisionTower, nnx.Module):
    """``model(pixel_values, output_hidden_states=False) -> CLIPVisionOutput`` (``last_hidden_state``,
    ``pooler_output``, ``hidden_states``), arrays in ``dtype``; ``pixel_values`` (B, C, image_size,
    image_size). ``model.penultimate(pixel_values)``: ``hidden_states[-2]`` alone."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, output_hidden_states)


class CLIPVisionModelWithProjection(_VisionTower, nnx.Module):
    """``model(pixel_values, output_hidden_states=False) -> CLIPVisionModelOutput`` (``image_embeds``,
    ``last_hidden_state``, ``hidden_states``, ``pooler_output``), arrays in ``dtype``;
    ``model.penultimate(pixel_values)``: ``hidden_states[-2]`` alone."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, rngs=rngs)
        self.visual_projection = linear(cfg.hidden_size, cfg.projection_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionModelOutput:
        out = self.vision_model(pixel_values, output_hidden_states)
        return CLIPVisionModelOutput(self.visual_projection(out.pooler_output), out.last_hidden_state,
                                     out.hidden_states, out.pooler_output)


def model_class(cfg: CLIPTextConfig | CLIPVisionConfig):
    """The module class ``cfg`` describes: its class picks the tower (text / vision) and whether the
    projection is built (the ``...WithProjectionConfig`` subclasses)."""
    if isinstance(cfg, CLIPVisionConfig):
        return CLIPVisionModelWithProjection if cfg.with_projection else CLIPVisionModel
    if isinstance(cfg, CLIPTextConfig):
        return CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel
    raise TypeError(f"Not a CLIP tower config: {type(cfg).__name__}.")


# --- checkpoint conversion tables ---------------------------------------------------------------

TORCH_IGNORE: list[str] = [
    r"^(text_model\.|vision_model\.)?embeddings\.position_ids$",  # a buffer older transformers saved
]
# A CLIPVisionModelWithProjection's checkpoint read as a CLIPVisionModel: transformers drops the projection.
VISION_IGNORE_PROJECTION = r"^visual_projection\.weight$"
# The top-level names of each tower's own keys (what transformers 5 saves a CLIPTextModel / CLIPVisionModel
# under, without the "text_model." / "vision_model." prefix; it reads both).
TOWER_KEYS: dict[str, tuple[str, ...]] = {
    "text_model": ("embeddings.", "encoder.", "final_layer_norm."),
    "vision_model": ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."),
}


def tower_name(cfg: CLIPTextConfig | CLIPVisionConfig) -> str:
    """``"vision_model"`` or ``"text_model"``: the tower's submodule (and checkpoint prefix)."""
    return "vision_model" if isinstance(cfg, CLIPVisionConfig) else "text_model"


def is_unprefixed(flat, tower: str = "text_model") -> bool:
    """Whether the state dict holds the ``tower``'s keys without its ``tower.`` prefix (transformers 5's
    ``CLIPTextModel.save_pretrained`` / ``CLIPVisionModel.save_pretrained``)."""
    return (not any(k.startswith(tower + ".") for k in flat)
            and any(k.startswith(TOWER_KEYS[tower]) for k in flat))


def params_from_torch(flat: dict[str, np.ndarray], cfg: CLIPTextConfig | CLIPVisionConfig, dtype=None) -> dict:
    """Params pure dict for the module :func:`model_class` picks for ``cfg`` (:class:`CLIPTextModel`,
    :class:`CLIPTextModelWithProjection`, :class:`CLIPVisionModel`, :class:`CLIPVisionModelWithProjection`)
    from a transformers state dict (numpy arrays), with or without the tower's prefix.

    ``dtype``: cast the floating tensors to it (``None``: float32).
    """
    mdtype = jnp.float32 if dtype is None else dtype
    cls = model_class(cfg)
    tower = tower_name(cfg)
    ignore = list(TORCH_IGNORE)
    if cls is CLIPVisionModel:
        ignore.append(VISION_IGNORE_PROJECTION)
    return map_state_dict(
        flat,
        expected_shapes(lambda: cls(cfg, dtype=mdtype)),
        stacked={f"{tower}.encoder.layers": cfg.num_hidden_layers},
        renames=[(rf"^{tower}\.", "")] if is_unprefixed(flat, tower) else [],
        ignore=ignore,
        dtype=dtype,
        what=f"CLIP {tower.split('_')[0]} tower checkpoint ({cls.__name__})",
    )


def build(cfg: CLIPTextConfig | CLIPVisionConfig, params: dict, dtype=jnp.float32):
    """The module :func:`model_class` picks for ``cfg`` holding ``params`` (from :func:`params_from_torch`;
    ``{}``: abstract shapes only, what random-weight loading reads)."""
    cls = model_class(cfg)
    return build_module(lambda: cls(cfg, dtype=dtype), params)


# --- tokenizer ---------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the byte-level alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 600, pad_token: str = EOS, model_max_length: int = 77):
    """A CLIP tokenizer (``transformers.CLIPTokenizer``: byte-level BPE with ``</w>`` word ends, NFC +
    lower-cased, ``<|startoftext|> ... <|endoftext|>`` around each text) whose merges are trained on
    ``corpus`` with the ``tokenizers`` library; no download. ``save_pretrained`` / ``from_pretrained``
    round-trip it.

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with ``</w>``, the
    merges' tokens in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (so the EOS is the
    highest id, which the legacy ``eos_token_id == 2`` pooling relies on). Every text encodes without
    an unknown token. ``vocab_size`` is the total (at least 515, one merge); the corpus may give
    fewer merges. ``pad_token``: ``<|endoftext|>`` (CLIP-L in Flux/SD3) or ``"!"`` (CLIP-G's
    tokenizer_2 in SDXL/SD3, id 0).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    base = list(bytes_to_unicode().values())
    n_fixed = 2 * len(base) + 2
    if vocab_size < n_fixed + 1:
        raise ValueError(f"A CLIP vocabulary holds the 256 byte characters with and without '</w>' and the two "
                         f"special tokens ({n_fixed}); vocab_size={vocab_size} leaves no room for a merge.")
    template = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = template.normalizer
    tok.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    tok.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for t in base + [c + "</w>" for c in base]:
        vocab.setdefault(t, len(vocab))
    kept = []
    for a, b in merges:
        if len(vocab) >= vocab_size - 2:
            break
        kept.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary.")
    return CLIPTokenizer(vocab=vocab, merges=kept, pad_token=pad_token, model_max_length=model_max_length)
