"""Stable Diffusion 3 / 3.5 text-to-image, diffusers' ``StableDiffusion3Pipeline`` on a JAX mesh.

    pipe = StableDiffusion3Pipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", height=1024, width=1024, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

Three text encoders as diffusers uses them: CLIP-L and CLIP-G (their penultimate hidden states,
concatenated and zero-padded to T5's width; their projected pooled outputs concatenated) and T5
(``max_sequence_length`` tokens, no mask; zeros where the pipeline has no T5, as diffusers). The
MMDiT's image tokens are sharded over (ring, ulysses) by
:func:`xdit_jax.parallel.sequence.run_blocks`, the text (77 + T5 tokens) too, in slices of its own,
joining each joint attention as a context (:mod:`xdit_jax.models.sd3`); CFG and the
flow-matching Euler step are inside the one jitted step; the VAE decode is split over the mesh.
PipeFusion (``pipefusion`` mesh axis, or ``pipefusion_patches``) splits the stacked joint blocks into
stages and the image into patches, each patch carrying a slice of the text stream (the text's K/V
buffered as the image's: each text token computed once a step); the last block runs on the last stage.
SD3.5 Medium's two runs (dual-attention blocks 0-12, then plain ones) are
each split over all the stages (a looped pipeline), its dual blocks keeping a K/V buffer per attention.
Skip-layer guidance (``skip_guidance_layers``, SD3.5 Medium's recommended [7, 8, 9]) as
diffusers': on the steps between ``skip_layer_guidance_start`` and ``_stop`` (fractions of the steps) one
more pass of the prompt's half with those blocks left out, ``pred += (text - skipped) * scale``.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xdit_jax.models import sd3, vae_kl
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    load_component,
    load_tokenizer,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.image import (  # noqa: F401  (this family's API too)
    ImagePipelineBase,
    ImagePipelineOutput,
    VaeEncoding,
    default_size,
    forward_call,
    vae_scale_factor,
)
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

SD3PipelineOutput = ImagePipelineOutput
CLIP_TOKENS = 77


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, sd3.SD3Config)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 7.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    check_size_and_mesh(height, width, vae_scale_factor(vc) * tc.patch_size,
                        sd3.pipefusion_stacks(tc)["stacked_layers"], batch, mesh_spec,
                        guidance_scale)  # PipeFusion's stages split each run of the num_layers - 1 stacked blocks
    sd3.check_input_shape(tc, height // vae_scale_factor(vc), width // vae_scale_factor(vc))  # the position table


class StableDiffusion3Pipeline(ImagePipelineBase):
    """Text-to-image with SD3 / SD3.5 — see the module docstring."""

    PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
    CONFIG = sd3.SD3Config
    MORE_TEXT_ENCODERS = ("_2",)  # CLIP-G (the first: CLIP-L); T5 (text_encoder_3) is optional: _extra_parts

    @staticmethod
    def stacks(tc) -> dict:
        return dict(sd3.pipefusion_stacks(tc), final_block=True)

    def __init__(self, *, text_encoder_3=None, tokenizer_3=None, **parts):
        super().__init__(**parts)
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """T5 where the folder has it: one without ``text_encoder_3`` (dropped to save memory) runs with zeros in
        its place, as diffusers."""
        if not (folder / "text_encoder_3" / "config.json").exists():
            return {}
        _, t5 = load_component(folder, "text_encoder_3", dtype, NamedSharding(mesh, P()))
        return {"text_encoder_3": t5, "tokenizer_3": load_tokenizer(folder, "tokenizer_3")}

    # ------------------------------------------------------------------ stages

    def _clip_fn(self, which: int, clip_skip: int | None):
        """Jitted (hidden state ``-(clip_skip + 2)``, projected pooled output) of CLIP ``which`` (0: L, 1: G)."""
        fns = self.__dict__.setdefault("_text_fns", {})
        key = ("clip", which, clip_skip)
        if key not in fns:
            model = (self.text_encoder, self.text_encoder_2)[which]
            graphdef, state = nnx.split(model)
            layer = -((clip_skip or 0) + 2)

            @jax.jit
            def enc(state, ids):
                out = nnx.merge(graphdef, state)(ids, output_hidden_states=True)
                return out.hidden_states[layer], out.text_embeds

            fns[key] = lambda ids: enc(state, ids)
        return fns[key]

    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None,
                      prompts_3: list[str] | None = None, max_sequence_length: int = 256,
                      clip_skip: int | None = None):
        """((B, 77 + L, d_t5) text states, (B, pooled) embeddings) as diffusers makes them."""
        states, pooled = [], []
        for name, ps in (("prompt_2", prompts_2), ("prompt_3", prompts_3)):
            if ps is not None and len(ps) != len(prompts):
                raise ValueError(f"{name} has {len(ps)} entries for {len(prompts)} prompts.")
        for which, (tok, ps) in enumerate(((self.tokenizer, prompts), (self.tokenizer_2, prompts_2 or prompts))):
            ids, _ = tokenize(tok, ps, getattr(tok, "model_max_length", CLIP_TOKENS))
            h, p = self._clip_fn(which, clip_skip)(self._put_replicated(jnp.asarray(ids, jnp.int32)))
            states.append(h)
            pooled.append(p)
        tc = self.transformer_config
        b = len(prompts)
        if self.text_encoder_3 is None:
            t5 = jnp.zeros((b, max_sequence_length, tc.joint_attention_dim), self.dtype)
        else:
            ids, _ = tokenize(self.tokenizer_3, prompts_3 or prompts, max_sequence_length)
            t5 = self._text_encoder_fn("text_encoder_3")(self._put_replicated(jnp.asarray(ids, jnp.int32)))
        clip = jnp.concatenate(states, axis=-1).astype(self.dtype)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"The CLIP states ({clip.shape[-1]} wide) are wider than T5's ({t5.shape[-1]}).")
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return (jnp.concatenate([clip, t5.astype(self.dtype)], axis=1),
                jnp.concatenate(pooled, axis=-1).astype(self.dtype))

    def _step_fn(self, do_cfg: bool, warmup: bool = True, skip_layers: tuple = ()):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (text states, pooled);
        ``skip_layers``: a skip-layer guidance step (``guidance``: (cfg scale, skip-layer scale))."""
        return self._flow_step_fn(do_cfg, warmup, lambda x, texts, t: (x, texts[0], texts[1], t), skip_layers)

    def _skip_layer_steps(self, skip_guidance_layers, scale: float, start: float, stop: float, num_steps: int):
        """``step_for(n)`` for the denoising loop: diffusers' skip-layer guidance step where ``num_steps * start
        < n < num_steps * stop`` (strict, as diffusers), else None."""
        n_layers = self.transformer_config.num_layers
        layers = tuple(sorted({int(i) for i in skip_guidance_layers}))
        if not all(0 <= i < n_layers for i in layers):
            raise ValueError(f"skip_guidance_layers {list(skip_guidance_layers)}: block indices are 0..{n_layers - 1}.")
        if self.uses_pipefusion:
            raise ValueError("Skip-layer guidance runs one more transformer pass per step, which PipeFusion's K/V "
                             "buffers do not hold; use cfg, data, ulysses and ring meshes with it.")
        fn = self._step_fn(True, skip_layers=layers)
        slg = self._put_replicated(jnp.float32(scale))

        def with_slg(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            return fn(tstate, latents, sched_state, i, kv, texts, sched, (guidance, slg), rng)

        return lambda n: with_slg if num_steps * start < n < num_steps * stop else None

    def _decode_fn(self, size=None):
        """Jitted VAE decode over the whole mesh -> (B, H, W, 3) in [0, 1]: ``latents / scaling + shift``."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, **kw):
            return vae_kl.decode(vae, vae_kl.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def schedule(self, num_inference_steps: int, height: int, width: int, sigmas=None):
        """diffusers' schedule: the scheduler's own (``shift``), ``mu`` from the image tokens where it shifts
        dynamically (SD3.5 Large Turbo configs do not; some fine-tunes do)."""
        tc = self.transformer_config
        s = vae_scale_factor(self.vae_config) * tc.patch_size
        mu = self.scheduler_config.mu((height // s) * (width // s)) if self.scheduler_config.use_dynamic_shifting \
            else None
        return flow_match.make_schedule(self.scheduler_config, None if sigmas is not None else num_inference_steps,
                                        sigmas=sigmas, mu=mu)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, prompt_2=None, prompt_3=None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2=None, negative_prompt_3=None,
                 *, height: int | None = None, width: int | None = None, num_inference_steps: int = 28,
                 sigmas=None, guidance_scale: float = 7.0, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, latents=None,
                 max_sequence_length: int = 256, clip_skip: int | None = None, skip_guidance_layers=None,
                 skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_stop: float = 0.2,
                 skip_layer_guidance_start: float = 0.01,
                 num_images_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True, _init=None) -> SD3PipelineOutput:
        """diffusers' StableDiffusion3Pipeline call and defaults (``generator`` -> ``seed``); ``_init(sched, latents,
        batch, per, rng, timer) -> (schedule, initial latents[, kept region])``: image-to-image's and inpainting's start
        (:class:`StableDiffusion3Img2ImgPipeline`, :class:`StableDiffusion3InpaintPipeline`)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with pooled_prompt_embeds)")
        if (prompt_embeds is None) != (pooled_prompt_embeds is None):
            raise ValueError("prompt_embeds and pooled_prompt_embeds come together.")
        if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise ValueError("negative_prompt_embeds and negative_pooled_prompt_embeds come together.")
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length cannot be greater than 512, got {max_sequence_length}.")
        # diffusers' check_inputs: text and its embeddings are alternatives
        for text, given, name in ((prompt_2, prompt_embeds, "prompt_2"), (prompt_3, prompt_embeds, "prompt_3"),
                                  (negative_prompt, negative_prompt_embeds, "negative_prompt"),
                                  (negative_prompt_2, negative_prompt_embeds, "negative_prompt_2"),
                                  (negative_prompt_3, negative_prompt_embeds, "negative_prompt_3")):
            if text is not None and given is not None:
                raise ValueError(f"Give either {name} or the embeddings it would make, not both.")
        # diffusers: an empty prompt_2 / prompt_3 falls back to the prompt
        listify = lambda p: [p] if isinstance(p, str) else (list(p) if p else None)  # noqa: E731
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        sched = self.schedule(num_inference_steps, height, width, sigmas)  # refuses a bad step count first
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text: CLIP-L + CLIP-G (+ T5); [negative; positive] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, pooled_prompt_embeds = self.encode_prompt(
                    prompts, listify(prompt_2), listify(prompt_3), max_sequence_length, clip_skip)
            emb, pooled = jnp.asarray(prompt_embeds, self.dtype), jnp.asarray(pooled_prompt_embeds, self.dtype)
            tc = self.transformer_config
            if emb.ndim != 3 or emb.shape[2] != tc.joint_attention_dim or pooled.shape != (emb.shape[0],
                                                                                           tc.pooled_projection_dim):
                raise ValueError(f"prompt_embeds {tuple(emb.shape)} with pooled {tuple(pooled.shape)}: this model "
                                 f"takes (batch, tokens, {tc.joint_attention_dim}) and (batch, "
                                 f"{tc.pooled_projection_dim}).")
            if do_cfg:
                if negative_prompt_embeds is None:
                    if emb.shape[1] <= CLIP_TOKENS:
                        raise ValueError(f"prompt_embeds have {emb.shape[1]} tokens: SD3's are 77 CLIP + the T5 "
                                         "tokens; give negative_prompt_embeds too.")
                    neg = negative_prompts(negative_prompt, batch)
                    neg_2 = negative_prompts(negative_prompt_2, batch) if negative_prompt_2 else neg
                    neg_3 = negative_prompts(negative_prompt_3, batch) if negative_prompt_3 else neg
                    negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
                        neg, neg_2, neg_3, emb.shape[1] - CLIP_TOKENS)
                nemb = jnp.asarray(negative_prompt_embeds, self.dtype)
                npooled = jnp.asarray(negative_pooled_prompt_embeds, self.dtype)
                if nemb.shape != emb.shape or npooled.shape != pooled.shape:
                    raise ValueError(f"negative prompt embeddings {nemb.shape}, {npooled.shape} must have the "
                                     f"shapes of the prompt's {emb.shape}, {pooled.shape}.")
                emb, pooled = jnp.concatenate([nemb, emb]), jnp.concatenate([npooled, pooled])
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(pooled, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, h, w)
        shape = self.latent_shape(batch * per, height, width)
        rng = jax.random.key(seed)
        if _init is not None:  # (inpainting returns its kept region too, a step input)
            sched, latents, *kept = _init(sched, latents, batch, per, rng, timer)
            texts = texts + tuple(kept)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, channels, height/8, width/8")

        # 3. denoise: one jitted step per iteration
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        step_for = None
        if skip_guidance_layers and do_cfg:  # diffusers applies skip-layer guidance only with CFG
            step_for = self._skip_layer_steps(skip_guidance_layers, skip_layer_guidance_scale,
                                              skip_layer_guidance_start, skip_layer_guidance_stop,
                                              len(sched.timesteps))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, guidance, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(),
                                       kv=self._pipefusion_buffers(len(texts[0]), self._image_tokens(height, width),
                                                                   text_len=emb.shape[1]),
                                       step_for=step_for)
        return SD3PipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class StableDiffusion3Img2ImgPipeline(VaeEncoding, StableDiffusion3Pipeline):
    """Image-to-image with SD3 / SD3.5 (diffusers' ``StableDiffusion3Img2ImgPipeline``; SDEdit) on an SD3 text-to-image
    folder: the image, resized to the output size and VAE-encoded (a sample of the posterior, as diffusers), is noised
    to the sigma where the last ``strength`` of the ``num_inference_steps`` schedule starts, and only those steps run;
    the rest is :class:`StableDiffusion3Pipeline`'s (its jitted step, meshes, PipeFusion, skip-layer guidance).

    Known differences: the noise and the posterior's sample are JAX draws from ``seed`` (diffusers': torch's
    ``generator``); an array image is taken as (H, W, 3) at the output size; with several images, one per prompt,
    each prompt's samples take its own image (diffusers tiles the images over the samples)."""

    PIPELINE_CLASSES = ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3Pipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2=None, prompt_3=None, *, image=None,
                 height: int | None = None, width: int | None = None, strength: float = 0.6,
                 num_inference_steps: int = 50, sigmas=None, guidance_scale: float = 7.0,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2=None, negative_prompt_3=None,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip: int | None = None,
                 max_sequence_length: int = 256, skip_guidance_layers=None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_stop: float = 0.2, skip_layer_guidance_start: float = 0.01, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> SD3PipelineOutput:
        """diffusers' StableDiffusion3Img2ImgPipeline call and defaults (``generator`` -> ``seed``). ``image``: a PIL
        image or an (H, W, 3) array (uint8, or floats in [0, 1]), or a list of them, one per prompt; ``latents``:
        initial latents used as given (no image encoded, as diffusers). Also the text-to-image pipeline's skip-layer
        guidance (off by default; diffusers' image-to-image has none), over the steps that run."""
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init = self.img2img_init(image, height, width, n, strength)

        return forward_call(StableDiffusion3Pipeline.__call__, self, locals(), _init=init)


class StableDiffusion3InpaintPipeline(VaeEncoding, StableDiffusion3Pipeline):
    """Inpainting with SD3 / SD3.5 (diffusers' ``StableDiffusion3InpaintPipeline``, a 16-channel transformer) on an SD3
    text-to-image folder: image-to-image's start and, in the jitted step after each update, the region outside
    ``mask_image`` (white: repaint, black: keep; resized and binarized as diffusers' mask processor, sampled onto the
    latent grid) set to the image's latents noised to the next sigma
    (:class:`~xdit_jax.schedulers.flow_match.KeptRegion`). Skip-layer guidance applies too (diffusers' has none).

    Known differences: the noise and the posterior's sample are JAX draws from ``seed``; ``masked_image_latents``
    (unused by a 16-channel transformer) is refused (``padding_mask_crop``: as diffusers, a PIL image and mask); given
    ``latents`` serve, as diffusers', as both the initial latents and the kept region's noise; several images (one per
    prompt) pair with their own prompt's samples. diffusers 0.42.1's SD3 inpainting decodes without the VAE's
    ``shift_factor`` (unlike its text-to-image pipeline and its own encode); ours decodes as the text-to-image pipeline
    does."""

    PIPELINE_CLASSES = ("StableDiffusion3InpaintPipeline", "StableDiffusion3Pipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2=None, prompt_3=None, *, image=None,
                 mask_image=None, masked_image_latents=None, height: int | None = None, width: int | None = None,
                 padding_mask_crop: int | None = None, strength: float = 0.6, num_inference_steps: int = 50,
                 sigmas=None, guidance_scale: float = 7.0, negative_prompt: str | list[str] | None = None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, clip_skip: int | None = None, max_sequence_length: int = 256,
                 skip_guidance_layers=None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_stop: float = 0.2, skip_layer_guidance_start: float = 0.01, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> SD3PipelineOutput:
        """diffusers' StableDiffusion3InpaintPipeline call and defaults (``generator`` -> ``seed``); ``image`` as
        :class:`StableDiffusion3Img2ImgPipeline`'s, ``mask_image`` a PIL image or an (H, W) array at the output size
        (uint8, or floats in [0, 1]), one for every prompt's image."""
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents is not supported here: give the image and its mask.")
        if self.transformer_config.in_channels != self.vae_config.latent_channels:
            raise NotImplementedError(f"A transformer of {self.transformer_config.in_channels} input channels (an "
                                      "inpainting model taking the mask and masked image) is not supported; the "
                                      "text-to-image transformers are.")
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init, finish = self.inpaint_init(
            image, mask_image, height, width, n, strength, vae_scale_factor(self.vae_config),
            padding_mask_crop=padding_mask_crop)

        return finish(forward_call(StableDiffusion3Pipeline.__call__, self, locals(), _init=init), output_type)
