"""Z-Image text-to-image (Tongyi-MAI/Z-Image-Turbo), diffusers' ``ZImagePipeline`` on a JAX mesh.

    pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", mesh="ulysses=4", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", num_inference_steps=9, guidance_scale=0.0, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: each prompt in Qwen3's chat template, ``hidden_states[-2]`` of the Qwen3 encoder, each prompt's kept
(unpadded) tokens only (:func:`xdit_jax.models.qwen3.prompt_embeds`: here a padded array with the counts, the
caption array cropped to the batch's longest prompt rounded up to 32 tokens, so a short prompt costs what it costs
diffusers); latents (B, 16, H / 8, W / 8) (H, W multiples of 16); sigmas ``linspace(1, 1/n, n)`` shifted by the
scheduler (``shift``, or ``mu`` from the image tokens where it shifts dynamically), the transformer fed
``(1000 - t) / 1000`` and its output negated into the Euler step; CFG when ``guidance_scale > 0`` as
``pos + g (pos - neg)`` (the negative prompt "" by default), ``cfg_normalization`` (the guided prediction's norm
capped at that multiple of the positive one's, per sample) and ``cfg_truncation`` (no guidance on steps whose
``(1000 - t) / 1000`` exceeds it); the VAE (FLUX's 16-channel ``AutoencoderKL``) decodes ``latents /
scaling_factor + shift_factor``. Z-Image-Turbo: 9 steps at guidance 0 (its model card; the call's defaults are
diffusers', 50 steps at guidance 5).

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the image tokens over ``ring`` x ``ulysses`` (the
caption joins the main layers' attention as the masked context, sharded with them:
:data:`xdit_jax.models.zimage.TEXT_KEYS`), PipeFusion over the noise refiner then the main layers (both stacks over
all stages, looped: :func:`xdit_jax.models.zimage.pipefusion_stacks`; the caption sliced with the patches, its mask
whole). The CFG step runs both halves on every step (one program); on the steps
``cfg_truncation`` leaves unguided its scale is 0, which gives diffusers' positive-only prediction exactly.

Not supported: a ``generator`` (``seed`` instead); output types other than "np" and "latent".
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import qwen3, vae_kl, zimage
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, VaeEncoding, forward_call, vae_scale_factor
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

ZImagePipelineOutput = ImagePipelineOutput
DEFAULTS = {"height": 1024, "width": 1024}


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, zimage.ZImageConfig)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' default: 1024 x 1024."""
    return dict(DEFAULTS)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 0.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    from xdit_jax.mesh import MeshSpec

    if MeshSpec.parse(mesh_spec).cfg == 2 and guidance_scale <= 0:
        raise ValueError("Mesh cfg=2 splits the two halves of classifier-free guidance, which Z-Image runs only with "
                         "guidance_scale > 0 (Z-Image-Turbo: 0, no CFG); drop cfg=2 or raise the guidance scale.")
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), zimage.pipefusion_stacks(tc)["stacked_layers"], batch,
                        mesh_spec, 2.0)


def _as_caption(embeds, what: str, dim: int):
    """diffusers' list of per-prompt (L_i, dim) features, or (padded (B, L, dim), counts (B,)) -> the latter."""
    if isinstance(embeds, tuple) and len(embeds) == 2:
        feats, lens = np.asarray(embeds[0], np.float32), np.asarray(embeds[1], np.int32)
    else:
        embeds = list(embeds)
        if not embeds or any(np.ndim(e) != 2 for e in embeds):
            raise ValueError(f"{what} must be a list of (tokens, {dim}) arrays, one per prompt (diffusers' "
                             "layout), or a (padded (batch, tokens, dim), counts (batch,)) pair.")
        feats, lens = zimage.pad_caption_list(embeds)
    if feats.ndim != 3 or feats.shape[2] != dim or lens.shape != (feats.shape[0],) or (lens < 1).any() or \
            (lens > feats.shape[1]).any():
        raise ValueError(f"{what}: features {feats.shape} with counts {lens.tolist()}: this model takes (batch, "
                         f"tokens, {dim}) with 1 <= count <= tokens.")
    return feats, lens


class ZImagePipeline(ImagePipelineBase):
    """Text-to-image with Z-Image — see the module docstring."""

    PIPELINE_CLASSES = ("ZImagePipeline",)
    CONFIG = zimage.ZImageConfig
    stacks = staticmethod(zimage.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size()

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """diffusers' (B, in_channels, 2 (H // 16), 2 (W // 16))."""
        s = 2 * vae_scale_factor(self.vae_config)
        return (batch, self.transformer_config.in_channels, 2 * (height // s), 2 * (width // s))

    def _qwen_fn(self):
        """``fn(ids, mask) -> hidden_states[-2]`` of the Qwen3 encoder (only the layers it needs), jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "qwen3" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_state(
                ids, mask, qwen3.HIDDEN_STATE_INDEX))
            fns["qwen3"] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                                 self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns["qwen3"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512):
        """(caption features (B, max n_i, cap_feat_dim), kept-token counts (B,)) as diffusers' ``_encode_prompt``."""
        return qwen3.prompt_embeds(self.tokenizer, self.text_encoder, prompts, max_sequence_length,
                                   encode=self._qwen_fn())

    def schedule(self, num_inference_steps: int, image_seq_len: int, sigmas=None):
        """diffusers' ZImagePipeline schedule: sigmas linspace(1, 1/n, n) (or the caller's), mu from the image tokens
        (used where the scheduler shifts dynamically)."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps, dtype=np.float32)
        cfg = self.scheduler_config
        mu = cfg.mu(image_seq_len) if cfg.use_dynamic_shifting else None
        return flow_match.make_schedule(cfg, sigmas=sigmas, mu=mu)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng)``; ``texts``:
        (caption features, counts), a row each ([prompt; negative] for CFG); ``guidance``: (per-step guidance scale
        (steps,), cfg_normalization) float32."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            del rng
            texts, kept = flow_match.split_kept(texts)  # (inpainting's kept region)
            model = nnx.merge(graphdef, tstate)
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(self._model_timestep(sched.timesteps[i]), (x.shape[0],)).astype(jnp.float32)
            h, tokens, cond = model.embed(x.astype(dtype), t, texts[0], texts[1])
            h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond, kv, warmup)
            pred = model.head(h, cond, x.shape).astype(jnp.float32)
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:
                pos, neg = jnp.split(pred, 2)
                pred = self._guided(pos, neg, guidance[0][i], guidance[1])
            latents, sched_state = flow_match.step(sched, i, -pred, latents, sched_state)
            if kept is not None:  # inpainting: outside the mask, the image at the next sigma
                latents = kept.apply(sched, i, latents)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    CFG_ABOVE = 0.0  # CFG runs where guidance_scale > this

    def _check_request(self, height, width, batch, guidance_scale):
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)

    @staticmethod
    def _model_timestep(t):
        """The transformer's timestep for the scheduler's ``t``: diffusers' ``(1000 - t) / 1000``."""
        return (1000.0 - t) / 1000.0

    @staticmethod
    def _guided(pos, neg, g, norm):
        """The guided prediction of a step: ``pos + g (pos - neg)``, its norm per sample capped at ``norm`` x the
        positive one's (``norm`` > 0: cfg_normalization); ``g`` 0 (cfg_truncation's unguided steps): ``pos``."""
        guided = pos + g * (pos - neg)
        axes = tuple(range(1, pos.ndim))
        pos_n = jnp.sqrt(jnp.sum(jnp.square(pos), axis=axes, keepdims=True))
        new_n = jnp.sqrt(jnp.sum(jnp.square(guided), axis=axes, keepdims=True))
        cap = pos_n * norm
        capped = jnp.where(new_n > cap, guided * (cap / new_n), guided)
        guided = jnp.where(norm > 0, capped, guided)
        return jnp.where(g > 0, guided, pos)

    def _unguided_steps(self, g, texts, do_cfg: bool, kv):
        """``step_for`` of :meth:`_denoise`: on the steps that CFG's truncation leaves unguided (scale 0), the step
        of the prompt's half alone, as diffusers runs them (the negative half's pass skipped: half the work of those
        steps). Only where the two halves would run one after the other: a ``cfg=2`` mesh runs them side by side
        (nothing to save in time), and PipeFusion's K/V buffers hold both halves. None where nothing is skipped."""
        unguided = set(np.flatnonzero(np.asarray(g) == 0).tolist()) if do_cfg else set()
        if not unguided or kv is not None or self.mesh_spec.cfg > 1:
            return None
        rows = texts[0].shape[0] // 2  # [prompt; negative], each half padded alike (_put_batch)
        texts, kept = flow_match.split_kept(texts)  # (the kept region: the latents' rows, not the CFG batch's)
        prompt_texts = tuple(jax.device_put(t[:rows], self._batch_sharding(t.ndim, False)) for t in texts)
        prompt_texts += () if kept is None else (kept,)
        plain = self._step_fn(False)

        def prompt_only(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            return plain(tstate, latents, sched_state, i, kv, prompt_texts, sched, guidance, rng)

        return lambda n: prompt_only if n in unguided else None

    @staticmethod
    def _image_token_count(n: int) -> int:
        """The transformer's image tokens for ``n`` patches: Z-Image pads them to a multiple of 32."""
        return zimage.ceil_to(n)

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of ``latents / scaling_factor + shift_factor`` -> (B, H, W, 3)."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, **kw):
            return vae_kl.decode(vae, vae_kl.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 9, guidance_scale: float = 0.0, caption_tokens: int = 512):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it
        (``guidance_scale > 0``: the CFG step); ``caption_tokens``: the caption array's length (rounded up to 32)."""
        ds = self.default_size()
        height, width = (ds[k] if v is None else v for k, v in (("height", height), ("width", width)))
        do_cfg = guidance_scale > self.CFG_ABOVE
        tc = self.transformer_config
        self._check_request(height, width, batch, guidance_scale)
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        lc = zimage.ceil_to(caption_tokens)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, lc, tc.cap_feat_dim), self.dtype), sd((n,), jnp.int32))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps, (shape[2] // 2) * (shape[3] // 2)))
        guidance = (jnp.zeros((num_inference_steps,), jnp.float32), jnp.float32(0.0))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._image_token_count((shape[2] // 2) * (shape[3] // 2)), abstract=True,
                                      text_len=lc)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, guidance,
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, sigmas=None, guidance_scale: float = 5.0,
                 cfg_normalization: bool | float = False, cfg_truncation: float | None = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True, _init=None) -> ZImagePipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent");
        ``prompt_embeds`` / ``negative_prompt_embeds``: diffusers' lists of per-prompt (tokens, cap_feat_dim)
        arrays, or (padded array, counts) pairs. ``_init(sched, latents, batch, per, rng, timer)``: image-to-image's /
        inpainting's start (:class:`ZImageImg2ImgPipeline`)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        # (a list of per-prompt arrays of different lengths has no numpy shape: its length counts the prompts)
        counted = None if prompt_embeds is None else (
            prompt_embeds[0] if isinstance(prompt_embeds, tuple) else np.zeros((len(prompt_embeds), 0)))
        prompts, batch = prompt_batch(prompt, counted, output_type)
        per = per_prompt(num_images_per_prompt)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        do_cfg = guidance_scale > 0
        if prompt_embeds is not None and do_cfg and negative_prompt_embeds is None:
            raise ValueError("When `prompt_embeds` is provided without `prompt`, `negative_prompt_embeds` must also "
                             "be provided for classifier-free guidance (as diffusers).")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        tc = self.transformer_config
        timer = StageTimer()

        # 1. text: the kept Qwen3 tokens of each prompt; [prompt; negative] for CFG, one caption length (x 32)
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
            caps = [_as_caption(prompt_embeds, "prompt_embeds", tc.cap_feat_dim)]
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                max_sequence_length)
                caps.append(_as_caption(negative_prompt_embeds, "negative_prompt_embeds", tc.cap_feat_dim))
                if caps[1][0].shape[0] != batch:
                    raise ValueError(f"negative_prompt_embeds has {caps[1][0].shape[0]} entries for {batch} prompts.")
            if caps[0][0].shape[0] != batch:
                raise ValueError(f"prompt_embeds has {caps[0][0].shape[0]} entries for {batch} prompts.")
            length = zimage.ceil_to(max(int(c[1].max()) for c in caps))
            feats = np.concatenate([np.pad(f[:, :length], ((0, 0), (0, length - min(f.shape[1], length)), (0, 0)))
                                    for f, _ in caps])
            lens = np.concatenate([c[1] for c in caps])
            texts = (self._put_batch(jnp.asarray(feats, self.dtype), do_cfg, per),
                     self._put_batch(jnp.asarray(lens, jnp.int32), do_cfg, per))
            jax.block_until_ready(texts)

        def per_step(timesteps):
            g = np.full((len(timesteps),), guidance_scale, np.float32)
            if do_cfg and cfg_truncation is not None and float(cfg_truncation) <= 1:
                t_norm = (1000.0 - np.asarray(timesteps, np.float32)) / 1000.0
                g = np.where(t_norm > float(cfg_truncation), 0.0, g).astype(np.float32)
            return g, float(cfg_normalization) if cfg_normalization else 0.0

        init = None if _init is None else (lambda sched, given, rng, timer: _init(sched, given, batch, per, rng, timer))
        return self._generate(timer, texts, length, batch * per, do_cfg, height, width, num_inference_steps, sigmas,
                              per_step, latents, seed, output_type, progress, init)

    def _generate(self, timer, texts, length, batch, do_cfg, height, width, num_inference_steps, sigmas, per_step,
                  latents, seed, output_type, progress, init=None):
        """From the placed ``texts`` (caption features, counts) of caption ``length``: latents (diffusers' layout),
        schedule, guidance per step (``per_step(timesteps) -> (scale per step, normalization)``), the jitted steps,
        then the VAE."""
        shape = self.latent_shape(batch, height, width)
        sched = self.schedule(num_inference_steps, (shape[2] // 2) * (shape[3] // 2), sigmas)
        rng = jax.random.key(seed)
        if init is not None:  # (image-to-image; inpainting adds its kept region, a step input)
            sched, latents, *kept = init(sched, latents, rng, timer)
            texts = texts + tuple(kept)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, channels, 2 (height // 16), 2 (width // 16)")
        g, norm = per_step(sched.timesteps)
        guidance = (self._put_replicated(jnp.asarray(g, jnp.float32)), self._put_replicated(jnp.float32(norm)))

        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        kv = self._pipefusion_buffers(texts[0].shape[0], self._image_token_count((shape[2] // 2) * (shape[3] // 2)),
                                      text_len=length)
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, guidance, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv,
                                       step_for=self._unguided_steps(g, texts, do_cfg, kv))
        return ZImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


def _image_size(image, height, width, multiple: int) -> tuple[int, int]:
    """diffusers' Z-Image image-to-image / inpainting size: the given one, else the (first) image's, each side floored
    to ``multiple`` (its image processor's ``preprocess(image)``)."""
    from xdit_jax.pipelines.denoise import rgb_image

    if image is None or (isinstance(image, (list, tuple)) and not image):
        return height, width  # (the start hook refuses it)
    first = rgb_image(image[0] if isinstance(image, (list, tuple)) else image)
    ih, iw = (first.height, first.width) if hasattr(first, "height") else first.shape[:2]
    return (ih - ih % multiple if height is None else height), (iw - iw % multiple if width is None else width)


class ZImageImg2ImgPipeline(VaeEncoding, ZImagePipeline):
    """Image-to-image with Z-Image (diffusers' ``ZImageImg2ImgPipeline``) on a Z-Image folder: the image VAE-encoded (a
    sample of the posterior) and noised to where the last ``strength`` of the schedule starts, only those steps run;
    the rest is :class:`ZImagePipeline`'s (the jitted step, CFG with its truncation / normalization, meshes,
    PipeFusion). The size defaults to the image's (floored to 16), as diffusers'.

    Known differences: the draws are JAX draws from ``seed``; an image of another size than ``height`` x ``width`` is
    resized to it (diffusers encodes it at its own size and fails on the mismatch); several images, one per prompt,
    pair with their own prompt's samples."""

    PIPELINE_CLASSES = ("ZImageImg2ImgPipeline", "ZImagePipeline", "ZImageInpaintPipeline")

    def __call__(self, prompt: str | list[str] | None = None, *, image=None, strength: float = 0.6,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float = 5.0, cfg_normalization: bool | float = False,
                 cfg_truncation: float | None = 1.0, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 max_sequence_length: int = 512, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> ZImagePipelineOutput:
        """diffusers' ZImageImg2ImgPipeline call and defaults (``generator`` -> ``seed``; strength 0.6). ``image``: a
        PIL image or an (H, W, 3) array (uint8, or floats in [0, 1]), or one per prompt; ``latents``: the initial
        latents, used as given (no image noised)."""
        height, width = _image_size(image, height, width, 2 * vae_scale_factor(self.vae_config))
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init = self.img2img_init(image, height, width, n, strength)
        return forward_call(ZImagePipeline.__call__, self, locals(), _init=init)


class ZImageInpaintPipeline(VaeEncoding, ZImagePipeline):
    """Inpainting with Z-Image (diffusers' ``ZImageInpaintPipeline``) on a Z-Image folder: image-to-image's start and,
    inside the jitted step after each update, the region outside ``mask_image`` (white: repaint, black: keep; resized
    and binarized as diffusers' mask processor, sampled onto the latent grid) set to the image's latents noised to the
    next sigma. ``strength`` defaults to 1 (diffusers'); the size to the image's (floored to 16).

    Known differences: :class:`ZImageImg2ImgPipeline`'s; ``masked_image_latents`` (which Z-Image's inpainting step
    does not use) is refused; given ``latents`` serve as both the initial latents and the kept region's noise (no
    noise drawn, as diffusers' FLUX.1 inpainting; diffusers' Z-Image draws a fresh noise for the kept region);
    ``padding_mask_crop`` as the other inpainting pipelines (:mod:`xdit_jax.pipelines.mask_crop`; diffusers' Z-Image
    has none)."""

    PIPELINE_CLASSES = ("ZImageInpaintPipeline", "ZImagePipeline", "ZImageImg2ImgPipeline")

    def __call__(self, prompt: str | list[str] | None = None, *, image=None, mask_image=None,
                 masked_image_latents=None, strength: float = 1.0, height: int | None = None,
                 width: int | None = None, padding_mask_crop: int | None = None, num_inference_steps: int = 50,
                 sigmas=None, guidance_scale: float = 5.0, cfg_normalization: bool | float = False,
                 cfg_truncation: float | None = 1.0, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 max_sequence_length: int = 512, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> ZImagePipelineOutput:
        """diffusers' ZImageInpaintPipeline call and defaults (``generator`` -> ``seed``; strength 1). ``image`` as
        :class:`ZImageImg2ImgPipeline`'s, ``mask_image`` a PIL image or an (H, W) array at the output size."""
        if masked_image_latents is not None:
            raise NotImplementedError("masked_image_latents is not supported here: give the image and its mask.")
        height, width = _image_size(image, height, width, 2 * vae_scale_factor(self.vae_config))
        n = len(sigmas) if sigmas is not None else num_inference_steps
        height, width, init, finish = self.inpaint_init(image, mask_image, height, width, n, strength,
                                                        vae_scale_factor(self.vae_config),
                                                        padding_mask_crop=padding_mask_crop)
        return finish(forward_call(ZImagePipeline.__call__, self, locals(), _init=init), output_type)
