"""CogView4 Control (diffusers' ``CogView4ControlPipeline``, e.g. THUDM/CogView4-6B-Control) on a JAX mesh.

    pipe = CogView4ControlPipeline.from_pretrained("path/to/CogView4-Control", mesh="cfg=2,ulysses=2")
    out = pipe("a robot made of exotic candies", control_image=canny_map, height=1024, width=1024, seed=0)

A CogView4 transformer whose ``in_channels`` are twice the latents' (``out_channels``): each step concatenates the
control image's latents to the noisy latents on the channel axis (``torch.cat([latents, control], dim=1)`` as
diffusers) before the patch embedding. The control image (the user's preprocessing: an edge or depth map) is resized
to the output size (diffusers' image processor), repeated to the samples (one image for all, or one per prompt, each
prompt's samples next to each other), VAE-encoded with one posterior sample per sample and scaled by
``scaling_factor`` (diffusers' control pipeline shifts by 0, whatever the VAE's ``shift_factor``). The latents have
``in_channels // 2`` channels. Everything else is :class:`~xdit_jax.pipelines.cogview4.CogView4Pipeline`'s (the GLM
text, the schedule, CFG, the size conditions, the meshes, PipeFusion).

Over the mesh: the control latents are a :class:`xdit_jax.pipelines.flux.ChannelCondition` laid out as the latents
(B, C, h, w), batch over ``data``; in the jitted step they are doubled / padded as the latents for CFG and ``data``
and concatenated before ``model.embed``, so every image token (each sequence shard, each PipeFusion patch) carries
its own control features: CogView4's patches are ``(c, ph, pw)`` of the concatenated channels, as diffusers'.

Known differences: the posterior's samples are JAX draws from ``seed`` (diffusers draws them from torch's global
generator, not ``generator``); already-encoded (tensor) control images are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xdit_jax.pipelines.cogview4 import (
    DEFAULT_GUIDANCE,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_STEPS,
    CogView4Pipeline,
    CogView4PipelineOutput,
)
from xdit_jax.pipelines.flux import ChannelCondition, split_channels
from xdit_jax.pipelines.image import VaeEncoding

CogView4ControlPipelineOutput = CogView4PipelineOutput


def check_channels(tc, name: str = "CogView4ControlPipeline") -> None:
    """A Control transformer takes the latents' channels twice (the noisy latents, then the control image's)."""
    if tc.in_channels != 2 * tc.out_channels:
        raise ValueError(f"{name}: this transformer takes {tc.in_channels} input channels, not twice its "
                         f"{tc.out_channels} output channels (the latents + the control image's latents): is it a "
                         "CogView4 Control checkpoint?")


class CogView4ControlPipeline(VaeEncoding, CogView4Pipeline):
    """CogView4 guided by a control image (diffusers' ``CogView4ControlPipeline``) — see the module docstring."""

    PIPELINE_CLASSES = ("CogView4ControlPipeline",)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """(B, in_channels / 2, H / 8, W / 8): the noisy latents (the control image's take the other half)."""
        b, c, h, w = super().latent_shape(batch, height, width)
        return (b, c // 2, h, w)

    def _scale_latents(self, z) -> jax.Array:
        """diffusers' control latents: ``(z - 0) * scaling_factor`` (no shift, whatever the VAE's config)."""
        return z * self.vae_config.scaling_factor

    def control_condition(self, control_image, height: int, width: int, batch: int, per: int,
                          rng) -> ChannelCondition:
        """diffusers' ``prepare_image`` + ``vae.encode(...).latent_dist.sample()`` + scaling: the image(s) resized to
        ``height`` x ``width``, repeated to ``batch x per`` rows (``repeat_interleave``), one posterior sample per row
        -> (batch x per, C, h, w), placed as the latents."""
        from xdit_jax.pipelines.denoise import preprocess_image

        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if not images or any(im is None for im in images):
            raise ValueError("CogView4ControlPipeline needs control_image= (a PIL image or an (H, W, 3) array, or one "
                             "per prompt).")
        if len(images) not in (1, batch):
            raise ValueError(f"{len(images)} control images for {batch} prompts: give one, or one per prompt.")
        if any(hasattr(im, "shape") and getattr(im, "ndim", 3) != 3 for im in images):
            raise NotImplementedError("control_image: give a PIL image or an (H, W, 3) array (already encoded or "
                                      "batched tensors are not supported here).")
        pixels = jnp.concatenate([preprocess_image(im, height, width) for im in images])
        mean, std = self._moments(pixels)
        rows = batch * per // len(images)
        mean, std = jnp.repeat(mean, rows, axis=0), jnp.repeat(std, rows, axis=0)
        latents = self._scale_latents(mean + std * self._normal(jax.random.fold_in(rng, 4), mean.shape))
        return ChannelCondition(jax.device_put(latents, self._latent_sharding(latents.shape)))

    def _conditions(self, height, width, batch, per, rng, timer) -> tuple:
        with timer.stage("image_encoding"):
            condition = self.control_condition(self._control_image, height, width, batch, per, rng)
            jax.block_until_ready(condition)
        return (condition,)

    def _condition_specs(self, latent_shape: tuple) -> tuple:
        return (ChannelCondition(jax.ShapeDtypeStruct(latent_shape, jnp.float32,
                                                      sharding=self._latent_sharding(latent_shape))),)

    def compile_step(self, batch: int = 1, **kw):
        """:meth:`CogView4Pipeline.compile_step` with the control latents among the step's inputs."""
        check_channels(self.transformer_config, type(self).__name__)
        return super().compile_step(batch, **kw)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """CogView4's step with the control latents (the texts' trailing :class:`ChannelCondition`) after the noisy
        latents' channels, laid out as the transformer's batch (CFG's halves, ``data``'s padding) as they are."""
        def embed_args(x, texts, t):
            (states, mask, sizes), channels = split_channels(texts)
            x = jnp.concatenate([x, self._model_batch(channels.tokens, do_cfg).astype(x.dtype)], axis=1)
            return x, states, t, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6], mask

        return self._flow_step_fn(do_cfg, warmup, embed_args)

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 control_image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, timesteps=None, sigmas=None,
                 guidance_scale: float = DEFAULT_GUIDANCE, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, original_size=None, crops_coords_top_left=(0, 0),
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> CogView4ControlPipelineOutput:
        """diffusers' CogView4ControlPipeline call and defaults (``generator`` -> ``seed``; ``output_type`` "np" or
        "latent"). ``control_image``: a PIL image or an (H, W, 3) array (uint8, or floats in [0, 1]), or one per
        prompt, resized to the output size (default: the text-to-image pipeline's); ``latents``: (B, in_channels / 2,
        H / 8, W / 8)."""
        check_channels(self.transformer_config, type(self).__name__)
        if control_image is None or (isinstance(control_image, (list, tuple)) and not control_image):
            raise ValueError("CogView4ControlPipeline needs control_image= (the edge / depth map to follow).")
        self._control_image = control_image
        try:
            return super().__call__(prompt, negative_prompt, height=height, width=width,
                                    num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                                    guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                                    latents=latents, prompt_embeds=prompt_embeds,
                                    negative_prompt_embeds=negative_prompt_embeds, original_size=original_size,
                                    crops_coords_top_left=crops_coords_top_left,
                                    max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                                    progress=progress)
        finally:
            self._control_image = None
