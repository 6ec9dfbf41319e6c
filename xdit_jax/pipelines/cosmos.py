"""Cosmos-Predict2 (NVIDIA) text-to-image and video-to-world, diffusers' ``Cosmos2TextToImagePipeline`` and
``Cosmos2VideoToWorldPipeline`` on a JAX mesh.

    pipe = Cosmos2TextToImagePipeline.from_pretrained("nvidia/Cosmos-Predict2-2B-Text2Image", mesh="cfg=2,ulysses=4")
    out = pipe("A robot arm picks up a red cube.", height=768, width=1360, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

    pipe = Cosmos2VideoToWorldPipeline.from_pretrained("nvidia/Cosmos-Predict2-2B-Video2World", mesh="ulysses=8")
    out = pipe(image=first_frame, prompt="...", num_frames=93, height=704, width=1280)
    out.frames   # (batch, frames, height, width, 3)

The parts are Wan's and T5's: T5 (v1.1 XXL; each caption's states after its tokens zeroed, the long default
negative prompt of diffusers), the Cosmos transformer (:mod:`xdit_jax.models.cosmos`: its video tokens sharded over
(ring, ulysses) by the shared attention op, or pipelined by PipeFusion), the Wan 2.1 VAE (latents normalised by
``latents_mean`` / ``latents_std``, ``sigma_data`` = 1).

The sampler is diffusers' EDM-style preconditioning on the flow-matching Euler scheduler: Karras sigmas from 80 to
0.002 (rho 7; the last step's next sigma is ``sigma_min``, not 0: ``final_sigmas_type="sigma_min"``), the noise
scaled by 80; at each step ``t = sigma / (sigma + 1)``, the model sees ``latents * (1 - t)`` at timestep ``t`` and
its output ``o`` becomes ``x0 = (1 - t) latents - t o``; CFG is ``x0_c + g (x0_c - x0_u)`` (Cosmos' rule: the scale
multiplies the difference added to the conditional prediction, so ``guidance_scale=7`` weighs it 8 : -7); the Euler
step takes the velocity ``(latents - x0) / sigma``. All of it in float32 inside the one jitted step.

Video2World: the image (or the video's frames, the last repeated up to ``num_frames``) encoded by the Wan VAE's
encoder (a sample of its posterior, as diffusers' ``retrieve_latents``; the draw is JAX's, from ``seed``); the first
``(frames_given - 1) // 4 + 1`` latent frames are conditioned: there the model sees those latents at the tiny
``sigma_conditioning`` (a timestep per latent frame), a condition-mask channel marks them, and the prediction is
replaced by them, in both CFG halves; the positions are scaled by ``24 / fps`` in time.

Differences from diffusers, by design: no safety checker (NVIDIA's ``cosmos_guardrail`` is not part of this engine;
diffusers refuses to run without one — the text and video checks are the user's responsibility under the NVIDIA Open
Model License), hence no 8-bit rounding of the decoded frames that diffusers' checker pass makes; the posterior
draw is a JAX one. Cosmos 1.0 folders (``CosmosTextToWorldPipeline`` / ``CosmosVideoToWorldPipeline``: the
AutoencoderKLCosmos VAE) and Cosmos 2.5 (``Cosmos2_5PredictBasePipeline``) are refused with a clear error.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import cosmos, vae_wan
from xdit_jax.pipelines import image as image_mod
from xdit_jax.pipelines import wan
from xdit_jax.pipelines.denoise import (
    StageTimer,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    preprocess_image,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.image import ImagePipelineOutput, WanVaeEncoding
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

CosmosPipelineOutput = wan.WanPipelineOutput
MAX_SEQUENCE_LENGTH = 512
SIGMA_MAX, SIGMA_MIN, SIGMA_DATA = 80.0, 0.002, 1.0  # diffusers' Cosmos2 pipelines register these on the scheduler
SIGMA_CONDITIONING = 0.0001
DEFAULT_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, "
    "jerky movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality."
)
COSMOS1 = ("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline")
COSMOS25 = ("Cosmos2_5PredictBasePipeline", "Cosmos2_5TransferPipeline")


def read_configs(folder):
    return image_mod.read_configs(folder, cosmos.CosmosConfig, vae_wan.WanVAEConfig)


def cosmos_schedule(cfg: flow_match.FlowMatchEulerConfig, n: int) -> flow_match.FlowMatchSchedule:
    """diffusers' ``set_timesteps(sigmas=linspace(0, 1, n))`` on the Cosmos2 pipelines' scheduler (Karras sigmas
    between the registered ``sigma_max`` 80 and ``sigma_min`` 0.002, rho 7), the final sigma set to the last
    step's (``final_sigmas_type="sigma_min"``)."""
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"num_inference_steps must be an integer >= 2 (the Karras schedule's ends), got {n!r}.")
    if not cfg.use_karras_sigmas or cfg.use_dynamic_shifting or cfg.shift_terminal or cfg.invert_sigmas:
        raise NotImplementedError("Cosmos-Predict2 runs FlowMatchEulerDiscreteScheduler with use_karras_sigmas=True "
                                  "(no dynamic shifting, shift_terminal or inverted sigmas), as its checkpoints ship; "
                                  "this scheduler config differs.")
    rho = 7.0
    hi, lo = SIGMA_MAX ** (1 / rho), SIGMA_MIN ** (1 / rho)
    s = ((hi + np.linspace(0, 1, int(n)) * (lo - hi)) ** rho).astype(np.float32)
    sig = np.concatenate([s, s[-1:]]).astype(np.float32)
    return flow_match.FlowMatchSchedule(
        num_inference_steps=int(n), num_train_timesteps=cfg.num_train_timesteps, stochastic_sampling=False,
        timesteps=(s * np.float32(cfg.num_train_timesteps)).astype(np.float32), sigmas=sig,
        dt=(sig[1:] - sig[:-1]).astype(np.float32), c_x0=(np.float32(1) - sig[1:]).astype(np.float32))


def check_video_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                        guidance_scale: float = 7.0) -> None:
    """Refuse what the model cannot take (height / width multiples of 16, the latents within ``max_size``)."""
    wan.check_request(tc, vc, height, width, num_frames, batch, mesh_spec, guidance_scale)
    s, st = vc.scale_factor_spatial, vc.scale_factor_temporal
    grid = ((num_frames - 1) // st + 1, height // s // tc.patch_size[1], width // s // tc.patch_size[2])
    if any(g > m for g, m in zip(grid, tc.max_patches)):
        raise ValueError(f"{num_frames} frames of {height} x {width} make {grid[0]} x {grid[1]} x {grid[2]} patches; "
                         f"this model's max_size {tc.max_size} allows {tc.max_patches}.")


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 7.0):
    """:func:`check_video_request` for one image (the command line's image-family signature)."""
    check_video_request(tc, vc, height, width, 1, batch, mesh_spec, guidance_scale)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' Cosmos2TextToImagePipeline default: 768 x 1360."""
    return {"height": 768, "width": 1360}


def default_image(tc=None, vc=None) -> dict:
    return {"height": 768, "width": 1360, "num_frames": 1, "fps": 16}


def default_world(tc=None, vc=None) -> dict:
    return {"height": 704, "width": 1280, "num_frames": 93, "fps": 16}


class _CosmosBase(wan.WanPipeline):
    """What the two Cosmos-Predict2 pipelines share (the Wan pipeline's loading, text inputs, VAE decode and mesh
    handling, with Cosmos' transformer, schedule and step)."""

    CONFIG = cosmos.CosmosConfig
    SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
    STACKED = cosmos.STACKED
    _check_request = staticmethod(check_video_request)

    @classmethod
    def from_pretrained(cls, model, **kw):
        _refuse_other_cosmos(model)
        return super().from_pretrained(model, **kw)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """(B, L, d) T5 states as diffusers' ``_get_t5_prompt_embeds``: padded to ``max_sequence_length``, encoded
        with their mask, each caption's states after its tokens zeroed."""
        ids, mask = tokenize(self.tokenizer, list(prompts), max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        states = self._text_encoder_fn()(ids, mask)
        return (states * (mask[..., None] > 0)).astype(self.dtype)

    def _text_inputs(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per, do_cfg,
                     max_sequence_length):
        if do_cfg and negative_prompt_embeds is None and negative_prompt is None:
            negative_prompt = DEFAULT_NEGATIVE_PROMPT  # diffusers' Cosmos2 default
        negative_prompts(negative_prompt, batch)  # (checks the count)
        return super()._text_inputs(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per,
                                    do_cfg, max_sequence_length)

    def schedule(self, num_inference_steps: int):
        return cosmos_schedule(self.scheduler_config, num_inference_steps)

    def _init_state(self, shape):
        return flow_match.init_state()

    # the step's static settings: Video2World's conditioned latent frames and fps (set by the call)
    _cond_frames = 0
    _fps = None

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng)``: Cosmos'
        preconditioning, the transformer over the mesh, CFG on the x0 predictions and the Euler update (module
        docstring); ``texts``: (T5 states,) [+ (the conditioning latents,) for Video2World]."""
        n_cond, fps = int(self._cond_frames), self._fps
        key = ("cosmos", do_cfg, warmup, n_cond, fps)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        t_cond = np.float32(SIGMA_CONDITIONING) / (np.float32(SIGMA_CONDITIONING) + np.float32(1))

        def blocks(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            sigma = sched.sigmas[i]
            t = sigma / (sigma + 1)
            x = latents * (1 - t)
            xb = self._model_batch(x, do_cfg)
            nb, _, f = xb.shape[:3]
            timestep = jnp.broadcast_to(t, (nb,))
            cond_mask = None
            if n_cond:
                ind = (jnp.arange(f) < n_cond).reshape(1, 1, f, 1, 1)
                xb = jnp.where(ind, texts[1].astype(xb.dtype), xb)
                timestep = jnp.broadcast_to(jnp.where(jnp.arange(f) < n_cond, t_cond, t), (nb, f))
                cond_mask = jnp.broadcast_to(ind.astype(dtype), (nb, 1) + xb.shape[2:])
            tokens_x, tokens, cond = model.embed(xb.astype(dtype), timestep.astype(dtype), texts[0], fps=fps,
                                                 condition_mask=cond_mask)
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = model.head(tokens_x, cond, xb.shape).astype(jnp.float32)
            b = latents.shape[0]
            pred = self._real_rows(pred, b, do_cfg)
            lat2 = jnp.concatenate([latents, latents]) if do_cfg else latents
            x0 = (1 - t) * lat2 - t * pred
            if n_cond:
                x0 = jnp.where(ind, self._real_rows(texts[1], b, do_cfg).astype(jnp.float32), x0)
            if do_cfg:
                uncond, text = jnp.split(x0, 2)
                x0 = text + guidance * (text - uncond)
            v = (latents - x0) / sigma
            latents = (latents + sched.dt[i] * v).astype(latents.dtype)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _generate_cosmos(self, prompt, negative_prompt, *, height, width, num_frames, num_inference_steps,
                         guidance_scale, prompt_embeds, negative_prompt_embeds, latents, max_sequence_length, per,
                         seed, output_type, progress, condition=None, fps=None):
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(per, "num_videos_per_prompt" if condition is not None else "num_images_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        sched = self.schedule(num_inference_steps)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        with timer.stage("text_encoding"):
            texts = self._text_inputs(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per,
                                      do_cfg, max_sequence_length)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        rng = jax.random.key(seed)
        n_cond = 0
        if condition is not None:
            with timer.stage("video_encoding"):
                cond_latents, n_cond = condition(shape, jax.random.fold_in(rng, 1))
                texts += (self._put_condition(cond_latents, batch * per, do_cfg),)
                jax.block_until_ready(texts)
        latents = self._initial_latents(latents, shape, rng, SIGMA_MAX,
                                        "batch, channels, latent frames, height/8, width/8")
        self._cond_frames, self._fps = n_cond, fps
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        args = (texts, sched_arrays, self._put_replicated(jnp.float32(guidance_scale)), rng)
        state = flow_match.init_state()
        out = self._denoise_and_decode(timer, do_cfg, latents, state, args, len(sched.timesteps), progress,
                                       output_type, self._decode_fn(),
                                       kv=self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape)))
        return out, timer

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, F, h, w): the noise latents (Video2World's transformer takes the condition mask too)."""
        vc = self.vae_config
        s, st = vc.scale_factor_spatial, vc.scale_factor_temporal
        return (batch, vc.z_dim, (num_frames - 1) // st + 1, height // s, width // s)


def _refuse_other_cosmos(model) -> None:
    """Cosmos 1.0 and 2.5 folders: a clear NotImplementedError before any conversion."""
    from pathlib import Path

    from xdit_jax.conversion import read_json

    index = Path(str(model)) / "model_index.json"
    if not index.exists():
        return
    kind = read_json(index).get("_class_name")
    if kind in COSMOS1:
        raise NotImplementedError(f"{model} holds a Cosmos 1.0 pipeline ({kind}: the AutoencoderKLCosmos VAE and the "
                                  "Cosmos 1.0 transformer); xdit_jax runs Cosmos-Predict2 (Cosmos2TextToImagePipeline, "
                                  "Cosmos2VideoToWorldPipeline) only.")
    if kind in COSMOS25:
        raise NotImplementedError(f"{model} holds a Cosmos 2.5 pipeline ({kind}: the Qwen2.5-VL text encoder); "
                                  "xdit_jax runs Cosmos-Predict2 only.")


class Cosmos2TextToImagePipeline(_CosmosBase):
    """Cosmos-Predict2 Text2Image (2B / 14B) — see the module docstring."""

    PIPELINE_CLASSES = ("Cosmos2TextToImagePipeline",)
    _default_video = staticmethod(default_image)

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 35,
                 guidance_scale: float = 7.0, num_images_per_prompt: int = 1, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> ImagePipelineOutput:
        """diffusers' call and defaults (768 x 1360, 35 steps, guidance 7; ``generator`` -> ``seed``). ``latents``:
        (B, C, 1, h, w) standard normal, scaled by 80 here as diffusers does."""
        dv = self.default_video()
        height = dv["height"] if height is None else height
        width = dv["width"] if width is None else width
        out, timer = self._generate_cosmos(prompt, negative_prompt, height=height, width=width, num_frames=1,
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                           latents=latents, max_sequence_length=max_sequence_length,
                                           per=num_images_per_prompt, seed=seed, output_type=output_type,
                                           progress=progress)
        images = out[:, :, 0] if output_type == "latent" else out[:, 0]
        return ImagePipelineOutput(images=images, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class Cosmos2VideoToWorldPipeline(WanVaeEncoding, _CosmosBase):
    """Cosmos-Predict2 Video2World (2B / 14B) — see the module docstring."""

    PIPELINE_CLASSES = ("Cosmos2VideoToWorldPipeline",)
    _default_video = staticmethod(default_world)

    def _condition_shapes(self, latent_shape) -> tuple:
        return (latent_shape,)

    def compile_step(self, batch: int = 1, *, cond_latent_frames: int = 1, fps: int = 16, **kw):
        """:meth:`WanPipeline.compile_step` for a Video2World call with ``cond_latent_frames`` given latent frames
        (1: an image) at ``fps``."""
        self._cond_frames, self._fps = int(cond_latent_frames), fps
        return super().compile_step(batch, **kw)

    def video_condition(self, image, video, shape, rng, height: int, width: int, num_frames: int):
        """(conditioning latents (1, C, T', h, w), conditioned latent frames), as diffusers' ``prepare_latents``:
        the frames (the image, or the video's last ``num_frames``) padded with the last one to ``num_frames``,
        encoded, a sample of the posterior (mean + std x a normal draw of ``rng``), normalised."""
        frames = [image] if image is not None else list(video)
        if not frames:
            raise ValueError("video= has no frames.")
        if len(frames) >= num_frames:
            frames = frames[-num_frames:]
            n_cond = (num_frames - 1) // self.vae_config.scale_factor_temporal + 1
        else:
            n_cond = (len(frames) - 1) // self.vae_config.scale_factor_temporal + 1
        pixels = [preprocess_image(wan._resizable(f, height, width), height, width)[:, :, None] for f in frames]
        pixels += [pixels[-1]] * (num_frames - len(pixels))
        mean, std = self._moments(jnp.concatenate(pixels, axis=2))
        z = mean + std * self._image_noise(mean.shape, rng)
        z = self._scale_latents(z) * SIGMA_DATA
        if z.shape[2:] != tuple(shape[2:]):
            raise ValueError(f"the encoded video {tuple(z.shape)} does not fit latents {tuple(shape)}.")
        return z, n_cond

    @staticmethod
    def _image_noise(shape, rng):
        """The standard normal draw of the posterior's sample (diffusers' ``latent_dist.sample(generator)``)."""
        return jax.random.normal(rng, shape, jnp.float32)

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, video=None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 35,
                 guidance_scale: float = 7.0, fps: int = 16, num_videos_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 sigma_conditioning: float = SIGMA_CONDITIONING, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> CosmosPipelineOutput:
        """diffusers' call and defaults (93 frames of 704 x 1280 at 16 fps, 35 steps, guidance 7). ``image``: the
        first frame (PIL, or an array of ``height`` x ``width``), or ``video``: frames (a list); ``latents``: (B, C,
        T', h, w) standard normal, scaled by 80 here as diffusers does."""
        if (image is None) == (video is None):
            raise ValueError("Video2World needs exactly one of image= (the first frame) or video= (the first frames).")
        if sigma_conditioning != SIGMA_CONDITIONING:
            raise NotImplementedError(f"sigma_conditioning={sigma_conditioning}: only diffusers' default "
                                      f"{SIGMA_CONDITIONING} is wired into the compiled step.")
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        out, timer = self._generate_cosmos(
            prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, latents=latents, max_sequence_length=max_sequence_length,
            per=num_videos_per_prompt, seed=seed, output_type=output_type, progress=progress, fps=fps,
            condition=lambda shape, rng: self.video_condition(image, video, shape, rng, height, width, num_frames))
        return CosmosPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
