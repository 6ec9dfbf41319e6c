"""The decoder of diffusers' ``AutoencoderKLHunyuanVideo15`` (HunyuanVideo-1.5) in Flax NNX (decode only).

Submodules carry diffusers' names, so :func:`xdit_jax.keymap.map_state_dict` derives the key map; the encoder's
tensors are :mod:`xdit_jax.models.vae_hunyuan_video15_encoder`'s (:func:`extra_params_from_torch`: conversion saves
them beside the decoder's). Channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes
and returns diffusers' ``(B, C, T, H, W)``.

The network (``HunyuanVideo15Decoder3D``), checked against diffusers' source; the pieces whose math another VAE
here already has are reused:

* ``HunyuanVideo15CausalConv3d``: replicate padding (``k - 1`` first frames in front, ``k // 2`` edge rows /
  columns each side) then a VALID conv: 1.0's :class:`vae_hunyuan_video.HunyuanVideoCausalConv3d` (its child
  ``conv``); the halo comes from the neighbouring devices under a spatially split decode.
* ``HunyuanVideo15RMS_norm``: ``F.normalize`` over the channels times ``sqrt(C) * gamma`` (gamma ``(C, 1, 1, 1)``)
  — Wan's :class:`vae_wan.WanRMSNorm`; per pixel, so nothing to share across devices.
* ``conv_in`` (causal) plus the latents' channels repeated (``repeat_interleave``) up to the widest block, the mid
  block (resnet, attention, resnet), the up blocks, ``norm_out`` + SiLU + ``conv_out``.
* The resnet: norm - SiLU - conv - norm - SiLU - conv plus the input (a plain 1x1x1 ``conv_shortcut`` where the
  width changes).
* The attention: RMS norm, 1x1x1 ``to_q`` / ``to_k`` / ``to_v``, one head of the full width over every token of
  every frame, a token seeing its own and earlier frames (``prepare_causal_attention_mask``), ``proj_out``,
  residual: 1.0's causal frame attention (keys and values of the whole image plane, ``gather_plane``).
* ``HunyuanVideo15Upsample``: a causal conv to ``factor x`` the output width, then DC-AE's depth-to-space
  (channels ``(r1, r2, r3, c)`` -> time, height, width), plus a parameterless shortcut of the input (its channels
  repeated, the same depth-to-space). With temporal upsampling the first frame is upsampled in space only (its
  first half of channels kept; its shortcut repeated half as often), the others in time and space:
  T frames -> ``1 + 2 (T - 1)``. Block ``i`` upsamples in space if ``i < log2(spatial_compression_ratio)`` and
  in time if ``i < log2(temporal_compression_ratio)``. The release: 16x in space, 4x in time.

Decode: the image plane split over the mesh (:func:`xdit_jax.parallel.vae.sharded_decode`: the depth-to-space
is per pixel, the convolutions fetch their halo). diffusers' ``enable_tiling`` (off by default, as in its T2V
pipeline): spatial tiles of 256 pixels overlapping by a quarter, every frame of a tile at once, blended as diffusers'
``tiled_decode`` (:class:`HunyuanVideo15TilingConfig`); each tile split over the mesh in turn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import FromConfigDict
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_hunyuan_video import CausalFrameAttention, HunyuanVideoCausalConv3d
from xdit_jax.models.vae_layers import Conv
from xdit_jax.models.vae_wan import WanRMSNorm
from xdit_jax.parallel import vae as spatial

TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.",)


@dataclasses.dataclass(frozen=True)
class HunyuanVideo15VAEConfig(FromConfigDict):
    """``vae/config.json`` of a HunyuanVideo-1.5 pipeline (the ``AutoencoderKLHunyuanVideo15`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    scaling_factor: float = 1.03682

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        s, t = self.spatial_compression_ratio, self.temporal_compression_ratio
        if s < 1 or s & (s - 1) or t < 1 or t & (t - 1):
            raise ValueError(f"spatial_compression_ratio {s} and temporal_compression_ratio {t} must be powers of 2")
        if self.n_spatial > len(self.block_out_channels) - 1 or self.n_temporal > self.n_spatial:
            raise ValueError(f"block_out_channels {self.block_out_channels}: the decoder upsamples in all but its last "
                             f"block, {self.n_spatial} times in space and {self.n_temporal} in time")
        ch = self.decoder_channels
        if ch[0] % self.latent_channels:
            raise ValueError(f"the widest block {ch[0]} must be a multiple of latent_channels {self.latent_channels}")
        for i, (_, up_t) in enumerate(self.upsamples()):
            if up_t is None:
                continue
            cin, cout = ch[i], self.upsample_out(i)
            factor = 8 if up_t else 4
            if (factor * cout) % cin or cin % factor or (up_t and (factor * cout // cin) % 2):
                raise ValueError(f"up block {i}: {cin} -> {cout} channels cannot be upsampled by DC-AE's "
                                 f"depth-to-space (factor {factor})")

    @property
    def n_spatial(self) -> int:
        return int(np.log2(self.spatial_compression_ratio))

    @property
    def n_temporal(self) -> int:
        return int(np.log2(self.temporal_compression_ratio))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(reversed(self.block_out_channels))

    def upsamples(self) -> tuple[tuple[int, bool | None], ...]:
        """Per up block: (its width, None (no upsampler) / False (space) / True (time and space))."""
        out = []
        for i, c in enumerate(self.decoder_channels):
            sp, tm = i < self.n_spatial, i < self.n_temporal
            out.append((c, tm if (sp or tm) else None))
        return tuple(out)

    def upsample_out(self, i: int) -> int:
        ch = self.decoder_channels
        return ch[i + 1] if self.upsample_match_channel else ch[i]

    def num_frames(self, latent_frames: int) -> int:
        t = latent_frames
        for _, up_t in self.upsamples():
            if up_t:
                t = 1 + 2 * (t - 1)
        return t


def _rms(c: int, dtype):
    return WanRMSNorm(c, images=False, dtype=dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dtype=jnp.float32):
        self.norm1 = _rms(cin, dtype)
        self.conv1 = HunyuanVideoCausalConv3d(cin, cout, 3, dtype=dtype)
        self.norm2 = _rms(cout, dtype)
        self.conv2 = HunyuanVideoCausalConv3d(cout, cout, 3, dtype=dtype)
        self.conv_shortcut = Conv(cin, cout, (1, 1, 1), dtype=dtype) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class AttnBlock(CausalFrameAttention):
    """``HunyuanVideo15AttnBlock``: 1.0's causal frame attention (scale ``C ** -0.5``, softmax in float32) under an
    RMS norm instead of a GroupNorm, its 1x1x1 projections as ``Conv`` s (``to_q``, ``to_k``, ``to_v``,
    ``proj_out``)."""

    def __init__(self, c: int, *, dtype=jnp.float32):
        self.norm = _rms(c, dtype)
        self.to_q, self.to_k, self.to_v, self.proj_out = (Conv(c, c, (1, 1, 1), dtype=dtype) for _ in range(4))
        self.scale = c ** -0.5

    def group_norm(self, x):  # the hook CausalFrameAttention normalises through
        return self.norm(x)

    @property
    def to_out(self):
        return (self.proj_out,)


class MidBlock(nnx.Module):
    def __init__(self, c: int, *, dtype=jnp.float32):
        self.resnets = nnx.List([ResnetBlock(c, c, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([AttnBlock(c, dtype=dtype)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def depth_to_space(x, r1: int, r2: int, r3: int):
    """diffusers' ``_dcae_upsample_rearrange`` channels-last: (N, T, H, W, r1 r2 r3 c) -> (N, T r1, H r2, W r3, c)."""
    n, t, h, w, p = x.shape
    c = p // (r1 * r2 * r3)
    x = x.reshape(n, t, h, w, r1, r2, r3, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, t * r1, h * r2, w * r3, c)


class Upsample(nnx.Module):
    def __init__(self, cin: int, cout: int, temporal: bool, *, dtype=jnp.float32):
        self.temporal = temporal
        factor = 8 if temporal else 4
        self.conv = HunyuanVideoCausalConv3d(cin, cout * factor, 3, dtype=dtype)
        self.repeats = factor * cout // cin

    def __call__(self, x):
        h = self.conv(x)
        rep = lambda y, n: jnp.repeat(y, n, axis=-1)  # noqa: E731  (torch's repeat_interleave on channels)
        if not self.temporal:
            return depth_to_space(h, 1, 2, 2) + depth_to_space(rep(x, self.repeats), 1, 2, 2)
        h_first = depth_to_space(h[:, :1], 1, 2, 2)
        h_first = h_first[..., : h_first.shape[-1] // 2]
        x_first = rep(depth_to_space(x[:, :1], 1, 2, 2), self.repeats // 2)
        if x.shape[1] == 1:
            return h_first + x_first
        h_next = depth_to_space(h[:, 1:], 2, 2, 2)
        x_next = rep(depth_to_space(x[:, 1:], 2, 2, 2), self.repeats)
        return jnp.concatenate([h_first, h_next], axis=1) + jnp.concatenate([x_first, x_next], axis=1)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, up: tuple[int, bool] | None, *, dtype=jnp.float32):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, dtype=dtype) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample(cout, up[0], up[1], dtype=dtype)]) if up is not None else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder3D(nnx.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig, *, dtype=jnp.float32):
        ch = cfg.decoder_channels
        self.repeat = ch[0] // cfg.latent_channels
        self.conv_in = HunyuanVideoCausalConv3d(cfg.latent_channels, ch[0], 3, dtype=dtype)
        self.mid_block = MidBlock(ch[0], dtype=dtype)
        blocks, cin = [], ch[0]
        for i, (c, up_t) in enumerate(cfg.upsamples()):
            up = None if up_t is None else (cfg.upsample_out(i), up_t)
            blocks.append(UpBlock(cin, c, cfg.layers_per_block + 1, up, dtype=dtype))
            cin = c if up is None else up[0]
        self.up_blocks = nnx.List(blocks)
        self.norm_out = _rms(ch[-1], dtype)
        self.conv_out = HunyuanVideoCausalConv3d(ch[-1], cfg.out_channels, 3, dtype=dtype)

    def __call__(self, z):
        x = self.conv_in(z) + jnp.repeat(z, self.repeat, axis=-1)
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class HunyuanVideo15VAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLHunyuanVideo15`` (``decoder``; no post-quant conv)."""

    def __init__(self, cfg: HunyuanVideo15VAEConfig, *, dtype=jnp.float32):
        self.config, self.dtype = cfg, dtype
        self.decoder = Decoder3D(cfg, dtype=dtype)

    def __call__(self, z):
        """Latents channels-last (N, T, h, w, C_latent) -> frames channels-last (N, T', H, W, C_out)."""
        return self.decoder(z.astype(self.dtype))


def _decode_plain(model: HunyuanVideo15VAEDecoder, z):
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 4, 1))), (0, 4, 1, 2, 3))


@dataclasses.dataclass(frozen=True)
class HunyuanVideo15TilingConfig:
    """diffusers' ``AutoencoderKLHunyuanVideo15.enable_tiling`` arguments (its defaults): spatial tiles of
    ``tile_latent_min_*`` latents (None: ``tile_sample_min_* // ratio``) decoding to ``tile_sample_min_*`` pixels,
    overlapping by ``tile_overlap_factor`` (no temporal tiles). (diffusers keeps its latent tile at 256 // ratio when
    only the pixel size is given, which then no longer matches the tiles' pixels; here it follows the pixel size.)"""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_overlap_factor: float = 0.25
    tile_latent_min_height: int | None = None
    tile_latent_min_width: int | None = None

    def plan(self, spatial_ratio: int) -> spatial.TilePlan:
        """The integers of diffusers' ``tiled_decode``: latent tiles, a latent stride of ``int(tile * (1 -
        overlap))``, ``int(min * overlap)`` pixels blended, ``min - blend`` kept."""
        th, tw, f = self.tile_sample_min_height, self.tile_sample_min_width, self.tile_overlap_factor
        lh = self.tile_latent_min_height or th // spatial_ratio
        lw = self.tile_latent_min_width or tw // spatial_ratio
        bh, bw = int(th * f), int(tw * f)
        return spatial.TilePlan(tile_latent=(lh, lw), stride=(int(lh * (1 - f)), int(lw * (1 - f))),
                                blend_extent=(bh, bw), row_limit=(th - bh, tw - bw))


def default_tiling(cfg: HunyuanVideo15VAEConfig) -> HunyuanVideo15TilingConfig:
    """diffusers' defaults (``__init__`` and ``enable_tiling()``): 256-pixel tiles overlapping by a quarter."""
    return HunyuanVideo15TilingConfig()


def decode(model: HunyuanVideo15VAEDecoder, z, *, tiling=None, slicing: bool = False, mesh=None, grid=None,
           strategy: str = "shard_map"):
    """``vae.decode(z).sample`` of diffusers: latents (B, C_latent, T, h, w), already unscaled
    (:func:`unscale_latents`) -> frames (B, C_out, num_frames(T), h * s, w * s), the image plane split over ``mesh``
    (equal to the one-device decode). ``tiling``: diffusers' ``enable_tiling`` (True: its defaults, or a
    :class:`HunyuanVideo15TilingConfig`), used where the latent exceeds a tile, as in diffusers; the frames then
    equal diffusers' tiled decode. ``tiling="slices"``: one sample of the batch at a time (the same frames)."""
    if tiling == "slices":
        tiling, slicing = None, True
    sizes = tiling if isinstance(tiling, HunyuanVideo15TilingConfig) else default_tiling(model.config)
    plan = sizes.plan(model.config.spatial_compression_ratio) if tiling else None
    return spatial.decode(_decode_plain, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid,
                          strategy=strategy)


jit_decode = nnx.jit(decode, static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))


def unscale_latents(cfg: HunyuanVideo15VAEConfig, latents):
    """diffusers' pipeline: ``latents / scaling_factor`` before ``vae.decode``."""
    return latents / cfg.scaling_factor


def module_fn(cfg: HunyuanVideo15VAEConfig, dtype=jnp.float32):
    return lambda: HunyuanVideo15VAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideo15VAEConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(module_fn(cfg, dtype or jnp.float32)), ignore=TORCH_IGNORE,
                          dtype=dtype, what="HunyuanVideo-1.5 VAE checkpoint")


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideo15VAEConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_hunyuan_video15_encoder`,
    image-to-video), which conversion saves next to the decoder's; empty without encoder tensors."""
    if not any(k.startswith("encoder.") for k in flat):
        return {}
    from xdit_jax.models import vae_hunyuan_video15_encoder

    return {"encoder_params": vae_hunyuan_video15_encoder.params_from_torch(flat, cfg, dtype)}


def build(cfg: HunyuanVideo15VAEConfig, params: Mapping, dtype=jnp.float32) -> HunyuanVideo15VAEDecoder:
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: HunyuanVideo15VAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    b, _, t, h, w = latent_shape
    s = math.prod(2 for _ in range(cfg.n_spatial))
    return (b, cfg.out_channels, cfg.num_frames(t), h * s, w * s)
