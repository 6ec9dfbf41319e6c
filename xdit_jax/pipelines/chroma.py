"""Chroma text-to-image (lodestones/Chroma1-HD), diffusers' ``ChromaPipeline`` on a JAX mesh.

    pipe = ChromaPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", negative_prompt="low quality", seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

FLUX.1's pipeline (:class:`xdit_jax.pipelines.flux.FluxPipeline`: packed 2 x 2 latents, the flow-matching Euler
schedule with ``mu`` from the packed sequence length, FLUX's VAE with its shift and scale, the decode split over
the mesh) with Chroma's text and guidance: T5 alone encodes the prompt, reading the tokenizer's mask; the
transformer's mask keeps the prompt's tokens and one padding token (:func:`xdit_jax.models.chroma.text_mask`) as
a real key mask (the reference implementation's rule; diffusers adds its float mask to the logits instead,
huggingface/diffusers#12116: :mod:`xdit_jax.models.chroma`); real classifier-free guidance with
``guidance_scale`` (default 5.0) and a negative prompt (default ""), both halves in one batch, each with its own
mask, split over ``cfg=2``. The transformer's image tokens are the sharded sequence over (ring, ulysses), the
text sharded with them and joining each attention as the context (``run_blocks(..., text=chroma.TEXT_KEYS)``).

Known differences: the text mask on padded prompts (a real key mask where diffusers 0.42.1 adds a float mask to the
logits: above; the same where the prompts fill ``max_sequence_length``); t x 1000 enters its sinusoid in float32 also
in bf16 (diffusers rounds it to bf16 first); with ``prompt_embeds`` of fewer than ``max_sequence_length`` tokens and
CFG, the negative prompt is encoded at the prompt's length (both halves run in one batch; diffusers encodes it at
``max_sequence_length`` separately; under the key mask that changes nothing unless the negative prompt is cut);
custom ``sigmas``, IP-Adapter images and callbacks are not taken.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import chroma, flux
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.flux import FluxPipeline, default_size, pack_latents  # noqa: F401  (this family's API too)
from xdit_jax.pipelines.image import ImagePipelineOutput, VaeEncoding, forward_call, vae_scale_factor
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

ChromaPipelineOutput = ImagePipelineOutput
DEFAULT_STEPS = 35  # diffusers' ChromaPipeline defaults
DEFAULT_GUIDANCE = 5.0


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, chroma.ChromaConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = DEFAULT_GUIDANCE) -> None:
    """Refuse what the model cannot take, before any heavy work (``cfg=2`` needs ``guidance_scale > 1``)."""
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), chroma.pipefusion_stacks(tc)["stacked_layers"],
                        batch, mesh_spec, guidance_scale)


class ChromaPipeline(FluxPipeline):
    """Text-to-image with Chroma — see the module docstring."""

    PIPELINE_CLASSES = ("ChromaPipeline",)
    CONFIG = chroma.ChromaConfig
    MORE_TEXT_ENCODERS = ()  # T5 only (no CLIP)
    stacks = staticmethod(chroma.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512):
        """((B, L, d) T5 states, (B, L) float32 mask) as diffusers' ``_get_t5_prompt_embeds``: T5 reads the
        tokenizer's mask; the returned mask keeps the prompt's tokens and one padding token."""
        ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        states = self._text_encoder_fn()(self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                         self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return states.astype(self.dtype), chroma.text_mask(mask)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng) ->
        (latents, sched_state, i + 1, kv)``; ``texts``: (T5 states, their float mask[, inpainting's
        :class:`~xdit_jax.schedulers.flow_match.KeptRegion`]); ``scale``: the CFG scale;
        ``rope``: the image and text RoPE tables; ``kv``: PipeFusion's K/V buffers (``warmup``: an exact step
        that fills them) or None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence / pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng):
            texts, kept = flow_match.split_kept(texts)  # (inpainting's kept region)
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (x.shape[0],))
            model = nnx.merge(graphdef, tstate)
            h, tokens, cond = model.embed(x.astype(dtype), texts[0], t, attention_mask=texts[1], rope=rope)
            h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(h, cond).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:  # [negative; positive]
                neg, pos = jnp.split(pred, 2)
                pred = neg + scale * (pos - neg)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state, noise)
            if kept is not None:  # inpainting: outside the mask, the image at the next sigma
                latents = kept.apply(sched, i, latents)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _text(self, embeds, mask, what: str):
        tc = self.transformer_config
        embeds, mask = jnp.asarray(embeds, self.dtype), jnp.asarray(mask, jnp.float32)
        if embeds.ndim != 3 or embeds.shape[2] != tc.joint_attention_dim or mask.shape != embeds.shape[:2]:
            raise ValueError(f"{what} {tuple(embeds.shape)} with mask {tuple(mask.shape)}: this model takes "
                             f"(batch, tokens, {tc.joint_attention_dim}) T5 states and a (batch, tokens) mask.")
        return embeds, mask

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_attention_mask=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True, _init=None) -> ChromaPipelineOutput:
        """diffusers' ChromaPipeline call (``prompt_attention_mask``: the mask ``encode_prompt`` returns, 1 for
        the prompt's tokens and one padding token); ``_init(sched, latents, batch, per, rng, timer) -> (schedule,
        packed initial latents[, inpainting's kept region])``: image-to-image's start (:class:`ChromaImg2ImgPipeline`,
        :class:`ChromaInpaintPipeline`)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with prompt_attention_mask)")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("prompt_embeds need prompt_attention_mask (Chroma masks the T5 padding).")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds need negative_prompt_attention_mask.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length cannot be greater than 512, got {max_sequence_length}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        do_cfg = guidance_scale > 1
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        timer = StageTimer()
        tc = self.transformer_config

        # 1. text: T5 states + mask; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts, max_sequence_length)
            emb, mask = self._text(prompt_embeds, prompt_attention_mask, "prompt_embeds")
            if do_cfg:  # one batch: the negative prompt's states take the prompt's length
                if negative_prompt_embeds is None:
                    negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                        negative_prompts(negative_prompt, batch), emb.shape[1])
                nemb, nmask = self._text(negative_prompt_embeds, negative_prompt_attention_mask,
                                         "negative_prompt_embeds")
                if nemb.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {nemb.shape} must have the shape of prompt_embeds "
                                     f"{emb.shape} (both halves run in one batch).")
                emb, mask = jnp.concatenate([nemb, emb]), jnp.concatenate([nmask, mask])
            elif negative_prompt is not None or negative_prompt_embeds is not None:
                log.warning("The negative prompt is not used: guidance needs guidance_scale > 1 (as in diffusers).")
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (packed, diffusers' layout), RoPE tables, schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(num_inference_steps, shape[1])
        rng = jax.random.key(seed)
        if _init is not None:  # (inpainting returns its kept region too, a step input)
            sched, latents, *kept = _init(sched, latents, batch, per, rng, timer)
            texts = texts + tuple(kept)
        if latents is None:
            latents = pack_latents(jax.random.normal(rng, (batch * per, tc.in_channels // 4, h, w), jnp.float32))
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, (height/16) x (width/16) tokens, channels x 4")
        rope = (flux.rope_tables(flux.image_ids(h // 2, w // 2), tc.axes_dims_rope),
                flux.rope_tables(np.zeros((emb.shape[1], 3), np.float32), tc.axes_dims_rope))
        rope = jax.tree.map(self._put_replicated, rope)

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(guidance_scale))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rope, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn((h, w)),
                                       kv=self._pipefusion_buffers(len(texts[0]), shape[1], text_len=emb.shape[1]))
        return ChromaPipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class ChromaImg2ImgPipeline(VaeEncoding, ChromaPipeline):
    """Image-to-image with Chroma (diffusers' ``ChromaImg2ImgPipeline``; SDEdit) on a Chroma text-to-image folder: the
    image, resized to the output size and VAE-encoded (FLUX's VAE; a sample of the posterior, as diffusers), is
    noised to the sigma where the last ``strength`` of the ``num_inference_steps`` schedule starts
    (:func:`xdit_jax.schedulers.flow_match.strength_start`, diffusers' ``get_timesteps``), and only those steps run;
    the rest is :class:`ChromaPipeline`'s (its jitted step, real CFG, the key mask, meshes, PipeFusion).

    Known differences: :class:`ChromaPipeline`'s; the noise and the posterior's sample are JAX draws from ``seed``
    (diffusers': torch's ``generator``); an array image is taken as (H, W, 3) at the output size; with several
    images, one per prompt, each prompt's samples take its own image (diffusers tiles the images over the samples).
    diffusers 0.42.1's image-to-image turns the text mask into floats that it adds to the logits (no key masked,
    even where its text-to-image masks): ours keeps the text-to-image pipeline's real key mask, the same where the
    prompts fill ``max_sequence_length``."""

    PIPELINE_CLASSES = ("ChromaImg2ImgPipeline", "ChromaPipeline")

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 strength: float = 0.9, num_images_per_prompt: int = 1, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, prompt_attention_mask=None, negative_prompt_attention_mask=None,
                 max_sequence_length: int = 512, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> ChromaPipelineOutput:
        """diffusers' ChromaImg2ImgPipeline call and defaults (35 steps, guidance 5, strength 0.9; ``generator`` ->
        ``seed``). ``image``: a PIL image or an (H, W, 3) array (uint8, or floats in [0, 1]), or a list of them, one
        per prompt; ``latents``: packed initial latents used as given (no image encoded, as diffusers)."""
        height, width, init = self.img2img_init(image, height, width, num_inference_steps, strength, pack_latents)

        return forward_call(ChromaPipeline.__call__, self, locals(), _init=init)


class ChromaInpaintPipeline(VaeEncoding, ChromaPipeline):
    """Inpainting with Chroma (diffusers' ``ChromaInpaintPipeline``) on a Chroma text-to-image folder: image-to-image's
    start (:class:`ChromaImg2ImgPipeline`: the image encoded and noised to where the last ``strength`` of the schedule
    starts) and, inside the jitted step after each update, the region outside ``mask_image`` (white: repaint, black:
    keep; resized and binarized as diffusers' mask processor, sampled onto the latent grid: torch's nearest) set to
    the image's latents noised to the next sigma (:class:`~xdit_jax.schedulers.flow_match.KeptRegion`), so only the
    masked region is generated. The rest is :class:`ChromaPipeline`'s (its jitted step, real CFG with
    ``guidance_scale``, the key mask, meshes, PipeFusion).

    Known differences: :class:`ChromaImg2ImgPipeline`'s (JAX draws from ``seed``; the text mask: diffusers 0.42.1's
    inpainting, as its image-to-image, adds a float mask to the logits, ours is the text-to-image pipeline's real key
    mask, the same where the prompts fill ``max_sequence_length``; several images pair with their own prompt's samples);
    ``true_cfg_scale`` is taken and ignored, as diffusers does (its CFG is ``guidance_scale > 1``);
    ``masked_image_latents`` (which Chroma's inpainting step does not use) and custom ``sigmas`` are refused, IP-Adapter
    images not taken (``padding_mask_crop``: as diffusers, a PIL image and mask); given ``latents`` serve, as
    diffusers', as both the initial latents and the kept region's noise (no noise drawn), (B, C, h, w) as diffusers'
    inpainting takes them, or packed (B, tokens, 4C). diffusers 0.42.1's pipeline reads
    ``transformer.config.guidance_embeds``, which a Chroma transformer's config has not (an AttributeError on every
    call; its tests set it False): nothing it computes from it reaches the transformer, so ours has no such input."""

    PIPELINE_CLASSES = ("ChromaInpaintPipeline", "ChromaPipeline")

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 true_cfg_scale: float = 1.0, image=None, mask_image=None, masked_image_latents=None,
                 height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 7.0,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 prompt_attention_mask=None, negative_prompt_attention_mask=None, max_sequence_length: int = 256,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> ChromaPipelineOutput:
        """diffusers' ChromaInpaintPipeline call and defaults (28 steps, guidance 7, strength 0.6, 256 tokens;
        ``generator`` -> ``seed``). ``image``: as :class:`ChromaImg2ImgPipeline`'s; ``mask_image``: a PIL image, or an
        (H, W) array at the output size (uint8, or floats in [0, 1]), one for every prompt's image."""
        if masked_image_latents is not None or sigmas is not None:
            raise NotImplementedError("masked_image_latents and custom sigmas are not supported here: give the image "
                                      "and its mask.")
        if true_cfg_scale != 1.0:
            log.warning("true_cfg_scale=%s is ignored: Chroma's CFG is guidance_scale > 1 (as in diffusers).",
                        true_cfg_scale)
        height, width, init, finish = self.inpaint_init(
            image, mask_image, height, width, num_inference_steps, strength, vae_scale_factor(self.vae_config),
            pack_latents, padding_mask_crop=padding_mask_crop)

        return finish(forward_call(ChromaPipeline.__call__, self, locals(), _init=init), output_type)
