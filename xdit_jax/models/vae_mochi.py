"""The decoder of diffusers' ``AutoencoderKLMochi`` (Mochi 1) in Flax NNX (decode only).

Submodules carry diffusers' attribute names, so :func:`xdit_jax.keymap.map_state_dict` derives the
key map (``decoder.up_blocks.0.resnets.1.conv1.conv.weight`` -> ``...conv1.conv.kernel``,
``decoder.up_blocks.0.proj.weight`` -> ``...proj.kernel``); the encoder's tensors are in
:data:`TORCH_IGNORE`.

Layout: channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes and returns diffusers'
``(B, C, T, H, W)``.

The network, as diffusers builds it (``MochiDecoder3D``), checked against its source:

* ``conv_in``: a plain 1x1x1 ``nn.Conv3d`` from the latent channels to the widest block.
* ``block_in`` / ``block_out``: ``MochiMidBlock3D`` with ``add_attention=False`` (the decoder has
  no attention): ``layers_per_block[-1]`` / ``layers_per_block[0]`` resnets.
* ``up_blocks[i]``: ``layers_per_block[-i-2]`` resnets at the input width, then ``proj`` (a
  Linear to ``out * st * sh * sw`` channels) and depth-to-space: channel ``c*st*sh*sw + a*sh*sw +
  b*sw + d`` becomes channel ``c`` of frame ``t*st + a``, row ``y*sh + b``, column ``x*sw + d``.
  Expansions are ``temporal_expansions[-i-1]`` / ``spatial_expansions[-i-1]`` (3, 2, 1 in time
  and 2, 2, 2 in space for the release: 6x frames, 8x pixels).
* ``MochiResnetBlock3D``: norm-SiLU-conv-norm-SiLU-conv plus the input (the width never changes
  inside a block). Its activation is diffusers' default ``"swish"`` whatever ``act_fn`` says
  (the blocks are built without it); only the final activation before ``proj_out`` is
  ``act_fn``.
* ``MochiChunkedGroupNorm3D``: ``nn.GroupNorm(32 groups, eps=1e-5)`` applied to every frame on
  its own (statistics over height, width and the group's channels, per frame); the chunking
  over frames is only a memory device. Here the frames are folded into the batch axis (free in
  channels-last), statistics in float32 (:func:`xdit_jax.models.vae_layers.group_norm`).
* ``CogVideoXCausalConv3d(pad_mode="replicate")``: ``F.pad(..., mode="replicate")`` with
  ``k - 1`` copies of the first frame in front (causal) and ``(k - 1) // 2`` copies of the edge
  row/column on each side, then a VALID convolution; no state is carried between calls (the
  replicate mode drops the conv cache).
* ``proj_out``: SiLU (``act_fn``) then a Linear to ``out_channels``.
* ``_decode`` drops the first ``temporal_compression_ratio - 1`` frames
  (``drop_last_temporal_frames``, on by default): ``T`` latent frames give ``(T - 1) * 6 + 1``.

The whole latent video is decoded at once (diffusers' default; its framewise decoding is off by
default and not reproduced): every layer is traced once, no Python loop runs over frames.

Spatial sharding (``decode(..., mesh=...)``): the causal convolutions pad through
``conv_halo(..., mode="edge")`` (halo rows/columns from the neighbours, the edge row/column at the
true image border) and the per-frame GroupNorm statistics are ``group_norm_stats`` over a
``(N*T, H, W, C)`` view (per-frame sums ``psum``med over the grid). The module never calls a
collective itself.

Tiling is diffusers' Mochi ``enable_tiling`` (tile and stride in output pixels, 256 / 192 by
default, :class:`MochiTilingConfig`), mapped onto :class:`xdit_jax.parallel.vae.TilePlan`.
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
from xdit_jax.models.vae_layers import Conv, GroupNorm
from xdit_jax.parallel import vae as spatial
from xdit_jax.parallel.vae import TilePlan

# Torch keys of a VAE checkpoint that carry nothing the decoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.",)
TORCH_RENAMES: tuple[tuple[str, str], ...] = ()  # (regex, replacement) on torch names; none needed

# ``MochiChunkedGroupNorm3D`` builds ``nn.GroupNorm(num_groups=32)`` with torch's default eps.
NORM_GROUPS = 32
NORM_EPS = 1e-5

# diffusers' ``get_activation`` (ACT2CLS); torch's nn.GELU is the exact (erf) GELU.
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}

# ``AutoencoderKLMochi``'s defaults for the per-channel latent statistics (Mochi 1 preview).
_LATENTS_MEAN = (-0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
                 0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
                 -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285)
_LATENTS_STD = (0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
                0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
                0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041)


@dataclasses.dataclass(frozen=True)
class MochiVAEConfig(FromConfigDict):
    """``vae/config.json`` of a Mochi pipeline (the ``AutoencoderKLMochi`` arguments)."""

    in_channels: int = 15
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 768)
    latent_channels: int = 12
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    act_fn: str = "silu"
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    add_attention_block: tuple[bool, ...] = (False, True, True, True, True)
    latents_mean: tuple[float, ...] | None = _LATENTS_MEAN
    latents_std: tuple[float, ...] | None = _LATENTS_STD
    scaling_factor: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        ch = self.decoder_block_out_channels
        if not (len(self.temporal_expansions) == len(self.spatial_expansions) == len(ch) - 1):
            raise ValueError(f"temporal_expansions {self.temporal_expansions} and spatial_expansions "
                             f"{self.spatial_expansions} need one entry per up block ({len(ch) - 1})")
        if len(self.layers_per_block) != len(ch) + 1:
            raise ValueError(f"layers_per_block {self.layers_per_block} needs {len(ch) + 1} entries")
        if any(c % NORM_GROUPS for c in ch):
            raise ValueError(f"decoder_block_out_channels {ch} must be multiples of {NORM_GROUPS} (GroupNorm groups)")
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} entries for {self.latent_channels} latent channels")

    @property
    def spatial_compression_ratio(self) -> int:
        return math.prod(self.spatial_expansions)

    @property
    def temporal_compression_ratio(self) -> int:
        return math.prod(self.temporal_expansions)

    def num_frames(self, latent_frames: int) -> int:
        """Frames :func:`decode` returns for ``latent_frames`` latent frames: ``T * r`` decoded, the
        first ``r - 1`` dropped (diffusers' ``drop_last_temporal_frames``)."""
        r = self.temporal_compression_ratio
        t = latent_frames * r
        return t - (r - 1) if t >= r else t


# ----------------------------------------------------------------------------------------------
# Layers (channels-last)


class Dense(nnx.Module):
    """torch ``nn.Linear`` over the last axis (leaves ``kernel`` (in, out) and ``bias``)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        return jnp.dot(x.astype(kernel.dtype), kernel) + self.bias[...]


class ReplicateConv3d(nnx.Module):
    """The ``conv`` of ``CogVideoXCausalConv3d(pad_mode="replicate")``: a VALID 3-D convolution of
    the input padded by repeating its edge — ``k - 1`` first frames in front, ``(k - 1) // 2``
    rows/columns each side — through :func:`xdit_jax.parallel.vae.conv_halo` (mode ``"edge"``),
    so that under a spatially sharded decode the rows come from the neighbouring devices."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dtype=jnp.float32):
        k = kernel_size
        self.kernel = nnx.Param(jnp.zeros((k, k, k, in_channels, out_channels), dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))
        self.padding = ((k - 1, 0), ((k - 1) // 2,) * 2, ((k - 1) // 2,) * 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        x, padding = spatial.conv_halo(x.astype(kernel.dtype), self.padding, mode="edge")
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), padding,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...]


class MochiCausalConv3d(nnx.Module):
    """``CogVideoXCausalConv3d`` as Mochi builds it (replicate padding, stride 1): its one
    parameterised child is ``conv`` (diffusers' ``CogVideoXSafeConv3d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dtype=jnp.float32):
        self.conv = ReplicateConv3d(in_channels, out_channels, kernel_size, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class MochiChunkedGroupNorm3D(nnx.Module):
    """GroupNorm on every frame of (N, T, H, W, C) on its own."""

    def __init__(self, num_channels: int, *, dtype=jnp.float32):
        self.norm_layer = GroupNorm(NORM_GROUPS, num_channels, eps=NORM_EPS, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t = x.shape[:2]
        return self.norm_layer(x.reshape((n * t,) + x.shape[2:])).reshape(x.shape)


class MochiResnetBlock3D(nnx.Module):
    def __init__(self, channels: int, *, dtype=jnp.float32):
        self.norm1 = MochiChunkedGroupNorm3D(channels, dtype=dtype)
        self.conv1 = MochiCausalConv3d(channels, channels, 3, dtype=dtype)
        self.norm2 = MochiChunkedGroupNorm3D(channels, dtype=dtype)
        self.conv2 = MochiCausalConv3d(channels, channels, 3, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # diffusers' "swish", whatever act_fn is
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + x


class MochiMidBlock3D(nnx.Module):
    """``MochiMidBlock3D(add_attention=False)``: resnets only."""

    def __init__(self, channels: int, num_layers: int, *, dtype=jnp.float32):
        self.resnets = nnx.List([MochiResnetBlock3D(channels, dtype=dtype) for _ in range(num_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class MochiUpBlock3D(nnx.Module):
    """Resnets at the input width, then ``proj`` and depth-to-space by (st, sh, sw)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, temporal_expansion: int,
                 spatial_expansion: int, *, dtype=jnp.float32):
        self.resnets = nnx.List([MochiResnetBlock3D(in_channels, dtype=dtype) for _ in range(num_layers)])
        self.expansion = (temporal_expansion, spatial_expansion, spatial_expansion)
        self.out_channels = out_channels
        self.proj = Dense(in_channels, out_channels * math.prod(self.expansion), dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        st, sh, sw = self.expansion
        c = self.out_channels
        # diffusers orders the projected channels (c, st, sh, sw); reorder the (tiny) kernel to
        # (st, sh, sw, c) so that the depth-to-space below keeps the channels innermost.
        kernel = self.proj.kernel[...]
        kernel = kernel.reshape(-1, c, st, sh, sw).transpose(0, 2, 3, 4, 1).reshape(kernel.shape)
        bias = self.proj.bias[...].reshape(c, st, sh, sw).transpose(1, 2, 3, 0).reshape(-1)
        y = jnp.dot(x.astype(kernel.dtype), kernel) + bias
        n, t, h, w, _ = y.shape
        y = y.reshape(n, t, h, w, st, sh, sw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return y.reshape(n, t * st, h * sh, w * sw, c)


class MochiDecoder3D(nnx.Module):
    def __init__(self, cfg: MochiVAEConfig, *, dtype=jnp.float32):
        ch, lpb = cfg.decoder_block_out_channels, cfg.layers_per_block
        self.act_fn = cfg.act_fn.lower()
        self.conv_in = Conv(cfg.latent_channels, ch[-1], (1, 1, 1), dtype=dtype)
        self.block_in = MochiMidBlock3D(ch[-1], lpb[-1], dtype=dtype)
        self.up_blocks = nnx.List([
            MochiUpBlock3D(ch[-i - 1], ch[-i - 2], lpb[-i - 2], cfg.temporal_expansions[-i - 1],
                           cfg.spatial_expansions[-i - 1], dtype=dtype)
            for i in range(len(ch) - 1)
        ])
        self.block_out = MochiMidBlock3D(ch[0], lpb[0], dtype=dtype)
        self.proj_out = Dense(ch[0], cfg.out_channels, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        """Latents (N, T, H, W, C_latent) -> frames (N, T*rt, H*rs, W*rs, C_out), nothing dropped."""
        h = self.block_in(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        h = self.block_out(h)
        return self.proj_out(_ACTIVATIONS[self.act_fn](h))


class MochiVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLMochi``: its ``decoder`` (it has no post-quant conv)."""

    def __init__(self, cfg: MochiVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.decoder = MochiDecoder3D(cfg, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        """diffusers' ``_decode`` without tiling: (N, T, H, W, C) latents -> frames channels-last,
        the first ``temporal_compression_ratio - 1`` decoded frames dropped."""
        y = self.decoder(z.astype(self.dtype))
        r = self.config.temporal_compression_ratio
        return y[:, r - 1:] if y.shape[1] >= r else y


# ----------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class MochiTilingConfig:
    """diffusers' ``AutoencoderKLMochi.enable_tiling`` arguments, in output pixels: tiles of
    ``tile_sample_min_*`` pixels starting every ``tile_sample_stride_*`` pixels."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def plan(self, spatial_ratio: int) -> TilePlan:
        """The integers of diffusers' Mochi ``tiled_decode``: latent tile and stride (floor
        divisions), blend extent ``min - stride`` and kept size ``stride`` (pixels)."""
        th, tw = self.tile_sample_min_height, self.tile_sample_min_width
        sh, sw = self.tile_sample_stride_height, self.tile_sample_stride_width
        return TilePlan(tile_latent=(th // spatial_ratio, tw // spatial_ratio),
                        stride=(sh // spatial_ratio, sw // spatial_ratio),
                        blend_extent=(th - sh, tw - sw), row_limit=(sh, sw))


def default_tiling(cfg: MochiVAEConfig) -> MochiTilingConfig:
    """diffusers' ``enable_tiling()`` defaults for Mochi: 256-pixel tiles every 192 pixels."""
    return MochiTilingConfig()


def decode(model: MochiVAEDecoder, z: jax.Array, *, tiling: MochiTilingConfig | bool | None = None,
           slicing: bool = False, mesh=None, grid: tuple[int, int] | None = None,
           strategy: str = "shard_map") -> jax.Array:
    """``vae.decode(z).sample`` of diffusers: latents (B, C_latent, T, H, W), already unscaled (see
    :func:`unscale_latents`), -> frames (B, C_out, T', H*s, W*s) with ``T' = (T-1)*rt + 1``
    (:meth:`MochiVAEConfig.num_frames`), roughly in [-1, 1], not clipped.

    Computes in the model's dtype (its parameters' dtype) and returns that dtype. Pure and
    jittable (:data:`jit_decode`). Options (all static), composed as diffusers does
    (:func:`xdit_jax.parallel.vae.decode`):

    * ``slicing``: one batch element at a time (diffusers' ``enable_slicing``); same numbers.
    * ``tiling``: diffusers' ``enable_tiling`` — True for its defaults (:func:`default_tiling`),
      or a :class:`MochiTilingConfig` (any object with a ``plan(spatial_ratio) -> TilePlan``
      works). Used only when the latent exceeds a tile, as in diffusers; the output then equals
      diffusers' *tiled* decode (cropped to ``H*s x W*s`` as diffusers does).
    * ``mesh``: split height (and width where the height is too small) over all its devices
      (``grid`` and ``strategy`` go to :func:`xdit_jax.parallel.vae.sharded_decode`); equals the
      one-device decode. With tiling, each tile is split over the mesh.
    """
    if tiling is True:
        tiling = default_tiling(model.config)
    s = model.config.spatial_compression_ratio
    plan = tiling.plan(s) if tiling else None
    out = spatial.decode(_decode_plain, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid,
                         strategy=strategy)
    h, w = z.shape[-2:]
    return out[..., : h * s, : w * s]  # diffusers' tiled_decode crops; a no-op otherwise


def _decode_plain(model: MochiVAEDecoder, z: jax.Array) -> jax.Array:
    """One device (or one shard or tile), no tiling: NCTHW in, NCTHW out."""
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 4, 1))), (0, 4, 1, 2, 3))


jit_decode = nnx.jit(decode, static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))


def unscale_latents(cfg: MochiVAEConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, C, T, H, W) -> the VAE's input, as diffusers' Mochi pipeline does
    before ``vae.decode``: ``latents * std / scaling_factor + mean`` when the config has
    ``latents_mean`` and ``latents_std``, else ``latents / scaling_factor``."""
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        mean = jnp.asarray(cfg.latents_mean, latents.dtype).reshape(shape)
        std = jnp.asarray(cfg.latents_std, latents.dtype).reshape(shape)
        return latents * std / cfg.scaling_factor + mean
    return latents / cfg.scaling_factor


def module_fn(cfg: MochiVAEConfig, dtype=jnp.float32):
    return lambda: MochiVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: MochiVAEConfig, dtype=None) -> dict:
    """The decoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder.

    ``dtype``: cast to it (None keeps float32). The encoder's tensors are ignored. Raises
    ``CheckpointError`` on missing, unexpected or misshaped tensors.
    """
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint")


def build(cfg: MochiVAEConfig, params: Mapping, dtype=jnp.float32) -> MochiVAEDecoder:
    """The decoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: MochiVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of :func:`decode` for latents of shape (B, C, T, H, W)."""
    b, _, t, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.out_channels, cfg.num_frames(t), h * s, w * s)
