"""The T5 (v1.1) encoder — transformers' ``T5EncoderModel`` — and its UMT5 variant
(``UMT5EncoderModel``, the Wan 2.1 text encoder) in Flax NNX.

CogVideoX encodes its prompts with it. Submodules carry the transformers names, so
:func:`xdit_jax.keymap.map_state_dict` derives the key map; the only exceptions are tables below.
The ``encoder.block`` collection is stacked on a leading layer axis and run with a scan. In
transformers' T5, block 0 owns the relative attention bias table (shared by all blocks); here it
lives outside the stack, at ``encoder.relative_attention_bias``, and a rename points it at block 0's
key. UMT5 (``cfg.per_layer_relative_bias``, set by ``model_type: "umt5"`` or :class:`UMT5Config`)
differs from T5 v1.1 only there: every block owns its table, so the tables live inside the stacked
blocks under their transformers names (``encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias``)
and each layer of the scan looks its bias up from the shared bucket indices.

Precision: parameters and activations in ``dtype`` (fp32 or bf16); attention scores, softmax and
the norms' variance in fp32. Inference only (no dropout). Encoder only (bidirectional buckets).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import linear


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # UMT5: every block has its own relative attention bias table (T5: block 0's serves all blocks).
    per_layer_relative_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Config":
        """Read a transformers ``T5Config`` / ``UMT5Config`` config.json dict; unknown keys are ignored.
        ``model_type: "umt5"`` selects the per-layer bias tables (as transformers' auto classes would)."""
        kw = known_fields(cls, d)
        if d.get("model_type") == "umt5":
            kw["per_layer_relative_bias"] = True
        cfg = cls(**kw)
        _ = cfg.act_fn  # fail early on an unsupported activation
        return cfg

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # As transformers' T5Config: "gated-gelu" means the tanh approximation (gelu_new).
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def act_fn(self):
        name = self.dense_act_fn
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or name not in _ACTS:
            raise ValueError(f"Unsupported T5 feed_forward_proj {self.feed_forward_proj!r}; "
                             f"expected '[gated-]ACT' with ACT one of {sorted(_ACTS)}.")
        return _ACTS[name]


@dataclasses.dataclass(frozen=True)
class UMT5Config(T5Config):
    """transformers' ``UMT5EncoderModel`` (defaults: umt5-xxl as Wan 2.1 ships it): T5 v1.1 with a
    relative attention bias table in every block."""

    vocab_size: int = 256384
    per_layer_relative_bias: bool = True


_ACTS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of each relative position (memory - query), as transformers.

    Computed in numpy at trace time (the sequence length is static) with the same float32 steps as
    transformers, so the bucket boundaries agree exactly.
    """
    relative_position = np.asarray(relative_position, np.int64)
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    rp = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    safe = np.maximum(rp, 1).astype(np.float32)
    large = max_exact + (np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rp, large)


def encoder_buckets(length: int, cfg: T5Config) -> np.ndarray:
    """(L, L) bucket of query i attending to key j (numpy, static)."""
    pos = np.arange(length)
    return relative_position_bucket(pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance)


def bias_from_table(table: nnx.Embed, buckets) -> jax.Array:
    """(1, H, L, L) fp32 bias: the (buckets, H) ``table`` looked up at the (L, L) ``buckets``."""
    t = table.embedding[...].astype(jnp.float32)
    return jnp.transpose(t[jnp.asarray(buckets, jnp.int32)], (2, 0, 1))[None]


class T5LayerNorm(nnx.Module):
    """RMS norm without mean or bias; variance in fp32, result cast back to the weight dtype."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        w = self.weight[...]
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return w * (x32 * jax.lax.rsqrt(var + self.eps)).astype(w.dtype)


def _linear(i, o, dtype, rngs):
    return linear(i, o, bias=False, dtype=dtype, rngs=rngs)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = _linear(cfg.d_model, inner, dtype, rngs)
        self.k = _linear(cfg.d_model, inner, dtype, rngs)
        self.v = _linear(cfg.d_model, inner, dtype, rngs)
        self.o = _linear(inner, cfg.d_model, dtype, rngs)
        self.own_bias = cfg.per_layer_relative_bias
        if self.own_bias:  # UMT5
            self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                     dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x, position_bias, key_mask):
        """``position_bias`` (1, H, L, L) fp32 — or, where the layer owns its bias table (UMT5), the
        (L, L) int32 buckets to look it up at; ``key_mask`` (B, 1, 1, L) bool or None."""
        if self.own_bias:
            position_bias = bias_from_table(self.relative_attention_bias, position_bias)
        b, l, _ = x.shape
        q = self.q(x).reshape(b, l, self.n_heads, self.d_kv)
        k = self.k(x).reshape(b, l, self.n_heads, self.d_kv)
        v = self.v(x).reshape(b, l, self.n_heads, self.d_kv)
        # T5 does not scale q·k: the scale is folded into the weights.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores + position_bias
        if key_mask is not None:
            scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.n_heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x, position_bias, key_mask):
        return x + self.SelfAttention(self.layer_norm(x), position_bias, key_mask)


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, dtype, rngs)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, dtype, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, dtype, rngs)
        self.act = cfg.act_fn

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.wi = _linear(cfg.d_model, cfg.d_ff, dtype, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, dtype, rngs)
        self.act = cfg.act_fn

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, dtype=dtype, rngs=rngs),
                               T5LayerFF(cfg, dtype=dtype, rngs=rngs)])

    def __call__(self, x, position_bias, key_mask):
        return self.layer[1](self.layer[0](x, position_bias, key_mask))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        if not cfg.per_layer_relative_bias:  # T5: one table for all blocks (UMT5: one in each block)
            self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                     dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return T5Block(cfg, dtype=dtype, rngs=r)

        self.block = make(rngs)
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def position_bias(self, length: int):
        """(1, H, L, L) fp32 bias of query i attending to key j (T5's shared table)."""
        return bias_from_table(self.relative_attention_bias, encoder_buckets(length, self.cfg))

    def __call__(self, h, attention_mask=None):
        if self.cfg.per_layer_relative_bias:  # each block looks its own table up at the same buckets
            bias = jnp.asarray(encoder_buckets(h.shape[1], self.cfg), jnp.int32)
        else:
            bias = self.position_bias(h.shape[1])
        key_mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
        graphdef, state = nnx.split(self.block)

        def body(x, s):
            return nnx.merge(graphdef, s)(x, bias, key_mask), None

        h, _ = jax.lax.scan(body, h, state)
        return self.final_layer_norm(h)


class T5EncoderModel(nnx.Module):
    """``model(input_ids, attention_mask=None) -> last_hidden_state`` (B, L, d_model) in ``dtype``."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        h = self.shared(jnp.asarray(input_ids, jnp.int32))
        return self.encoder(h, attention_mask)


# --- checkpoint conversion tables ---------------------------------------------------------------

TORCH_RENAMES: list[tuple[str, str]] = [
    # Block 0 owns the (shared) relative attention bias in transformers' T5 (UMT5: no rename, every
    # block's table is in the stack under its own name).
    (r"^encoder\.relative_attention_bias\.", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."),
]

TORCH_IGNORE: list[str] = [
    # Tied to shared.weight; save_pretrained drops it, older or hand-made checkpoints may hold it.
    r"^encoder\.embed_tokens\.weight$",
]


def params_from_torch(flat: dict[str, np.ndarray], cfg: T5Config, dtype=None) -> dict:
    """Params pure dict for :class:`T5EncoderModel` from a transformers ``T5EncoderModel`` or (with
    ``cfg.per_layer_relative_bias``) ``UMT5EncoderModel`` state dict (numpy arrays).

    ``dtype``: cast the floating tensors to it (``None``: float32).
    """
    mdtype = jnp.float32 if dtype is None else dtype
    if "shared.weight" not in flat and "encoder.embed_tokens.weight" in flat:
        # The two are tied; a checkpoint that kept only the encoder's name still holds the embedding.
        flat = {("shared.weight" if k == "encoder.embed_tokens.weight" else k): v for k, v in flat.items()}
    return map_state_dict(
        flat,
        expected_shapes(lambda: T5EncoderModel(cfg, dtype=mdtype)),
        stacked={"encoder.block": cfg.num_layers},
        renames=[] if cfg.per_layer_relative_bias else TORCH_RENAMES,
        ignore=TORCH_IGNORE,
        dtype=dtype,
        what=("UMT5" if cfg.per_layer_relative_bias else "T5") + " text encoder checkpoint",
    )


def build(cfg: T5Config, params: dict, dtype=jnp.float32) -> T5EncoderModel:
    """A :class:`T5EncoderModel` holding ``params`` (from :func:`params_from_torch`)."""
    return build_module(lambda: T5EncoderModel(cfg, dtype=dtype), params)
