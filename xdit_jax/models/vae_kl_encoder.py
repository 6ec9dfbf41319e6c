"""The encoder of diffusers' ``AutoencoderKL`` (SD / SDXL / FLUX VAEs) in Flax NNX, for pipelines that take an
image (FLUX.1 Kontext): images (B, 3, H, W) in [-1, 1] -> the posterior ``vae.encode(x).latent_dist`` as its
``mean`` and (clamped) ``logvar``, not scaled.

Submodules carry diffusers' names under ``encoder.`` (and ``quant_conv`` where the config uses it), so
:func:`xdit_jax.keymap.map_state_dict` derives the key map; the decoder's tensors are ignored. The layers are the
decoder's (:mod:`xdit_jax.models.vae_kl`: resnets, the mid block with its spatial self-attention); the downsampler
is the encoder's own. Layout: channels-last ``(N, H, W, C)`` inside.

The network (diffusers' ``Encoder``): ``conv_in`` (3x3), per level ``layers_per_block`` resnets (GroupNorm eps 1e-6)
and, but for the last level, a ``Downsample2D`` (one zero row / column at the bottom / right, then a 3x3 stride-2
convolution: ``floor(H / 2)``), the mid block (resnet, attention, resnet), ``conv_norm_out`` (GroupNorm) + SiLU,
``conv_out`` to ``2 * latent_channels``; then ``quant_conv`` (1x1) if ``use_quant_conv`` (SD; FLUX has none).

Over a mesh, :func:`xdit_jax.parallel.vae.sharded_encode` splits the image plane (XLA's partitioner; no hooks
here). Not implemented: diffusers' ``tiled_encode`` (``enable_tiling``; the pipelines here encode one image of about
a megapixel).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_kl import (
    TORCH_RENAMES,
    AutoencoderKLConfig,
    ResnetBlock2D,
    UNetMidBlock2D,
    _conv3x3,
    _rename_deprecated_attention,
)
from xdit_jax.models.vae_layers import Conv, GroupNorm

# Torch keys of a VAE checkpoint that carry nothing the encoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.", r"^post_quant_conv\.")
# diffusers' ``DiagonalGaussianDistribution`` clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
_DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)


class Downsample2D(nnx.Module):
    """torch ``F.pad(x, (0, 1, 0, 1))`` then ``Conv2d(k=3, stride=2, padding=0)``."""

    def __init__(self, channels: int, *, dtype=jnp.float32):
        self.conv = Conv(channels, channels, (3, 3), dtype=dtype)  # params only; strided below

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.conv.kernel[...]
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (2, 2), ((0, 1), (0, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.conv.bias[...]


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, groups: int, act_fn: str,
                 add_downsample: bool, dtype=jnp.float32):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, act_fn=act_fn,
                          dtype=dtype)
            for i in range(num_layers)
        ])
        self.downsamplers = nnx.List([Downsample2D(out_channels, dtype=dtype)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32):
        bad = [t for t in cfg.down_block_types if t not in _DOWN_BLOCK_TYPES]
        if bad:
            raise ValueError(f"AutoencoderKL encoder: unsupported down_block_types {bad} (only DownEncoderBlock2D).")
        if len(cfg.down_block_types) != len(cfg.block_out_channels):
            raise ValueError(f"AutoencoderKL: {len(cfg.down_block_types)} down_block_types for "
                             f"{len(cfg.block_out_channels)} block_out_channels; they must match")
        ch, groups, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = _conv3x3(cfg.in_channels, ch[0], dtype)
        blocks, out_ch = [], ch[0]
        for i in range(len(ch)):
            prev, out_ch = out_ch, ch[i]
            blocks.append(DownEncoderBlock2D(prev, out_ch, cfg.layers_per_block, groups=groups, act_fn=act,
                                             add_downsample=i != len(ch) - 1, dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(ch[-1], groups=groups, act_fn=act,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = _conv3x3(ch[-1], 2 * cfg.latent_channels, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is nn.SiLU() always


class AutoencoderKLEncoder(nnx.Module):
    """The encode half of ``AutoencoderKL``: ``encoder`` and ``quant_conv`` (if used)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, dtype=dtype)
        c = 2 * cfg.latent_channels
        self.quant_conv = Conv(c, c, (1, 1), dtype=dtype) if cfg.use_quant_conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images channels-last (N, H, W, C_in) -> moments channels-last (N, H / s, W / s, 2 * C_latent)."""
        h = self.encoder(x.astype(self.dtype))
        return self.quant_conv(h) if self.quant_conv is not None else h


# ----------------------------------------------------------------------------------------------
# Public API


def encode(model: AutoencoderKLEncoder, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``vae.encode(images).latent_dist``: images (B, C_in, H, W) in [-1, 1] -> ``(mean, logvar)``, each
    (B, C_latent, floor-halved H and W per level) float32, ``logvar`` clamped to [-30, 20]. ``mean`` is
    ``latent_dist.mode()``. Not scaled or shifted. Computes in the model's dtype (GroupNorm statistics and the
    attention's softmax in float32). Pure and jittable."""
    cfg = model.config
    if images.ndim != 4 or images.shape[1] != cfg.in_channels:
        raise ValueError(f"encode takes (batch, {cfg.in_channels}, height, width); got {tuple(images.shape)}.")
    h = model(jnp.transpose(images, (0, 2, 3, 1)))
    moments = jnp.transpose(h, (0, 3, 1, 2)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def scale_latents(cfg: AutoencoderKLConfig, mean: jax.Array) -> jax.Array:
    """The inverse of :func:`xdit_jax.models.vae_kl.unscale_latents`: VAE latents -> diffusion latents, as diffusers'
    pipelines write an encoded image (``(latents - shift_factor) * scaling_factor``; with ``latents_mean`` /
    ``latents_std``: ``(latents - mean) * scaling_factor / std``)."""
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        shape = (1, -1) + (1,) * (mean.ndim - 2)
        m = jnp.asarray(cfg.latents_mean, mean.dtype).reshape(shape)
        s = jnp.asarray(cfg.latents_std, mean.dtype).reshape(shape)
        return (mean - m) * cfg.scaling_factor / s
    shifted = mean - cfg.shift_factor if cfg.shift_factor is not None else mean
    return shifted * cfg.scaling_factor


def module_fn(cfg: AutoencoderKLConfig, dtype=jnp.float32):
    return lambda: AutoencoderKLEncoder(cfg, dtype=dtype)


def has_encoder(flat: Mapping[str, np.ndarray]) -> bool:
    """Whether a ``vae/`` state dict holds the encoder (diffusers' AutoencoderKL checkpoints do)."""
    return any(k.startswith("encoder.") for k in flat)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: AutoencoderKLConfig, dtype=None) -> dict:
    """The encoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder; the decoder's tensors
    are ignored. ``dtype``: cast to it (None keeps float32). Raises ``CheckpointError`` on missing, unexpected or
    misshaped tensors."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(_rename_deprecated_attention(flat), expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE,
                          dtype=dtype, what="VAE checkpoint (encoder)")


def build(cfg: AutoencoderKLConfig, params: Mapping, dtype=jnp.float32) -> AutoencoderKLEncoder:
    """The encoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)
