"""The encoder of diffusers' ``AutoencoderKLCogVideoX`` in Flax NNX, for image-to-video (CogVideoX-5b-I2V,
CogVideoX1.5-5B-I2V): video (B, 3, F, H, W) in [-1, 1] -> the posterior ``vae.encode(x).latent_dist``, as its
``mean`` and (clamped) ``logvar``; :func:`sample` draws from it as ``DiagonalGaussianDistribution.sample`` does.

Submodules carry diffusers' names under ``encoder.`` (and ``quant_conv`` where the config uses it), so
:func:`xdit_jax.keymap.map_state_dict` derives the key map; the decoder's tensors are ignored. The layers are the
decoder's (:mod:`xdit_jax.models.vae_cogvideox`: causal convolutions, resnets with plain GroupNorms here, the mid
block); only the downsampler is the encoder's own. Layout: channels-last ``(N, T, H, W, C)`` inside.

The network (``CogVideoXEncoder3D``): ``conv_in`` (3x3x3 causal), per level ``layers_per_block`` resnets and, but for
the last level, a ``CogVideoXDownsample3D`` (on the first ``log2(temporal_compression_ratio)`` levels first an
average of frame pairs, an odd first frame kept alone; then zero padding of one row / column at the bottom / right
and a 3x3 stride-2 conv per frame), the mid block (two resnets), ``norm_out`` (GroupNorm, eps 1e-6) + SiLU,
``conv_out`` to ``2 * latent_channels``, then ``quant_conv`` (1x1x1) if ``use_quant_conv``.

Frames (``F > 1``): exactly diffusers' ``_encode`` loop. The video is encoded in chunks of ``frame_batch_size`` (8,
diffusers' ``num_sample_frames_batch_size``), the first chunk also taking the ``F % 8`` extra frames (one chunk when
``F < 8``); each causal convolution carries its last two (padded) input frames into the next chunk, while the
GroupNorm statistics and the temporal downsampling are per chunk — so the latents of a long video are *not* those of
one pass over all frames, and a chunk of ``T`` frames gives ``ceil(T / 2)`` after each time-compressing level
(``F = 1 + 8k`` -> ``1 + 2k`` latent frames with the release's 4x). The first chunk is traced once, the remaining
equal chunks run under one ``lax.scan``. ``F == 1`` (the image-to-video use) is one chunk of one frame.

Not implemented: diffusers' ``tiled_encode`` (``enable_tiling``; the pipelines encode one 480x720-ish image, below
any tile threshold that matters here). ``enable_slicing`` gives the same numbers as the plain batch.

Notes on the reference:

* ``quant_conv`` is declared by diffusers with ``2 * out_channels`` (the *decoder's* output channels, 3) channels,
  not ``2 * latent_channels``; it therefore only runs where the two agree (no release uses it). We declare it the
  same way (the key map checks it against the file) and :func:`encode` refuses a mismatch with a ValueError, where
  diffusers fails inside the convolution.
* The resnets' GroupNorms use the config's ``norm_eps``; ``norm_out`` has 1e-6 hard-coded; the final activation is
  always SiLU (the resnets use ``act_fn``).
* Downsampled sizes are ``floor(H / 2)`` per level (pad 1 bottom/right, kernel 3, stride 2): any H, W is accepted.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_cogvideox import (
    TORCH_RENAMES,
    CogVideoXCausalConv3d,
    CogVideoXMidBlock3D,
    CogVideoXResnetBlock3D,
    CogVideoXVAEConfig,
)
from xdit_jax.models.vae_layers import Conv, GroupNorm

# diffusers' ``AutoencoderKLCogVideoX.num_sample_frames_batch_size``.
SAMPLE_FRAMES_PER_CHUNK = 8
# Torch keys of a VAE checkpoint that carry nothing the encoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.", r"^post_quant_conv\.")
# diffusers' ``DiagonalGaussianDistribution`` clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def _compress_time(x: jax.Array) -> jax.Array:
    """``CogVideoXDownsample3D``'s temporal half: average frame pairs (``avg_pool1d(2, 2)``), an odd first frame
    kept alone. ``T`` frames -> ``ceil(T / 2)``; the pair sums in float32."""
    t = x.shape[1]
    first, rest = (x[:, :1], x[:, 1:]) if t % 2 else (None, x)
    parts = [] if first is None else [first]
    if rest.shape[1]:
        r = rest.astype(jnp.float32)
        parts.append(((r[:, 0::2] + r[:, 1::2]) * 0.5).astype(x.dtype))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class CogVideoXDownsample3D(nnx.Module):
    """Optionally halve time (:func:`_compress_time`), then per frame a zero row / column at the bottom / right
    and a 3x3 stride-2 conv (torch's ``Conv2d(padding=0)`` after ``F.pad(x, (0, 1, 0, 1))``)."""

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool, *, dtype=jnp.float32):
        self.conv = Conv(in_channels, out_channels, (3, 3), dtype=dtype)  # params only; strided below
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            x = _compress_time(x)
        n, t, h, w, c = x.shape
        kernel = self.conv.kernel[...]
        y = jax.lax.conv_general_dilated(x.reshape(n * t, h, w, c).astype(kernel.dtype), kernel, (2, 2),
                                         ((0, 1), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.conv.bias[...]
        return y.reshape((n, t) + y.shape[1:])


class CogVideoXDownBlock3D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, groups: int, act_fn: str,
                 eps: float, add_downsample: bool, compress_time: bool, dtype=jnp.float32):
        self.resnets = nnx.List([
            CogVideoXResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                                   zq_channels=None, act_fn=act_fn, eps=eps, dtype=dtype)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([CogVideoXDownsample3D(out_channels, out_channels, compress_time, dtype=dtype)])
                             if add_downsample else None)

    def __call__(self, x, cache=None):
        cache = cache or {}
        new = {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, None, cache.get(f"resnet_{i}"))
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x, new


class CogVideoXEncoder3D(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype=jnp.float32):
        if any(t != "CogVideoXDownBlock3D" for t in cfg.down_block_types):
            raise ValueError(f"unsupported down_block_types {cfg.down_block_types}")
        if len(cfg.down_block_types) != len(cfg.block_out_channels):
            raise ValueError("down_block_types and block_out_channels must have the same length")
        ch = cfg.block_out_channels
        groups, act, eps = cfg.norm_num_groups, cfg.act_fn, cfg.norm_eps
        self.conv_in = CogVideoXCausalConv3d(cfg.in_channels, ch[0], 3, dtype=dtype)
        blocks = []
        out_ch = ch[0]
        for i in range(len(cfg.down_block_types)):
            prev, out_ch = out_ch, ch[i]
            blocks.append(CogVideoXDownBlock3D(
                prev, out_ch, cfg.layers_per_block, groups=groups, act_fn=act, eps=eps,
                add_downsample=i != len(ch) - 1, compress_time=i < cfg.temporal_compress_level, dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = CogVideoXMidBlock3D(ch[-1], 2, groups=groups, zq_channels=None, act_fn=act, eps=eps,
                                             dtype=dtype)
        self.norm_out = GroupNorm(groups, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = CogVideoXCausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype)

    def __call__(self, x: jax.Array, cache=None):
        """One chunk: frames (N, T, H, W, C_in) -> (moments (N, T', H', W', 2 * C_latent), cache)."""
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = block(h, cache.get(f"down_block_{i}"))
        h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block"))
        h = jax.nn.silu(self.norm_out(h))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class CogVideoXEncoder(nnx.Module):
    """The encode half of ``AutoencoderKLCogVideoX``: ``encoder`` and ``quant_conv`` (if used)."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.encoder = CogVideoXEncoder3D(cfg, dtype=dtype)
        # As diffusers declares it: 2 * out_channels (see the module docstring).
        self.quant_conv = (Conv(2 * cfg.out_channels, 2 * cfg.out_channels, (1, 1, 1), dtype=dtype)
                           if cfg.use_quant_conv else None)

    def encode_chunk(self, x: jax.Array, cache=None):
        """One chunk of frames (N, T, H, W, C_in) -> (moments channels-last, carried cache)."""
        h, cache = self.encoder(x.astype(self.dtype), cache)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h, cache


# ----------------------------------------------------------------------------------------------
# Public API


def _chunks(frames: int, frame_batch_size: int) -> tuple[int, int]:
    """diffusers' ``_encode`` split: (first chunk's length, number of further chunks of ``frame_batch_size``)."""
    num = max(frames // frame_batch_size, 1)
    return min(frames, frame_batch_size + frames % frame_batch_size), num - 1


def latent_frames(cfg: CogVideoXVAEConfig, frames: int, frame_batch_size: int = SAMPLE_FRAMES_PER_CHUNK) -> int:
    """Latent frames :func:`encode` returns for ``frames`` frames (per chunk ``ceil(T / 2)`` per level)."""

    def per_chunk(t):
        for _ in range(cfg.temporal_compress_level):
            t = (t + 1) // 2
        return t

    first, rest = _chunks(frames, frame_batch_size)
    return per_chunk(first) + rest * per_chunk(frame_batch_size)


def encode(model: CogVideoXEncoder, video: jax.Array, *,
           frame_batch_size: int = SAMPLE_FRAMES_PER_CHUNK) -> tuple[jax.Array, jax.Array]:
    """diffusers' ``vae.encode(video).latent_dist``: video (B, C_in, F, H, W) in [-1, 1] -> ``(mean, logvar)``,
    each (B, C_latent, F', H / 8, W / 8) float32 (F' = :func:`latent_frames`; sizes floored per level), ``logvar``
    clamped to [-30, 20] as ``DiagonalGaussianDistribution`` does. Not scaled by ``scaling_factor``.

    Computes in the model's dtype (its parameters'; GroupNorm statistics in float32). Any ``F``: diffusers'
    chunked loop exactly (see the module docstring); ``F == 1`` is an image. Pure and jittable
    (:data:`jit_encode`)."""
    cfg = model.config
    if video.ndim != 5 or video.shape[1] != cfg.in_channels:
        raise ValueError(f"encode takes (batch, {cfg.in_channels}, frames, height, width); got {tuple(video.shape)}.")
    if cfg.use_quant_conv and cfg.out_channels != cfg.latent_channels:
        raise ValueError(f"use_quant_conv: diffusers' quant_conv has 2 * out_channels = {2 * cfg.out_channels} "
                         f"channels but the encoder gives 2 * latent_channels = {2 * cfg.latent_channels}; "
                         "diffusers cannot encode with this config either.")
    x = jnp.transpose(video, (0, 2, 3, 4, 1)).astype(model.dtype)
    n, t = x.shape[:2]
    first_len, num_rest = _chunks(t, frame_batch_size)
    h, cache = model.encode_chunk(x[:, :first_len])
    if num_rest:
        rest = x[:, first_len:]
        rest = rest.reshape((n, num_rest, frame_batch_size) + rest.shape[2:]).swapaxes(0, 1)
        graphdef, state = nnx.split(model)

        def step(carry, xc):
            y, carry = nnx.merge(graphdef, state).encode_chunk(xc, carry)
            return carry, y

        _, ys = jax.lax.scan(step, cache, rest)  # (chunks, N, T', H', W', 2C)
        ys = ys.swapaxes(0, 1)
        h = jnp.concatenate([h, ys.reshape((n, -1) + ys.shape[3:]).astype(h.dtype)], axis=1)
    moments = jnp.transpose(h, (0, 4, 1, 2, 3)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


jit_encode = nnx.jit(encode, static_argnames=("frame_batch_size",))


def sample(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """``DiagonalGaussianDistribution.sample``: ``mean + exp(0.5 * logvar) * noise`` (``noise`` standard normal,
    of ``mean``'s shape; diffusers draws it with ``randn_tensor(generator)``)."""
    return mean + jnp.exp(0.5 * logvar) * noise


def module_fn(cfg: CogVideoXVAEConfig, dtype=jnp.float32):
    return lambda: CogVideoXEncoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: CogVideoXVAEConfig, dtype=None) -> dict:
    """The encoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder; the decoder's
    tensors are ignored. ``dtype``: cast to it (None keeps float32). Raises ``CheckpointError`` on missing,
    unexpected or misshaped tensors."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint (encoder)")


def build(cfg: CogVideoXVAEConfig, params: Mapping, dtype=jnp.float32) -> CogVideoXEncoder:
    """The encoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)
