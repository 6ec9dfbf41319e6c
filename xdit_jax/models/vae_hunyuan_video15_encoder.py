"""The encoder of diffusers' ``AutoencoderKLHunyuanVideo15`` in Flax NNX: video (B, C, T, H, W) in [-1, 1] -> the
posterior's mean latents, diffusers' ``vae.encode(x).latent_dist.mode()`` (image-to-video's first-frame condition).

Submodules carry diffusers' names (the decoder's tensors are ignored); channels-last ``(N, T, H, W, C)`` inside. The
layers are the decoder's (:mod:`xdit_jax.models.vae_hunyuan_video15`: causal replicate-padded convolutions, RMS
norms, the resnets, the mid block with its frame-causal attention). New here (``HunyuanVideo15Encoder3D``):

* ``HunyuanVideo15Downsample``: a causal conv to ``out / factor`` channels, then DC-AE's space-to-depth (time,
  height, width -> channels ``(r1, r2, r3, c)``), plus a parameterless shortcut: the input's space-to-depth averaged
  over groups of channels. With temporal downsampling the first frame is downsampled in space only (its conv
  output duplicated, its shortcut averaged over half the group), the others in time and space: T frames ->
  ``1 + (T - 1) / 2``. Block ``i`` downsamples in space if ``i < log2(spatial_compression_ratio)``, in time too if
  ``i >= log2(spatial / temporal)``.
* after the mid block: ``norm_out``, SiLU, ``conv_out`` to ``2 x latent_channels``, plus the mid block's output
  averaged over groups of ``block_out_channels[-1] / (2 x latent_channels)`` channels; the mode is the first half.

No tiling (diffusers' ``enable_tiling`` is off by default); the image-to-video pipeline encodes one frame.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.vae_hunyuan_video import HunyuanVideoCausalConv3d
from xdit_jax.models.vae_hunyuan_video15 import HunyuanVideo15VAEConfig, MidBlock, ResnetBlock, _rms

TORCH_IGNORE: tuple[str, ...] = (r"^decoder\.",)


def space_to_depth(x, r1: int, r2: int, r3: int):
    """diffusers' ``_dcae_downsample_rearrange`` channels-last: (N, T r1, H r2, W r3, c) -> (N, T, H, W, r1 r2 r3 c)."""
    n, t, h, w, c = x.shape
    x = x.reshape(n, t // r1, r1, h // r2, r2, w // r3, r3, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, t // r1, h // r2, w // r3, r1 * r2 * r3 * c)


def group_mean(x, groups_of: int):
    """Channels (o g) -> o, each the mean of its ``g`` consecutive channels (diffusers' ``view(..).mean(dim=2)``)."""
    return x.reshape(x.shape[:-1] + (x.shape[-1] // groups_of, groups_of)).mean(axis=-1)


class Downsample(nnx.Module):
    def __init__(self, cin: int, cout: int, temporal: bool, *, dtype=jnp.float32):
        self.temporal = temporal
        factor = 8 if temporal else 4
        self.conv = HunyuanVideoCausalConv3d(cin, cout // factor, 3, dtype=dtype)
        self.group_size = factor * cin // cout

    def __call__(self, x):
        h = self.conv(x)
        if not self.temporal:
            return space_to_depth(h, 1, 2, 2) + group_mean(space_to_depth(x, 1, 2, 2), self.group_size)
        h_first = space_to_depth(h[:, :1], 1, 2, 2)
        h_first = jnp.concatenate([h_first, h_first], axis=-1)
        x_first = group_mean(space_to_depth(x[:, :1], 1, 2, 2), self.group_size // 2)
        if x.shape[1] == 1:
            return h_first + x_first
        h_next = space_to_depth(h[:, 1:], 2, 2, 2)
        x_next = group_mean(space_to_depth(x[:, 1:], 2, 2, 2), self.group_size)
        return jnp.concatenate([h_first, h_next], axis=1) + jnp.concatenate([x_first, x_next], axis=1)


class DownBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, down: tuple[int, bool] | None, *, dtype=jnp.float32):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, dtype=dtype) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample(cout, down[0], down[1], dtype=dtype)]) if down is not None else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class Encoder3D(nnx.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig, *, dtype=jnp.float32):
        ch = cfg.block_out_channels
        n_s = cfg.n_spatial
        n_st = int(np.log2(cfg.spatial_compression_ratio // cfg.temporal_compression_ratio))
        self.conv_in = HunyuanVideoCausalConv3d(cfg.in_channels, ch[0], 3, dtype=dtype)
        blocks, cin = [], ch[0]
        for i, c in enumerate(ch):
            down = None
            if i < n_s:
                down = (ch[i + 1] if cfg.downsample_match_channel else c, i >= n_st)
            blocks.append(DownBlock(cin, c, cfg.layers_per_block, down, dtype=dtype))
            cin = c if down is None else down[0]
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(ch[-1], dtype=dtype)
        self.norm_out = _rms(ch[-1], dtype)
        self.conv_out = HunyuanVideoCausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype)
        self.group_size = ch[-1] // (2 * cfg.latent_channels)

    def __call__(self, x):
        h = self.conv_in(x)
        for b in self.down_blocks:
            h = b(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h))) + group_mean(h, self.group_size)


class HunyuanVideo15VAEEncoder(nnx.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig, *, dtype=jnp.float32):
        self.config, self.dtype = cfg, dtype
        self.encoder = Encoder3D(cfg, dtype=dtype)

    def __call__(self, x):
        """Video channels-last (N, T, H, W, C) -> the moments (N, T', h, w, 2 latent_channels)."""
        return self.encoder(x.astype(self.dtype))


def encode(model: HunyuanVideo15VAEEncoder, x):
    """Video (B, C, T, H, W) in [-1, 1] (T = 1 + 4k) -> mean latents (B, latent_channels, 1 + k, H / s, W / s);
    not scaled (multiply by ``scaling_factor``)."""
    cfg = model.config
    s = cfg.spatial_compression_ratio
    if x.shape[-2] % s or x.shape[-1] % s or (x.shape[2] - 1) % cfg.temporal_compression_ratio:
        raise ValueError(f"video {tuple(x.shape)}: height and width must be multiples of {s} and the frames "
                         f"{cfg.temporal_compression_ratio}k + 1.")
    moments = model(jnp.transpose(x, (0, 2, 3, 4, 1)))
    return jnp.transpose(moments[..., : cfg.latent_channels], (0, 4, 1, 2, 3))


jit_encode = nnx.jit(encode)


def module_fn(cfg: HunyuanVideo15VAEConfig, dtype=jnp.float32):
    return lambda: HunyuanVideo15VAEEncoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping[str, np.ndarray], cfg: HunyuanVideo15VAEConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(module_fn(cfg, dtype or jnp.float32)), ignore=TORCH_IGNORE,
                          dtype=dtype, what="HunyuanVideo-1.5 VAE checkpoint (encoder)")


def build(cfg: HunyuanVideo15VAEConfig, params: Mapping, dtype=jnp.float32) -> HunyuanVideo15VAEEncoder:
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)
