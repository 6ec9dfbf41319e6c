"""What the text-to-video families (CogVideoX, Mochi, Wan, Latte, HunyuanVideo) share on top of
:class:`PipelineBase`, as :mod:`xdit_jax.pipelines.image` does for the image families: the request checks
and defaults of the family's module, a causal VAE's latent shape and its decode over the mesh."""

from __future__ import annotations

import jax.numpy as jnp

from xdit_jax.pipelines.denoise import PipelineBase


class VideoPipelineBase(PipelineBase):
    """A video family's pipeline. Its module's functions of the configs alone (the CLI calls them before any
    weights load) serve the methods: ``_check_request = staticmethod(check_request)`` with the signature
    ``(tc, vc, height, width, num_frames, batch, mesh_spec, guidance)``, ``_default_video =
    staticmethod(default_video)`` taking ``(tc, vc)``. ``_vae``: the VAE module (``decode(vae, z, **kw)``,
    ``unscale_latents(vc, latents)``) of the default :meth:`_decode_fn`."""

    _check_request = None
    _default_video = None
    _vae = None

    def check_inputs(self, height: int, width: int, num_frames: int, batch: int, guidance_scale: float) -> None:
        """Refuse what the model cannot take, before any heavy work, saying what would work (``guidance_scale``:
        the scale that decides whether the step runs both CFG halves)."""
        self._check_request(self.transformer_config, self.vae_config, height, width, num_frames, batch,
                            self.mesh_spec, guidance_scale)

    def default_video(self) -> dict:
        """Default height, width, num_frames and fps of this checkpoint."""
        return self._default_video(self.transformer_config, self.vae_config)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, (F - 1) // st + 1, H / s, W / s), diffusers' layout, for a causal VAE of spatial factor s and
        temporal factor st."""
        vc = self.vae_config
        s, st = vc.spatial_compression_ratio, vc.temporal_compression_ratio
        return (batch, self.transformer_config.in_channels, (num_frames - 1) // st + 1, height // s, width // s)

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of the latents (B, C, F, h, w), unscaled as the family's
        diffusers pipeline does (``_vae.unscale_latents``) -> (B, F, H, W, 3) in [0, 1]."""
        vc, dtype, vae_module = self.vae_config, self.dtype, self._vae

        def decode(vae, latents, **kw):
            z = vae_module.unscale_latents(vc, latents.astype(jnp.float32))
            return vae_module.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode("fn", decode)
