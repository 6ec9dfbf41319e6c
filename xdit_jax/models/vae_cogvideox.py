"""The decoder of diffusers' ``AutoencoderKLCogVideoX`` in Flax NNX (decode only).

Submodules carry diffusers' attribute names, so :func:`xdit_jax.keymap.map_state_dict` derives the
key map (``decoder.up_blocks.0.resnets.1.conv1.conv.weight`` -> ``...conv1.conv.kernel``); the
encoder's tensors are in :data:`TORCH_IGNORE` (the encoder, for image-to-video, is
:mod:`xdit_jax.models.vae_cogvideox_encoder`; conversion saves its params through
:func:`extra_params_from_torch`).

Layout: channels-last ``(N, T, H, W, C)`` inside; :func:`decode` takes and returns diffusers'
``(B, C, T, H, W)``. The latent video is decoded in chunks of ``frame_batch_size`` (2) latent
frames exactly as diffusers' ``_decode`` does — the first chunk also takes the odd frame — and
the causal convolutions carry the last two (padded) input frames of each chunk into the next.
That carried state is a plain pytree passed in and out, so the whole decode is one pure, jittable
function: the first chunk is traced once, the remaining equal-sized chunks run under one
``lax.scan``.

Notes on the reference:

* GroupNorm statistics span ``(C/G, T, H, W)`` of the *chunk* (torch's ``nn.GroupNorm`` on a
  5-D tensor); they are computed in float32 in :func:`group_norm_stats`.
* Spatial sharding (``decode(..., mesh=...)``) needs two hooks of :mod:`xdit_jax.parallel.vae`,
  both plain single-device ops outside a shard context: every 'same' convolution pads through
  ``conv_halo`` (halo rows/columns from the neighbours) and the GroupNorm statistics are
  ``group_norm_stats`` (global sums). The module never calls a collective itself.
* All decoder norms are ``CogVideoXSpatialNorm3D``, whose GroupNorm has ``eps=1e-6`` hard-coded
  (the config's ``norm_eps`` is unused by the decoder, as in diffusers).
* ``CogVideoXSafeConv3d`` only splits big inputs along time with a ``k-1`` frame overlap, which
  is the same convolution; here it is one convolution.
* ``conv_y``/``conv_b`` of the spatial norm are 1x1x1 convolutions, which commute with nearest
  upsampling: we apply them to the latent ``zq`` first and upsample their outputs (same numbers,
  far fewer FLOPs).
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
from xdit_jax.models.vae_layers import Conv, GroupNorm, group_norm, group_norm_stats  # noqa: F401
from xdit_jax.parallel import vae as spatial
from xdit_jax.parallel.vae import TilingConfig

# Torch keys of a VAE checkpoint that carry nothing the decoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.", r"^quant_conv\.")
TORCH_RENAMES: tuple[tuple[str, str], ...] = ()  # (regex, replacement) on torch names; none needed

# diffusers' ``AutoencoderKLCogVideoX.num_latent_frames_batch_size``.
LATENT_FRAMES_PER_CHUNK = 2

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig(FromConfigDict):
    """``vae/config.json`` of a CogVideoX pipeline (the ``AutoencoderKLCogVideoX`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if any(t != "CogVideoXUpBlock3D" for t in self.up_block_types):
            raise ValueError(f"unsupported up_block_types {self.up_block_types}")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("up_block_types and block_out_channels must have the same length")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                             f"{self.block_out_channels}")
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {self.act_fn!r}")

    @property
    def temporal_compress_level(self) -> int:
        return int(np.log2(self.temporal_compression_ratio))

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def num_frames(self, latent_frames: int) -> int:
        """Frames :func:`decode` returns for ``latent_frames`` latent frames (chunking included)."""
        fbs, lv = LATENT_FRAMES_PER_CHUNK, self.temporal_compress_level
        chunks = max(latent_frames // fbs, 1)
        first = min(latent_frames, fbs + latent_frames % fbs)
        return _decoded_frames(first, lv) + (chunks - 1) * _decoded_frames(fbs, lv)


# ----------------------------------------------------------------------------------------------
# Pure helpers


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of torch's legacy ``mode="nearest"`` interpolation with an output ``size``."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def nearest_resize(x: jax.Array, size: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """``F.interpolate(..., size=size, mode="nearest")`` over ``axes`` of ``x`` (static shapes)."""
    for ax, n_out in zip(axes, size):
        n_in = x.shape[ax]
        if n_out == n_in:
            continue
        if n_out % n_in == 0:  # integer factor: index i // r, a cheap broadcast
            x = jnp.repeat(x, n_out // n_in, axis=ax)
        else:
            x = jnp.take(x, jnp.asarray(_nearest_index(n_in, n_out)), axis=ax)
    return x


def _decoded_frames(t: int, levels: int) -> int:
    """Frames after ``levels`` time-compressing upsamplers (see :class:`CogVideoXUpsample3D`)."""
    for _ in range(levels):
        t = t if t == 1 else (2 * t - 1 if t % 2 else 2 * t)
    return t


# ----------------------------------------------------------------------------------------------
# Layers (channels-last)


class CogVideoXCausalConv3d(nnx.Module):
    """Causal in time (front-padded with the cached frames or copies of frame 0), 'same' in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dtype=jnp.float32):
        k = kernel_size
        self.time_kernel_size = k
        pad = (k - 1) // 2
        self.conv = Conv(in_channels, out_channels, (k, k, k), ((0, 0), (pad, pad), (pad, pad)), dtype=dtype)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        """``x`` (N, T, H, W, C); ``cache`` the previous chunk's last ``k-1`` padded input frames.

        Returns ``(y, new_cache)``; ``new_cache`` is None for a 1-frame kernel (no state).
        """
        k = self.time_kernel_size
        if k == 1:
            return self.conv(x), None
        front = cache.astype(x.dtype) if cache is not None else jnp.repeat(x[:, :1], k - 1, axis=1)
        x = jnp.concatenate([front, x], axis=1)
        return self.conv(x), x[:, -(k - 1):]


def _resize_time_index(tz: int, t: int) -> np.ndarray:
    """Source frame of each of ``t`` output frames in ``CogVideoXSpatialNorm3D``'s resize of ``tz``
    latent frames: for an odd ``t > 1`` frame 0 maps to frame 0 alone and the rest to the rest."""
    if t > 1 and t % 2 == 1:
        return np.concatenate([[0], 1 + _nearest_index(tz - 1, t - 1)])
    return _nearest_index(tz, t)


def _resize_like_diffusers(zq: jax.Array, t: int, h: int, w: int) -> jax.Array:
    """Nearest-resize ``zq`` (N, Tz, Hz, Wz, C) to (t, h, w) as ``CogVideoXSpatialNorm3D`` does.

    The time axis is gathered at latent resolution first (a static index), then space is
    repeated: with integer factors that is a broadcast XLA fuses into the consumer, so no
    full-resolution copy is ever materialised (a concatenation of the odd first frame with the
    rest, as diffusers writes it, made XLA keep one full-size tensor per spatial norm alive).
    """
    idx = _resize_time_index(zq.shape[1], t)
    if not np.array_equal(idx, np.arange(zq.shape[1])):
        zq = jnp.take(zq, jnp.asarray(idx), axis=1)
    return nearest_resize(zq, (h, w), (2, 3))


class CogVideoXSpatialNorm3D(nnx.Module):
    def __init__(self, f_channels: int, zq_channels: int, groups: int = 32, *, dtype=jnp.float32):
        self.norm_layer = GroupNorm(groups, f_channels, eps=1e-6, dtype=dtype)
        self.conv_y = CogVideoXCausalConv3d(zq_channels, f_channels, kernel_size=1, dtype=dtype)
        self.conv_b = CogVideoXCausalConv3d(zq_channels, f_channels, kernel_size=1, dtype=dtype)

    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        # The 1x1x1 convs commute with nearest resizing: run them at latent resolution.
        y, _ = self.conv_y(zq)
        b, _ = self.conv_b(zq)
        t, h, w = f.shape[1:4]
        y = _resize_like_diffusers(y, t, h, w)
        b = _resize_like_diffusers(b, t, h, w)
        return self.norm_layer(f) * y.astype(f.dtype) + b.astype(f.dtype)


class CogVideoXResnetBlock3D(nnx.Module):
    """diffusers' resnet without ``temb`` (``temb_channels=0``, dropout 0). ``zq_channels``: the decoder's
    spatial norms conditioned on the latent (their eps is 1e-6); None (diffusers' ``spatial_norm_dim=None``,
    the encoder): plain GroupNorms with ``eps``."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, zq_channels: int | None,
                 act_fn: str = "silu", eps: float = 1e-6, dtype=jnp.float32):
        self.act_fn = act_fn.lower()

        def norm(ch):
            if zq_channels is None:
                return GroupNorm(groups, ch, eps=eps, dtype=dtype)
            return CogVideoXSpatialNorm3D(ch, zq_channels, groups, dtype=dtype)

        self.norm1 = norm(in_channels)
        self.conv1 = CogVideoXCausalConv3d(in_channels, out_channels, 3, dtype=dtype)
        self.norm2 = norm(out_channels)
        self.conv2 = CogVideoXCausalConv3d(out_channels, out_channels, 3, dtype=dtype)
        # diffusers' default (conv_shortcut=False): a plain 1x1x1 CogVideoXSafeConv3d.
        self.conv_shortcut = (Conv(in_channels, out_channels, (1, 1, 1), dtype=dtype)
                              if in_channels != out_channels else None)

    def _norm(self, norm, x, zq):
        return norm(x) if isinstance(norm, GroupNorm) else norm(x, zq)

    def __call__(self, x, zq=None, cache=None):
        """``zq``: the latent chunk for the spatial norms (None without them)."""
        cache = cache or {}
        act = _ACTIVATIONS[self.act_fn]
        h = act(self._norm(self.norm1, x, zq))
        h, c1 = self.conv1(h, cache.get("conv1"))
        h = act(self._norm(self.norm2, h, zq))
        h, c2 = self.conv2(h, cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


class CogVideoXUpsample3D(nnx.Module):
    """Nearest 2x in space (and in time when ``compress_time``, keeping an odd first frame single),
    then a 3x3 2-D conv per frame."""

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool, *, dtype=jnp.float32):
        self.conv = Conv(in_channels, out_channels, (3, 3), ((1, 1), (1, 1)), dtype=dtype)
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, h, w, _ = x.shape
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        if self.compress_time and t > 1:
            if t % 2 == 1:
                x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
            else:
                x = jnp.repeat(x, 2, axis=1)
        n, t, h, w, c = x.shape
        y = self.conv(x.reshape(n * t, h, w, c))
        return y.reshape(n, t, h, w, y.shape[-1])


class CogVideoXMidBlock3D(nnx.Module):
    """Resnets at one width; ``zq_channels``/``eps`` as :class:`CogVideoXResnetBlock3D` (the encoder's: None)."""

    def __init__(self, channels: int, num_layers: int, *, groups: int, zq_channels: int | None, act_fn: str,
                 eps: float = 1e-6, dtype=jnp.float32):
        self.resnets = nnx.List([
            CogVideoXResnetBlock3D(channels, channels, groups=groups, zq_channels=zq_channels,
                                   act_fn=act_fn, eps=eps, dtype=dtype)
            for _ in range(num_layers)
        ])

    def __call__(self, x, zq=None, cache=None):
        cache = cache or {}
        new = {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
        return x, new


class CogVideoXUpBlock3D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, groups: int,
                 zq_channels: int, act_fn: str, add_upsample: bool, compress_time: bool,
                 dtype=jnp.float32):
        self.resnets = nnx.List([
            CogVideoXResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                                   zq_channels=zq_channels, act_fn=act_fn, dtype=dtype)
            for i in range(num_layers)
        ])
        self.upsamplers = (nnx.List([CogVideoXUpsample3D(out_channels, out_channels, compress_time, dtype=dtype)])
                           if add_upsample else None)

    def __call__(self, x, zq, cache=None):
        cache = cache or {}
        new = {}
        for i, resnet in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x, new


class CogVideoXDecoder3D(nnx.Module):
    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype=jnp.float32):
        ch = list(reversed(cfg.block_out_channels))
        zc, groups, act = cfg.latent_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = CogVideoXCausalConv3d(zc, ch[0], 3, dtype=dtype)
        self.mid_block = CogVideoXMidBlock3D(ch[0], 2, groups=groups, zq_channels=zc, act_fn=act, dtype=dtype)
        blocks = []
        out_ch = ch[0]
        for i in range(len(cfg.up_block_types)):
            prev, out_ch = out_ch, ch[i]
            blocks.append(CogVideoXUpBlock3D(
                prev, out_ch, cfg.layers_per_block + 1, groups=groups, zq_channels=zc, act_fn=act,
                add_upsample=i != len(ch) - 1, compress_time=i < cfg.temporal_compress_level, dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = CogVideoXSpatialNorm3D(ch[-1], zc, groups, dtype=dtype)
        self.conv_out = CogVideoXCausalConv3d(ch[-1], cfg.out_channels, 3, dtype=dtype)

    def __call__(self, sample: jax.Array, cache=None):
        """One chunk: ``sample`` (N, T, H, W, C_latent) -> (frames (N, T', H', W', C_out), cache)."""
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(sample, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, sample, cache.get("mid_block"))
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = block(h, sample, cache.get(f"up_block_{i}"))
        h = jax.nn.silu(self.norm_out(h, sample))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class CogVideoXVAEDecoder(nnx.Module):
    """The decode half of ``AutoencoderKLCogVideoX``: ``post_quant_conv`` (if used) and ``decoder``."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.decoder = CogVideoXDecoder3D(cfg, dtype=dtype)
        # As in diffusers (whose CogVideoX checkpoints all have use_post_quant_conv=False), the
        # conv is declared with ``out_channels`` channels; the key map checks it against the file.
        self.post_quant_conv = (Conv(cfg.out_channels, cfg.out_channels, (1, 1, 1), dtype=dtype)
                                if cfg.use_post_quant_conv else None)

    def decode_chunk(self, z: jax.Array, cache=None):
        """One chunk of latent frames (N, T, H, W, C) -> (frames channels-last, carried cache)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, cache)


# ----------------------------------------------------------------------------------------------
# Public API


def default_tiling(cfg: CogVideoXVAEConfig) -> TilingConfig:
    """diffusers' ``enable_tiling()`` defaults: tiles of half the sample size, overlaps 1/6, 1/5."""
    return TilingConfig(cfg.sample_height // 2, cfg.sample_width // 2, 1 / 6, 1 / 5)


def decode(model: CogVideoXVAEDecoder, z: jax.Array, *,
           frame_batch_size: int = LATENT_FRAMES_PER_CHUNK,
           tiling: TilingConfig | bool | None = None, slicing: bool = False,
           mesh=None, grid: tuple[int, int] | None = None, strategy: str = "shard_map") -> jax.Array:
    """``vae.decode(z).sample`` of diffusers: latents (B, C, T, H, W), already divided by
    ``scaling_factor``, -> frames (B, C_out, T', H*s, W*s) (roughly in [-1, 1], not clipped).

    Computes in the model's dtype (its parameters' dtype) and returns that dtype. Pure and
    jittable (``nnx.jit(decode)``, or :func:`jit_decode`); the chunking follows diffusers'
    ``_decode``: ``max(T // fbs, 1)`` chunks, the first also taking the ``T % fbs`` extra frames.

    Options (all static), composed as diffusers does (:func:`xdit_jax.parallel.vae.decode`):

    * ``slicing``: one batch element at a time (diffusers' ``enable_slicing``); same numbers.
    * ``tiling``: diffusers' ``enable_tiling`` — a :class:`TilingConfig` (its arguments), or True
      for diffusers' defaults (:func:`default_tiling`). Used only when the latent exceeds a tile,
      as in diffusers; the output then equals diffusers' *tiled* decode (not the plain one).
    * ``mesh``: split height (and width where the height is too small) over all its devices
      (:func:`xdit_jax.parallel.vae.sharded_decode`; ``grid`` and ``strategy`` go there). The
      frames equal the one-device decode; with tiling, each tile is split over the mesh.
    """
    if tiling is True:
        tiling = default_tiling(model.config)
    plan = tiling.plan(model.config.spatial_compression_ratio) if tiling else None
    fn = functools.partial(_decode_chunks, frame_batch_size=frame_batch_size)
    return spatial.decode(fn, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid, strategy=strategy)


def _decode_chunks(model: CogVideoXVAEDecoder, z: jax.Array, *,
                   frame_batch_size: int = LATENT_FRAMES_PER_CHUNK) -> jax.Array:
    """The plain decode (one device, no tiling): diffusers' ``_decode`` chunk loop."""
    dtype = model.dtype
    x = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(dtype)
    n, t = x.shape[:2]
    fbs = frame_batch_size
    num_chunks = max(t // fbs, 1)
    first_len = fbs + t % fbs
    out, cache = model.decode_chunk(x[:, :first_len])
    outs = [out]
    if num_chunks > 1:
        rest = x[:, first_len:]
        rest = rest.reshape((n, num_chunks - 1, fbs) + rest.shape[2:]).swapaxes(0, 1)
        graphdef, state = nnx.split(model)

        def step(carry, zc):
            m = nnx.merge(graphdef, state)
            y, carry = m.decode_chunk(zc, carry)
            return carry, y

        _, ys = jax.lax.scan(step, cache, rest)  # (chunks-1, N, T', H', W', C)
        ys = ys.swapaxes(0, 1)
        outs.append(ys.reshape((n, -1) + ys.shape[3:]))
    frames = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return jnp.transpose(frames, (0, 4, 1, 2, 3))


jit_decode = nnx.jit(decode, static_argnames=("frame_batch_size", "tiling", "slicing", "mesh", "grid", "strategy"))


def module_fn(cfg: CogVideoXVAEConfig, dtype=jnp.float32):
    return lambda: CogVideoXVAEDecoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: CogVideoXVAEConfig, dtype=None) -> dict:
    """The decoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder.

    ``dtype``: cast to it (None keeps float32). Raises ``CheckpointError`` on missing,
    unexpected or misshaped tensors.
    """
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(flat, expected, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="VAE checkpoint")


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: CogVideoXVAEConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_cogvideox_encoder`,
    image-to-video), which conversion saves next to the decoder's; empty for a checkpoint without encoder
    tensors (a decode-only export)."""
    if not any(k.startswith("encoder.") for k in flat):
        return {}
    from xdit_jax.models import vae_cogvideox_encoder

    return {"encoder_params": vae_cogvideox_encoder.params_from_torch(flat, cfg, dtype)}


def build(cfg: CogVideoXVAEConfig, params: Mapping, dtype=jnp.float32) -> CogVideoXVAEDecoder:
    """The decoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: CogVideoXVAEConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of :func:`decode` for latents of shape (B, C, T, H, W)."""
    b, _, t, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.out_channels, cfg.num_frames(t), h * s, w * s)
