"""CogView4 transformer (diffusers ``CogView4Transformer2DModel``, THUDM/CogView4-6B) in Flax NNX.

One set of block weights serves the text and the image tokens (q / k / v / out and the feed-forward are shared);
what tells them apart is the modulation and the RoPE:

* ``patch_embed``: 2 x 2 latent patches (features ``(c, ph, pw)``) -> ``proj``; the GLM states -> ``text_proj``;
* ``time_condition_embed`` (diffusers' ``CogView3CombinedTimestepSizeEmbeddings``): sinusoids of the timestep
  (``inner_dim`` wide, cos first) -> ``timestep_embedder``, plus SDXL's size conditions (``original_size``,
  ``crop_coords``, ``target_size``: each of the two numbers as ``condition_dim`` sinusoids, concatenated in that
  order) -> ``condition_embedder`` (Linear, SiLU, Linear); the sum through a SiLU is ``temb``;
* each block: ``norm1`` (LayerNorm without affine on the image and on the text, one Linear of ``temb`` to 12
  chunks: shift / scale / gate of the attention and of the MLP, each for the image and for the text — diffusers'
  order ``shift, c_shift, scale, c_scale, gate, c_gate`` twice), one attention over ``[text; image]`` (q / k
  LayerNorms without affine over each head, 2-D RoPE on the image tokens only), gated residuals, ``norm2`` /
  ``norm2_context`` modulated alike, the shared tanh-GELU feed-forward, gated residuals;
* ``norm_out`` (LayerNorm without affine, ``* (1 + scale) + shift`` from a Linear of ``temb``, scale first),
  ``proj_out`` and the unpatchify.

RoPE (diffusers' ``CogView4RotaryPosEmbed``): the head's first half for the row, the second for the column (each
``head_dim // 4`` frequencies ``theta ** (-2i / (head_dim / 2))``, repeated twice — the rotate-half layout), the
patch row ``h`` of ``H`` read at ``h * rope_axes_dim[0] // H`` of a ``rope_axes_dim`` table (positions interpolated
into it, so any size fits), the column alike.

Over the mesh (:func:`xdit_jax.parallel.sequence.run_blocks` with ``text=TEXT_KEYS``): the image tokens are the
sharded sequence; the text joins each attention as the *context* of :func:`xdit_jax.parallel.attention.attention`
(the order of keys does not change an attention: ``[text; image]`` == the image with the text as context),
sharded over the sequence group too. ``text_mask`` (B, Lt) masks text keys: diffusers runs the negative and the
positive prompt as separate calls of their own lengths; here they are one CFG batch, the shorter one padded with
masked tokens, which changes nothing for the real ones (text tokens meet only in the attention).
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
from xdit_jax.models.layers import (
    FeedForward,
    LayerNorm,
    TimestepEmbedding,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.models.llama import apply_rotary
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"
TEXT_KEYS = ("context",)  # the text in ``cond``: sharded over the sequence group with the image tokens


@dataclasses.dataclass(frozen=True)
class CogView4Config:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    condition_dim: int = 256
    pos_embed_max_size: int = 128
    sample_size: int = 128
    rope_axes_dim: tuple[int, int] = (256, 256)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CogView4Config:
        return cls(**known_fields(cls, d))

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(a) for a in self.rope_axes_dim))
        if len(self.rope_axes_dim) != 2 or min(self.rope_axes_dim) < 1:
            raise ValueError(f"rope_axes_dim must be two positive sizes, got {self.rope_axes_dim}.")
        if self.attention_head_dim % 4:
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be a multiple of 4 (RoPE: half the "
                             "head for rows, half for columns, each rotating pairs).")
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "num_attention_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CogView4 {name} must be >= 1, got {getattr(self, name)}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def pooled_projection_dim(self) -> int:
        return 3 * 2 * self.condition_dim


def rope_table(cfg: CogView4Config, grid_h: int, grid_w: int, theta: float = 10000.0):
    """cos, sin (grid_h * grid_w, head_dim) float32 of the image tokens, as diffusers' ``CogView4RotaryPosEmbed``
    computes them in float32 (the angles rounded as torch's float32 ``outer``; cos / sin correctly rounded)."""
    half = cfg.attention_head_dim // 2
    f32 = np.float32

    def axis(n_table: int, n: int):
        inv = (f32(1.0) / (f32(theta) ** (np.arange(0, half, 2, dtype=f32)[:half // 2] / f32(half)))).astype(f32)
        idx = np.arange(n) * n_table // n
        return (idx.astype(f32)[:, None] * inv[None]).astype(f32)  # (n, half // 2)

    fh, fw = axis(cfg.rope_axes_dim[0], grid_h), axis(cfg.rope_axes_dim[1], grid_w)
    fh = np.broadcast_to(fh[:, None], (grid_h, grid_w, fh.shape[-1]))
    fw = np.broadcast_to(fw[None], (grid_h, grid_w, fw.shape[-1]))
    freqs = np.concatenate([fh, fw], axis=-1)
    freqs = np.concatenate([freqs, freqs], axis=-1).reshape(grid_h * grid_w, -1).astype(np.float64)
    return np.cos(freqs).astype(f32), np.sin(freqs).astype(f32)


# ----- blocks -----

class Attention(nnx.Module):
    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim = cfg.num_attention_heads, hd
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm_q = LayerNorm(hd, 1e-5, affine=False, dtype=dtype)
        self.norm_k = LayerNorm(hd, 1e-5, affine=False, dtype=dtype)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)

    def qkv(self, h, rope=None):
        """(q, k, v) (B, S, H, D) of the tokens ``h``; ``rope`` (cos, sin) (S, D): rotated (the image tokens)."""
        b, s, _ = h.shape
        q, k, v = (p(h).reshape(b, s, self.heads, self.head_dim) for p in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def out(self, o):
        return self.to_out(o.reshape(*o.shape[:2], -1))


class AdaLayerNormZero(nnx.Module):
    """diffusers' ``CogView4AdaLayerNormZero``: the 12 modulation chunks of ``temb`` (the LayerNorms: in the block)."""

    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        self.linear = linear(cfg.time_embed_dim, 12 * cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, temb):
        return [c[:, None] for c in jnp.split(self.linear(temb), 12, axis=-1)]


class Block(nnx.Module):
    """diffusers' ``CogView4TransformerBlock`` on (image tokens, text tokens)."""

    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(cfg, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(cfg, dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(d, 1e-5, affine=False, dtype=dtype)  # norm / norm_context / norm2 / norm2_context
        self.ff = FeedForward(d, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, temb, rope, c_mask):
        (shift, c_shift, scale, c_scale, gate, c_gate,
         shift2, c_shift2, scale2, c_scale2, gate2, c_gate2) = self.norm1(temb)
        hx = self.ln(x) * (1 + scale) + shift
        hc = self.ln(c) * (1 + c_scale) + c_shift
        o, oc = attention(*self.attn1.qkv(hx, rope), context=(*self.attn1.qkv(hc), c_mask))
        x = x + self.attn1.out(o) * gate
        c = c + self.attn1.out(oc) * c_gate
        x = x + self.ff(self.ln(x) * (1 + scale2) + shift2) * gate2
        c = c + self.ff(self.ln(c) * (1 + c_scale2) + c_shift2) * c_gate2
        return x, c


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = linear(cfg.in_channels * p * p, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.text_proj = linear(cfg.text_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)


class TimeConditionEmbed(nnx.Module):
    """diffusers' ``CogView3CombinedTimestepSizeEmbeddings`` (the SiLU after it: the model's)."""

    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        self.cfg = cfg
        self.timestep_embedder = TimestepEmbedding(cfg.inner_dim, cfg.time_embed_dim, dtype=dtype, rngs=rngs)
        self.condition_embedder = TimestepEmbedding(cfg.pooled_projection_dim, cfg.time_embed_dim, dtype=dtype,
                                                    rngs=rngs)

    def __call__(self, t, original_size, target_size, crop_coords, dtype):
        cfg = self.cfg
        b = t.shape[0]
        sizes = [jnp.asarray(a, jnp.float32).reshape(b, 2) for a in (original_size, crop_coords, target_size)]
        cond = jnp.concatenate([timestep_embedding(a.reshape(-1), cfg.condition_dim).reshape(b, -1) for a in sizes], -1)
        t_emb = self.timestep_embedder(timestep_embedding(t, cfg.inner_dim).astype(dtype))
        return t_emb + self.condition_embedder(cond.astype(dtype))


class NormOut(nnx.Module):
    def __init__(self, cfg: CogView4Config, *, dtype, rngs):
        self.linear = linear(cfg.time_embed_dim, 2 * cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.inner_dim, 1e-5, affine=False, dtype=dtype)

    def __call__(self, x, temb):
        scale, shift = jnp.split(self.linear(temb), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


# ----- the model -----

class CogView4Transformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords,
    text_mask=None)``: latents (B, C, H, W), GLM states (B, Lt, text_embed_dim), timesteps (B,) (the scheduler's,
    0..1000), the size conditions (B, 2) each (or (2,) for all), ``text_mask`` bool (B, Lt) text keys kept (None:
    all) -> (B, out_channels, H, W)."""

    def __init__(self, cfg: CogView4Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        p = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_condition_embed = TimeConditionEmbed(cfg, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: Block(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.norm_out = NormOut(cfg, dtype=dtype, rngs=rngs)
        self.proj_out = linear(cfg.inner_dim, p * p * cfg.out_channels, dtype=dtype, rngs=rngs)

    def grid(self, shape) -> tuple[int, int]:
        h, w = shape[-2:]
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"Latents of {h} x {w} do not split into {p} x {p} patches: the height and width must be "
                             f"multiples of {p * 8} pixels ({p} latent pixels).")
        return h // p, w // p

    def embed(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords,
              text_mask=None):
        """-> (image tokens (B, N, D), tokens {"rope": (cos, sin) (N, head_dim)}, cond {"temb" (B, time_embed_dim)
        after the SiLU, "context" (B, Lt, D) the projected text, "context_mask" bool (B, Lt)})."""
        cfg, dtype = self.cfg, self.dtype
        x = jnp.asarray(hidden_states)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}.")
        b, c = x.shape[:2]
        gh, gw = self.grid(x.shape)
        p = cfg.patch_size
        x = x.astype(dtype).reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        x = self.patch_embed.proj(x)
        text = jnp.asarray(encoder_hidden_states)
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"encoder_hidden_states must be ({b}, tokens, {cfg.text_embed_dim}); got "
                             f"{tuple(text.shape)}.")
        ctx = self.patch_embed.text_proj(text.astype(dtype))
        mask = jnp.ones(text.shape[:2], bool) if text_mask is None else jnp.asarray(text_mask).astype(bool)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        sizes = [jnp.broadcast_to(jnp.asarray(a, jnp.float32).reshape(-1, 2), (b, 2))
                 for a in (original_size, target_size, crop_coords)]
        temb = jax.nn.silu(self.time_condition_embed(t, *sizes, dtype))
        cos, sin = rope_table(cfg, gh, gw)
        return x, {"rope": (jnp.asarray(cos), jnp.asarray(sin))}, {"temb": temb, "context": ctx, "context_mask": mask}

    def blocks(self, x, tokens, cond):
        """The blocks on the image tokens (or a shard of them, or a PipeFusion patch) with the text as the context;
        -> the image tokens."""
        temb, rope, c_mask = cond["temb"], tokens["rope"], cond["context_mask"]
        x, _ = scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, temb, rope, c_mask),
                            (x, cond["context"]))
        return x

    def head(self, x, cond, shape):
        """Image tokens -> the prediction (B, C, H, W) for latents of ``shape``."""
        gh, gw = self.grid(shape)
        p, c = self.cfg.patch_size, self.cfg.out_channels
        y = self.proj_out(self.norm_out(x, cond["temb"]))
        y = y.reshape(y.shape[0], gh, gw, c, p, p).transpose(0, 3, 1, 4, 2, 5)
        return y.reshape(y.shape[0], c, gh * p, gw * p)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords,
                 text_mask=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, original_size, target_size,
                                     crop_coords, text_mask)
        return self.head(self.blocks(x, tokens, cond), cond, jnp.shape(hidden_states))


def pipefusion_stacks(cfg: CogView4Config) -> dict:
    """PipeFusion's and the sequence-parallel loop's view of the stack: the one stack of blocks, the text in
    ``cond`` (:data:`TEXT_KEYS`)."""
    return dict(stacked=STACKED, stacked_layers=cfg.num_layers, text_keys=TEXT_KEYS)


# ----- conversion -----

TORCH_RENAMES = [
    (r"\.attn1\.to_out\.", ".attn1.to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]


def params_from_torch(flat: dict, cfg: CogView4Config, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: CogView4Transformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, dtype=dtype,
                          what="CogView4 transformer checkpoint")


def build(cfg: CogView4Config, params: dict, dtype=jnp.float32) -> CogView4Transformer2DModel:
    return build_module(lambda: CogView4Transformer2DModel(cfg, dtype=dtype), params)
