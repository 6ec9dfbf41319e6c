"""The decoder of diffusers' ``AutoencoderKL`` (the SD / SDXL image VAE) in Flax NNX (decode only).

The VAE of PixArt-alpha (the SD VAE) and PixArt-Sigma (the SDXL VAE). Submodules carry
diffusers' attribute names (``decoder.up_blocks.0.resnets.1.conv1``,
``decoder.mid_block.attentions.0.to_out.0``, ...), so :func:`xdit_jax.keymap.map_state_dict`
derives the key map; the encoder's and ``quant_conv``'s tensors are in :data:`TORCH_IGNORE` (conversion
keeps the encoder's aside: :func:`extra_params_from_torch`, :mod:`xdit_jax.models.vae_kl_encoder`), and
the pre-0.14 attention names some checkpoints still carry (``query``/``key``/``value``/
``proj_attn``) are renamed on load as diffusers does (:func:`_rename_deprecated_attention`).

Layout: channels-last ``(N, H, W, C)`` inside; :func:`decode` takes and returns diffusers'
``(B, C, H, W)``.

The network, as diffusers builds it (``Decoder`` with ``norm_type="group"``), checked against
its source:

* ``post_quant_conv`` (1x1, if ``use_post_quant_conv``), ``conv_in`` (3x3 to the last block's
  width), the mid block, the up blocks over the reversed ``block_out_channels``, then
  ``conv_norm_out`` (GroupNorm eps 1e-6), **SiLU whatever ``act_fn`` is** (``nn.SiLU()``), and
  ``conv_out`` (3x3).
* ``ResnetBlock2D`` (no time embedding): GroupNorm(eps 1e-6)-act-conv3x3-GroupNorm-act-conv3x3
  plus the input, through a 1x1 ``conv_shortcut`` when the width changes;
  ``output_scale_factor`` is 1 everywhere in this decoder, so there is no division.
* ``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets, then (all but the last block)
  ``Upsample2D``: nearest x2 (``F.interpolate(scale_factor=2)``) and a 3x3 conv.
* ``UNetMidBlock2D``: resnet, [attention], resnet. The attention (``Attention`` with
  ``_from_deprecated_attn_block``) has ``heads = channels // attention_head_dim`` with
  ``attention_head_dim = channels``: always **one head** of the full width, scale
  ``channels ** -0.5``; GroupNorm (``norm_num_groups``, eps 1e-6) first, ``to_q``/``to_k``/
  ``to_v``/``to_out.0`` linears with bias, residual connection, ``rescale_output_factor`` 1.
  Logits and softmax are computed in float32 (diffusers asks for ``upcast_softmax``), the
  queries in chunks so that no more than :data:`ATTENTION_MAX_SCORES` logits exist at once
  (a 1024x1024 SDXL image has 16384 latent pixels: 2^28 logits unchunked).
* GroupNorm statistics are always float32 (:func:`xdit_jax.parallel.vae.group_norm_stats`).

Spatial sharding (``decode(..., mesh=...)``, :func:`xdit_jax.parallel.vae.sharded_decode`): the
default ``"shard_map"`` strategy works as for the CogVideoX VAE — 'same' convolutions pad
through ``conv_halo`` and GroupNorm statistics are global through ``group_norm_stats`` — and the
mid-block attention, the one layer that reads every pixel, takes its keys and values through the
hook ``gather_plane``: one all-gather of the concatenated K and V over the device grid, padding
cropped, so each device attends its own query rows to exactly the keys one device would see.
That is exact (each query's softmax runs over the same keys; only the summation order differs)
and simple (one collective, no masks), and it splits the attention's logits — its biggest
buffer — over the devices, where the ``"gspmd"`` strategy (also exact, needs no hook) leaves
XLA to decide how to partition the attention. Both strategies are supported and tested.

Tiling (``tiling=True``) is diffusers' ``enable_tiling``: tiles of ``sample_size`` pixels
overlapping by 1/4 (:func:`default_tiling`), mapped onto
:class:`xdit_jax.parallel.vae.TilingConfig`; each tile runs its own attention and GroupNorms,
as in diffusers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import FromConfigDict
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_layers import Conv, GroupNorm
from xdit_jax.parallel import vae as spatial
from xdit_jax.parallel.vae import TilingConfig

# Torch keys of a VAE checkpoint that carry nothing the decoder uses.
TORCH_IGNORE: tuple[str, ...] = (r"^encoder\.", r"^quant_conv\.")
TORCH_RENAMES: tuple[tuple[str, str], ...] = ()  # (regex, replacement) on torch names; none needed

# Up to this many attention logits (per call, all batch elements) exist at once; more queries
# are processed in chunks (lax.map). 2^26 float32 logits = 256 MiB.
ATTENTION_MAX_SCORES = 1 << 26

# diffusers' ``get_activation`` (ACT2CLS); torch's nn.GELU is the exact (erf) GELU.
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
_UP_BLOCK_TYPES = ("UpDecoderBlock2D", "UNetResUpDecoderBlock2D")  # get_up_block strips "UNetRes"


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(FromConfigDict):
    """``vae/config.json`` of an SD / SDXL / PixArt pipeline (the ``AutoencoderKL`` arguments)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        bad = [t for t in self.up_block_types if t not in _UP_BLOCK_TYPES]
        if bad:
            raise ValueError(f"AutoencoderKL: unsupported up_block_types {bad} (only UpDecoderBlock2D; "
                             f"attention up blocks and spatial norms are not implemented)")
        if not self.block_out_channels:
            raise ValueError("AutoencoderKL: block_out_channels is empty")
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(f"AutoencoderKL: {len(self.up_block_types)} up_block_types for "
                             f"{len(self.block_out_channels)} block_out_channels; they must match")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"AutoencoderKL: norm_num_groups={self.norm_num_groups} must divide every "
                             f"block_out_channels {self.block_out_channels}")
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"AutoencoderKL: unsupported act_fn {self.act_fn!r} "
                             f"(supported: {sorted(_ACTIVATIONS)})")
        if self.layers_per_block < 0 or self.latent_channels < 1:
            raise ValueError(f"AutoencoderKL: invalid layers_per_block={self.layers_per_block} or "
                             f"latent_channels={self.latent_channels}")

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_size(self) -> int:
        """diffusers' ``tile_sample_min_size``: ``sample_size`` (its first entry if a list)."""
        s = self.sample_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)


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


def _conv3x3(cin: int, cout: int, dtype) -> Conv:
    return Conv(cin, cout, (3, 3), ((1, 1), (1, 1)), dtype=dtype)


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, groups: int, act_fn: str, dtype=jnp.float32):
        self.act_fn = act_fn.lower()
        self.norm1 = GroupNorm(groups, in_channels, eps=1e-6, dtype=dtype)
        self.conv1 = _conv3x3(in_channels, out_channels, dtype)
        self.norm2 = GroupNorm(groups, out_channels, eps=1e-6, dtype=dtype)
        self.conv2 = _conv3x3(out_channels, out_channels, dtype)
        self.conv_shortcut = (Conv(in_channels, out_channels, (1, 1), dtype=dtype)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *,
              max_scores: int = ATTENTION_MAX_SCORES, q_frames: jax.Array | None = None,
              k_frames: jax.Array | None = None) -> jax.Array:
    """One-head softmax attention: ``q`` (N, Lq, C), ``k``/``v`` (N, Lk, C) -> (N, Lq, C).

    Logits, softmax and the weighted sum in float32; returns ``q.dtype``. Queries are processed
    in chunks of at most ``max_scores // (N * Lk)`` (one ``lax.map``), which changes no number:
    every query's row is computed alone anyway.

    ``q_frames`` (Lq,) / ``k_frames`` (Lk,) (int, both or neither): a query sees only the keys of
    its own and earlier frames (``k_frames <= q_frames``; the others' logits are -inf, as diffusers'
    ``prepare_causal_attention_mask`` adds). Every query must see at least one key.
    """
    n, lq, c = q.shape
    lk = k.shape[1]
    vf = v.astype(jnp.float32)
    masked = q_frames is not None
    if masked:
        q_frames = jnp.asarray(q_frames, jnp.int32)
        k_frames = jnp.asarray(k_frames, jnp.int32)

    def attend(args):
        qc, qf = args
        s = jnp.einsum("nqc,nkc->nqk", qc, k, preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(k_frames[None, None, :] <= qf[None, :, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("nqk,nkc->nqc", p, vf).astype(q.dtype)

    chunk = max(1, max_scores // max(n * lk, 1))
    if chunk >= lq:
        return attend((q, q_frames))
    num = -(-lq // chunk)
    qp = jnp.pad(q, ((0, 0), (0, num * chunk - lq), (0, 0)))
    qs = qp.reshape(n, num, chunk, c).swapaxes(0, 1)
    # padded queries get the last frame's id (they see keys, no NaN; their rows are dropped)
    qfs = (jnp.pad(q_frames, (0, num * chunk - lq), mode="edge").reshape(num, chunk) if masked
           else jnp.zeros((num, 0), jnp.int32))
    out = jax.lax.map(lambda a: attend((a[0], a[1] if masked else None)), (qs, qfs))  # (num, N, chunk, C)
    return out.swapaxes(0, 1).reshape(n, num * chunk, c)[:, :lq]


class Attention(nnx.Module):
    """The mid block's spatial self-attention (diffusers' ``Attention`` with a group norm, one head,
    residual connection). Keys and values come from the whole image plane (``gather_plane``)."""

    def __init__(self, channels: int, *, groups: int, dtype=jnp.float32):
        self.group_norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.to_q = Dense(channels, channels, dtype=dtype)
        self.to_k = Dense(channels, channels, dtype=dtype)
        self.to_v = Dense(channels, channels, dtype=dtype)
        self.to_out = nnx.List([Dense(channels, channels, dtype=dtype)])
        self.scale = channels ** -0.5  # heads = 1, head_dim = channels

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = self.group_norm(x)
        q = self.to_q(y).reshape(n, h * w, c)
        # Under a spatial shard: the keys and values of every pixel (one all-gather, padding cropped).
        kv = spatial.gather_plane(jnp.concatenate([self.to_k(y), self.to_v(y)], axis=-1))
        kv = kv.reshape(n, -1, 2 * c)
        o = attention(q, kv[..., :c], kv[..., c:], self.scale).reshape(n, h, w, c)
        return self.to_out[0](o) + x


class UNetMidBlock2D(nnx.Module):
    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool, dtype=jnp.float32):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, act_fn=act_fn, dtype=dtype)
                                 for _ in range(2)])
        self.attentions = (nnx.List([Attention(channels, groups=groups, dtype=dtype)])
                           if add_attention else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample2D(nnx.Module):
    """Nearest x2 in height and width, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype=jnp.float32):
        self.conv = _conv3x3(channels, channels, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, groups: int, act_fn: str,
                 add_upsample: bool, dtype=jnp.float32):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, act_fn=act_fn,
                          dtype=dtype)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32):
        # (AutoencoderKLFlux2's decoder may have widths of its own: decoder_block_out_channels)
        ch = list(reversed(getattr(cfg, "decoder_block_out_channels", None) or cfg.block_out_channels))
        groups, act = cfg.norm_num_groups, cfg.act_fn
        self.conv_in = _conv3x3(cfg.latent_channels, ch[0], dtype)
        self.mid_block = UNetMidBlock2D(ch[0], groups=groups, act_fn=act,
                                        add_attention=cfg.mid_block_add_attention, dtype=dtype)
        blocks, out_ch = [], ch[0]
        for i in range(len(cfg.up_block_types)):
            prev, out_ch = out_ch, ch[i]
            blocks.append(UpDecoderBlock2D(prev, out_ch, cfg.layers_per_block + 1, groups=groups, act_fn=act,
                                           add_upsample=i != len(ch) - 1, dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = _conv3x3(ch[-1], cfg.out_channels, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is nn.SiLU() always


class AutoencoderKLDecoder(nnx.Module):
    """The decode half of ``AutoencoderKL``: ``post_quant_conv`` (if used) and ``decoder``."""

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.decoder = Decoder(cfg, dtype=dtype)
        self.post_quant_conv = (Conv(cfg.latent_channels, cfg.latent_channels, (1, 1), dtype=dtype)
                                if cfg.use_post_quant_conv else None)

    def __call__(self, z: jax.Array) -> jax.Array:
        """Latents channels-last (N, h, w, C_latent) -> images channels-last (N, H, W, C_out)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------
# Public API


def default_tiling(cfg: AutoencoderKLConfig) -> TilingConfig:
    """diffusers' ``AutoencoderKL.enable_tiling()``: square tiles of ``sample_size`` pixels
    (``tile_latent_min_size = sample_size / 2**(blocks-1)`` latents), ``tile_overlap_factor`` 0.25
    both ways. :meth:`TilingConfig.plan` then derives diffusers' ``overlap_size``, ``blend_extent``
    and ``row_limit`` with the same ``int()`` truncations."""
    s = cfg.tile_sample_size
    return TilingConfig(s, s, 0.25, 0.25)


def decode(model: AutoencoderKLDecoder, z: jax.Array, *, tiling: TilingConfig | bool | None = None,
           slicing: bool = False, mesh=None, grid: tuple[int, int] | None = None,
           strategy: str = "shard_map") -> jax.Array:
    """``vae.decode(z).sample`` of diffusers: latents (B, C_latent, h, w), already unscaled (see
    :func:`unscale_latents`), -> images (B, C_out, h*s, w*s), s = 2**(blocks-1) (8 for SD/SDXL),
    roughly in [-1, 1] and not clipped.

    Computes in the model's dtype (its parameters' dtype) and returns that dtype. Pure and
    jittable (:data:`jit_decode`). Options (all static), composed as diffusers does
    (:func:`xdit_jax.parallel.vae.decode`):

    * ``slicing``: one batch element at a time (diffusers' ``enable_slicing``); same numbers.
    * ``tiling``: diffusers' ``enable_tiling`` — True for its settings (:func:`default_tiling`),
      or a :class:`TilingConfig`. Used only when the latent exceeds a tile, as in diffusers; the
      output then equals diffusers' *tiled* decode.
    * ``mesh``: split height (and width where the height is too small) over all its devices
      (``grid`` and ``strategy`` go to :func:`xdit_jax.parallel.vae.sharded_decode`); equals the
      one-device decode. With tiling, each tile is split over the mesh.
    """
    if tiling is True:
        tiling = default_tiling(model.config)
    plan = tiling.plan(model.config.spatial_compression_ratio) if tiling else None
    return spatial.decode(_decode_plain, model, z, mesh=mesh, tiling=plan, slicing=slicing, grid=grid,
                          strategy=strategy)


def _decode_plain(model: AutoencoderKLDecoder, z: jax.Array) -> jax.Array:
    """One device (or one shard), no tiling: NCHW in, NCHW out."""
    return jnp.transpose(model(jnp.transpose(z, (0, 2, 3, 1))), (0, 3, 1, 2))


jit_decode = nnx.jit(decode, static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))


def unscale_latents(cfg: AutoencoderKLConfig, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> the VAE's input, as diffusers' pipelines do before ``vae.decode``:
    ``latents * std / scaling_factor + mean`` when the config has ``latents_mean`` and
    ``latents_std`` (the SDXL pipeline's rule), else ``latents / scaling_factor + shift_factor``
    (no shift when None; PixArt-alpha/Sigma: ``latents / scaling_factor``)."""
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        mean = jnp.asarray(cfg.latents_mean, latents.dtype).reshape(shape)
        std = jnp.asarray(cfg.latents_std, latents.dtype).reshape(shape)
        return latents * std / cfg.scaling_factor + mean
    out = latents / cfg.scaling_factor
    return out + cfg.shift_factor if cfg.shift_factor is not None else out


def module_fn(cfg: AutoencoderKLConfig, dtype=jnp.float32):
    return lambda: AutoencoderKLDecoder(cfg, dtype=dtype)


_DEPRECATED_ATTENTION = re.compile(r"^((?:de|en)coder\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated_attention(flat: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """diffusers' ``_fix_state_dict_keys_on_load``: old checkpoints name the mid-block attention's
    linears ``query``/``key``/``value``/``proj_attn``; map them to ``to_q``/.../``to_out.0``."""
    if not any(_DEPRECATED_ATTENTION.match(k) for k in flat):
        return flat
    return {_DEPRECATED_ATTENTION.sub(lambda m: f"{m.group(1)}.{_DEPRECATED_NAMES[m.group(2)]}.", k): v
            for k, v in flat.items()}


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: AutoencoderKLConfig, dtype=None) -> dict:
    """The decoder's params (pure dict) from the flat torch state dict of a ``vae/`` folder.

    ``dtype``: cast to it (None keeps float32). Raises ``CheckpointError`` on missing,
    unexpected or misshaped tensors.
    """
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(_rename_deprecated_attention(flat), expected, renames=TORCH_RENAMES,
                          ignore=TORCH_IGNORE, dtype=dtype, what="VAE checkpoint")


def extra_params_from_torch(flat: Mapping[str, np.ndarray], cfg: AutoencoderKLConfig, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_kl_encoder`, for the pipelines
    that encode an image: FLUX.1 Kontext), which conversion saves next to the decoder's; empty for a checkpoint
    without encoder tensors or with down blocks the encoder does not implement."""
    from xdit_jax.models import vae_kl_encoder

    if not vae_kl_encoder.has_encoder(flat) or any(t not in vae_kl_encoder._DOWN_BLOCK_TYPES
                                                   for t in cfg.down_block_types):
        return {}
    return {"encoder_params": vae_kl_encoder.params_from_torch(flat, cfg, dtype)}


def build(cfg: AutoencoderKLConfig, params: Mapping, dtype=jnp.float32) -> AutoencoderKLDecoder:
    """The decoder module holding ``params`` (cast to ``dtype``)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


def decoded_shape(cfg: AutoencoderKLConfig, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape of :func:`decode` for latents of shape (B, C, h, w)."""
    b, _, h, w = latent_shape
    s = cfg.spatial_compression_ratio
    return (b, cfg.out_channels, h * s, w * s)
