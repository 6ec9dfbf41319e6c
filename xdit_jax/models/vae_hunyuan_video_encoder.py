"""The encoder of diffusers' ``AutoencoderKLHunyuanVideo`` in Flax NNX: video (B, C, T, H, W) in [-1, 1] -> the
posterior's mean latents, diffusers' ``vae.encode(x).latent_dist.mode()`` (image-to-video's conditioning).

Submodules carry diffusers' names, so :func:`xdit_jax.keymap.map_state_dict` derives the key map; the decoder's
tensors and ``post_quant_conv`` are ignored. Layout: channels-last ``(N, T, H, W, C)`` inside. The layers are the
decoder's (:mod:`xdit_jax.models.vae_hunyuan_video`): causal replicate-padded convolutions, the same resnets and
the same mid block (frame-causal attention over all tokens).

The network, as diffusers builds it (``HunyuanVideoEncoder3D`` with ``double_z``, then ``quant_conv``):

* ``conv_in`` (causal, ``in_channels`` -> ``block_out_channels[0]``).
* ``down_blocks[i]``: ``layers_per_block`` resnets (``block_out_channels[i-1]`` -> ``[i]``), then, where the block
  downsamples, ``HunyuanVideoDownsampleCausal3D``: the causal replicate padding (2 first frames in front, one edge
  row / column each side) and a 3x3x3 convolution of stride (t, 2, 2), no other padding. Block ``i`` of ``n``
  halves height and width if ``i < log2(spatial_compression_ratio)`` and the frames if
  ``n - 1 - log2(4) <= i < n - 1`` (T frames -> ``(T - 1) // 2 + 1``): the release, 8x in space,
  T -> ``(T - 1) // 4 + 1``.
* ``mid_block``, ``conv_norm_out`` (GroupNorm eps 1e-6), SiLU, ``conv_out`` to ``2 * latent_channels``,
  ``quant_conv`` (1x1x1); the mode of the diagonal Gaussian is the first ``latent_channels`` channels.

``encode(..., framewise=True)`` (diffusers' ``use_framewise_encoding``, on by default): more than
``tile_sample_min_num_frames`` (16) frames are encoded in temporal tiles of 17 frames every 12, each tile but the
first dropping its first latent frame, consecutive tiles blended over ``16 // 4 - 12 // 4`` (1) latent frame
(``_temporal_tiled_encode``). Spatial tiled encoding (``enable_tiling``) is not reproduced.
``mesh``: :func:`xdit_jax.parallel.vae.sharded_encode` (XLA's partitioner splits the plane).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_hunyuan_video import (
    _EPS,
    TORCH_RENAMES,
    HunyuanVideoCausalConv3d,
    HunyuanVideoMidBlock3D,
    HunyuanVideoResnetBlockCausal3D,
    HunyuanVideoTilingConfig,
    HunyuanVideoVAEConfig,
    default_tiling,
)
from xdit_jax.models.vae_layers import Conv, GroupNorm
from xdit_jax.parallel import vae as spatial

# Torch keys of a VAE checkpoint that carry nothing the encoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.", r"^post_quant_conv\.")


def downsample_factors(cfg: HunyuanVideoVAEConfig) -> tuple[tuple[int, int, int], ...]:
    """(time, height, width) stride of each down block, as ``HunyuanVideoEncoder3D`` derives them."""
    n = len(cfg.block_out_channels)
    ns = int(np.log2(cfg.spatial_compression_ratio))
    nt = int(np.log2(cfg.temporal_compression_ratio))
    return tuple((2 if n - 1 - nt <= i < n - 1 else 1,) + ((2, 2) if i < ns else (1, 1)) for i in range(n))


class StridedReplicateConv3d(nnx.Module):
    """The ``conv`` of ``HunyuanVideoCausalConv3d(k=3, stride)``: replicate padding (2 first frames in front, one
    edge row / column each side), then a VALID convolution with ``strides``."""

    def __init__(self, channels: int, strides: tuple[int, int, int], *, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((3, 3, 3, channels, channels), dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))
        self.strides = tuple(strides)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        x = jnp.pad(x.astype(kernel.dtype), ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        y = jax.lax.conv_general_dilated(x, kernel, self.strides, ((0, 0),) * 3,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...]


class StridedCausalConv3d(nnx.Module):
    """``HunyuanVideoCausalConv3d(k=3, stride)``: its one child ``conv``."""

    def __init__(self, channels: int, strides: tuple[int, int, int], *, dtype=jnp.float32):
        self.conv = StridedReplicateConv3d(channels, strides, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class HunyuanVideoDownsampleCausal3D(nnx.Module):
    def __init__(self, channels: int, strides: tuple[int, int, int], *, dtype=jnp.float32):
        self.conv = StridedCausalConv3d(channels, strides, dtype=dtype)  # diffusers' downsamplers.0.conv.conv

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class HunyuanVideoDownBlock3D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, strides: tuple[int, int, int], *,
                 groups: int, act_fn: str, dtype=jnp.float32):
        self.resnets = nnx.List([
            HunyuanVideoResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                                            act_fn=act_fn, dtype=dtype)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([HunyuanVideoDownsampleCausal3D(out_channels, strides, dtype=dtype)])
                             if max(strides) > 1 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class HunyuanVideoEncoder3D(nnx.Module):
    def __init__(self, cfg: HunyuanVideoVAEConfig, *, dtype=jnp.float32):
        ch, g, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = HunyuanVideoCausalConv3d(cfg.in_channels, ch[0], 3, dtype=dtype)
        self.down_blocks = nnx.List([
            HunyuanVideoDownBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, s, groups=g, act_fn=act,
                                    dtype=dtype)
            for i, s in enumerate(downsample_factors(cfg))
        ])
        self.mid_block = HunyuanVideoMidBlock3D(ch[-1], groups=g, act_fn=act, add_attention=cfg.mid_block_add_attention,
                                                dtype=dtype)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, dtype=dtype)
        self.conv_out = HunyuanVideoCausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class HunyuanVideoVAEEncoder(nnx.Module):
    """The encode half of ``AutoencoderKLHunyuanVideo``: ``encoder`` and ``quant_conv``."""

    def __init__(self, cfg: HunyuanVideoVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.encoder = HunyuanVideoEncoder3D(cfg, dtype=dtype)
        self.quant_conv = Conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, (1, 1, 1), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Video channels-last (N, T, H, W, C) -> the posterior's moments (N, T', h, w, 2 * latent_channels)."""
        return self.quant_conv(self.encoder(x.astype(self.dtype)))


def _encode_plain(model: HunyuanVideoVAEEncoder, x: jax.Array) -> jax.Array:
    """NCTHW video -> NCTHW mean latents (the first half of the moments)."""
    moments = model(jnp.transpose(x, (0, 2, 3, 4, 1)))
    return jnp.transpose(moments[..., : model.config.latent_channels], (0, 4, 1, 2, 3))


def encode(model: HunyuanVideoVAEEncoder, x: jax.Array, *, framewise: bool = True,
           tiling: HunyuanVideoTilingConfig | None = None, mesh=None) -> jax.Array:
    """Video (B, C, T, H, W) in [-1, 1] -> mean latents (B, latent_channels, (T - 1) // 4 + 1, H / 8, W / 8) for the
    release config, diffusers' ``encode(x).latent_dist.mode()``; not scaled (multiply by ``scaling_factor``).

    ``framewise`` (diffusers' default, on): temporal tiles when T exceeds ``tiling``'s (default
    :func:`default_tiling`) ``tile_sample_min_num_frames``. ``mesh``: the plane split over its devices
    (:func:`xdit_jax.parallel.vae.sharded_encode`), equal to one device up to float summation order."""
    cfg = model.config
    sizes = tiling or default_tiling(cfg)
    s = cfg.spatial_compression_ratio

    def one(m, v):
        return spatial.sharded_encode(_encode_plain, m, v, mesh, factor=s)

    if not (framewise and x.shape[2] > sizes.tile_sample_min_num_frames):
        return one(model, x)
    return _temporal_tiled_encode(one, model, x, sizes)


def _temporal_tiled_encode(encode_fn, model, x: jax.Array, sizes: HunyuanVideoTilingConfig) -> jax.Array:
    """diffusers' ``_temporal_tiled_encode`` around ``encode_fn`` (NCTHW video -> NCTHW latents)."""
    r = model.config.temporal_compression_ratio
    length, stride = sizes.tile_sample_min_num_frames, sizes.tile_sample_stride_num_frames
    lt, st = length // r, stride // r
    num_frames = x.shape[2]
    starts = list(range(0, num_frames, stride))
    groups: dict[int, list[int]] = {}
    for i in starts:
        groups.setdefault(min(length + 1, num_frames - i), []).append(i)
    tiles: dict[int, jax.Array] = {}
    for n, where in groups.items():
        ys = spatial._map_model(encode_fn, model, jnp.stack([x[:, :, i:i + n] for i in where]))
        for k, i in enumerate(where):
            tiles[i] = ys[k] if i == 0 else ys[k][:, :, 1:]
    out, prev = [], None
    for i in starts:  # diffusers' in-place order: each tile blended with its (already blended) predecessor
        t = tiles[i]
        if prev is not None:
            t = spatial._blend(prev, t, lt - st, -3)
        out.append(t[:, :, : st + (1 if prev is None else 0)])
        prev = t
    return jnp.concatenate(out, axis=2)[:, :, : (num_frames - 1) // r + 1]


jit_encode = nnx.jit(encode, static_argnames=("framewise", "tiling", "mesh"))


def module_fn(cfg: HunyuanVideoVAEConfig, dtype=jnp.float32):
    return lambda: HunyuanVideoVAEEncoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideoVAEConfig, dtype=None) -> dict:
    """The encoder's params (pure dict, with ``quant_conv``) from the flat torch state dict of a ``vae/`` folder;
    the decoder's tensors are ignored. Raises ``CheckpointError`` on missing, unexpected or misshaped tensors."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint (encoder)")


def build(cfg: HunyuanVideoVAEConfig, params: Mapping, dtype=jnp.float32) -> HunyuanVideoVAEEncoder:
    """The encoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)
