"""The decoder of diffusers' ``AutoencoderKLHunyuanVideo`` (HunyuanVideo) in Flax NNX (decode only).

Submodules carry diffusers' attribute names, so :func:`xdit_jax.keymap.map_state_dict` derives the
key map (``decoder.up_blocks.0.resnets.1.conv1.conv.weight`` -> ``...conv1.conv.kernel``,
``decoder.mid_block.attentions.0.to_out.0.weight`` -> ``...to_out.0.kernel``); the encoder's tensors
and ``quant_conv`` are in :data:`TORCH_IGNORE` here; the encoder is
:mod:`xdit_jax.models.vae_hunyuan_video_encoder` (:func:`extra_params_from_torch`: conversion saves its params).

Layout: channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes and returns diffusers'
``(B, C, T, H, W)``.

The network, as diffusers builds it (``HunyuanVideoDecoder3D``), checked against its source:

* ``HunyuanVideoCausalConv3d``: ``F.pad(..., mode="replicate")`` with ``k - 1`` copies of the first
  frame in front (causal) and ``k // 2`` copies of the edge row/column each side, then a VALID
  ``nn.Conv3d`` (its child ``conv``). Kernels are 3 or 1 (the resnet shortcut), so this is exactly
  Mochi's replicate-padded causal convolution (:class:`xdit_jax.models.vae_mochi.ReplicateConv3d`,
  reused).
* ``post_quant_conv`` (a 1x1x1 ``nn.Conv3d``) before the decoder, as ``_decode`` applies it.
* ``conv_in`` (causal, latent channels -> widest block), then the mid block: resnet, attention,
  resnet. The attention is diffusers' ``Attention`` (``_from_deprecated_attn_block``: one head of
  the full width, scale ``C ** -0.5``, GroupNorm (``norm_num_groups``, eps 1e-6) first, residual
  connection) over **all tokens of all frames**, with ``prepare_causal_attention_mask``: a token
  sees every token of its own and of earlier frames (the -inf logits are masked here, the same
  softmax). Softmax in float32 (diffusers' ``upcast_softmax``).
* ``HunyuanVideoResnetBlockCausal3D``: GroupNorm (eps 1e-6) - act - conv - GroupNorm - act - conv,
  plus the input (through a 1x1x1 causal ``conv_shortcut`` when the width changes). GroupNorm
  statistics over time, height, width and the group's channels (one per sample), in float32.
* ``up_blocks[i]``: ``layers_per_block + 1`` resnets, then ``HunyuanVideoUpsampleCausal3D`` when
  the block upsamples: nearest-neighbour upsampling where the **first frame** is upsampled in space
  only and the others in time and space (T frames -> ``1 + 2 (T - 1)``), then a causal conv. Block
  ``i`` of ``n`` upsamples in space if ``i < log2(spatial_compression_ratio)`` and in time if
  ``n - 1 - log2(4) <= i < n - 1`` (diffusers accepts only ``temporal_compression_ratio == 4``).
  The release: 8x in space, T latent frames -> ``4 (T - 1) + 1`` frames.
* ``conv_norm_out`` (GroupNorm eps 1e-6), SiLU (always), ``conv_out`` (causal).

Decode options as diffusers' (:func:`decode`):

* **framewise** (diffusers' ``use_framewise_decoding``, **on by default**): more than
  ``tile_sample_min_num_frames // 4`` latent frames (4) are decoded in temporal tiles of that many
  plus one latent frames every ``tile_sample_stride_num_frames // 4`` (3); each tile but the first
  drops its first decoded frame, and consecutive tiles are blended linearly over
  ``min - stride`` (4) frames (``_temporal_tiled_decode``). Tiles of one length run under one
  ``lax.map``.
* **tiling** (``enable_tiling``, off by default as in diffusers): spatial tiles of 256 pixels every
  192 (:class:`HunyuanVideoTilingConfig`, the same integers as Mochi's ``tiled_decode``, mapped onto
  :class:`xdit_jax.parallel.vae.TilePlan`); inside each temporal tile when both apply.
* **mesh**: the image plane split over the devices (:func:`xdit_jax.parallel.vae.sharded_decode`,
  both strategies). Under ``"shard_map"`` the causal convolutions pad through
  ``conv_halo(..., mode="edge")``, GroupNorm statistics are global through ``group_norm_stats``,
  and the mid-block attention takes its keys and values of the whole plane through ``gather_plane``
  (the causal mask depends only on frame indices, which a spatial split leaves whole). Under
  ``"gspmd"`` XLA partitions everything, the global attention included.
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
from xdit_jax.models import vae_kl
from xdit_jax.models.vae_layers import Conv, GroupNorm
from xdit_jax.models.vae_mochi import MochiTilingConfig, ReplicateConv3d
from xdit_jax.parallel import vae as spatial
from xdit_jax.parallel.vae import TilePlan

# Torch keys of a VAE checkpoint that carry nothing the decoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.", r"^quant_conv\.")
TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

_ACTIVATIONS = vae_kl._ACTIVATIONS  # diffusers' get_activation
_UP_BLOCK = "HunyuanVideoUpBlock3D"
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class HunyuanVideoVAEConfig(FromConfigDict):
    """``vae/config.json`` of a HunyuanVideo pipeline (the ``AutoencoderKLHunyuanVideo`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = ("HunyuanVideoDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = (_UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if any(t != _UP_BLOCK for t in self.up_block_types):
            raise ValueError(f"unsupported up_block_types {self.up_block_types} (only {_UP_BLOCK})")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(f"up_block_types {self.up_block_types} needs one entry per block_out_channels "
                             f"{self.block_out_channels}")
        if self.temporal_compression_ratio != 4:
            raise ValueError(f"unsupported temporal_compression_ratio {self.temporal_compression_ratio} "
                             "(diffusers supports only 4)")
        s = self.spatial_compression_ratio
        if s < 1 or s & (s - 1):
            raise ValueError(f"spatial_compression_ratio {s} must be a power of 2")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups {self.norm_num_groups}")
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r} (supported: {sorted(_ACTIVATIONS)})")

    def upsample_factors(self) -> tuple[tuple[int, int, int], ...]:
        """(time, height, width) factor of each up block, as ``HunyuanVideoDecoder3D`` derives them."""
        n = len(self.block_out_channels)
        ns = int(np.log2(self.spatial_compression_ratio))
        nt = int(np.log2(self.temporal_compression_ratio))
        out = []
        for i in range(n):
            sp = i < ns
            t = n - 1 - nt <= i and i != n - 1
            out.append((2 if t else 1, 2 if sp else 1, 2 if sp else 1))
        return tuple(out)

    def num_frames(self, latent_frames: int) -> int:
        """Frames the decoder makes of ``latent_frames``: each time upsampling maps T to 1 + 2 (T - 1)."""
        t = latent_frames
        for ft, _, _ in self.upsample_factors():
            if ft == 2:
                t = 1 + 2 * (t - 1)
        return t

    @property
    def spatial_upsampling(self) -> int:
        """The decoder's actual spatial factor (== ``spatial_compression_ratio`` for >= log2 of it blocks)."""
        return math.prod(f[1] for f in self.upsample_factors())


# ----------------------------------------------------------------------------------------------
# Layers (channels-last)


class HunyuanVideoCausalConv3d(nnx.Module):
    """Replicate padding (``k - 1`` first frames in front, ``k // 2`` edge rows/columns each side),
    then a VALID conv: its one child ``conv`` (odd kernels only, as the decoder uses)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dtype=jnp.float32):
        self.conv = ReplicateConv3d(in_channels, out_channels, kernel_size, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class HunyuanVideoResnetBlockCausal3D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, groups: int, act_fn: str, dtype=jnp.float32):
        self.act_fn = act_fn.lower()
        self.norm1 = GroupNorm(groups, in_channels, eps=_EPS, dtype=dtype)
        self.conv1 = HunyuanVideoCausalConv3d(in_channels, out_channels, 3, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps=_EPS, dtype=dtype)
        self.conv2 = HunyuanVideoCausalConv3d(out_channels, out_channels, 3, dtype=dtype)
        self.conv_shortcut = (HunyuanVideoCausalConv3d(in_channels, out_channels, 1, dtype=dtype)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x


class CausalFrameAttention(vae_kl.Attention):
    """The mid block's attention over every token of every frame, a token seeing the tokens of its
    own and earlier frames (``prepare_causal_attention_mask``). Keys and values come from the whole
    image plane (``gather_plane``); the mask depends on frame indices only."""

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, h, w, c = x.shape
        y = self.group_norm(x)
        q = self.to_q(y).reshape(n, t * h * w, c)
        kv = spatial.gather_plane(jnp.concatenate([self.to_k(y), self.to_v(y)], axis=-1))
        plane = kv.shape[2] * kv.shape[3]
        kv = kv.reshape(n, -1, 2 * c)
        q_frames = jnp.repeat(jnp.arange(t, dtype=jnp.int32), h * w)
        k_frames = jnp.repeat(jnp.arange(t, dtype=jnp.int32), plane)
        o = vae_kl.attention(q, kv[..., :c], kv[..., c:], self.scale, q_frames=q_frames, k_frames=k_frames)
        return self.to_out[0](o.reshape(n, t, h, w, c)) + x


class HunyuanVideoMidBlock3D(nnx.Module):
    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool, dtype=jnp.float32):
        self.resnets = nnx.List([HunyuanVideoResnetBlockCausal3D(channels, channels, groups=groups, act_fn=act_fn,
                                                                 dtype=dtype) for _ in range(2)])
        self.attentions = (nnx.List([CausalFrameAttention(channels, groups=groups, dtype=dtype)])
                           if add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def upsample_causal(x: jax.Array, factors: tuple[int, int, int]) -> jax.Array:
    """``HunyuanVideoUpsampleCausal3D``'s nearest upsampling of (N, T, H, W, C): the first frame in
    height and width only, the others in time too."""
    ft, fh, fw = factors
    x = jnp.repeat(jnp.repeat(x, fh, axis=2), fw, axis=3)
    if x.shape[1] == 1 or ft == 1:
        return x
    return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1)


class HunyuanVideoUpsampleCausal3D(nnx.Module):
    def __init__(self, channels: int, factors: tuple[int, int, int], *, dtype=jnp.float32):
        self.factors = tuple(factors)
        self.conv = HunyuanVideoCausalConv3d(channels, channels, 3, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_causal(x, self.factors))


class HunyuanVideoUpBlock3D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, factors: tuple[int, int, int], *,
                 groups: int, act_fn: str, dtype=jnp.float32):
        self.resnets = nnx.List([
            HunyuanVideoResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                                            act_fn=act_fn, dtype=dtype)
            for i in range(num_layers)
        ])
        self.upsamplers = (nnx.List([HunyuanVideoUpsampleCausal3D(out_channels, factors, dtype=dtype)])
                           if max(factors) > 1 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class HunyuanVideoDecoder3D(nnx.Module):
    def __init__(self, cfg: HunyuanVideoVAEConfig, *, dtype=jnp.float32):
        ch = list(reversed(cfg.block_out_channels))
        g, act = cfg.norm_num_groups, cfg.act_fn
        self.conv_in = HunyuanVideoCausalConv3d(cfg.latent_channels, ch[0], 3, dtype=dtype)
        self.mid_block = HunyuanVideoMidBlock3D(ch[0], groups=g, act_fn=act, add_attention=cfg.mid_block_add_attention,
                                                dtype=dtype)
        self.up_blocks = nnx.List([
            HunyuanVideoUpBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, f, groups=g, act_fn=act,
                                  dtype=dtype)
            for i, f in enumerate(cfg.upsample_factors())
        ])
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, dtype=dtype)
        self.conv_out = HunyuanVideoCausalConv3d(ch[-1], cfg.out_channels, 3, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is nn.SiLU() always


class HunyuanVideoVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLHunyuanVideo``: ``post_quant_conv`` and ``decoder``."""

    def __init__(self, cfg: HunyuanVideoVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.post_quant_conv = Conv(cfg.latent_channels, cfg.latent_channels, (1, 1, 1), dtype=dtype)
        self.decoder = HunyuanVideoDecoder3D(cfg, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        """Latents channels-last (N, T, h, w, C_latent) -> frames channels-last (N, T', H, W, C_out)."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))


# ----------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class HunyuanVideoTilingConfig:
    """diffusers' ``AutoencoderKLHunyuanVideo.enable_tiling`` arguments (its defaults), in output
    pixels / frames: spatial tiles of ``tile_sample_min_*`` pixels every ``tile_sample_stride_*``;
    temporal tiles (framewise decoding) of ``tile_sample_min_num_frames`` frames every
    ``tile_sample_stride_num_frames``."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    tile_sample_stride_num_frames: int = 12

    def plan(self, spatial_ratio: int) -> TilePlan:
        """The integers of diffusers' ``tiled_decode`` (the same rule as Mochi's)."""
        return MochiTilingConfig(self.tile_sample_min_height, self.tile_sample_min_width,
                                 self.tile_sample_stride_height, self.tile_sample_stride_width).plan(spatial_ratio)

    def temporal(self, temporal_ratio: int) -> tuple[int, int, int]:
        """(latent tile frames, latent stride, blended output frames) of ``_temporal_tiled_decode``."""
        return (self.tile_sample_min_num_frames // temporal_ratio, self.tile_sample_stride_num_frames // temporal_ratio,
                self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames)


def default_tiling(cfg: HunyuanVideoVAEConfig) -> HunyuanVideoTilingConfig:
    """diffusers' defaults (``__init__`` and ``enable_tiling()``): 256-pixel tiles every 192, 16-frame
    temporal tiles every 12."""
    return HunyuanVideoTilingConfig()


def decode(model: HunyuanVideoVAEDecoder, z: jax.Array, *, tiling: HunyuanVideoTilingConfig | bool | None = None,
           framewise: bool = True, slicing: bool = False, mesh=None, grid: tuple[int, int] | None = None,
           strategy: str = "shard_map") -> jax.Array:
    """``vae.decode(z).sample`` of diffusers: latents (B, C_latent, T, h, w), already unscaled (see
    :func:`unscale_latents`), -> frames (B, C_out, 4 (T - 1) + 1, h*8, w*8) for the release config
    (:func:`decoded_shape`), roughly in [-1, 1], not clipped.

    Computes in the model's dtype and returns it. Pure and jittable (:data:`jit_decode`). Options
    (all static), composed as diffusers does: ``slicing`` (one batch element at a time) ->
    ``framewise`` temporal tiles (diffusers' default, on: used when T exceeds a temporal tile) ->
    ``tiling`` spatial tiles (``enable_tiling``: True for the defaults or a
    :class:`HunyuanVideoTilingConfig`, whose temporal sizes then apply too; used when the latent
    exceeds a tile) -> each piece split over ``mesh`` (``grid``/``strategy``:
    :func:`xdit_jax.parallel.vae.sharded_decode`), equal to the one-device decode.
    """
    cfg = model.config
    sizes = tiling if isinstance(tiling, HunyuanVideoTilingConfig) else default_tiling(cfg)
    plan = sizes.plan(cfg.spatial_compression_ratio) if tiling else None
    r = cfg.spatial_compression_ratio

    def spatial_decode(m, x):
        h, w = x.shape[-2:]
        out = spatial.decode(_decode_plain, m, x, mesh=mesh, tiling=plan, grid=grid, strategy=strategy)
        return out[..., : h * r, : w * r]  # diffusers' tiled_decode crops; a no-op otherwise

    def one(m, x):
        lt, _, _ = sizes.temporal(cfg.temporal_compression_ratio)
        if framewise and x.shape[2] > lt:
            return _temporal_tiled_decode(spatial_decode, m, x, sizes)
        return spatial_decode(m, x)

    return spatial.sliced_decode(one, model, z) if slicing else one(model, z)


def _temporal_tiled_decode(decode_fn, model, z: jax.Array, sizes: HunyuanVideoTilingConfig) -> jax.Array:
    """diffusers' ``_temporal_tiled_decode`` around ``decode_fn`` (NCTHW latents -> NCTHW frames)."""
    cfg = model.config
    lt, st, blend = sizes.temporal(cfg.temporal_compression_ratio)
    if st <= 0:
        raise ValueError(f"tiling {sizes}: the temporal stride is less than one latent frame")
    num_frames = z.shape[2]
    starts = list(range(0, num_frames, st))
    groups: dict[int, list[int]] = {}
    for i in starts:
        groups.setdefault(min(lt + 1, num_frames - i), []).append(i)
    decoded: dict[int, jax.Array] = {}
    for length, where in groups.items():
        xs = jnp.stack([z[:, :, i:i + length] for i in where])
        ys = spatial._map_model(decode_fn, model, xs)
        for k, i in enumerate(where):
            decoded[i] = ys[k] if i == 0 else ys[k][:, :, 1:]
    keep = sizes.tile_sample_stride_num_frames
    out, prev = [], None
    for i in starts:  # blended in diffusers' order: each tile with its (already blended) predecessor
        t = decoded[i]
        if prev is not None:
            t = spatial._blend(prev, t, blend, -3)
        out.append(t[:, :, : keep + (1 if prev is None else 0)])
        prev = t
    return jnp.concatenate(out, axis=2)[:, :, : cfg.num_frames(num_frames)]


def _decode_plain(model: HunyuanVideoVAEDecoder, z: jax.Array) -> jax.Array:
    """One device (or one shard or tile), no tiling: NCTHW in, NCTHW out."""
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 4, 1))), (0, 4, 1, 2, 3))


jit_decode = nnx.jit(decode, static_argnames=("tiling", "framewise", "slicing", "mesh", "grid", "strategy"))


def unscale_latents(cfg: HunyuanVideoVAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> the VAE's input, as diffusers' HunyuanVideo pipeline does before
    ``vae.decode``: ``latents / scaling_factor``."""
    return latents / cfg.scaling_factor


def module_fn(cfg: HunyuanVideoVAEConfig, dtype=jnp.float32):
    return lambda: HunyuanVideoVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideoVAEConfig, dtype=None) -> dict:
    """The decoder's params (pure dict, with ``post_quant_conv``) from the flat torch state dict of a
    ``vae/`` folder. ``dtype``: cast to it (None keeps float32). The encoder's tensors and
    ``quant_conv`` are ignored. Raises ``CheckpointError`` on missing, unexpected or misshaped tensors."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint")


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideoVAEConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_hunyuan_video_encoder`,
    image-to-video), which conversion saves next to the decoder's; empty for a checkpoint without encoder tensors."""
    if not any(k.startswith("encoder.") for k in flat):
        return {}
    from xdit_jax.models import vae_hunyuan_video_encoder

    return {"encoder_params": vae_hunyuan_video_encoder.params_from_torch(flat, cfg, dtype)}


def build(cfg: HunyuanVideoVAEConfig, params: Mapping, dtype=jnp.float32) -> HunyuanVideoVAEDecoder:
    """The decoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: HunyuanVideoVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of :func:`decode` for latents of shape (B, C, T, h, w)."""
    b, _, t, h, w = latent_shape
    s = cfg.spatial_upsampling
    return (b, cfg.out_channels, cfg.num_frames(t), h * s, w * s)
