"""LTX-Video's condition pipeline (0.9.5+), diffusers' ``LTXConditionPipeline`` on a mesh.

    pipe = LTXConditionPipeline.from_pretrained("/models/LTX-Video-0.9.5", mesh="cfg=2,ulysses=4")
    out = pipe(conditions=[LTXVideoCondition(image=first, frame_index=0),
                           LTXVideoCondition(video=clip, frame_index=80)], prompt="...", num_frames=161)
    out = pipe(image=first, prompt="...")            # the shortcuts: image= / video= with frame_index=, strength=

What it does, as diffusers does:

- Each condition (an image, or a video trimmed to ``8k + 1`` frames that fit from its ``frame_index``) is encoded
  by the VAE's encoder (the posterior sampled with a JAX key) and normalized by the latents' statistics.
- At ``frame_index`` 0 its latent frames are blended into the first latent frames of the noise
  (``lerp(noise, condition, strength)``) and those frames' conditioning mask is ``strength``. Elsewhere its (first
  two, for a video) latent frames become extra tokens placed before the video's (``lerp`` with fresh noise by
  ``strength``; their own RoPE coordinates: frame ``8 f - 7`` clamped at 0, plus ``frame_index``), a longer
  video's later latent frames blended into the video's latent frames from ``frame_index // 8 + 2``.
- RoPE from diffusers' ``video_coords``: pixel coordinates (frame ``8 f - 7`` clamped at 0, over the frame rate;
  rows and columns times 32), for every token.
- Timesteps: the linear-quadratic sigmas of LTX-Video (``timesteps = sigmas * 1000``, the scheduler's own
  shifting / ``shift_terminal`` on the sigmas: the 0.9.5+ scheduler config without dynamic shifting; a config with
  ``use_dynamic_shifting`` is refused, as diffusers' ``set_timesteps`` refuses it without ``mu``). Per token the
  timestep is ``min(t, (1 - mask) * 1000)`` and the Euler step goes from that token's sigma to the next schedule
  sigma below it (the scheduler's ``per_token_timesteps``); only the tokens with ``t / 1000 - 1e-6 < 1 - mask``
  are updated (a strength-1 condition is never denoised).
- ``image_cond_noise_scale``: before each step the fully conditioned tokens (mask 1) are reset to their initial
  latents plus ``scale * noise * (t / 1000) ** 2`` (the noise drawn from the call's seed inside the step).
- ``denoise_strength`` < 1 with ``latents`` (the video to edit, diffusers' unpacked layout): the schedule starts
  later and the latents are mixed with the noise at its first sigma. (diffusers ignores ``latents`` at strength 1;
  so does this pipeline, with a warning.)
- The extra condition tokens are dropped before the decode (``decode_timestep`` / ``decode_noise_scale`` as
  :class:`~xdit_jax.pipelines.ltx.LTXPipeline`).

The mesh: the distinct per-token timesteps (one per condition, and the free tokens') are a small (B, K) table the
transformer embeds, each token carrying its group index (:mod:`xdit_jax.models.ltx`); the groups, coordinates,
strengths and initial latents are inputs of the one jitted step, whose shapes depend only on the request (the
token count, the number of conditions). Sequence parallelism (ulysses, ring) and CFG over ``cfg`` as the other LTX
pipelines; PipeFusion too (the groups and coordinates travel with each patch).

The random draws are JAX's from ``seed`` (:func:`noise`): the initial noise, each condition's posterior sample and
its extra tokens' noise, the per-step image-condition noise, the decode noise. diffusers draws torch's; the tests
hand it ours.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.pipelines.denoise import (
    StageTimer,
    masked_text_for_cfg,
    peak_memory_bytes,
    per_prompt,
    preprocess_image,
    prompt_batch,
)
from xdit_jax.pipelines.ltx import LTXImageToVideoPipeline, LTXPipelineOutput, pack
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

PREFIX_LATENT_FRAMES = 2  # diffusers' num_prefix_latent_frames: a later video condition's appended latent frames
# fold_in offsets of the call's key for each kind of draw (the decode noise: LTXPipeline's 1 << 20)
_DRAWS = {"posterior": 1 << 21, "condition": 1 << 22, "image_cond": 1 << 23}


def noise(seed_or_key, kind: str, index: int, shape) -> jax.Array:
    """The pipeline's standard normal draw of ``kind`` ("initial", "posterior" (per condition), "condition" (an
    appended condition's lerp noise, per condition), "image_cond" (per step)) for ``seed``, float32."""
    key = jax.random.key(seed_or_key) if isinstance(seed_or_key, (int, np.integer)) else seed_or_key
    if kind != "initial":
        key = jax.random.fold_in(key, _DRAWS[kind] + index)
    return jax.random.normal(key, tuple(shape), jnp.float32)


def lerp(a, b, w):
    """torch.lerp's formula (exact at ``w`` = 1: ``b``)."""
    return jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


@dataclasses.dataclass
class LTXVideoCondition:
    """diffusers' ``LTXVideoCondition``: an ``image`` (PIL or (H, W, 3)) or a ``video`` (a list of frames or an
    array (F, H, W, 3)), the pixel ``frame_index`` it conditions, its ``strength`` (1: kept as given)."""

    image: Any = None
    video: Any = None
    frame_index: int = 0
    strength: float = 1.0


def condition_schedule(num_inference_steps: int) -> np.ndarray:
    """diffusers' ``pipeline_ltx_condition.linear_quadratic_schedule`` times 1000: the timesteps (float32)."""
    sig = np.asarray([1.0]) if num_inference_steps < 2 else flow_match.linear_quadratic_schedule(num_inference_steps)
    return sig.astype(np.float32) * np.float32(1000.0)


def video_coords(frames: int, rows: int, cols: int, spatial: int, temporal: int, frame_index: int,
                 frame_rate: float) -> np.ndarray:
    """diffusers' ``_prepare_video_ids`` + ``_scale_video_ids`` and the pipeline's division of the frame by the
    frame rate (patch size 1): (3, frames * rows * cols) float32."""
    f, h, w = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(cols), indexing="ij")
    ft = np.maximum(f.reshape(-1) * temporal + 1 - temporal, 0) + frame_index
    c = np.stack([ft, h.reshape(-1) * spatial, w.reshape(-1) * spatial]).astype(np.float32)
    c[0] = c[0] * np.float32(1.0 / frame_rate)
    return c


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each condition goes: ``blends`` (condition, its first latent frame, the video's latent frames
    [start, end)), ``extras`` (condition, appended latent frames, frame_index) in token order, the per-token group
    (S_total,), the coordinates (3, S_total) and the extra token count."""

    blends: tuple
    extras: tuple
    group: np.ndarray
    coords: np.ndarray
    n_extra: int


def condition_layout(grid, conds, spatial: int, temporal: int, frame_rate: float) -> Layout:
    """The token layout of ``conds`` ((frame_index, latent frames) each, in order) on the latent ``grid`` (F, h, w),
    as diffusers' ``prepare_latents`` builds it; clear errors where diffusers would fail or cut silently."""
    F, h, w = grid
    frame_group = np.zeros(F, np.int32)
    blends, extras = [], []
    for j, (fi, n) in enumerate(conds):
        if fi == 0:
            if n > F:
                raise ValueError(f"condition {j}: {n} latent frames at frame 0 exceed the video's {F}.")
            blends.append((j, 0, 0, n))
            frame_group[:n] = j + 1
            continue
        keep = n
        if n > 1:  # a video (more than one latent frame)
            if n < PREFIX_LATENT_FRAMES:
                raise ValueError(f"condition {j}: a video at frame_index {fi} needs at least {PREFIX_LATENT_FRAMES} "
                                 f"latent frames, got {n}.")
            if n > PREFIX_LATENT_FRAMES:
                start = fi // temporal + PREFIX_LATENT_FRAMES
                end = start + n - PREFIX_LATENT_FRAMES
                if end > F:
                    raise ValueError(f"condition {j}: its latent frames {PREFIX_LATENT_FRAMES}..{n - 1} would go to "
                                     f"the video's latent frames {start}..{end - 1}; the video has {F}.")
                blends.append((j, PREFIX_LATENT_FRAMES, start, end))
                frame_group[start:end] = j + 1
                keep = PREFIX_LATENT_FRAMES
        extras.append((j, keep, fi))
    groups, coords = [], []
    for j, keep, fi in extras:
        groups.append(np.full(keep * h * w, j + 1, np.int32))
        coords.append(video_coords(keep, h, w, spatial, temporal, fi, frame_rate))
    groups.append(np.repeat(frame_group, h * w))
    coords.append(video_coords(F, h, w, spatial, temporal, 0, frame_rate))
    n_extra = sum(keep for _, keep, _ in extras) * h * w
    return Layout(tuple(blends), tuple(extras), np.concatenate(groups), np.concatenate(coords, axis=1), n_extra)


class LTXConditionPipeline(LTXImageToVideoPipeline):
    """Text / image / video-to-video with LTX-Video 0.9.5+ — see the module docstring."""

    PIPELINE_CLASSES = ("LTXConditionPipeline", "LTXPipeline", "LTXImageToVideoPipeline")
    _conditioned = False  # (the step's variant: set per call, part of the step cache's key)

    def _check_condition_ready(self):
        sc = self.scheduler_config
        if sc.use_dynamic_shifting:
            raise ValueError("LTXConditionPipeline: the folder's scheduler has use_dynamic_shifting=True (LTX-Video "
                             "0.9.0 / 0.9.1); diffusers' condition pipeline calls set_timesteps without mu, which "
                             "refuses that. Use a 0.9.5+ folder (no dynamic shifting), or LTXPipeline / "
                             "LTXImageToVideoPipeline for this one.")
        if sc.stochastic_sampling:
            raise NotImplementedError("LTXConditionPipeline: a scheduler with stochastic_sampling=True is not "
                                      "supported here (no LTX-Video checkpoint ships one); use the plain Euler config.")

    def default_video(self) -> dict:
        """diffusers' LTXConditionPipeline defaults: 512 x 704, 161 frames at 25 fps."""
        return {"height": 512, "width": 704, "num_frames": 161, "fps": 25}

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256):
        """((B, L, d) T5 embeddings, (B, L) mask): unlike LTXPipeline's, diffusers' condition pipeline runs T5 with
        the attention mask."""
        from xdit_jax.pipelines.denoise import tokenize

        ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        return self._text_encoder_fn()(ids, mask).astype(self.dtype), mask

    # ------------------------------------------------------------------ the step

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng, cond)``;
        ``texts``: (T5 embeds, mask); ``cond``: {"coords" (3, S), "group" (S,), "strengths" (K,), "init" (B, S, C),
        "noise_scale" ()}, with K > 1 the conditioned path (``self._conditioned``)."""
        conditioned = self._conditioned
        key = ("ltx-condition", do_cfg, warmup, conditioned)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        n_train = float(self.scheduler_config.num_train_timesteps)

        def blocks(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng, cond):
            from xdit_jax.pipelines.hunyuandit import rescale_guidance

            model = nnx.merge(graphdef, tstate)
            emb, mask = texts
            t = sched.timesteps[i]
            strengths, group = cond["strengths"], cond["group"]
            token_strength = strengths[group][None, :, None]  # (1, S, 1)
            if conditioned:  # diffusers' add_noise_to_image_conditioning_latents
                tt = t / 1000.0
                noised = cond["init"] + cond["noise_scale"] * noise(rng, "image_cond", i, latents.shape) * (tt * tt)
                hard = (token_strength > np.float32(1.0 - 1e-6)) & (cond["noise_scale"] > 0)
                latents = jnp.where(hard, noised, latents)
            x = self._model_batch(latents, do_cfg)
            group_t = jnp.minimum(t, (1.0 - strengths) * 1000.0)  # (K,): min(t, (1 - mask) * 1000) per group
            gt = jnp.broadcast_to(group_t[None], (x.shape[0], group_t.shape[0]))
            h, tokens, cond_m = model.embed(x.astype(dtype), emb, t, mask, 0, 0, 0, video_coords=cond["coords"],
                                            group_timesteps=gt, token_group=group)
            h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond_m, kv, warmup)
            pred = model.head(h, cond_m, x.shape, tokens).astype(jnp.float32)
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:
                scale, rescale = guidance[0], guidance[1]
                uncond, text = jnp.split(pred, 2)
                pred = uncond + scale * (text - uncond)
                pred = jnp.where(rescale > 0, rescale_guidance(pred, text, rescale), pred)
            # the scheduler's per_token_timesteps: from each token's sigma to the next schedule sigma below it
            cur = group_t / n_train
            sig = sched.sigmas
            nxt = jnp.max(jnp.where(sig[:, None] < cur[None] - 1e-6, sig[:, None], 0.0), axis=0)
            dt = (cur - nxt)[group][None, :, None]
            new = latents + dt * (-pred)
            if conditioned:  # only the tokens still to denoise
                todo = (t / 1000.0 - 1e-6 < (1.0 - strengths))[group][None, :, None]
                new = jnp.where(todo, new, latents)
            return self._step_out(new, sched_state, i, kv)

        return self._jit_step(key, step)

    # ------------------------------------------------------------------ conditions

    def _posterior(self, pixels, rng, index: int):
        """The VAE posterior of ``pixels`` (1, 3, F, H, W) in [-1, 1] sampled with :func:`noise` ("posterior",
        ``index``) and normalized -> (1, C, f, h, w) float32."""
        return self._sample_posterior(pixels, jax.random.fold_in(rng, _DRAWS["posterior"] + index))

    def _condition_pixels(self, c: LTXVideoCondition, index: int, height: int, width: int, num_frames: int):
        """One condition's pixels (1, 3, F, H, W) in [-1, 1] (a video trimmed as diffusers'
        ``trim_conditioning_sequence``)."""
        st = self.vae_config.temporal_ratio
        self._check_condition(c, index, num_frames)
        if c.image is not None:
            return preprocess_image(c.image, height, width)[:, :, None]
        frames = list(c.video) if not hasattr(c.video, "ndim") else [f for f in np.asarray(c.video)]
        if not frames:
            raise ValueError(f"condition {index}: the video has no frames.")
        n = min(len(frames), num_frames - c.frame_index)
        n = (n - 1) // st * st + 1
        pix = jnp.stack([preprocess_image(f, height, width)[0] for f in frames[:n]], axis=1)[None]
        return pix  # (1, 3, n, H, W)

    @staticmethod
    def _check_condition(c: LTXVideoCondition, index: int, num_frames: int) -> None:
        if not 0 <= c.frame_index < num_frames:
            raise ValueError(f"condition {index}: frame_index {c.frame_index} is outside the video's {num_frames} "
                             "frames.")
        if not 0.0 <= c.strength <= 1.0:
            raise ValueError(f"condition {index}: strength must be in [0, 1], got {c.strength}.")
        if (c.image is None) == (c.video is None):
            raise ValueError(f"condition {index}: give exactly one of image / video.")

    @staticmethod
    def _gather_conditions(conditions, image, video, frame_index, strength) -> list[LTXVideoCondition]:
        """diffusers' ``conditions`` or the ``image`` / ``video`` shortcuts -> a list of conditions."""
        if conditions is not None:
            if image is not None or video is not None:
                raise ValueError("If `conditions` is provided, `image` and `video` must not be provided.")
            return list(conditions) if isinstance(conditions, (list, tuple)) else [conditions]
        if image is None and video is None:
            return []
        if image is not None and video is not None:
            raise ValueError("Give image= or video= (or several in conditions=[LTXVideoCondition(...), ...]).")
        if image is not None:
            items, kind = (list(image) if isinstance(image, list) else [image]), "image"
        else:  # one video (a list of frames / an (F, H, W, 3) array) or a list of videos
            one = not isinstance(video, list) or not video or not isinstance(video[0], (list, tuple)) and \
                not (hasattr(video[0], "ndim") and np.ndim(video[0]) == 4)
            items, kind = ([video] if one else list(video)), "video"
        fis = frame_index if isinstance(frame_index, list) else [frame_index] * len(items)
        sts = strength if isinstance(strength, list) else [strength] * len(items)
        if len(fis) != len(items) or len(sts) != len(items):
            raise ValueError(f"If `conditions` is not provided, `{kind}`, `frame_index` and `strength` must be of the "
                             "same length.")
        return [LTXVideoCondition(**{kind: it}, frame_index=int(fi), strength=float(s))
                for it, fi, s in zip(items, fis, sts)]

    def prepare_latents(self, conds, batch: int, height: int, width: int, num_frames: int, frame_rate: float, rng,
                        latents=None, sigma=None):
        """diffusers' ``prepare_latents``: -> (packed latents (B, S, C) with the extra tokens first, the layout,
        the strengths (K,) float32)."""
        vc, tc = self.vae_config, self.transformer_config
        grid = self.latent_grid(height, width, num_frames)
        shape = (batch, tc.in_channels, grid[0], grid[1], grid[2])
        z = noise(rng, "initial", 0, shape)
        if latents is not None and sigma is not None:
            lat = jnp.asarray(latents, jnp.float32)
            if lat.shape != shape:
                raise ValueError(f"Latents shape {tuple(lat.shape)} does not match expected shape {shape} (batch, "
                                 "channels, latent frames, rows, columns).")
            z = sigma * z + (1 - sigma) * lat
        encoded = [self._posterior(self._condition_pixels(c, j, height, width, num_frames), rng, j)
                   for j, c in enumerate(conds)]
        layout = condition_layout(grid, [(c.frame_index, e.shape[2]) for c, e in zip(conds, encoded)],
                                  vc.spatial_ratio, vc.temporal_ratio, frame_rate)
        for j, first, start, end in layout.blends:
            src = encoded[j][:, :, first:first + end - start]
            z = z.at[:, :, start:end].set(lerp(z[:, :, start:end], src, conds[j].strength))
        extra = []
        for j, keep, _ in layout.extras:
            cl = encoded[j][:, :, :keep]
            cl = lerp(noise(rng, "condition", j, cl.shape), cl, conds[j].strength)
            extra.append(jnp.broadcast_to(pack(cl, tc.patch_size, tc.patch_size_t),
                                          (batch,) + pack(cl, tc.patch_size, tc.patch_size_t).shape[1:]))
        packed = jnp.concatenate([*extra, pack(z, tc.patch_size, tc.patch_size_t)], axis=1)
        strengths = np.asarray([0.0] + [c.strength for c in conds], np.float32)
        return packed, layout, strengths

    # ------------------------------------------------------------------ call

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                     max_sequence_length: int = 256, conditions=()):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it;
        ``conditions``: ((frame_index, pixel frames), ...) (an image: 1 frame), which fix the token count."""
        self._check_condition_ready()
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        vc, tc = self.vae_config, self.transformer_config
        st = vc.temporal_ratio
        latent_frames = [((min(n, num_frames - fi) - 1) // st * st) // st + 1 for fi, n in conditions]
        layout = condition_layout(self.latent_grid(height, width, num_frames),
                                  [(fi, f) for (fi, _), f in zip(conditions, latent_frames)], vc.spatial_ratio, st,
                                  dv["fps"])
        do_cfg = guidance_scale > 1.0
        s_total = layout.group.shape[0]
        shape = (batch, s_total, tc.in_channels)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        rep = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=self._replicated())  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, tc.caption_channels), self.dtype), sd((n, max_sequence_length),
                                                                                    jnp.int32))
        cond = {"coords": rep(layout.coords), "group": rep(layout.group),
                "strengths": rep(np.zeros(len(conditions) + 1, np.float32)), "init": latents,
                "noise_scale": rep(np.float32(0))}
        sched = jax.tree.map(jnp.asarray, flow_match.make_schedule(self.scheduler_config,
                                                                   timesteps=condition_schedule(num_inference_steps)))
        _, tstate = nnx.split(self.transformer)
        self._conditioned = bool(conditions)
        kv = self._pipefusion_buffers(n, s_total, abstract=True)  # PipeFusion: the patched step
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched,
            jnp.asarray([guidance_scale, 0.0], jnp.float32), jax.random.key(0), cond).compile()

    def __call__(self, conditions=None, image=None, video=None, frame_index: int | list[int] = 0,
                 strength: float | list[float] = 1.0, denoise_strength: float = 1.0,
                 prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 frame_rate: float | None = None, num_inference_steps: int = 50, timesteps=None,
                 guidance_scale: float = 3.0, guidance_rescale: float = 0.0, image_cond_noise_scale: float = 0.15,
                 num_videos_per_prompt: int = 1, latents=None, prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_embeds=None, negative_prompt_attention_mask=None, decode_timestep=0.0,
                 decode_noise_scale=None, max_sequence_length: int = 256, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> LTXPipelineOutput:
        """As diffusers' ``LTXConditionPipeline.__call__`` (``seed`` for its generator; ``output_type`` "np" or
        "latent": the unpacked latents (B, C, F, h, w) without the condition tokens, as diffusers')."""
        self._check_condition_ready()
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        frame_rate = dv["fps"] if frame_rate is None else frame_rate
        if height % 32 or width % 32:
            raise ValueError(f"`height` and `width` have to be divisible by 32 but are {height} and {width}.")
        if not 0.0 <= denoise_strength <= 1.0:
            raise ValueError(f"The value of strength should in [0.0, 1.0] but is {denoise_strength}")
        if frame_rate <= 0:
            raise ValueError(f"frame_rate must be positive, got {frame_rate}.")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}.")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("Must provide `prompt_attention_mask` when specifying `prompt_embeds`.")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("Must provide `negative_prompt_attention_mask` when specifying `negative_prompt_embeds`.")
        conds = self._gather_conditions(conditions, image, video, frame_index, strength)
        for j, c in enumerate(conds):
            self._check_condition(c, j, num_frames)
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with prompt_attention_mask)")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        rows = batch * per
        grid = self.latent_grid(height, width, num_frames)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        tc = self.transformer_config

        # the schedule: the linear-quadratic timesteps (or the given ones); denoise_strength starts it later
        ts = condition_schedule(num_inference_steps) if timesteps is None else np.asarray(timesteps, np.float32)
        sched = flow_match.make_schedule(self.scheduler_config, timesteps=ts)
        sigma = None
        if denoise_strength < 1:
            n = len(ts)
            start = max(n - min(int(n * denoise_strength), n), 0)
            sigma = float(sched.sigmas[start])
            sched = dataclasses.replace(sched, num_inference_steps=n - start, timesteps=sched.timesteps[start:],
                                        dt=sched.dt[start:], c_x0=sched.c_x0[start:])  # (sigmas: all, as diffusers)
        elif latents is not None:
            log.warning("latents are used only with denoise_strength < 1 (the video to edit), as diffusers; ignored.")
        steps = sched.num_inference_steps

        with timer.stage("text_encoding"):
            emb, mask = masked_text_for_cfg(self, prompts, batch, tc.caption_channels, do_cfg, max_sequence_length,
                                            prompt_embeds, prompt_attention_mask, negative_prompt,
                                            negative_prompt_embeds, negative_prompt_attention_mask)
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per))
            jax.block_until_ready(texts)

        rng = jax.random.key(seed)
        with timer.stage("image_encoding" if conds else "latents"):
            packed, layout, strengths = self.prepare_latents(conds, rows, height, width, num_frames, frame_rate, rng,
                                                             latents, sigma)
            packed = jax.device_put(packed, self._latent_sharding(packed.shape))
            cond = {"coords": layout.coords, "group": layout.group, "strengths": strengths, "init": packed,
                    "noise_scale": np.float32(image_cond_noise_scale)}
            cond = {k: (v if k == "init" else self._put_replicated(jnp.asarray(v))) for k, v in cond.items()}
            jax.block_until_ready(packed)

        self._conditioned = bool(conds)
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.asarray([guidance_scale, guidance_rescale], jnp.float32))
        with timer.stage("denoising"):
            kv = self._pipefusion_buffers(texts[0].shape[0], packed.shape[1])
            out = self._denoise(do_cfg, packed, flow_match.init_state(), kv,
                                (texts, sched_arrays, guidance, rng, cond), steps, progress)
        out = out[:, layout.n_extra:]
        if output_type == "latent":
            from xdit_jax.pipelines.ltx import unpack

            return LTXPipelineOutput(frames=np.asarray(jax.device_get(unpack(out, *grid, tc.patch_size,
                                                                             tc.patch_size_t))),
                                     timings=timer.times, peak_memory_bytes=peak_memory_bytes())
        with timer.stage("decoding"):
            frames = np.asarray(jax.device_get(jax.block_until_ready(
                self.decode_latents(out, grid, rows, decode_timestep, decode_noise_scale, rng))))
        return LTXPipelineOutput(frames=frames, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
