"""Wan VACE, diffusers' ``WanVACEPipeline`` on a JAX mesh: Wan 2.1 (:class:`xdit_jax.pipelines.wan.WanPipeline`)
conditioned on a control video, its mask and reference images through the VACE transformer
(:mod:`xdit_jax.models.wan_vace`).

    pipe = WanVACEPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat walks on the grass.", video=frames, mask=mask_frames, reference_images=[image], seed=42)

The conditioning latents are diffusers' (``prepare_video_latents`` / ``prepare_masks``): the video's frames (or grey
zeros without a video) and the mask (white: generate; ones without a mask), both at ``height`` x ``width``, in
[0, 1] after ``(x + 1) / 2``; the mask thresholded at 0.5 splits the video into its *inactive* part (kept,
``video * (1 - mask)``) and its *reactive* part (``video * mask``), each encoded by the Wan VAE (the posterior's mode,
normalized), side by side on the channels; each reference image, fitted into the frame (bilinear, centered on white)
and encoded alone, is one more latent frame in front (its latents beside zeros; several: the last given first, as
diffusers' loop prepends them); then the mask's first channel folded 8 x 8 into 64 channels, its frames brought to the
latent frames (nearest-exact) and zeros in front for the reference frames. The noise latents have the reference frames
too; they are dropped before the VAE decode (``output_type="latent"`` returns them, as diffusers).
``conditioning_scale``: the hints' scale, one float or one per VACE layer.

The denoising is :class:`~xdit_jax.pipelines.wan.WanPipeline`'s (UniPC or flow-matching Euler, CFG over ``cfg``, the
control tokens sharded over (ring, ulysses) with the video's; PipeFusion runs the VACE stack then the main stack
looped over the stages, a patch's hints riding with it). Wan 2.2 two-expert VACE folders (``transformer_2`` /
``boundary_ratio`` in model_index.json) switch experts as :class:`~xdit_jax.pipelines.wan.WanPipeline` does: the
high-noise ``transformer`` (``guidance_scale``) while ``t >= boundary_ratio * num_train_timesteps``, then
``transformer_2`` (``guidance_scale_2``, default ``guidance_scale``), both fed the same control latents and
``conditioning_scale`` (as diffusers'), one compiled step for both (their configs must match), the switch on the host
between steps; PipeFusion's warm-up steps start again at the switch. Not supported: a video of another size than
``height`` x ``width`` (diffusers then conditions on a smaller video whose tokens no longer line up with the latents';
refused).
Differences by design: the noise is a JAX draw from ``seed``; ``num_frames`` defaults to the video's frame count.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

from xdit_jax.models import wan_vace
from xdit_jax.pipelines.denoise import preprocess_image, rgb_image
from xdit_jax.pipelines.image import WanVaeEncoding
from xdit_jax.pipelines.wan import MAX_SEQUENCE_LENGTH, WanPipeline, WanPipelineOutput

log = logging.getLogger("xdit_jax")


def bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's ``interpolate(mode="bilinear", align_corners=False)`` (no antialias) of a (C, H, W) float32 image."""
    def axis(n_in: int, n_out: int):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                         np.float32(0))
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = (src - i0).astype(np.float32)
        return i0, i1, lam

    h0, h1, lh = axis(image.shape[1], height)
    w0, w1, lw = axis(image.shape[2], width)
    rows = image[:, h0] * (1 - lh)[None, :, None] + image[:, h1] * lh[None, :, None]
    return (rows[:, :, w0] * (1 - lw)[None, None] + rows[:, :, w1] * lw[None, None]).astype(np.float32)


def reference_canvas(image, height: int, width: int, factor: int = 8) -> np.ndarray:
    """A reference image as diffusers' ``preprocess_conditions`` makes it: preprocessed at its own size rounded down to
    a multiple of ``factor`` (``VideoProcessor.preprocess(image, None, None)``), resized (bilinear) to fit in ``height``
    x ``width`` keeping its aspect and centered on a white canvas -> (3, height, width) float32 in [-1, 1]."""
    image = rgb_image(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        from PIL import Image

        image = Image.fromarray(image)
    ih, iw = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    ih, iw = ih - ih % factor, iw - iw % factor
    if ih < 1 or iw < 1:
        raise ValueError(f"A reference image is smaller than {factor} x {factor} pixels.")
    if isinstance(image, np.ndarray) and image.shape[:2] != (ih, iw):
        raise ValueError(f"reference image array {image.shape[:2]}: give a PIL image (or a size in multiples of "
                         f"{factor}).")
    pixels = np.asarray(preprocess_image(image, ih, iw))[0]
    scale = min(height / ih, width / iw)
    nh, nw = int(ih * scale), int(iw * scale)
    canvas = np.ones((3, height, width), np.float32)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = bilinear_resize(pixels, nh, nw)
    return canvas


def mask_latents(mask: np.ndarray, latent_frames: int, factor: int, patch: int) -> np.ndarray:
    """diffusers' ``prepare_masks`` of one video: mask (T, H, W) (its first channel, in [0, 1]) -> (factor^2, T', h, w):
    each ``factor`` x ``factor`` pixel block folded into channels, the frames taken nearest-exact to
    ``latent_frames``."""
    t, height, width = mask.shape
    h = height // (factor * patch) * patch
    w = width // (factor * patch) * patch
    m = mask.reshape(t, h, factor, w, factor).transpose(2, 4, 0, 1, 3).reshape(factor * factor, t, h, w)
    scale = np.float32(t) / np.float32(latent_frames)
    src = np.minimum(np.floor((np.arange(latent_frames, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64),
                     t - 1)
    return m[:, src]


class WanVACEPipeline(WanVaeEncoding, WanPipeline):
    """Controllable video generation with Wan VACE — see the module docstring."""

    PIPELINE_CLASSES = ("WanVACEPipeline",)
    CONFIG = wan_vace.WanVACEConfig
    stacks = staticmethod(wan_vace.pipefusion_stacks)  # PipeFusion: the VACE stack, then the main one, looped

    def __init__(self, *, vae_encoder=None, **parts):
        super().__init__(vae_encoder=vae_encoder, **parts)
        tc, vc = self.transformer_config, self.vae_config
        if self.expand_timesteps:
            raise NotImplementedError("expand_timesteps (TI2V-5B) is not a VACE setting.")
        want = 2 * vc.z_dim + vc.scale_factor_spatial ** 2
        if tc.vace_in_channels != want:
            raise ValueError(f"transformer vace_in_channels {tc.vace_in_channels} is not inactive + reactive latents "
                             f"+ the folded mask ({want}).")
        self._vace_refs = 0

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """:meth:`WanPipeline._step_fn` with ``texts`` = (UMT5 states, control latents, conditioning scales)."""
        def embed_args(x, texts, t):
            return x, t, texts[0], None, None, texts[1], texts[2]

        return self._flow_step_fn(do_cfg, warmup, embed_args, scheduler=self.scheduler)

    def _condition_shapes(self, latent_shape) -> tuple:
        b, _, t, h, w = latent_shape
        tc = self.transformer_config
        return ((b, tc.vace_in_channels, t, h, w), (b, tc.num_vace))

    def _denoise_and_decode(self, timer, do_cfg, latents, sched_state, args, num_steps, progress, output_type, decode,
                            **kw):
        refs = self._vace_refs  # the reference frames go before the VAE decode (kept in latent output, as diffusers)
        inner = decode if not refs else (lambda lat: decode(lat[:, :, refs:]))
        return super()._denoise_and_decode(timer, do_cfg, latents, sched_state, args, num_steps, progress,
                                           output_type, inner, **kw)

    # ------------------------------------------------------------------ conditioning

    def conditioning_scales(self, conditioning_scale) -> np.ndarray:
        n = self.transformer_config.num_vace
        scale = np.asarray(conditioning_scale, np.float32).reshape(-1)
        if scale.size == 1:
            scale = np.full((n,), scale[0], np.float32)
        if scale.shape != (n,):
            raise ValueError(f"conditioning_scale has {scale.size} values; this model has {n} VACE layers (give one "
                             "float, or one per layer).")
        return scale

    def _frames(self, frames, height: int, width: int, what: str) -> jnp.ndarray:
        """(1, 3, T, height, width) in [-1, 1]: PIL frames resized as diffusers' (Lanczos), or arrays of that size."""
        pixels = []
        for f in frames:
            if hasattr(f, "size") and hasattr(f, "resize"):
                fw, fh = f.size
                vf = self.vae_config.scale_factor_spatial
                fh, fw = fh - fh % vf, fw - fw % vf
                if fh * fw > height * width:  # diffusers' rule: a larger video scaled down into the area
                    s = min(width / fw, height / fh)
                    fh, fw = int(fh * s), int(fw * s)
                base = vf * self.transformer_config.patch_size[1]
                fh, fw = fh // base * base, fw // base * base
                if (fh, fw) != (height, width):
                    raise ValueError(f"{what} frames of {f.size[0]} x {f.size[1]} would be conditioned at {fw} x {fh} "
                                     f"(diffusers' sizing), not at the video's {width} x {height}: resize them to "
                                     f"{width} x {height} (or a larger size of that aspect) first.")
            pixels.append(preprocess_image(f, height, width)[:, :, None])
        return jnp.concatenate(pixels, axis=2)

    def control_latents(self, video, mask, reference_images, height: int, width: int, num_frames: int):
        """(1, vace_in_channels, T' + refs, h, w) float32: the conditioning latents (see the module docstring)."""
        vc = self.vae_config
        st, s = vc.scale_factor_temporal, vc.scale_factor_spatial
        frames = num_frames if video is None else len(video)
        pixels = (jnp.zeros((1, 3, frames, height, width), jnp.float32) if video is None
                  else self._frames(video, height, width, "video"))
        m = (jnp.ones_like(pixels) if mask is None
             else jnp.clip((self._frames(mask, height, width, "mask") + 1) / 2, 0.0, 1.0))
        binary = jnp.where(m > 0.5, 1.0, 0.0)
        refs = reference_images or []
        # One encode (one compiled program): the inactive and reactive videos and each reference as a still video,
        # whose first latent frame is the image's alone (the causal VAE encodes frame 0 by itself, as diffusers'
        # one-frame encode of the reference does).
        stills = [jnp.broadcast_to(jnp.asarray(reference_canvas(image, height, width, s))[None, :, None],
                                   pixels.shape) for image in refs]
        z = self.image_latents(jnp.concatenate([pixels * (1 - binary), pixels * binary] + stills))  # (2 + r, C, ...)
        latents = jnp.concatenate([z[0], z[1]])
        for k in range(len(refs)):  # each prepended: the last reference comes first, as diffusers' loop leaves them
            ref = z[2 + k][:, :1]
            latents = jnp.concatenate([jnp.concatenate([ref, jnp.zeros_like(ref)]), latents], axis=1)
        t_lat = (frames + st - 1) // st
        folded = mask_latents(np.asarray(m[0, 0]), t_lat, s, self.transformer_config.patch_size[1])
        folded = np.concatenate([np.zeros((folded.shape[0], len(refs)) + folded.shape[2:], np.float32), folded], 1)
        return jnp.concatenate([latents.astype(jnp.float32), jnp.asarray(folded)])[None]

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 video=None, mask=None, reference_images=None, conditioning_scale=1.0, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_scale_2: float | None = None, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> WanPipelineOutput:
        """diffusers' WanVACEPipeline call (``generator`` -> ``seed``). ``video`` / ``mask``: lists of frames (PIL
        images, or (H, W, 3) arrays at ``height`` x ``width``; the mask white where the video is to be generated);
        ``reference_images``: one image or a list (PIL); ``conditioning_scale``: a float or one per VACE layer;
        ``latents``: (B, C, T' + references, h, w) as diffusers'. ``num_frames`` defaults to the video's frames.
        ``guidance_scale_2``: a two-expert (Wan 2.2) folder's guidance in its low-noise steps (default:
        ``guidance_scale``, as diffusers'); refused with one transformer."""
        if guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError("guidance_scale_2 is only for a two-expert pipeline (Wan 2.2: transformer_2 and "
                             "boundary_ratio); this VACE folder has one transformer.")
        if mask is not None and video is None:
            raise ValueError("mask can only be given with a video (as diffusers).")
        if video is not None:
            video = list(video)
            if not video:
                raise ValueError("video= has no frames.")
            if mask is not None:
                mask = list(mask)
                if len(mask) != len(video):
                    raise ValueError(f"video has {len(video)} frames and mask {len(mask)}; give one mask frame a "
                                     "frame.")
            if num_frames is None:
                num_frames = len(video)
            if self.output_frames(num_frames) != len(video):
                raise ValueError(f"video has {len(video)} frames; the conditioning must have the generated video's "
                                 f"{self.output_frames(num_frames)} frames "
                                 f"({self.vae_config.scale_factor_temporal}k + 1): give num_frames=len(video) with a "
                                 "4k + 1 frame count.")
        if reference_images is not None and not isinstance(reference_images, (list, tuple)):
            reference_images = [reference_images]
        refs = [r for r in (reference_images or []) if r is not None]
        scale = self.conditioning_scales(conditioning_scale)
        dv = self.default_video()
        height = dv["height"] if height is None else height
        width = dv["width"] if width is None else width
        num_frames = dv["num_frames"] if num_frames is None else num_frames
        self.check_inputs(height, width, num_frames, 1, max(guidance_scale, guidance_scale_2 or 0.0))
        made = self.output_frames(num_frames)

        def condition(shape):
            control = self.control_latents(video, mask, refs, height, width, made)
            return control, jnp.asarray(scale)[None]

        self._vace_refs = len(refs)
        try:
            return self._generate(prompt, negative_prompt, height=height, width=width,
                                  num_frames=made + len(refs) * self.vae_config.scale_factor_temporal,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  guidance_scale_2=guidance_scale_2, prompt_embeds=prompt_embeds,
                                  negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                                  max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                                  seed=seed, output_type=output_type, progress=progress, condition=condition)
        finally:
            self._vace_refs = 0
