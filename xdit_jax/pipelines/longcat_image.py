"""LongCat-Image text-to-image, diffusers' ``LongCatImagePipeline`` on a JAX mesh (and its image editing,
``LongCatImageEditPipeline``: :class:`LongCatImageEditPipeline`).

    pipe = LongCatImagePipeline.from_pretrained("meituan-longcat/LongCat-Image", mesh="cfg=2,ulysses=4",
                                                dtype="bfloat16")
    out = pipe("A young woman in a yellow sweater by a brick wall", height=768, width=1344, guidance_scale=4.5,
               seed=43)
    out.images   # (batch, height, width, 3) float in [0, 1]

The prompt as diffusers encodes it (:meth:`LongCatImagePipeline.encode_prompt`): split at quotation marks
(diffusers' ``split_quotation``; a quoted part is tokenized character by character), tokenized without special
tokens, cut to ``tokenizer_max_length`` (512) and padded to it by the tokenizer, then wrapped in the template's
prefix (the system turn, "As an image captioning expert, ...") and suffix; Qwen2.5-VL's language model with that
mask; ``hidden_states[-1]`` less the prefix and suffix: (B, 512, 3584) states, padding included (the transformer
takes no text mask). The transformer is FLUX.1's (:mod:`xdit_jax.models.longcat_image`), run as FLUX's pipeline
runs it (:func:`xdit_jax.pipelines.flux.transformer_over_mesh`): the double-stream blocks over the image tokens
sharded on (ring, ulysses), the text sharded with them, then the single-stream blocks over [text; image]; PipeFusion
splits both stacks over its stages (FLUX's two-stack form). The text ids (0, i, i) and image ids (1, 512 + row,
512 + column) are diffusers'.

CFG when ``guidance_scale > 1`` (diffusers' default 4.5), both passes one batch ``[negative; prompt]`` over the
``cfg`` axis (the negative prompt default ""), ``neg + s (pos - neg)``; with ``enable_cfg_renorm`` (diffusers'
default) rescaled per token by ``clip(|pos| / (|comb| + 1e-8), cfg_renorm_min, 1)``. Sigmas ``linspace(1, 1/n, n)``
(or given), the scheduler's shift with ``mu`` from the packed length; the Euler step inside the jitted step; the
FLUX VAE (``latents / scaling + shift``) decodes, split over the mesh.

Differences from diffusers, on purpose: ``enable_prompt_rewrite`` defaults to False and True is refused (diffusers
defaults to True: it has Qwen2.5-VL *generate* up to 512 tokens of a rewritten prompt, which this engine does not
do; rewrite the prompt beforehand and pass it); height and width must be multiples of 16 (diffusers rounds others
down with a warning); a string ``negative_prompt`` serves every prompt of a batch (diffusers' encodes it once and
fails for several prompts); random initial latents take ``in_channels / 4`` channels (diffusers: always 16, the
real model's); the timestep stays float32 in bf16 too; ``generator`` -> ``seed`` (JAX draws).
"""

from __future__ import annotations

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import flux
from xdit_jax.models import longcat_image as lc
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.flux import FluxPipeline, pack_latents, transformer_over_mesh
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, VaeEncoding, vae_scale_factor
from xdit_jax.pipelines.qwenimage_edit import QwenVision
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

LongCatImagePipelineOutput = ImagePipelineOutput
DEFAULT_SAMPLE_SIZE = 128  # diffusers' default_sample_size (x the VAE factor 8: 1024 px)
TOKENIZER_MAX_LENGTH = 512  # diffusers' tokenizer_max_length: the text tokens, also the image ids' start
PROMPT_PREFIX = ("<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an "
                 "image content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n")
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
QUOTE_PAIRS = (("'", "'"), ('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d"))
_PLACEHOLDER = "longcat_$##$_longcat"  # diffusers' stand-in for a word's inner apostrophe (it's, don't)


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, lc.LongCatImageConfig)


def default_size(tc=None, vc=None) -> dict:
    s = DEFAULT_SAMPLE_SIZE * (vae_scale_factor(vc) if vc is not None else 8)
    return {"height": s, "width": s}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 4.5) -> None:
    """Refuse what the model cannot take, before any heavy work (``cfg=2`` needs ``guidance_scale > 1``)."""
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), lc.pipefusion_stacks(tc)["stacked_layers"], batch,
                        mesh_spec, guidance_scale)


def split_quotation(prompt: str) -> list[tuple[str, bool]]:
    """diffusers' ``split_quotation``: the prompt in parts, (text, quoted); a word's inner apostrophe (``it's``) does
    not open a quotation."""
    inner = sorted(set(re.findall(r"[a-zA-Z]+'[a-zA-Z]+", prompt)))
    mapping = []
    # (diffusers iterates a set: its placeholders' order is arbitrary, the result is not: each maps back to its word)
    for i, word in enumerate(inner):
        stand_in = _PLACEHOLDER * (i + 1)
        prompt = prompt.replace(word, stand_in)
        mapping.append((word, stand_in))
    pattern = "|".join(re.escape(a) + r"[^" + re.escape(a + b) + r"]*?" + re.escape(b) for a, b in QUOTE_PAIRS)
    out = []
    for part in re.split(f"({pattern})", prompt):
        for word, stand_in in mapping:
            part = part.replace(stand_in, word)
        if part:
            out.append((part, bool(re.match(pattern, part))))
    return out


def prompt_tokens(tokenizer, prompt: str, max_length: int) -> list[int]:
    """One prompt's token ids as diffusers' ``_encode_prompt`` makes them: quoted parts character by character, the
    rest as it is, no special tokens; cut to ``max_length`` (with a warning)."""
    ids = []
    for part, quoted in split_quotation(prompt):
        for piece in (part if quoted else [part]):
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    if len(ids) > max_length:
        log.warning("The prompt was truncated to tokenizer_max_length=%d tokens (it has %d), as in diffusers.",
                    max_length, len(ids))
        ids = ids[:max_length]
    return ids


def template_tokens(tokenizer, prompts: list[str], max_length: int):
    """(ids, mask) (B, prefix + ``max_length`` + suffix) int64 and the prefix's and suffix's token counts: each
    prompt's tokens padded by the tokenizer to ``max_length`` between the template's prefix and suffix."""
    padded = tokenizer.pad({"input_ids": [prompt_tokens(tokenizer, p, max_length) for p in prompts]},
                           max_length=max_length, padding="max_length", return_attention_mask=True,
                           return_tensors="np")
    prefix = tokenizer(PROMPT_PREFIX, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    b = len(prompts)
    ids = np.concatenate([np.tile(np.asarray(prefix, np.int64), (b, 1)), np.asarray(padded["input_ids"], np.int64),
                          np.tile(np.asarray(suffix, np.int64), (b, 1))], axis=1)
    mask = np.concatenate([np.ones((b, len(prefix)), np.int64), np.asarray(padded["attention_mask"], np.int64),
                           np.ones((b, len(suffix)), np.int64)], axis=1)
    return ids, mask, len(prefix), len(suffix)


def guided(neg, pos, scale, renorm_min):
    """diffusers' LongCat CFG: ``neg + s (pos - neg)``, rescaled per token by ``clip(|pos| / (|comb| + 1e-8),
    renorm_min, 1)`` (norms over the channels; ``renorm_min`` 1: no rescaling, ``enable_cfg_renorm=False``)."""
    comb = neg + scale * (pos - neg)
    ratio = jnp.linalg.norm(pos, axis=-1, keepdims=True) / (jnp.linalg.norm(comb, axis=-1, keepdims=True) + 1e-8)
    return comb * jnp.clip(ratio, renorm_min, 1.0)


class LongCatImagePipeline(ImagePipelineBase):
    """Text-to-image with LongCat-Image — see the module docstring. ``tokenizer_max_length``: the text's tokens
    (diffusers' attribute of that name, 512; also the image ids' start)."""

    PIPELINE_CLASSES = ("LongCatImagePipeline",)
    CONFIG = lc.LongCatImageConfig
    stacks = staticmethod(lc.pipefusion_stacks)
    tokenizer_max_length = TOKENIZER_MAX_LENGTH

    # the packed-latent layout, sizes and decode are FLUX.1's
    latent_grid = FluxPipeline.latent_grid
    _decode_fn = FluxPipeline._decode_fn

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The packed latents (B, (h/2)(w/2), in_channels), diffusers' ``latents`` argument."""
        h, w = self.latent_grid(height, width)
        return (batch, (h // 2) * (w // 2), self.transformer_config.in_channels)

    # ------------------------------------------------------------------ stages

    def _qwen_fn(self):
        """``fn(ids, mask) -> hidden_states[-1]`` of the Qwen2.5-VL language model, jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "qwen" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).last_hidden_state)
            fns["qwen"] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                                self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns["qwen"]

    def encode_prompt(self, prompts: list[str]):
        """(B, tokenizer_max_length, d) states in the compute dtype, as diffusers' ``encode_prompt``
        (``num_images_per_prompt=1``; no rewriting)."""
        ids, mask, pre, suf = template_tokens(self.tokenizer, list(prompts), int(self.tokenizer_max_length))
        states = self._qwen_fn()(ids, mask)
        return states[:, pre:states.shape[1] - suf].astype(self.dtype)

    def rope(self, height: int, width: int, text_len: int, start: int | None = None, condition: bool = False):
        """The RoPE tables (image, text) for an image size and a text length, replicated on the mesh; ``start``: the
        image ids' (default ``tokenizer_max_length``); ``condition``: the edit's image tokens after the noisy ones
        (modality 2, the same grid)."""
        tc = self.transformer_config
        h, w = self.latent_grid(height, width)
        start = int(self.tokenizer_max_length) if start is None else int(start)
        ids = lc.image_ids(h // 2, w // 2, start)
        if condition:
            ids = np.concatenate([ids, lc.image_ids(h // 2, w // 2, start, modality=2)])
        tables = (flux.rope_tables(ids, tc.axes_dims_rope), flux.rope_tables(lc.text_ids(text_len), tc.axes_dims_rope))
        return jax.tree.map(self._put_replicated, tables)

    def schedule(self, num_inference_steps: int, image_seq_len: int, sigmas=None):
        """diffusers' schedule: sigmas ``linspace(1, 1/n, n)`` (or given), ``mu`` from the packed length (used where
        the scheduler shifts dynamically)."""
        sc = self.scheduler_config
        if sigmas is None:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        mu = flow_match.calculate_shift(image_seq_len, *(d if v is None else v for v, d in (
            (sc.base_image_seq_len, 256), (sc.max_image_seq_len, 4096), (sc.base_shift, 0.5), (sc.max_shift, 1.15))))
        return flow_match.make_schedule(sc, sigmas=sigmas, mu=mu)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scales, rope, rng) -> (latents,
        sched_state, i + 1, kv)``; ``texts``: (states[, the edit's packed image latents]); ``scales``: (guidance
        scale, cfg_renorm_min, 1 without renorm); ``rope``: the image and text tables; ``kv``: PipeFusion's K/V
        buffers (``warmup``: an exact step) or None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, mesh, backend = self.dtype, self.mesh, self.attention_backend

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scales, rope, rng):
            x = self._model_batch(latents, do_cfg)
            if len(texts) > 1:  # the edit: the image's packed latents after the noisy ones
                x = jnp.concatenate([x, texts[1].astype(x.dtype)], axis=1)
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (x.shape[0],))
            args = (x.astype(dtype), texts[0], t, None, None)
            if kv is None:
                pred = transformer_over_mesh(graphdef, tstate, args, mesh if mesh.size > 1 else None, backend,
                                             rope=rope)
            else:  # PipeFusion: both stacks with the text held whole (FLUX's blocks)
                model = nnx.merge(graphdef, tstate)
                tokens_x, tokens, cond, _ = model.embed(*args, rope=rope)
                tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
                pred = model.head(tokens_x, cond)
            pred = self._real_rows(pred.astype(jnp.float32)[:, :latents.shape[1]], latents.shape[0], do_cfg)
            if do_cfg:  # [negative; prompt]
                neg, pos = jnp.split(pred, 2)
                pred = guided(neg, pos, scales[0], scales[1])
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state, noise)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, guidance_scale: float = 4.5, text_len: int | None = None,
                     condition: bool = False):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it; ``text_len``:
        the text's tokens (default ``tokenizer_max_length``); ``condition``: the edit's image tokens appended (the
        image ids from the text's end)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        do_cfg = guidance_scale > 1.0
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        tc = self.transformer_config
        text_len = int(self.tokenizer_max_length) if text_len is None else int(text_len)
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp: jax.ShapeDtypeStruct(shp, self.dtype, sharding=self._batch_sharding(3, do_cfg))  # noqa
        texts = (sd((n, text_len, tc.joint_attention_dim)),) + ((sd((n,) + shape[1:]),) if condition else ())
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps, shape[1]))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, shape[1] * (2 if condition else 1), abstract=True, text_len=text_len)
        rope = self.rope(height, width, text_len, text_len if condition else None, condition)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched,
            jnp.asarray([guidance_scale, 0.0], jnp.float32), rope, jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float = 4.5, num_images_per_prompt: int = 1, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, enable_cfg_renorm: bool = True, cfg_renorm_min: float = 0.0,
                 enable_prompt_rewrite: bool = False, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> LongCatImagePipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent"), but
        ``enable_prompt_rewrite`` off (True is refused: the module docstring)."""
        if enable_prompt_rewrite:
            raise NotImplementedError("enable_prompt_rewrite=True has Qwen2.5-VL generate a rewritten prompt (up to "
                                      "512 new tokens), which xdit_jax does not run; rewrite the prompt beforehand "
                                      "and pass it with enable_prompt_rewrite=False.")
        if not 0.0 <= cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1] (1 disables the renorm), got {cfg_renorm_min}.")
        return self._generate(prompt, negative_prompt, height=height, width=width,
                              num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                              num_images_per_prompt=num_images_per_prompt, latents=latents,
                              prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                              renorm_min=cfg_renorm_min if enable_cfg_renorm else 1.0, seed=seed,
                              output_type=output_type, progress=progress)

    def _generate(self, prompt, negative_prompt, *, height, width, num_inference_steps, sigmas, guidance_scale,
                  num_images_per_prompt, latents, prompt_embeds, negative_prompt_embeds, renorm_min, seed,
                  output_type, progress, encode=None, condition=None) -> LongCatImagePipelineOutput:
        """The call; ``renorm_min``: cfg_renorm's lower bound (1: no renorm). The edit's hooks: ``encode(prompts) ->
        states`` instead of :meth:`encode_prompt`; ``condition(batch, per, do_cfg, timer)``: the image's packed
        latents placed as the step's batch (then the image ids start at the text's length, as diffusers' edit)."""
        encode = self.encode_prompt if encode is None else encode
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        if sigmas is None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        per = per_prompt(num_images_per_prompt)
        do_cfg = guidance_scale > 1.0
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        tc = self.transformer_config
        timer = StageTimer()

        # 1. text: the Qwen2.5-VL states; [negative; prompt] for CFG
        with timer.stage("text_encoding"):
            emb = self._checked(encode(prompts) if prompt_embeds is None else prompt_embeds, "prompt")
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = encode(negative_prompts(negative_prompt, batch))
                nemb = self._checked(negative_prompt_embeds, "negative_prompt")
                if nemb.shape[0] == 1 and batch > 1:
                    nemb = jnp.repeat(nemb, batch, axis=0)
                if nemb.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {tuple(nemb.shape)} must have the prompt's shape "
                                     f"{tuple(emb.shape)} (both passes run as one batch).")
                emb = jnp.concatenate([nemb, emb])
            texts = (self._put_batch(emb, do_cfg, per),)
            jax.block_until_ready(texts)

        # 2. latents (packed, diffusers' layout), RoPE tables, schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(len(sigmas) if sigmas is not None else num_inference_steps, shape[1], sigmas)
        rng = jax.random.key(seed)
        if latents is None:
            latents = pack_latents(jax.random.normal(rng, (batch * per, tc.in_channels // 4, h, w), jnp.float32))
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, (height/16) x (width/16) tokens, channels x 4")
        texts_len = int(emb.shape[1])
        if condition is not None:  # the edit: the image's tokens after the noisy ones; its ids start at the text's end
            texts = texts + (condition(batch, per, do_cfg, timer),)
        rope = self.rope(height, width, texts_len, texts_len if condition is not None else None, condition is not None)

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scales = self._put_replicated(jnp.asarray([guidance_scale, renorm_min], jnp.float32))
        seq = shape[1] * (2 if condition is not None else 1)
        kv = self._pipefusion_buffers(texts[0].shape[0], seq, text_len=texts_len)
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scales, rope, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn((h, w)), kv=kv)
        return LongCatImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _checked(self, emb, what: str):
        tc = self.transformer_config
        emb = jnp.asarray(emb, self.dtype)
        if emb.ndim != 3 or emb.shape[2] != tc.joint_attention_dim:
            raise ValueError(f"{what} embeddings {tuple(emb.shape)}: this model takes (batch, tokens, "
                             f"{tc.joint_attention_dim}).")
        return emb


# ----------------------------------------------------------------------------------------------- image editing

EDIT_PROMPT_PREFIX = ("<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the "
                      "input image(s). Then, based on the user's editing instructions, clearly and precisely determine "
                      "how to modify the given image(s), ensuring that only the specified parts are altered and all "
                      "other aspects remain consistent with the original(s).<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>")
EDIT_AREA = 1024 * 1024  # diffusers' calculate_dimensions(1024 * 1024, ...)


def edit_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """LongCatImageEditPipeline's ``calculate_dimensions``: (width, height) of aspect ratio ``ratio`` (width / height)
    at about ``target_area`` pixels, each rounded UP to a multiple of 16."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    up = lambda v: int(v if v % 16 == 0 else (v // 16 + 1) * 16)  # noqa: E731
    return up(width), up(height)


class LongCatImageEditPipeline(QwenVision, VaeEncoding, LongCatImagePipeline):
    """Image editing with LongCat-Image-Edit (diffusers' ``LongCatImageEditPipeline``).

        pipe = LongCatImageEditPipeline.from_pretrained("meituan-longcat/LongCat-Image-Edit", mesh="cfg=2,ulysses=4")
        out = pipe(Image.open("cat.png"), "change the cat to dog", guidance_scale=4.5, seed=43)

    As diffusers: the output size is the image's aspect ratio at 1024^2 pixels, each side rounded up to 16
    (:func:`edit_dimensions`); the image resized to it (Lanczos) is VAE-encoded (``latent_dist.mode()``, shifted and
    scaled) and packed, its tokens after the noisy latents' at every step with ids (2, L + row, L + column) (the noisy
    ones (1, L + row, L + column), L the text's length); the prediction keeps the noisy tokens. Qwen2.5-VL sees the
    image at half that size (its processor's resize to multiples of patch x merge) inside the edit template: its
    vision tower's features in place of the ``<|image_pad|>`` tokens, the prompt (quotation-split, padded to 512)
    after it; the states from ``<|vision_start|>`` to the suffix are the text (L = image tokens + 2 + 512). CFG
    ``neg + s (pos - neg)`` with the negative prompt ("" by default) on the same image, no renorm (diffusers' edit has
    none). Everything else is :class:`LongCatImagePipeline`'s (meshes, PipeFusion: the image tokens patched with the
    noisy ones).

    Differences from diffusers, on purpose: Qwen2.5-VL's positions, as :class:`~xdit_jax.pipelines.qwenimage_edit.
    QwenImageEditPipeline`'s: by default the image tokens get the 3-D multimodal RoPE positions (what the model is
    trained with); diffusers 0.42.1 calls transformers 5.23 without ``mm_token_type_ids``, which gives every token the
    position ``0 .. L-1``: ``mrope=False`` reproduces that. Several prompts (each with the same image) are taken
    (diffusers refuses more than one). ``prompt_embeds`` still need the ``image`` (its latents)."""

    PIPELINE_CLASSES = ("LongCatImageEditPipeline",)
    PROCESSOR_FOLDER = "text_processor"  # (diffusers' LongCat-Image-Edit: the Qwen2VLProcessor there)

    def encode_prompt_with_image(self, prompts: list[str], image):
        """(B, L, d) states in the compute dtype of the prompts with the (already resized) image, as diffusers'
        ``encode_prompt`` (``num_images_per_prompt=1``): L = the image's tokens + 2 + ``tokenizer_max_length``."""
        from xdit_jax.models import qwen2_5_vl as qv
        from xdit_jax.models import qwen2_5_vl_vision as vv

        if self.vision is None:
            raise ValueError("This pipeline has no vision tower; load it with from_pretrained.")
        tok, prompts = self.tokenizer, list(prompts)
        encode_vision, encode = self._vision_fns()
        pix, grid = vv.preprocess(image, self.processor_config)
        merge = self.vision.cfg.spatial_merge_size
        count = int(np.prod(grid)) // merge ** 2
        features = encode_vision(pix, vv.vision_layout([grid], self.vision.cfg))
        padded = tok.pad({"input_ids": [prompt_tokens(tok, p, int(self.tokenizer_max_length)) for p in prompts]},
                         max_length=int(self.tokenizer_max_length), padding="max_length", return_attention_mask=True,
                         return_tensors="np")
        prefix = tok(qv.expand_image_tokens(EDIT_PROMPT_PREFIX, [count]), add_special_tokens=False)["input_ids"]
        suffix = tok(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
        start = prefix.index(tok.convert_tokens_to_ids("<|vision_start|>"))
        b = len(prompts)
        ids = np.concatenate([np.tile(np.asarray(prefix, np.int64), (b, 1)), np.asarray(padded["input_ids"], np.int64),
                              np.tile(np.asarray(suffix, np.int64), (b, 1))], axis=1)
        mask = np.concatenate([np.ones((b, len(prefix)), np.int64), np.asarray(padded["attention_mask"], np.int64),
                               np.ones((b, len(suffix)), np.int64)], axis=1)
        image_token_id = tok.convert_tokens_to_ids(qv.IMAGE_PAD)
        feat_idx = qv.image_feature_index(ids, image_token_id, count)
        if self.mrope:
            pos = qv.rope_index(ids, mask, image_token_id, [grid] * b, merge)
        else:
            pos = np.broadcast_to(np.arange(ids.shape[1]), (3,) + ids.shape)
        cos, sin = qv.mrope_cos_sin(pos, self.text_encoder.cfg, self.mrope_section)
        states = encode(ids, mask, features, feat_idx, cos, sin)
        return states[:, start:states.shape[1] - len(suffix)].astype(self.dtype)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None, **kw):
        """:meth:`LongCatImagePipeline.compile_step` of the edit (default output 1024 x 1024): the image's tokens
        appended, the text the image's Qwen2.5-VL tokens (of the half-size image) + 2 + ``tokenizer_max_length``."""
        from xdit_jax.models import qwen2_5_vl_vision as vv

        height = 1024 if height is None else height
        width = 1024 if width is None else width
        pc = self.processor_config
        merge = self.vision.cfg.spatial_merge_size if self.vision is not None else pc.merge_size
        gh, gw = vv.smart_resize(height // 2, width // 2, pc.patch_size * pc.merge_size, pc.min_pixels, pc.max_pixels)
        count = (gh // pc.patch_size) * (gw // pc.patch_size) // merge ** 2
        return super().compile_step(batch, height=height, width=width, condition=True,
                                    text_len=count + 2 + int(self.tokenizer_max_length), **kw)

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float = 4.5, num_images_per_prompt: int = 1, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, image_area: int = EDIT_AREA, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> LongCatImagePipelineOutput:
        """diffusers' LongCatImageEditPipeline call and defaults (``generator`` -> ``seed``). ``image``: a PIL image or
        an (H, W, 3) array (uint8, or floats in [0, 1]); the output size: its aspect ratio at ``image_area`` pixels
        (diffusers' constant 1024^2; the class docstring), or ``height`` x ``width`` where given (multiples of 16;
        diffusers' edit takes no size), the image resized to it."""
        from xdit_jax.pipelines.denoise import preprocess_image
        from xdit_jax.pipelines.qwenimage_edit import _pil, _resize

        if image is None:
            raise ValueError("LongCat-Image-Edit needs the image to edit (image=...).")
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError(f"LongCat-Image-Edit takes one image, got {len(image)}.")
            image = image[0]
        picture = _pil(image)
        if (height is None) != (width is None):
            raise ValueError("Give both height and width, or neither (the image's aspect ratio at image_area).")
        if height is None:
            width, height = edit_dimensions(image_area, picture.size[0] / picture.size[1])
        picture = _resize(picture, width, height)
        small = _resize(picture, width // 2, height // 2)  # what Qwen2.5-VL sees
        pixels = preprocess_image(picture, height, width)

        def condition(batch, per, do_cfg, timer):
            with timer.stage("image_encoding"):
                packed = pack_latents(self.image_latents(pixels))  # (1, tokens, 4C)
                rows = jnp.repeat(packed, batch * per, axis=0)
                placed = self._put_batch(jnp.concatenate([rows, rows]) if do_cfg else rows, do_cfg)
                jax.block_until_ready(placed)
            return placed

        return self._generate(prompt, negative_prompt, height=height, width=width,
                              num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                              num_images_per_prompt=num_images_per_prompt, latents=latents,
                              prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                              renorm_min=1.0, seed=seed, output_type=output_type, progress=progress,
                              encode=lambda p: self.encode_prompt_with_image(p, small), condition=condition)
