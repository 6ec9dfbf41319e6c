"""FLUX.1 text-to-image, diffusers' ``FluxPipeline`` on a JAX mesh.

    pipe = FluxPipeline.from_pretrained("path/or/hub-id", mesh="ulysses=4", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", height=1024, width=1024, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

CLIP-L (the pooled embedding) and T5 (512 tokens, no mask, as diffusers) encode the prompt; the
packed latents (2 x 2 latent patches per token) go through the transformer in two phases over the
mesh (:func:`transformer_over_mesh`): the double-stream blocks with the image tokens sharded over
(ring, ulysses) and the text in slices of its own, then the single-stream blocks over the
joint [text; image] sequence sharded as one. PipeFusion (``pipefusion`` axis, or ``pipefusion_patches``)
splits both stacks over the stages, each patch of image tokens carrying a slice of the text round the
stages once per stack (the text's K/V buffered as the image's: every token computed once a step)
(:func:`xdit_jax.parallel.pipefusion.run_pipefusion`; xDiT's defaults: as many
patches as stages, one exact warm-up step). Guidance-distilled checkpoints (FLUX.1-dev) take
``guidance_scale`` as an embedding; diffusers' "true CFG" (``true_cfg_scale > 1`` with a negative
prompt) runs both halves in the batch (split over ``cfg=2``). The flow-matching Euler step with
diffusers' sigmas (``linspace(1, 1/n, n)``, shifted by ``mu`` from the image size where the
scheduler uses dynamic shifting) is in the jitted step; the VAE decode is split over the mesh.

Known differences: t x 1000 and guidance x 1000 enter their sinusoids in float32 also in bf16
(diffusers and BFL's sampler round them to bf16 first); with ``prompt_embeds`` of fewer than
``max_sequence_length`` tokens and true CFG, the negative prompt is encoded at the prompt's length
(both halves run in one batch; diffusers encodes it at ``max_sequence_length`` in a separate call).
The double-stream phase shards the text over the sequence group with the image (``run_blocks(...,
text=flux.TEXT_KEYS)``), so each device computes its slice of the text's work.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import flux, vae_kl
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.image import (
    ImagePipelineBase,
    ImagePipelineOutput,
    VaeEncoding,
    forward_call,
    vae_scale_factor,
)
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

FluxPipelineOutput = ImagePipelineOutput
DEFAULT_SAMPLE_SIZE = 128  # diffusers' FluxPipeline.default_sample_size (x the VAE factor: 1024 px)
CLIP_TOKENS = 77


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, flux.FluxConfig)


def default_size(tc=None, vc=None) -> dict:
    s = DEFAULT_SAMPLE_SIZE * (vae_scale_factor(vc) if vc is not None else 8)
    return {"height": s, "width": s}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 1.0) -> None:
    """Refuse what the model cannot take, before any heavy work. ``guidance_scale``: the CFG scale
    that decides whether the batch doubles (true CFG), not FLUX.1-dev's embedded guidance."""
    from xdit_jax.mesh import MeshSpec

    if MeshSpec.parse(mesh_spec).cfg == 2 and guidance_scale <= 1.0:
        raise ValueError("Mesh cfg=2 splits the two halves of true CFG, which FLUX runs only with a negative prompt "
                         "and true_cfg_scale > 1 (its guidance_scale is an embedding); drop cfg=2 or give both.")
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), flux.pipefusion_stacks(tc)["stacked_layers"], batch,
                        mesh_spec, guidance_scale)


def pack_latents(latents):
    """diffusers' ``_pack_latents``: (B, C, h, w) -> (B, (h/2)(w/2), 4C), 2 x 2 patches per token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents, h: int, w: int):
    """diffusers' ``_unpack_latents``: (B, (h/2)(w/2), 4C) -> (B, C, h, w) (h, w: latent sizes)."""
    b, _, ch = latents.shape
    x = latents.reshape(b, h // 2, w // 2, ch // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tokens"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ChannelCondition:
    """FLUX.1 Fill's / Control's conditioning: packed tokens (B, N, C') that ride at the end of the jitted step's text
    inputs (:func:`split_channels`) and are laid out as the latents (one row per sample, batch over ``data``); each
    step appends them to the latents' channels (``torch.cat(..., dim=2)`` as diffusers) before ``x_embedder``, so
    they go wherever the latent tokens go (sequence shards, PipeFusion patches)."""

    tokens: jax.Array


def split_channels(texts):
    """(a step's text inputs, their trailing :class:`ChannelCondition` or None)."""
    if isinstance(texts, tuple) and texts and isinstance(texts[-1], ChannelCondition):
        return texts[:-1], texts[-1]
    return texts, None


def transformer_over_mesh(graphdef, state, args, mesh, backend: str = "xla", rope=None):
    """(Traced.) The FLUX transformer on ``args`` = (hidden_states, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids, guidance) over ``mesh``: embed, the double-stream
    blocks over the image tokens (the text sharded too: ``run_blocks(..., with_context=True, text=)``), the
    single-stream blocks over [text; image], the head. Equals ``model(*args)`` on one device."""
    model = nnx.merge(graphdef, state)
    x, tokens, cond, txt_rope = model.embed(*args, rope=rope)
    double = lambda p, y, t, c: nnx.merge(graphdef, p).double_blocks(y, t, c)  # noqa: E731
    single = lambda p, y, t, c: nnx.merge(graphdef, p).single_blocks(y, t, c)  # noqa: E731
    x, c = run_blocks(double, state, x, tokens, cond, mesh, backend=backend, with_context=True,
                      text=flux.TEXT_KEYS)
    joint = run_blocks(single, state, jnp.concatenate([c, x], axis=1), model.joint_tokens(tokens, txt_rope),
                       {"temb": cond["temb"]}, mesh, backend=backend)
    return model.head(joint[:, c.shape[1]:], cond)


class FluxPipeline(ImagePipelineBase):
    """Text-to-image with FLUX.1 (dev, schnell) — see the module docstring."""

    PIPELINE_CLASSES = ("FluxPipeline",)  # the diffusers pipelines (model_index.json) this class loads
    CONFIG = flux.FluxConfig
    MORE_TEXT_ENCODERS = ("_2",)  # T5 (the first: CLIP)
    stacks = staticmethod(flux.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The VAE latent's (h, w) for an image size (multiples of 2: the packing's patches)."""
        s = vae_scale_factor(self.vae_config)
        return 2 * (height // (2 * s)), 2 * (width // (2 * s))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The packed latents (B, (h/2)(w/2), out_channels), diffusers' ``latents`` argument (Fill / Control: the
        transformer's input adds their conditioning's channels, :class:`ChannelCondition`)."""
        h, w = self.latent_grid(height, width)
        return (batch, (h // 2) * (w // 2), self.transformer_config.out_ch)

    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None,
                      max_sequence_length: int = 512):
        """((B, L, d) T5 states, (B, d_clip) pooled CLIP embedding) as diffusers makes them (T5 without
        a mask; ``prompts_2`` go to T5, default ``prompts``)."""
        ids, _ = tokenize(self.tokenizer, prompts, getattr(self.tokenizer, "model_max_length", CLIP_TOKENS))
        ids_2, _ = tokenize(self.tokenizer_2, prompts_2 or prompts, max_sequence_length)
        pooled = self._clip_pooled_fn()(self._put_replicated(jnp.asarray(ids, jnp.int32)))
        t5 = self._text_encoder_fn("text_encoder_2")(self._put_replicated(jnp.asarray(ids_2, jnp.int32)))
        return t5.astype(self.dtype), pooled.astype(self.dtype)

    def _clip_pooled_fn(self):
        fns = self.__dict__.setdefault("_text_fns", {})
        if "clip_pooled" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).pooler_output)
            fns["clip_pooled"] = lambda ids: enc(state, ids)
        return fns["clip_pooled"]

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scales, rope, rng) ->
        (latents, sched_state, i + 1, kv)``; ``texts``: (T5 states, pooled CLIP[, Kontext's packed image latents,
        appended to the noisy ones and cropped from the prediction][, inpainting's
        :class:`~xdit_jax.schedulers.flow_match.KeptRegion`][, Fill's / Control's :class:`ChannelCondition`]);
        ``scales``:
        (embedded guidance, true CFG scale); ``rope``: the image and text RoPE tables; ``kv``: PipeFusion's
        K/V buffers (``warmup``: an exact step that fills them) or None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, mesh, backend = self.dtype, self.mesh, self.attention_backend
        guided = self.transformer_config.guidance_embeds

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scales, rope, rng):
            texts, kept = flow_match.split_kept(texts)
            texts, channels = split_channels(texts)
            x = self._model_batch(latents, do_cfg)
            if channels is not None:  # Fill / Control: the conditioning's channels after the latents' (per token)
                x = jnp.concatenate([x, self._model_batch(channels.tokens, do_cfg).astype(x.dtype)], axis=-1)
            if len(texts) > 2:  # Kontext: the reference image's packed latents after the noisy ones
                x = jnp.concatenate([x, texts[2].astype(x.dtype)], axis=1)
            b = x.shape[0]
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (b,))
            g = jnp.broadcast_to(scales[0], (b,)) if guided else None
            args = (x.astype(dtype), texts[0], texts[1], t, None, None, g)
            if kv is None:
                pred = transformer_over_mesh(graphdef, tstate, args, mesh if mesh.size > 1 else None, backend,
                                             rope=rope)
            else:  # PipeFusion: both stacks with the text held whole (FluxTransformer2DModel.blocks)
                model = nnx.merge(graphdef, tstate)
                tokens_x, tokens, cond, _ = model.embed(*args, rope=rope)
                tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
                pred = model.head(tokens_x, cond)
            pred = self._real_rows(pred.astype(jnp.float32)[:, :latents.shape[1]], latents.shape[0], do_cfg)
            if do_cfg:  # diffusers' true CFG: [negative; positive]
                neg, pos = jnp.split(pred, 2)
                pred = neg + scales[1] * (pos - neg)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state, noise)
            if kept is not None:  # inpainting: outside the mask, the image at the next sigma
                latents = kept.apply(sched, i, latents)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_fn(self, size=None):
        """Jitted VAE decode over the whole mesh of the packed latents -> (B, H, W, 3) in [0, 1];
        ``size``: the latent grid (h, w)."""
        vc, dtype = self.vae_config, self.dtype
        h, w = size

        def decode(vae, latents, **kw):
            z = vae_kl.unscale_latents(vc, unpack_latents(latents.astype(jnp.float32), h, w))
            return vae_kl.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode(("fn", size), decode)

    def schedule(self, num_inference_steps: int, image_seq_len: int):
        """diffusers' FluxPipeline schedule: sigmas linspace(1, 1/n, n), mu from the packed sequence length
        (used where the scheduler shifts dynamically)."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return flow_match.make_schedule(self.scheduler_config, sigmas=sigmas,
                                        mu=self.scheduler_config.mu(image_seq_len))

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 latents=None, max_sequence_length: int = 512,
                 num_images_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> FluxPipelineOutput:
        return self._generate(prompt, prompt_2, negative_prompt, negative_prompt_2, height=height, width=width,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              true_cfg_scale=true_cfg_scale, prompt_embeds=prompt_embeds,
                              pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                              negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_images_per_prompt=num_images_per_prompt,
                              seed=seed, output_type=output_type, progress=progress)

    def _generate(self, prompt, prompt_2, negative_prompt, negative_prompt_2, *, height, width, num_inference_steps,
                  guidance_scale, true_cfg_scale, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                  negative_pooled_prompt_embeds, latents, max_sequence_length, num_images_per_prompt, seed,
                  output_type, progress, condition=None, init=None) -> FluxPipelineOutput:
        """The call; ``condition(batch, per, do_cfg, timer) -> (packed image latents placed as the step's batch,
        their RoPE ids)`` (Kontext's reference image) or None; ``init(sched, latents, batch, per, rng, timer) ->
        (schedule, packed initial latents)`` (image-to-image: the steps left by ``strength`` and the noised image's
        latents; ``latents`` as given, or None; inpainting returns a third item, the step's blend inputs) or None."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with pooled_prompt_embeds)")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds need pooled_prompt_embeds (FLUX reads the pooled CLIP embedding too).")
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length cannot be greater than 512, got {max_sequence_length}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        # diffusers' check_inputs: text and its embeddings are alternatives; embeddings come in pairs
        for text, given, name in ((prompt_2, prompt_embeds, "prompt_2"),
                                  (negative_prompt, negative_prompt_embeds, "negative_prompt"),
                                  (negative_prompt_2, negative_prompt_embeds, "negative_prompt_2")):
            if text is not None and given is not None:
                raise ValueError(f"Give either {name} or the embeddings it would make, not both.")
        if (negative_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise ValueError("negative_prompt_embeds and negative_pooled_prompt_embeds come together.")
        listify = lambda p: [p] if isinstance(p, str) else (list(p) if p is not None else None)  # noqa: E731
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        has_neg = negative_prompt is not None or (negative_prompt_embeds is not None
                                                  and negative_pooled_prompt_embeds is not None)
        do_cfg = true_cfg_scale > 1 and has_neg
        if true_cfg_scale > 1 and not has_neg:
            log.warning("true_cfg_scale=%s has no effect without a negative prompt (as in diffusers).", true_cfg_scale)
        elif has_neg and true_cfg_scale <= 1:
            log.warning("The negative prompt is not used: true CFG needs true_cfg_scale > 1 (as in diffusers).")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec,
                      true_cfg_scale if has_neg else 1.0)
        timer = StageTimer()
        tc = self.transformer_config

        # 1. text: T5 states + pooled CLIP; [negative; positive] for true CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompts, listify(prompt_2),
                                                                         max_sequence_length)
            emb, pooled = jnp.asarray(prompt_embeds, self.dtype), jnp.asarray(pooled_prompt_embeds, self.dtype)
            if emb.ndim != 3 or emb.shape[2] != tc.joint_attention_dim or pooled.shape != (emb.shape[0],
                                                                                           tc.pooled_projection_dim):
                raise ValueError(f"prompt_embeds {tuple(emb.shape)} with pooled {tuple(pooled.shape)}: this model "
                                 f"takes (batch, tokens, {tc.joint_attention_dim}) and (batch, "
                                 f"{tc.pooled_projection_dim}).")
            if do_cfg:  # one batch: the negative prompt's T5 states take the prompt's length
                if negative_prompt_embeds is None:
                    neg = listify(negative_prompt)
                    neg = neg * batch if len(neg) == 1 else neg
                    neg_2 = listify(negative_prompt_2)
                    negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
                        neg, (neg_2 * batch if neg_2 and len(neg_2) == 1 else neg_2), emb.shape[1])
                nemb = jnp.asarray(negative_prompt_embeds, self.dtype)
                npooled = jnp.asarray(negative_pooled_prompt_embeds, self.dtype)
                if nemb.shape != emb.shape or npooled.shape != pooled.shape:
                    raise ValueError(f"negative prompt embeddings {nemb.shape}, {npooled.shape} must have the "
                                     f"shapes of the prompt's {emb.shape}, {pooled.shape}.")
                emb, pooled = jnp.concatenate([nemb, emb]), jnp.concatenate([npooled, pooled])
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(pooled, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (packed, diffusers' layout), RoPE tables, schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(num_inference_steps, shape[1])
        rng = jax.random.key(seed)
        if init is not None:  # (image-to-image; inpainting adds what its step blends in after each update)
            sched, latents, *blend = init(sched, latents, batch, per, rng, timer)
            texts = texts + tuple(blend)
        if latents is None:
            noise = jax.random.normal(rng, (batch * per, shape[2] // 4, h, w), jnp.float32)
            latents = pack_latents(noise)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, (height/16) x (width/16) tokens, channels x 4")
        ids = flux.image_ids(h // 2, w // 2)
        if condition is not None:  # Kontext: the image tokens after the latents, their own ids (before the kept region)
            image_tokens, image_ids = condition(batch, per, do_cfg, timer)
            texts, ids = texts[:2] + (image_tokens,) + texts[2:], np.concatenate([ids, image_ids])
        rope = (flux.rope_tables(ids, tc.axes_dims_rope),
                flux.rope_tables(np.zeros((emb.shape[1], 3), np.float32), tc.axes_dims_rope))
        rope = jax.tree.map(self._put_replicated, rope)

        # 3. denoise: one jitted step per iteration
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scales = self._put_replicated(jnp.asarray([guidance_scale, true_cfg_scale], jnp.float32))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scales, rope, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn((h, w)),
                                       kv=self._pipefusion_buffers(len(texts[0]), len(ids), text_len=emb.shape[1]))
        return FluxPipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


# diffusers' PREFERRED_KONTEXT_RESOLUTIONS: (width, height) pairs FLUX.1 Kontext was trained on.
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


def kontext_image_size(image_height: int, image_width: int, multiple: int = 16, auto_resize: bool = True):
    """(height, width) diffusers' FluxKontextPipeline resizes a reference image of this size to: each side floored to
    ``multiple`` (twice the VAE factor), then with ``auto_resize`` the trained resolution of the nearest aspect ratio
    (:data:`KONTEXT_RESOLUTIONS`; the first of equals, as Python's ``min`` over (distance, w, h) picks)."""
    h, w = image_height - image_height % multiple, image_width - image_width % multiple
    if h < multiple or w < multiple:
        raise ValueError(f"image of {image_height} x {image_width}: Kontext needs at least {multiple} x {multiple} "
                         "pixels.")
    if auto_resize:
        _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
    return h // multiple * multiple, w // multiple * multiple


def kontext_output_size(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """diffusers' FluxKontextPipeline output size: the requested aspect ratio at ``max_area`` pixels, floored to
    ``multiple``."""
    ratio = width / height
    w, h = round((max_area * ratio) ** 0.5), round((max_area / ratio) ** 0.5)
    return h // multiple * multiple, w // multiple * multiple


class FluxKontextPipeline(VaeEncoding, FluxPipeline):
    """Image editing with FLUX.1 Kontext (diffusers' ``FluxKontextPipeline``): the reference image, VAE-encoded
    (``latent_dist.mode()``, shifted and scaled) and packed as the latents are, is appended to the noisy latents'
    tokens with RoPE ids of their own (first coordinate 1); the prediction keeps the noisy tokens. Everything else is
    :class:`FluxPipeline`'s: the joint sequence (text, latents, image) is sharded over (ring, ulysses), true CFG over
    ``cfg``, PipeFusion patches the image tokens with the latents'. The output size is the requested (default 1024 x
    1024) aspect ratio at ``max_area`` pixels; the image is resized (Lanczos) to the trained resolution nearest its
    aspect ratio (``_auto_resize``, diffusers' default) or to its own size floored to 16.

    Known differences: an array image is taken as (H, W, 3) at the target size (diffusers reads a NumPy array as a
    batch and resizes it with torch's interpolation); with several images, one per prompt, each prompt's samples
    take its own image (diffusers tiles the images over the samples, which pairs them with other prompts when
    ``num_images_per_prompt > 1``)."""

    PIPELINE_CLASSES = ("FluxKontextPipeline",)

    def encode_image(self, images) -> jax.Array:
        """diffusers' ``_encode_vae_image`` (``sample_mode="argmax"``): images (N, 3, H, W) in [-1, 1] -> packed
        diffusion latents (N, (h/2)(w/2), 4C), ``(mode - shift_factor) * scaling_factor``; the image plane split over
        the mesh."""
        return pack_latents(self.image_latents(images))

    def reference_condition(self, image, auto_resize: bool = True):
        """(``condition(batch, per, do_cfg, timer) -> (packed image tokens placed as the step's batch, their RoPE
        ids)``, (height, width) the image is taken at) for a PIL image or an (H, W, 3) array, or a list of them, one
        per prompt: resized to :func:`kontext_image_size` of the first, VAE-encoded (the mode) and packed."""
        from xdit_jax.pipelines.denoise import preprocess_image, rgb_image

        images = [rgb_image(im) for im in (image if isinstance(image, (list, tuple)) else [image])]
        if not images:
            raise ValueError("image: an empty list; give an image (or None to generate from the text alone).")
        first = images[0]
        ih, iw = (first.height, first.width) if hasattr(first, "height") else first.shape[:2]
        multiple = 2 * vae_scale_factor(self.vae_config)
        ih, iw = kontext_image_size(ih, iw, multiple, auto_resize)
        pixels = jnp.concatenate([preprocess_image(im, ih, iw) for im in images])

        def condition(batch, per, do_cfg, timer):
            if len(images) not in (1, batch):
                raise ValueError(f"{len(images)} images for {batch} prompts: give one image, or one per prompt.")
            with timer.stage("image_encoding"):
                packed = self.encode_image(pixels)  # (images, tokens, 4C)
                rows = jnp.repeat(packed, per * batch // len(images), axis=0)
                placed = self._put_batch(jnp.concatenate([rows, rows]) if do_cfg else rows, do_cfg)
                jax.block_until_ready(placed)
            ids = flux.image_ids(ih // multiple, iw // multiple)
            ids[:, 0] = 1
            return placed, ids

        return condition, (ih, iw)

    def __call__(self, image=None, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                 latents=None, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, max_sequence_length: int = 512, max_area: int = 1024 ** 2,
                 _auto_resize: bool = True, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxKontextPipeline call. ``image``: a PIL image or an (H, W, 3) array (uint8, or floats in
        [0, 1]), or a list of them, one per prompt; None generates from the text alone."""
        ds = self.default_size()
        h0 = ds["height"] if height is None else height
        w0 = ds["width"] if width is None else width
        if max_area < 1 or h0 < 1 or w0 < 1:
            raise ValueError(f"height, width and max_area must be positive (got {h0}, {w0}, {max_area}).")
        height, width = kontext_output_size(h0, w0, max_area, 2 * vae_scale_factor(self.vae_config))
        if (height, width) != (h0, w0):
            log.warning("Kontext: height and width adjusted to %d x %d (the requested aspect ratio at max_area=%d "
                        "pixels, as diffusers does).", height, width, max_area)
        condition = None if image is None else self.reference_condition(image, _auto_resize)[0]
        return forward_call(FluxPipeline._generate, self, locals(), condition=condition)


class FluxImg2ImgPipeline(VaeEncoding, FluxPipeline):
    """Image-to-image with FLUX.1 (diffusers' ``FluxImg2ImgPipeline``; SDEdit) on a FLUX.1 text-to-image folder: the
    image, resized to the output size and VAE-encoded (a sample of the posterior, as diffusers), is noised to the
    sigma where the last ``strength`` of the ``num_inference_steps`` schedule starts, and only those steps run. The
    rest is :class:`FluxPipeline`'s (the same jitted step, meshes, PipeFusion, true CFG).

    Known differences: the noise and the posterior's sample are JAX draws from ``seed`` (diffusers': torch's
    ``generator``); an array image is taken as (H, W, 3) at the output size; with several images, one per prompt,
    each prompt's samples take its own image (diffusers tiles the images over the samples, which pairs them with
    other prompts when ``num_images_per_prompt > 1``)."""

    PIPELINE_CLASSES = ("FluxImg2ImgPipeline", "FluxPipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, image=None, true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 512,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxImg2ImgPipeline call and defaults (``generator`` -> ``seed``). ``image``: a PIL image or an
        (H, W, 3) array (uint8, or floats in [0, 1]), or a list of them, one per prompt; ``latents``: packed initial
        latents used as given (no image encoded, as diffusers)."""
        height, width, init = self.img2img_init(image, height, width, num_inference_steps, strength, pack_latents)

        return forward_call(FluxPipeline._generate, self, locals(), init=init)


class FluxInpaintPipeline(VaeEncoding, FluxPipeline):
    """Inpainting with FLUX.1 (diffusers' ``FluxInpaintPipeline``) on a FLUX.1 text-to-image folder: image-to-image's
    start (:class:`FluxImg2ImgPipeline`: the image encoded and noised to where the last ``strength`` of the schedule
    starts) and, inside the jitted step after each update, the region outside ``mask_image`` (white: repaint, black:
    keep; binarized at 0.5) set to the image's latents noised to the next sigma, so only the masked region is
    generated. The mask is resized as diffusers' mask processor does and sampled onto the latent grid (nearest).

    Known differences: the noise and the posterior's sample are JAX draws from ``seed``; ``masked_image_latents``
    (which FLUX.1's inpainting step does not use) is refused (``padding_mask_crop``: as diffusers, a PIL image and
    mask, :mod:`xdit_jax.pipelines.mask_crop`); given ``latents`` serve, as
    diffusers', as both the initial latents and the kept region's noise (no noise drawn), (B, C, h, w) as diffusers'
    inpainting takes them (unlike its image-to-image: packed) or packed (B, tokens, 4C); array images are taken at
    the output size; several images (one per prompt) pair with their own prompt's samples."""

    PIPELINE_CLASSES = ("FluxInpaintPipeline", "FluxPipeline")

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, image=None, mask_image=None, masked_image_latents=None, true_cfg_scale: float = 1.0,
                 height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 512,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxInpaintPipeline call and defaults (``generator`` -> ``seed``). ``image``: as
        :class:`FluxImg2ImgPipeline`'s; ``mask_image``: a PIL image, or an (H, W) array at the output size (uint8, or
        floats in [0, 1]), one for every prompt's image."""
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents is not supported here: give the image and its mask.")
        height, width, init, finish = self.inpaint_init(
            image, mask_image, height, width, num_inference_steps, strength, vae_scale_factor(self.vae_config),
            pack_latents, padding_mask_crop=padding_mask_crop)

        return finish(forward_call(FluxPipeline._generate, self, locals(), init=init), output_type)


class FluxKontextInpaintPipeline(FluxKontextPipeline):
    """Inpainting with FLUX.1 Kontext (diffusers' ``FluxKontextInpaintPipeline``) on a Kontext folder:
    :class:`FluxInpaintPipeline`'s start and kept region (white repaints, black keeps) at the image's Kontext size
    (:func:`kontext_image_size`: the output takes it), and Kontext's reference tokens: ``image_reference``'s latents if
    given (at its own Kontext size), else the image's. As diffusers, the image's latents are the posterior's mode (the
    only draw is the noise; diffusers' second, the masked image's sample, feeds nothing of the step) and ``strength``
    defaults to 1 (the kept region still blended in after each step).

    Known differences: :class:`FluxInpaintPipeline`'s (JAX draws from ``seed``, given ``latents``);
    ``padding_mask_crop`` is refused (diffusers crops the image it has resized with coordinates from the mask at its
    own size)."""

    PIPELINE_CLASSES = ("FluxKontextInpaintPipeline", "FluxKontextPipeline")
    IMAGE_LATENTS_MODE = True

    def __call__(self, image=None, image_reference=None, mask_image=None, prompt: str | list[str] | None = None,
                 prompt_2: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 negative_prompt_2: str | list[str] | None = None, *, true_cfg_scale: float = 1.0,
                 height: int | None = None, width: int | None = None, strength: float = 1.0,
                 padding_mask_crop: int | None = None, num_inference_steps: int = 28, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 512,
                 max_area: int = 1024 ** 2, _auto_resize: bool = True, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> FluxPipelineOutput:
        """diffusers' FluxKontextInpaintPipeline call and defaults (``generator`` -> ``seed``). ``image``: the picture
        to repaint (a PIL image or an (H, W, 3) array, or one per prompt; it sets the output size, so ``height`` /
        ``width`` / ``max_area`` change nothing, as in diffusers); ``mask_image``: a PIL image, or an array at that
        size; ``image_reference``: the Kontext reference, default the image."""
        if padding_mask_crop is not None:
            raise NotImplementedError("padding_mask_crop is not supported by Kontext inpainting here: crop the image "
                                      "and its mask first.")
        if image is None:
            raise ValueError("FluxKontextInpaintPipeline needs image= (the picture to repaint) and mask_image=.")
        condition, (height, width) = self.reference_condition(image, _auto_resize)
        if image_reference is not None:
            condition = self.reference_condition(image_reference, _auto_resize)[0]
        height, width, init, _ = self.inpaint_init(image, mask_image, height, width, num_inference_steps, strength,
                                                   vae_scale_factor(self.vae_config), pack_latents)
        return forward_call(FluxPipeline._generate, self, locals(), init=init, condition=condition)
