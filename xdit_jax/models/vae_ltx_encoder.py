"""The encoder of diffusers' ``AutoencoderKLLTXVideo`` (``LTXVideoEncoder3d``) in Flax NNX: image-to-video's
first frame. Channels-last inside; :func:`encode` takes diffusers' ``(B, 3, T, H, W)`` in [-1, 1].

As diffusers builds it (0.42.1): the pixels patchified by ``patch_size`` (channel ``c p^2 + a p + b`` from pixel
``(y p + b, x p + a)``, diffusers' "weird patching order"), ``conv_in``, the down blocks — ``LTXVideoDownBlock3D``
(0.9.0: resnets, a causal conv of stride 2 in time and space, a resnet to the next width) or
``LTXVideo095DownBlock3D`` (0.9.5+: resnets, then a stride-2 conv or ``LTXVideoDownsampler3d``: space-to-depth by
the stride, a conv to ``out / prod(stride)`` channels, plus the space-to-depth of the input averaged over channel
groups) — the mid block, RMS norm, SiLU, ``conv_out`` to ``latent_channels + 1`` channels: the mean and one
log-variance channel shared by every latent channel. The causal convolutions and resnets are the decoder's
(:mod:`xdit_jax.models.vae_ltx`); the encoder is causal by default (``encoder_causal``).

The encode runs on one device (replicated): image-to-video encodes one frame.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.ltx import rms
from xdit_jax.models.vae_ltx import NORM_EPS, CausalConv3d, LTXVAEConfig, MidBlock3d, ResnetBlock3d

TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.", r"^latents_(mean|std)$")


class StridedConv(nnx.Module):
    """torch ``nn.Conv3d`` (zero padding ``(0, 1, 1)``, stride ``stride``) on channels-last input."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], *, dtype):
        self.kernel = nnx.Param(jnp.zeros((3, 3, 3, cin, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype))
        self.stride = tuple(stride)

    def __call__(self, x):
        kernel = self.kernel[...]
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, self.stride, ((0, 0), (1, 1), (1, 1)),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...]


class StridedCausalConv3d(nnx.Module):
    """``LTXVideoCausalConv3d(kernel_size=3, stride=(2, 2, 2))``."""

    def __init__(self, cin: int, cout: int, *, causal: bool, dtype):
        self.causal = causal
        self.conv = StridedConv(cin, cout, (2, 2, 2), dtype=dtype)

    def __call__(self, x):
        if self.causal:
            x = jnp.concatenate([x[:, :1], x[:, :1], x], axis=1)
        else:
            x = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
        return self.conv(x)


def space_to_depth(x, st: int, sh: int, sw: int):
    """(N, T, H, W, C) -> (N, T/st, H/sh, W/sw, C st sh sw), diffusers' channel order (c, st, sh, sw)."""
    n, t, h, w, c = x.shape
    x = x.reshape(n, t // st, st, h // sh, sh, w // sw, sw, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(n, t // st, h // sh, w // sw, c * st * sh * sw)


class Downsampler3d(nnx.Module):
    """``LTXVideoDownsampler3d``."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], *, causal: bool, dtype):
        self.stride = stride
        k = int(np.prod(stride))
        self.group_size = cin * k // cout
        self.conv = CausalConv3d(cin, cout // k, causal=causal, dtype=dtype)

    def __call__(self, x):
        st, sh, sw = self.stride
        x = jnp.concatenate([x[:, :st - 1], x], axis=1)
        r = space_to_depth(x, st, sh, sw)
        r = r.reshape(r.shape[:-1] + (-1, self.group_size)).mean(axis=-1)
        return space_to_depth(self.conv(x), st, sh, sw) + r


_STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}


class DownBlock3D(nnx.Module):
    """``LTXVideoDownBlock3D`` (``v095=False``) / ``LTXVideo095DownBlock3D``."""

    def __init__(self, cin: int, cout: int, layers: int, *, eps, scale: bool, causal: bool, v095: bool,
                 downsample_type: str, dtype):
        kw = dict(eps=eps, causal=causal, inject_noise=False, timestep=False, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock3d(cin, cin, **kw) for _ in range(layers)])
        down = None
        if scale:
            if not v095 or downsample_type == "conv":
                down = StridedCausalConv3d(cin, cin, causal=causal, dtype=dtype)
            elif downsample_type in _STRIDES:
                down = Downsampler3d(cin, cout, _STRIDES[downsample_type], causal=causal, dtype=dtype)
            else:
                raise ValueError(f"Unknown LTX-Video downsample_type {downsample_type!r} (conv, spatial, temporal, "
                                 "spatiotemporal).")
        self.downsamplers = nnx.List([down]) if down is not None else None
        self.conv_out = ResnetBlock3d(cin, cout, **kw) if (not v095 and cin != cout) else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                x = d(x)
        if self.conv_out is not None:
            x = self.conv_out(x)
        return x


class Encoder3d(nnx.Module):
    """``LTXVideoEncoder3d``."""

    def __init__(self, cfg: LTXVAEConfig, *, dtype, rngs):
        if cfg.patch_size_t != 1:
            raise ValueError("Only patch_size_t=1 LTX-Video VAEs are supported.")
        self.patch_size = cfg.patch_size
        ch, causal, eps = cfg.block_out_channels, cfg.encoder_causal, cfg.resnet_norm_eps
        v095 = cfg.down_block_types[-1] == "LTXVideo095DownBlock3D"
        for t in cfg.down_block_types:
            if t not in ("LTXVideoDownBlock3D", "LTXVideo095DownBlock3D"):
                raise ValueError(f"Unknown LTX-Video down block type {t!r}.")
        out = ch[0]
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, out, causal=causal, dtype=dtype)
        n = len(ch) - (1 if v095 else 0)
        blocks = []
        for i in range(n):
            cin = out
            out = ch[i + 1] if (v095 or i + 1 < n) else ch[i]
            blocks.append(DownBlock3D(cin, out, cfg.layers_per_block[i], eps=eps,
                                      scale=cfg.spatio_temporal_scaling[i], causal=causal,
                                      v095=cfg.down_block_types[i] == "LTXVideo095DownBlock3D",
                                      downsample_type=cfg.downsample_type[i], dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock3d(out, cfg.layers_per_block[-1], eps=eps, causal=causal, inject_noise=False,
                                    timestep=False, dtype=dtype, rngs=rngs)
        self.conv_out = CausalConv3d(out, cfg.latent_channels + 1, causal=causal, dtype=dtype)

    def __call__(self, x):
        """Pixels (N, T, H, W, 3) -> (mean, logvar) each (N, T', H / s, W / s, latent_channels)."""
        p = self.patch_size
        n, t, h, w, c = x.shape
        x = x.reshape(n, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)  # (.., c, a: column, b: row)
        x = self.conv_in(x.reshape(n, t, h // p, w // p, c * p * p))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = self.conv_out(jax.nn.silu(rms(x, NORM_EPS)))
        mean, logvar = x[..., :-1], jnp.broadcast_to(x[..., -1:], x[..., :-1].shape)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution's clamp


class LTXVAEEncoder(nnx.Module):
    def __init__(self, cfg: LTXVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config, self.dtype = cfg, dtype
        self.encoder = Encoder3d(cfg, dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, x):
        return self.encoder(x.astype(self.dtype))


def encode(model: LTXVAEEncoder, x: jax.Array):
    """Video (B, 3, T, H, W) in [-1, 1] -> the posterior's (mean, logvar), each (B, C, T', H / s, W / s)
    (diffusers' ``encode(x).latent_dist.mean`` / ``.logvar``); not normalized."""
    mean, logvar = model(jnp.transpose(x, (0, 2, 3, 4, 1)))
    return tuple(jnp.transpose(a, (0, 4, 1, 2, 3)) for a in (mean, logvar))


def module_fn(cfg: LTXVAEConfig, dtype=jnp.float32):
    return lambda: LTXVAEEncoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: LTXVAEConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(module_fn(cfg, dtype or jnp.float32)), ignore=TORCH_IGNORE,
                          dtype=dtype, what="LTX-Video VAE encoder")


def build(cfg: LTXVAEConfig, params: Mapping, dtype=jnp.float32) -> LTXVAEEncoder:
    return build_module(module_fn(cfg, dtype), params)
