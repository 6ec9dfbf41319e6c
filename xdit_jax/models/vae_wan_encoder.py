"""The encoder of diffusers' ``AutoencoderKLWan`` (Wan 2.1, and Wan 2.2's residual variant) in Flax NNX: video
(B, C, T, H, W) in [-1, 1] -> the posterior's mean latents, diffusers' ``vae.encode(x).latent_dist.mode()`` (what
its image-to-video pipelines take, ``sample_mode="argmax"``).

Submodules carry diffusers' names (``encoder.down_blocks.3.resample.1.weight`` -> ``...resample.kernel`` is the one
rename, as in the decoder), so :func:`xdit_jax.keymap.map_state_dict` derives the key map; the decoder's tensors are
ignored. Layout: channels-last ``(N, T, H, W, C)`` inside.

The network, as diffusers builds it (``WanEncoder3d`` with ``z_dim * 2`` outputs, then ``quant_conv``):

* Wan 2.2's ``patch_size`` first (``patchify``: each p x p pixel block to channels).
* ``conv_in`` (3x3x3 causal), the down blocks, ``mid_block`` (resnet, attention, resnet), ``norm_out`` + SiLU,
  ``conv_out``; widths ``base_dim * [1] + dim_mult``.
* Wan 2.1: per level ``num_res_blocks`` resnets (an attention block after each where the level's scale is in
  ``attn_scales``), then, but for the last level, a ``WanResample`` down: zero padding of one row / column at the
  bottom / right and a 3x3 stride-2 conv per frame; in ``downsample3d`` mode then a (3, 1, 1) stride-2
  ``time_conv`` without padding. Wan 2.2 (``is_residual``): per level a ``WanResidualDownBlock``, the same resnets
  and resample plus a parameterless ``AvgDown3D`` shortcut of the block's input (space-to-depth, channel groups
  averaged; zero frames in front to a multiple of its temporal factor).

diffusers encodes frame 0 alone, then chunks of 4 frames, carrying each causal convolution's last two frames (so
one causal convolution over the stream) and, at a temporal downsampling, the previous chunk's last frame: its first
call passes frame 0 through without the ``time_conv``, every later one convolves ``[last frame; chunk]`` with stride
2. With chunks of even length that is one strided convolution over the whole stream ``x0, x1, ...`` (windows
``[x0 x1 x2], [x2 x3 x4], ...``) after frame 0 kept as it is: **one pass** over all frames here, the same numbers.
AvgDown3D's front padding (to an even count per chunk) likewise equals one zero frame before the 1 + 2k frames.
``encode(..., frame_chunk=4)`` runs diffusers' loop itself (a ``lax.scan`` over the chunks carrying the caches), the
same latents with four frames' activations alive: what the image-to-video pipeline uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_layers import Conv
from xdit_jax.models.vae_wan import (
    TORCH_RENAMES,
    WanAttentionBlock,
    WanCausalConv3d,
    WanMidBlock,
    WanResidualBlock,
    WanRMSNorm,
    WanVAEConfig,
)

# diffusers encodes frame 0, then chunks of this many frames (whatever the temporal compression).
CHUNK = 4
# Torch keys of a VAE checkpoint that carry nothing the encoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.", r"^post_quant_conv\.")


def _strided_conv(x, kernel, bias, strides, padding):
    nd = kernel.ndim - 2
    dims = "DHW"[-nd:]
    y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, strides, padding,
                                     dimension_numbers=("N" + dims + "C", dims + "IO", "N" + dims + "C"))
    return y + bias


class WanDownsample(nnx.Module):
    """``WanResample`` in a downsampling mode: per frame zero padding (bottom, right) and a 3x3 stride-2 conv
    (torch's ``resample.1``); ``downsample3d``: then the (3, 1, 1) stride-2 ``time_conv`` over frames ``0..``
    with frame 0 kept in front (see the module docstring)."""

    def __init__(self, dim: int, mode: str, *, dtype=jnp.float32):
        if mode not in ("downsample2d", "downsample3d"):
            raise ValueError(f"WanDownsample: mode must be downsample2d or downsample3d, got {mode!r}")
        self.resample = Conv(dim, dim, (3, 3), dtype=dtype)
        self.time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), dtype=dtype) if mode == "downsample3d" else None

    def __call__(self, x: jax.Array, cache=None):
        """-> (y, cache): ``cache`` the last frame of the stream so far (the time_conv's; None without one). A
        stream's start (``cache`` None) keeps its frame 0 and convolves windows from frame 0 on."""
        n, t, h, w, c = x.shape
        r = self.resample
        x = _strided_conv(x.reshape(n * t, h, w, c), r.kernel[...], r.bias[...], (2, 2), ((0, 1), (0, 1)))
        x = x.reshape((n, t) + x.shape[1:])
        if self.time_conv is None:
            return x, None
        tc = self.time_conv
        conv = lambda v: _strided_conv(v, tc.kernel[...], tc.bias[...], (2, 1, 1), ((0, 0),) * 3)  # noqa: E731
        if cache is not None:
            y = conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        elif t == 1:
            y = x
        else:
            y = conv(x)
            y = jnp.concatenate([x[:, :1].astype(y.dtype), y], axis=1)
        return y, x[:, -1:]


def avg_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """diffusers' ``AvgDown3D`` on channels-last ``x``: zero frames in front to a multiple of ``factor_t``, then
    channel ``c*f + a*fs*fs + b*fs + d`` (``f = ft*fs*fs``) of the output block is input channel ``c`` at frame
    offset ``a``, row offset ``b``, column offset ``d``; the ``C*f / out_dim`` consecutive channels of each output
    channel averaged."""
    n, t, h, w, c = x.shape
    pad_t = (factor_t - t % factor_t) % factor_t
    if pad_t:
        x = jnp.concatenate([jnp.zeros((n, pad_t, h, w, c), x.dtype), x], axis=1)
        t += pad_t
    factor = factor_t * factor_s * factor_s
    x = x.reshape(n, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, t // factor_t, h // factor_s, w // factor_s, c * factor)
    x = x.reshape(x.shape[:4] + (out_dim, c * factor // out_dim))
    return x.astype(jnp.float32).mean(axis=-1).astype(x.dtype)


class WanResidualDownBlock(nnx.Module):
    """Wan 2.2's down block: resnets, the downsampler, plus the ``AvgDown3D`` shortcut of the block's input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_downsample: bool, down_flag: bool,
                 *, dtype=jnp.float32):
        self.resnets = nnx.List([WanResidualBlock(in_dim if i == 0 else out_dim, out_dim, dtype=dtype)
                                 for i in range(num_res_blocks)])
        mode = "downsample3d" if temperal_downsample else "downsample2d"
        self.downsampler = WanDownsample(out_dim, mode, dtype=dtype) if down_flag else None
        self.out_dim = out_dim
        self.factor_t = 2 if temperal_downsample else 1
        self.factor_s = 2 if down_flag else 1

    def __call__(self, x: jax.Array, cache=None):
        cache = cache or {}
        new = {}
        x_in = x
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, cache.get(f"resnet_{i}"))
        if self.downsampler is not None:
            x, new["downsampler"] = self.downsampler(x, cache.get("downsampler"))
        return x + avg_down(x_in, self.out_dim, self.factor_t, self.factor_s).astype(x.dtype), new


class WanEncoder3d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32):
        dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv_in = WanCausalConv3d(cfg.in_channels, dims[0], dtype=dtype)
        blocks = []
        scale = 1.0
        for i in range(n):
            in_dim, out_dim = dims[i], dims[i + 1]
            last = i == n - 1
            if cfg.is_residual:
                temporal = bool(cfg.temperal_downsample[i]) if not last else False
                blocks.append(WanResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, not last,
                                                   dtype=dtype))
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(WanResidualBlock(in_dim, out_dim, dtype=dtype))
                if scale in cfg.attn_scales:
                    blocks.append(WanAttentionBlock(out_dim, dtype=dtype))
                in_dim = out_dim
            if not last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(WanDownsample(out_dim, mode, dtype=dtype))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = WanMidBlock(dims[-1], dtype=dtype)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = WanCausalConv3d(dims[-1], 2 * cfg.z_dim, dtype=dtype)

    def __call__(self, x: jax.Array, cache=None):
        """Frames (N, T, H, W, C_in) -> ((N, T', H', W', 2 z_dim), cache): the stream's next frames after ``cache``
        (None: its start), and the cache after them."""
        cache = cache or {}
        new = {}
        x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            if isinstance(block, WanAttentionBlock):
                x = block(x)
            else:
                x, new[f"down_{i}"] = block(x, cache.get(f"down_{i}"))
        x, new["mid_block"] = self.mid_block(x, cache.get("mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
        return x, new


class WanVAEEncoder(nnx.Module):
    """The encode half of ``AutoencoderKLWan``: ``encoder`` and ``quant_conv``."""

    def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.encoder = WanEncoder3d(cfg, dtype=dtype)
        self.quant_conv = WanCausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), dtype=dtype)

    def __call__(self, x: jax.Array, cache=None, *, moments: bool = False):
        """Frames (N, T, H, W, C_in), channels-last and patched -> (the posterior's mean (N, T', h, w, z_dim), the
        cache after them: :meth:`WanEncoder3d.__call__`); ``moments``: the mean and the log-variance, unclamped
        (N, T', h, w, 2 z_dim)."""
        y, cache = self.encoder(x.astype(self.dtype), cache)
        y = self.quant_conv(y)[0]
        return (y if moments else y[..., :self.config.z_dim]), cache


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """diffusers' ``patchify`` (Wan 2.2), the inverse of :func:`xdit_jax.models.vae_wan.unpatchify`:
    (B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p); row offset ``j``, column offset ``i`` become channel
    ``c*p*p + i*p + j``."""
    if patch_size == 1:
        return x
    b, c, t, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Height ({h}) and width ({w}) must be multiples of the VAE's patch_size ({p}).")
    x = x.reshape(b, c, t, h // p, p, w // p, p).transpose(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def encode(model: WanVAEEncoder, x: jax.Array, *, frame_chunk: int | None = None, moments: bool = False):
    """Video (B, C, T, H, W) in [-1, 1] -> mean latents (B, z_dim, (T - 1) // 4 + 1, H / s, W / s) (s: the
    spatial compression), diffusers' ``encode(x).latent_dist.mode()``; not scaled (:func:`scale_latents`). Frames
    past the last ``1 + 4k`` are dropped, as diffusers' loop (frame 0, then chunks of four) drops them.

    ``frame_chunk=4``: that loop itself (frame 0, then a ``lax.scan`` over chunks of four frames carrying each
    causal convolution's last frames): the same latents with the activations of four frames alive instead of all
    (a 81 x 720 x 1280 video's first activation alone is 81 x 720 x 1280 x 96 values); None: one pass.

    ``moments``: diffusers' ``latent_dist`` instead, ``(mean, logvar)`` each (B, z_dim, T', h, w), ``logvar`` clamped
    to [-30, 20] as its ``DiagonalGaussianDistribution`` (the image-to-image pipelines sample it)."""
    cfg = model.config
    s = cfg.spatial_compression_ratio
    if x.ndim != 5 or x.shape[3] % s or x.shape[4] % s:
        raise ValueError(f"encode takes (batch, channels, frames, height, width) with height and width multiples "
                         f"of {s}; got {tuple(x.shape)}.")
    if frame_chunk not in (None, CHUNK):
        raise ValueError(f"frame_chunk must be None (one pass) or {CHUNK} (diffusers' chunks), got {frame_chunk}.")
    x = patchify(x[:, :, :1 + (x.shape[2] - 1) // CHUNK * CHUNK], cfg.patch)  # diffusers' chunks: 1, then 4s
    x = jnp.transpose(x, (0, 2, 3, 4, 1))
    if frame_chunk is None or x.shape[1] == 1:
        z = model(x, moments=moments)[0]
    else:
        z, cache = model(x[:, :1], moments=moments)
        n, t = x.shape[:2]
        chunks = jnp.moveaxis(x[:, 1:].reshape((n, (t - 1) // CHUNK, CHUNK) + x.shape[2:]), 1, 0)
        cache, rest = jax.lax.scan(lambda c, chunk: model(chunk, c, moments=moments)[::-1], cache, chunks)
        rest = jnp.moveaxis(rest, 0, 1)
        z = jnp.concatenate([z, rest.reshape((n, -1) + rest.shape[3:]).astype(z.dtype)], axis=1)
    z = jnp.transpose(z, (0, 4, 1, 2, 3))
    if not moments:
        return z
    mean, logvar = jnp.split(z.astype(jnp.float32), 2, axis=1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def scale_latents(cfg: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """The VAE's latents -> diffusion latents, as diffusers' Wan pipelines write it: ``(latents - latents_mean) *
    (1 / latents_std)`` per channel (unchanged without statistics); the inverse of ``vae_wan.unscale_latents``."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return latents
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape)
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape)
    return ((latents.astype(jnp.float32) - mean) * inv_std).astype(latents.dtype)


def module_fn(cfg: WanVAEConfig, dtype=jnp.float32):
    return lambda: WanVAEEncoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: WanVAEConfig, dtype=None) -> dict:
    """The encoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder; the decoder's
    tensors are ignored. Raises ``CheckpointError`` on missing, unexpected or misshaped tensors."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint (encoder)")


def build(cfg: WanVAEConfig, params: Mapping, dtype=jnp.float32) -> WanVAEEncoder:
    """The encoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)
