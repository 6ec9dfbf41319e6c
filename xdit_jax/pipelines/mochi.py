"""Mochi 1 text-to-video, diffusers' ``MochiPipeline`` on a JAX mesh.

    pipe = MochiPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A small dog running on a beach.", num_frames=19, height=480, width=848, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

T5 (256 tokens, with its mask; ``force_zeros_for_empty_prompt`` as diffusers), the asymmetric
transformer's video tokens sharded over (ring, ulysses) by
:func:`xdit_jax.parallel.sequence.run_blocks`, the caption stream too, in slices of its own
(:mod:`xdit_jax.models.mochi`), CFG and the flow-matching Euler step over Mochi's linear-quadratic
sigmas inside the one jitted step, and the causal 3D VAE decode split over the mesh.

Differences from diffusers, by design: the latents stay float32 between steps also in bf16
(diffusers rounds them to the model dtype after each update), and so does the timestep the
transformer sees (diffusers rounds it to bf16: 883.4 becomes 884). PipeFusion (``pipefusion`` mesh axis, or
``pipefusion_patches``) splits the 47 stacked blocks into stages and the video into patches, each
patch carrying a slice of the caption stream (its K/V buffered as the video's); the last block runs on the
last stage. A caption mask
whose kept tokens are not a prefix (T5's never are; a hand-made ``prompt_attention_mask`` can be)
is attention over the kept tokens here, while diffusers also moves their outputs to the front:
a warning says so.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.conversion import read_json
from xdit_jax.models import mochi, vae_mochi
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    masked_text_for_cfg,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

MochiPipelineOutput = CogVideoXPipelineOutput
THRESHOLD_NOISE = 0.025  # diffusers' (and Genmo's) linear-quadratic schedule


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, mochi.MochiConfig, vae_mochi.MochiVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 480 x 848, 19 frames; Genmo's videos play at 30 fps."""
    return {"height": 480, "width": 848, "num_frames": 19, "fps": 30}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 4.5) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    check_size_and_mesh(height, width, vc.spatial_compression_ratio * tc.patch_size, tc.num_layers - 1, batch,
                        mesh_spec, guidance_scale)  # PipeFusion's stages split the num_layers - 1 stacked blocks


class MochiPipeline(VideoPipelineBase):
    """Text-to-video with Mochi 1 — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    _vae = vae_mochi

    PIPELINE_CLASSES = ("MochiPipeline",)
    CONFIG = mochi.MochiConfig

    @staticmethod
    def stacks(tc) -> dict:
        """The blocks but the last (PipeFusion's final block: the text stream ends there)."""
        return dict(stacked=mochi.STACKED, stacked_layers=tc.num_layers - 1, final_block=True,
                    text_keys=mochi.TEXT_KEYS)

    def __init__(self, *, force_zeros_for_empty_prompt: bool = False, **parts):
        super().__init__(**parts)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """model_index.json's ``force_zeros_for_empty_prompt``."""
        index = read_json(folder / "model_index.json")
        return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", False))}

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256):
        """((B, L, d) T5 embeddings, (B, L) mask) as diffusers makes them; with
        ``force_zeros_for_empty_prompt`` a batch whose last prompt is "" gets zero ids and an empty mask
        (diffusers' rule, applied to the whole batch as there)."""
        ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        if self.force_zeros_for_empty_prompt and prompts and prompts[-1] == "":
            ids, mask = np.zeros_like(ids), np.zeros_like(mask)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        return self._text_encoder_fn()(ids, mask).astype(self.dtype), mask

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (T5 embeds, mask)."""
        return self._flow_step_fn(do_cfg, warmup, lambda x, texts, t: (x, texts[0], t, texts[1]))

    def output_frames(self, num_frames: int) -> int:
        """Frames of the video made for ``num_frames``: ``(num_frames - 1) // 6 * 6 + 1`` (diffusers takes any
        count and makes the latent frames ``(num_frames - 1) // 6 + 1``; e.g. its example's 84 gives 79)."""
        st = self.vae_config.temporal_compression_ratio
        return (num_frames - 1) // st * st + 1

    def schedule(self, num_inference_steps: int):
        """diffusers' sigmas for Mochi: Genmo's linear-quadratic schedule (threshold noise 0.025)."""
        return flow_match.make_schedule(
            self.scheduler_config, sigmas=flow_match.linear_quadratic_schedule(num_inference_steps, THRESHOLD_NOISE))

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 64, guidance_scale: float = 4.5,
                     max_sequence_length: int = 256):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, self.transformer_config.text_embed_dim), self.dtype),
                 sd((n, max_sequence_length), jnp.int32))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True,  # PipeFusion: the patched step
                                      text_len=max_sequence_length)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    def _video_tokens(self, latent_shape) -> int:
        """The transformer's video tokens for latents of ``latent_shape`` (B, C, F, h, w)."""
        p = self.transformer_config.patch_size
        return latent_shape[2] * (latent_shape[3] // p) * (latent_shape[4] // p)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 64, guidance_scale: float = 4.5, prompt_embeds=None,
                 prompt_attention_mask=None, negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                 latents=None, max_sequence_length: int = 256,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> MochiPipelineOutput:
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with prompt_attention_mask)")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("prompt_embeds need prompt_attention_mask (Mochi attends only to the caption's tokens).")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds need negative_prompt_attention_mask.")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        made = self.output_frames(num_frames)
        if made != num_frames:
            log.warning("num_frames=%d: the VAE makes %dk+1 frames; this video has %d (as diffusers').", num_frames,
                        self.vae_config.temporal_compression_ratio, made)
        sched = self.schedule(num_inference_steps)  # refuses a step count the schedule cannot take, first
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        tc = self.transformer_config

        # 1. text: T5 with its mask; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            emb, mask = masked_text_for_cfg(self, prompts, batch, tc.text_embed_dim, do_cfg, max_sequence_length,
                                            prompt_embeds, prompt_attention_mask, negative_prompt,
                                            negative_prompt_embeds, negative_prompt_attention_mask)
            m = np.asarray(mask) != 0
            if (m[:, 1:] & ~m[:, :-1]).any():
                log.warning("A caption mask keeps tokens after a masked one: attention is over the kept tokens "
                            "here, while diffusers' Mochi also moves their outputs to the front (it does so only "
                            "for such hand-made masks; T5's masks are prefixes).")
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, F, h, w)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, channels, latent frames, height/8, width/8")

        # 3. denoise: one jitted step per iteration
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, guidance, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(),
                                       kv=self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape),
                                                                   text_len=texts[0].shape[1]))
        return MochiPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
