"""SANA-Video text-to-video, diffusers' ``SanaVideoPipeline`` on a JAX mesh.

    pipe = SanaVideoPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat walks on the grass, realistic.", height=480, width=832, frames=81, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

Parts, each the SANA or Wan family's: Gemma 2 text encoding as :class:`~xdit_jax.pipelines.sana.SanaPipeline`'s (the
prompt lower-cased and stripped, prefixed with SANA-Video's own complex human instruction, its first token and last
``max_sequence_length - 1`` kept; the negative prompt without it), the SANA-Video transformer
(:mod:`xdit_jax.models.sana_video`: SANA's blocks with 3-D RoPE in the linear attention's numerator and a frame
conv in the feed-forward; the flat frames x rows x columns token sequence split over (ring, ulysses), the convs'
halos over it), CFG over ``cfg``, the folder's scheduler in the jitted step (DPM-Solver++ with flow sigmas:
SANA's step, the same function; or flow-matching Euler, the image-to-video pipeline's, which diffusers' text-to-video
pipeline runs too), and the Wan 2.1 VAE decode (:mod:`xdit_jax.models.vae_wan`, the latents unscaled by its mean / std)
split over the mesh.

``use_resolution_binning`` (default on, as diffusers): sample size 30 -> diffusers' 480 px table, 22 -> 720 px; the
video is made at the bin's size, then each frame resized and center-cropped back. Where diffusers has no table (it
raises "Invalid sample size") the model runs at the requested size (the tiny test models).

PipeFusion (``pipefusion=N`` or ``pipefusion_patches``): SANA's rule (no K/V; buffers of the linear attention's
per-patch sums and of the grid conv's input), the frame conv's input kept in the same conv buffer's last channels
with a halo of one frame.

Refused (clear errors): a VAE other than AutoencoderKLWan (diffusers also takes a DC-AE or LTX-2's),
``clean_caption``. The latents stay float32 between steps.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from xdit_jax.models import sana_video, vae_wan
from xdit_jax.pipelines import image, sana, wan
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    preprocess_image,
    prompt_batch,
)
from xdit_jax.pipelines.image import WanVaeEncoding, resize_and_crop
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import dpmsolver, flow_match, module_of

log = logging.getLogger("xdit_jax")

SanaVideoPipelineOutput = CogVideoXPipelineOutput
PIPELINE_CLASSES = ("SanaVideoPipeline", "SanaImageToVideoPipeline")  # (diffusers loads either folder as either)
# (DPM-Solver++: SanaVideoPipeline's; flow-matching Euler: SanaImageToVideoPipeline's; diffusers runs either)
SCHEDULERS = ("DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
MAX_SEQUENCE_LENGTH = 300

# diffusers SanaVideoPipeline's default ``complex_human_instruction`` (data)
SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for video "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and temporal "
    "relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, "
    "peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots of "
    "blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker "
    "bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]

# diffusers' ASPECT_RATIO_480_BIN / ASPECT_RATIO_720_BIN of pipeline_sana_video.py: {ratio: (height, width)}
_RATIOS = ("0.5", "0.57", "0.68", "0.78", "1.0", "1.13", "1.29", "1.46", "1.67", "1.75", "2.0")
_BINS = {30: [(448, 896), (480, 832), (528, 768), (560, 720), (624, 624), (672, 592), (720, 560), (768, 528),
              (816, 496), (832, 480), (896, 448)],
         22: [(672, 1344), (704, 1280), (800, 1152), (832, 1088), (960, 960), (1024, 896), (1088, 832), (1152, 800),
              (1248, 736), (1280, 704), (1344, 672)]}


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]] | None:
    """diffusers SanaVideoPipeline's bin table for a transformer sample size: 30 -> 480 px, 22 -> 720 px; None
    for others."""
    return dict(zip(_RATIOS, _BINS[sample_size])) if sample_size in _BINS else None


def binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """``classify_height_width_bin``: the bin whose ratio is closest to height / width; the size itself where the
    sample size has no table."""
    bins = aspect_ratio_bins(sample_size)
    if bins is None:
        return height, width
    ar = height / width
    return bins[min(bins, key=lambda k: abs(float(k) - ar))]


def read_configs(folder: str | os.PathLike):
    return image.read_configs(folder, sana_video.SanaVideoConfig, vae_wan.WanVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 480 x 832, 81 frames; SANA-Video's examples write 16 fps."""
    return {"height": 480, "width": 832, "num_frames": 81, "fps": 16}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 6.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if not hasattr(vc, "scale_factor_temporal"):
        raise ValueError(f"SANA-Video runs with the Wan VAE (AutoencoderKLWan) here; this folder's VAE config is "
                         f"{type(vc).__name__}.")
    check_size_and_mesh(height, width, vc.scale_factor_spatial * tc.patch_size[1], tc.num_layers, batch, mesh_spec,
                        guidance_scale)
    lat_f = (num_frames - 1) // vc.scale_factor_temporal + 1
    if lat_f % tc.patch_size[0]:
        raise ValueError(f"num_frames={num_frames}: {lat_f} latent frames, not a multiple of the temporal patch "
                         f"{tc.patch_size[0]}.")


class SanaVideoPipeline(VideoPipelineBase):
    """Text-to-video with SANA-Video — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    LOW_MEMORY_DECODE = wan.LOW_MEMORY_DECODE

    PIPELINE_CLASSES = PIPELINE_CLASSES
    CONFIG = sana_video.SanaVideoConfig
    SCHEDULERS = SCHEDULERS
    STACKED = sana_video.STACKED

    # the SANA family's prompt encoding and text batch; the Wan family's latent layout
    encode_prompt = sana.SanaPipeline.encode_prompt
    _masked_text_batch = image.ImagePipelineBase._masked_text_batch
    latent_shape = wan.WanPipeline.latent_shape
    output_frames = wan.WanPipeline.output_frames

    def _pipefusion_mixing_buffers(self, step_batch: int, latent_shape, abstract: bool = False):
        """PipeFusion's buffers (None without PipeFusion): SANA's token mixers' (the linear attention's per-patch
        sums; the grid conv's input) and the frame conv's input in the same conv buffer's last channels, whose halo
        is then one frame (:func:`xdit_jax.parallel.token_mixing.frame_conv3`)."""
        from xdit_jax.parallel import pipefusion

        if not self.uses_pipefusion:
            return None
        tc = self.transformer_config
        pt, ph, pw = tc.patch_size
        f, h, w = latent_shape[2] // pt, latent_shape[3] // ph, latent_shape[4] // pw
        slots = pipefusion.stack_slots(self.stacked_layers, self.mesh_spec.pipefusion)[0]
        return (pipefusion.init_mixing(self.mesh, slots, step_batch, f * h * w, w, tc.num_attention_heads,
                                       tc.attention_head_dim, 2 * tc.ff_hidden + tc.inner_dim, self.dtype,
                                       self.pipefusion_patches, abstract=abstract, halo=max(w + 1, h * w)),)

    def _decode_fn(self, size: tuple[int, int] | None = None):
        """Jitted Wan VAE decode over the mesh of the latents (B, C, F, h, w), unscaled with the VAE's latents mean /
        std -> (B, F, H, W, 3) in [0, 1]; ``size``: each frame resized and cropped to it (resolution binning)."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, tiling=None, **kw):
            frame_chunk = None
            if tiling == wan.LOW_MEMORY_DECODE:
                frame_chunk, tiling = 1, None
            return vae_wan.decode(vae, vae_wan.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype),
                                  frame_chunk=frame_chunk, tiling=tiling, **kw)

        def post(video):  # (B, C, F, H, W): frame by frame, as diffusers' resize_and_crop_tensor
            b, c, f, h, w = video.shape
            frames = resize_and_crop(video.transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w), *size)
            return frames.reshape(b, f, c, *size).transpose(0, 2, 1, 3, 4)

        return self._jit_decode(("fn", size), decode, None if size is None else post)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        from flax import nnx

        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        embeds = sd((n, max_sequence_length, self.transformer_config.caption_channels), self.dtype)
        mask = sd((n, max_sequence_length), jnp.int32)
        sched = jax.tree.map(jnp.asarray, self._schedule(num_inference_steps))
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._latent_sharding(shape)),
                             jax.eval_shape(lambda: self._scheduler_state(shape)))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_mixing_buffers(n, shape, abstract=True)
        args = self._step_args(embeds, mask, sched, jnp.float32(guidance_scale), 0)
        return self._step_fn(do_cfg, warmup=kv is None).lower(tstate, latents, state, jnp.int32(0), kv,
                                                              *args).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = "",
                 *, height: int | None = None, width: int | None = None, frames: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
                 negative_prompt_attention_mask=None, latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 use_resolution_binning: bool = True, complex_human_instruction: list[str] | None = None,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> SanaVideoPipelineOutput:
        """As diffusers' ``SanaVideoPipeline.__call__`` (``frames``, or ``num_frames`` as the other video pipelines
        here); ``complex_human_instruction`` None means diffusers' default
        (:data:`SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION`); pass ``[]`` for none."""
        return self._generate(prompt, negative_prompt, height=height, width=width, frames=frames,
                              num_frames=num_frames, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, prompt_embeds=prompt_embeds,
                              prompt_attention_mask=prompt_attention_mask,
                              negative_prompt_embeds=negative_prompt_embeds,
                              negative_prompt_attention_mask=negative_prompt_attention_mask, latents=latents,
                              max_sequence_length=max_sequence_length, use_resolution_binning=use_resolution_binning,
                              complex_human_instruction=complex_human_instruction,
                              num_videos_per_prompt=num_videos_per_prompt, seed=seed, output_type=output_type,
                              progress=progress)

    # the step: SANA's (DPM-Solver++, text-to-video), else PipelineBase._flow_step_fn's with the folder's scheduler
    @property
    def _sana_step(self) -> bool:
        return module_of(self.scheduler_config) is dpmsolver

    def _schedule(self, num_inference_steps: int):
        return module_of(self.scheduler_config).make_schedule(self.scheduler_config, num_inference_steps)

    def _scheduler_state(self, shape):
        if module_of(self.scheduler_config) is dpmsolver:
            return dpmsolver.init_state(shape, jnp.float32, self.scheduler_config.solver_order)
        return flow_match.init_state()

    def _step_args(self, embeds, mask, sched_arrays, guidance, seed: int) -> tuple:
        if self._sana_step:
            return embeds, mask, sched_arrays, guidance
        return (embeds, mask), sched_arrays, guidance, jax.random.key(seed)

    def _embed_args(self, x, texts, t):
        return x, texts[0], t, texts[1]

    def _step_scheduler(self):
        return module_of(self.scheduler_config)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        if self._sana_step:
            return sana.SanaPipeline._step_fn(self, do_cfg, warmup)
        return self._flow_step_fn(do_cfg, warmup, self._embed_args, scheduler=self._step_scheduler())

    def _generate(self, prompt, negative_prompt, *, height, width, frames, num_frames, num_inference_steps,
                  guidance_scale, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                  negative_prompt_attention_mask, latents, max_sequence_length, use_resolution_binning,
                  complex_human_instruction, num_videos_per_prompt, seed, output_type, progress,
                  image=None) -> SanaVideoPipelineOutput:
        """The call; ``image``: image-to-video's first frame (its latents put in latent frame 0)."""
        if frames is not None and num_frames is not None and frames != num_frames:
            raise ValueError(f"frames={frames} and num_frames={num_frames} disagree; give one.")
        dv = self.default_video()
        height, width = height or dv["height"], width or dv["width"]
        num_frames = next((v for v in (frames, num_frames) if v is not None), dv["num_frames"])
        requested = (height, width)
        if use_resolution_binning:
            height, width = binned_size(height, width, self.transformer_config.sample_size)
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("prompt_embeds need their prompt_attention_mask (SANA-Video's cross attention uses it).")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        made = self.output_frames(num_frames)
        if made != num_frames:
            log.warning("num_frames=%d: the VAE makes %dk+1 frames; this video has %d (as diffusers').", num_frames,
                        self.vae_config.scale_factor_temporal, made)
        chi = SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION if complex_human_instruction is None else complex_human_instruction
        do_cfg = guidance_scale > 1.0
        sched = self._schedule(num_inference_steps)  # refuses a step count the schedule cannot take, first
        timer = StageTimer()

        # 1. text: Gemma 2; [negative; prompt] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, max_sequence_length, chi)
            embeds, mask = self._masked_text_batch(
                prompt_embeds, prompt_attention_mask, do_cfg, per, negative_prompt_embeds,
                negative_prompt_attention_mask,
                lambda _: self.encode_prompt(negative_prompts(negative_prompt, batch), max_sequence_length, None,
                                             select=False), "Gemma 2")

        # 2. latents (diffusers' layout: B, C, F, h, w); image-to-video: the image's latents in frame 0
        shape = self.latent_shape(batch * per, height, width, num_frames)
        latents = self._initial_latents(latents, shape, jax.random.key(seed), dpmsolver.INIT_NOISE_SIGMA,
                                        "batch, channels, (frames - 1) / 4 + 1, height / 8, width / 8")
        if image is not None:
            with timer.stage("image_encoding"):
                first = self.image_latents(preprocess_image(image, height, width))[:, :, None]  # (1, C, 1, h, w)
                latents = jax.device_put(latents.at[:, :, :1].set(jnp.broadcast_to(first, latents[:, :, :1].shape)),
                                         latents.sharding)

        # 3. denoise (one jitted step per iteration), 4. decode
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        state = jax.tree.map(lambda a: jax.device_put(a, latents.sharding), self._scheduler_state(shape))
        resize = requested if requested != (height, width) else None
        video = self._denoise_and_decode(timer, do_cfg, latents, state,
                                         self._step_args(embeds, mask, sched_arrays, guidance, seed),
                                         len(sched.timesteps), progress, output_type, self._decode_fn(resize),
                                         kv=self._pipefusion_mixing_buffers(embeds.shape[0], shape))
        return SanaVideoPipelineOutput(frames=video, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


# ---------------------------------------------------------------------------------------------- image-to-video

# (diffusers loads the text-to-video folders, e.g. SANA-Video_2B_480p_diffusers, as SanaImageToVideoPipeline too)
I2V_PIPELINE_CLASSES = ("SanaImageToVideoPipeline", "SanaVideoPipeline")
I2V_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler")


class _KeepFirstFrame:
    """The scheduler's step of every latent frame but the first (the image's), as diffusers steps ``latents[:, :,
    1:]`` and puts frame 0 back. Both schedulers' updates are elementwise in the latents (DPM-Solver's multistep
    state too), so stepping all frames and restoring frame 0 gives frames 1.. the same numbers."""

    def __init__(self, module):
        self.module = module

    def step(self, sched, i, pred, latents, state=(), *noise):
        prev, state = self.module.step(sched, i, pred, latents, state, *noise)
        return prev.at[:, :, :1].set(latents[:, :, :1].astype(prev.dtype)), state


class SanaImageToVideoPipeline(WanVaeEncoding, SanaVideoPipeline):
    """Image-to-video with SANA-Video, diffusers' ``SanaImageToVideoPipeline``: the image (resized to the video's
    size as diffusers' ``VideoProcessor.preprocess``) encoded by the Wan VAE's encoder (the posterior's mode,
    normalized by the latents mean / std) into latent frame 0 of the initial latents; each step the transformer sees
    frame 0's tokens at timestep 0 and the others at ``t`` (diffusers' per-token ``t * (1 - mask)``), flow-matching
    Euler updates frames 1.. (frame 0 kept); the whole video decoded. Text, CFG, binning and meshes as
    :class:`SanaVideoPipeline`."""

    PIPELINE_CLASSES = I2V_PIPELINE_CLASSES
    SCHEDULERS = I2V_SCHEDULERS

    _sana_step = False  # (PipelineBase._flow_step_fn with the first frame's tokens at timestep 0, its latents kept)

    def _embed_args(self, x, texts, t):
        return x, texts[0], t, texts[1], None, jnp.zeros_like(t)

    def _step_scheduler(self):
        return _KeepFirstFrame(module_of(self.scheduler_config))

    def __call__(self, image, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = "",
                 *, height: int | None = None, width: int | None = None, frames: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 prompt_embeds=None, prompt_attention_mask=None, negative_prompt_embeds=None,
                 negative_prompt_attention_mask=None, latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 use_resolution_binning: bool = True, complex_human_instruction: list[str] | None = None,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> SanaVideoPipelineOutput:
        """As diffusers' ``SanaImageToVideoPipeline.__call__``: ``image`` a PIL image or an (H, W, 3) array of the
        video's size; the rest as :meth:`SanaVideoPipeline.__call__`."""
        if image is None:
            raise ValueError("SanaImageToVideoPipeline needs image=, the video's first frame.")
        return self._generate(prompt, negative_prompt, height=height, width=width, frames=frames,
                              num_frames=num_frames, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, prompt_embeds=prompt_embeds,
                              prompt_attention_mask=prompt_attention_mask,
                              negative_prompt_embeds=negative_prompt_embeds,
                              negative_prompt_attention_mask=negative_prompt_attention_mask, latents=latents,
                              max_sequence_length=max_sequence_length, use_resolution_binning=use_resolution_binning,
                              complex_human_instruction=complex_human_instruction,
                              num_videos_per_prompt=num_videos_per_prompt, seed=seed, output_type=output_type,
                              progress=progress, image=image)


__all__ = ["SanaImageToVideoPipeline", "SanaVideoPipeline", "SanaVideoPipelineOutput",
           "SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION", "binned_size", "check_request", "default_video", "read_configs"]
