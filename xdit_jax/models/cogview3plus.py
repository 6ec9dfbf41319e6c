"""CogView3-Plus transformer (diffusers ``CogView3PlusTransformer2DModel``, THUDM/CogView3-Plus-3B) in Flax NNX.

Its blocks are CogVideoX's (:class:`xdit_jax.models.cogvideox.CogVideoXBlock`): joint attention over the
[text; image] sequence with q/k LayerNorms, adaLN-zero with the text's and the image's own shift / scale / gate, a
tanh-GELU MLP on the joint sequence. The differences are parameters of that block, or done once at conversion:

* the norms carry no weights (``norm_elementwise_affine=False``, eps 1e-5; q/k norms without weights, eps 1e-6);
* diffusers' ``CogView3PlusAdaLayerNormZeroTextImage`` makes all twelve modulations of a block with one linear
  (``norm1.linear``: image shift/scale/gate of the attention, of the MLP, then the text's two triples); conversion
  splits its rows into CogVideoX's two ``LayerNormZero`` linears (``norm1``: the attention's, ``norm2``: the MLP's,
  each ``[image shift, scale, gate, text shift, scale, gate]``) — the same products, regrouped;
* the output norm is ``AdaLayerNormContinuous`` (scale then shift, eps 1e-6): its linear's two halves swapped
  into CogVideoX's ``AdaLayerNorm`` order.

What is its own: the patch embedding (a Linear over 2x2 patches, the caption's ``text_proj``), the image tokens' 2D
sin-cos positions (the top-left ``h x w`` corner of a ``pos_embed_max_size``-square table, text tokens none), and
the time embedding plus SDXL-style size conditions (``original_size``, ``crop_coords``, ``target_size``: sinusoids
of ``condition_dim`` each, through a SiLU MLP) — diffusers' ``CogView3CombinedTimestepSizeEmbeddings``.

As CogVideoX's: ``embed`` (global) -> ``blocks`` (any contiguous shard of the joint sequence; sequence parallelism
and PipeFusion drive it) -> ``head`` (global). Attention only through :mod:`xdit_jax.parallel.attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import cogvideox
from xdit_jax.models.flux import TextProjection
from xdit_jax.models.layers import TimestepEmbedding, linear, scan_modules, stack_modules, timestep_embedding
from xdit_jax.models.pixart import sincos_2d_grid

STACKED = cogvideox.STACKED  # "transformer_blocks"
OUT_NORM_EPS = 1e-6  # AdaLayerNormContinuous(eps=1e-6); the blocks' norms: 1e-5


@dataclasses.dataclass(frozen=True)
class CogView3PlusConfig(TransformerDims):
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    out_channels: int | None = 16
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    condition_dim: int = 256
    pos_embed_max_size: int = 128
    sample_size: int = 128

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CogView3PlusConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.inner_dim % 4:
            raise ValueError(f"inner dim {cfg.inner_dim} (heads x head dim) must be a multiple of 4 (the 2D sin-cos "
                             "positions give each axis half, as sines and cosines).")
        return cfg

    @property
    def block_config(self) -> cogvideox.CogVideoXConfig:
        """The CogVideoX config whose blocks are this model's (weight-free norms, q/k norms too)."""
        return cogvideox.CogVideoXConfig(num_attention_heads=self.num_attention_heads,
                                         attention_head_dim=self.attention_head_dim, time_embed_dim=self.time_embed_dim,
                                         num_layers=self.num_layers, attention_bias=True, norm_elementwise_affine=False,
                                         norm_eps=1e-5, qk_norm_affine=False)


# torch names that differ from the Flax path (after :func:`_regroup_modulations`), as CogVideoX's.
TORCH_RENAMES = cogvideox.TORCH_RENAMES
# The position table is a non-persistent buffer (exports may still hold it).
TORCH_IGNORE = [r"^patch_embed\.pos_embed$"]


class CombinedTimestepSizeEmbeddings(nnx.Module):
    """diffusers ``CogView3CombinedTimestepSizeEmbeddings``: the timestep's sinusoids (``inner_dim`` wide) through
    ``timestep_embedder`` plus the size conditions' (``condition_dim`` per number, [original, crop, target]) through
    ``condition_embedder`` (Linear, SiLU, Linear)."""

    def __init__(self, cfg: CogView3PlusConfig, *, dtype, rngs):
        self.cfg, self.dtype = cfg, dtype
        self.timestep_embedder = TimestepEmbedding(cfg.inner_dim, cfg.time_embed_dim, dtype=dtype, rngs=rngs)
        self.condition_embedder = TextProjection(6 * cfg.condition_dim, cfg.time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, original_size, target_size, crop_coords):
        cfg, b = self.cfg, timestep.shape[0]
        proj = lambda v: timestep_embedding(v.reshape(-1), cfg.condition_dim, True, 0).reshape(b, -1)  # noqa: E731
        conds = jnp.concatenate([proj(original_size), proj(crop_coords), proj(target_size)], axis=1)
        t = timestep_embedding(timestep, cfg.inner_dim, True, 0)
        return self.timestep_embedder(t.astype(self.dtype)) + self.condition_embedder(conds.astype(self.dtype))


class PatchEmbed(nnx.Module):
    """diffusers ``CogView3PlusPatchEmbed``'s weights: ``proj`` over (channel, row, column) patches, ``text_proj``."""

    def __init__(self, cfg: CogView3PlusConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = linear(cfg.in_channels * p * p, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.text_proj = linear(cfg.text_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)


def position_table(cfg: CogView3PlusConfig, grid_h: int, grid_w: int) -> np.ndarray:
    """The image tokens' positions (grid_h * grid_w, inner_dim) float32: the top-left corner of diffusers'
    ``get_2d_sincos_pos_embed(inner_dim, pos_embed_max_size, base_size=pos_embed_max_size)`` table (positions
    0, 1, 2, ... on both axes)."""
    check_grid(cfg, grid_h, grid_w)
    return sincos_2d_grid(cfg.inner_dim, np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32))


def check_grid(cfg: CogView3PlusConfig, grid_h: int, grid_w: int) -> None:
    m = cfg.pos_embed_max_size
    if grid_h > m or grid_w > m:
        s = 8 * cfg.patch_size * m
        raise ValueError(f"A {grid_h} x {grid_w} patch grid exceeds the model's position table ({m} x {m} patches: "
                         f"images up to {s} x {s} pixels).")


def sizes_batch(v, b: int):
    """A size condition, (2,) or (B, 2), as (B, 2) float32."""
    v = jnp.asarray(v, jnp.float32)
    return jnp.broadcast_to(v.reshape(-1, 2), (b, 2))


class CogView3PlusTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords)`` as
    diffusers' forward: hidden_states (B, C, H, W) latents; encoder_hidden_states (B, L, text_embed_dim); timestep
    (B,) or a scalar; the size conditions (B, 2) or (2,) each ((height, width) / (top, left) in pixels).
    Returns the prediction (B, out_channels, H, W)."""

    def __init__(self, cfg: CogView3PlusConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        bc = cfg.block_config
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_condition_embed = CombinedTimestepSizeEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: cogvideox.CogVideoXBlock(bc, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = cogvideox.AdaLayerNormOut(bc, dtype=dtype, rngs=rngs, eps=OUT_NORM_EPS)
        p = cfg.patch_size
        self.proj_out = linear(cfg.inner_dim, p * p * cfg.out_ch, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords):
        """-> (joint, tokens, temb): the joint [text; image] sequence (B, S, D), ``tokens`` ({"is_text": (S,)}),
        temb (B, time_embed_dim)."""
        cfg, dtype = self.cfg, self.dtype
        b, c, h, w = hidden_states.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        temb = self.time_condition_embed(t, sizes_batch(original_size, b), sizes_batch(target_size, b),
                                         sizes_batch(crop_coords, b))
        x = hidden_states.astype(dtype).reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        x = self.patch_embed.proj(x.reshape(b, gh * gw, c * p * p))
        x = x + jnp.asarray(position_table(cfg, gh, gw)).astype(dtype)[None]
        enc = self.patch_embed.text_proj(encoder_hidden_states.astype(dtype))
        text_len = enc.shape[1]
        tokens = {"is_text": jnp.asarray(np.arange(text_len + gh * gw) < text_len)}
        return jnp.concatenate([enc, x], axis=1), tokens, temb

    def blocks(self, joint, tokens, temb):
        """The block stack (one lax.scan) on the joint sequence or a contiguous shard of it."""
        return scan_modules(self.transformer_blocks, lambda blk, x: blk(x, temb, tokens), joint)

    def head(self, joint, temb, shape):
        """The image tokens of the joint sequence -> the prediction (B, out_channels, H, W) for latents ``shape``."""
        b, _, h, w = shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        x = self.proj_out(self.norm_out(joint[:, joint.shape[1] - gh * gw:], temb))
        x = x.reshape(b, gh, gw, -1, p, p).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(b, -1, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords):
        joint, tokens, temb = self.embed(hidden_states, encoder_hidden_states, timestep, original_size, target_size,
                                         crop_coords)
        return self.head(self.blocks(joint, tokens, temb), temb, hidden_states.shape)


def check_input_shape(cfg: CogView3PlusConfig, latent_h: int, latent_w: int) -> None:
    """Refuse latent sizes the model cannot take, with what to do instead."""
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")
    check_grid(cfg, latent_h // p, latent_w // p)


def _regroup_modulations(flat: dict, num_layers: int, dim: int) -> dict:
    """diffusers' one 12-way modulation linear per block (``norm1.linear``: [shift, scale, gate] of the image's
    attention, of its MLP, then the text's two) -> CogVideoX's two 6-way ones (``norm1``: the attention's image then
    text triple, ``norm2``: the MLP's); the output norm's (scale, shift) -> (shift, scale). Other keys as they are."""
    out = dict(flat)
    for i in range(num_layers):
        for leaf in ("weight", "bias"):
            key = f"transformer_blocks.{i}.norm1.linear.{leaf}"
            if key not in flat or np.shape(flat[key])[0] != 12 * dim:
                continue  # (reported by the key map: missing or misshaped)
            chunks = np.split(np.asarray(flat[key]), 12, axis=0)
            out[key] = np.concatenate([chunks[j] for j in (0, 1, 2, 6, 7, 8)], axis=0)
            out[f"transformer_blocks.{i}.norm2.linear.{leaf}"] = np.concatenate(
                [chunks[j] for j in (3, 4, 5, 9, 10, 11)], axis=0)
    for leaf in ("weight", "bias"):
        key = f"norm_out.linear.{leaf}"
        if key in flat and np.shape(flat[key])[0] == 2 * dim:
            scale, shift = np.split(np.asarray(flat[key]), 2, axis=0)
            out[key] = np.concatenate([shift, scale], axis=0)
    return out


def params_from_torch(flat: dict, cfg: CogView3PlusConfig, dtype=None) -> dict:
    return map_state_dict(_regroup_modulations(flat, cfg.num_layers, cfg.inner_dim),
                          expected_shapes(lambda: CogView3PlusTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="CogView3-Plus transformer checkpoint")


def build(cfg: CogView3PlusConfig, params: dict, dtype=jnp.float32) -> CogView3PlusTransformer2DModel:
    return build_module(lambda: CogView3PlusTransformer2DModel(cfg, dtype=dtype), params)

