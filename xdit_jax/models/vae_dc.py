"""The decoder of diffusers' ``AutoencoderDC`` (DC-AE, SANA's 32x deep-compression autoencoder) in Flax NNX
(decode only; the encoder's tensors are ignored on load).

As diffusers builds ``Decoder`` (checked against its source): ``conv_in`` (3x3, latent -> the last block's
width) plus, with ``decoder_in_shortcut``, the latent's channels each repeated ``C / latent_channels`` times;
the up blocks from the last (deepest) to the first, each ``[DCUpBlock2d (all but the last)] + layers`` of
``ResBlock`` or ``EfficientViTBlock``; ``norm_out`` (RMSNorm with bias, eps 1e-5), the ``decoder_conv_act_fn``
(ReLU), ``conv_out`` (3x3; a shortcut-free ``DCUpBlock2d`` when the first block has no layers).

* ``DCUpBlock2d``: a 3x3 conv to 4x the channels and ``pixel_shuffle(2)`` (``upsample_block_type
  "pixel_shuffle"``), or nearest x2 then a 3x3 conv (``"interpolate"``); plus the shortcut: the input's
  channels repeated (``repeat_interleave``) and pixel-shuffled.
* ``ResBlock``: conv3x3 (bias) -> act -> conv3x3 (no bias) -> norm (RMSNorm over channels with bias, or
  BatchNorm2d in eval mode) + input.
* ``EfficientViTBlock``: LiteMLA (``SanaMultiscaleLinearAttention``: bias-free q/k/v linears, for each
  multiscale kernel a depthwise kxk conv and a grouped 1x1 conv (3 x heads groups) of the concatenated
  [q; k; v]; the channels then regrouped in chunks of ``3 x head_dim`` (each chunk's q, k, v), ReLU on q and k,
  linear attention in float32 with diffusers' ``V_pad K^T Q`` association and eps 1e-15 — quadratic
  (``K^T Q`` normalised over the keys) when the plane has no more pixels than ``head_dim`` —, a bias-free
  output linear, the norm, the residual), then ``GLUMBConv`` (expand 4, RMSNorm with bias, residual).

Layout: channels-last inside; :func:`decode` takes and returns diffusers' ``(B, C, H, W)``. Over a mesh the
decode is split spatially with :func:`xdit_jax.parallel.vae.sharded_decode`'s ``"gspmd"`` strategy (XLA
partitions the convolutions and the attention's plane-wide sums; no hooks needed, exact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.parallel import vae as spatial

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
_ACT = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "silu": jax.nn.silu, "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _per_block(v, n: int, name: str) -> tuple:
    out = (v,) * n if isinstance(v, str) else tuple(v)
    if len(out) != n:
        raise ValueError(f"AutoencoderDC {name} must name {n} blocks, got {v!r}.")
    return out


@dataclasses.dataclass(frozen=True)
class AutoencoderDCConfig:
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    decoder_block_types: Any = "ResBlock"
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    decoder_norm_types: Any = "rms_norm"
    decoder_act_fns: Any = "silu"
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self):
        n = len(self.decoder_block_out_channels)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("decoder_block_out_channels", tuple(int(c) for c in self.decoder_block_out_channels))
        set_("decoder_layers_per_block", tuple(int(c) for c in self.decoder_layers_per_block))
        set_("decoder_qkv_multiscales", tuple(tuple(int(k) for k in s) for s in self.decoder_qkv_multiscales))
        set_("decoder_block_types", _per_block(self.decoder_block_types, n, "decoder_block_types"))
        set_("decoder_norm_types", _per_block(self.decoder_norm_types, n, "decoder_norm_types"))
        set_("decoder_act_fns", _per_block(self.decoder_act_fns, n, "decoder_act_fns"))
        if len(self.decoder_layers_per_block) != n or len(self.decoder_qkv_multiscales) != n:
            raise ValueError("AutoencoderDC decoder_layers_per_block and decoder_qkv_multiscales must have one entry "
                             f"per block ({n}).")
        for t in self.decoder_block_types:
            if t not in BLOCK_TYPES:
                raise ValueError(f"AutoencoderDC block type {t!r} is not supported ({BLOCK_TYPES}).")
        for t in self.decoder_norm_types:
            if t not in NORM_TYPES:
                raise ValueError(f"AutoencoderDC norm type {t!r} is not supported ({NORM_TYPES}).")
        for a in self.decoder_act_fns + (self.decoder_conv_act_fn,):
            if a not in _ACT:
                raise ValueError(f"AutoencoderDC activation {a!r} is not supported ({tuple(_ACT)}).")
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            raise ValueError(f"AutoencoderDC upsample_block_type {self.upsample_block_type!r} is not supported "
                             "('pixel_shuffle' or 'interpolate').")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderDCConfig":
        return cls(**known_fields(cls, d))

    @property
    def block_out_channels(self) -> tuple:  # for xdit_jax.pipelines.image.vae_scale_factor
        return self.decoder_block_out_channels

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.decoder_block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# Layers (channels-last)


class Conv2d(nnx.Module):
    """torch ``nn.Conv2d(cin, cout, k, padding=k // 2, groups=g)`` (leaf ``kernel`` (k, k, cin / g, cout))."""

    def __init__(self, cin: int, cout: int, k: int, *, groups: int = 1, bias: bool = True, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((k, k, cin // groups, cout), dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), dtype)) if bias else None
        self.groups, self.pad = groups, k // 2

    def __call__(self, x):
        kernel = self.kernel[...]
        p = self.pad
        y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (1, 1), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return y + self.bias[...] if self.bias is not None else y


class Dense(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool = False, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.dot(x.astype(self.kernel.dtype), self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    """diffusers ``RMSNorm(dim, eps, elementwise_affine=True, bias=True)`` over channels (float32 statistics)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y.astype(x.dtype) * self.scale[...] + self.bias[...]).astype(x.dtype)


class BatchNorm(nnx.Module):
    """``nn.BatchNorm2d`` in eval mode (running statistics; eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.running_mean = nnx.Param(jnp.zeros((dim,), dtype))
        self.running_var = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(self.running_var[...].astype(jnp.float32) + self.eps)
        y = (xf - self.running_mean[...].astype(jnp.float32)) * inv * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _norm(kind: str, dim: int, dtype):
    return RMSNorm(dim, 1e-5, dtype=dtype) if kind == "rms_norm" else BatchNorm(dim, 1e-5, dtype=dtype)


def pixel_shuffle(x, r: int = 2):
    """torch ``F.pixel_shuffle`` on channels-last input: channel ``c * r^2 + i * r + j`` -> pixel (i, j) of c."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


class DCUpBlock2d(nnx.Module):
    def __init__(self, cin: int, cout: int, *, interpolate: bool, shortcut: bool = True, dtype=jnp.float32):
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = cout * 4 // cin
        self.conv = Conv2d(cin, cout if interpolate else cout * 4, 3, dtype=dtype)

    def __call__(self, x):
        if self.interpolate:
            y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        else:
            y = pixel_shuffle(self.conv(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1))
        return y


class ResBlock(nnx.Module):
    def __init__(self, c: int, norm_type: str, act_fn: str, *, dtype=jnp.float32):
        self.act = act_fn
        self.conv1 = Conv2d(c, c, 3, dtype=dtype)
        self.conv2 = Conv2d(c, c, 3, bias=False, dtype=dtype)
        self.norm = _norm(norm_type, c, dtype)

    def __call__(self, x):
        return self.norm(self.conv2(_ACT[self.act](self.conv1(x)))) + x


class MultiscaleProjection(nnx.Module):
    """``SanaMultiscaleAttentionProjection``: depthwise kxk conv, grouped 1x1 conv (both bias-free)."""

    def __init__(self, c: int, heads: int, k: int, *, dtype):
        self.proj_in = Conv2d(c, c, k, groups=c, bias=False, dtype=dtype)
        self.proj_out = Conv2d(c, c, 1, groups=3 * heads, bias=False, dtype=dtype)

    def __call__(self, x):
        return self.proj_out(self.proj_in(x))


class LiteMLA(nnx.Module):
    """``SanaMultiscaleLinearAttention`` (mult 1, residual)."""

    def __init__(self, c: int, head_dim: int, scales: tuple, norm_type: str, *, dtype):
        heads = int(c // head_dim * 1.0)
        inner = heads * head_dim
        self.head_dim, self.eps = head_dim, 1e-15
        self.to_q, self.to_k, self.to_v = (Dense(c, inner, dtype=dtype) for _ in range(3))
        self.to_qkv_multiscale = nnx.List([MultiscaleProjection(3 * inner, heads, k, dtype=dtype) for k in scales])
        self.to_out = Dense(inner * (1 + len(scales)), c, dtype=dtype)
        self.norm_out = _norm(norm_type, c, dtype)

    def __call__(self, x):
        b, h, w, _ = x.shape
        n, hd = h * w, self.head_dim
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        ms = jnp.concatenate([qkv] + [p(qkv) for p in self.to_qkv_multiscale], axis=-1)
        ms = ms.reshape(b, n, -1, 3 * hd)  # chunks of 3 x head_dim channels, as torch's reshape of NCHW
        q, k, v = ms[..., :hd], ms[..., hd:2 * hd], ms[..., 2 * hd:]
        q, k = jax.nn.relu(q), jax.nn.relu(k)
        if n > hd:  # linear attention in float32
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
            kv = jnp.einsum("bngd,bnge->bged", k, v)  # (B, G, Dv, Dk): V K^T
            ksum = jnp.sum(k, axis=1)  # (B, G, Dk)
            num = jnp.einsum("bged,bngd->bnge", kv, q)
            den = jnp.einsum("bgd,bngd->bng", ksum, q)[..., None]
            out = (num / (den + self.eps)).astype(x.dtype)
        else:  # quadratic: K^T Q normalised over the keys
            s = jnp.einsum("bmgd,bngd->bgmn", k, q).astype(jnp.float32)
            s = s / (jnp.sum(s, axis=2, keepdims=True) + self.eps)
            out = jnp.einsum("bmge,bgmn->bnge", v, s.astype(v.dtype))
        out = self.to_out(out.reshape(b, h, w, -1))
        return self.norm_out(out) + x


class GLUMBConv(nnx.Module):
    """diffusers ``GLUMBConv(c, c, expand 4, norm_type="rms_norm")`` with its residual (channels-last)."""

    def __init__(self, c: int, *, dtype):
        hid = 4 * c
        self.conv_inverted = Conv2d(c, 2 * hid, 1, dtype=dtype)
        self.conv_depth = Conv2d(2 * hid, 2 * hid, 3, groups=2 * hid, dtype=dtype)
        self.conv_point = Conv2d(hid, c, 1, bias=False, dtype=dtype)
        self.norm = RMSNorm(c, 1e-5, dtype=dtype)

    def __call__(self, x):
        y = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        y, gate = jnp.split(y, 2, axis=-1)
        return self.norm(self.conv_point(y * jax.nn.silu(gate))) + x


class EfficientViTBlock(nnx.Module):
    def __init__(self, c: int, head_dim: int, scales: tuple, norm_type: str, *, dtype):
        self.attn = LiteMLA(c, head_dim, scales, norm_type, dtype=dtype)
        self.conv_out = GLUMBConv(c, dtype=dtype)

    def __call__(self, x):
        return self.conv_out(self.attn(x))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderDCConfig, *, dtype=jnp.float32):
        ch, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        n = len(ch)
        interp = cfg.upsample_block_type == "interpolate"
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, dtype=dtype)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.repeats = ch[-1] // cfg.latent_channels
        blocks = []
        for i in range(n):
            seq = []
            if i < n - 1 and layers[i] > 0:
                seq.append(DCUpBlock2d(ch[i + 1], ch[i], interpolate=interp, dtype=dtype))
            for _ in range(layers[i]):
                if cfg.decoder_block_types[i] == "ResBlock":
                    seq.append(ResBlock(ch[i], cfg.decoder_norm_types[i], cfg.decoder_act_fns[i], dtype=dtype))
                else:
                    seq.append(EfficientViTBlock(ch[i], cfg.attention_head_dim, cfg.decoder_qkv_multiscales[i],
                                                 cfg.decoder_norm_types[i], dtype=dtype))
            blocks.append(nnx.List(seq))
        self.up_blocks = nnx.List(blocks)
        c0 = ch[0] if layers[0] > 0 else ch[1]
        self.norm_out = RMSNorm(c0, 1e-5, dtype=dtype)
        self.conv_act = cfg.decoder_conv_act_fn
        self.conv_out = (Conv2d(c0, cfg.in_channels, 3, dtype=dtype) if layers[0] > 0 else
                         DCUpBlock2d(c0, cfg.in_channels, interpolate=interp, shortcut=False, dtype=dtype))

    def __call__(self, z):
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + jnp.repeat(z.astype(x.dtype), self.repeats, axis=-1)
        for seq in reversed(self.up_blocks):
            for layer in seq:
                x = layer(x)
        return self.conv_out(_ACT[self.conv_act](self.norm_out(x)))


class AutoencoderDCDecoder(nnx.Module):
    def __init__(self, cfg: AutoencoderDCConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.decoder = Decoder(cfg, dtype=dtype)

    def __call__(self, z):
        """Channels-last latents (B, h, w, C) -> images (B, h*s, w*s, 3)."""
        return self.decoder(z)


def _decode_plain(model: AutoencoderDCDecoder, z):
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 1))), (0, 3, 1, 2))


def decode(model: AutoencoderDCDecoder, z, *, tiling=None, slicing: bool = False, mesh=None, grid=None):
    """diffusers' ``AutoencoderDC.decode(z).sample``: latents (B, C, h, w), already divided by the scaling factor
    -> images (B, 3, 32h, 32w), not clipped. ``mesh``: the plane split over its devices (the ``"gspmd"`` strategy
    of :func:`xdit_jax.parallel.vae.sharded_decode`), equal to one device's decode. ``slicing`` (or ``tiling=
    "slices"``, the pipeline's low-memory fallback): one sample at a time. diffusers' tiled DC-AE decode is not
    implemented: any other ``tiling`` is refused."""
    if tiling not in (None, False, "slices"):
        raise NotImplementedError("Tiled decoding of the DC-AE (AutoencoderDC.enable_tiling) is not implemented; "
                                  "decode over more devices (--mesh) or one sample at a time (slicing) instead.")
    return spatial.decode(_decode_plain, model, z, mesh=mesh, slicing=bool(slicing or tiling == "slices"),
                          grid=grid, strategy="gspmd")


def unscale_latents(cfg: AutoencoderDCConfig, latents):
    """SanaPipeline: ``latents / vae.config.scaling_factor`` before ``vae.decode``."""
    return latents / cfg.scaling_factor


TORCH_IGNORE = [r"^encoder\.", r"\.num_batches_tracked$"]
TORCH_RENAMES: list = []


def module_fn(cfg: AutoencoderDCConfig, dtype=jnp.float32):
    return lambda: AutoencoderDCDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: AutoencoderDCConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(module_fn(cfg, dtype or jnp.float32)), renames=TORCH_RENAMES,
                          ignore=TORCH_IGNORE, dtype=dtype, what="AutoencoderDC checkpoint")


def build(cfg: AutoencoderDCConfig, params: Mapping, dtype=jnp.float32) -> AutoencoderDCDecoder:
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: AutoencoderDCConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    b, _, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.in_channels, h * s, w * s)
