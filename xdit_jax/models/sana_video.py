"""SANA-Video transformer (diffusers ``SanaVideoTransformer3DModel``) in Flax NNX, on SANA's (:mod:`.sana`).

What SANA-Video changes in SANA's block stack, and nothing else:

* patches: a Conv3d of ``patch_size = (pt, ph, pw)`` (diffusers' default (1, 2, 2)); the video tokens row-major over
  (frames, rows, columns), unpatchified back to (B, C, F, H, W); no sin-cos positions.
* self-attention: SANA's ReLU linear attention with Wan's 3-D RoPE (``WanRotaryPosEmbed``: the head dim split into
  frame / row / column parts, interleaved pairs; :func:`xdit_jax.models.wan.rope_table`) in the NUMERATOR only
  (SanaLinearAttnProcessor3_0: ``sum_m (R q_n . R k_m) v_m / sum_m (q_n . k_m)``), both sums through
  :func:`xdit_jax.parallel.token_mixing.linear_attention` (``q_rot`` / ``k_rot``): one psum over (ring, ulysses).
* feed-forward: ``GLUMBTempConv`` = SANA's GLUMBConv with its depthwise 3x3 conv per FRAME (the grid conv on the
  (F, H, W) grid: a row halo, nothing reaching across a frame's edge), then ``x + conv_temp(x)``, a kernel-3 conv
  over the frames mixing all channels (:func:`xdit_jax.parallel.token_mixing.frame_conv3`: a halo of one frame).
* defaults: q/k RMSNorms across heads (``qk_norm="rms_norm_across_heads"``), ``attention_bias`` for q/k/v.

Sequence parallelism: the flat (frames x rows x columns) token sequence is split in contiguous chunks over
(ring, ulysses), as every video family here; the halos are over that flat axis (the grid conv's ``W + 1`` tokens,
the frame conv's ``H W``), the RoPE tables sharded with the tokens. Not causal: no block mask.

PipeFusion needs nothing here either: the ops keep its buffers (the frame conv's input in the conv buffer's last
channels, :func:`xdit_jax.parallel.token_mixing.frame_conv3`). ControlNet inputs: refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import sana
from xdit_jax.models.layers import apply_rope, stack_modules
from xdit_jax.models.wan import rope_table
from xdit_jax.parallel.token_mixing import frame_conv3, linear_attention

STACKED = sana.STACKED


@dataclasses.dataclass(frozen=True)
class SanaVideoConfig(sana.SanaConfig):
    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 20
    attention_head_dim: int = 112
    num_layers: int = 20
    sample_size: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: str | None = "rms_norm_across_heads"
    rope_max_seq_len: int = 1024

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SanaVideoConfig":
        d = dict(d)
        if "patch_size" in d:
            p = d["patch_size"]
            d["patch_size"] = tuple(int(v) for v in (p if isinstance(p, (list, tuple)) else (1, p, p)))
        cfg = super().from_dict(d)
        if len(cfg.patch_size) != 3:
            raise ValueError(f"patch_size {cfg.patch_size}: SANA-Video patches are (frames, height, width).")
        return cfg

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """diffusers ``WanRotaryPosEmbed``: the head dim split into (frames, height, width) parts."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


class RopeLinearSelfAttention(sana.LinearSelfAttention):
    """SanaLinearAttnProcessor3_0: SANA's linear self-attention, the numerator's q and k rotated (RoPE)."""

    def __call__(self, x, rope):
        b, s, _ = x.shape
        heads = lambda y: y.reshape(b, s, self.heads, -1)  # noqa: E731
        q, k = sana._apply_qk_norms(self, self.to_q(x), self.to_k(x))
        q, k, v = jax.nn.relu(heads(q)), jax.nn.relu(heads(k)), heads(self.to_v(x))
        cos, sin = rope
        o = linear_attention(q, k, v, q_rot=apply_rope(q, cos, sin), k_rot=apply_rope(k, cos, sin))
        return self.to_out(o.reshape(b, s, -1))


class FrameConv(nnx.Module):
    """``nn.Conv2d(C, C, kernel_size=(3, 1), padding=(1, 0), bias=False)`` over (frames, tokens of a frame): leaf
    ``kernel`` (3, 1, C, C) as the key map's conv rule converts it."""

    def __init__(self, c: int, *, dtype, rngs):
        self.kernel = nnx.Param(nnx.initializers.normal(c ** -0.5 / 3)(rngs.params(), (3, 1, c, c), dtype))

    def __call__(self, x, grid):
        return frame_conv3(x, self.kernel[...][:, 0], grid=grid)


class GLUMBTempConv(sana.GLUMBConv):
    """SANA's GLUMBConv (its 3x3 conv per frame on a (F, H, W) grid), then ``y + conv_temp(y)``."""

    def __init__(self, cfg: SanaVideoConfig, *, dtype, rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.conv_temp = FrameConv(cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, grid):
        y = super().__call__(x, grid)
        return y + self.conv_temp(y, grid)


class SanaVideoTransformerBlock(sana.SanaTransformerBlock):
    SELF_ATTENTION = RopeLinearSelfAttention
    FEED_FORWARD = GLUMBTempConv


class SanaVideoTransformer3DModel(sana.SanaTransformer2DModel):
    """``model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)`` as diffusers' forward.

    hidden_states: (B, C, F, H, W) latents; encoder_hidden_states: (B, L, caption_channels); timestep: (B,) or a
    scalar; encoder_attention_mask: (B, L), 1/True = keep. Returns (B, out_channels, F, H, W).
    """

    def __init__(self, cfg: SanaVideoConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):  # noqa: D107
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        self.patch_embedding = nnx.Conv(cfg.in_channels, d, kernel_size=cfg.patch_size, strides=cfg.patch_size,
                                        padding="VALID", use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.time_embed = (sana.SanaCombinedTimestepGuidanceEmbeddings(cfg, dtype=dtype, rngs=rngs)
                           if cfg.guidance_embeds else sana.AdaLayerNormSingle(cfg, dtype=dtype, rngs=rngs))
        self.caption_projection = sana.PixArtAlphaTextProjection(cfg.caption_channels, d, dtype=dtype, rngs=rngs)
        self.caption_norm = sana.RMSNorm(d, 1e-5, dtype=dtype)
        self.transformer_blocks = stack_modules(lambda r: SanaVideoTransformerBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = sana.LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((2, d), dtype))
        pt, ph, pw = cfg.patch_size
        self.proj_out = sana.linear(d, pt * ph * pw * cfg.out_ch, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None,
              first_frame_timestep=None):
        """-> (x, tokens, cond). x: (B, S, D) video tokens, row-major over the (F/pt, H/ph, W/pw) grid. tokens:
        ``{"rope": ((S, head_dim) cos, (S, head_dim) sin)}`` (sharded with the sequence). cond: SANA's, with
        ``grid`` (B, F/pt, H/ph, W/pw, 0) carrying the token grid to the blocks' convolutions.

        ``first_frame_timestep`` (B,): the tokens of the first latent frame at this timestep, the others at
        ``timestep`` (SanaImageToVideoPipeline's per-token timesteps ``t * (1 - mask)``, which are exactly so); then
        ``tokens["first"]`` (S,) marks them and cond holds ``timestep_first`` / ``embedded_timestep_first`` too."""
        cfg, dtype = self.cfg, self.dtype
        b, c, f, h, w = hidden_states.shape
        check_input_shape(cfg, c, f, h, w)
        x = self.patch_embedding(hidden_states.astype(dtype).transpose(0, 2, 3, 4, 1))  # (B, F', H', W', D)
        grid = x.shape[1:4]
        x = x.reshape(b, -1, cfg.inner_dim)
        cond = self.embed_conditions(b, encoder_hidden_states, timestep, encoder_attention_mask, guidance)
        cond["grid"] = jnp.zeros((b, *grid, 0), dtype)
        cos, sin = rope_table(cfg, *grid)
        tokens = {"rope": (jnp.asarray(cos), jnp.asarray(sin))}
        if first_frame_timestep is not None:
            c0 = self.embed_conditions(b, encoder_hidden_states, first_frame_timestep, encoder_attention_mask, guidance)
            cond.update(timestep_first=c0["timestep"], embedded_timestep_first=c0["embedded_timestep"])
            tokens["first"] = (jnp.arange(x.shape[1]) < grid[1] * grid[2]).astype(jnp.float32)
        return x, tokens, cond

    def blocks(self, x, tokens, cond):
        return sana.scan_modules(self.transformer_blocks,
                                 lambda blk, y: blk(y, cond, tokens["rope"], tokens.get("first")), x)

    def head(self, x, cond, shape):
        cfg = self.cfg
        b, _, f, h, w = shape
        pt, ph, pw = cfg.patch_size
        mod = self.scale_shift_table[...][None] + cond["embedded_timestep"][:, None]
        shift, scale = jnp.split(mod.astype(x.dtype), 2, axis=1)
        if "embedded_timestep_first" in cond:  # the first latent frame's tokens at their own timestep
            first = (jnp.arange(x.shape[1]) < (h // ph) * (w // pw))[None, :, None]
            mod0 = self.scale_shift_table[...][None] + cond["embedded_timestep_first"][:, None]
            shift0, scale0 = jnp.split(mod0.astype(x.dtype), 2, axis=1)
            shift, scale = jnp.where(first, shift0, shift), jnp.where(first, scale0, scale)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, cfg.out_ch).transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, cfg.out_ch, f, h, w)


    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None,
                 first_frame_timestep=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, guidance,
                                     first_frame_timestep)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def check_input_shape(cfg: SanaVideoConfig, channels: int, frames: int, latent_h: int, latent_w: int) -> None:
    if channels != cfg.in_channels:
        raise ValueError(f"Latents have {channels} channels; this SANA-Video transformer takes {cfg.in_channels}.")
    pt, ph, pw = cfg.patch_size
    if frames % pt or latent_h % ph or latent_w % pw:
        raise ValueError(f"Latent frames x height x width {frames}x{latent_h}x{latent_w} must be multiples of the "
                         f"patch size {cfg.patch_size}.")
    if max(frames // pt, latent_h // ph, latent_w // pw) > cfg.rope_max_seq_len:
        raise ValueError(f"{max(frames // pt, latent_h // ph, latent_w // pw)} positions along one axis exceed the "
                         f"model's rope_max_seq_len={cfg.rope_max_seq_len}.")


def params_from_torch(flat: dict, cfg: SanaVideoConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: SanaVideoTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=sana.TORCH_RENAMES, dtype=dtype,
                          what="SANA-Video transformer checkpoint")


def build(cfg: SanaVideoConfig, params: dict, dtype=jnp.float32) -> SanaVideoTransformer3DModel:
    return build_module(lambda: SanaVideoTransformer3DModel(cfg, dtype=dtype), params)


__all__ = ["SanaVideoConfig", "SanaVideoTransformer3DModel", "build", "params_from_torch", "check_input_shape"]
