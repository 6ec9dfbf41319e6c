"""SkyReels-V2, diffusers' ``SkyReelsV2Pipeline``, ``SkyReelsV2ImageToVideoPipeline``,
``SkyReelsV2DiffusionForcingPipeline``, ``SkyReelsV2DiffusionForcingImageToVideoPipeline`` and
``SkyReelsV2DiffusionForcingVideoToVideoPipeline`` on a JAX mesh: Wan 2.1's pipeline (:mod:`xdit_jax.pipelines.wan`:
UMT5, the Wan VAE, UniPC with flow sigmas, every mesh) with the SkyReels-V2 transformer
(:mod:`xdit_jax.models.skyreels_v2`). The image- and video-to-video classes are documented where they are defined.

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained("/models/SkyReels-V2-DF-1.3B-540P-Diffusers",
                                                              mesh="cfg=2,ulysses=4")
    out = pipe("A cat walks on the grass.", num_frames=97, height=544, width=960, ar_step=5, causal_block_size=5)

``SkyReelsV2Pipeline``: WanPipeline's loop (one timestep for all frames), SkyReels' defaults (544 x 960, 97 frames,
guidance 6, 24 fps).

``SkyReelsV2DiffusionForcingPipeline``: diffusion forcing. Every latent frame has its own timestep and its own copy of
the scheduler; diffusers' ``generate_timestep_matrix`` (here :func:`timestep_matrix`, on the host) gives, for each
iteration, each frame's timestep and whether that frame is updated. ``ar_step=0`` (synchronous): all frames step
together; ``ar_step > 0`` with ``causal_block_size`` (asynchronous): the blocks of ``causal_block_size`` latent frames
start one after the other, each ``ar_step`` steps behind the one before, and the transformer's self-attention is
block-causal. One jitted step per iteration: the transformer with a timestep per frame (CFG), then every frame's
scheduler step (UniPC's state per frame: the scheduler vmapped over the frame axis, each frame at its own step index),
kept only for the frames updated. Every mesh, PipeFusion too (below).

PipeFusion in diffusion forcing: the displaced-patch rule of :mod:`xdit_jax.parallel.pipefusion` over the iterations
of each window. The window's token layout (its frames, hence the sequence and the patches) is fixed for all its
iterations, so the buffers hold the same tokens' K/V from one iteration to the next; each window starts with fresh
buffers and ``pipefusion_warmup_steps`` exact iterations (a long video's windows, and the last window's other length,
never read another window's K/V). A frame's K/V change between iterations only through its latents (frames not updated
keep theirs) and its timestep, as any step's do. With the block-causal mask (``causal_block_size`` > 1) the buffered
keys carry their causal block's id (:func:`~xdit_jax.parallel.pipefusion.run_pipefusion`'s ``segments``): a patch's
queries see only their own block's keys and earlier blocks'; patches follow the frame order, so the earlier blocks' keys
are this iteration's, and a stale key is visible only where a patch boundary cuts the query's own block (none where
the boundaries fall between blocks). Tested against the same rule run sequentially on one device.

diffusers' per-frame UniPC (as the SkyReels-V2 release's loop) steps ``latents[:, :, f]``, a view of the latents, and
keeps that view as its ``last_sample`` where the corrector did not run (step 0): the in-place update of the latents with
the step's result then changes it, so the corrector of the frame's next step reads the current sample, not the previous
one (a single UniPC over the whole video, as SkyReelsV2Pipeline's, reads the previous). That is how the DF checkpoints
run; it is replicated here (the state's last sample set to the step's result where the corrector was off), measured
0.08 of 3.7 in the latents after 3 steps without it.

Differences from diffusers, by design: ``causal_block_size=None`` means the checkpoint's ``num_frame_per_block``
(diffusers' ``_set_ar_attention`` changes the transformer's config for every later call); a latent frame count that
``causal_block_size`` does not divide is refused, in every window of a long video (diffusers leaves the last frames
as noise); any batch (diffusers' fps embedding broadcast needs one video); ``latents`` is the first window's noise
(diffusers' DF pipeline fails on any ``latents``).

Long videos (``num_frames > base_num_frames`` with ``overlap_history``): diffusers' loop of windows of
``base_num_frames``; each after the first starts from the last ``overlap_history`` frames made (cut to whole causal
blocks), which stay fixed (already denoised, timestep 0) and enter the transformer with ``addnoise_condition`` x
0.001 of fresh noise at timestep ``addnoise_condition``; the windows' new frames are appended. Each window's noise and
the condition noise come from ``seed`` (:meth:`SkyReelsV2DiffusionForcingPipeline._window_noise` /
``_condition_noise``; diffusers draws them from the generator and from torch's global generator).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import skyreels_v2, vae_wan
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    as_numpy,
    denoise_loop,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.wan import (  # noqa: F401  (check_request: the CLI's)
    WanImageToVideoPipeline,
    WanPipeline,
    WanPipelineOutput,
    check_request,
)
from xdit_jax.schedulers import unipc

log = logging.getLogger("xdit_jax")

SkyReelsV2PipelineOutput = WanPipelineOutput
MAX_SEQUENCE_LENGTH = 512


DF_PIPELINE = "SkyReelsV2DiffusionForcingPipeline"


def read_configs(folder):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, skyreels_v2.SkyReelsV2Config, vae_wan.WanVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' SkyReels-V2 defaults: 544 x 960, 97 frames (the 540P checkpoints), played at 24 fps."""
    return {"height": 544, "width": 960, "num_frames": 97, "fps": 24}


class SkyReelsV2Pipeline(WanPipeline):
    """Text-to-video with SkyReels-V2 (diffusers' ``SkyReelsV2Pipeline``) — see the module docstring."""

    PIPELINE_CLASSES = ("SkyReelsV2Pipeline",)
    CONFIG = skyreels_v2.SkyReelsV2Config
    _default_video = staticmethod(default_video)

    def __init__(self, **parts):
        super().__init__(**parts)
        if type(self) is SkyReelsV2Pipeline and self.transformer_config.inject_sample_info:
            raise ValueError("This transformer has an fps embedding (inject_sample_info): a diffusion-forcing "
                             "checkpoint; load it with SkyReelsV2DiffusionForcingPipeline (diffusers' "
                             "SkyReelsV2Pipeline passes no fps and fails on it).")

    def __call__(self, prompt=None, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> SkyReelsV2PipelineOutput:
        """As diffusers' ``SkyReelsV2Pipeline.__call__`` (its defaults: 544 x 960, 97 frames, guidance 6)."""
        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              guidance_scale_2=None, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress)


class SkyReelsV2ImageToVideoPipeline(WanImageToVideoPipeline):
    """Image-to-video with SkyReels-V2 (diffusers' ``SkyReelsV2ImageToVideoPipeline``: SkyReels-V2-I2V-1.3B / 14B):
    Wan 2.1 I2V's pipeline (:class:`xdit_jax.pipelines.wan.WanImageToVideoPipeline`: the first (and last) frame through
    the VAE encoder beside the noise, the CLIP image states cross-attended) with the SkyReels-V2 transformer and
    SkyReels' defaults (544 x 960, 97 frames, 24 fps, guidance 5). The checkpoints' image encoder is a
    ``CLIPVisionModelWithProjection`` (its penultimate states are read, the projection not) and their
    ``image_processor`` a ``CLIPProcessor`` folder (its image preprocessing is read)."""

    PIPELINE_CLASSES = ("SkyReelsV2ImageToVideoPipeline",)
    CONFIG = skyreels_v2.SkyReelsV2Config
    _default_video = staticmethod(default_video)

    def __init__(self, **parts):
        super().__init__(**parts)
        if self.transformer_config.inject_sample_info:
            raise ValueError("This transformer has an fps embedding (inject_sample_info): a diffusion-forcing "
                             "checkpoint; diffusers' SkyReelsV2ImageToVideoPipeline passes no fps and fails on it.")


def timestep_matrix(num_latent_frames: int, step_template, base_num_latent_frames: int, ar_step: int = 5,
                    num_pre_ready: int = 0, causal_block_size: int = 1):
    """diffusers' ``SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix`` (``shrink_interval_with_mask``
    off) on the host: ``(step_matrix (I, F) int64 timesteps, step_index (I, F) int64 rows of [999, *template, 0],
    update (I, F) bool, valid_interval [(start, end)] * I)``, the frames' schedule of each iteration."""
    template = np.asarray(step_template).astype(np.int64)
    num_iterations = len(template) + 1
    num_blocks = num_latent_frames // causal_block_size
    base_num_blocks = base_num_latent_frames // causal_block_size
    if base_num_blocks < num_blocks:
        min_ar_step = len(template) / base_num_blocks
        if ar_step < min_ar_step:
            raise ValueError(f"`ar_step` should be at least {int(np.ceil(min_ar_step))} in your setting")
    template = np.concatenate([[999], template, [0]]).astype(np.int64)
    pre = np.zeros(num_blocks, np.int64)
    if num_pre_ready > 0:
        pre[: num_pre_ready // causal_block_size] = num_iterations
    matrix, index, update = [], [], []
    while not np.all(pre >= num_iterations - 1):
        new = np.zeros(num_blocks, np.int64)
        for i in range(num_blocks):
            new[i] = pre[i] + 1 if i == 0 or pre[i - 1] >= num_iterations - 1 else new[i - 1] - ar_step
        new = np.clip(new, 0, num_iterations)
        update.append((new != pre) & (new != num_iterations))
        index.append(new)
        matrix.append(template[new])
        pre = new
    terminal = base_num_blocks
    interval = []
    for mask in update:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1
        interval.append((max(terminal - base_num_blocks, 0), terminal))
    rep = lambda a: np.repeat(np.stack(a), causal_block_size, axis=1)  # noqa: E731  (blocks -> frames)
    interval = [(s * causal_block_size, e * causal_block_size) for s, e in interval]
    return rep(matrix), rep(index), rep(update), interval


class SkyReelsV2DiffusionForcingPipeline(SkyReelsV2Pipeline):
    """Diffusion forcing text-to-video (diffusers' ``SkyReelsV2DiffusionForcingPipeline``) — see the module
    docstring."""

    PIPELINE_CLASSES = ("SkyReelsV2DiffusionForcingPipeline",)

    def __init__(self, **parts):
        super().__init__(**parts)
        self._causal_models = {}

    def _transformer_for(self, causal_block_size: int):
        """The transformer with ``num_frame_per_block = causal_block_size`` (the same parameters; diffusers'
        ``_set_ar_attention``)."""
        if causal_block_size not in self._causal_models:
            cfg = skyreels_v2.with_causal_block_size(self.transformer_config, causal_block_size)
            graphdef, _ = nnx.split(nnx.eval_shape(
                lambda: skyreels_v2.SkyReelsV2Transformer3DModel(cfg, dtype=self.dtype)))
            self._causal_models[causal_block_size] = nnx.merge(graphdef, nnx.split(self.transformer)[1])
        return self._causal_models[causal_block_size]

    def _df_step_fn(self, do_cfg: bool, causal_block_size: int, prefix: int = 0, addnoise: bool = False,
                    warmup: bool = True):
        """The jitted iteration ``(tstate, latents, sched_state, n, kv, texts, sched, guidance, fps, t_matrix,
        i_matrix, update, window, key, addnoise_condition) -> (latents, sched_state, n + 1, kv)``: the transformer on
        all frames at
        row ``n``'s timesteps, CFG, then each frame's scheduler step at its own step index, kept where row ``n``
        updates the frame. ``prefix`` (static): a long video's condition frames at the window's start; with
        ``addnoise`` they enter the transformer noised (:meth:`_condition_noise`) at timestep
        ``addnoise_condition``, as diffusers'. ``kv``: PipeFusion's K/V buffers (None without it); ``warmup``: with
        PipeFusion, an exact iteration over the whole sequence (else a patched one)."""
        key_ = ("df", do_cfg, causal_block_size, prefix, addnoise, warmup)
        if key_ in self._step_cache:
            return self._step_cache[key_]
        model_ = self._transformer_for(causal_block_size)
        graphdef, _ = nnx.split(model_)
        dtype, scheduler = self.dtype, self.scheduler
        alias_last = scheduler is unipc

        def blocks(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, n, kv, texts, sched, guidance, fps, t_matrix, i_matrix, update, window,
                 key, addnoise_condition):
            model = nnx.merge(graphdef, tstate)
            x, t_row = latents, t_matrix[n].astype(jnp.float32)
            if prefix and addnoise:  # diffusers: the clean condition frames noised a little, at a small timestep
                b, c, _, h, w = latents.shape
                factor = 0.001 * addnoise_condition
                noise = self._condition_noise(key, window, n, (b, c, prefix, h, w))
                x = x.at[:, :, :prefix].set(x[:, :, :prefix] * (1.0 - factor) + noise * factor)
                t_row = t_row.at[:prefix].set(jnp.trunc(addnoise_condition))  # (into diffusers' int64 timesteps)
            x = self._model_batch(x, do_cfg)
            t = jnp.broadcast_to(t_row[None], (x.shape[0], latents.shape[2]))
            f = None if fps is None else jnp.broadcast_to(fps, (x.shape[0],))
            tokens_x, tokens, cond = model.embed(x.astype(dtype), t, texts[0], None, f)
            if kv is None:
                tokens_x, _ = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, None, True)
            else:  # PipeFusion, the buffered keys masked by their causal blocks' ids
                from xdit_jax.parallel import pipefusion

                tokens_x, kv = pipefusion.run_pipefusion(
                    blocks, tstate, tokens_x, tokens, cond, kv, self.mesh, patches=self.pipefusion_patches,
                    warmup=warmup, stacked=self.stacked, backend=self.attention_backend,
                    num_layers=self.stacked_layers, text=self._pipefusion_text(), segments="segment")
            pred = model.head(tokens_x, cond, x.shape).astype(jnp.float32)
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + guidance * (text - uncond)
            idx = jnp.clip(i_matrix[n] - 1, 0, sched.timesteps.shape[0] - 1).astype(jnp.int32)

            def one(i, p, s, st):  # one frame's scheduler: (B, C, h, w)
                new, st = scheduler.step(sched, i, p, s, st)
                if alias_last:  # diffusers' UniPC keeps a view of the latents as its last sample (see the docstring)
                    st = (jnp.where(jnp.asarray(sched.use_corrector)[i], st[0], new.astype(st[0].dtype)),) + st[1:]
                return new, st

            new, new_state = jax.vmap(one, in_axes=(0, 2, 2, 2), out_axes=2)(idx, pred, latents, sched_state)
            upd = update[n][None, None, :, None, None]
            latents = jnp.where(upd, new, latents)
            sched_state = jax.tree.map(lambda a, b: jnp.where(upd, a, b), tuple(new_state), tuple(sched_state))
            return self._step_out(latents, sched_state, n, kv)

        return self._jit_step(key_, step)

    def _window_noise(self, key, window: int, shape):
        """The initial noise of a long video's window ``window`` >= 1 (diffusers draws it from the generator)."""
        return jax.random.normal(jax.random.fold_in(key, window), shape, jnp.float32)

    def _condition_noise(self, key, window, n, shape):
        """(Traced.) The noise ``addnoise_condition`` mixes into the condition frames at iteration ``n`` of window
        ``window`` (diffusers draws it with ``torch.randn_like``, from torch's global generator)."""
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 1 << 20), window), n)
        return jax.random.normal(k, shape, jnp.float32)

    @staticmethod
    def windows(latent_frames: int, base_latent_frames: int, overlap_latent_frames: int | None,
                causal_block_size: int) -> list[tuple[int, int]]:
        """diffusers' long-video plan: ``[(frames, condition frames)]`` per window: the first ``base`` frames, then
        windows that start with the last ``overlap`` frames made (cut to whole causal blocks) and add new ones; one
        window ``(latent_frames, 0)`` for a short video (``overlap`` None)."""
        if overlap_latent_frames is None:
            return [(latent_frames, 0)]
        base, ov = base_latent_frames, overlap_latent_frames
        n_iter = 1 + (latent_frames - base - 1) // (base - ov) + 1
        plan = [(base, 0)]
        prefix = ov - ov % causal_block_size
        for k in range(1, n_iter):
            left = latent_frames - (k * (base - ov) + ov)
            plan.append((min(left + ov, base), prefix))
        return plan

    @staticmethod
    def extension_windows(latent_frames: int, base_latent_frames: int, overlap_latent_frames: int,
                          causal_block_size: int, first_prefix: int) -> list[tuple[int, int]]:
        """diffusers' video-to-video plan: ``[(frames, condition frames)]``, the first window starting from the given
        video's last ``first_prefix`` latent frames, the later ones from the last ``overlap`` made (cut to whole causal
        blocks), each window ``min(left + overlap, base)`` frames."""
        base, ov = base_latent_frames, overlap_latent_frames
        n_iter = 1 + (latent_frames - base - 1) // (base - ov) + 1
        return [(min(latent_frames - (k * (base - ov) + ov) + ov, base),
                 first_prefix if k == 0 else ov - ov % causal_block_size) for k in range(n_iter)]

    def __call__(self, prompt=None, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True, overlap_history: int | None = None,
                 addnoise_condition: float = 0.0, base_num_frames: int = 97, ar_step: int = 0,
                 causal_block_size: int | None = None, fps: int = 24) -> SkyReelsV2PipelineOutput:
        """See :meth:`_generate_df`."""
        return self._generate_df(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                 latents=latents, max_sequence_length=max_sequence_length,
                                 num_videos_per_prompt=num_videos_per_prompt, seed=seed, output_type=output_type,
                                 progress=progress, overlap_history=overlap_history,
                                 addnoise_condition=addnoise_condition, base_num_frames=base_num_frames,
                                 ar_step=ar_step, causal_block_size=causal_block_size, fps=fps)

    def _generate_df(self, prompt, negative_prompt, *, height, width, num_frames, num_inference_steps, guidance_scale,
                     prompt_embeds, negative_prompt_embeds, latents, max_sequence_length, num_videos_per_prompt, seed,
                     output_type, progress, overlap_history, addnoise_condition, base_num_frames, ar_step,
                     causal_block_size, fps, condition=None, end_condition=None,
                     extension: bool = False) -> SkyReelsV2PipelineOutput:
        """As diffusers' ``SkyReelsV2DiffusionForcingPipeline.__call__``: ``ar_step`` (0: synchronous),
        ``causal_block_size`` (latent frames per causal block; None: the checkpoint's ``num_frame_per_block``),
        ``fps`` (16 or other: the fps embedding's row); ``num_frames > base_num_frames`` with ``overlap_history``:
        the long-video loop (windows of ``base_num_frames``, each after the first starting from the last
        ``overlap_history`` frames made, those noised by ``addnoise_condition``). ``latents``: the first window's
        noise (B, C, latent frames of it, h, w); later windows' noise and the condition noise come from ``seed``.
        ``condition(latent_shape)``: the first window's condition frames (1, C, P, h, w) (image-to-video: the image's
        latent frame), held and noised as a long video's; ``end_condition(latent_shape)``: (1, C, 1, h, w) a last frame
        appended to the (one) window at timestep 0, never updated, dropped from the result (image-to-video's
        ``last_image``); ``extension`` (video-to-video): ``condition`` is the given video's last latent frames and
        the windows are diffusers' video-extension loop (:meth:`extension_windows`)."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        if isinstance(ar_step, bool) or not isinstance(ar_step, (int, np.integer)) or ar_step < 0:
            raise ValueError(f"ar_step={ar_step!r} must be an int >= 0 (0: synchronous diffusion forcing).")
        if base_num_frames is None or base_num_frames < 1:
            raise ValueError(f"base_num_frames={base_num_frames!r} must be a frame count >= 1.")
        if num_frames > base_num_frames and overlap_history is None:
            raise ValueError("`overlap_history` is required when `num_frames` exceeds `base_num_frames` to ensure "
                             "smooth transitions in long video generation (diffusers' message; 17 or 37).")
        if addnoise_condition < 0:
            raise ValueError(f"addnoise_condition={addnoise_condition} must be >= 0.")
        if addnoise_condition > 60:
            log.warning("addnoise_condition=%s is large and may make a long video inconsistent; 20 is recommended "
                        "(diffusers' warning).", addnoise_condition)
        tc = self.transformer_config
        block = tc.num_frame_per_block if causal_block_size is None else causal_block_size
        skyreels_v2.with_causal_block_size(tc, block)  # (checks the value)
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        made = self.output_frames(num_frames)
        if made != num_frames:
            log.warning("num_frames=%d: the VAE makes %dk+1 frames; this video has %d (as diffusers').", num_frames,
                        self.vae_config.scale_factor_temporal, made)
        st = self.vae_config.scale_factor_temporal
        full_shape = self.latent_shape(batch * per, height, width, made)
        long_video = overlap_history is not None and (made > base_num_frames or extension)
        base = (base_num_frames - 1) // st + 1
        overlap = None
        if extension and overlap_history is None:
            raise ValueError("video-to-video needs overlap_history: the given video's last frames the new ones "
                             "continue from (diffusers' argument; 17 or 37 recommended).")
        if long_video:
            overlap = (overlap_history - 1) // st + 1
            if not 0 < overlap < base:
                raise ValueError(f"overlap_history={overlap_history} ({overlap} latent frames) must leave new frames in "
                                 f"each window of base_num_frames={base_num_frames} ({base} latent frames).")
        timer = StageTimer()
        if extension:  # (the video's tail encoded first: its latent frame count sets the first window's condition)
            with timer.stage("image_encoding"):
                ext = jnp.asarray(condition(full_shape), jnp.float32)
                ext = jax.block_until_ready(ext[:, :, :ext.shape[2] - ext.shape[2] % block])
            if ext.shape[2] == 0:
                raise ValueError(f"overlap_history={overlap_history}: the video's last frames make fewer latent frames "
                                 f"than one causal block ({block}).")
            condition = lambda shape: ext  # noqa: E731
            plan = self.extension_windows(full_shape[2], base, overlap, block, ext.shape[2])
        else:
            plan = self.windows(full_shape[2], base, overlap, block)
        end = 0 if end_condition is None else 1
        if end and long_video:
            raise NotImplementedError("last_image with a long video (num_frames > base_num_frames) is not implemented "
                                      "(diffusers' loop sizes its last window wrongly there); give num_frames <= "
                                      f"base_num_frames={base_num_frames}.")
        for frames, _ in plan:
            frames += end
            if frames % block:
                raise ValueError(f"a window of {frames} latent frames is not a multiple of causal_block_size={block}: "
                                 "choose num_frames (4 k + 1), base_num_frames and overlap_history so that every "
                                 f"window is (diffusers would leave its last {frames % block} latent frames as noise).")
        if len(plan) > 1 and plan[1][1] == 0:
            raise ValueError(f"overlap_history={overlap_history} ({overlap} latent frames) is less than one causal "
                             f"block ({block}): no condition frames would be kept.")
        sched = self.schedule(num_inference_steps)
        do_cfg = guidance_scale > 1.0
        with timer.stage("text_encoding"):
            texts = self._text_inputs(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per,
                                      do_cfg, max_sequence_length)
        rng = jax.random.key(seed)
        put = lambda a: self._put_replicated(jnp.asarray(a))  # noqa: E731
        sched_arrays = jax.tree.map(put, sched)
        fps_row = put(np.int32(skyreels_v2.fps_index(fps))) if tc.inject_sample_info else None
        tstate = nnx.split(self.transformer)[1]
        made_latents, cond, end_cond = None, None, None
        if (condition is not None and not extension) or end:
            first_shape = full_shape[:2] + (plan[0][0],) + full_shape[3:]
            with timer.stage("image_encoding"):
                if condition is not None:
                    cond = jax.block_until_ready(jnp.asarray(condition(first_shape), jnp.float32))
                if end:
                    end_cond = jax.block_until_ready(jnp.asarray(end_condition(first_shape), jnp.float32))
        if extension:
            cond = ext
        with timer.stage("denoising"):
            for k, (frames, prefix) in enumerate(plan):
                shape = full_shape[:2] + (frames,) + full_shape[3:]
                if k == 0:
                    lat = self._initial_latents(latents, shape, rng, 1.0,
                                                "batch, channels, latent frames (of the first window), height/8, "
                                                "width/8")
                    if cond is not None:  # (image-to-video: the image's latent frame first, in every row)
                        prefix = cond.shape[2]
                        lat = lat.at[:, :, :prefix].set(jnp.broadcast_to(cond, shape[:2] + cond.shape[2:]))
                        lat = jax.device_put(lat, self._latent_sharding(shape))
                    if end:  # (the last image's latent frame after the video's, as diffusers appends it)
                        frames += 1
                        shape = full_shape[:2] + (frames,) + full_shape[3:]
                        lat = jnp.concatenate([lat, jnp.broadcast_to(end_cond, shape[:2] + (1,) + shape[3:])], axis=2)
                        lat = jax.device_put(lat, self._latent_sharding(shape))
                else:
                    lat = self._window_noise(rng, k, shape)
                    lat = lat.at[:, :, :prefix].set(made_latents[:, :, made_latents.shape[2] - overlap:][:, :, :prefix])
                    lat = jax.device_put(lat, self._latent_sharding(shape))
                t_mat, i_mat, upd, _ = timestep_matrix(frames, np.asarray(sched.timesteps), frames, ar_step, prefix,
                                                       block)
                if end:  # the appended last frame: timestep 0, never updated
                    t_mat[:, -1], upd[:, -1] = 0, False
                noised = bool(addnoise_condition) and prefix > 0
                warm_step = self._df_step_fn(do_cfg, block, prefix, noised)
                # PipeFusion: this window's own buffers, its first iterations exact (they fill them)
                kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape))
                step = warm_step if kv is None else self._df_step_fn(do_cfg, block, prefix, noised, warmup=False)
                args = (texts, sched_arrays, put(np.float32(guidance_scale)), fps_row, put(t_mat.astype(np.float32)),
                        put(i_mat.astype(np.int32)), put(upd), put(np.int32(k)), rng,
                        put(np.float32(addnoise_condition)))

                def one(carry, n, step=step, warm_step=warm_step, args=args):
                    lat, st, i, kv = carry
                    fn = warm_step if kv is None or n < self.pipefusion_warmup_steps else step
                    return fn(tstate, lat, st, i, kv, *args)

                state = jax.device_put(self._init_state(shape), self._latent_sharding(shape))
                carry = (lat, state, jax.device_put(np.int32(0), self._replicated()), kv)
                desc = "denoising" if len(plan) == 1 else f"denoising window {k + 1}/{len(plan)}"
                lat = denoise_loop(one, carry, len(t_mat), progress=progress, desc=desc)[0]
                made_latents = lat if k == 0 else jnp.concatenate([made_latents, lat[:, :, overlap:]], axis=2)
            if end:
                made_latents = made_latents[:, :, :-1]
            made_latents = jax.device_put(made_latents, self._latent_sharding(made_latents.shape))
        if output_type == "latent":
            out = as_numpy(made_latents)
        else:
            with timer.stage("decoding"):
                out = as_numpy(jax.block_until_ready(self._decode_fn()(made_latents)))
        return SkyReelsV2PipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class SkyReelsV2DiffusionForcingImageToVideoPipeline(SkyReelsV2DiffusionForcingPipeline):
    """Diffusion forcing image-to-video (diffusers' ``SkyReelsV2DiffusionForcingImageToVideoPipeline``): the image
    encoded by the Wan VAE's encoder (one latent frame, the distribution's mode, normalised) is the first window's first
    latent frame, a condition frame as a long video's (kept where the causal blocks are single frames, at timestep 0,
    noised by ``addnoise_condition``); everything else as :class:`SkyReelsV2DiffusionForcingPipeline`. No CLIP (diffusers'
    pipeline uses none). ``last_image``: its latent frame appended after the video's at timestep 0 (never updated) and
    dropped from the result (diffusers keeps it in ``output_type="latent"``); with a long video refused (diffusers'
    loop sizes its last window wrongly there). A long video's
    last window shorter than ``base_num_frames`` runs as in the text-to-video pipeline (diffusers' image-to-video one
    makes its schedule for ``base_num_frames`` there and fails)."""

    # (diffusers loads it from the diffusion-forcing checkpoints too: the same parts, the VAE's encoder used)
    PIPELINE_CLASSES = ("SkyReelsV2DiffusionForcingImageToVideoPipeline", DF_PIPELINE)

    def __init__(self, *, vae_encoder, **parts):
        super().__init__(**parts)
        self.vae_encoder = vae_encoder
        if self.transformer_config.in_channels != self.vae_config.z_dim:
            raise ValueError(f"transformer in_channels {self.transformer_config.in_channels} is not the latents' "
                             f"{self.vae_config.z_dim}: diffusion forcing image-to-video puts the image in a latent "
                             "frame, not beside the noise.")

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The VAE's encoder (``vae/encoder_params``, written by conversion)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_wan_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        vc = vae_wan.WanVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return dict(super()._extra_parts(folder, mesh, dtype, kind),
                    vae_encoder=load_vae_encoder(folder, vc, dtype, NamedSharding(mesh, P()), vae_wan_encoder))

    _encode_fn = WanImageToVideoPipeline._encode_fn

    def image_condition(self, image, shape):
        """(1, z_dim, 1, h, w): the image resized to the video's size (diffusers' ``VideoProcessor.preprocess``), encoded
        alone and normalised with the VAE's latents mean / std."""
        from xdit_jax.pipelines.denoise import preprocess_image

        _, _, _, h, w = shape
        s = self.vae_config.scale_factor_spatial
        return self._encode_fn()(preprocess_image(image, h * s, w * s)[:, :, None]).astype(jnp.float32)

    def __call__(self, image=None, prompt=None, negative_prompt=None, *, last_image=None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True, overlap_history: int | None = None,
                 addnoise_condition: float = 0.0, base_num_frames: int = 97, ar_step: int = 0,
                 causal_block_size: int | None = None, fps: int = 24) -> SkyReelsV2PipelineOutput:
        """``image``: the first frame (a PIL image, resized to ``width`` x ``height`` as diffusers does, or an array of
        that size); the rest as :meth:`SkyReelsV2DiffusionForcingPipeline.__call__` (diffusers' default guidance here:
        5)."""
        if image is None:
            raise ValueError("image-to-video needs an image (the first frame).")
        return self._generate_df(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                 latents=latents, max_sequence_length=max_sequence_length,
                                 num_videos_per_prompt=num_videos_per_prompt, seed=seed, output_type=output_type,
                                 progress=progress, overlap_history=overlap_history,
                                 addnoise_condition=addnoise_condition, base_num_frames=base_num_frames,
                                 ar_step=ar_step, causal_block_size=causal_block_size, fps=fps,
                                 condition=lambda shape: self.image_condition(image, shape),
                                 end_condition=None if last_image is None else
                                 (lambda shape: self.image_condition(last_image, shape)))


class SkyReelsV2DiffusionForcingVideoToVideoPipeline(SkyReelsV2DiffusionForcingImageToVideoPipeline):
    """Diffusion forcing video extension (diffusers' ``SkyReelsV2DiffusionForcingVideoToVideoPipeline``): the given
    video's last ``overlap_history`` frames, encoded by the Wan VAE (normalised, cut to whole causal blocks), are the
    first window's condition frames; ``num_frames`` latent-frame windows continue from them as a long video's; the
    result is the given video followed by the decoded windows (their first frames re-decoded from the condition, as
    diffusers'). ``latents`` (the first window's noise, diffusers' argument, which its pipeline fails on) is taken."""

    PIPELINE_CLASSES = ("SkyReelsV2DiffusionForcingVideoToVideoPipeline", DF_PIPELINE)  # (as the I2V pipeline)

    def video_tail(self, video, overlap_history: int, height: int, width: int):
        """(the video in [-1, 1] (1, 3, T, H, W), its last ``overlap_history`` frames' normalised latents)."""
        from xdit_jax.pipelines.denoise import preprocess_image

        frames = jnp.concatenate([preprocess_image(f, height, width)[:, :, None] for f in video], axis=2)
        return frames, self._encode_fn()(frames[:, :, -overlap_history:]).astype(jnp.float32)

    def __call__(self, video=None, prompt=None, negative_prompt=None, *, height: int | None = None,
                 width: int | None = None, num_frames: int = 120, num_inference_steps: int = 50,
                 guidance_scale: float = 6.0, prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True, overlap_history: int | None = None,
                 addnoise_condition: float = 0.0, base_num_frames: int = 97, ar_step: int = 0,
                 causal_block_size: int | None = None, fps: int = 24) -> SkyReelsV2PipelineOutput:
        """``video``: the frames to extend (PIL images or (H, W, 3) arrays, resized to ``width`` x ``height`` as
        diffusers does); ``num_frames``: the latent windows' frames (diffusers' default 120); the rest as
        :meth:`SkyReelsV2DiffusionForcingPipeline.__call__`. ``.frames``: the given video, then the new frames."""
        if video is None or len(video) == 0:
            raise ValueError("video-to-video needs a video (a list of frames).")
        dv = self.default_video()
        height, width = height or dv["height"], width or dv["width"]
        given = {}

        def tail(shape):
            given["video"], z = self.video_tail(video, overlap_history, height, width)
            return z

        out = self._generate_df(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                latents=latents, max_sequence_length=max_sequence_length,
                                num_videos_per_prompt=num_videos_per_prompt, seed=seed, output_type=output_type,
                                progress=progress, overlap_history=overlap_history,
                                addnoise_condition=addnoise_condition, base_num_frames=base_num_frames,
                                ar_step=ar_step, causal_block_size=causal_block_size, fps=fps, condition=tail,
                                extension=True)
        if output_type != "latent":
            first = np.clip(np.moveaxis(np.asarray(given["video"]), 1, -1) / 2 + 0.5, 0.0, 1.0)
            first = np.broadcast_to(first, (out.frames.shape[0],) + first.shape[1:])
            out = dataclasses.replace(out, frames=np.concatenate([first, out.frames], axis=1))
        return out
