"""Latte text-to-video transformer (diffusers ``LatteTransformer3DModel``) in Flax NNX.

Each frame's latents become patch tokens (PixArt's Conv2d patch embed + 2D sin-cos positions, the
table interpolated for sizes other than the sample size); ``num_layers`` pairs of PixArt's
``BasicTransformerBlock(norm_type="ada_norm_single")`` follow: a *spatial* block (self-attention
over one frame's patches, cross-attention to the projected T5 caption) then a *temporal* block
(self-attention over the frames at one patch position, no cross-attention). Before the first
temporal block a 1-D sin-cos table over the frames is added (when there is more than one frame).
The timestep modulation (``adaln_single``), the caption projection, the blocks and the output head
are PixArt's modules (:mod:`xdit_jax.models.pixart`), reused.

Layout (the parallel part): the tokens are held patch-major, (B, P, F, D), P = (H/p) (W/p) patch
positions, F frames. The patch axis is the *sequence* the engine shards over (ring x ulysses,
padded to a multiple, padded keys masked: :func:`xdit_jax.parallel.sequence.run_blocks`) and that
PipeFusion cuts into patches. Spatial attention is then ordinary sequence-parallel attention with
batch B x F (:func:`xdit_jax.parallel.attention.attention`); temporal attention attends over the F
frames of each local patch position — all on the device, so it goes through
:func:`xdit_jax.parallel.attention.cross_attention` (local under every mesh, never the
sequence-parallel op, never PipeFusion's K/V buffers). Under PipeFusion a patch is a run of patch
positions over all frames: the temporal attention stays complete inside it and the spatial one
reads the stale K/V buffers of the other patches (one buffer per layer pair). No collective here.

The stacked pairs are one stack (``transformer_blocks``: each layer holds ``spatial`` and
``temporal``), run by one scan whose carry counts the layers done (the frame table goes in at
layer 0, also when PipeFusion's stages split the stack).

Difference from diffusers, on purpose: diffusers' ``temp_pos_embed`` buffer has ``video_length``
(16) rows and its forward fails for another frame count; here the table is computed for the actual
frame count — the first F rows of the same table (identical at F = 16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import pixart
from xdit_jax.models.layers import LayerNorm, PixArtAlphaTextProjection, linear, scan_modules, sincos_1d, stack_modules

STACKED = "transformer_blocks"  # the stacked (spatial, temporal) pairs: one scan; PipeFusion splits them into stages


@dataclasses.dataclass(frozen=True)
class LatteConfig(TransformerDims):
    """``transformer/config.json`` of a Latte checkpoint (defaults = diffusers')."""

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: int | None = None
    out_channels: int | None = None
    num_layers: int = 1
    dropout: float = 0.0
    cross_attention_dim: int | None = None
    attention_bias: bool = False
    sample_size: int = 64
    patch_size: int | None = None
    activation_fn: str = "geglu"
    num_embeds_ada_norm: int | None = None
    norm_type: str = "layer_norm"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    caption_channels: int | None = None
    video_length: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatteConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.norm_type != "ada_norm_single":
            raise ValueError(f"Latte's blocks are norm_type 'ada_norm_single' (adaln_single modulates them); this config "
                             f"has {cfg.norm_type!r}.")
        if cfg.activation_fn != "gelu-approximate":
            raise ValueError(f"Unsupported activation_fn {cfg.activation_fn!r}; Latte uses 'gelu-approximate'.")
        for name in ("in_channels", "patch_size", "caption_channels"):
            if getattr(cfg, name) is None:
                raise ValueError(f"A Latte config needs {name} (diffusers cannot build the model without it).")
        if cfg.cross_attention_dim != cfg.inner_dim:
            raise ValueError(f"cross_attention_dim={cfg.cross_attention_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {cfg.inner_dim}: the caption projection outputs that width.")
        return cfg

    # what PixArt's shared modules read
    additional_conditions = False

    @property
    def pos_interpolation_scale(self) -> float:
        return max(self.sample_size // 64, 1)

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def learned_sigma(self) -> bool:
        return self.out_ch // 2 == self.in_channels


TORCH_RENAMES = [
    (r"^transformer_blocks\.(\d+)\.spatial\.", r"transformer_blocks.\1."),
    (r"^transformer_blocks\.(\d+)\.temporal\.", r"temporal_transformer_blocks.\1."),
] + pixart.TORCH_RENAMES
TORCH_IGNORE = [r"^pos_embed\.pos_embed$", r"^temp_pos_embed$"]  # buffers some exports keep


def temporal_table(dim: int, frames: int) -> np.ndarray:
    """diffusers' ``temp_pos_embed`` for ``frames`` frames: ``get_1d_sincos_pos_embed_from_grid(dim,
    arange(frames))`` (float64, then float32), the first rows of the ``video_length``-row buffer."""
    return sincos_1d(dim, np.arange(frames)).astype(np.float32)


class LattePair(nnx.Module):
    """One layer of the stack: the spatial block, then the temporal one."""

    def __init__(self, cfg: LatteConfig, *, dtype, rngs):
        self.spatial = pixart.BasicTransformerBlock(cfg, dtype=dtype, rngs=rngs)
        self.temporal = pixart.BasicTransformerBlock(cfg, cross=False, local=True, dtype=dtype, rngs=rngs)

    def __call__(self, x, layer, cond, temporal: bool):
        """x: (B, P, F, D), P any contiguous run of the patch positions (a shard, a PipeFusion patch);
        ``layer``: the layers done before this one (the frame table goes in before layer 0's temporal
        block)."""
        b, p, f, d = x.shape
        t6 = cond["timestep"]  # (B, 6D)
        spatial_cond = {"timestep": jnp.repeat(t6, f, axis=0), "context": cond["context"],
                        "context_mask": cond["context_mask"]}
        y = x.transpose(0, 2, 1, 3).reshape(b * f, p, d)  # a frame's patches: the (sharded) sequence
        y = self.spatial(y, spatial_cond).reshape(b, f, p, d).transpose(0, 2, 1, 3)
        if not temporal:
            return y
        if f > 1:
            y = y + jnp.where(layer == 0, cond["frame_pos"][:, None], 0).astype(y.dtype)
        y = self.temporal(y.reshape(b * p, f, d), {"timestep": jnp.repeat(t6, p, axis=0)})
        return y.reshape(b, p, f, d)


class LatteTransformer3DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
    enable_temporal_attentions)`` as diffusers' forward.

    hidden_states: (B, C, F, H, W) latents (diffusers' layout); encoder_hidden_states: (B, L, caption_channels);
    timestep: (B,) or a scalar; encoder_attention_mask: optional (B, L), 1/True = keep (diffusers' pipeline
    passes none). Returns (B, out_channels, F, H, W).
    """

    def __init__(self, cfg: LatteConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        self.pos_embed = pixart.PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.adaln_single = pixart.AdaLayerNormSingle(cfg, dtype=dtype, rngs=rngs)
        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_channels, d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: LattePair(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((2, d), dtype))
        self.proj_out = linear(d, cfg.patch_size * cfg.patch_size * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- pieces: embed (global) -> blocks (per patch position, any contiguous shard) -> head (global) --

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None):
        """-> (x, tokens, cond). x: (B, P, F, D) patch-major tokens, positions added; tokens: ``{}``;
        cond (batch first): ``timestep`` (B, 6D), ``embedded_timestep`` (B, D), ``context`` (B, L, D),
        ``context_mask`` (B, L) bool, ``frame_pos`` (B, F, D) the frame table."""
        cfg, dtype = self.cfg, self.dtype
        b, c, f, h, w = hidden_states.shape
        check_input_shape(cfg, h, w)
        p = cfg.patch_size
        gh, gw = h // p, w // p
        frames = hidden_states.astype(dtype).transpose(0, 2, 3, 4, 1).reshape(b * f, h, w, c)
        x = self.pos_embed.proj(frames).reshape(b * f, gh * gw, -1)
        pos = pixart.sincos_2d_table(cfg.inner_dim, gh, gw, cfg.base_size, cfg.pos_interpolation_scale)
        x = (x.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(dtype)
        x = x.reshape(b, f, gh * gw, -1).transpose(0, 2, 1, 3)
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        t6, embedded = self.adaln_single(t, None, None, b)
        context = self.caption_projection(encoder_hidden_states.astype(dtype)).reshape(b, -1, cfg.inner_dim)
        frame_pos = jnp.broadcast_to(jnp.asarray(temporal_table(cfg.inner_dim, f))[None], (b, f, cfg.inner_dim))
        cond = {"timestep": t6, "embedded_timestep": embedded, "context": context,
                "context_mask": pixart.text_key_mask(encoder_attention_mask, b, context.shape[1]),
                "frame_pos": frame_pos.astype(dtype)}
        return x, {}, cond

    def blocks(self, x, tokens, cond, temporal: bool = True):
        """The stack (one lax.scan over the layer pairs) on the tokens (B, P, F, D) or a contiguous run
        of their patch positions; ``temporal``: diffusers' ``enable_temporal_attentions``."""
        del tokens

        def layer(pair, carry):
            y, done = carry
            return pair(y, done, cond, temporal), done + 1

        return scan_modules(self.transformer_blocks, layer, (x, jnp.int32(0)))[0]

    def head(self, x, cond, shape):
        """Tokens (B, P, F, D) -> the prediction (B, out_channels, F, H, W) for latents of ``shape``."""
        cfg = self.cfg
        b, _, f, h, w = shape
        p = cfg.patch_size
        mod = self.scale_shift_table[...][None] + cond["embedded_timestep"][:, None]  # (B, 2, D)
        shift, scale = (a[:, :, None] for a in jnp.split(mod.astype(x.dtype), 2, axis=1))  # (B, 1, 1, D)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, P, F, p p C)
        x = x.reshape(b, h // p, w // p, f, p, p, cfg.out_ch).transpose(0, 6, 3, 1, 4, 2, 5)
        return x.reshape(b, cfg.out_ch, f, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None,
                 enable_temporal_attentions: bool = True):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
        return self.head(self.blocks(x, tokens, cond, enable_temporal_attentions), cond, hidden_states.shape)


def check_input_shape(cfg: LatteConfig, latent_h: int, latent_w: int) -> None:
    pixart.check_input_shape(cfg, latent_h, latent_w)


def params_from_torch(flat: dict, cfg: LatteConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: LatteTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=TORCH_IGNORE,
                          dtype=dtype, what="Latte transformer checkpoint")


def build(cfg: LatteConfig, params: dict, dtype=jnp.float32) -> LatteTransformer3DModel:
    return build_module(lambda: LatteTransformer3DModel(cfg, dtype=dtype), params)


__all__ = ["STACKED", "LatteConfig", "LatteTransformer3DModel", "build", "params_from_torch", "temporal_table"]
