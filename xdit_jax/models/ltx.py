"""LTX-Video transformer (diffusers ``LTXVideoTransformer3DModel``) in Flax NNX.

The packed latents (B, S, C) — diffusers' ``_pack_latents``: tokens row-major over (frames, rows, columns)
of patches — go through ``proj_in`` (a Linear: LTX-Video's patches are 1 x 1 x 1); the timestep through
PixArt's ``AdaLayerNormSingle`` (:class:`xdit_jax.models.pixart.AdaLayerNormSingle`: 6 x D per sample); the
T5 caption through PixArt's caption projection. Each block: RMS norm (no weight) modulated by the block's
``scale_shift_table`` + the timestep, self-attention with q/k RMS norms across all heads and LTX's 3-D RoPE
(on the full width, interleaved pairs), then cross-attention of the un-normed tokens to the caption (its T5
mask; q/k normed too, no RoPE), then a modulated RMS norm and the tanh-GELU MLP. The head: LayerNorm (no
affine) modulated by ``scale_shift_table`` + the embedded timestep, ``proj_out``.

RoPE (diffusers ``LTXVideoRotaryPosEmbed``): each token's (frame, row, column) scaled by
``rope_interpolation_scale`` (the VAE's temporal factor / frame rate, its spatial factor twice) times the
patch size over the base sizes (20 frames, 2048 x 2048), then ``theta ** linspace(0, 1, D // 6) * pi / 2``
times ``2 * coord - 1``; the tables are built in ``embed`` for the global positions and travel with the
tokens (``tokens["cos"] / ["sin"]``, (S, D)) under sequence parallelism.

Image-to-video (diffusers' per-token timesteps ``t * (1 - conditioning_mask)``, the first latent frame's
tokens at timestep 0): ``first_frame_timestep`` gives those tokens their own modulation (``tokens["first"]``
marks them), in the blocks and the head, as :mod:`xdit_jax.models.wan` does for Wan 2.2 TI2V.

The condition pipeline (diffusers' ``LTXConditionPipeline``): ``video_coords`` (3, S) replace the grid (the RoPE of
appended condition tokens at their own frames), and per-token timesteps come as K distinct values
(``group_timesteps`` (B, K)) with each token's group index (``token_group`` (S,), ``tokens["group"]``): the blocks
and the head gather their modulation per token from the K embedded timesteps (no (B, S, 6, D) timestep embedding).

Self-attention goes through :func:`xdit_jax.parallel.attention.attention` (sequence-parallel over the video
tokens), cross-attention through :func:`xdit_jax.parallel.attention.cross_attention` (the caption whole on
every device). No collective here.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import (
    FeedForward,
    LayerNorm,
    PixArtAlphaTextProjection,
    RMSNorm,
    linear,
    scan_modules,
    stack_modules,
)
from xdit_jax.models.pixart import AdaLayerNormSingle, text_key_mask
from xdit_jax.parallel.attention import attention, cross_attention

STACKED = "transformer_blocks"
# diffusers' LTXVideoRotaryPosEmbed as the transformer builds it
ROPE_BASE = (20.0, 2048.0, 2048.0)  # base_num_frames, base_height, base_width
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class LTXConfig(TransformerDims):
    in_channels: int = 128
    out_channels: int | None = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    cross_attention_dim: int = 2048
    num_layers: int = 28
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096
    attention_bias: bool = True
    attention_out_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LTXConfig:
        cfg = cls(**known_fields(cls, d))
        if cfg.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={cfg.qk_norm!r}: LTX-Video's attention takes only 'rms_norm_across_heads' "
                             "(as diffusers).")
        if cfg.activation_fn != "gelu-approximate":
            raise ValueError(f"activation_fn={cfg.activation_fn!r}: LTX-Video uses 'gelu-approximate'.")
        if cfg.norm_elementwise_affine:
            raise ValueError("norm_elementwise_affine=True is not supported (no LTX-Video checkpoint has block norm "
                             "weights).")
        if not cfg.attention_out_bias:
            raise ValueError("attention_out_bias=False is not supported (every LTX-Video checkpoint has it).")
        return cfg

    @property
    def timestep_shim(self):
        """What :class:`~xdit_jax.models.pixart.AdaLayerNormSingle` reads of a config (diffusers'
        ``AdaLayerNormSingle(inner_dim, use_additional_conditions=False)``)."""
        return types.SimpleNamespace(inner_dim=self.inner_dim, additional_conditions=False)


TORCH_RENAMES = [
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]


def rms(x, eps: float):
    """diffusers ``RMSNorm(elementwise_affine=False)``: statistics in float32, the input dtype out."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def apply_rope(x, cos, sin):
    """LTX's rotation of interleaved pairs over the full width of ``x`` (B, S, D) by (S, D) tables."""
    xf = x.astype(jnp.float32)
    x2 = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-x2[..., 1], x2[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None] + rotated * sin[None]).astype(x.dtype)


def rope_tables(dim: int, frames: int, height: int, width: int, scale, patch_size: int = 1, patch_size_t: int = 1):
    """diffusers ``LTXVideoRotaryPosEmbed`` for a (frames, height, width) grid of tokens (row-major):
    ((S, dim) cos, (S, dim) sin), float32. ``scale``: ``rope_interpolation_scale`` (3,) (traced or not)."""
    scale = jnp.asarray(scale, jnp.float32).reshape(3)
    f, h, w = jnp.meshgrid(jnp.arange(frames, dtype=jnp.float32), jnp.arange(height, dtype=jnp.float32),
                           jnp.arange(width, dtype=jnp.float32), indexing="ij")
    grid = jnp.stack([f.reshape(-1) * scale[0] * patch_size_t / ROPE_BASE[0],
                      h.reshape(-1) * scale[1] * patch_size / ROPE_BASE[1],
                      w.reshape(-1) * scale[2] * patch_size / ROPE_BASE[2]], axis=-1)  # (S, 3)
    return _rope_from_grid(dim, grid)


def rope_tables_from_coords(dim: int, video_coords):
    """diffusers ``LTXVideoRotaryPosEmbed`` given ``video_coords`` (3, S) (frame, row, column per token, in pixel
    units, the frame already divided by the frame rate: ``LTXConditionPipeline``'s) -> ((S, dim) cos, sin)."""
    c = jnp.asarray(video_coords, jnp.float32)
    grid = jnp.stack([c[0] / ROPE_BASE[0], c[1] / ROPE_BASE[1], c[2] / ROPE_BASE[2]], axis=-1)
    return _rope_from_grid(dim, grid)


def _rope_from_grid(dim: int, grid):
    """The (S, dim) cos / sin tables of (S, 3) coordinates over the base sizes."""
    n = dim // 6
    freqs = ROPE_THETA ** jnp.linspace(0.0, 1.0, n, dtype=jnp.float32) * (math.pi / 2.0)
    angles = freqs[None, None, :] * (grid[:, :, None] * 2 - 1)  # (S, 3, n)
    angles = angles.transpose(0, 2, 1).reshape(grid.shape[0], -1)  # (S, 3n): per frequency the 3 axes
    cos, sin = jnp.repeat(jnp.cos(angles), 2, axis=-1), jnp.repeat(jnp.sin(angles), 2, axis=-1)
    pad = dim % 6
    if pad:
        cos = jnp.concatenate([jnp.ones((cos.shape[0], pad), jnp.float32), cos], axis=-1)
        sin = jnp.concatenate([jnp.zeros((sin.shape[0], pad), jnp.float32), sin], axis=-1)
    return cos, sin


class Attention(nnx.Module):
    """diffusers ``LTXAttention`` + ``LTXVideoAttnProcessor``: q/k RMS norms over all heads; RoPE on the
    self-attention; ``context``: cross-attention to the caption (``context_mask``: (B, L) bool keys)."""

    def __init__(self, cfg: LTXConfig, kv_dim: int, *, dtype, rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.norm_q = RMSNorm(d, 1e-5, dtype=dtype)
        self.norm_k = RMSNorm(d, 1e-5, dtype=dtype)
        self.to_q = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope=None, context=None, context_mask=None):
        src = x if context is None else context
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(src)), self.to_v(src)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1)  # noqa: E731
        if context is None:
            o = attention(heads(q), heads(k), heads(v))
        else:
            o = cross_attention(heads(q), heads(k), heads(v), kv_mask=context_mask)
        return self.to_out(o.reshape(x.shape[0], x.shape[1], -1))


def _per_token(cond, tokens, key: str, x):
    """``cond[key]`` (B, n, D) as a per-token (B, S or 1, n, D) float32 table: the first latent frame's tokens
    take ``cond[key + "_first"]`` where ``tokens["first"]`` marks them (image-to-video)."""
    if "group" in tokens:  # per-token timestep groups (the condition pipeline): (B, K, n, D) gathered per token
        return jnp.take(cond[key + "_groups"].astype(jnp.float32), tokens["group"], axis=1)
    a = cond[key].astype(jnp.float32)[:, None]
    if "first" in tokens:
        a0 = cond[key + "_first"].astype(jnp.float32)[:, None]
        a = jnp.where(tokens["first"][None, :, None, None], a0, a)
    return a


class LTXBlock(nnx.Module):
    """diffusers ``LTXVideoTransformerBlock``."""

    def __init__(self, cfg: LTXConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.attn1 = Attention(cfg, d, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(cfg, cfg.cross_attention_dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(d, dtype=dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(jnp.zeros((6, d), dtype))

    def __call__(self, x, tokens, cond):
        mod = self.scale_shift_table[...].astype(jnp.float32)[None, None] + _per_token(cond, tokens, "temb", x)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, :, j].astype(x.dtype) for j in range(6))
        h = rms(x, self.eps) * (1 + scale_msa) + shift_msa
        x = x + self.attn1(h, rope=(tokens["cos"], tokens["sin"])) * gate_msa
        x = x + self.attn2(x, context=cond["context"], context_mask=cond["context_mask"])
        h = rms(x, self.eps) * (1 + scale_mlp) + shift_mlp
        return x + self.ff(h) * gate_mlp


class LTXVideoTransformer3DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames, height,
    width, rope_interpolation_scale)`` as diffusers' forward.

    hidden_states: (B, S, C) packed latents, S = num_frames * height * width (in patches); encoder_hidden_states:
    (B, L, caption_channels) T5 states; timestep: (B,) or a scalar; encoder_attention_mask: (B, L), 1 = keep;
    rope_interpolation_scale: (temporal, spatial, spatial) (diffusers' pipeline: (VAE temporal ratio / frame
    rate, VAE spatial ratio, VAE spatial ratio)). Returns (B, S, out_channels).
    """

    def __init__(self, cfg: LTXConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.proj_in = linear(cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.time_embed = AdaLayerNormSingle(cfg.timestep_shim, dtype=dtype, rngs=rngs)
        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_channels, d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: LTXBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((2, d), dtype))
        self.proj_out = linear(d, cfg.out_ch, dtype=dtype, rngs=rngs)

    def _time(self, t, b: int):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        t6, embedded = self.time_embed(t, None, None, b)
        return t6.reshape(b, 6, -1), embedded.reshape(b, 1, -1)

    # -- embed (global) -> blocks (any contiguous shard of the video tokens) -> head (global) --

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames: int,
              height: int, width: int, rope_interpolation_scale=(1.0, 1.0, 1.0), first_frame_timestep=None,
              video_coords=None, group_timesteps=None, token_group=None):
        """-> (x (B, S, D), tokens {"cos", "sin"[, "first" | "group"]} (S, ...), cond {"temb" (B, 6, D), "embedded"
        (B, 1, D), "context" (B, L, D), "context_mask" (B, L)[, "temb_first", "embedded_first" | "temb_groups",
        "embedded_groups"]}).

        ``first_frame_timestep`` (B,): the tokens of the first latent frame (the first ``height * width``) at this
        timestep, the others at ``timestep`` (diffusers' image-to-video per-token timesteps, which are exactly so).
        ``video_coords`` (3, S): diffusers' ``video_coords`` (one sample's; then ``num_frames`` x ``height`` x
        ``width`` need not be the token count and ``rope_interpolation_scale`` is unused). ``group_timesteps``
        (B, K) with ``token_group`` (S,) int: diffusers' per-token timesteps as K distinct values, token s at
        ``group_timesteps[:, token_group[s]]`` (``timestep`` is then unused): the condition pipeline's.
        """
        cfg, dtype = self.cfg, self.dtype
        b, s, c = hidden_states.shape
        if video_coords is None:
            check_input_shape(cfg, hidden_states.shape, num_frames, height, width)
        elif tuple(video_coords.shape) != (3, s):
            raise ValueError(f"video_coords must be (3, {s}) (frame, row, column per token); got "
                             f"{tuple(video_coords.shape)}.")
        x = self.proj_in(hidden_states.astype(dtype))
        temb, embedded = self._time(timestep, b)
        context = self.caption_projection(encoder_hidden_states.astype(dtype)).reshape(b, -1, cfg.inner_dim)
        cond = {"temb": temb, "embedded": embedded, "context": context,
                "context_mask": text_key_mask(encoder_attention_mask, b, context.shape[1])}
        if video_coords is None:
            cos, sin = rope_tables(cfg.inner_dim, num_frames, height, width, rope_interpolation_scale,
                                   cfg.patch_size, cfg.patch_size_t)
        else:
            cos, sin = rope_tables_from_coords(cfg.inner_dim, video_coords)
        tokens = {"cos": cos, "sin": sin}
        if group_timesteps is not None:
            if token_group is None or first_frame_timestep is not None:
                raise ValueError("group_timesteps need token_group (and exclude first_frame_timestep).")
            k = group_timesteps.shape[1]
            temb_g, emb_g = self._time(jnp.asarray(group_timesteps, jnp.float32).reshape(-1), b * k)
            cond["temb_groups"] = temb_g.reshape(b, k, 6, -1)
            cond["embedded_groups"] = emb_g.reshape(b, k, -1)
            tokens["group"] = jnp.asarray(token_group, jnp.int32)
        if first_frame_timestep is not None:
            cond["temb_first"], cond["embedded_first"] = self._time(first_frame_timestep, b)
            tokens["first"] = jnp.arange(s) < height * width
        return x, tokens, cond

    def blocks(self, x, tokens, cond):
        """The block stack (one lax.scan) on the video tokens or a contiguous shard of them."""
        return scan_modules(self.transformer_blocks, lambda blk, y: blk(y, tokens, cond), x)

    def head(self, x, cond, shape, tokens=None):
        """Video tokens (B, S, D) -> the prediction (B, S, out_channels); ``tokens``: embed's (image-to-video:
        the first frame's tokens take their own modulation)."""
        emb = cond["embedded"].astype(jnp.float32)[:, :, None]  # (B, 1, 1, D)
        if "embedded_groups" in cond:
            if tokens is None or "group" not in tokens:
                raise ValueError("head: per-token timestep groups need embed's tokens.")
            emb = jnp.take(cond["embedded_groups"].astype(jnp.float32), tokens["group"], axis=1)[:, :, None]
        elif "embedded_first" in cond:
            if tokens is None or "first" not in tokens:
                raise ValueError("head: image-to-video conditioning (a first-frame timestep) needs embed's tokens.")
            emb = jnp.where(tokens["first"][None, :, None, None], cond["embedded_first"].astype(jnp.float32)[:, :, None],
                            emb)
        mod = self.scale_shift_table[...].astype(jnp.float32)[None, None] + emb
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        x = (self.norm_out(x).astype(jnp.float32) * (1 + scale) + shift).astype(x.dtype)
        return self.proj_out(x)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, num_frames: int,
                 height: int, width: int, rope_interpolation_scale=(1.0, 1.0, 1.0), first_frame_timestep=None,
                 video_coords=None, group_timesteps=None, token_group=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                                     num_frames, height, width, rope_interpolation_scale, first_frame_timestep,
                                     video_coords, group_timesteps, token_group)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape, tokens)


def check_input_shape(cfg: LTXConfig, shape, num_frames: int, height: int, width: int) -> None:
    """Refuse packed latents the model cannot take, with what to do instead."""
    if len(shape) != 3 or shape[2] != cfg.in_channels:
        raise ValueError(f"hidden_states must be packed latents (batch, tokens, {cfg.in_channels}); got {tuple(shape)}.")
    if shape[1] != num_frames * height * width:
        raise ValueError(f"hidden_states have {shape[1]} tokens; num_frames x height x width = {num_frames} x "
                         f"{height} x {width} = {num_frames * height * width} (latent frames, rows and columns of "
                         "patches).")


def params_from_torch(flat: dict, cfg: LTXConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: LTXVideoTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, dtype=dtype,
                          what="LTX-Video transformer checkpoint")


def build(cfg: LTXConfig, params: dict, dtype=jnp.float32) -> LTXVideoTransformer3DModel:
    return build_module(lambda: LTXVideoTransformer3DModel(cfg, dtype=dtype), params)
