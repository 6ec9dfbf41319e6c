"""Qwen-Image text-to-image, diffusers' ``QwenImagePipeline`` on a JAX mesh.

    pipe = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A coffee shop entrance with a chalkboard sign", negative_prompt=" ", true_cfg_scale=4.0,
               height=1328, width=1328, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: the prompt inside Qwen2.5-VL's chat template (:data:`xdit_jax.models.qwen2_5_vl.PROMPT_TEMPLATE`),
``hidden_states[-1]`` of the language model, each prompt's valid tokens less the template's first 34, padded to
the longest with a mask (:func:`xdit_jax.models.qwen2_5_vl.qwen_prompt_embeds`), cut to ``max_sequence_length``
(512); the mask reaches the transformer as its text key mask. Latents (B, 16, h, w) packed in 2 x 2 patches
(B, (h/2)(w/2), 64); sigmas ``linspace(1, 1/n, n)`` with the scheduler's dynamic shift ``mu`` from the packed
length (Qwen-Image's scheduler: exponential time shift, ``shift_terminal`` 0.02); the Euler step in the jitted step.
True CFG when ``true_cfg_scale > 1`` and a negative prompt (or its embeddings) is given: the two passes one batch
``[negative; prompt]`` over the ``cfg`` axis, combined as diffusers' ``neg + s (pos - neg)`` rescaled per token to
the prompt's prediction's norm. The VAE (the Wan 2.1 decoder, one frame) decodes ``latents * std + mean``, split
over the mesh.

Over the mesh: prompts over ``data``, true CFG's halves over ``cfg``, the image tokens over ``ring`` x
``ulysses`` (the text joins each attention as the masked context, sharded with the image:
:data:`xdit_jax.models.qwenimage.TEXT_KEYS`), PipeFusion over the block stack (the text sliced with the patches).

Differences from diffusers, on purpose: height and width must be multiples of 16 (diffusers rounds others down
with a warning); a string ``negative_prompt`` serves every prompt of a batch (diffusers' would fail for several
prompts); the negative prompt's and the prompt's text are padded to one length (masked keys: the same result) to
run as one batch; the timestep stays float32 in bf16 too; the text encoder's input is right-padded to a multiple
of 32 tokens (fewer compiled shapes; the causal encoder's valid tokens do not see it); with
``num_images_per_prompt > 1`` each prompt's mask stays with its states (diffusers 0.42.1 repeats the states per
prompt but the mask per batch, pairing prompts of different lengths with each other's masks). ``guidance_embeds``
checkpoints are refused (:class:`xdit_jax.models.qwenimage.QwenImageConfig`: diffusers' transformer cannot take a
guidance), so ``guidance_scale`` is ignored with a warning, as diffusers does for Qwen-Image.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import qwen2_5_vl
from xdit_jax.models import qwenimage as qi
from xdit_jax.models import vae_qwenimage as qvae
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.flux import pack_latents, unpack_latents
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, WanVaeEncoding, forward_call
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

QwenImagePipelineOutput = ImagePipelineOutput
DEFAULT_SAMPLE_SIZE = 128  # diffusers' QwenImagePipeline.default_sample_size (x the VAE factor 8: 1024 px)
MAX_SEQUENCE_LENGTH = 1024  # diffusers' check_inputs' bound


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, qi.QwenImageConfig, qvae.QwenImageVAEConfig)


def default_size(tc=None, vc=None) -> dict:
    s = DEFAULT_SAMPLE_SIZE * (vc.spatial_compression_ratio if vc is not None else 8)
    return {"height": s, "width": s}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, true_cfg_scale: float = 1.0) -> None:
    """Refuse what the model cannot take, before any heavy work. ``true_cfg_scale``: the scale that decides whether
    the batch doubles (1.0 without a negative prompt)."""
    from xdit_jax.mesh import MeshSpec

    if MeshSpec.parse(mesh_spec).cfg == 2 and true_cfg_scale <= 1.0:
        raise ValueError("Mesh cfg=2 splits the two passes of true CFG, which Qwen-Image runs only with a negative "
                         "prompt and true_cfg_scale > 1; drop cfg=2 or give both.")
    check_size_and_mesh(height, width, 2 * vc.spatial_compression_ratio, tc.num_layers, batch, mesh_spec,
                        true_cfg_scale)


def combine_true_cfg(neg, pos, scale):
    """diffusers' QwenImagePipeline: ``comb = neg + s (pos - neg)``, rescaled per token so that its norm over the
    channels is the prompt's prediction's (``comb * |pos| / |comb|``). float32."""
    comb = neg + scale * (pos - neg)
    return comb * (jnp.linalg.norm(pos, axis=-1, keepdims=True) / jnp.linalg.norm(comb, axis=-1, keepdims=True))


def pad_text(emb, mask, length: int):
    """(B, L, D) states and (B, L) mask right-padded to ``length`` tokens (zeros, masked)."""
    pad = length - emb.shape[1]
    if pad <= 0:
        return emb, mask
    return (jnp.concatenate([emb, jnp.zeros((emb.shape[0], pad, emb.shape[2]), emb.dtype)], axis=1),
            jnp.concatenate([mask, jnp.zeros((mask.shape[0], pad), mask.dtype)], axis=1))


class QwenImagePipeline(ImagePipelineBase):
    """Text-to-image with Qwen-Image — see the module docstring."""

    PIPELINE_CLASSES = ("QwenImagePipeline",)
    CONFIG = qi.QwenImageConfig
    stacks = staticmethod(qi.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The VAE latent's (h, w) for an image size (multiples of 2: the packing's patches)."""
        s = self.vae_config.spatial_compression_ratio
        return 2 * (height // (2 * s)), 2 * (width // (2 * s))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The packed latents (B, (h/2)(w/2), in_channels), diffusers' ``latents`` argument."""
        h, w = self.latent_grid(height, width)
        return (batch, (h // 2) * (w // 2), self.transformer_config.in_channels)

    def _image_tokens(self, height: int, width: int) -> int:
        return self.latent_shape(1, height, width)[1]

    def _qwen_fn(self):
        """``fn(ids, mask) -> hidden_states[-1]`` of the Qwen2.5-VL language model, jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "qwen" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).last_hidden_state)
            fns["qwen"] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                                self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns["qwen"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512):
        """((B, L, d) states in the compute dtype, (B, L) int32 mask) as diffusers' ``encode_prompt``
        (``num_images_per_prompt=1``), cut to ``max_sequence_length`` tokens."""
        emb, mask = qwen2_5_vl.qwen_prompt_embeds(self.tokenizer, self.text_encoder, prompts, encode=self._qwen_fn())
        return (jnp.asarray(emb[:, :max_sequence_length], self.dtype),
                jnp.asarray(mask[:, :max_sequence_length], jnp.int32))

    def _checked(self, emb, mask, what: str, max_sequence_length: int):
        tc = self.transformer_config
        emb = jnp.asarray(emb, self.dtype)
        if emb.ndim != 3 or emb.shape[2] != tc.joint_attention_dim:
            raise ValueError(f"{what} embeddings {tuple(emb.shape)}: this model takes (batch, tokens, "
                             f"{tc.joint_attention_dim}).")
        mask = jnp.ones(emb.shape[:2], jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        if mask.shape != emb.shape[:2]:
            raise ValueError(f"{what} mask {tuple(mask.shape)} must be (batch, tokens) = {tuple(emb.shape[:2])}.")
        return emb[:, :max_sequence_length], mask[:, :max_sequence_length]

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng) -> (latents,
        sched_state, i + 1, kv)``; ``texts``: (states, mask), a row each[, the edit pipelines' condition latents
        (packed, a row each)[, ``zero_cond_t``'s per-token flags]][, inpainting's
        :class:`~xdit_jax.schedulers.flow_match.KeptRegion`]; ``scale``: the true CFG scale; ``rope``:
        the image and text RoPE tables; ``kv``: PipeFusion's K/V buffers (``warmup``: an exact step) or None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence / pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng):
            texts, kept = flow_match.split_kept(texts)  # (inpainting's kept region)
            model = nnx.merge(graphdef, tstate)
            x = self._model_batch(latents, do_cfg)
            if len(texts) > 2:  # the edit pipelines: the condition images' packed latents after the noisy ones
                x = jnp.concatenate([x, texts[2].astype(x.dtype)], axis=1)
            flags = texts[3] if len(texts) > 3 else None  # zero_cond_t: 1 on the condition tokens
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (x.shape[0],))
            tokens_x, tokens, cond = model.embed(x.astype(dtype), texts[0], texts[1], t, rope=rope, cond_flags=flags)
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            pred = model.head(tokens_x, cond).astype(jnp.float32)[:, :latents.shape[1]]
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:  # [negative; prompt]
                neg, pos = jnp.split(pred, 2)
                pred = combine_true_cfg(neg, pos, scale)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state, noise)
            if kept is not None:  # inpainting: outside the mask, the image at the next sigma
                latents = kept.apply(sched, i, latents)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_fn(self, size=None):
        """Jitted VAE decode over the whole mesh of the packed latents -> (B, H, W, 3) in [0, 1]; ``size``: the
        latent grid (h, w)."""
        vc, dtype = self.vae_config, self.dtype
        h, w = size

        def decode(vae, latents, **kw):
            z = unpack_latents(latents.astype(jnp.float32), h, w)[:, :, None]  # (B, C, 1, h, w)
            return qvae.decode(vae, qvae.unscale_latents(vc, z).astype(dtype), **kw)[:, :, 0]

        return self._jit_decode(("fn", size), decode)

    def schedule(self, num_inference_steps: int, image_seq_len: int, sigmas=None):
        """diffusers' QwenImagePipeline schedule: sigmas ``linspace(1, 1/n, n)`` (or the caller's), ``mu`` from the
        packed sequence length (used where the scheduler shifts dynamically)."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = self.scheduler_config.mu(image_seq_len) if self.scheduler_config.use_dynamic_shifting else None
        return flow_match.make_schedule(self.scheduler_config, sigmas=sigmas, mu=mu)

    def rope(self, height: int, width: int, text_len: int):
        """The RoPE tables (image, text) for an image size and a text length, replicated on the mesh."""
        h, w = self.latent_grid(height, width)
        tables = qi.rope_tables(h // 2, w // 2, text_len, self.transformer_config.axes_dims_rope)
        return jax.tree.map(self._put_replicated, tables)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, true_cfg_scale: float = 4.0, text_len: int = 64,
                     condition_shapes=()):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it
        (``true_cfg_scale > 1``: the true CFG step, as with a negative prompt; ``text_len``: text tokens;
        ``condition_shapes``: the edit pipelines' condition images' packed (1, h, w), their tokens appended)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        do_cfg = true_cfg_scale > 1.0
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec,
                      true_cfg_scale)
        tc = self.transformer_config
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, text_len, tc.joint_attention_dim), self.dtype), sd((n, text_len), jnp.int32))
        h, w = self.latent_grid(height, width)
        shapes = [(1, h // 2, w // 2)] + [tuple(int(v) for v in c) for c in condition_shapes]
        seq = sum(f * a * b for f, a, b in shapes)
        if condition_shapes:
            texts = texts + (sd((n, seq - shape[1], tc.in_channels), self.dtype),)
            if tc.zero_cond_t:
                texts = texts + (jnp.asarray(qi.condition_flags(shapes)),)
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps, shape[1]))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, seq, abstract=True, text_len=text_len)
        rope = jax.tree.map(self._put_replicated, qi.rope_tables_multi(shapes, text_len, tc.axes_dims_rope))
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, jnp.float32(true_cfg_scale),
            rope, jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 true_cfg_scale: float = 4.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, sigmas=None, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, max_sequence_length: int = 512,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> QwenImagePipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent")."""
        return self._generate(prompt, negative_prompt, true_cfg_scale=true_cfg_scale, height=height, width=width,
                              num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                              num_images_per_prompt=num_images_per_prompt, latents=latents,
                              prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                              negative_prompt_embeds=negative_prompt_embeds,
                              negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                              max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                              progress=progress)

    def _generate(self, prompt, negative_prompt, *, true_cfg_scale, height, width, num_inference_steps, sigmas,
                  guidance_scale, num_images_per_prompt, latents, prompt_embeds, prompt_embeds_mask,
                  negative_prompt_embeds, negative_prompt_embeds_mask, max_sequence_length, seed, output_type,
                  progress, encode=None, condition=None, text_cut: int | None = None,
                  init=None) -> QwenImagePipelineOutput:
        """The call. The edit pipelines' hooks: ``encode(prompts) -> (states, mask)`` instead of
        :meth:`encode_prompt` (the prompt with the images); ``condition(batch, per, do_cfg, timer) -> (the
        condition images' packed latents placed as the step's batch, their img_shapes)``; ``text_cut``: the
        states' length cut (default ``max_sequence_length``; the edit pipelines do not cut); ``init(sched, latents,
        batch, per, rng, timer) -> (schedule, packed initial latents[, inpainting's kept region])``: image-to-image's
        start (:class:`QwenImageImg2ImgPipeline`, :class:`QwenImageInpaintPipeline`)."""
        encode = encode if encode is not None else (lambda p: self.encode_prompt(p, max_sequence_length))
        text_cut = max_sequence_length if text_cut is None else text_cut
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(and prompt_embeds_mask)")
        if max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH}, got "
                             f"{max_sequence_length}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        if guidance_scale is not None:
            log.warning("guidance_scale=%s is ignored: Qwen-Image is not guidance-distilled (use true_cfg_scale with "
                        "a negative prompt), as in diffusers.", guidance_scale)
        per = per_prompt(num_images_per_prompt)
        has_neg = negative_prompt is not None or negative_prompt_embeds is not None
        do_cfg = true_cfg_scale > 1 and has_neg
        if true_cfg_scale > 1 and not has_neg:
            log.warning("true_cfg_scale=%s has no effect without a negative prompt (as in diffusers).", true_cfg_scale)
        elif has_neg and true_cfg_scale <= 1:
            log.warning("The negative prompt is not used: true CFG needs true_cfg_scale > 1 (as in diffusers).")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec,
                      true_cfg_scale if do_cfg else 1.0)
        timer = StageTimer()

        # 1. text: Qwen2.5-VL states + mask; [negative; prompt] (padded to one length) for true CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_embeds_mask = encode(prompts)
            emb, mask = self._checked(prompt_embeds, prompt_embeds_mask, "prompt", text_cut)
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds, negative_prompt_embeds_mask = encode(
                        negative_prompts(negative_prompt, batch))
                nemb, nmask = self._checked(negative_prompt_embeds, negative_prompt_embeds_mask, "negative_prompt",
                                            text_cut)
                if nemb.shape[0] != emb.shape[0]:
                    raise ValueError(f"negative prompt embeddings for {nemb.shape[0]} prompts, the prompt's for "
                                     f"{emb.shape[0]}.")
                n = max(emb.shape[1], nemb.shape[1])
                (nemb, nmask), (emb, mask) = pad_text(nemb, nmask, n), pad_text(emb, mask, n)
                emb, mask = jnp.concatenate([nemb, emb]), jnp.concatenate([nmask, mask])
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (packed, diffusers' layout), RoPE tables, schedule
        tc = self.transformer_config
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(num_inference_steps, shape[1], sigmas)
        rng = jax.random.key(seed)
        if init is not None:  # (inpainting returns its kept region too, a step input: the last of the texts)
            sched, latents, *kept = init(sched, latents, batch, per, rng, timer)
        else:
            kept = []
        if latents is None:
            latents = pack_latents(jax.random.normal(rng, (batch * per, tc.in_channels // 4, h, w), jnp.float32))
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, (height/16) x (width/16) tokens, channels x 4")
        shapes = [(1, h // 2, w // 2)]
        if condition is not None:  # the edit pipelines: the condition images' tokens after the latents'
            image_tokens, image_shapes = condition(batch, per, do_cfg, timer)
            shapes += list(image_shapes)
            texts = texts + (image_tokens,)
            if tc.zero_cond_t:
                texts = texts + (self._put_replicated(jnp.asarray(qi.condition_flags(shapes))),)
        texts = texts + tuple(kept)
        seq = sum(f * a * b for f, a, b in shapes)
        rope = jax.tree.map(self._put_replicated,
                            qi.rope_tables_multi(shapes, int(emb.shape[1]), tc.axes_dims_rope))

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(true_cfg_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], seq, text_len=int(emb.shape[1]))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rope, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn((h, w)), kv=kv)
        return QwenImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class QwenImageImg2ImgPipeline(WanVaeEncoding, QwenImagePipeline):
    """Image-to-image with Qwen-Image (diffusers' ``QwenImageImg2ImgPipeline``; SDEdit) on a Qwen-Image text-to-image
    folder: the image, resized to the output size and encoded by the VAE's Wan 2.1 encoder as one frame (a sample of
    the posterior, as diffusers' ``retrieve_latents`` default; normalized by ``latents_mean`` / ``latents_std``), is
    noised to the sigma where the last ``strength`` of the schedule starts
    (:func:`xdit_jax.schedulers.flow_match.strength_start`, diffusers' ``get_timesteps``), and only those steps run;
    the rest is :class:`QwenImagePipeline`'s (its jitted step, true CFG, meshes, PipeFusion).

    Known differences: :class:`QwenImagePipeline`'s; the noise and the posterior's sample are JAX draws from ``seed``
    (diffusers': torch's ``generator``); an array image is taken as (H, W, 3) at the output size; with several
    images, one per prompt, each prompt's samples take its own image (diffusers tiles the images over the samples);
    image latents given as ``image`` are not taken."""

    PIPELINE_CLASSES = ("QwenImageImg2ImgPipeline", "QwenImagePipeline")
    VAE_ENCODER_CONFIG = qvae.QwenImageVAEConfig

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 true_cfg_scale: float = 4.0, image=None, height: int | None = None, width: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> QwenImagePipelineOutput:
        """diffusers' QwenImageImg2ImgPipeline call and defaults (50 steps, true CFG 4 with a negative prompt, strength
        0.6; ``generator`` -> ``seed``). ``image``: a PIL image or an (H, W, 3) array (uint8, or floats in [0, 1]),
        or a list of them, one per prompt; ``latents``: packed initial latents used as given (no image encoded, as
        diffusers)."""
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init = self.img2img_init(image, height, width, n, strength, pack_latents)

        return forward_call(QwenImagePipeline._generate, self, locals(), init=init)


class QwenImageInpaintPipeline(WanVaeEncoding, QwenImagePipeline):
    """Inpainting with Qwen-Image (diffusers' ``QwenImageInpaintPipeline``) on a Qwen-Image text-to-image folder:
    image-to-image's start (:class:`QwenImageImg2ImgPipeline`: the image encoded by the Wan 2.1 encoder as one frame
    and noised to where the last ``strength`` of the schedule starts) and, inside the jitted step after each update,
    the region outside ``mask_image`` (white: repaint, black: keep; resized and binarized as diffusers' mask
    processor, sampled onto the latent grid: torch's nearest) set to the image's latents noised to the next sigma
    (:class:`~xdit_jax.schedulers.flow_match.KeptRegion`), so only the masked region is generated. The rest is
    :class:`QwenImagePipeline`'s (its jitted step, true CFG, meshes, PipeFusion).

    Known differences: :class:`QwenImageImg2ImgPipeline`'s (JAX draws from ``seed``; several images pair with their own
    prompt's samples); ``masked_image_latents`` (which Qwen-Image's inpainting step does not use) is refused
    (``padding_mask_crop``: as diffusers, a PIL image and mask); given ``latents``, (B, C, h, w) or packed (B, tokens,
    4C), serve as both the initial latents and the kept region's noise (no noise drawn), as diffusers' other inpainting
    pipelines (FLUX.1, Chroma) take them: diffusers 0.42.1's Qwen-Image one returns them alone from ``prepare_latents``,
    where three values are unpacked, and fails."""

    PIPELINE_CLASSES = ("QwenImageInpaintPipeline", "QwenImagePipeline")
    VAE_ENCODER_CONFIG = qvae.QwenImageVAEConfig

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 true_cfg_scale: float = 4.0, image=None, mask_image=None, masked_image_latents=None,
                 height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> QwenImagePipelineOutput:
        """diffusers' QwenImageInpaintPipeline call and defaults (50 steps, true CFG 4 with a negative prompt,
        strength 0.6; ``generator`` -> ``seed``). ``image``: as :class:`QwenImageImg2ImgPipeline`'s; ``mask_image``: a
        PIL image, or an (H, W) array at the output size (uint8, or floats in [0, 1]), one for every prompt's image."""
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents is not supported here: give the image and its mask.")
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init, finish = self.inpaint_init(
            image, mask_image, height, width, n, strength, self.vae_config.spatial_compression_ratio, pack_latents,
            padding_mask_crop=padding_mask_crop)

        return finish(forward_call(QwenImagePipeline._generate, self, locals(), init=init), output_type)
