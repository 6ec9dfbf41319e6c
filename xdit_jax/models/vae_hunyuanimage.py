"""The decoder of diffusers' ``AutoencoderKLHunyuanImage`` (HunyuanImage-2.1: 32x in space, 64 latent channels) in
Flax NNX (decode only).

Channels-last ``(N, H, W, C)`` inside; :func:`decode` takes and returns diffusers' ``(B, C, H, W)``. The network
(``HunyuanImageDecoder2D``), checked against diffusers' source; the pieces whose math another VAE here has are
reused:

* ``conv_in`` (3x3, zero padding) plus the latents' channels repeated (``repeat_interleave``) up to the widest block
  (HunyuanVideo-1.5's rule, in 2-D);
* the resnet (GroupNorm(32, eps 1e-6) - SiLU - conv3x3 - GroupNorm - SiLU - conv3x3, plus the input): the SD VAE's
  :class:`vae_kl.ResnetBlock2D`. diffusers' ``HunyuanImageResnetBlock`` applies its ``conv_shortcut`` to the branch,
  not the input, which only runs where the width does not change; a decoder whose resnets would change width
  (``upsample_match_channel`` false with unequal blocks) is refused;
* the mid block (resnet, attention, resnet): :class:`vae_kl.UNetMidBlock2D` with its attention's projections as the
  1x1 convolutions of ``HunyuanImageAttentionBlock`` (``norm``, ``to_q`` / ``to_k`` / ``to_v``, ``proj``; one head of
  the full width over the whole plane, keys and values gathered under a spatially split decode);
* ``HunyuanImageUpsample``: a 3x3 conv to 4x the output width, then DC-AE's depth-to-space (channels ``(r1, r2, c)``
  -> height, width: HunyuanVideo-1.5's :func:`depth_to_space` with one frame), plus the input's channels repeated
  through the same depth-to-space. Like diffusers' ``up_blocks`` (one flat list), each level has
  ``layers_per_block + 1`` resnets, then an upsampler at levels ``i < log2(spatial_compression_ratio)`` but the last;
* ``norm_out`` (GroupNorm 32) + SiLU + ``conv_out``.

Decode: the image plane split over the mesh (:func:`xdit_jax.parallel.vae.sharded_decode`: halos for the
convolutions, global GroupNorm statistics, the attention's keys gathered). diffusers' ``enable_tiling`` (off by
default, as the pipeline): square tiles of ``sample_size`` pixels overlapping by a quarter, blended as its
``tiled_decode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import FromConfigDict
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import vae_kl
from xdit_jax.models.vae_hunyuan_video15 import depth_to_space
from xdit_jax.models.vae_layers import Conv, GroupNorm
from xdit_jax.parallel import vae as spatial

GROUPS = 32  # diffusers' fixed nn.GroupNorm(num_groups=32)
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.",)
# ours -> diffusers': the mid block's attention (vae_kl's names) as HunyuanImageAttentionBlock's
TORCH_RENAMES = [(r"^decoder\.mid_block\.attentions\.(\d+)\.group_norm\.", r"decoder.mid_block.attentions.\1.norm."),
                 (r"^decoder\.mid_block\.attentions\.(\d+)\.to_out\.0\.", r"decoder.mid_block.attentions.\1.proj.")]


@dataclasses.dataclass(frozen=True)
class HunyuanImageVAEConfig(FromConfigDict):
    """``vae/config.json`` of a HunyuanImage-2.1 pipeline (the ``AutoencoderKLHunyuanImage`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 64
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    layers_per_block: int = 2
    spatial_compression_ratio: int = 32
    sample_size: int = 384
    scaling_factor: float | None = 0.75289
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        s = self.spatial_compression_ratio
        if s < 1 or s & (s - 1):
            raise ValueError(f"spatial_compression_ratio {s} must be a power of 2")
        if self.n_up > len(self.block_out_channels) - 1 or 2 ** self.n_up != s:
            raise ValueError(f"block_out_channels {self.block_out_channels}: the decoder upsamples in all but its last "
                             f"block, log2({s}) times")
        ch = self.decoder_channels
        if ch[0] % self.latent_channels:
            raise ValueError(f"the widest block {ch[0]} must be a multiple of latent_channels {self.latent_channels}")
        if any(c % GROUPS for c in ch):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of {GROUPS} "
                             "(the GroupNorms' groups)")
        cin = ch[0]
        for i, c in enumerate(ch):
            if cin != c:
                raise NotImplementedError(
                    f"up block {i}: a resnet from {cin} to {c} channels; diffusers' HunyuanImageResnetBlock cannot "
                    "change width (its conv_shortcut takes the branch), so this decoder does not run there either")
            if self.upsamples(i):
                cout = self.upsample_out(i)
                if (4 * cout) % c:
                    raise ValueError(f"up block {i}: {c} -> {cout} channels cannot be upsampled by depth-to-space")
                cin = cout

    @property
    def n_up(self) -> int:
        return int(np.log2(self.spatial_compression_ratio))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(reversed(self.block_out_channels))

    def upsamples(self, i: int) -> bool:
        return i < self.n_up and i != len(self.block_out_channels) - 1

    def upsample_out(self, i: int) -> int:
        ch = self.decoder_channels
        return ch[i + 1] if self.upsample_match_channel else ch[i]


class AttentionBlock(vae_kl.Attention):
    """``HunyuanImageAttentionBlock``: :class:`vae_kl.Attention` (one head, GroupNorm, residual) with 1x1 conv
    projections (the same math on channels-last pixels)."""

    def __init__(self, c: int, *, dtype=jnp.float32):
        self.group_norm = GroupNorm(GROUPS, c, eps=1e-6, dtype=dtype)
        self.to_q, self.to_k, self.to_v = (Conv(c, c, (1, 1), dtype=dtype) for _ in range(3))
        self.to_out = nnx.List([Conv(c, c, (1, 1), dtype=dtype)])
        self.scale = c ** -0.5


class Upsample(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dtype=jnp.float32):
        self.conv = Conv(cin, 4 * cout, (3, 3), ((1, 1), (1, 1)), dtype=dtype)
        self.repeats = 4 * cout // cin

    def __call__(self, x):
        d2s = lambda y: depth_to_space(y[:, None], 1, 2, 2)[:, 0]  # noqa: E731
        return d2s(self.conv(x)) + d2s(jnp.repeat(x, self.repeats, axis=-1))


class Decoder2D(nnx.Module):
    def __init__(self, cfg: HunyuanImageVAEConfig, *, dtype=jnp.float32):
        ch = cfg.decoder_channels
        self.repeat = ch[0] // cfg.latent_channels
        self.conv_in = Conv(cfg.latent_channels, ch[0], (3, 3), ((1, 1), (1, 1)), dtype=dtype)
        self.mid_block = vae_kl.UNetMidBlock2D(ch[0], groups=GROUPS, act_fn="silu", add_attention=True, dtype=dtype)
        self.mid_block.attentions = nnx.List([AttentionBlock(ch[0], dtype=dtype)])
        blocks, cin = [], ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(vae_kl.ResnetBlock2D(cin, c, groups=GROUPS, act_fn="silu", dtype=dtype))
                cin = c
            if cfg.upsamples(i):
                blocks.append(Upsample(cin, cfg.upsample_out(i), dtype=dtype))
                cin = cfg.upsample_out(i)
        self.up_blocks = nnx.List(blocks)
        self.norm_out = GroupNorm(GROUPS, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = Conv(ch[-1], cfg.out_channels, (3, 3), ((1, 1), (1, 1)), dtype=dtype)

    def __call__(self, z):
        x = self.conv_in(z) + jnp.repeat(z, self.repeat, axis=-1)
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class HunyuanImageVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLHunyuanImage`` (``decoder``; no post-quant conv)."""

    def __init__(self, cfg: HunyuanImageVAEConfig, *, dtype=jnp.float32):
        self.config, self.dtype = cfg, dtype
        self.decoder = Decoder2D(cfg, dtype=dtype)

    def __call__(self, z):
        """Latents channels-last (N, h, w, C_latent) -> images channels-last (N, H, W, C_out)."""
        return self.decoder(z.astype(self.dtype))


def _decode_plain(model: HunyuanImageVAEDecoder, z):
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 1))), (0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class HunyuanImageTilingConfig:
    """diffusers' ``AutoencoderKLHunyuanImage.enable_tiling`` arguments: square tiles of ``tile_sample_min_size``
    pixels (None: the config's ``sample_size``; ``// ratio`` latents) overlapping by ``tile_overlap_factor``."""

    tile_sample_min_size: int | None = None
    tile_overlap_factor: float = 0.25

    def plan(self, cfg: HunyuanImageVAEConfig) -> spatial.TilePlan:
        """The integers of diffusers' ``tiled_decode``: a latent stride of ``int(tile * (1 - overlap))``,
        ``int(min * overlap)`` pixels blended, ``min - blend`` kept."""
        s, f = self.tile_sample_min_size or cfg.sample_size, self.tile_overlap_factor
        tl = s // cfg.spatial_compression_ratio
        b = int(s * f)
        return spatial.TilePlan(tile_latent=(tl, tl), stride=(int(tl * (1 - f)),) * 2, blend_extent=(b, b),
                                row_limit=(s - b, s - b))


def decode(model: HunyuanImageVAEDecoder, z, *, tiling=None, slicing: bool = False, mesh=None, grid=None,
           strategy: str = "shard_map"):
    """``vae.decode(z).sample`` of diffusers: latents (B, C_latent, h, w), already unscaled
    (:func:`unscale_latents`) -> images (B, C_out, h * s, w * s), the image plane split over ``mesh`` (equal to the
    one-device decode). ``tiling``: diffusers' ``enable_tiling`` (True: its defaults, or a
    :class:`HunyuanImageTilingConfig`), used where the latent exceeds a tile, as in diffusers."""
    if tiling == "slices":
        tiling, slicing = None, True
    sizes = tiling if isinstance(tiling, HunyuanImageTilingConfig) else HunyuanImageTilingConfig()
    plan = sizes.plan(model.config) if tiling else None
    return spatial.decode(_decode_plain, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid,
                          strategy=strategy)


jit_decode = nnx.jit(decode, static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))


def unscale_latents(cfg: HunyuanImageVAEConfig, latents):
    """diffusers' pipeline: ``latents / scaling_factor`` before ``vae.decode``."""
    return latents / cfg.scaling_factor


def module_fn(cfg: HunyuanImageVAEConfig, dtype=jnp.float32):
    return lambda: HunyuanImageVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanImageVAEConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(module_fn(cfg, dtype or jnp.float32)), renames=TORCH_RENAMES,
                          ignore=TORCH_IGNORE, dtype=dtype, what="HunyuanImage VAE checkpoint")


def build(cfg: HunyuanImageVAEConfig, params: Mapping, dtype=jnp.float32) -> HunyuanImageVAEDecoder:
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: HunyuanImageVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    b, _, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.out_channels, h * s, w * s)
