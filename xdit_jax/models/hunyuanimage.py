"""HunyuanImage-2.1 transformer (diffusers ``HunyuanImageTransformer2DModel``, text-to-image) in Flax NNX.

HunyuanVideo's design (:mod:`xdit_jax.models.hunyuan_video`) on images, read against diffusers' source; what is
the same math is HunyuanVideo's (1.0 and 1.5) and FLUX's code, parametrised, not copied:

* the blocks: double-stream (``flux.DoubleBlock``) then single-stream (``flux.SingleBlock.pair``), the text as the
  masked context of every attention, run by 1.0's ``blocks`` (two scans); the token refiner of the Qwen2.5-VL
  states is 1.0's ``TokenRefiner`` (diffusers builds it with the default MLP ratio 4.0, as 1.5's);
* the time embedding alone (no pooled text: 1.5's ``TimeEmbedding`` under diffusers' name ``time_guidance_embed``);
  the ByT5 glyph-text projection (``context_embedder_2``, optional: ``text_embed_2_dim``) is 1.5's;
* new here: the 2-D patch embed (a Conv2d of ``patch_size`` (ph, pw)), the 2-D RoPE over the (h, w) patch grid
  (``rope_axes_dim`` two sizes; 1.0's tables with an empty time axis), the 2-D head;
* the text: diffusers reorders each sample's tokens as ``[valid ByT5, valid Qwen, padding]`` and masks the padding
  keys. Attention sums over the visible keys and the text is not rotated, so the order is immaterial: here the
  context is ``[ByT5; Qwen]`` with their masks as its key mask (as 1.5's); no condition-type embedding (1.5's).

Refused (out of scope): the guidance-distilled variant (``guidance_embeds``), MeanFlow (``use_meanflow``, the
distilled / refiner models) and 3-D (video) patches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models import hunyuan_video as hv
from xdit_jax.models import hunyuan_video15 as hv15
from xdit_jax.models.layers import LayerNorm, linear, stack_modules

STACKED, SINGLE, STACKS, REFINER = hv.STACKED, hv.SINGLE, hv.STACKS, hv.REFINER
TEXT_KEYS = hv.TEXT_KEYS


@dataclasses.dataclass(frozen=True)
class HunyuanImageConfig(TransformerDims):
    in_channels: int = 64
    out_channels: int | None = 64
    num_attention_heads: int = 28
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, ...] = (1, 1)
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = False
    text_embed_dim: int = 3584
    text_embed_2_dim: int | None = None
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (64, 64)
    use_meanflow: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanImageConfig:
        cfg = cls(**known_fields(cls, d))
        patch = cfg.patch_size if isinstance(cfg.patch_size, (list, tuple)) else (cfg.patch_size,)
        cfg = dataclasses.replace(cfg, rope_axes_dim=tuple(int(a) for a in cfg.rope_axes_dim),
                                  patch_size=tuple(int(p) for p in patch))
        if cfg.guidance_embeds:
            raise NotImplementedError("guidance_embeds: the guidance-distilled HunyuanImage-2.1 transformer is not "
                                      "supported (only the base model, guidance_embeds false).")
        if cfg.use_meanflow:
            raise NotImplementedError("use_meanflow: the MeanFlow HunyuanImage-2.1 transformer (distilled / refiner) "
                                      "is not supported (only the base model, use_meanflow false).")
        if len(cfg.patch_size) != 2:
            raise NotImplementedError(f"patch_size {cfg.patch_size}: only 2-D (image) patches are supported.")
        if cfg.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={cfg.qk_norm!r}: HunyuanImage uses rms_norm.")
        if (len(cfg.rope_axes_dim) != 2 or sum(cfg.rope_axes_dim) != cfg.attention_head_dim
                or any(a % 2 for a in cfg.rope_axes_dim)):
            raise ValueError(f"rope_axes_dim {cfg.rope_axes_dim} must be 2 even sizes summing to attention_head_dim "
                             f"{cfg.attention_head_dim}.")
        if cfg.num_layers < 1 or cfg.num_single_layers < 1 or cfg.num_refiner_layers < 1:
            raise ValueError("A HunyuanImage transformer has at least one double-stream, one single-stream and one "
                             "token refiner block.")
        return cfg

    @property
    def refiner(self) -> HunyuanImageConfig:
        """The config 1.0's token refiner reads: diffusers builds HunyuanImage's with the default MLP ratio 4.0."""
        return dataclasses.replace(self, mlp_ratio=4.0)


def rope_tables(grid_h: int, grid_w: int, axes_dim, theta: float):
    """diffusers ``HunyuanImageRotaryPosEmbed`` (2-D): cos, sin (h*w, sum(axes_dim)) float32, row-major (h, w) as
    diffusers' ``meshgrid(indexing="ij")``: HunyuanVideo's tables with a one-frame, zero-width time axis."""
    return hv.rope_tables(1, grid_h, grid_w, (0, *axes_dim), theta)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: HunyuanImageConfig, *, dtype, rngs):
        k = tuple(cfg.patch_size)
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=k, strides=k, padding="VALID",
                             dtype=dtype, param_dtype=dtype, rngs=rngs)


class HunyuanImageTransformer2DModel(hv.HunyuanVideoTransformer3DModel):
    """``model(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2,
    encoder_attention_mask_2)`` as diffusers' forward: latents (B, in_channels, H, W), timestep (B,) (0..1000),
    Qwen2.5-VL states (B, L, text_embed_dim) with their mask (B, L), ByT5 states (B, L2, text_embed_2_dim) with
    their mask (B, L2) (None: none, as diffusers without them or without ``context_embedder_2``). Returns
    (B, out_channels, H, W) (sizes rounded down to the patch, as diffusers'). ``blocks`` is HunyuanVideo's."""

    def __init__(self, cfg: HunyuanImageConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.x_embedder = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.context_embedder = hv.TokenRefiner(cfg.refiner, dtype=dtype, rngs=rngs)
        if cfg.text_embed_2_dim is not None:
            self.context_embedder_2 = hv15.ByT5TextProjection(cfg.text_embed_2_dim, hv15.BYT5_HIDDEN, d, dtype=dtype,
                                                              rngs=rngs)
        self.time_guidance_embed = hv15.TimeEmbedding(d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: flux.DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers,
                                                rngs)
        self.single_transformer_blocks = stack_modules(lambda r: flux.SingleBlock(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_single_layers, rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        ph, pw = cfg.patch_size
        self.proj_out = linear(d, ph * pw * cfg.out_ch, dtype=dtype, rngs=rngs)

    def grid(self, shape) -> tuple[int, int]:
        ph, pw = self.cfg.patch_size
        return shape[-2] // ph, shape[-1] // pw

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
              encoder_hidden_states_2=None, encoder_attention_mask_2=None, rope=None):
        """-> (image tokens (B, N, D), tokens {"rope"}, cond {"temb", "context" (B, L2 + L, D): [ByT5; Qwen] (Qwen
        alone without ByT5), "context_mask" bool}). ``rope``: the tables ready made (else from the static shape)."""
        cfg, dtype = self.cfg, self.dtype
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be (B, C, H, W) latents, got shape {hidden_states.shape}.")
        b = hidden_states.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb = self.time_guidance_embed(t, dtype)
        mask = jnp.asarray(encoder_attention_mask) != 0
        context = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype), t, mask)
        if hasattr(self, "context_embedder_2") and encoder_hidden_states_2 is not None:
            if encoder_attention_mask_2 is None:
                raise ValueError("encoder_hidden_states_2 (ByT5) needs its encoder_attention_mask_2.")
            context_2 = self.context_embedder_2(jnp.asarray(encoder_hidden_states_2).astype(dtype))
            context = jnp.concatenate([context_2, context], axis=1)
            mask = jnp.concatenate([jnp.asarray(encoder_attention_mask_2) != 0, mask], axis=1)
        gh, gw = self.grid(hidden_states.shape)
        ph, pw = cfg.patch_size
        x = jnp.transpose(jnp.asarray(hidden_states).astype(dtype)[:, :, :gh * ph, :gw * pw], (0, 2, 3, 1))
        x = self.x_embedder.proj(x).reshape(b, -1, cfg.inner_dim)
        if rope is None:
            rope = rope_tables(gh, gw, cfg.rope_axes_dim, cfg.rope_theta)
        rope = tuple(jnp.asarray(a, jnp.float32) for a in rope)
        return x, {"rope": rope}, {"temb": temb, "context": context, "context_mask": mask}

    def head(self, x, cond, shape):
        """Image tokens -> the prediction (B, out_channels, H, W) of the latents' ``shape`` (rounded to the patch)."""
        gh, gw = self.grid(shape)
        ph, pw = self.cfg.patch_size
        scale, shift = jnp.split(self.norm_out_linear(jax.nn.silu(cond["temb"]).astype(x.dtype)), 2, axis=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
        x = x.reshape(shape[0], gh, gw, -1, ph, pw)
        return jnp.transpose(x, (0, 3, 1, 4, 2, 5)).reshape(shape[0], -1, gh * ph, gw * pw)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                 encoder_hidden_states_2=None, encoder_attention_mask_2=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                     encoder_hidden_states_2, encoder_attention_mask_2)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: HunyuanImageConfig) -> dict:
    """PipeFusion's stacks (HunyuanVideo's): double-, then single-stream; and the text's ``cond`` keys."""
    return dict(stacked=STACKS, stacked_layers=(cfg.num_layers, cfg.num_single_layers), text_keys=TEXT_KEYS)


TORCH_RENAMES = list(hv.TORCH_RENAMES)


def params_from_torch(flat: dict, cfg: HunyuanImageConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: HunyuanImageTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers,
                                   REFINER: cfg.num_refiner_layers},
                          renames=TORCH_RENAMES, dtype=dtype, what="HunyuanImage transformer checkpoint")


def build(cfg: HunyuanImageConfig, params: dict, dtype=jnp.float32) -> HunyuanImageTransformer2DModel:
    return build_module(lambda: HunyuanImageTransformer2DModel(cfg, dtype=dtype), params)
