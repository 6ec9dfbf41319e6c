"""SkyReels-V2 text-to-video, diffusers' ``SkyReelsV2Pipeline`` and ``SkyReelsV2DiffusionForcingPipeline`` on a JAX
mesh: Wan 2.1's pipeline (:mod:`xdit_jax.pipelines.wan`: UMT5, the Wan VAE, UniPC with flow sigmas, every mesh) with
the SkyReels-V2 transformer (:mod:`xdit_jax.models.skyreels_v2`).

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
kept only for the frames updated. Every mesh but PipeFusion (whose stale K/V would break the causal mask; refused).

diffusers' per-frame UniPC (as the SkyReels-V2 release's loop) steps ``latents[:, :, f]``, a view of the latents, and
keeps that view as its ``last_sample`` where the corrector did not run (step 0): the in-place update of the latents with
the step's result then changes it, so the corrector of the frame's next step reads the current sample, not the previous
one (a single UniPC over the whole video, as SkyReelsV2Pipeline's, reads the previous). That is how the DF checkpoints
run; it is replicated here (the state's last sample set to the step's result where the corrector was off), measured
0.08 of 3.7 in the latents after 3 steps without it.

Differences from diffusers, by design: ``causal_block_size=None`` means the checkpoint's ``num_frame_per_block``
(diffusers' ``_set_ar_attention`` changes the transformer's config for every later call); a latent frame count that
``causal_block_size`` does not divide is refused (diffusers leaves the last frames as noise); any batch (diffusers'
fps embedding broadcast needs one video); the long-video loop (``num_frames > base_num_frames`` with
``overlap_history``) is not implemented here: refused, with the limit named.
"""

from __future__ import annotations

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
from xdit_jax.pipelines.wan import WanPipeline, WanPipelineOutput, check_request  # noqa: F401  (the CLI's)
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
        if self.uses_pipefusion:
            raise ValueError("SkyReels-V2 diffusion forcing does not run on a pipefusion mesh: PipeFusion's patches "
                             "attend to the previous step's K/V of the later frames, which the block-causal mask "
                             "and the per-frame schedule do not allow; use ulysses / ring / cfg / data.")
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

    def _df_step_fn(self, do_cfg: bool, causal_block_size: int):
        """The jitted iteration ``(tstate, latents, sched_state, n, texts, sched, guidance, fps, t_matrix,
        i_matrix, update) -> (latents, sched_state, n + 1)``: the transformer on all frames at row ``n``'s timesteps,
        CFG, then each frame's scheduler step at its own step index, kept where row ``n`` updates the frame."""
        key = ("df", do_cfg, causal_block_size)
        if key in self._step_cache:
            return self._step_cache[key]
        model_ = self._transformer_for(causal_block_size)
        graphdef, _ = nnx.split(model_)
        dtype, scheduler = self.dtype, self.scheduler
        alias_last = scheduler is unipc

        def blocks(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, n, texts, sched, guidance, fps, t_matrix, i_matrix, update):
            model = nnx.merge(graphdef, tstate)
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(t_matrix[n].astype(jnp.float32)[None], (x.shape[0], latents.shape[2]))
            f = None if fps is None else jnp.broadcast_to(fps, (x.shape[0],))
            tokens_x, tokens, cond = model.embed(x.astype(dtype), t, texts[0], None, f)
            tokens_x, _ = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, None, True)
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
            out_latents, out_state, n1, _ = self._step_out(latents, sched_state, n, None)
            return out_latents, out_state, n1

        return self._jit_step(key, step)

    def __call__(self, prompt=None, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True, overlap_history: int | None = None,
                 addnoise_condition: float = 0.0, base_num_frames: int = 97, ar_step: int = 0,
                 causal_block_size: int | None = None, fps: int = 24) -> SkyReelsV2PipelineOutput:
        """As diffusers' ``SkyReelsV2DiffusionForcingPipeline.__call__``: ``ar_step`` (0: synchronous),
        ``causal_block_size`` (latent frames per causal block; None: the checkpoint's ``num_frame_per_block``),
        ``fps`` (16 or other: the fps embedding's row), ``base_num_frames`` / ``overlap_history`` /
        ``addnoise_condition`` (the long-video loop: refused beyond ``base_num_frames``)."""
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
        if num_frames > base_num_frames:
            raise NotImplementedError(
                f"num_frames={num_frames} > base_num_frames={base_num_frames}: the long-video loop (overlap_history, "
                f"addnoise_condition) is not implemented here; generate at most base_num_frames={base_num_frames} "
                "frames per call.")
        if addnoise_condition:
            log.warning("addnoise_condition=%s only acts in the long-video loop; unused here (as in diffusers for "
                        "num_frames <= base_num_frames).", addnoise_condition)
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
        shape = self.latent_shape(batch * per, height, width, made)
        frames = shape[2]
        if frames % block:
            raise ValueError(f"{frames} latent frames ({made} frames) are not a multiple of causal_block_size={block}: "
                             "give num_frames = 4 k + 1 with k + 1 a multiple of it (diffusers would leave the last "
                             f"{frames % block} latent frames as noise).")
        sched = self.schedule(num_inference_steps)
        t_mat, i_mat, upd, _ = timestep_matrix(frames, np.asarray(sched.timesteps), frames, ar_step, 0, block)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        with timer.stage("text_encoding"):
            texts = self._text_inputs(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per,
                                      do_cfg, max_sequence_length)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, 1.0,
                                        "batch, channels, latent frames, height/8, width/8")
        put = lambda a: self._put_replicated(jnp.asarray(a))  # noqa: E731
        sched_arrays = jax.tree.map(put, sched)
        fps_row = put(np.int32(skyreels_v2.fps_index(fps))) if tc.inject_sample_info else None
        matrices = (put(t_mat.astype(np.float32)), put(i_mat.astype(np.int32)), put(upd))
        tstate = nnx.split(self.transformer)[1]
        step = self._df_step_fn(do_cfg, block)
        args = (texts, sched_arrays, put(np.float32(guidance_scale)), fps_row) + matrices

        def one(carry, n):
            lat, st, i = carry
            return step(tstate, lat, st, i, *args)

        state = jax.device_put(self._init_state(shape), self._latent_sharding(shape))
        with timer.stage("denoising"):
            carry = (latents, state, jax.device_put(np.int32(0), self._replicated()))
            latents = denoise_loop(one, carry, len(t_mat), progress=progress)[0]
        if output_type == "latent":
            out = as_numpy(latents)
        else:
            with timer.stage("decoding"):
                out = as_numpy(jax.block_until_ready(self._decode_fn()(latents)))
        return SkyReelsV2PipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
