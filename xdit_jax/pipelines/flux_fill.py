"""FLUX.1 Fill (inpainting / outpainting) and FLUX.1 Control (Canny, Depth): diffusers' ``FluxFillPipeline`` and
``FluxControlPipeline`` on a JAX mesh.

    pipe = FluxFillPipeline.from_pretrained("path/to/FLUX.1-Fill-dev", mesh="ulysses=4", dtype="bfloat16")
    out = pipe("a white paper cup", image=image, mask_image=mask, height=1024, width=1024, seed=0)

    pipe = FluxControlPipeline.from_pretrained("path/to/FLUX.1-Canny-dev", mesh="ring=2,ulysses=2")
    out = pipe("a robot made of exotic candies", control_image=canny_map, height=1024, width=1024)

Both checkpoints are FLUX.1 transformers whose ``x_embedder`` takes more channels than the latents have: each
step concatenates a conditioning to the packed latents on the feature axis (``torch.cat(..., dim=2)`` as diffusers),
token by token, before the transformer embeds them:

* Fill (``in_channels`` 384 = 64 + 64 + 256): the masked image (the image with the repainted region set to 0 in
  [-1, 1]) VAE-encoded (the posterior sampled) and packed, then the full-resolution mask folded 8 x 8 (the VAE factor)
  into 64 channels per latent pixel and packed (256). The start is image-to-image's (``strength``, default 1: pure
  noise); nothing is blended after the steps (the model repaints).
* Control (``in_channels`` 128 = 64 + 64): the control image (a Canny edge map, a depth map: the user's
  preprocessing, as diffusers) VAE-encoded (sampled) and packed.

The conditioning is a :class:`xdit_jax.pipelines.flux.ChannelCondition` laid out as the latents, so the concatenation
happens in the jitted step on the same token rows as the latents': sequence parallelism and PipeFusion shard it with
them, and CFG / ``data`` padding repeat it as the latents. Everything else is :class:`FluxPipeline`'s (embedded
guidance, the schedule with dynamic shifting, the meshes, PipeFusion). Beyond diffusers, diffusers' FluxPipeline true
CFG (``negative_prompt`` with ``true_cfg_scale > 1``) is accepted too, both halves seeing the conditioning.

Known differences: the draws (the posteriors' samples, the noise) are JAX draws from ``seed`` (diffusers': torch's
``generator``); array images and masks are taken at the output size; with several images (one per prompt) each
prompt's samples take its own (diffusers tiles Fill's image latents over the samples); Fill's ``masked_image_latents``
and Control's already-encoded (tensor) control images are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xdit_jax.pipelines.flux import ChannelCondition, FluxPipeline, FluxPipelineOutput, pack_latents
from xdit_jax.pipelines.image import VaeEncoding, forward_call, vae_scale_factor
from xdit_jax.schedulers import flow_match


def fold_mask(mask, factor: int):
    """diffusers' Fill mask: (B, 1, H, W) -> (B, factor^2, H/factor, W/factor), each latent pixel's factor x factor
    mask values as channels (row-major within the block)."""
    b, _, hh, ww = mask.shape
    h, w = hh // factor, ww // factor
    return mask[:, 0].reshape(b, h, factor, w, factor).transpose(0, 2, 4, 1, 3).reshape(b, factor * factor, h, w)


def _images(image, batch: int, what: str) -> list:
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images or any(im is None for im in images):
        raise ValueError(f"{what}: give an image (or one per prompt).")
    if len(images) not in (1, batch):
        raise ValueError(f"{len(images)} images for {batch} prompts: give one image, or one per prompt ({what}).")
    return images


class _Conditioned(VaeEncoding, FluxPipeline):
    """What Fill and Control share: the check that the folder's transformer takes the conditioning's channels."""

    def _extra_channels(self) -> int:
        raise NotImplementedError

    def _check_channels(self) -> None:
        tc = self.transformer_config
        extra = self._extra_channels()
        if tc.in_channels != tc.out_ch + extra:
            raise ValueError(f"{type(self).__name__}: this transformer takes {tc.in_channels} input channels, not the "
                             f"latents' {tc.out_ch} + the conditioning's {extra} (is it a {self.PIPELINE_CLASSES[0]} "
                             "checkpoint?).")

    def _placed(self, tokens) -> ChannelCondition:
        return ChannelCondition(jax.device_put(tokens, self._latent_sharding(tokens.shape)))


class FluxFillPipeline(_Conditioned):
    """Inpainting / outpainting with FLUX.1 Fill (diffusers' ``FluxFillPipeline``) — see the module docstring.
    ``mask_image``: white repaints, black keeps (binarized at 0.5 after diffusers' resize)."""

    PIPELINE_CLASSES = ("FluxFillPipeline",)

    def _extra_channels(self) -> int:
        return self.transformer_config.out_ch + 4 * vae_scale_factor(self.vae_config) ** 2

    def fill_condition(self, image, mask, height: int, width: int, batch: int, per: int, rng) -> ChannelCondition:
        """diffusers' ``prepare_mask_latents``: the masked image(s) encoded (the posterior sampled, the third draw)
        and packed, then the (1, 1, H, W) mask folded and packed -> (batch x per, tokens, 4C + 4 f^2)."""
        from xdit_jax.pipelines.denoise import preprocess_image

        images = _images(image, batch, "FluxFillPipeline's image=")
        pixels = jnp.concatenate([preprocess_image(im, height, width) for im in images])
        latents = self.image_latents(pixels * (1.0 - mask), key=jax.random.fold_in(rng, 3))
        latents = jnp.repeat(latents, batch * per // len(images), axis=0)
        f = vae_scale_factor(self.vae_config)
        folded = jnp.broadcast_to(fold_mask(jnp.asarray(mask), f), (latents.shape[0], f * f) + latents.shape[2:])
        return self._placed(jnp.concatenate([pack_latents(latents), pack_latents(folded)], axis=-1))

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, image=None, mask_image=None, masked_image_latents=None, true_cfg_scale: float = 1.0,
                 height: int | None = None, width: int | None = None, strength: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 30.0, num_images_per_prompt: int = 1,
                 latents=None, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxFillPipeline call and defaults (``generator`` -> ``seed``; 50 steps, guidance 30, strength
        1). ``image``: a PIL image or an (H, W, 3) array (uint8, or floats in [0, 1]), or one per prompt;
        ``mask_image``: a PIL image or an (H, W) array at the output size, for every image; ``latents``: packed
        initial latents (B, tokens, 4C), used as given (no image noised; the masked image is still encoded)."""
        from xdit_jax.pipelines.image import preprocess_mask

        self._check_channels()
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents are not supported here: give image= and mask_image=.")
        if image is None:
            raise ValueError("FluxFillPipeline needs image= (the picture to repaint or extend) and mask_image=.")
        if mask_image is None:
            raise ValueError("FluxFillPipeline needs mask_image= (white: repaint, black: keep).")
        start = self.strength_start(image, num_inference_steps, strength)
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        mask = jnp.asarray(preprocess_mask(mask_image, height, width))  # (1, 1, H, W)

        def init(sched, given, batch, per, rng, timer):  # diffusers' order: image sample, noise, masked image sample
            sched = flow_match.from_step(sched, start)
            if given is None:
                given = pack_latents(self.noised_image_latents(image, height, width, sched, batch, per, rng,
                                                               timer)[0])
            with timer.stage("image_encoding"):
                condition = self.fill_condition(image, mask, height, width, batch, per, rng)
                jax.block_until_ready(condition)
            return sched, given, condition

        return forward_call(FluxPipeline._generate, self, locals(), init=init)


class FluxControlPipeline(_Conditioned):
    """Structural control with FLUX.1 Canny / Depth (diffusers' ``FluxControlPipeline``) — see the module docstring.
    ``control_image``: the edge / depth map (the user's preprocessing), resized to the output size."""

    PIPELINE_CLASSES = ("FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline")

    def _extra_channels(self) -> int:
        return self.transformer_config.out_ch

    def control_condition(self, control_image, height: int, width: int, batch: int, per: int,
                          rng) -> ChannelCondition:
        """diffusers' control image: resized, repeated to the samples (each prompt's ``per`` next to each other, as
        ``repeat_interleave``), encoded with one posterior sample per sample (diffusers' first draw), packed."""
        from xdit_jax.pipelines.denoise import preprocess_image

        images = _images(control_image, batch, "FluxControlPipeline's control_image=")
        if any(hasattr(im, "shape") and getattr(im, "ndim", 3) != 3 for im in images):
            raise NotImplementedError("control_image: give a PIL image or an (H, W, 3) array (already encoded or "
                                      "batched tensors are not supported here).")
        pixels = jnp.concatenate([preprocess_image(im, height, width) for im in images])
        mean, std = self._moments(pixels)
        rows = batch * per // len(images)
        mean, std = jnp.repeat(mean, rows, axis=0), jnp.repeat(std, rows, axis=0)
        latents = self._scale_latents(mean + std * self._normal(jax.random.fold_in(rng, 4), mean.shape))
        return self._placed(pack_latents(latents))

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, control_image=None, true_cfg_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 28, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 512,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxControlPipeline call and defaults (``generator`` -> ``seed``). ``control_image``: a PIL image
        or an (H, W, 3) array at the output size (uint8, or floats in [0, 1]), or one per prompt; ``latents``: packed
        initial latents (B, tokens, 4C)."""
        height, width = self._control_size(control_image, height, width)
        return forward_call(FluxPipeline._generate, self, locals(), init=self._with_control(control_image, height,
                                                                                            width))

    def _control_size(self, control_image, height, width) -> tuple[int, int]:
        """The checks of every Control call and the output size (the text-to-image pipeline's default)."""
        self._check_channels()
        if control_image is None:
            raise ValueError(f"{type(self).__name__} needs control_image= (the Canny edge or depth map to follow).")
        ds = self.default_size()
        return ds["height"] if height is None else height, ds["width"] if width is None else width

    def _with_control(self, control_image, height: int, width: int, start=None):
        """The start hook: the control image's condition (its draw first, as diffusers), then ``start``'s (image-to-
        image's or inpainting's: the schedule, the initial latents[, the kept region]) if any."""

        def init(sched, given, batch, per, rng, timer):
            with timer.stage("image_encoding"):
                condition = self.control_condition(control_image, height, width, batch, per, rng)
                jax.block_until_ready(condition)
            if start is None:
                return sched, given, condition
            sched, given, *kept = start(sched, given, batch, per, rng, timer)
            return (sched, given, condition, *kept)  # (the step splits the kept region off first, then this)

        return init


class FluxControlImg2ImgPipeline(FluxControlPipeline):
    """FLUX.1 Canny / Depth image-to-image (diffusers' ``FluxControlImg2ImgPipeline``) on a FLUX.1 Control folder:
    image-to-image's start (:class:`~xdit_jax.pipelines.flux.FluxImg2ImgPipeline`'s: the image encoded and noised to
    where the last ``strength`` of the schedule starts) with the control image's channels in every step. The draws:
    the control image's posterior sample, then the image's, then the noise (diffusers' order)."""

    PIPELINE_CLASSES = ("FluxControlImg2ImgPipeline", "FluxControlPipeline", "FluxControlInpaintPipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, image=None, control_image=None, true_cfg_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, strength: float = 0.6, num_inference_steps: int = 28,
                 guidance_scale: float = 7.0, num_images_per_prompt: int = 1, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 max_sequence_length: int = 512, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxControlImg2ImgPipeline call and defaults (``generator`` -> ``seed``; strength 0.6, 28 steps,
        guidance 7). ``image`` as :class:`FluxImg2ImgPipeline`'s, ``control_image`` as
        :class:`FluxControlPipeline`'s; ``latents``: packed initial latents, used as given (no image noised)."""
        height, width = self._control_size(control_image, height, width)
        height, width, start = self.img2img_init(image, height, width, num_inference_steps, strength, pack_latents)
        init = self._with_control(control_image, height, width, start)
        return forward_call(FluxPipeline._generate, self, locals(), init=init)


class FluxControlInpaintPipeline(FluxControlPipeline):
    """FLUX.1 Canny / Depth inpainting (diffusers' ``FluxControlInpaintPipeline``) on a FLUX.1 Control folder:
    :class:`~xdit_jax.pipelines.flux.FluxInpaintPipeline`'s start and kept region (white repaints, black keeps) with the
    control image's channels in every step. The draws: the control image's posterior sample, the image's, the noise
    (diffusers draws the masked image's sample first, which nothing of its step uses: not drawn here)."""

    PIPELINE_CLASSES = ("FluxControlInpaintPipeline", "FluxControlPipeline", "FluxControlImg2ImgPipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, image=None, control_image=None, mask_image=None, masked_image_latents=None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 512,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxControlInpaintPipeline call and defaults (``generator`` -> ``seed``; strength 0.6, 28 steps,
        guidance 7). ``image`` / ``mask_image`` as :class:`FluxInpaintPipeline`'s, ``control_image`` as
        :class:`FluxControlPipeline`'s; ``latents``: the initial latents and the kept region's noise (no noise
        drawn), (B, C, h, w) or packed."""
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents is not supported here: give image= and mask_image=.")
        height, width = self._control_size(control_image, height, width)
        height, width, start, _ = self.inpaint_init(image, mask_image, height, width, num_inference_steps, strength,
                                                    vae_scale_factor(self.vae_config), pack_latents)
        init = self._with_control(control_image, height, width, start)
        return forward_call(FluxPipeline._generate, self, locals(), init=init)
