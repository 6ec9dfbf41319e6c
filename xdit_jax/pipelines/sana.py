"""SANA text-to-image, diffusers' ``SanaPipeline`` on a JAX mesh.

    pipe = SanaPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A cute cat sitting on a windowsill.", height=1024, width=1024, seed=42)
    out.images   # (batch, height, width, 3) float in [0, 1]

Parts: Gemma 2 text encoder (:mod:`xdit_jax.models.gemma2`; the prompt lower-cased and stripped, prefixed with
the complex human instruction, its first token and last ``max_sequence_length - 1`` kept; the negative prompt
without the instruction, all ``max_sequence_length`` tokens), the SANA transformer (:mod:`xdit_jax.models.sana`:
its linear attention and GLUMBConv's grid convolution go over the sequence axes through
:mod:`xdit_jax.parallel.token_mixing`), CFG over ``cfg``, DPM-Solver++ with flow sigmas (``flow_prediction``,
``use_flow_sigmas``, ``flow_shift``) in the jitted step, and the DC-AE decode (:mod:`xdit_jax.models.vae_dc`) of
``latents / scaling_factor`` split over the mesh.

``use_resolution_binning`` (default on, as diffusers): the image is generated at the size of the aspect-ratio
bin (diffusers' 512 / 1024 / 2048 / 4096 px tables for sample sizes 16 / 32 / 64 / 128) closest to the
requested one, then resized and center-cropped back. Where diffusers has no table (it raises "Invalid sample
size") the model runs at the requested size (the tiny test models).

PipeFusion (``pipefusion=N``, or ``pipefusion_patches`` on any mesh): SANA has no softmax self-attention, so it has
no K/V buffers; the linear attention's per-patch sums and the grid
convolution's input are buffered instead (:func:`xdit_jax.parallel.pipefusion.init_mixing`, the ops'
:mod:`xdit_jax.parallel.token_mixing`). The cross-attention to the caption is local (every patch holds the caption).

SANA 1.5 (``qk_norm``) runs here; a transformer config's ``timestep_scale`` multiplies the timestep (as diffusers').
Sana Sprint: :class:`SanaSprintPipeline` below (its own folders, model_index SanaSprintPipeline).

Not supported (refused): ``clean_caption`` (as PixArt), ControlNet transformers.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.models import gemma2, sana, vae_dc
from xdit_jax.pipelines import image, pixart
from xdit_jax.pipelines.denoise import (
    StageTimer,
    as_numpy,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
)
from xdit_jax.pipelines.image import (  # noqa: F401  (this family's API too)
    ImagePipelineBase,
    ImagePipelineOutput,
    default_size,
    resize_and_crop,
    vae_scale_factor,
)
from xdit_jax.schedulers import dpmsolver, scm

PIPELINE_CLASSES = ("SanaPipeline",)
SCHEDULERS = ("DPMSolverMultistepScheduler",)
MAX_SEQUENCE_LENGTH = 300

# diffusers' ASPECT_RATIO_4096_BIN as (height, width) in units of 256 px, ordered by aspect ratio
_BINS_4096 = [(8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22),
              (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16),
              (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11),
              (24, 10), (25, 10), (26, 9), (27, 9), (28, 9), (29, 8), (30, 8), (31, 8), (32, 8)]

SanaPipelineOutput = ImagePipelineOutput


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]] | None:
    """diffusers SanaPipeline's bin table for a transformer sample size (latent pixels, patch 1, 32x VAE):
    16 -> 512 px, 32 -> 1024 px, 64 -> 2048 px (PixArt's tables), 128 -> 4096 px; None for others."""
    if sample_size == 128:
        return {str(round(h / w, 2)): (h * 256, w * 256) for h, w in _BINS_4096}
    return pixart.aspect_ratio_bins({16: 64, 32: 128, 64: 256}.get(sample_size, -1))


def binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """``classify_height_width_bin``: the bin whose ratio is closest to height / width; the size itself where
    the sample size has no table."""
    bins = aspect_ratio_bins(sample_size)
    if bins is None:
        return height, width
    ar = height / width
    return bins[min(bins, key=lambda k: abs(float(k) - ar))]


def read_configs(folder: str | os.PathLike):
    return image.read_configs(folder, sana.SanaConfig, vae_dc.AutoencoderDCConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 4.5) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    check_size_and_mesh(height, width, vae_scale_factor(vc) * tc.patch_size, tc.num_layers, batch, mesh_spec,
                        guidance_scale)


class SanaPipeline(ImagePipelineBase):
    """Text-to-image with SANA — see the module docstring."""

    LOW_MEMORY_DECODE = "slices"  # the DC-AE has no tiled decode here: one sample at a time where needed

    PIPELINE_CLASSES = PIPELINE_CLASSES
    CONFIG = sana.SanaConfig
    SCHEDULERS = SCHEDULERS
    STACKED = sana.STACKED

    def _pipefusion_mixing_buffers(self, step_batch: int, height: int, width: int, abstract: bool = False):
        """PipeFusion's buffers for a step batch of ``step_batch`` images of ``height`` x ``width`` px (None
        without PipeFusion): the token mixers' alone (:func:`xdit_jax.parallel.pipefusion.init_mixing`; no softmax
        self-attention, so no K/V buffers)."""
        from xdit_jax.parallel import pipefusion

        if not self.uses_pipefusion:
            return None
        tc = self.transformer_config
        seq = self._image_tokens(height, width)
        grid_w = width // vae_scale_factor(self.vae_config) // tc.patch_size
        slots = pipefusion.stack_slots(self.stacked_layers, self.mesh_spec.pipefusion)[0]
        return (pipefusion.init_mixing(self.mesh, slots, step_batch, seq, grid_w, tc.num_attention_heads,
                                       tc.attention_head_dim, 2 * tc.ff_hidden, self.dtype, self.pipefusion_patches,
                                       abstract=abstract),)

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int, complex_human_instruction=None,
                      select: bool = True):
        """((B, L, hidden) Gemma 2 states, (B, L) mask) as diffusers' ``_get_gemma_prompt_embeds`` (+ the token
        selection of ``encode_prompt`` for the prompt, ``select``)."""
        enc = self._text_encoder_fn()

        def encode(ids, mask):
            return enc(self._put_replicated(ids.astype(jnp.int32)), self._put_replicated(mask.astype(jnp.int32)))

        embeds, mask = gemma2.gemma_prompt_embeds(self.tokenizer, encode, [p.lower().strip() for p in prompts],
                                                  max_sequence_length, complex_human_instruction, select=select)
        return embeds.astype(self.dtype), jnp.asarray(mask, jnp.int32)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        learned_sigma = self.transformer_config.out_ch // 2 == self.transformer_config.in_channels
        timestep_scale = self.transformer_config.timestep_scale  # diffusers' SanaPipeline: t * timestep_scale

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, embeds, mask, sched, guidance):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg)
            b = x.shape[0]
            t = t if timestep_scale == 1.0 else t * timestep_scale
            tokens_x, tokens, cond = model.embed(x.astype(dtype), embeds, jnp.broadcast_to(t, (b,)), mask)
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(tokens_x, cond, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + guidance * (text - uncond)
            if learned_sigma:
                pred = pred[:, : latents.shape[1]]
            latents, sched_state = dpmsolver.step(sched, i, pred, latents, sched_state)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _output(self, latents, output_type: str, requested, height: int, width: int, timer) -> SanaPipelineOutput:
        """The call's result: the latents (``output_type="latent"``), or the decoded images resized back to the
        ``requested`` size where resolution binning changed it."""
        if output_type == "latent":
            return SanaPipelineOutput(images=as_numpy(latents), timings=timer.times,
                                      peak_memory_bytes=peak_memory_bytes())
        with timer.stage("decoding"):
            resize = requested if requested != (height, width) else None
            images = as_numpy(jax.block_until_ready(self._decode_fn(resize)(latents)))
        return SanaPipelineOutput(images=images, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _decode_fn(self, size: tuple[int, int] | None = None):
        """Jitted DC-AE decode of ``latents / scaling_factor`` over the mesh -> (B, H, W, 3) in [0, 1];
        ``size``: resized and cropped to it (resolution binning)."""
        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, **kw):
            return vae_dc.decode(vae, (latents / scaling).astype(dtype), **kw)

        post = None if size is None else (lambda img: resize_and_crop(img, *size))
        return self._jit_decode(("fn", size), decode, post)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = "",
                 *, height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 4.5, prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_embeds=None, negative_prompt_attention_mask=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, use_resolution_binning: bool = True,
                 complex_human_instruction: list[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> SanaPipelineOutput:
        """As diffusers' ``SanaPipeline.__call__``; ``complex_human_instruction`` None means diffusers' default
        instruction (:data:`xdit_jax.models.gemma2.SANA_COMPLEX_HUMAN_INSTRUCTION`); pass ``[]`` for none."""
        requested, (height, width), prompts, batch, per = self._binned_text_request(
            prompt, prompt_embeds, prompt_attention_mask, height, width, use_resolution_binning,
            num_images_per_prompt, guidance_scale, output_type, binned_size, check_request, "SANA")
        chi = gemma2.SANA_COMPLEX_HUMAN_INSTRUCTION if complex_human_instruction is None else complex_human_instruction
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, max_sequence_length, chi)
            embeds, mask = self._masked_text_batch(
                prompt_embeds, prompt_attention_mask, do_cfg, per, negative_prompt_embeds,
                negative_prompt_attention_mask,
                lambda _: self.encode_prompt(negative_prompts(negative_prompt, batch), max_sequence_length, None,
                                             select=False), "Gemma 2")

        # 2. latents (diffusers layout: B, C, h, w)
        shape = self.latent_shape(batch * per, height, width)
        sched = dpmsolver.make_schedule(self.scheduler_config, num_inference_steps)
        latents = self._initial_latents(latents, shape, jax.random.key(seed), dpmsolver.INIT_NOISE_SIGMA,
                                        "batch, channels, height/32, width/32")

        # 3. denoise: one jitted step per iteration
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        with timer.stage("denoising"):
            state = jax.device_put(dpmsolver.init_state(shape, jnp.float32, self.scheduler_config.solver_order),
                                   latents.sharding)
            kv = self._pipefusion_mixing_buffers(embeds.shape[0], height, width)
            latents = self._denoise(do_cfg, latents, state, kv, (embeds, mask, sched_arrays, guidance),
                                    len(sched.timesteps), progress)

        return self._output(latents, output_type, requested, height, width, timer)


# ---------------------------------------------------------------------------------------------- Sana Sprint

SPRINT_PIPELINE_CLASSES = ("SanaSprintPipeline",)
SPRINT_SCHEDULERS = ("SCMScheduler",)
SPRINT_NO_CFG = "Sana Sprint embeds its guidance (no CFG batch): drop cfg from the mesh"


def check_sprint_mesh(mesh_spec) -> None:
    if mesh_spec is not None and mesh_spec.cfg > 1:
        raise ValueError(f"Mesh {mesh_spec}: {SPRINT_NO_CFG} (data, ring, ulysses and pipefusion split it).")


def sprint_binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """SanaSprintPipeline's binning: the 1024 px table for sample size 32 (the only one it has: diffusers raises
    "Invalid sample size" for others, where this runs at the requested size, as :func:`binned_size` does)."""
    return binned_size(height, width, 32) if sample_size == 32 else (height, width)


class SanaSprintPipeline(SanaPipeline):
    """Sana Sprint text-to-image, diffusers' ``SanaSprintPipeline`` on a JAX mesh: the SANA transformer with its
    guidance embedding (no CFG batch: ``guidance_scale * guidance_embeds_scale`` is embedded), the SCM scheduler
    (:mod:`xdit_jax.schedulers.scm`; by default 2 steps at angles 1.5708 and 1.3).

    Each step, as diffusers' loop (angle s, sigma_data d, the latents x carried in units of d)::

        c = sin(s) / (sin(s) + cos(s))                    # the transformer's timestep, in [0, 1]
        x_in = x / d * sqrt(c**2 + (1 - c)**2)
        F = ((1 - 2c) x_in + (1 - 2c + 2c**2) transformer(x_in, c, guidance)) / sqrt(c**2 + (1 - c)**2)
        x, x0 = scm.step(F * d, x)                        # x0 = cos(s) x - sin(s) F d; x = cos(t) x0 + sin(t) d noise

    The initial latents are the (given or drawn) standard normal ones times d; the image is decoded from the last
    step's x0 / d (diffusers' ``denoised``). ``timestep_scale`` is not applied (diffusers' Sprint pipeline does not
    read it). Text: as :class:`SanaPipeline`'s prompt (no negative prompt). PipeFusion and sequence parallelism as
    SanaPipeline (the same transformer and buffers).
    """

    PIPELINE_CLASSES = SPRINT_PIPELINE_CLASSES
    SCHEDULERS = SPRINT_SCHEDULERS

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        key = ("sprint", do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        sigma_data = float(self.scheduler_config.sigma_data)

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, embeds, mask, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            s = sched.timesteps[i]
            c = jnp.sin(s) / (jnp.cos(s) + jnp.sin(s))
            norm = jnp.sqrt(c ** 2 + (1 - c) ** 2)
            x_in = latents / sigma_data * norm
            x = self._model_batch(x_in, False)
            b = x.shape[0]
            tokens_x, tokens, cond = model.embed(x.astype(dtype), embeds, jnp.broadcast_to(c, (b,)), mask,
                                                 jnp.broadcast_to(guidance, (b,)))
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(tokens_x, cond, x.shape), latents.shape[0], False)
            pred = ((1 - 2 * c) * x_in + (1 - 2 * c + 2 * c ** 2) * pred.astype(x_in.dtype)) / norm
            pred = pred.astype(jnp.float32) * sigma_data
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32)
            prev, x0 = scm.step(sched, i, pred, latents, sched_state, noise)
            # diffusers decodes the last step's x0 (equal to prev where the last angle is 0, the default schedules)
            latents = jnp.where(i == sched.num_inference_steps - 1, x0, prev)
            return self._step_out(latents, x0, i, kv)

        return self._jit_step(key, step)

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt=None, *, num_inference_steps: int = 2,
                 timesteps=None,
                 max_timesteps: float | None = scm.MAX_TIMESTEPS,
                 intermediate_timesteps: float | None = scm.INTERMEDIATE_TIMESTEPS, guidance_scale: float = 4.5,
                 height: int | None = None, width: int | None = None, prompt_embeds=None, prompt_attention_mask=None,
                 latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH, use_resolution_binning: bool = True,
                 complex_human_instruction: list[str] | None = None, num_images_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> SanaPipelineOutput:
        """As diffusers' ``SanaSprintPipeline.__call__`` (``timesteps``: n + 1 custom angles, with
        ``max_timesteps=None``; ``intermediate_timesteps`` only for 2 steps: pass None for others, as diffusers);
        ``seed`` draws the initial latents and each step's noise (``normal(fold_in(key(seed), i))``);
        ``negative_prompt``: None only (diffusers' Sprint takes none: the guidance is embedded)."""
        if negative_prompt is not None:
            raise ValueError("Sana Sprint takes no negative prompt: its guidance is embedded, there is no CFG batch.")
        check_sprint_mesh(self.mesh_spec)
        requested, (height, width), prompts, batch, per = self._binned_text_request(
            prompt, prompt_embeds, prompt_attention_mask, height, width, use_resolution_binning,
            num_images_per_prompt, 1.0, output_type, sprint_binned_size, check_request, "Sana Sprint")
        sched = scm.make_schedule(self.scheduler_config, num_inference_steps, timesteps=timesteps,
                                  max_timesteps=max_timesteps, intermediate_timesteps=intermediate_timesteps)
        chi = gemma2.SANA_COMPLEX_HUMAN_INSTRUCTION if complex_human_instruction is None else complex_human_instruction
        timer = StageTimer()

        # 1. text (no CFG batch)
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, max_sequence_length, chi)
            embeds, mask = self._masked_text_batch(prompt_embeds, prompt_attention_mask, False, per, None, None,
                                                   None, "Gemma 2")

        # 2. latents (diffusers layout: B, C, h, w), in units of sigma_data
        shape = self.latent_shape(batch * per, height, width)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, self.scheduler_config.sigma_data,
                                        "batch, channels, height/32, width/32")

        # 3. denoise: one jitted step per iteration; the guidance as diffusers (in the text's dtype, then scaled)
        g = jnp.asarray(guidance_scale, self.dtype) * self.transformer_config.guidance_embeds_scale
        guidance = self._put_replicated(g)
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        with timer.stage("denoising"):
            state = jax.device_put(scm.init_state(shape), latents.sharding)
            kv = self._pipefusion_mixing_buffers(embeds.shape[0], height, width)
            latents = self._denoise(False, latents, state, kv, (embeds, mask, sched_arrays, guidance, rng),
                                    len(sched), progress)
            latents = latents / self.scheduler_config.sigma_data

        return self._output(latents, output_type, requested, height, width, timer)
