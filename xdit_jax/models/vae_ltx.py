"""The decoder of diffusers' ``AutoencoderKLLTXVideo`` (LTX-Video 0.9.0 - 0.9.x) in Flax NNX.

Submodules carry diffusers' names, so :func:`xdit_jax.keymap.map_state_dict` derives the key map; the
encoder's tensors are ignored here (:mod:`xdit_jax.models.vae_ltx_encoder` for image-to-video). Layout:
channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes and returns diffusers' ``(B, C, T, H, W)``.

The network (``LTXVideoDecoder3d``), checked against diffusers 0.42.1's source:

* ``LTXVideoCausalConv3d``: the time axis padded by repeating the first frame ``k - 1`` times in front
  (``decoder_causal``; else ``(k - 1) // 2`` copies of the first / last frame each side), height and width
  zero-padded by ``k // 2`` (through :class:`xdit_jax.models.vae_layers.Conv`: under a spatially sharded
  decode the halo rows come from the neighbouring devices), stride 1.
* ``LTXVideoResnetBlock3d``: RMS norm over channels (eps 1e-8, no weight), with timestep conditioning
  modulated by its ``scale_shift_table`` (4, C) + the block's time embedding (shift, scale twice), SiLU,
  conv, (``inject_noise``: a spatial N(0, 1) plane times ``per_channel_scale``), norm, SiLU, conv; the
  shortcut LayerNorm + 1x1x1 conv where the width changes.
* ``LTXVideoUpsampler3d``: a conv to ``C * 8 / upscale_factor`` channels, depth-to-space by (2, 2, 2), the
  first frame dropped; ``upsample_residual``: plus the input's depth-to-space, tiled over the channels.
* ``LTXVideoMidBlock3d`` / ``LTXVideoUpBlock3d``: (conv_in resnet where the width changes,) the upsampler,
  resnets; each block with timestep conditioning embeds the (scaled) timestep itself (PixArt's
  ``PixArtAlphaCombinedTimestepSizeEmbeddings`` to 4 x its width).
* ``norm_out`` (RMS), the timestep modulation (``scale_shift_table`` (2, C)), SiLU, ``conv_out`` to
  ``3 * p * p`` channels, unpatchified by ``patch_size`` (4): channel ``c p^2 + a p + b`` -> pixel
  ``(y p + b, x p + a)``.

The decode timestep (0.9.1+: ``timestep_conditioning``) is multiplied by ``timestep_scale_multiplier``.
``latents_mean`` / ``latents_std`` (buffers of the checkpoint) are parameters here: :func:`denormalize`.

Noise injection (``decoder_inject_noise``, LTX-Video 0.9.1's decoder) draws its planes from a JAX key: the
same distribution as diffusers' torch generator, not the same numbers. It is generated for the whole image
plane, so a decode over a mesh then lets XLA partition the decoder (``strategy="gspmd"``) instead of the
explicit halos. Tiling is diffusers' ``enable_tiling`` spatial tiling (512-pixel tiles every 448), not its
framewise temporal tiling.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import FromConfigDict
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import LayerNorm
from xdit_jax.models.ltx import rms
from xdit_jax.models.pixart import PixArtAlphaCombinedTimestepSizeEmbeddings
from xdit_jax.models.vae_layers import Conv
from xdit_jax.models.vae_mochi import MochiTilingConfig
from xdit_jax.parallel import vae as spatial

TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.",)
NORM_EPS = 1e-8  # the RMS norms of the VAE


@dataclasses.dataclass(frozen=True)
class LTXVAEConfig(FromConfigDict):
    """``vae/config.json`` of an LTX-Video pipeline (the ``AutoencoderKLLTXVideo`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: tuple[str, ...] = ("LTXVideoDownBlock3D",) * 4
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
    decoder_layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
    spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
    decoder_spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
    decoder_inject_noise: tuple[bool, ...] = (False, False, False, False, False)
    downsample_type: tuple[str, ...] = ("conv", "conv", "conv", "conv")
    upsample_residual: tuple[bool, ...] = (False, False, False, False)
    upsample_factor: tuple[int, ...] = (1, 1, 1, 1)
    timestep_conditioning: bool = False
    patch_size: int = 4
    patch_size_t: int = 1
    resnet_norm_eps: float = 1e-6
    scaling_factor: float = 1.0
    encoder_causal: bool = True
    decoder_causal: bool = False
    spatial_compression_ratio: int | None = None
    temporal_compression_ratio: int | None = None

    def __post_init__(self):
        n = len(self.decoder_block_out_channels)
        if len(self.decoder_layers_per_block) != n + 1 or len(self.decoder_spatio_temporal_scaling) != n:
            raise ValueError(f"decoder_layers_per_block {self.decoder_layers_per_block} needs {n + 1} entries and "
                             f"decoder_spatio_temporal_scaling {self.decoder_spatio_temporal_scaling} {n} (one per "
                             f"decoder block of {self.decoder_block_out_channels}).")
        if len(self.decoder_inject_noise) < n + 1 or len(self.upsample_residual) < n or len(self.upsample_factor) < n:
            raise ValueError("decoder_inject_noise needs an entry per decoder block + 1, upsample_residual and "
                             "upsample_factor one per decoder block.")
        if self.patch_size_t != 1:
            raise ValueError(f"patch_size_t={self.patch_size_t}: only 1 (every LTX-Video VAE) is supported.")

    @property
    def spatial_ratio(self) -> int:
        if self.spatial_compression_ratio is not None:
            return int(self.spatial_compression_ratio)
        return self.patch_size * 2 ** sum(bool(s) for s in self.spatio_temporal_scaling)

    @property
    def temporal_ratio(self) -> int:
        if self.temporal_compression_ratio is not None:
            return int(self.temporal_compression_ratio)
        return self.patch_size_t * 2 ** sum(bool(s) for s in self.spatio_temporal_scaling)

    @property
    def injects_noise(self) -> bool:
        return any(self.decoder_inject_noise)

    def num_frames(self, latent_frames: int) -> int:
        """Frames :func:`decode` returns for ``latent_frames``: ``(T - 1) * r + 1``."""
        return (latent_frames - 1) * self.temporal_ratio + 1


def _shim(dim: int):
    return types.SimpleNamespace(inner_dim=dim, additional_conditions=False)


class CausalConv3d(nnx.Module):
    """``LTXVideoCausalConv3d`` (stride 1): its one parameterised child is ``conv``."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, causal: bool, dtype):
        self.k, self.causal = k, causal
        self.conv = Conv(cin, cout, (k, k, k), ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), dtype=dtype)

    def __call__(self, x):
        k = self.k
        if k > 1:
            if self.causal:
                x = jnp.concatenate([jnp.repeat(x[:, :1], k - 1, axis=1), x], axis=1)
            else:
                p = (k - 1) // 2
                x = jnp.concatenate([jnp.repeat(x[:, :1], p, axis=1), x, jnp.repeat(x[:, -1:], p, axis=1)], axis=1)
        return self.conv(x)


class ResnetBlock3d(nnx.Module):
    """``LTXVideoResnetBlock3d``."""

    def __init__(self, cin: int, cout: int, *, eps: float, causal: bool, inject_noise: bool, timestep: bool,
                 dtype):
        self.conv1 = CausalConv3d(cin, cout, causal=causal, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, causal=causal, dtype=dtype)
        self.norm3 = LayerNorm(cin, eps, dtype=dtype) if cin != cout else None
        self.conv_shortcut = CausalConv3d(cin, cout, 1, causal=causal, dtype=dtype) if cin != cout else None
        self.inject_noise = inject_noise
        if inject_noise:
            self.per_channel_scale1 = nnx.Param(jnp.zeros((cin, 1, 1), dtype))
            self.per_channel_scale2 = nnx.Param(jnp.zeros((cin, 1, 1), dtype))
        self.scale_shift_table = nnx.Param(jnp.zeros((4, cin), dtype)) if timestep else None

    def _noise(self, h, scale, key):
        """diffusers: one (H, W) N(0, 1) plane per call, times the (C, 1, 1) per-channel scale, on every frame."""
        plane = jax.random.normal(key, h.shape[2:4], jnp.float32).astype(h.dtype)
        return h + (plane[:, :, None] * scale[...].reshape(1, 1, -1).astype(h.dtype))[None, None]

    def __call__(self, x, temb=None, key=None):
        h = rms(x, NORM_EPS)
        if self.scale_shift_table is not None:
            mod = temb.reshape(temb.shape[0], 4, -1) + self.scale_shift_table[...][None]  # (B, 4, C)
            mod = mod[:, :, None, None, None, :].astype(x.dtype)  # (B, 4, 1, 1, 1, C)
            h = h * (1 + mod[:, 1]) + mod[:, 0]
        h = self.conv1(jax.nn.silu(h))
        if self.inject_noise:
            h = self._noise(h, self.per_channel_scale1, jax.random.fold_in(key, 1))
        h = rms(h, NORM_EPS)
        if self.scale_shift_table is not None:
            h = h * (1 + mod[:, 3]) + mod[:, 2]
        h = self.conv2(jax.nn.silu(h))
        if self.inject_noise:
            h = self._noise(h, self.per_channel_scale2, jax.random.fold_in(key, 2))
        if self.norm3 is not None:
            x = self.norm3(x)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x


def depth_to_space(y, c: int, st: int, sh: int, sw: int):
    """(N, T, H, W, c * st * sh * sw) with diffusers' channel order (c, st, sh, sw) -> (N, T st, H sh, W sw, c)."""
    n, t, h, w, _ = y.shape
    y = y.reshape(n, t, h, w, c, st, sh, sw).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(n, t * st, h * sh, w * sw, c)


class Upsampler3d(nnx.Module):
    """``LTXVideoUpsampler3d`` with stride (2, 2, 2)."""

    def __init__(self, cin: int, *, causal: bool, residual: bool, upscale_factor: int, dtype):
        self.residual, self.factor, self.cin = residual, upscale_factor, cin
        self.conv = CausalConv3d(cin, cin * 8 // upscale_factor, causal=causal, dtype=dtype)

    def __call__(self, x):
        y = self.conv(x)
        y = depth_to_space(y, y.shape[-1] // 8, 2, 2, 2)[:, 1:]
        if self.residual:
            r = depth_to_space(x, x.shape[-1] // 8, 2, 2, 2)[:, 1:]
            y = y + jnp.tile(r, (1, 1, 1, 1, 8 // self.factor))
        return y


class MidBlock3d(nnx.Module):
    def __init__(self, c: int, layers: int, *, eps, causal, inject_noise, timestep, dtype, rngs):
        self.time_embedder = (PixArtAlphaCombinedTimestepSizeEmbeddings(_shim(4 * c), dtype=dtype, rngs=rngs)
                              if timestep else None)
        self.resnets = nnx.List([ResnetBlock3d(c, c, eps=eps, causal=causal, inject_noise=inject_noise,
                                               timestep=timestep, dtype=dtype) for _ in range(layers)])

    def __call__(self, x, t=None, key=None):
        temb = self.time_embedder(t, None, None, x.shape[0]) if self.time_embedder is not None else None
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, None if key is None else jax.random.fold_in(key, i))
        return x


class UpBlock3d(nnx.Module):
    def __init__(self, cin: int, cout: int, layers: int, *, eps, scale: bool, causal, inject_noise, timestep,
                 residual: bool, factor: int, dtype, rngs):
        self.time_embedder = (PixArtAlphaCombinedTimestepSizeEmbeddings(_shim(4 * cin), dtype=dtype, rngs=rngs)
                              if timestep else None)
        self.conv_in = (ResnetBlock3d(cin, cout, eps=eps, causal=causal, inject_noise=inject_noise,
                                      timestep=timestep, dtype=dtype) if cin != cout else None)
        self.upsamplers = (nnx.List([Upsampler3d(cout * factor, causal=causal, residual=residual,
                                                 upscale_factor=factor, dtype=dtype)]) if scale else None)
        self.resnets = nnx.List([ResnetBlock3d(cout, cout, eps=eps, causal=causal, inject_noise=inject_noise,
                                               timestep=timestep, dtype=dtype) for _ in range(layers)])

    def __call__(self, x, t=None, key=None):
        fold = lambda i: None if key is None else jax.random.fold_in(key, i)  # noqa: E731
        if self.conv_in is not None:
            if self.time_embedder is not None:
                raise ValueError("A timestep-conditioned LTX VAE block that changes width is not supported "
                                 "(diffusers feeds it the raw timestep).")
            x = self.conv_in(x, None, fold(1000))
        temb = self.time_embedder(t, None, None, x.shape[0]) if self.time_embedder is not None else None
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, fold(i))
        return x


class Decoder3d(nnx.Module):
    """``LTXVideoDecoder3d``."""

    def __init__(self, cfg: LTXVAEConfig, *, dtype, rngs):
        ch = tuple(reversed(cfg.decoder_block_out_channels))
        scaling = tuple(reversed(cfg.decoder_spatio_temporal_scaling))
        layers = tuple(reversed(cfg.decoder_layers_per_block))
        noise = tuple(reversed(cfg.decoder_inject_noise))
        residual = tuple(reversed(cfg.upsample_residual[:len(ch)]))
        factor = tuple(reversed(cfg.upsample_factor[:len(ch)]))
        causal, eps, ts = cfg.decoder_causal, cfg.resnet_norm_eps, cfg.timestep_conditioning
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.out_channels
        out = ch[0]
        self.conv_in = CausalConv3d(cfg.latent_channels, out, causal=causal, dtype=dtype)
        self.mid_block = MidBlock3d(out, layers[0], eps=eps, causal=causal, inject_noise=noise[0], timestep=ts,
                                    dtype=dtype, rngs=rngs)
        blocks = []
        for i in range(len(ch)):
            cin, out = out // factor[i], ch[i] // factor[i]
            blocks.append(UpBlock3d(cin, out, layers[i + 1], eps=eps, scale=scaling[i], causal=causal,
                                    inject_noise=noise[i + 1], timestep=ts, residual=residual[i], factor=factor[i],
                                    dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.conv_out = CausalConv3d(out, cfg.out_channels * cfg.patch_size ** 2, causal=causal, dtype=dtype)
        if ts:
            self.timestep_scale_multiplier = nnx.Param(jnp.ones((), jnp.float32))
            self.time_embedder = PixArtAlphaCombinedTimestepSizeEmbeddings(_shim(2 * out), dtype=dtype, rngs=rngs)
            self.scale_shift_table = nnx.Param(jnp.zeros((2, out), dtype))
        else:
            self.timestep_scale_multiplier = self.time_embedder = self.scale_shift_table = None

    def __call__(self, z, temb=None, key=None):
        """Latents (N, T, H, W, C_latent) -> frames (N, (T - 1) * r + 1, H * s, W * s, C_out)."""
        fold = lambda i: None if key is None else jax.random.fold_in(key, i)  # noqa: E731
        h = self.conv_in(z)
        if self.timestep_scale_multiplier is not None:
            if temb is None:
                raise ValueError("This LTX-Video VAE is timestep-conditioned (0.9.1+): decode needs a timestep "
                                 "(the pipeline's decode_timestep).")
            temb = jnp.asarray(temb, jnp.float32).reshape(-1) * self.timestep_scale_multiplier[...].astype(
                jnp.float32)
            temb = jnp.broadcast_to(temb, (z.shape[0],))
        h = self.mid_block(h, temb, fold(0))
        for i, block in enumerate(self.up_blocks):
            h = block(h, temb, fold(i + 1))
        h = rms(h, NORM_EPS)
        if self.time_embedder is not None:
            e = self.time_embedder(temb, None, None, z.shape[0]).reshape(z.shape[0], 2, -1)
            e = (e + self.scale_shift_table[...][None])[:, :, None, None, None, :].astype(h.dtype)
            h = h * (1 + e[:, 1]) + e[:, 0]
        h = self.conv_out(jax.nn.silu(h))
        p = self.patch_size
        n, t, hh, ww, _ = h.shape
        c = self.out_channels
        h = h.reshape(n, t, hh, ww, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)  # (.., c, a: column, b: row)
        return h.reshape(n, t, hh * p, ww * p, c)


class LTXVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLLTXVideo``: its ``decoder`` and the latents' per-channel statistics."""

    def __init__(self, cfg: LTXVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = cfg, dtype
        self.decoder = Decoder3d(cfg, dtype=dtype, rngs=rngs)
        self.latents_mean = nnx.Param(jnp.zeros((cfg.latent_channels,), jnp.float32))
        self.latents_std = nnx.Param(jnp.ones((cfg.latent_channels,), jnp.float32))

    def __call__(self, z, temb=None, key=None):
        return self.decoder(z.astype(self.dtype), temb, key)


def default_tiling(cfg: LTXVAEConfig) -> MochiTilingConfig:
    """diffusers' ``AutoencoderKLLTXVideo.enable_tiling()`` defaults: 512-pixel tiles every 448 pixels (the same
    integers as Mochi's spatial tiling)."""
    return MochiTilingConfig(512, 512, 448, 448)


def denormalize(model: LTXVAEDecoder, latents: jax.Array) -> jax.Array:
    """diffusers' ``_denormalize_latents``: ``latents * std / scaling_factor + mean`` per channel (B, C, ...)."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = model.latents_mean[...].astype(latents.dtype).reshape(shape)
    std = model.latents_std[...].astype(latents.dtype).reshape(shape)
    return latents * std / model.config.scaling_factor + mean


def normalize(model: LTXVAEDecoder, latents: jax.Array) -> jax.Array:
    """diffusers' ``_normalize_latents``: ``(latents - mean) * scaling_factor / std`` per channel."""
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean = model.latents_mean[...].astype(latents.dtype).reshape(shape)
    std = model.latents_std[...].astype(latents.dtype).reshape(shape)
    return (latents - mean) * model.config.scaling_factor / std


def decode(model: LTXVAEDecoder, z: jax.Array, temb=None, *, key=None, tiling=None, slicing: bool = False,
           mesh=None, grid: tuple[int, int] | None = None, strategy: str | None = None) -> jax.Array:
    """``vae.decode(z, temb).sample`` of diffusers: latents (B, C_latent, T, H, W), already denormalized, and the
    decode timestep ``temb`` (B,) (timestep-conditioned VAEs) -> frames (B, C_out, (T - 1) r + 1, H s, W s) in the
    model's dtype, not clipped. ``key``: the noise of ``decoder_inject_noise`` (default key 0).

    ``slicing`` / ``tiling`` (True: :func:`default_tiling`) / ``mesh`` (the image plane split over its devices,
    equal to one device) as :func:`xdit_jax.models.vae_mochi.decode`. ``strategy``: the sharded decode's (default
    ``"shard_map"``, ``"gspmd"`` for a noise-injecting decoder).
    """
    cfg = model.config
    if cfg.injects_noise and key is None:
        key = jax.random.key(0)
    if strategy is None:
        strategy = "gspmd" if cfg.injects_noise else "shard_map"
    if tiling is True:
        tiling = default_tiling(cfg)
    s = cfg.spatial_ratio

    def plain(m, zz):
        return jnp.transpose(m(jnp.transpose(zz, (0, 2, 3, 4, 1)), temb, key), (0, 4, 1, 2, 3))

    if temb is not None and slicing:
        raise ValueError("decode: slicing with a decode timestep is not supported; decode without slicing.")
    plan = tiling.plan(s) if tiling else None
    out = spatial.decode(plain, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid, strategy=strategy)
    h, w = z.shape[-2:]
    return out[..., : h * s, : w * s]


def module_fn(cfg: LTXVAEConfig, dtype=jnp.float32):
    return lambda: LTXVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: LTXVAEConfig, dtype=None) -> dict:
    """The decoder's params (and the latents' statistics, kept float32) from a ``vae/`` folder's state dict."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    params = map_state_dict(flat, expected, ignore=TORCH_IGNORE, dtype=dtype, what="LTX-Video VAE checkpoint")
    for name in ("latents_mean", "latents_std"):
        params[name] = np.asarray(flat[name], np.float32)
    return params


def build(cfg: LTXVAEConfig, params: Mapping, dtype=jnp.float32) -> LTXVAEDecoder:
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: LTXVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    b, _, t, h, w = latent_shape
    s = cfg.spatial_ratio
    return (b, cfg.out_channels, cfg.num_frames(t), h * s, w * s)


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: LTXVAEConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_ltx_encoder`, image-to-video),
    which conversion saves next to the decoder's; empty for a checkpoint without encoder tensors."""
    if not any(k.startswith("encoder.") for k in flat):
        return {}
    from xdit_jax.models import vae_ltx_encoder

    return {"encoder_params": vae_ltx_encoder.params_from_torch(flat, cfg, dtype)}
