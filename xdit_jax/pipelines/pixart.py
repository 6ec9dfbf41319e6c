"""PixArt-alpha and PixArt-Sigma text-to-image, diffusers' ``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline`` on a JAX mesh.

    pipe = PixArtPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A small cactus with a happy face in the Sahara desert.", height=1024, width=1024, seed=42)
    out.images   # (batch, height, width, 3) float in [0, 1]

The same parts as CogVideoX: T5 text encoder (with its attention mask, which PixArt's cross
attention also uses), the transformer's image tokens sharded over (ring, ulysses) by
:func:`xdit_jax.parallel.sequence.run_blocks` or pipelined by PipeFusion, the DPM-Solver++ step in
the jitted step, and the SD/SDXL VAE decode split over the mesh.

``use_resolution_binning`` (default on, as in diffusers): the image is generated at the size of
PixArt's aspect-ratio bin closest to the requested one, then resized (bilinear) and center-cropped
back to the requested size. Where diffusers has no bin table for a checkpoint's sample size it
raises; here such a model (e.g. the tiny test models) runs at the requested size.

Difference from diffusers, on purpose: ``clean_caption`` is not implemented (diffusers itself skips
it when ``beautifulsoup4``/``ftfy`` are missing).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.models import pixart
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    as_numpy,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    tokenize,
)
from xdit_jax.pipelines.image import (  # noqa: F401  (this family's API too)
    ImagePipelineBase,
    ImagePipelineOutput,
    default_size,
    resize_and_crop,
    vae_scale_factor,
)
from xdit_jax.schedulers import dpmsolver

# diffusers' defaults per pipeline class: prompt tokens
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
SCHEDULERS = ("DPMSolverMultistepScheduler",)

# PixArt's aspect-ratio bins (diffusers' ASPECT_RATIO_{256,512,1024,2048}_BIN) as (height, width) in
# units of 64 px of the 1024 px table, ordered by aspect ratio; the 256 and 512 px tables are it scaled
# down; the 2048 px table is it doubled plus the entries of _EXTRA_2048 (units of 64 px at 2048 px).
_BINS_1024 = [(8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22), (11, 21),
              (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16), (16, 15),
              (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11), (24, 10),
              (25, 10), (27, 9), (32, 8)]
_EXTRA_2048 = [(16, 62), (16, 60), (52, 18), (56, 18), (58, 16), (60, 16), (62, 16)]


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]] | None:
    """{"h/w rounded to 2 decimals": (height, width)} for a transformer sample size (32, 64, 128, 256
    latent pixels = 256 ... 2048 px images), ordered by ratio; None for other sizes."""
    scale = {32: 16, 64: 32, 128: 64, 256: 128}.get(sample_size)
    if scale is None:
        return None
    pairs = [(h * scale, w * scale) for h, w in _BINS_1024]
    if sample_size == 256:
        pairs += [(h * 64, w * 64) for h, w in _EXTRA_2048]
    pairs.sort(key=lambda hw: hw[0] / hw[1])
    return {str(round(h / w, 2)): (h, w) for h, w in pairs}


def binned_size(height: int, width: int, sample_size: int) -> tuple[int, int]:
    """diffusers' ``classify_height_width_bin``: the bin whose ratio is closest to height / width
    (the first of equals); the size itself where the sample size has no bins."""
    bins = aspect_ratio_bins(sample_size)
    if bins is None:
        return height, width
    ar = height / width
    return bins[min(bins, key=lambda k: abs(float(k) - ar))]


PixArtPipelineOutput = ImagePipelineOutput


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, pixart.PixArtConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 4.5) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    check_size_and_mesh(height, width, vae_scale_factor(vc) * tc.patch_size, tc.num_layers, batch, mesh_spec,
                        guidance_scale)


class PixArtPipeline(ImagePipelineBase):
    """Text-to-image with PixArt-alpha / PixArt-Sigma — see the module docstring."""

    PIPELINE_CLASSES = tuple(MAX_SEQUENCE_LENGTH)
    CONFIG = pixart.PixArtConfig
    SCHEDULERS = SCHEDULERS
    STACKED = pixart.STACKED

    def __init__(self, *, max_sequence_length: int = 300, **parts):
        super().__init__(**parts)
        self.max_sequence_length = int(max_sequence_length)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The text length of the folder's PixArt (alpha 120, Sigma 300 tokens)."""
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH[kind]}

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> tuple[jax.Array, jax.Array]:
        """((B, L, d_model) T5 embeddings, (B, L) attention mask), as diffusers: the text lower-cased and
        stripped (its ``clean_caption=False`` preprocessing); T5 reads the mask, and the transformer's
        cross attention uses it too."""
        ids, mask = tokenize(self.tokenizer, [p.lower().strip() for p in prompts], max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        return self._text_encoder_fn()(ids, mask).astype(self.dtype), mask

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, embeds, mask, sched, guidance, added) ->
        (latents, sched_state, i + 1, kv)``; ``kv``: PipeFusion's K/V buffers (None without it)."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        learned_sigma = self.transformer_config.learned_sigma

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, embeds, mask, sched, guidance, added):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg)
            b = x.shape[0]
            cond_extra = None if added is None else jax.tree.map(
                lambda a: jnp.broadcast_to(a, (b,) + a.shape[1:]), added)
            tokens_x, tokens, cond = model.embed(x.astype(dtype), embeds, jnp.broadcast_to(t, (b,)), cond_extra,
                                                 mask)
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(tokens_x, cond, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + guidance * (text - uncond)
            if learned_sigma:  # the variance channels are not used by the sampler
                pred = pred[:, : latents.shape[1]]
            latents, sched_state = dpmsolver.step(sched, i, pred, latents, sched_state)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _added_cond(self, batch: int, height: int, width: int):
        """PixArt-alpha's micro-conditions (resolution, aspect ratio) where the transformer takes them."""
        if not self.transformer_config.additional_conditions:
            return None
        res = jnp.asarray([[height, width]], jnp.float32)
        ar = jnp.asarray([[height / width]], jnp.float32)
        return {"resolution": self._put_replicated(res), "aspect_ratio": self._put_replicated(ar)}

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 4.5, prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_embeds=None, negative_prompt_attention_mask=None, latents=None,
                 max_sequence_length: int | None = None, use_resolution_binning: bool = True,
                 num_images_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> PixArtPipelineOutput:
        requested, (height, width), prompts, batch, per = self._binned_text_request(
            prompt, prompt_embeds, prompt_attention_mask, height, width, use_resolution_binning,
            num_images_per_prompt, guidance_scale, output_type, binned_size, check_request, "PixArt")
        msl = max_sequence_length or self.max_sequence_length
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, msl)
            embeds, mask = self._masked_text_batch(
                prompt_embeds, prompt_attention_mask, do_cfg, per, negative_prompt_embeds,
                negative_prompt_attention_mask,
                lambda length: self.encode_prompt(negative_prompts(negative_prompt, batch), length), "T5")

        # 2. latents (diffusers layout: B, C, h, w)
        shape = self.latent_shape(batch * per, height, width)
        sched = dpmsolver.make_schedule(self.scheduler_config, num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, dpmsolver.INIT_NOISE_SIGMA,
                                        "batch, channels, height/8, width/8")

        # 3. denoise: one jitted step per iteration
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        added = self._added_cond(batch, height, width)
        kv = self._pipefusion_buffers(embeds.shape[0], self._image_tokens(height, width))
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        with timer.stage("denoising"):
            state = jax.device_put(dpmsolver.init_state(shape, jnp.float32, self.scheduler_config.solver_order),
                                   latents.sharding)
            # diffusers' schedule may have fewer steps than asked (trailing spacing with lambda_min_clipped)
            latents = self._denoise(do_cfg, latents, state, kv, (embeds, mask, sched_arrays, guidance, added),
                                    len(sched.timesteps), progress)

        if output_type == "latent":
            return PixArtPipelineOutput(images=as_numpy(latents), timings=timer.times,
                                        peak_memory_bytes=peak_memory_bytes())
        # 4. decode
        with timer.stage("decoding"):
            resize = requested if requested != (height, width) else None
            images = as_numpy(jax.block_until_ready(self._decode_fn(resize)(latents)))
        return PixArtPipelineOutput(images=images, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
