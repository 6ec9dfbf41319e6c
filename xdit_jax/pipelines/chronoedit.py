"""ChronoEdit (NVIDIA's ChronoEdit-14B: image editing as a two-frame video), diffusers' ``ChronoEditPipeline`` on a JAX
mesh.

    pipe = ChronoEditPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe(image, "Add a small mouse sitting in the teacup.", height=720, width=1280, seed=42)
    out.images   # (batch, height, width, 3) float in [0, 1]: the edited image (the video's last frame)
    out.frames   # (batch, frames, height, width, 3): the whole video, as diffusers returns it

It is Wan 2.1 image-to-video (:class:`xdit_jax.pipelines.wan.WanImageToVideoPipeline`: UMT5, the image's CLIP states,
the VAE-encoded image and its mask beside the noise at every step, CFG over ``cfg``, sequence parallelism, PipeFusion)
with ChronoEdit's transformer (:mod:`xdit_jax.models.chronoedit`: Wan's with another RoPE) and ChronoEdit's frames:

* Without temporal reasoning (the default): a 5-frame video, 2 latent frames (the input image and the edit, at RoPE
  frame positions 0 and ``rope_temporal_skip_len - 1``); diffusers ignores ``num_frames`` then, here any other
  ``num_frames`` is refused.
* ``enable_temporal_reasoning=True``: a ``num_frames`` video (default 81) runs the first
  ``num_temporal_reasoning_steps`` steps, then only its first and last latent frames go on (the latents, the image
  condition, the scheduler's history: UniPC's previous outputs and last sample; PipeFusion's K/V buffers start again
  with exact warm-up steps); where no step is left after the reasoning steps the whole video is decoded, its last
  frame from the two end latents (diffusers' ``video_reason`` / ``video_edit``).

The output's ``frames`` are diffusers' (the video; for ``output_type="latent"`` the final latents); ``images`` its last
frame, the edited image (None for latents).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.models import chronoedit, vae_wan
from xdit_jax.pipelines import image as image_mod
from xdit_jax.pipelines.denoise import check_size_and_mesh, denoise_loop
from xdit_jax.pipelines.wan import MAX_SEQUENCE_LENGTH, WanImageToVideoPipeline

log = logging.getLogger("xdit_jax")

DEFAULT_FRAMES = 5  # without temporal reasoning: the image and the edit (2 latent frames)
REASONING_FRAMES = 81  # diffusers' num_frames default, used with temporal reasoning


@dataclasses.dataclass
class ChronoEditPipelineOutput:
    """``frames``: (B, F, H, W, 3) in [0, 1] (diffusers' ``frames``), or the final latents (B, C, T, h, w) for
    ``output_type="latent"``; ``images``: (B, H, W, 3) the edited image (the last frame), None for latents;
    ``timings``: seconds per stage."""

    frames: np.ndarray
    images: np.ndarray | None
    timings: dict
    peak_memory_bytes: int | None = None


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image_mod.read_configs(folder, chronoedit.ChronoEditConfig, vae_wan.WanVAEConfig)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' ChronoEditPipeline call defaults: 480 x 832."""
    return {"height": 480, "width": 832}


def default_video(tc=None, vc=None) -> dict:
    """:func:`default_size` and the 5 frames made without temporal reasoning (Wan's 16 fps)."""
    return dict(default_size(tc, vc), num_frames=DEFAULT_FRAMES, fps=16)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 5.0,
                  num_frames: int = DEFAULT_FRAMES) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work (an image family's
    signature, for the command line)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    check_size_and_mesh(height, width, vc.scale_factor_spatial * tc.patch_size[1], tc.num_layers, batch, mesh_spec,
                        guidance_scale)


def _check_video_request(tc, vc, height, width, num_frames, batch=1, mesh_spec=None, guidance_scale=5.0) -> None:
    check_request(tc, vc, height, width, batch, mesh_spec, guidance_scale, num_frames)


def _end_frames(x):
    """(B, C, T, h, w) -> its first and last frames (B, C, 2, h, w) (diffusers' ``[:, :, [0, -1]]``)."""
    return jnp.concatenate([x[:, :, :1], x[:, :, -1:]], axis=2)


class ChronoEditPipeline(WanImageToVideoPipeline):
    """Image editing with ChronoEdit — see the module docstring."""

    PIPELINE_CLASSES = ("ChronoEditPipeline",)
    CONFIG = chronoedit.ChronoEditConfig
    _check_request = staticmethod(_check_video_request)
    _default_video = staticmethod(default_video)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.transformer_config.takes_image:
            raise ValueError("A ChronoEdit transformer cross-attends to CLIP image states (image_dim and "
                             "added_kv_proj_dim set, an image_encoder in the folder); this one takes none.")
        self._reasoning = None  # during a call: (temporal reasoning on, the step its frames are cut at)

    # ------------------------------------------------------------------ the temporal reasoning frames

    def _denoise(self, do_cfg: bool, latents, sched_state, kv, args: tuple, num_steps: int, progress: bool,
                 step_for=None, stages=None):
        """:meth:`PipelineBase._denoise`, and with temporal reasoning the cut to the end frames before step
        ``num_temporal_reasoning_steps`` (diffusers' loop: the latents, the image condition and the scheduler's
        latent-shaped history; PipeFusion: new K/V buffers for the shorter sequence, exact warm-up steps again)."""
        from flax import nnx

        cut = None if self._reasoning is None else self._reasoning[1]
        if cut is None or cut >= num_steps or latents.shape[2] <= 2:
            return super()._denoise(do_cfg, latents, sched_state, kv, args, num_steps, progress, step_for, stages)
        tstate = stages[0][1] if stages else nnx.split(self.transformer)[1]
        warm_fn = self._step_fn(do_cfg)
        step_fn = self._step_fn(do_cfg, warmup=False) if kv is not None else warm_fn
        now = {"args": args, "first": 0}

        def one(carry, n):
            lat, st, i, kv = carry
            if n == cut:
                lat, st, kv, now["args"] = self._keep_end_frames(lat, st, kv, now["args"], do_cfg)
                now["first"] = n
            fn = warm_fn if kv is None or n - now["first"] < self.pipefusion_warmup_steps else step_fn
            return fn(tstate, lat, st, i, kv, *now["args"])

        carry = (latents, sched_state, jax.device_put(np.int32(0), self._replicated()), kv)
        return denoise_loop(one, carry, num_steps, progress=progress)[0]

    def _keep_end_frames(self, latents, sched_state, kv, args, do_cfg: bool):
        """The loop's carry and the step's inputs with only the first and last latent frames."""
        shape = latents.shape[:2] + (2,) + latents.shape[3:]
        # (jitted with the result's layout: the arrays may span processes)
        place = jax.jit(_end_frames, out_shardings=self._latent_sharding(shape))
        state = jax.tree.map(lambda s: place(s) if s.shape == latents.shape else s, sched_state)
        texts = args[0]
        cond = jax.jit(_end_frames, out_shardings=self._batch_sharding(texts[1].ndim, do_cfg))(texts[1])
        if kv is not None:
            kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape))
        return place(latents), state, kv, ((texts[0], cond) + tuple(texts[2:]),) + tuple(args[1:])

    def _decode_fn(self):
        """Wan's decode; with temporal reasoning and more than two latent frames left (no step after the reasoning
        steps), diffusers' two decodes: the frames of all latents but the last, then the edit's frames decoded from
        the two end latents (all but their first)."""
        base = super()._decode_fn()
        if self._reasoning is None or not self._reasoning[0]:
            return base

        def decode(latents):
            if latents.shape[2] <= 2:
                return base(latents)
            reason = base(jax.jit(lambda x: x[:, :, :-1])(latents))  # (jitted: the arrays may span processes)
            edit = base(jax.jit(_end_frames)(latents))
            return jax.jit(lambda a, b: jnp.concatenate([a, b[:, 1:]], axis=1))(reason, edit)

        return decode

    # ------------------------------------------------------------------ call

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, prompt_embeds=None, negative_prompt_embeds=None, image_embeds=None,
                 latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_images_per_prompt: int = 1,
                 num_videos_per_prompt: int | None = None, seed: int = 0, output_type: str = "np",
                 progress: bool = True, enable_temporal_reasoning: bool = False,
                 num_temporal_reasoning_steps: int = 0, last_image=None) -> ChronoEditPipelineOutput:
        """diffusers' ChronoEditPipeline call (``generator`` -> ``seed``). ``image``: the image to edit (PIL, resized to
        ``width`` x ``height`` as diffusers does, or an array of that size); ``image_embeds``: its CLIP states to use
        instead (one image's, e.g. (257, 1280)); ``latents``: initial noise (B, z_dim, T, h, w) with T the latent
        frames of ``num_frames`` (2 without temporal reasoning); ``num_images_per_prompt`` (or diffusers'
        ``num_videos_per_prompt``): edits per prompt; ``enable_temporal_reasoning`` / ``num_temporal_reasoning_steps``:
        see the module docstring."""
        if image is None:
            raise ValueError("ChronoEdit edits an image: give image= (the image to edit).")
        if last_image is not None:
            raise ValueError("last_image: ChronoEdit takes one image (the image to edit).")
        if isinstance(num_temporal_reasoning_steps, bool) or not isinstance(num_temporal_reasoning_steps,
                                                                            (int, np.integer)) \
                or num_temporal_reasoning_steps < 0:
            raise ValueError(f"num_temporal_reasoning_steps={num_temporal_reasoning_steps!r} must be an int >= 0.")
        if not enable_temporal_reasoning:
            if num_temporal_reasoning_steps:
                raise ValueError("num_temporal_reasoning_steps is used with enable_temporal_reasoning=True only.")
            if num_frames not in (None, DEFAULT_FRAMES):
                raise ValueError(f"num_frames={num_frames}: without temporal reasoning ChronoEdit makes "
                                 f"{DEFAULT_FRAMES} frames (the image and the edit); give "
                                 "enable_temporal_reasoning=True for a longer video.")
            num_frames = DEFAULT_FRAMES
        else:
            num_frames = REASONING_FRAMES if num_frames is None else int(num_frames)
            st = self.vae_config.scale_factor_temporal
            if num_frames % st != 1:  # (diffusers' rounding, with its warning)
                rounded = max(num_frames // st * st + 1, 1)
                log.warning("num_frames=%d: num_frames - 1 must be a multiple of %d; %d frames (as diffusers).",
                            num_frames, st, rounded)
                num_frames = rounded
        if num_videos_per_prompt is not None:
            if num_images_per_prompt != 1 and num_images_per_prompt != num_videos_per_prompt:
                raise ValueError("num_images_per_prompt and num_videos_per_prompt differ; give one of them.")
            num_images_per_prompt = num_videos_per_prompt
        self._check_images(None, image_embeds, num_frames)
        self._reasoning = (bool(enable_temporal_reasoning),
                           int(num_temporal_reasoning_steps) if enable_temporal_reasoning else None)
        try:
            out = self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 guidance_scale_2=None, prompt_embeds=prompt_embeds,
                                 negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                                 max_sequence_length=max_sequence_length,
                                 num_videos_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type,
                                 progress=progress,
                                 condition=lambda shape: self.conditions(image, None, shape, image_embeds))
        finally:
            self._reasoning = None
        images = None if output_type == "latent" else out.frames[:, -1]
        return ChronoEditPipelineOutput(frames=out.frames, images=images, timings=out.timings,
                                        peak_memory_bytes=out.peak_memory_bytes)
