"""Kandinsky 5.0 image-to-video, diffusers' ``Kandinsky5I2VPipeline`` on a JAX mesh: the text-to-video pipeline
(:mod:`xdit_jax.pipelines.kandinsky5`) with the image as the first latent frame.

    pipe = Kandinsky5I2VPipeline.from_pretrained("kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers", mesh="cfg=2")
    out = pipe(image, "An astronaut floating in space", seed=0)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

As diffusers:

* the image resized to ``width`` x ``height`` (Lanczos), in [-1, 1], encoded as a one-frame video by HunyuanVideo's
  VAE encoder (:mod:`xdit_jax.models.vae_hunyuan_video_encoder`, float32), a sample of its posterior (``mean + std *
  eps``, the log-variance clamped to [-30, 20]) times ``scaling_factor``, replaces latent frame 0 of the noise (one
  image for every video of the batch, or one image per video);
* the release's transformer takes ``visual_cond`` (33 = 16 + 16 + 1 input channels): the latents, a zero condition
  and a mask that is 1 on frame 0 (the image's frame is in the latents themselves, not in the condition channels);
* each Euler step updates frames 1.. only: frame 0 stays the image's latents (the velocity on it is dropped);
* after the loop, diffusers' ``normalize_first_frame``: the first 4 latent frames' mean and std (per video, the std
  unbiased) moved toward the next ``min(5, F' - 1)`` frames' (over the whole batch), clamped to mean - 0.05 ..
  mean + 0.1 and std - 0.1 .. std + 0.25 — in the ``"latent"`` output too;
* the rest (prompts, template, CFG with the default negative prompt, scheduler, RoPE scale factor, VAE decode) as
  :class:`~xdit_jax.pipelines.kandinsky5.Kandinsky5T2VPipeline`, over every mesh it takes.

Differences, on purpose: ``latents`` are the noise (B, F', h, w, C), frame 0 replaced by the image as without them
(diffusers returns given latents unchanged: no image, the condition channels the caller's); the image latents'
sample uses the call's ``seed`` (the numbers differ from torch's generator, the distribution does not).
``num_frames`` 5, 9 or 13 (2 to 4 latent frames) is refused: diffusers' first-frame normalization then has no
reference frames and returns NaN.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import vae_hunyuan_video as hv_vae
from xdit_jax.pipelines.kandinsky5 import Kandinsky5PipelineOutput, Kandinsky5T2VPipeline
from xdit_jax.schedulers import flow_match

NORMALIZED_FRAMES = 4  # diffusers' normalize_first_frame: nFr
REFERENCE_FRAMES = 5


def _keep_first_frame_step(sched, i, pred, latents, state=()):
    """diffusers' I2V update ``latents[:, 1:] = step(pred[:, 1:], latents[:, 1:])``: the Euler step with no velocity
    on frame 0 (``x + dt * 0`` leaves it exactly)."""
    return flow_match.step(sched, i, pred.at[:, :1].set(0.0), latents, state)


_KEEP_FIRST_FRAME = types.SimpleNamespace(step=_keep_first_frame_step)


def normalize_first_frame(latents: jax.Array, reference_frames: int = REFERENCE_FRAMES) -> jax.Array:
    """diffusers' ``Kandinsky5I2VPipeline.normalize_first_frame`` (no clump) of latents (B, F', h, w, C)."""
    latents = jnp.asarray(latents)
    f = latents.shape[1]
    if f <= 1:
        return latents
    n = NORMALIZED_FRAMES
    first = latents[:, :n]
    ref = latents[:, n:n + min(reference_frames, f - 1)]
    mean = first.mean(axis=(1, 2, 3, 4), keepdims=True)
    std = first.std(axis=(1, 2, 3, 4), ddof=1, keepdims=True)
    ref_mean = jnp.clip(ref.mean(), mean - 0.05, mean + 0.1)
    ref_std = jnp.clip(ref.std(ddof=1), std - 0.1, std + 0.25)
    return latents.at[:, :n].set((first - mean) / std * ref_std + ref_mean)


class Kandinsky5I2VPipeline(Kandinsky5T2VPipeline):
    """Image-to-video with Kandinsky 5.0 — see the module docstring."""

    PIPELINE_CLASSES = ("Kandinsky5I2VPipeline",)
    _scheduler = _KEEP_FIRST_FRAME

    def __init__(self, *, vae_encoder, **kw):
        super().__init__(**kw)
        self.vae_encoder = vae_encoder
        self._image = None

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The VAE's encoder (``vae/encoder_params``, written by conversion), float32 (one frame)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_hunyuan_video_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        vc = hv_vae.HunyuanVideoVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return {**super()._extra_parts(folder, mesh, dtype, kind),
                "vae_encoder": load_vae_encoder(folder, vc, jnp.float32, NamedSharding(mesh, P()),
                                                vae_hunyuan_video_encoder)}

    @staticmethod
    def _cond_mask(x):
        """1 on the image's frame (latent frame 0), as diffusers' ``visual_cond_mask``."""
        return jnp.zeros(x.shape[:-1] + (1,), x.dtype).at[:, :1].set(1.0)

    def check_inputs(self, height: int, width: int, num_frames: int, batch: int, guidance_scale: float) -> None:
        super().check_inputs(height, width, num_frames, batch, guidance_scale)
        f = (num_frames - 1) // self.vae_config.temporal_compression_ratio + 1
        if 1 < f <= NORMALIZED_FRAMES:
            raise ValueError(f"num_frames {num_frames} makes {f} latent frames: Kandinsky 5.0 image-to-video takes 1 "
                             f"or at least {NORMALIZED_FRAMES + 1} (num_frames 1 or >= 17; diffusers' first-frame "
                             "normalization has no reference frames below that and returns NaN).")

    # ------------------------------------------------------------------ the image

    def _encode_fn(self):
        """Jitted: an image (1, 3, 1, H, W) in [-1, 1] and a noise draw -> the posterior's scaled sample (1, 1, h, w,
        C), replicated; the image plane split over the mesh (:func:`xdit_jax.parallel.vae.sharded_encode`)."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "vae_encode" not in fns:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from xdit_jax.parallel.vae import sharded_encode

            graphdef, state = nnx.split(self.vae_encoder)
            vc, mesh = self.vae_config, (self.mesh if self.mesh.size > 1 else None)

            def moments(model, x):  # NCTHW -> channels-last moments
                return model(jnp.transpose(x, (0, 2, 3, 4, 1)))

            def enc(state, x, eps):
                m = sharded_encode(moments, nnx.merge(graphdef, state), x, mesh,
                                   factor=vc.spatial_compression_ratio).astype(jnp.float32)
                mean, logvar = jnp.split(m, 2, axis=-1)
                z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps
                return z * vc.scaling_factor

            jitted = jax.jit(enc, out_shardings=NamedSharding(self.mesh, P()))
            fns["vae_encode"] = lambda x, eps: jitted(state, self._put_replicated(x), self._put_replicated(eps))
        return fns["vae_encode"]

    @staticmethod
    def _image_noise(shape, rng):
        """The standard normal draw (channels last) of the image latents' sample (diffusers'
        ``latent_dist.sample(generator)``)."""
        return jax.random.normal(rng, shape, jnp.float32)

    @staticmethod
    def preprocess(image, height: int, width: int) -> jax.Array:
        """The image(s) as the VAE takes them, (n, 3, H, W) in [-1, 1] (diffusers' ``video_processor.preprocess``:
        a PIL image resized, Lanczos; an array (H, W, 3) of that size); ``image`` one, or a list of one per video."""
        from xdit_jax.pipelines.denoise import preprocess_image

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        return jnp.concatenate([preprocess_image(im, height, width) for im in images])

    def image_latents(self, images, rng) -> jax.Array:
        """Preprocessed images (n, 3, H, W) (:meth:`preprocess`) -> their scaled latent samples (n, 1, h, w, C)."""
        vc = self.vae_config
        s = vc.spatial_compression_ratio
        n, _, height, width = images.shape
        shape = (n, 1, height // s, width // s, vc.latent_channels)
        return self._encode_fn()(images[:, :, None], self._image_noise(shape, rng))

    def _initial_latents(self, latents, shape: tuple, key, init_noise_sigma: float, layout: str):
        """The noise (or the given latents) with frame 0 the image's latents, as diffusers' ``prepare_latents``."""
        noise = super()._initial_latents(latents, shape, key, init_noise_sigma, layout)
        b = shape[0]
        if self._image.shape[0] not in (1, b):
            raise ValueError(f"{self._image.shape[0]} images for {b} videos: give one image, or one per video.")
        z = self.image_latents(self._image, jax.random.fold_in(key, 1))
        first = jnp.broadcast_to(z, (b,) + z.shape[1:])
        return jax.device_put(noise.at[:, :1].set(first), self._latent_sharding(shape))

    def _denoise_and_decode(self, *args, **kw):
        """The loop, then diffusers' first-frame normalization (in the latent output too), then the VAE."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "normalize" not in fns:
            fns["normalize"] = jax.jit(normalize_first_frame)
        return super()._denoise_and_decode(*args, finish=fns["normalize"], **kw)

    # ------------------------------------------------------------------ call

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, num_videos_per_prompt: int = 1,
                 latents=None, prompt_embeds_qwen=None, prompt_embeds_clip=None, negative_prompt_embeds_qwen=None,
                 negative_prompt_embeds_clip=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> Kandinsky5PipelineOutput:
        """diffusers' arguments (``image``: a PIL image, an array (H, W, 3), or a list of one per video; ``generator``
        -> ``seed``; ``latents``: the noise, see the module docstring)."""
        if image is None or (isinstance(image, (list, tuple)) and not image):
            raise ValueError("image must be given: Kandinsky 5.0 image-to-video starts from it (its first frame).")
        if isinstance(image, np.ndarray) and image.ndim == 4:
            image = list(image)
        dv = self.default_video()
        self._image = self.preprocess(image, dv["height"] if height is None else height,
                                      dv["width"] if width is None else width)  # (a bad image refused before work)
        try:
            return super().__call__(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    num_videos_per_prompt=num_videos_per_prompt, latents=latents,
                                    prompt_embeds_qwen=prompt_embeds_qwen, prompt_embeds_clip=prompt_embeds_clip,
                                    negative_prompt_embeds_qwen=negative_prompt_embeds_qwen,
                                    negative_prompt_embeds_clip=negative_prompt_embeds_clip,
                                    max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                                    progress=progress)
        finally:
            self._image = None

