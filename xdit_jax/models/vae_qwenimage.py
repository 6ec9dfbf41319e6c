"""Qwen-Image's VAE (diffusers ``AutoencoderKLQwenImage``): the Wan 2.1 VAE architecture, decoded by
:mod:`xdit_jax.models.vae_wan`.

diffusers' ``autoencoder_kl_qwenimage.py`` is ``autoencoder_kl_wan.py``'s non-residual path under other class names
(the causal convolutions, RMS norms, residual / attention / mid blocks, the up blocks and their resamplers, the
temporal upsampling with the first frame passed through, the clamp to [-1, 1]; checked by a diff of the two
sources): the same modules and keys. Its config differs only in names and defaults: ``input_channels`` (the image
channels, in and out), no ``is_residual`` / ``patch_size`` / ``decoder_base_dim``, and ``latents_mean`` /
``latents_std`` (the same defaults). Qwen-Image decodes one frame: latents (B, 16, 1, h, w) ->
(B, 3, 1, 8h, 8w).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xdit_jax.config_util import known_fields
from xdit_jax.models.vae_wan import (  # noqa: F401  (the module interface conversion and the pipeline read)
    WanVAEConfig,
    WanVAEDecoder,
    build,
    decode,
    decoded_shape,
    extra_params_from_torch,
    params_from_torch,
    unscale_latents,
)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig(WanVAEConfig):
    """``vae/config.json`` of Qwen-Image (the ``AutoencoderKLQwenImage`` arguments) as the Wan 2.1 decoder's
    config (its ``latents_mean`` / ``latents_std`` defaults are Wan 2.1's values, as in diffusers)."""

    # no such keys in AutoencoderKLQwenImage: the ratios come from the decoder's layout
    scale_factor_temporal: int | None = None
    scale_factor_spatial: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageVAEConfig:
        d = dict(d)
        channels = int(d.get("input_channels", 3))
        # the Wan-only keys do not exist in AutoencoderKLQwenImage: a config naming them is not this VAE's
        kw = known_fields(cls, d, exclude=("in_channels", "out_channels", "is_residual", "patch_size",
                                           "decoder_base_dim", "scale_factor_temporal", "scale_factor_spatial"))
        return cls(**kw, in_channels=channels, out_channels=channels)
