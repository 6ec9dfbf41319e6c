"""Latte text-to-video, diffusers' ``LattePipeline`` on a JAX mesh.

    pipe = LattePipeline.from_pretrained("maxin-cn/Latte-1", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A small cactus with a happy face in the Sahara desert.", video_length=16, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

As diffusers: T5 with 120 tokens; ``mask_feature=True`` (the default) — for one video (one prompt,
one video per prompt) the embeddings are cut to the prompt's real tokens and the negative ones to
the same length, for several the embeddings are multiplied by their mask and keep 120 tokens (the
negative ones are not masked); embeddings the caller gives (both ``prompt_embeds`` and
``negative_prompt_embeds``) are used as they are; the transformer gets no attention mask.
Negative prompt "" by default, guidance 7.5, 50 steps, 16 frames, 512 x 512 (the transformer's
sample size x 8). The prediction keeps its first ``in_channels`` channels (Latte-1 predicts a
variance half too) unless the scheduler's config has a learned ``variance_type``. The DDIM step
(Latte-1's scheduler; DDPM and DPM-Solver++ configs run too) is inside the one jitted step.

Over the mesh: CFG halves over ``cfg``, prompts over ``data``, the patch positions of every frame
over ``ring`` x ``ulysses`` (:mod:`xdit_jax.models.latte`: spatial attention sequence-parallel,
temporal attention local), PipeFusion's patches are runs of patch positions over all frames. The VAE
(the SD ``AutoencoderKL``) decodes frame by frame, as diffusers; over a mesh the frames are split
over all its devices (padded to a multiple of the device count), each device decoding its own.

Differences from diffusers, on purpose: ``clean_caption`` is not implemented (as PixArt's pipeline
here); the frame count is free (diffusers' transformer fails for frame counts other than its
``video_length``: :mod:`xdit_jax.models.latte`); ``decode_chunk_size`` is accepted and has no
effect (each frame decodes alone either way, so the video is the same); with only
``prompt_embeds`` given for several videos diffusers' masking fails (its mask is then the
embeddings' shape), here they are used unmasked. ``eta`` > 0 draws DDIM's noise from ``seed``.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import latte, vae_kl
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import ddim, dpmsolver, module_of

log = logging.getLogger("xdit_jax")

LattePipelineOutput = CogVideoXPipelineOutput
MAX_SEQUENCE_LENGTH = 120  # diffusers' LattePipeline: fixed
SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler")


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, latte.LatteConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: the transformer's sample size x 8 (512 x 512 for Latte-1), 16 frames; Latte's
    sample videos play at 8 fps."""
    s = tc.sample_size * image.vae_scale_factor(vc) if tc is not None and vc is not None else 512
    return {"height": s, "width": s, "num_frames": 16, "fps": 8}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 7.5) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"video_length (num_frames) must be a positive integer, got {num_frames!r}.")
    check_size_and_mesh(height, width, image.vae_scale_factor(vc) * tc.patch_size, tc.num_layers, batch, mesh_spec,
                        guidance_scale)


class LattePipeline(VideoPipelineBase):
    """Text-to-video with Latte — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)

    PIPELINE_CLASSES = ("LattePipeline",)
    CONFIG = latte.LatteConfig
    SCHEDULERS = SCHEDULERS
    STACKED = latte.STACKED

    def __init__(self, **parts):
        super().__init__(**parts)
        self.scheduler_module, self.scheduler_cfg = module_of(self.scheduler_config), self.scheduler_config
        self._temporal = True  # the current call's enable_temporal_attentions

    # ------------------------------------------------------------------ stages

    @property
    def learned_variance(self) -> bool:
        """diffusers keeps the whole prediction only where the scheduler's config has variance_type
        learned / learned_range (none of the schedulers here takes those: DDIM's config has no such key)."""
        return getattr(self.scheduler_cfg, "variance_type", None) in ("learned", "learned_range")

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """((B, L, d) T5 embeddings, (B, L) mask) as diffusers: the text lower-cased and stripped (its
        ``clean_caption=False``), padded to ``max_sequence_length``, T5 reading the mask."""
        ids, mask = tokenize(self.tokenizer, [p.lower().strip() for p in prompts], max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        return self._text_encoder_fn()(ids, mask).astype(self.dtype), mask

    def schedule(self, num_inference_steps: int, eta: float = 0.0):
        mod, cfg = self.scheduler_module, self.scheduler_cfg
        if mod is ddim:
            return ddim.make_schedule(cfg, num_inference_steps, eta=eta)
        if eta:
            raise ValueError(f"eta={eta} is DDIM's; this folder's scheduler is {type(cfg).__name__}.")
        return mod.make_schedule(cfg, num_inference_steps)

    def _init_state(self, shape):
        if self.scheduler_module is dpmsolver:
            return dpmsolver.init_state(shape, jnp.float32, self.scheduler_cfg.solver_order)
        return ()

    def _step_fn(self, do_cfg: bool, warmup: bool = True, temporal: bool | None = None):
        """The jitted step ``(tstate, latents, sched_state, i, kv, embeds, sched, guidance, rng) ->
        (latents, sched_state, i + 1, kv)``; ``temporal``: ``enable_temporal_attentions`` (a static switch
        of the program; default: the current call's)."""
        temporal = self._temporal if temporal is None else bool(temporal)
        key = (do_cfg, warmup, temporal)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, mod = self.dtype, self.scheduler_module
        keep_all = self.learned_variance

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond, temporal)

        def step(tstate, latents, sched_state, i, kv, embeds, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg)
            tokens_x, tokens, cond = model.embed(x.astype(dtype), embeds, jnp.broadcast_to(t, (x.shape[0],)))
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(tokens_x, cond, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + guidance * (text - uncond)
            if not keep_all:
                pred = pred[:, : latents.shape[1]]
            if getattr(sched, "needs_noise", False):
                noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32)
                latents, sched_state = mod.step(sched, i, pred, latents, sched_state, noise)
            else:
                latents, sched_state = mod.step(sched, i, pred, latents, sched_state)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_fn(self):
        """Jitted VAE decode of the latents (B, C, F, h, w) frame by frame -> (B, F, H, W, 3) in [0, 1]; over a
        mesh the frames are split over all its devices (padded to a multiple of their count), each decoding
        its frames whole."""
        from jax.sharding import PartitionSpec as P

        from xdit_jax.parallel.sequence import _shard_map

        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, *, tiling=None, slicing=False, mesh=None):
            b, c, f, h, w = latents.shape
            z = (latents / scaling).astype(dtype).transpose(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            if mesh is None:
                out = vae_kl.decode(vae, z, tiling=tiling, slicing=slicing)
            else:
                n, axes = b * f, tuple(mesh.axis_names)
                pad = -n % mesh.size
                if pad:
                    z = jnp.concatenate([z, jnp.zeros((pad,) + z.shape[1:], z.dtype)])
                graphdef, state = nnx.split(vae)
                local = lambda st, zz: vae_kl.decode(nnx.merge(graphdef, st), zz, tiling=tiling,  # noqa: E731
                                                     slicing=slicing)
                out = _shard_map(local, mesh, (jax.tree.map(lambda _: P(), state), P(axes)), P(axes))(state, z)
                out = out[:n]
            out = out.reshape((b, f) + out.shape[1:])  # (B, F, 3, H, W)
            return out.transpose(0, 2, 1, 3, 4)  # channels first, as _jit_decode takes it

        return self._jit_decode("fn", decode)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, F, h, w), diffusers' layout."""
        s = image.vae_scale_factor(self.vae_config)
        return (batch, self.transformer_config.in_channels, num_frames, height // s, width // s)

    def _patches(self, height: int, width: int) -> int:
        p, s = self.transformer_config.patch_size, image.vae_scale_factor(self.vae_config)
        return (height // s // p) * (width // s // p)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     video_length: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                     text_len: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        dv = self.default_video()
        height, width, frames = height or dv["height"], width or dv["width"], video_length or dv["num_frames"]
        self.check_inputs(height, width, frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape = self.latent_shape(batch, height, width, frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        embeds = jax.ShapeDtypeStruct((n, text_len, self.transformer_config.caption_channels), self.dtype,
                                      sharding=self._batch_sharding(3, do_cfg))
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n * frames, self._patches(height, width), abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, self._init_state(shape), jnp.int32(0), kv, embeds, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] = "", *,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 video_length: int | None = None, height: int | None = None, width: int | None = None,
                 eta: float = 0.0, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 mask_feature: bool = True, enable_temporal_attentions: bool = True, decode_chunk_size=None,
                 num_frames: int | None = None, num_videos_per_prompt: int | None = None, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> LattePipelineOutput:
        """diffusers' arguments (``num_frames`` / ``num_videos_per_prompt``: the other video pipelines' names for
        ``video_length`` / ``num_images_per_prompt``); ``decode_chunk_size`` has no effect (module docstring)."""
        del decode_chunk_size
        dv = self.default_video()
        if num_frames is not None and video_length is not None and num_frames != video_length:
            raise ValueError(f"video_length={video_length} and num_frames={num_frames}: give one of them.")
        frames = video_length if video_length is not None else num_frames if num_frames is not None else \
            dv["num_frames"]
        height, width = height or dv["height"], width or dv["width"]
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_videos_per_prompt if num_videos_per_prompt is not None else num_images_per_prompt,
                         "num_images_per_prompt")
        self.check_inputs(height, width, frames, batch, guidance_scale)
        sched = self.schedule(num_inference_steps, eta)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        channels = self.transformer_config.caption_channels

        # 1. text: diffusers' encode_prompt with mask_feature
        with timer.stage("text_encoding"):
            given = prompt_embeds is not None and negative_prompt_embeds is not None
            mask = None
            if prompt_embeds is None:
                prompt_embeds, mask = self.encode_prompt(prompts)
            emb = jnp.asarray(prompt_embeds, self.dtype)
            if emb.ndim != 3 or emb.shape[2] != channels:
                raise ValueError(f"prompt_embeds {tuple(emb.shape)}: this model takes (batch, tokens, {channels}).")
            neg = None
            if do_cfg:
                if negative_prompt_embeds is None:
                    neg, _ = self.encode_prompt(negative_prompts(negative_prompt, batch), emb.shape[1])
                else:
                    neg = jnp.asarray(negative_prompt_embeds, self.dtype)
                if neg.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {neg.shape} and prompt_embeds {emb.shape} must have "
                                     "the same shape.")
            if mask_feature and not given and mask is not None:
                if batch * per == 1:  # one video: only the prompt's real tokens, the negative cut alike
                    keep = int(np.asarray(mask).sum())
                    emb = emb[:, :keep]
                    neg = None if neg is None else neg[:, :keep]
                else:  # several: the padding zeroed, 120 tokens kept (the negative embeddings as they are)
                    emb = emb * jnp.asarray(mask, emb.dtype)[:, :, None]
            if do_cfg:
                emb = jnp.concatenate([neg, emb])
            embeds = self._put_batch(emb, do_cfg, per)
            jax.block_until_ready(embeds)

        # 2. latents (diffusers' layout: B, C, F, h, w)
        shape = self.latent_shape(batch * per, height, width, frames)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, 1.0, "batch, channels, frames, height/8, width/8")
        rng = jax.random.fold_in(rng, 1)  # the scheduler's noise (eta > 0, DDPM): not the initial latents'

        # 3. denoise: one jitted step per iteration
        self._temporal = bool(enable_temporal_attentions)
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        state = jax.device_put(self._init_state(shape), latents.sharding)
        kv = self._pipefusion_buffers(embeds.shape[0] * frames, self._patches(height, width))
        out = self._denoise_and_decode(timer, do_cfg, latents, state, (embeds, sched_arrays, guidance, rng),
                                       len(sched.timesteps), progress, output_type, self._decode_fn(), kv=kv)
        return LattePipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
