"""HunyuanDiT text-to-image, diffusers' ``HunyuanDiTPipeline`` on a JAX mesh.

    pipe = HunyuanDiTPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("An astronaut riding a horse", height=1024, width=1024, seed=42)
    out.images   # (batch, height, width, 3) float in [0, 1]

Two text encoders (a BERT, 77 tokens, and an mT5, 256 tokens, both with their masks), the
transformer's image tokens sharded over (ring, ulysses) by
:func:`xdit_jax.parallel.sequence.run_blocks` (its cross attention to the text is local), the
scheduler step (DDPM as shipped, or DPM-Solver multistep) and CFG with ``guidance_rescale`` inside
the jitted step, and the VAE decode split over the mesh.

PipeFusion (``pipefusion`` mesh axis, or ``pipefusion_patches``) splits each of the three block stacks
(down, mid, skip) over the stages, a patch going round the stages once per stack with its long skips
riding in its carry (:meth:`xdit_jax.models.hunyuandit.HunyuanDiT2DModel.pipefusion_blocks`).
``use_resolution_binning`` (default on, as in diffusers): a size that is not one of
HunyuanDiT's trained shapes is replaced by the closest one (diffusers warns and returns that size).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import hunyuandit
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    as_numpy,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.image import (  # noqa: F401  (this family's API too)
    ImagePipelineBase,
    ImagePipelineOutput,
    default_size,
    resize_and_crop,
    vae_scale_factor,
)
from xdit_jax.schedulers import ddpm, dpmsolver, module_of

log = logging.getLogger("xdit_jax")

# scheduler class in scheduler_config.json -> (module, config class); both have the same API
SCHEDULERS = {"DDPMScheduler": (ddpm, "DDPMConfig"), "DPMSolverMultistepScheduler": (dpmsolver, "DPMSolverConfig")}

# HunyuanDiT's trained shapes (width, height) per aspect ratio (diffusers' STANDARD_RATIO / _SHAPE)
_STANDARD = [(1.0, [(1024, 1024), (1280, 1280)]),
             (4 / 3, [(1024, 768), (1152, 864), (1280, 960)]),
             (3 / 4, [(768, 1024), (864, 1152), (960, 1280)]),
             (16 / 9, [(1280, 768)]),
             (9 / 16, [(768, 1280)])]


HunyuanDiTPipelineOutput = ImagePipelineOutput


def binned_size(height: int, width: int) -> tuple[int, int]:
    """diffusers' HunyuanDiT binning: sizes floored to multiples of 16; one that is not a trained shape
    becomes the trained shape of the closest aspect ratio and, among those, the closest area."""
    height, width = int(height // 16 * 16), int(width // 16 * 16)
    if any((width, height) in shapes for _, shapes in _STANDARD):
        return height, width
    ratios = np.array([r for r, _ in _STANDARD])
    shapes = _STANDARD[int(np.argmin(np.abs(ratios - width / height)))][1]
    w, h = shapes[int(np.argmin(np.abs(np.array([a * b for a, b in shapes]) - width * height)))]
    return h, w


def rescale_guidance(pred, pred_text, guidance_rescale: float):
    """diffusers' ``rescale_noise_cfg``: the guided prediction's per-sample std brought towards the text
    prediction's (unbiased std over all but the batch axis, as torch's ``std``)."""
    axes = tuple(range(1, pred.ndim))
    std_text = jnp.std(pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(pred, axis=axes, keepdims=True, ddof=1)
    return guidance_rescale * (pred * (std_text / std_cfg)) + (1 - guidance_rescale) * pred


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, hunyuandit.HunyuanDiTConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 5.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    check_size_and_mesh(height, width, vae_scale_factor(vc) * tc.patch_size,
                        hunyuandit.pipefusion_stacks(tc)["stacked_layers"], batch, mesh_spec, guidance_scale)


class HunyuanDiTPipeline(ImagePipelineBase):
    """Text-to-image with HunyuanDiT (v1.0-1.2) — see the module docstring."""

    PIPELINE_CLASSES = ("HunyuanDiTPipeline",)
    CONFIG = hunyuandit.HunyuanDiTConfig
    MORE_TEXT_ENCODERS = ("_2",)  # mT5 (the first: BERT)
    SCHEDULERS = tuple(SCHEDULERS)
    stacks = staticmethod(hunyuandit.pipefusion_stacks)

    def __init__(self, **parts):
        super().__init__(**parts)
        self.scheduler = module_of(self.scheduler_config)  # ddpm or dpmsolver

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], which: int = 0, max_sequence_length: int | None = None):
        """((B, L, d) embeddings, (B, L) mask) from the BERT (``which=0``, the transformer's ``text_len``
        tokens, 77) or the mT5 (``which=1``, ``text_len_t5``, 256), as diffusers (no text preprocessing)."""
        tok = (self.tokenizer, self.tokenizer_2)[which]
        tc = self.transformer_config
        ids, mask = tokenize(tok, prompts, max_sequence_length or (tc.text_len, tc.text_len_t5)[which])
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        fn = self._text_encoder_fn(("text_encoder", "text_encoder_2")[which])
        return fn(ids, mask).astype(self.dtype), mask

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, meta, rng) ->
        (latents, sched_state, i + 1, kv)``; ``texts``: (embeds, mask, embeds_t5, mask_t5)."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, scheduler = self.dtype, self.scheduler
        learn_sigma = self.transformer_config.learn_sigma

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def staged(params, x, tokens, cond):  # PipeFusion's form: the long skips ride in the carry
            return nnx.merge(graphdef, params).pipefusion_blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, meta, rng):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg)
            b = x.shape[0]
            emb, mask, emb_t5, mask_t5 = texts
            size, style = (None, None) if meta is None else (
                jnp.broadcast_to(meta[0], (b,) + meta[0].shape[1:]), jnp.broadcast_to(meta[1], (b,)))
            tokens_x, tokens, cond = model.embed(x.astype(dtype), jnp.broadcast_to(t, (b,)).astype(jnp.float32),
                                                 emb, mask, emb_t5, mask_t5, size, style)
            tokens_x, kv = self._blocks_over_mesh(blocks if kv is None else staged, tstate, tokens_x, tokens, cond,
                                                  kv, warmup)
            pred = self._real_rows(model.head(tokens_x, cond, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if learn_sigma:  # the variance channels are not used by the sampler
                pred = pred[:, : latents.shape[1]]
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + guidance[0] * (text - uncond)
                pred = jnp.where(guidance[1] > 0, rescale_guidance(pred, text, guidance[1]), pred)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = scheduler.step(sched, i, pred, latents, sched_state, noise)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, prompt_embeds=None,
                 prompt_attention_mask=None, prompt_embeds_2=None, prompt_attention_mask_2=None,
                 negative_prompt_embeds=None, negative_prompt_attention_mask=None, negative_prompt_embeds_2=None,
                 negative_prompt_attention_mask_2=None, latents=None, original_size=(1024, 1024),
                 target_size=None, crops_coords_top_left=(0, 0), use_resolution_binning: bool = True,

                 num_images_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> HunyuanDiTPipelineOutput:
        ds = self.default_size()
        height, width = height or ds["height"], width or ds["width"]
        height, width = int(height // 16 * 16), int(width // 16 * 16)
        if use_resolution_binning:
            binned = binned_size(height, width)
            if binned != (height, width):
                log.warning("Reshaped to (height, width)=%s, the closest of HunyuanDiT's trained shapes.", binned)
            height, width = binned
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(+ prompt_embeds_2 and both masks)")
        if prompt_embeds is not None and any(a is None for a in (prompt_attention_mask, prompt_embeds_2,
                                                                  prompt_attention_mask_2)):
            raise ValueError("prompt_embeds need prompt_attention_mask, prompt_embeds_2 and prompt_attention_mask_2 "
                             "(HunyuanDiT reads both text encoders and their masks).")
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text: both encoders, with masks; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            given = ((prompt_embeds, prompt_attention_mask), (prompt_embeds_2, prompt_attention_mask_2))
            neg_given = ((negative_prompt_embeds, negative_prompt_attention_mask),
                         (negative_prompt_embeds_2, negative_prompt_attention_mask_2))
            texts = []
            for which in (0, 1):
                emb, mask = given[which]
                if emb is None:
                    emb, mask = self.encode_prompt(prompts, which)
                emb, mask = jnp.asarray(emb, self.dtype), jnp.asarray(mask, jnp.int32)
                tc = self.transformer_config
                want = ((tc.text_len, tc.cross_attention_dim), (tc.text_len_t5, tc.cross_attention_dim_t5))[which]
                if emb.ndim != 3 or tuple(emb.shape[1:]) != want or mask.shape != emb.shape[:2]:
                    name = ("prompt_embeds", "prompt_embeds_2")[which]
                    raise ValueError(f"{name} {tuple(emb.shape)} with mask {tuple(mask.shape)}: this model takes "
                                     f"(batch, {want[0]}, {want[1]}) and a (batch, {want[0]}) mask.")
                if do_cfg:
                    nemb, nmask = neg_given[which]
                    if nemb is None:
                        nemb, nmask = self.encode_prompt(negative_prompts(negative_prompt, batch), which, emb.shape[1])
                    elif nmask is None:
                        raise ValueError("negative prompt embeddings need their attention masks.")
                    nemb = jnp.asarray(nemb, self.dtype)
                    if nemb.shape != emb.shape:
                        raise ValueError(f"negative prompt embeddings {nemb.shape} and prompt embeddings {emb.shape} "
                                         "must have the same shape.")
                    emb = jnp.concatenate([nemb, emb])
                    mask = jnp.concatenate([jnp.asarray(nmask, jnp.int32), mask])
                texts += [self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per)]
            texts = tuple(texts)
            jax.block_until_ready(texts)

        # 2. latents (diffusers layout: B, C, h, w) and the size/style conditions
        shape = self.latent_shape(batch * per, height, width)
        sched = self.scheduler.make_schedule(self.scheduler_config, num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, self.scheduler.INIT_NOISE_SIGMA,
                                        "batch, channels, height/8, width/8")
        meta = None
        if self.transformer_config.use_style_cond_and_image_meta_size:
            size = list(original_size) + list(target_size or (height, width)) + list(crops_coords_top_left)
            meta = (self._put_replicated(jnp.asarray([size], jnp.float32)),
                    self._put_replicated(jnp.zeros((1,), jnp.int32)))

        # 3. denoise: one jitted step per iteration
        guidance = self._put_replicated(jnp.asarray([guidance_scale, guidance_rescale], jnp.float32))
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        with timer.stage("denoising"):
            state = jax.device_put(self.scheduler.init_state(shape, jnp.float32), latents.sharding)
            kv = self._pipefusion_buffers(texts[0].shape[0], self._image_tokens(height, width))
            latents = self._denoise(do_cfg, latents, state, kv, (texts, sched_arrays, guidance, meta, rng),
                                    len(sched.timesteps), progress)

        if output_type == "latent":
            return HunyuanDiTPipelineOutput(images=as_numpy(latents), timings=timer.times,
                                            peak_memory_bytes=peak_memory_bytes())
        # 4. decode
        with timer.stage("decoding"):
            images = as_numpy(jax.block_until_ready(self._decode_fn()(latents)))
        return HunyuanDiTPipelineOutput(images=images, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
