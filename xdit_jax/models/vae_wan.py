"""The decoder of diffusers' ``AutoencoderKLWan`` (Wan 2.1, and Wan 2.2's residual variant) in Flax
NNX (decode only).

Submodules carry diffusers' attribute names, so :func:`xdit_jax.keymap.map_state_dict` derives the
key map (``decoder.up_blocks.0.resnets.1.conv1.weight`` -> ``...conv1.kernel``, RMS norms keep
their ``gamma`` in torch's ``(C, 1, 1[, 1])`` shape); the one rename is the upsampler's 2-D conv,
``resample.1`` in torch (the index 0 of that ``nn.Sequential`` is the parameterless upsampling).
The encoder's and ``quant_conv``'s tensors are in :data:`TORCH_IGNORE`.

Layout: channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes and returns diffusers'
``(B, C, T, H, W)``.

The network, as diffusers builds it (``WanDecoder3d``), checked against its source:

* ``post_quant_conv`` (1x1x1), ``conv_in`` (3x3x3), ``mid_block`` (resnet, attention, resnet),
  ``up_blocks``, ``norm_out`` + SiLU, ``conv_out``. Widths ``dim * [dim_mult[-1]] +
  dim_mult[::-1]`` with ``dim = decoder_base_dim or base_dim``.
* ``WanCausalConv3d``: zeros in front in time (``k_t - 1`` frames), 'same' zero padding in space.
* ``WanRMS_norm``: ``F.normalize`` over the channels of each pixel (``x / max(|x|, 1e-12)``, in
  float32 for low-precision inputs) times ``sqrt(C) * gamma``. No statistic spans pixels or frames.
* ``WanResidualBlock``: norm-SiLU-conv-norm-SiLU-conv plus the input (through a 1x1x1
  ``conv_shortcut`` where the width changes).
* ``WanAttentionBlock``: per frame, one head over the ``H*W`` pixels (RMS norm, 1x1 ``to_qkv``,
  softmax attention, 1x1 ``proj``, residual).
* ``WanUpBlock`` (Wan 2.1): ``num_res_blocks + 1`` resnets, then a ``WanResample``: nearest 2x in
  space and a 3x3 conv to half the width; in ``upsample3d`` mode first a causal (3, 1, 1)
  ``time_conv`` to twice the channels, whose two halves become two consecutive frames.
* ``WanResidualUpBlock`` (Wan 2.2, ``is_residual``): the same resnets and resample (to the full
  width) plus a parameterless ``DupUp3D`` shortcut of the block's input (channel-repeat and
  depth-to-space). Wan 2.2's ``patch_size`` is undone at the end (``unpatchify``).

diffusers decodes one latent frame at a time and carries, per causal convolution, the last two
frames of its input (``CACHE_T = 2``) into the next call. Every statistic is per pixel or per
frame, so that loop is exactly one causal convolution over the whole frame stream — zeros before
the first frame — *except* at the temporal upsampling, whose first call is special: diffusers
marks its cache ``"Rep"`` and passes frame 0 through without the ``time_conv`` (one frame out, not
two), and the next call convolves with zeros in front, so frame 0 never enters the time
convolution. Here that is: frame 0 is kept as it is, the ``time_conv`` runs on frames ``1..`` as a
stream of its own (zeros before frame 1), and each of its outputs becomes two frames: ``T`` frames
become ``2T - 1`` (``T`` latent frames, ``4T - 3`` video frames for Wan's two temporal stages).
(Wan 2.2's ``DupUp3D`` shortcut drops the first copy of frame 0 likewise, diffusers'
``first_chunk``.) So by default the whole latent video is decoded in **one pass** (every layer
traced once, all frames in parallel, the plane split over the mesh); ``frame_chunk=k`` instead
decodes ``k`` latent frames per step of a ``lax.scan`` (the first step: frame 0 and the
``(T - 1) % k`` extra frames) carrying each causal convolution's last two input frames, exactly
diffusers' loop for ``k = 1`` — the same video with the activations of ``k`` latent frames alive
instead of all, at the price of a sequential loop.

Spatial sharding (``decode(..., mesh=...)``): the convolutions pad through ``conv_halo`` (halo rows
and columns from the neighbours, zeros at the image border; time is never split), the RMS norms are
per pixel (local), and the mid-block attention takes its keys and values through
``gather_plane`` (all-gathered over the grid, padding cropped) as ``vae_kl``'s attention does. The
module never calls a collective itself.

Tiling is diffusers' Wan ``enable_tiling`` (tile and stride in output pixels, 256 / 192 by
default, :class:`WanTilingConfig`), mapped onto :class:`xdit_jax.parallel.vae.TilePlan`; the clamp
to [-1, 1] comes after the blend, as in diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import FromConfigDict
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_kl import attention
from xdit_jax.models.vae_layers import Conv
from xdit_jax.parallel import vae as spatial
from xdit_jax.parallel.vae import TilePlan

# Torch keys of a VAE checkpoint that carry nothing the decoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.", r"^quant_conv\.")
# The upsampler's conv is index 1 of torch's ``nn.Sequential(WanUpsample, nn.Conv2d)``.
TORCH_RENAMES: tuple[tuple[str, str], ...] = ((r"\.resample\.(weight|bias)$", r".resample.1.\1"),)

# Frames of the past every causal 3x3x3 convolution reads (diffusers' ``CACHE_T``).
CACHE_T = 2
# ``F.normalize``'s default eps.
NORM_EPS = 1e-12

# ``AutoencoderKLWan``'s defaults for the per-channel latent statistics (its __init__ arguments; the
# Wan 2.1 checkpoints' config.json carries its own latents_std).
_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                 -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(FromConfigDict):
    """``vae/config.json`` of a Wan pipeline (the ``AutoencoderKLWan`` arguments)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # the encoder's only
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] | None = _LATENTS_MEAN
    latents_std: tuple[float, ...] | None = _LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        n = len(self.dim_mult)
        if n < 1 or len(self.temperal_downsample) != n - 1:
            raise ValueError(f"temperal_downsample {self.temperal_downsample} needs one entry per downsampling "
                             f"({n - 1} for dim_mult {self.dim_mult})")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.out_channels % self.patch ** 2:
            raise ValueError(f"out_channels {self.out_channels} is not a multiple of patch_size^2 ({self.patch ** 2})")
        dims = self.decoder_dims
        if not self.is_residual:
            for i in range(1, n):
                if dims[i] % 2:
                    raise ValueError(f"decoder width {dims[i]} must be even (its upsampler halves it)")
        else:
            for i in range(n - 1):
                factor = (2 if self.temperal_upsample[i] else 1) * 4
                if dims[i + 1] * factor % dims[i]:
                    raise ValueError(f"DupUp3D: {dims[i + 1]} * {factor} channels is not a multiple of {dims[i]}")
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != self.spatial_compression_ratio:
            raise ValueError(f"scale_factor_spatial {self.scale_factor_spatial} does not match the decoder's "
                             f"{self.spatial_compression_ratio}x (2^{n - 1} upsamplings, patch_size {self.patch})")
        if self.scale_factor_temporal is not None and self.scale_factor_temporal != self.temporal_compression_ratio:
            raise ValueError(f"scale_factor_temporal {self.scale_factor_temporal} does not match the decoder's "
                             f"{self.temporal_compression_ratio}x (temperal_downsample {self.temperal_downsample})")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"{name} has {len(v)} entries for {self.z_dim} latent channels")

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        dim = self.decoder_base_dim or self.base_dim
        return tuple(dim * u for u in (self.dim_mult[-1],) + tuple(self.dim_mult[::-1]))

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(self.temperal_downsample[::-1])

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent along height and width (patch included; diffusers' ``scale_factor_spatial``)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_compression_ratio(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_upsample)

    def num_frames(self, latent_frames: int) -> int:
        """Frames :func:`decode` returns for ``latent_frames``: each temporal upsampling makes ``2T - 1``
        frames of ``T`` (frame 0 stays single), so ``(T - 1) * r + 1``."""
        return (latent_frames - 1) * self.temporal_compression_ratio + 1 if latent_frames > 0 else 0


# ----------------------------------------------------------------------------------------------
# Layers (channels-last). Every ``__call__`` that holds causal convolutions takes and returns a
# ``cache``: a dict (pytree) of the last CACHE_T input frames of each such convolution (None: the
# stream starts here, zeros before it).


def _conv(x, kernel, bias, padding):
    """VALID-after-padding N-D convolution, channels-last; spatial halos through ``conv_halo``."""
    nd = kernel.ndim - 2
    dims = "DHW"[-nd:]
    x, padding = spatial.conv_halo(x, padding)
    y = jax.lax.conv_general_dilated(x, kernel, (1,) * nd, padding,
                                     dimension_numbers=("N" + dims + "C", dims + "IO", "N" + dims + "C"))
    return y + bias


class WanCausalConv3d(nnx.Module):
    """``WanCausalConv3d``: ``k_t - 1`` frames of the past in front in time (the carried frames of
    the previous chunk, or zeros at the start of the stream), 'same' zero padding in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3, 3), *, dtype=jnp.float32):
        kt, kh, kw = kernel_size
        self.kernel = nnx.Param(jnp.zeros((kt, kh, kw, in_channels, out_channels), dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))
        self.context = kt - 1
        self.spatial_padding = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        """``x`` (N, T, H, W, C) -> ``(y, cache)``: ``y`` (N, T, H, W, C_out); ``cache`` the last
        ``k_t - 1`` frames of the stream so far (zeros where it is shorter), None for ``k_t = 1``."""
        kernel = self.kernel[...]
        x = x.astype(kernel.dtype)
        k = self.context
        if k == 0:
            return _conv(x, kernel, self.bias[...], ((0, 0),) + self.spatial_padding), None
        front = cache.astype(x.dtype) if cache is not None else jnp.zeros(x.shape[:1] + (k,) + x.shape[2:], x.dtype)
        new_cache = jnp.concatenate([front, x], axis=1)[:, -k:]
        if cache is None:  # zeros in front: the convolution's own padding
            y = _conv(x, kernel, self.bias[...], ((k, 0),) + self.spatial_padding)
        else:
            y = _conv(jnp.concatenate([front, x], axis=1), kernel, self.bias[...], ((0, 0),) + self.spatial_padding)
        return y, new_cache


class WanRMSNorm(nnx.Module):
    """``WanRMS_norm`` (no bias, as the decoder builds it): ``x / max(|x|, eps) * sqrt(C) * gamma``
    over the channels of each pixel; the normalisation in float32 for low-precision inputs."""

    def __init__(self, dim: int, images: bool = False, *, dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.ones((dim,) + (1,) * (2 if images else 3), dtype))  # torch's shape
        self.scale = float(dim ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = (xf / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)
        gamma = self.gamma[...]
        return y * jnp.asarray(self.scale, x.dtype) * gamma.reshape(-1).astype(x.dtype)


class WanResidualBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32):
        self.norm1 = WanRMSNorm(in_dim, dtype=dtype)
        self.conv1 = WanCausalConv3d(in_dim, out_dim, dtype=dtype)
        self.norm2 = WanRMSNorm(out_dim, dtype=dtype)
        self.conv2 = WanCausalConv3d(out_dim, out_dim, dtype=dtype)
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, (1, 1, 1), dtype=dtype) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache=None):
        cache = cache or {}
        h = self.conv_shortcut(x)[0] if self.conv_shortcut is not None else x
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), cache.get("conv1"))
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), cache.get("conv2"))
        return y + h.astype(y.dtype), {"conv1": c1, "conv2": c2}


class WanAttentionBlock(nnx.Module):
    """One-head self-attention over the pixels of each frame; keys and values from the whole plane
    (``gather_plane``)."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.norm = WanRMSNorm(dim, images=True, dtype=dtype)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), dtype=dtype)
        self.proj = Conv(dim, dim, (1, 1), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(n * t, h, w, c))
        q = qkv[..., :c].reshape(n * t, h * w, c)
        kv = spatial.gather_plane(qkv[..., c:])  # under a spatial shard: every pixel's, padding cropped
        kv = kv.reshape(n * t, -1, 2 * c)
        o = attention(q, kv[..., :c], kv[..., c:], c ** -0.5).reshape(n * t, h, w, c)
        return self.proj(o).reshape(x.shape).astype(x.dtype) + x


class WanMidBlock(nnx.Module):
    """``WanMidBlock(num_layers=1)``: resnet, attention, resnet."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.resnets = nnx.List([WanResidualBlock(dim, dim, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([WanAttentionBlock(dim, dtype=dtype)])

    def __call__(self, x: jax.Array, cache=None):
        cache = cache or {}
        x, c0 = self.resnets[0](x, cache.get("resnet_0"))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, cache.get("resnet_1"))
        return x, {"resnet_0": c0, "resnet_1": c1}


class WanResample(nnx.Module):
    """``WanResample`` in an upsampling mode: (``upsample3d``: the causal ``time_conv`` doubling the
    frames) then nearest 2x in space and a 3x3 conv per frame (torch's ``resample.1``)."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None, *, dtype=jnp.float32):
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"WanResample: the decoder only upsamples, got mode {mode!r}")
        out = dim // 2 if upsample_out_dim is None else upsample_out_dim
        self.resample = Conv(dim, out, (3, 3), ((1, 1), (1, 1)), dtype=dtype)
        self.time_conv = WanCausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype) if mode == "upsample3d" else None

    def _time_upsample(self, x: jax.Array, cache, first: bool):
        """Frames ``T`` -> ``2T`` (``2T - 1`` for the first chunk: its frame 0 stays single and out of
        the ``time_conv``'s stream, diffusers' ``"Rep"`` cache)."""
        head = None
        if first:
            head, x, cache = x[:, :1], x[:, 1:], None
        if x.shape[1] == 0:  # a first chunk of one frame: nothing enters the stream yet
            z = jnp.zeros(head.shape[:1] + (CACHE_T,) + head.shape[2:], self.time_conv.kernel[...].dtype)
            return head, z
        y, new = self.time_conv(x, cache)
        n, t, h, w, c2 = y.shape
        # channel a*C + c of frame t becomes channel c of frame 2t + a (diffusers' reshape + stack)
        y = y.reshape(n, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(n, 2 * t, h, w, c2 // 2)
        if head is not None:
            y = jnp.concatenate([head.astype(y.dtype), y], axis=1)
        return y, new

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        new = None
        if self.time_conv is not None:
            x, new = self._time_upsample(x, cache, first)
        n, t, h, w, c = x.shape
        # WanUpsample (nearest-exact, 2x): every pixel repeated; exact in any dtype
        x = jnp.repeat(jnp.repeat(x.reshape(n * t, h, w, c), 2, axis=1), 2, axis=2)
        y = self.resample(x)
        return y.reshape((n, t) + y.shape[1:]), new


class WanUpBlock(nnx.Module):
    """Wan 2.1's up block: ``num_res_blocks + 1`` resnets, then the upsampler (if any)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 dtype=jnp.float32):
        self.resnets = nnx.List([WanResidualBlock(in_dim if i == 0 else out_dim, out_dim, dtype=dtype)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = (nnx.List([WanResample(out_dim, upsample_mode, dtype=dtype)])
                           if upsample_mode is not None else None)

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        cache = cache or {}
        new = {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, cache.get(f"resnet_{i}"))
        if self.upsamplers is not None:
            x, new["upsampler"] = self.upsamplers[0](x, cache.get("upsampler"), first)
        return x, new


def dup_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int, first: bool) -> jax.Array:
    """diffusers' ``DupUp3D`` on channels-last ``x``: every channel repeated, then channel
    ``o*f + a*fs*fs + b*fs + d`` (``f = ft*fs*fs``) becomes channel ``o`` of frame ``t*ft + a``,
    row ``y*fs + b``, column ``x*fs + d``; a first chunk drops its first ``ft - 1`` frames."""
    n, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    x = jnp.repeat(x, out_dim * factor // c, axis=-1)
    x = x.reshape(n, t, h, w, out_dim, factor_t, factor_s, factor_s).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(n, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1:] if first else x


class WanResidualUpBlock(nnx.Module):
    """Wan 2.2's up block: resnets, the upsampler to ``out_dim``, plus the ``DupUp3D`` shortcut of
    the block's input (``avg_shortcut``, no parameters)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_upsample: bool, up_flag: bool, *,
                 dtype=jnp.float32):
        self.resnets = nnx.List([WanResidualBlock(in_dim if i == 0 else out_dim, out_dim, dtype=dtype)
                                 for i in range(num_res_blocks + 1)])
        mode = "upsample3d" if temperal_upsample else "upsample2d"
        self.upsampler = WanResample(out_dim, mode, upsample_out_dim=out_dim, dtype=dtype) if up_flag else None
        self.out_dim = out_dim
        self.factor_t = 2 if temperal_upsample else 1

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        cache = cache or {}
        new = {}
        x_in = x
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, cache.get(f"resnet_{i}"))
        if self.upsampler is not None:
            x, new["upsampler"] = self.upsampler(x, cache.get("upsampler"), first)
            x = x + dup_up(x_in, self.out_dim, self.factor_t, 2, first).astype(x.dtype)
        return x, new


class WanDecoder3d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32):
        dims = cfg.decoder_dims
        n = len(cfg.dim_mult)
        self.conv_in = WanCausalConv3d(cfg.z_dim, dims[0], dtype=dtype)
        self.mid_block = WanMidBlock(dims[0], dtype=dtype)
        blocks = []
        for i in range(n):
            in_dim, out_dim = dims[i], dims[i + 1]
            up_flag = i != n - 1
            temporal = bool(cfg.temperal_upsample[i]) if up_flag else False
            if cfg.is_residual:
                blocks.append(WanResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, up_flag, dtype=dtype))
            else:
                mode = None if not up_flag else ("upsample3d" if temporal else "upsample2d")
                blocks.append(WanUpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, cfg.num_res_blocks, mode,
                                         dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype)
        self.conv_out = WanCausalConv3d(dims[-1], cfg.out_channels, dtype=dtype)

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        """One chunk of latent frames (N, T, H, W, z_dim) -> (frames (N, T', H', W', C_out), cache)."""
        cache = cache or {}
        new = {}
        x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        x, new["mid_block"] = self.mid_block(x, cache.get("mid_block"))
        for i, block in enumerate(self.up_blocks):
            x, new[f"up_block_{i}"] = block(x, cache.get(f"up_block_{i}"), first)
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
        return x, new


class WanVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLWan``: ``post_quant_conv`` and ``decoder``."""

    def __init__(self, cfg: WanVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.post_quant_conv = WanCausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), dtype=dtype)
        self.decoder = WanDecoder3d(cfg, dtype=dtype)

    def decode_chunk(self, z: jax.Array, cache=None, first: bool = True):
        """Latent frames (N, T, H, W, z_dim) -> (frames channels-last, still patched, not clamped; cache).
        ``first``: the chunk starts the video (frame 0's special case); ``cache``: the previous chunk's."""
        x, _ = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(x, cache, first)

    def __call__(self, z: jax.Array) -> jax.Array:
        """The whole latent video (N, T, H, W, z_dim) in one pass -> frames channels-last (still patched,
        not clamped)."""
        return self.decode_chunk(z)[0]


# ----------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class WanTilingConfig:
    """diffusers' ``AutoencoderKLWan.enable_tiling`` arguments, in output pixels: tiles of
    ``tile_sample_min_*`` pixels starting every ``tile_sample_stride_*`` pixels."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def plan(self, spatial_ratio: int, patch_size: int = 1) -> TilePlan:
        """The integers of diffusers' Wan ``tiled_decode``: latent tile and stride (floor divisions by
        the spatial ratio), and — in the decoder's output pixels, i.e. before Wan 2.2's unpatchify —
        the blend extent ``min/p - stride/p`` and the kept size ``stride/p``."""
        th, tw = self.tile_sample_min_height, self.tile_sample_min_width
        sh, sw = self.tile_sample_stride_height, self.tile_sample_stride_width
        p = patch_size
        return TilePlan(tile_latent=(th // spatial_ratio, tw // spatial_ratio),
                        stride=(sh // spatial_ratio, sw // spatial_ratio),
                        blend_extent=(th // p - sh // p, tw // p - sw // p) if p > 1 else (th - sh, tw - sw),
                        row_limit=(sh // p, sw // p))


def default_tiling(cfg: WanVAEConfig) -> WanTilingConfig:
    """diffusers' ``enable_tiling()`` defaults for Wan: 256-pixel tiles every 192 pixels."""
    return WanTilingConfig()


def decode(model: WanVAEDecoder, z: jax.Array, *, frame_chunk: int | None = None,
           tiling: WanTilingConfig | bool | None = None, slicing: bool = False, mesh=None,
           grid: tuple[int, int] | None = None, strategy: str = "shard_map") -> jax.Array:
    """``vae.decode(z).sample`` of diffusers: latents (B, z_dim, T, H, W), already unscaled (see
    :func:`unscale_latents`), -> frames (B, C_out, (T-1)*4 + 1, H*s, W*s) clamped to [-1, 1]
    (:func:`decoded_shape`).

    Computes in the model's dtype (its parameters' dtype) and returns that dtype. Pure and
    jittable (:data:`jit_decode`). Options (all static), composed as diffusers does
    (:func:`xdit_jax.parallel.vae.decode`):

    * ``frame_chunk``: None (default) decodes all frames in one pass; ``k`` decodes ``k`` latent
      frames per ``lax.scan`` step with the causal convolutions' frames carried (the same video,
      less memory; ``k = 1`` is diffusers' own loop).
    * ``slicing``: one batch element at a time (diffusers' ``enable_slicing``); same numbers.
    * ``tiling``: diffusers' ``enable_tiling`` — True for its defaults (:func:`default_tiling`), or
      a :class:`WanTilingConfig` (any object with ``plan(spatial_ratio) -> TilePlan`` works for an
      unpatched VAE). Used only when the latent exceeds a tile, as in diffusers; the output then
      equals diffusers' *tiled* decode.
    * ``mesh``: split height (and width where the height is too small) over all its devices
      (``grid`` and ``strategy`` go to :func:`xdit_jax.parallel.vae.sharded_decode`); equals the
      one-device decode. With tiling, each tile is split over the mesh.
    """
    cfg = model.config
    if tiling is True:
        tiling = default_tiling(cfg)
    plan = None
    if tiling:
        ratio = cfg.scale_factor_spatial or cfg.spatial_compression_ratio
        plan = tiling.plan(ratio, cfg.patch) if isinstance(tiling, WanTilingConfig) else tiling.plan(ratio)
    fn = functools.partial(_decode_plain, frame_chunk=frame_chunk)
    out = spatial.decode(fn, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid, strategy=strategy)
    h, w = z.shape[-2:]
    s = cfg.spatial_compression_ratio // cfg.patch
    out = unpatchify(out[..., : h * s, : w * s], cfg.patch)  # diffusers' tiled_decode crops; else a no-op
    return jnp.clip(out, -1.0, 1.0)


def _decode_plain(model: WanVAEDecoder, z: jax.Array, *, frame_chunk: int | None = None) -> jax.Array:
    """One device (or one shard or tile), no tiling: NCTHW latents -> NCTHW frames (patched, unclamped)."""
    x = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(model.dtype)
    y = model(x) if frame_chunk is None else _chunked(model, x, frame_chunk)
    return jnp.transpose(y, (0, 4, 1, 2, 3))


def _chunked(model: WanVAEDecoder, x: jax.Array, k: int) -> jax.Array:
    """diffusers' frame loop, ``k`` latent frames at a time: the first chunk (frame 0 and the
    ``(T - 1) % k`` extra frames) traced once, the rest under one ``lax.scan`` carrying the caches."""
    if k < 1:
        raise ValueError(f"frame_chunk must be >= 1, got {k}")
    n, t = x.shape[:2]
    first_len = 1 + (t - 1) % k
    y0, cache = model.decode_chunk(x[:, :first_len])
    num = (t - first_len) // k
    if num == 0:
        return y0
    rest = x[:, first_len:].reshape((n, num, k) + x.shape[2:]).swapaxes(0, 1)
    graphdef, state = nnx.split(model)

    def step(carry, zc):
        y, carry = nnx.merge(graphdef, state).decode_chunk(zc, carry, first=False)
        return carry, y

    _, ys = jax.lax.scan(step, cache, rest)  # (chunks, N, T', H', W', C)
    ys = ys.swapaxes(0, 1)
    return jnp.concatenate([y0, ys.reshape((n, -1) + ys.shape[3:])], axis=1)


jit_decode = nnx.jit(decode, static_argnames=("frame_chunk", "tiling", "slicing", "mesh", "grid", "strategy"))


def unpatchify(x: jax.Array, patch_size: int) -> jax.Array:
    """diffusers' ``unpatchify`` (Wan 2.2): (B, C*p*p, T, H, W) -> (B, C, T, H*p, W*p); channel
    ``c*p*p + i*p + j`` becomes row offset ``j``, column offset ``i``."""
    if patch_size == 1:
        return x
    b, cp, t, h, w = x.shape
    p = patch_size
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).transpose(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


def unscale_latents(cfg: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, C, T, H, W) -> the VAE's input, as diffusers' Wan pipeline writes it:
    ``latents / (1 / latents_std) + latents_mean`` (per channel; unchanged without statistics)."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return latents
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape)
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape)
    return (latents.astype(jnp.float32) / inv_std + mean).astype(latents.dtype)


def module_fn(cfg: WanVAEConfig, dtype=jnp.float32):
    return lambda: WanVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: WanVAEConfig, dtype=None) -> dict:
    """The decoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder.

    ``dtype``: cast to it (None keeps float32). The encoder's and ``quant_conv``'s tensors are
    ignored. Raises ``CheckpointError`` on missing, unexpected or misshaped tensors.
    """
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint")


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: WanVAEConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_wan_encoder`, image-to-video),
    which conversion saves next to the decoder's; empty for a checkpoint without encoder tensors."""
    if not any(k.startswith("encoder.") for k in flat):
        return {}
    from xdit_jax.models import vae_wan_encoder

    return {"encoder_params": vae_wan_encoder.params_from_torch(flat, cfg, dtype)}


def build(cfg: WanVAEConfig, params: Mapping, dtype=jnp.float32) -> WanVAEDecoder:
    """The decoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: WanVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of :func:`decode` for latents of shape (B, z_dim, T, H, W)."""
    b, _, t, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.out_channels // cfg.patch ** 2, cfg.num_frames(t), h * s, w * s)

