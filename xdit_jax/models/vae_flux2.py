"""diffusers' ``AutoencoderKLFlux2`` (FLUX.2's VAE): decode only, on :mod:`xdit_jax.models.vae_kl`.

It is ``AutoencoderKL`` (the same ``Encoder`` / ``Decoder``, ``quant_conv`` / ``post_quant_conv``) with:

* 32 latent channels (the FLUX.1 VAE: 16), and ``decoder_block_out_channels`` (the decoder's widths where they
  differ from the encoder's; None: the same) — :class:`vae_kl.Decoder` reads it;
* ``bn``: a ``BatchNorm2d(patch_size^2 x latent_channels, affine=False)`` whose running statistics the pipeline uses
  to normalise the *patchified* latents (2 x 2 patches: 128 channels): ``(z - mean) / sqrt(var + batch_norm_eps)``
  into the transformer, ``z * sqrt(var + eps) + mean`` out of it (:func:`denormalize`). They are parameters of the
  decoder module here (``bn.running_mean`` / ``bn.running_var``; ``num_batches_tracked`` not read);
* no ``scaling_factor`` / ``shift_factor`` (the statistics replace them).

The encoder (conversion keeps it aside as ``vae/encoder_params``, :func:`vae_kl.extra_params_from_torch`) is not
used by the text-to-image pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import vae_kl

TORCH_IGNORE = vae_kl.TORCH_IGNORE + (r"^bn\.num_batches_tracked$",)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLFlux2Config(vae_kl.AutoencoderKLConfig):
    """``vae/config.json`` of a FLUX.2 pipeline (diffusers' defaults)."""

    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    sample_size: int | tuple[int, ...] = 1024
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)

    def validate(self) -> None:
        super().validate()
        dec = self.decoder_block_out_channels
        if dec is not None and (len(dec) != len(self.block_out_channels) or any(c % self.norm_num_groups
                                                                                for c in dec)):
            raise ValueError(f"AutoencoderKLFlux2: decoder_block_out_channels {dec} must have one width per block "
                             f"({len(self.block_out_channels)}), each a multiple of norm_num_groups.")
        if tuple(self.patch_size) != (2, 2):
            raise ValueError(f"AutoencoderKLFlux2: patch_size {self.patch_size}: the FLUX.2 pipelines patchify 2 x 2.")

    @property
    def bn_channels(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.latent_channels


class BatchStats(nnx.Module):
    """The running statistics of ``BatchNorm2d(affine=False)`` (eval mode)."""

    def __init__(self, channels: int, *, dtype=jnp.float32):
        self.running_mean = nnx.Param(jnp.zeros((channels,), dtype))
        self.running_var = nnx.Param(jnp.ones((channels,), dtype))


class AutoencoderKLFlux2Decoder(vae_kl.AutoencoderKLDecoder):
    """``post_quant_conv`` + ``decoder`` (as :class:`vae_kl.AutoencoderKLDecoder`) and ``bn``'s statistics."""

    def __init__(self, cfg: AutoencoderKLFlux2Config, *, dtype=jnp.float32):
        super().__init__(cfg, dtype=dtype)
        self.bn = BatchStats(cfg.bn_channels, dtype=dtype)


def bn_stats(vae: AutoencoderKLFlux2Decoder):
    """(mean, std) (C,) float32: ``running_mean``, ``sqrt(running_var + batch_norm_eps)``."""
    mean = vae.bn.running_mean[...].astype(jnp.float32)
    std = jnp.sqrt(vae.bn.running_var[...].astype(jnp.float32) + vae.config.batch_norm_eps)
    return mean, std


def denormalize(vae: AutoencoderKLFlux2Decoder, latents):
    """The pipeline's ``latents * bn_std + bn_mean`` on patchified latents (B, 4 C, h, w) (float32)."""
    mean, std = bn_stats(vae)
    return latents.astype(jnp.float32) * std[None, :, None, None] + mean[None, :, None, None]


def module_fn(cfg: AutoencoderKLFlux2Config, dtype=jnp.float32):
    return lambda: AutoencoderKLFlux2Decoder(cfg, dtype=dtype)


def params_from_torch(flat: Mapping, cfg: AutoencoderKLFlux2Config, dtype=None) -> dict:
    """The decoder's and ``bn``'s params from a ``vae/`` folder's state dict (the encoder's: see
    :func:`extra_params_from_torch`)."""
    expected = expected_shapes(module_fn(cfg, dtype or jnp.float32))
    return map_state_dict(vae_kl._rename_deprecated_attention(flat), expected, ignore=TORCH_IGNORE, dtype=dtype,
                          what="FLUX.2 VAE checkpoint")


def extra_params_from_torch(flat: Mapping, cfg: AutoencoderKLFlux2Config, dtype=None) -> dict:
    """``{"encoder_params": ...}``: the encoder's params (:mod:`xdit_jax.models.vae_kl_encoder`), kept aside by
    conversion for image conditioning (not used by the text-to-image pipeline)."""
    return vae_kl.extra_params_from_torch({k: v for k, v in flat.items() if not k.startswith("bn.")}, cfg, dtype)


def build(cfg: AutoencoderKLFlux2Config, params: Mapping, dtype=jnp.float32) -> AutoencoderKLFlux2Decoder:
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), dict(params))
    return build_module(module_fn(cfg, dtype), params)


decode = vae_kl.decode
