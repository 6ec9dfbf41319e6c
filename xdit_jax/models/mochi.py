"""Mochi 1 transformer (diffusers ``MochiTransformer3DModel``) in Flax NNX.

An asymmetric two-stream DiT: the video tokens (width ``heads x head_dim``, 3072 in Mochi 1) and
the caption tokens (``pooled_projection_dim``, 1536) keep their own weights, norms and MLPs and
meet in one joint attention over ``[video; caption]`` (the caption's padding masked). The
parallel engine shards the video sequence; the caption, a few hundred tokens (sharded in slices of
its own, :data:`TEXT_KEYS`, or whole), joins the attention as a *context*
(:func:`xdit_jax.parallel.attention.attention` with ``context=``): the video rows see every key of
both streams, the caption rows too, as on one device.

The first ``num_layers - 1`` blocks are alike and stacked (one ``lax.scan``); the last one
(``context_pre_only``: no caption output, no caption MLP) is its own module. Video positions use
Mochi's learned 3D RoPE (``pos_frequencies``, per head), built per shard from the tokens' global
(t, y, x) positions.

PipeFusion splits the stacked blocks into stages; each video patch carries a slice of the caption
stream through them (:mod:`xdit_jax.parallel.pipefusion`, :data:`TEXT_KEYS`), and the last block runs on
the last stage (:func:`xdit_jax.models.layers.final_block`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import (
    LayerNorm,
    TimestepEmbedding,
    final_block,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"
# The caption stream in ``cond``: sliced with PipeFusion's patches, sharded over the sequence group (its mask stays
# whole)
TEXT_KEYS = ("context",)


@dataclasses.dataclass(frozen=True)
class MochiConfig(TransformerDims):
    patch_size: int = 2
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 48
    pooled_projection_dim: int = 1536
    in_channels: int = 12
    out_channels: int | None = None
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 4096
    time_embed_dim: int = 256
    activation_fn: str = "swiglu"
    max_sequence_length: int = 256

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MochiConfig:
        cfg = cls(**known_fields(cls, d))
        if cfg.activation_fn != "swiglu" or cfg.qk_norm != "rms_norm":
            raise ValueError(f"Unsupported Mochi variant: activation {cfg.activation_fn!r}, qk_norm {cfg.qk_norm!r} "
                             "(Mochi 1 uses swiglu and rms_norm).")
        if cfg.num_layers < 2:
            raise ValueError(f"num_layers={cfg.num_layers}: a Mochi transformer has at least 2 blocks.")
        return cfg


# ----- norms: statistics and modulation in float32, the result in the input dtype -----

def _rms(x, eps: float):
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)


def modulated_rms(x, scale, eps: float = 1e-6):
    """diffusers ``MochiModulatedRMSNorm``: RMS-normalise ``x`` and multiply by ``scale`` (B, 1, D)."""
    return (_rms(x, eps) * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """diffusers ``MochiRMSNorm`` with a weight (the q/k norms, per head)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        return (_rms(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class RMSNormZero(nnx.Module):
    """diffusers ``MochiRMSNormZero``: (normed x scaled by 1 + scale_msa, gate_msa, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-6, *, dtype, rngs):
        self.eps = eps
        self.linear = linear(dim, 4 * out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb):
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(self.linear(jax.nn.silu(temb)), 4, axis=-1)
        return modulated_rms(x, 1 + scale_msa[:, None].astype(jnp.float32), self.eps), gate_msa, scale_mlp, gate_mlp


class LayerNormContinuous(nnx.Module):
    """diffusers ``MochiLayerNormContinuous`` (the last block's caption norm): RMS norm times 1 + scale."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6, *, dtype, rngs):
        self.eps = eps
        self.linear_1 = linear(cond_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb):
        scale = self.linear_1(jax.nn.silu(temb).astype(x.dtype))
        return modulated_rms(x, 1 + scale[:, None].astype(jnp.float32), self.eps)


class SwiGLU(nnx.Module):
    """diffusers ``FeedForward(activation_fn="swiglu", bias=False)``: ``net.0.proj`` then ``net.2``."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs):
        self.net_0 = linear(dim, 2 * inner, bias=False, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        hidden, gate = jnp.split(self.net_0(x), 2, axis=-1)
        return self.net_2(hidden * jax.nn.silu(gate))


def apply_rope(x, cos, sin):
    """Mochi's rotation of interleaved pairs of ``x`` (B, S, H, D) by per-head (S, H, D/2) tables."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = xf[..., 0], xf[..., 1]
    out = jnp.stack([even * cos[None] - odd * sin[None], even * sin[None] + odd * cos[None]], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----- the blocks -----

class Attention(nnx.Module):
    """diffusers ``MochiAttention`` + ``MochiAttnProcessor2_0``: per-stream q/k/v and output
    projections, per-head RMS norms, RoPE on the video stream, one joint softmax."""

    def __init__(self, cfg: MochiConfig, *, last: bool, dtype, rngs):
        d, dc, hd = cfg.inner_dim, cfg.pooled_projection_dim, cfg.attention_head_dim
        self.heads, self.last = cfg.num_attention_heads, last
        self.to_q = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, dtype=dtype)
        self.norm_k = RMSNorm(hd, dtype=dtype)
        self.add_k_proj = linear(dc, d, bias=False, dtype=dtype, rngs=rngs)
        self.add_v_proj = linear(dc, d, bias=False, dtype=dtype, rngs=rngs)
        self.norm_added_k = RMSNorm(hd, dtype=dtype)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        if not last:  # the last block's caption queries are computed by diffusers and thrown away
            self.add_q_proj = linear(dc, d, bias=False, dtype=dtype, rngs=rngs)
            self.norm_added_q = RMSNorm(hd, dtype=dtype)
            self.to_add_out = linear(d, dc, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, c_mask, rope):
        heads = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
        q = apply_rope(self.norm_q(heads(self.to_q(x))), *rope)
        k = apply_rope(self.norm_k(heads(self.to_k(x))), *rope)
        v = heads(self.to_v(x))
        ck, cv = self.norm_added_k(heads(self.add_k_proj(c))), heads(self.add_v_proj(c))
        cq = None if self.last else self.norm_added_q(heads(self.add_q_proj(c)))
        o, oc = attention(q, k, v, context=(cq, ck, cv, c_mask))
        o = self.to_out(o.reshape(*o.shape[:2], -1))
        return o, (None if self.last else self.to_add_out(oc.reshape(*oc.shape[:2], -1)))


class MochiBlock(nnx.Module):
    """diffusers ``MochiTransformerBlock``; ``last``: ``context_pre_only`` (the caption is not updated)."""

    def __init__(self, cfg: MochiConfig, *, last: bool = False, dtype, rngs):
        d, dc = cfg.inner_dim, cfg.pooled_projection_dim
        self.last = last
        self.norm1 = RMSNormZero(d, d, dtype=dtype, rngs=rngs)
        if last:
            self.norm1_context = LayerNormContinuous(dc, d, dtype=dtype, rngs=rngs)
        else:
            self.norm1_context = RMSNormZero(d, dc, dtype=dtype, rngs=rngs)
            self.ff_context = SwiGLU(dc, (4 * dc * 2) // 3, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(cfg, last=last, dtype=dtype, rngs=rngs)
        self.ff = SwiGLU(d, (4 * d * 2) // 3, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, temb, c_mask, rope):
        nx, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.last:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_gate_msa, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        a, ac = self.attn1(nx, nc, c_mask, rope)
        x = x + modulated_rms(a, jnp.tanh(gate_msa)[:, None])
        h = modulated_rms(x, 1 + scale_mlp[:, None].astype(jnp.float32))
        x = x + modulated_rms(self.ff(h), jnp.tanh(gate_mlp)[:, None])
        if not self.last:
            c = c + modulated_rms(ac, jnp.tanh(c_gate_msa)[:, None])
            h = modulated_rms(c, 1 + c_scale_mlp[:, None].astype(jnp.float32))
            c = c + modulated_rms(self.ff_context(h), jnp.tanh(c_gate_mlp)[:, None])
        return x, c


# ----- embeddings -----

class AttentionPool(nnx.Module):
    """diffusers ``MochiAttentionPool``: the masked mean caption token queries the caption."""

    def __init__(self, heads: int, dim: int, out_dim: int, *, dtype, rngs):
        self.heads = heads
        self.to_kv = linear(dim, 2 * dim, dtype=dtype, rngs=rngs)
        self.to_q = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.to_out = linear(dim, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        b, n, d = x.shape
        w = mask.astype(x.dtype)[:, :, None]
        w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1)
        x = jnp.concatenate([jnp.sum(x * w, axis=1, keepdims=True), x], axis=1)  # (B, 1 + L, D)
        kv = self.to_kv(x).reshape(b, n + 1, 2, self.heads, d // self.heads)
        q = self.to_q(x[:, 0]).reshape(b, 1, self.heads, d // self.heads)
        keep = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, kv[:, :, 0], preferred_element_type=jnp.float32)
        logits = jnp.where(keep[:, None, None, :], logits * (d // self.heads) ** -0.5, -jnp.inf)
        p = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, kv[:, :, 1], preferred_element_type=jnp.float32).astype(x.dtype)
        return self.to_out(out.reshape(b, d))


class TimeCaptionEmbed(nnx.Module):
    """diffusers ``MochiCombinedTimestepCaptionEmbedding``: (time + pooled caption, projected caption)."""

    def __init__(self, cfg: MochiConfig, *, dtype, rngs):
        self.dim = cfg.time_embed_dim
        self.timestep_embedder = TimestepEmbedding(cfg.time_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.pooler = AttentionPool(8, cfg.text_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.caption_proj = linear(cfg.text_embed_dim, cfg.pooled_projection_dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, text, mask, dtype):
        t = timestep_embedding(timestep, self.dim, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        return (self.timestep_embedder(t.astype(dtype)) + self.pooler(text, mask)), self.caption_proj(text)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: MochiConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             dtype=dtype, param_dtype=dtype, rngs=rngs)


def positions(frames: int, grid_h: int, grid_w: int, base: int = 192) -> np.ndarray:
    """diffusers ``MochiRoPE._get_positions``: (frames*h*w, 3) float32 (t, y, x) of each video token,
    y and x the centres of a grid stretched to the area of a base x base one."""
    scale = (base * base / (grid_h * grid_w)) ** 0.5

    def centres(n):
        edges = np.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=np.float64).astype(np.float32)
        return (edges[:-1] + edges[1:]) / 2

    t, y, x = np.meshgrid(np.arange(frames, dtype=np.float32), centres(grid_h), centres(grid_w), indexing="ij")
    return np.stack([t, y, x], axis=-1).reshape(-1, 3).astype(np.float32)


def rope_tables(freqs, pos):
    """(S, 3) positions x (3, H, D/2) learned frequencies -> cos, sin (S, H, D/2), float32."""
    angles = jnp.einsum("nd,dhf->nhf", pos.astype(jnp.float32), freqs.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.cos(angles), jnp.sin(angles)


class MochiTransformer3DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)`` as diffusers'.

    hidden_states: (B, C, F, H, W) latents (diffusers' layout); encoder_hidden_states: (B, L, text_dim);
    timestep: (B,) (Mochi's reversed convention: the pipeline passes the scheduler's t);
    encoder_attention_mask: (B, L), 1 = caption token. Returns the prediction in the latents' layout.
    """

    def __init__(self, cfg: MochiConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_embed = TimeCaptionEmbed(cfg, dtype=dtype, rngs=rngs)
        hd = cfg.attention_head_dim
        self.pos_frequencies = nnx.Param(jnp.zeros((3, cfg.num_attention_heads, hd // 2), dtype))
        self.transformer_blocks = stack_modules(lambda r: MochiBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers - 1,
                                                rngs)
        self.last_block = MochiBlock(cfg, last=True, dtype=dtype, rngs=rngs)
        self.norm_out_linear = linear(cfg.inner_dim, 2 * cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(cfg.inner_dim, 1e-6, affine=False, dtype=dtype)
        p = cfg.patch_size
        self.proj_out = linear(cfg.inner_dim, p * p * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed (global) -> blocks (any contiguous shard of the video tokens) -> head (global) --

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        """-> (video (B, N, D), tokens {"pos": (N, 3)}, cond {"temb", "context", "context_mask"})."""
        cfg, dtype = self.cfg, self.dtype
        b, c, f, h, w = hidden_states.shape
        p = cfg.patch_size
        mask = jnp.asarray(encoder_attention_mask) != 0
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb, context = self.time_embed(t, encoder_hidden_states.astype(dtype), mask, dtype)
        x = jnp.transpose(hidden_states.astype(dtype), (0, 2, 3, 4, 1)).reshape(b * f, h, w, c)
        x = self.patch_embed.proj(x).reshape(b, f * (h // p) * (w // p), cfg.inner_dim)
        tokens = {"pos": jnp.asarray(positions(f, h // p, w // p))}
        return x, tokens, {"temb": temb, "context": context, "context_mask": mask}

    def blocks(self, x, tokens, cond):
        """The block stack (one lax.scan, then the last block) on the video tokens or a shard of them;
        the caption stream is carried along whole."""
        rope = rope_tables(self.pos_frequencies[...], tokens["pos"])
        temb, mask = cond["temb"], cond["context_mask"]
        xc = scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, temb, mask, rope), (x, cond["context"]))
        return final_block(lambda xc: self.last_block(*xc, temb, mask, rope)[0], xc)

    def head(self, x, cond, shape):
        cfg = self.cfg
        b, _, f, h, w = shape
        p = cfg.patch_size
        scale, shift = jnp.split(self.norm_out_linear(jax.nn.silu(cond["temb"]).astype(x.dtype)), 2, axis=-1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out(x).reshape(b, f, h // p, w // p, p, p, -1)
        return jnp.transpose(x, (0, 6, 1, 2, 4, 3, 5)).reshape(b, -1, f, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def check_input_shape(cfg: MochiConfig, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")


def _torch_names(cfg: MochiConfig):
    last = f"transformer_blocks.{cfg.num_layers - 1}."
    renames = [
        (r"^last_block\.", last),
        (r"^norm_out_linear\.", "norm_out.linear."),
        (r"\.attn1\.to_out\.", ".attn1.to_out.0."),
        (r"\.(ff|ff_context)\.net_0\.", r".\1.net.0.proj."),
        (r"\.(ff|ff_context)\.net_2\.", r".\1.net.2."),
    ]
    # The last block's caption queries: in checkpoints, unused (diffusers discards their output).
    ignore = [rf"^{last.replace('.', chr(92) + '.')}attn1\.(add_q_proj|norm_added_q)\."]
    return renames, ignore


def params_from_torch(flat: dict, cfg: MochiConfig, dtype=None) -> dict:
    renames, ignore = _torch_names(cfg)
    return map_state_dict(flat, expected_shapes(lambda: MochiTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers - 1}, renames=renames, ignore=ignore, dtype=dtype,
                          what="Mochi transformer checkpoint")


def build(cfg: MochiConfig, params: dict, dtype=jnp.float32) -> MochiTransformer3DModel:
    return build_module(lambda: MochiTransformer3DModel(cfg, dtype=dtype), params)
