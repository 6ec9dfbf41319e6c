"""CogVideoX text-to-video, the diffusers ``CogVideoXPipeline`` on a JAX mesh.

    pipe = CogVideoXPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2", dtype="bfloat16")
    out = pipe("A small dog running on a beach.", num_frames=49, height=480, width=720, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

One denoising step (both CFG halves, guidance, scheduler update) is one jitted function; text
encoding and VAE decoding are their own jitted functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax import schedulers
from xdit_jax.conversion import read_json
from xdit_jax.mesh import build_mesh
from xdit_jax.models import cogvideox, vae_cogvideox
from xdit_jax.pipelines.denoise import (
    PipelineBase,
    StageTimer,
    as_numpy,
    check_size_and_mesh,
    converted_folder,
    negative_prompts,
    parse_dtype,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)

log = logging.getLogger("xdit_jax")


@dataclasses.dataclass
class CogVideoXPipelineOutput:
    """``frames``: (B, F, H, W, 3) in [0, 1] for output_type="np"; the final latents
    (B, F, C, h, w), diffusers' layout, for output_type="latent". ``timings``: seconds per stage."""

    frames: np.ndarray
    timings: dict
    peak_memory_bytes: int | None = None


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 6.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work.

    ``tc``/``vc``: the transformer and VAE configs (cheap to read from a folder's config.json files).
    """
    step = 2 * int(vc.temporal_compression_ratio)
    if num_frames < 1 or (num_frames - 1) % step:
        lo = (max(num_frames, 1) - 1) // step * step + 1
        raise ValueError(f"num_frames={num_frames}: the VAE produces {step}k+1 frames "
                         f"(1, {1 + step}, ..., 49, ...); try {lo} or {lo + step}.")
    check_size_and_mesh(height, width, 2 ** (len(vc.block_out_channels) - 1) * tc.patch_size, tc.num_layers, batch,
                        mesh_spec, guidance_scale)


def default_video(tc, vc) -> dict:
    """Default height, width, frames and fps: diffusers' (the transformer's sample size x the VAE's
    spatial factor, its sample_frames, 8 fps), except CogVideoX1.5 (``patch_size_t``), whose config
    sample size (300) is no video size: there the release's 768 x 1360, 81 frames at 16 fps."""
    if tc.patch_size_t:
        return {"height": 768, "width": 1360, "num_frames": 81, "fps": 16}
    s = 2 ** (len(vc.block_out_channels) - 1)
    return {"height": tc.sample_height * s, "width": tc.sample_width * s, "num_frames": tc.sample_frames, "fps": 8}


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    folder = Path(folder)
    return (cogvideox.CogVideoXConfig.from_dict(read_json(folder / "transformer" / "config.json")),
            vae_cogvideox.CogVideoXVAEConfig.from_dict(read_json(folder / "vae" / "config.json")))


class CogVideoXPipeline(PipelineBase):
    """Text-to-video with CogVideoX (2B, 5B, 1.5) — see the module docstring."""

    def __init__(self, *, transformer, transformer_config, vae, vae_config, text_encoder, tokenizer,
                 scheduler_config, dtype=jnp.float32, mesh=None, attention_backend: str = "auto",
                 pipefusion_patches: int | None = None, pipefusion_warmup_steps: int = 1):
        self._init_parts(transformer=transformer, transformer_config=transformer_config, vae=vae,
                         vae_config=vae_config, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler_config=scheduler_config, dtype=dtype, mesh=mesh,
                         attention_backend=attention_backend, pipefusion_patches=pipefusion_patches,
                         pipefusion_warmup_steps=pipefusion_warmup_steps, stacked=cogvideox.STACKED)
        self.vae_scale_factor_spatial = 2 ** (len(vae_config.block_out_channels) - 1)
        self.vae_scale_factor_temporal = int(vae_config.temporal_compression_ratio)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, mesh=None, dtype="float32", cache_dir=None,
                        variant: str | None = None, revision: str | None = None,
                        attention_backend: str = "auto", pipefusion_patches: int | None = None,
                        pipefusion_warmup_steps: int = 1) -> CogVideoXPipeline:
        """Load a converted folder, a diffusers folder (converted on first use and cached), or a hub id.

        ``pipefusion_patches`` / ``pipefusion_warmup_steps``: PipeFusion's patches per step (default:
        the ``pipefusion`` degree) and exact steps before the patched ones (default 1), xDiT's
        ``--num_pipeline_patch`` / ``--warmup_steps``."""
        dtype = parse_dtype(dtype)
        folder = converted_folder(model, cache_dir=cache_dir, variant=variant, revision=revision)
        mesh_obj = mesh if hasattr(mesh, "axis_names") else build_mesh(mesh)
        layers = cogvideox.CogVideoXConfig.from_dict(read_json(folder / "transformer" / "config.json")).num_layers
        parts = cls._load_parts(folder, mesh_obj, dtype, cogvideox.STACKED, layers)
        scfg = schedulers.SchedulerConfig.from_json(folder / "scheduler" / "scheduler_config.json")
        return cls(**parts, scheduler_config=scfg, dtype=dtype, mesh=mesh_obj, attention_backend=attention_backend,
                   pipefusion_patches=pipefusion_patches, pipefusion_warmup_steps=pipefusion_warmup_steps)

    # ------------------------------------------------------------------ stages

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> np.ndarray:
        """Token ids as diffusers makes them: padded to max length, truncated with a warning."""
        return tokenize(self.tokenizer, prompts, max_sequence_length)[0]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 226) -> jax.Array:
        """(B, max_sequence_length, d_model) T5 embeddings (no attention mask, as diffusers)."""
        ids = self._put_replicated(jnp.asarray(self.tokenize(prompts, max_sequence_length), jnp.int32))
        return self._text_encoder_fn()(ids).astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, embeds, sched, guidance, rng) ->
        (latents, sched_state, i + 1, kv)``; ``kv`` is PipeFusion's K/V buffers (None without it);
        ``warmup``: with PipeFusion, an exact step over the whole sequence (else a patched one)."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, joint, tokens, temb):  # runs on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(joint, tokens, temb)

        def step(tstate, latents, sched_state, i, kv, embeds, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg)
            joint, tokens, temb = model.embed(x.astype(dtype), embeds, jnp.broadcast_to(t, (x.shape[0],)))
            joint, kv = self._blocks_over_mesh(blocks, tstate, joint, tokens, temb, kv, warmup)
            pred = self._real_rows(model.head(joint, temb, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:
                uncond, cond = jnp.split(pred, 2)
                pred = uncond + guidance[i] * (cond - uncond)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = schedulers.step(sched, i, pred, latents, sched_state, noise)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of the latents (B, F, C, h, w) -> (B, F, H, W, 3) in [0, 1]."""
        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, **kw):
            z = jnp.transpose(latents, (0, 2, 1, 3, 4)) / scaling  # (B, C, F, h, w)
            return vae_cogvideox.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def check_inputs(self, height: int, width: int, num_frames: int, batch: int, guidance_scale: float = 6.0):
        check_request(self.transformer_config, self.vae_config, height, width, num_frames, batch, self.mesh_spec,
                      guidance_scale)

    def default_video(self) -> dict:
        return default_video(self.transformer_config, self.vae_config)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int):
        """((B, F, C, h, w) of the latents, latent frames added in front for patch_size_t)."""
        tc = self.transformer_config
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        pt = tc.patch_size_t
        additional = (pt - latent_frames % pt) if pt and latent_frames % pt else 0
        return (batch, latent_frames + additional, tc.in_channels, height // self.vae_scale_factor_spatial,
                width // self.vae_scale_factor_spatial), additional

    def _kv_cache(self, latent_shape, step_batch: int, text_len: int, abstract: bool = False):
        """PipeFusion's K/V buffers (:meth:`PipelineBase._pipefusion_buffers`) for the joint [text; video]
        sequence of these shapes; None without PipeFusion."""
        tc = self.transformer_config
        f, (h, w) = latent_shape[1], latent_shape[3:]
        seq = text_len + (f // (tc.patch_size_t or 1)) * (h // tc.patch_size) * (w // tc.patch_size)
        return self._pipefusion_buffers(step_batch, seq, abstract)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                     max_sequence_length: int | None = None):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it:
        for cost/memory analysis and communication accounting (:mod:`xdit_jax.parallel.comm`)."""
        tc = self.transformer_config
        dv = self.default_video()
        height, width, num_frames = height or dv["height"], width or dv["width"], num_frames or dv["num_frames"]
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape, _ = self.latent_shape(batch, height, width, num_frames)
        seq = max_sequence_length or tc.max_text_seq_length
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        embeds = jax.ShapeDtypeStruct(((2 if do_cfg else 1) * self._padded_batch(batch), seq, tc.text_embed_dim),
                                      self.dtype, sharding=self._batch_sharding(3, do_cfg))
        sched = jax.tree.map(jnp.asarray, schedulers.make_schedule(self.scheduler_config, num_inference_steps))
        guidance = jnp.asarray(schedulers.guidance_scales(sched, guidance_scale, False))
        _, tstate = nnx.split(self.transformer)
        # PipeFusion: the patched step (the warm-up step is the same program with one patch)
        kv = self._kv_cache(shape, embeds.shape[0], seq, abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, latents, jnp.int32(0), kv, embeds, sched, guidance, jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None, max_sequence_length: int = 226,

                 num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> CogVideoXPipelineOutput:
        dv = self.default_video()
        height, width, num_frames = height or dv["height"], width or dv["width"], num_frames or dv["num_frames"]
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
            prompt_embeds = jnp.asarray(prompt_embeds, self.dtype)
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                max_sequence_length)
                negative_prompt_embeds = jnp.asarray(negative_prompt_embeds, self.dtype)
                if negative_prompt_embeds.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {negative_prompt_embeds.shape} and prompt_embeds "
                                     f"{prompt_embeds.shape} must have the same shape.")
                embeds = jnp.concatenate([negative_prompt_embeds, prompt_embeds])
            else:
                embeds = prompt_embeds
            embeds = self._put_batch(embeds, do_cfg, per)
            jax.block_until_ready(embeds)

        # 2. latents (diffusers layout: B, F, C, h, w); 1.5 pads latent frames to patch_size_t
        shape, additional = self.latent_shape(batch * per, height, width, num_frames)
        sched = schedulers.make_schedule(self.scheduler_config, num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, jax.random.fold_in(rng, 1 << 20), sched.init_noise_sigma,
                                        "batch, latent frames, channels, height/8, width/8")

        # 3. denoise: one jitted step per iteration
        guidance = jnp.asarray(schedulers.guidance_scales(sched, guidance_scale, use_dynamic_cfg))
        kv = self._kv_cache(shape, embeds.shape[0], embeds.shape[1])
        with timer.stage("denoising"):
            state = jax.jit(schedulers.init_state, out_shardings=latents.sharding)(latents)
            args = (embeds, jax.tree.map(jnp.asarray, sched), guidance, rng)
            latents = self._denoise(do_cfg, latents, state, kv, args, num_inference_steps, progress)

        if output_type == "latent":
            return CogVideoXPipelineOutput(frames=as_numpy(latents), timings=timer.times,
                                           peak_memory_bytes=peak_memory_bytes())
        # 4. decode
        with timer.stage("decoding"):
            frames = as_numpy(jax.block_until_ready(self._decode_fn()(latents[:, additional:])))
        return CogVideoXPipelineOutput(frames=frames, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
