"""FLUX.2 transformer (diffusers ``Flux2Transformer2DModel``, the plain path) in Flax NNX.

What differs from FLUX.1 (:mod:`xdit_jax.models.flux`, whose attention, RoPE application and two-phase layout it
reuses):

* No biases anywhere (projections, feed-forwards, modulation, embedders, the head).
* The modulation is shared: three ``Flux2Modulation`` linears (double-stream image, double-stream text, single-stream)
  of ``silu(temb)`` computed **once per step**, not per block; the blocks hold no modulation weights.
* SwiGLU feed-forwards (``linear_in`` to twice the hidden width, ``silu(gate) * value``, ``linear_out``), width
  ``mlp_ratio`` (3) x dim.
* The single-stream blocks are ``Flux2ParallelSelfAttention``: one fused projection to [q; k; v; gate; value] and
  one fused output projection of [attention; SwiGLU].
* 4-axis RoPE from (t, h, w, l) ids, theta 2000 (``axes_dims_rope`` (32, 32, 32, 32)); the text tokens are rotated
  too (their ids (0, 0, 0, l): the position along the prompt).
* No pooled text embedding: ``temb`` is the timestep embedding (plus the guidance embedding where
  ``guidance_embeds``: FLUX.2-dev).

Over the mesh, as FLUX.1: the double-stream blocks with the image tokens sharded over (ring, ulysses) and the text as
the attention's context (sharded too: :data:`TEXT_KEYS`), then the single-stream blocks over the joint
[text; image] sequence sharded as one (:func:`xdit_jax.pipelines.flux2.transformer_over_mesh`). PipeFusion runs
:meth:`Flux2Transformer2DModel.blocks` (both stacks with the text held whole, :meth:`SingleBlock.pair`).

Not supported: diffusers' KV-cache path (``kv_cache`` / ``kv_cache_mode``: ``Flux2KV*``, the klein-KV pipeline's
reference-image cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import TransformerDims
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models.layers import (
    LayerNorm,
    TimestepEmbedding,
    linear,
    rope_1d,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"
SINGLE = "single_transformer_blocks"
STACKS = (STACKED, SINGLE)
TEXT_KEYS = ("context", "context_rope")  # as FLUX.1's: the text stream in ``cond`` and its RoPE tables


@dataclasses.dataclass(frozen=True)
class Flux2Config(TransformerDims):
    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Flux2Config:
        return flux.checked_config(cls, d, "FLUX.2", "patchifies")

    @property
    def mlp_hidden(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)


def swiglu(x):
    """diffusers ``Flux2SwiGLU``: ``silu(first half) * second half``."""
    a, b = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(a) * b


def _mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nnx.Module):
    """diffusers ``Flux2FeedForward`` (no bias): ``linear_out(swiglu(linear_in(x)))``."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs):
        self.linear_in = linear(dim, 2 * inner, bias=False, dtype=dtype, rngs=rngs)
        self.linear_out = linear(inner, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_out(swiglu(self.linear_in(x)))


class Modulation(nnx.Module):
    """diffusers ``Flux2Modulation``: ``linear(silu(temb))`` -> ``sets`` triples (shift, scale, gate)."""

    def __init__(self, dim: int, sets: int, *, dtype, rngs):
        self.sets = sets
        self.linear = linear(dim, 3 * sets * dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, temb):
        return self.linear(jax.nn.silu(temb))


def split_mod(mod, sets: int):
    """(B, 3 sets D) -> ``sets`` (shift, scale, gate) triples of (B, D)."""
    chunks = jnp.split(mod, 3 * sets, axis=-1)
    return [tuple(chunks[3 * i:3 * i + 3]) for i in range(sets)]


class DoubleBlock(nnx.Module):
    """diffusers ``Flux2TransformerBlock``: FLUX.1's double-stream block with the modulation passed in, SwiGLU
    feed-forwards and no biases."""

    def __init__(self, cfg: Flux2Config, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.norm1_context = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.attn = flux.Attention(cfg, added=True, pre_only=False, bias=False, eps=cfg.eps, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.ff = FeedForward(d, cfg.mlp_hidden, dtype=dtype, rngs=rngs)
        self.norm2_context = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.ff_context = FeedForward(d, cfg.mlp_hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, mod_img, mod_txt, rope, c_rope):
        (sh, sc, g), (sh2, sc2, g2) = split_mod(mod_img, 2)
        (csh, csc, cg), (csh2, csc2, cg2) = split_mod(mod_txt, 2)
        a, ac = self.attn.joint(_mod(self.norm1(x), sh, sc), _mod(self.norm1_context(c), csh, csc), rope, c_rope)
        x = x + g[:, None] * a
        x = x + g2[:, None] * self.ff(_mod(self.norm2(x), sh2, sc2))
        c = c + cg[:, None] * ac
        c = c + cg2[:, None] * self.ff_context(_mod(self.norm2_context(c), csh2, csc2))
        return x, flux._fp16_clip(c)


class ParallelSelfAttention(nnx.Module):
    """diffusers ``Flux2ParallelSelfAttention``: ``to_qkv_mlp_proj`` -> [q; k; v; SwiGLU input], per-head RMS norms
    of q and k, RoPE; ``to_out`` of [attention; swiglu(mlp)]."""

    def __init__(self, cfg: Flux2Config, *, dtype, rngs):
        d, hd, m = cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_hidden
        self.head_dim, self.inner = hd, d
        self.to_qkv_mlp_proj = linear(d, 3 * d + 2 * m, bias=False, dtype=dtype, rngs=rngs)
        self.norm_q = flux.RMSNorm(hd, cfg.eps, dtype=dtype)
        self.norm_k = flux.RMSNorm(hd, cfg.eps, dtype=dtype)
        self.to_out = linear(d + m, d, bias=False, dtype=dtype, rngs=rngs)

    def project(self, h, rope, batched: bool = False):
        """-> (q, k, v, mlp) of the normed tokens ``h``; ``rope``: (S, hd) tables, or (B, S, hd) with ``batched``."""
        y = self.to_qkv_mlp_proj(h)
        d, hd = self.inner, self.head_dim
        rot = flux.apply_rope_batched if batched else flux.apply_rope
        q = rot(self.norm_q(flux._heads(y[..., :d], hd)), *rope)
        k = rot(self.norm_k(flux._heads(y[..., d:2 * d], hd)), *rope)
        return q, k, flux._heads(y[..., 2 * d:3 * d], hd), y[..., 3 * d:]

    def out(self, o, mlp):
        return self.to_out(jnp.concatenate([o.reshape(*o.shape[:2], -1), swiglu(mlp)], axis=-1))


class SingleBlock(nnx.Module):
    """diffusers ``Flux2SingleTransformerBlock`` on the joint sequence (shared modulation passed in)."""

    def __init__(self, cfg: Flux2Config, *, dtype, rngs):
        self.norm = LayerNorm(cfg.inner_dim, cfg.eps, affine=False, dtype=dtype)
        self.attn = ParallelSelfAttention(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mod, rope):
        ((shift, scale, gate),) = split_mod(mod, 1)
        q, k, v, mlp = self.attn.project(_mod(self.norm(x), shift, scale), rope)
        return flux._fp16_clip(x + gate[:, None] * self.attn.out(attention(q, k, v), mlp))

    def pair(self, x, c, mod, rope, c_rope):
        """The same block with the text ``c`` kept apart from the image tokens ``x`` (PipeFusion's patches): the
        text joins the attention as its context; every other op is per token. -> (image, text)."""
        ((shift, scale, gate),) = split_mod(mod, 1)
        qx, kx, vx, mx = self.attn.project(_mod(self.norm(x), shift, scale), rope)
        qc, kc, vc, mc = self.attn.project(_mod(self.norm(c), shift, scale), c_rope, batched=True)
        o, oc = attention(qx, kx, vx, context=(qc, kc, vc, None))
        return (flux._fp16_clip(x + gate[:, None] * self.attn.out(o, mx)),
                flux._fp16_clip(c + gate[:, None] * self.attn.out(oc, mc)))


class TimeGuidanceEmbed(nnx.Module):
    """diffusers ``Flux2TimestepGuidanceEmbeddings`` (no biases): time (+ guidance where ``guidance_embeds``)."""

    def __init__(self, cfg: Flux2Config, *, dtype, rngs):
        c, d = cfg.timestep_guidance_channels, cfg.inner_dim
        self.channels = c
        self.timestep_embedder = TimestepEmbedding(c, d, bias=False, dtype=dtype, rngs=rngs)
        self.guidance_embedder = (TimestepEmbedding(c, d, bias=False, dtype=dtype, rngs=rngs)
                                  if cfg.guidance_embeds else None)

    def __call__(self, timestep, guidance, dtype):
        proj = lambda t: timestep_embedding(t, self.channels, flip_sin_to_cos=True).astype(dtype)  # noqa: E731
        emb = self.timestep_embedder(proj(timestep))
        if self.guidance_embedder is not None and guidance is not None:
            emb = emb + self.guidance_embedder(proj(guidance))
        return emb


class NormOut(nnx.Module):
    """diffusers ``AdaLayerNormContinuous(elementwise_affine=False, bias=False)``: (scale, shift) of silu(temb)."""

    def __init__(self, d: int, eps: float, *, dtype, rngs):
        self.linear = linear(d, 2 * d, bias=False, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, eps, affine=False, dtype=dtype)

    def __call__(self, x, temb):
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb).astype(x.dtype)), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


def rope_tables(ids: np.ndarray, axes_dims, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``Flux2PosEmbed``: (N, n_axes) position ids -> cos, sin (N, sum(axes_dims)) float32."""
    ids = np.asarray(ids, np.float32)
    if ids.ndim != 2 or ids.shape[1] < len(axes_dims):
        raise ValueError(f"ids of shape {ids.shape}: FLUX.2 takes (tokens, {len(axes_dims)}) position ids.")
    tabs = [rope_1d(int(dim), ids[:, i], theta) for i, dim in enumerate(axes_dims)]
    return (np.concatenate([t[0] for t in tabs], axis=-1).astype(np.float32),
            np.concatenate([t[1] for t in tabs], axis=-1).astype(np.float32))


def image_ids(grid_h: int, grid_w: int, t: int = 0) -> np.ndarray:
    """Flux2KleinPipeline's ``_prepare_latent_ids``: (h*w, 4) = (t, row, column, 0) per latent token."""
    ids = np.zeros((grid_h, grid_w, 4), np.float32)
    ids[..., 0] = t
    ids[..., 1] = np.arange(grid_h)[:, None]
    ids[..., 2] = np.arange(grid_w)[None, :]
    return ids.reshape(-1, 4)


def text_ids(length: int) -> np.ndarray:
    """``_prepare_text_ids``: (L, 4) = (0, 0, 0, l)."""
    ids = np.zeros((length, 4), np.float32)
    ids[:, 3] = np.arange(length)
    return ids


def pipefusion_stacks(cfg: Flux2Config) -> dict:
    """PipeFusion's stacks (double-, then single-stream; both over all stages) and the text's ``cond`` keys."""
    return dict(stacked=STACKS, stacked_layers=(cfg.num_layers, cfg.num_single_layers), text_keys=TEXT_KEYS)


class Flux2Transformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None)`` as diffusers'
    forward: packed latents (B, N, in_channels), text states (B, L, joint_attention_dim), timestep (B,) in [0, 1]
    (the pipeline's t / 1000), ids (N, 4) and (L, 4) (host arrays; a leading batch axis is dropped as diffusers
    does), guidance (B,) or None. Returns (B, N, out_channels)."""

    def __init__(self, cfg: Flux2Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.time_guidance_embed = TimeGuidanceEmbed(cfg, dtype=dtype, rngs=rngs)
        self.double_stream_modulation_img = Modulation(d, 2, dtype=dtype, rngs=rngs)
        self.double_stream_modulation_txt = Modulation(d, 2, dtype=dtype, rngs=rngs)
        self.single_stream_modulation = Modulation(d, 1, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(cfg.in_channels, d, bias=False, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(cfg.joint_attention_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.single_transformer_blocks = stack_modules(lambda r: SingleBlock(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_single_layers, rngs)
        self.norm_out = NormOut(d, cfg.eps, dtype=dtype, rngs=rngs)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_ch, bias=False, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None, guidance=None,
              rope=None, **unsupported):
        """-> (image (B, N, D), tokens {"rope": image tables}, cond {"temb", the three modulations, "context"
        (B, L, D), "context_rope" (B, L, hd) tables}, text tables (L, hd)). ``rope``: the tables
        ``((img_cos, img_sin), (txt_cos, txt_sin))`` ready made (the ids are then ignored)."""
        if unsupported:
            raise NotImplementedError(f"Flux2Transformer2DModel: {sorted(unsupported)} not supported (only the plain "
                                      "path; diffusers' KV-cache mode, Flux2KV*, is not implemented).")
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        # t x 1000 (and guidance x 1000) stay float32 (diffusers rounds them to the model dtype first)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,)) * 1000
        temb = self.time_guidance_embed(t, guidance, dtype)
        x = self.x_embedder(hidden_states.astype(dtype))
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        if rope is None:
            ids = [np.asarray(a) for a in (img_ids, txt_ids)]
            ids = [a[0] if a.ndim == 3 else a for a in ids]
            rope = tuple(rope_tables(a, cfg.axes_dims_rope, cfg.rope_theta) for a in ids)
        img_rope, txt_rope = (tuple(jnp.asarray(a, jnp.float32) for a in r) for r in rope)
        c_rope = tuple(jnp.broadcast_to(a[None], (b,) + a.shape) for a in txt_rope)
        cond = {"temb": temb, "mod_img": self.double_stream_modulation_img(temb),
                "mod_txt": self.double_stream_modulation_txt(temb), "mod_single": self.single_stream_modulation(temb),
                "context": c, "context_rope": c_rope}
        return x, {"rope": img_rope}, cond, txt_rope

    def double_blocks(self, x, tokens, cond):
        """The double-stream stack on the image tokens (or a shard of them); -> (image, text)."""
        mi, mt, rope, c_rope = cond["mod_img"], cond["mod_txt"], tokens["rope"], cond["context_rope"]
        return scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, mi, mt, rope, c_rope),
                            (x, cond["context"]))

    @staticmethod
    def joint_tokens(tokens, text_rope):
        """The single-stream phase's per-token tables: [text; image]."""
        return {"rope": tuple(jnp.concatenate([t, i], axis=0) for t, i in zip(text_rope, tokens["rope"]))}

    def single_blocks(self, joint, tokens, cond):
        """The single-stream stack on the joint [text; image] sequence (or a contiguous shard of it)."""
        mod, rope = cond["mod_single"], tokens["rope"]
        return scan_modules(self.single_transformer_blocks, lambda blk, y: blk(y, mod, rope), joint)

    def blocks(self, x, tokens, cond):
        """Both stacks with the text held whole (PipeFusion's form): == :meth:`double_blocks` then
        :meth:`single_blocks` over [text; image]. -> the image tokens."""
        mod, rope, c_rope = cond["mod_single"], tokens["rope"], cond["context_rope"]
        xc = self.double_blocks(x, tokens, cond)
        x, _ = scan_modules(self.single_transformer_blocks, lambda blk, xc: blk.pair(*xc, mod, rope, c_rope), xc)
        return x

    def head(self, x, cond, shape=None):
        """Image tokens -> the prediction (B, N, out_channels)."""
        return self.proj_out(self.norm_out(x, cond["temb"]))

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None, **unsupported):
        x, tokens, cond, txt_rope = self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
                                               guidance, **unsupported)
        x, c = self.double_blocks(x, tokens, cond)
        joint = self.single_blocks(jnp.concatenate([c, x], axis=1), self.joint_tokens(tokens, txt_rope), cond)
        return self.head(joint[:, c.shape[1]:], cond)


TORCH_RENAMES = [
    (r"^(transformer_blocks\.\d+\.attn)\.to_out\.", r"\1.to_out.0."),
]


def params_from_torch(flat: dict, cfg: Flux2Config, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: Flux2Transformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers}, renames=TORCH_RENAMES,
                          dtype=dtype, what="FLUX.2 transformer checkpoint")


def build(cfg: Flux2Config, params: dict, dtype=jnp.float32) -> Flux2Transformer2DModel:
    return build_module(lambda: Flux2Transformer2DModel(cfg, dtype=dtype), params)
