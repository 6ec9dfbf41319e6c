"""Wan 2.1 / 2.2 text-to-video, diffusers' ``WanPipeline`` on a JAX mesh.

    pipe = WanPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat walks on the grass, realistic.", num_frames=81, height=480, width=832, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

UMT5 (512 tokens; each caption's states after its last token zeroed, as diffusers does), the transformer's
video tokens sharded over (ring, ulysses) by :func:`xdit_jax.parallel.sequence.run_blocks` (the caption is
whole on every device: cross-attention only) or pipelined by PipeFusion, CFG and the scheduler the checkpoint
ships (UniPC with flow sigmas; flow-matching Euler also taken) inside the one jitted step, and the causal 3D
VAE decode split over the mesh.

Wan 2.2: the two-expert A14B checkpoints (``transformer_2`` / ``boundary_ratio``) run ``transformer`` while the
timestep is >= ``boundary_ratio * num_train_timesteps`` (the high-noise steps, ``guidance_scale``) and
``transformer_2`` after (``guidance_scale_2``), both through one compiled step (same config: same program, other
parameters); on a PipeFusion mesh the exact warm-up steps start again at the switch (the K/V buffers then hold the
other expert's activations). TI2V-5B (``expand_timesteps``, the Wan 2.2 VAE) in text-to-video: diffusers gives
every video token the same timestep there, which the transformer computes once per sample here (the same numbers).

Differences from diffusers, by design: the latents stay float32 between steps also in bf16 (as diffusers'
WanPipeline keeps them), and so does the timestep the transformer sees; a two-expert pipeline runs CFG when either
guidance scale is > 1 (diffusers looks at ``guidance_scale`` only and then ignores ``guidance_scale_2``); TI2V-5B's
default video is its model card's (121 x 704 x 1280 at 24 fps; diffusers' call defaults to 81 x 480 x 832).

Image-to-video: :class:`WanImageToVideoPipeline` (Wan 2.1 I2V-14B 480P / 720P and FLF2V-14B with their CLIP image
encoder; Wan 2.2 I2V-A14B; TI2V-5B with an image).
"""

from __future__ import annotations

import functools
import html
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.conversion import read_json
from xdit_jax.models import vae_wan, wan
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    load_component,
    load_vae_encoder,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    preprocess_image,
    prompt_batch,
    rgb_image,
    tokenize,
)
from xdit_jax.pipelines.image import WanVaeEncoding
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import flow_match, module_of, unipc

log = logging.getLogger("xdit_jax")

WanPipelineOutput = CogVideoXPipelineOutput
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default (UMT5)
SCHEDULERS = {"UniPCMultistepScheduler": unipc, "FlowMatchEulerDiscreteScheduler": flow_match}
LOW_MEMORY_DECODE = "frame by frame"


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy's ``fix_text`` where ftfy is installed (as there), HTML entities
    unescaped twice, runs of whitespace made one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, wan.WanConfig, vae_wan.WanVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 480 x 832, 81 frames; Wan's videos play at 16 fps. With the Wan 2.2 VAE (TI2V-5B, a
    residual VAE): its model card's 121 x 704 x 1280 at 24 fps."""
    if vc is not None and vc.is_residual:
        return {"height": 704, "width": 1280, "num_frames": 121, "fps": 24}
    return {"height": 480, "width": 832, "num_frames": 81, "fps": 16}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 5.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    check_size_and_mesh(height, width, vc.scale_factor_spatial * tc.patch_size[1], tc.num_layers, batch, mesh_spec,
                        guidance_scale)


def _listed(index: dict, name: str) -> bool:
    spec = index.get(name)
    return isinstance(spec, list) and len(spec) == 2 and spec[1] is not None


def pipeline_settings(index: dict, folder) -> dict:
    """``boundary_ratio`` (None: one transformer) and ``expand_timesteps`` of a WanPipeline's model_index.json,
    refusing what diffusers' WanPipeline cannot run."""
    ratio = index.get("boundary_ratio")
    if not _listed(index, "transformer"):
        raise ValueError(f"{folder}/model_index.json lists no transformer; a pipeline of transformer_2 alone is not "
                         "supported (give the high-noise expert as transformer).")
    if ratio is not None:
        if not _listed(index, "transformer_2"):
            raise ValueError(f"{folder}/model_index.json sets boundary_ratio={ratio} but lists no transformer_2 (the "
                             "low-noise expert of a Wan 2.2 A14B pipeline).")
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"{folder}/model_index.json: boundary_ratio={ratio} must be within [0, 1].")
    elif _listed(index, "transformer_2"):
        log.warning("%s lists transformer_2 but no boundary_ratio: only transformer runs (as diffusers').", folder)
    return {"boundary_ratio": None if ratio is None else float(ratio),
            "expand_timesteps": bool(index.get("expand_timesteps", False))}


def expert_stages(timesteps, boundary_timestep: float | None) -> list[tuple[int, int]]:
    """[(first step, expert), ...] over the schedule's ``timesteps``: expert 0 (``transformer``) where
    ``t >= boundary_timestep``, else 1 (``transformer_2``), as diffusers' WanPipeline picks them; one stage
    (expert 0) without a boundary."""
    if boundary_timestep is None:
        return [(0, 0)]
    experts = [0 if t >= boundary_timestep else 1 for t in np.asarray(timesteps, np.float64)]
    return [(n, e) for n, e in enumerate(experts) if n == 0 or experts[n - 1] != e]


class WanPipeline(VideoPipelineBase):
    """Text-to-video with Wan 2.1 — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)

    # Where the one-pass VAE decode would not fit the device, decode one latent frame at a time (the causal
    # convolutions' last frames carried), as diffusers always does: the same video, ~1/10 of the memory
    # (81 x 480 x 832 in bf16: 52 GiB one pass, 4.9 GiB frame by frame, XLA's memory analysis).
    LOW_MEMORY_DECODE = LOW_MEMORY_DECODE

    PIPELINE_CLASSES = ("WanPipeline",)
    CONFIG = wan.WanConfig
    SCHEDULERS = tuple(SCHEDULERS)
    STACKED = wan.STACKED

    def __init__(self, *, transformer_2=None, transformer_2_config=None, boundary_ratio: float | None = None,
                 expand_timesteps: bool = False, **parts):
        """``transformer_2`` / ``boundary_ratio``: Wan 2.2 A14B's low-noise expert and where it takes over (its
        config must equal ``transformer``'s); ``expand_timesteps``: TI2V-5B's flag (text-to-video: the same
        numbers as a timestep per sample)."""
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("transformer_2 and boundary_ratio go together (Wan 2.2 A14B's two experts).")
        if transformer_2 is not None and transformer_2_config != parts.get("transformer_config"):
            raise ValueError("transformer_2's config differs from transformer's; the two experts must share one "
                             "architecture (Wan 2.2 A14B's do).")
        self.transformer_2, self.boundary_ratio = transformer_2, boundary_ratio
        self.expand_timesteps = bool(expand_timesteps)
        super().__init__(**parts)
        self.scheduler = module_of(self.scheduler_config)  # flow_match or unipc

    @classmethod
    def _transformer_names(cls, folder) -> tuple[str, ...]:
        """Both experts where model_index.json sets a boundary (checked by :func:`pipeline_settings`)."""
        two = read_json(folder / "model_index.json").get("boundary_ratio") is not None
        return ("transformer", "transformer_2") if two else ("transformer",)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """model_index.json's ``boundary_ratio`` and ``expand_timesteps``."""
        return pipeline_settings(read_json(folder / "model_index.json"), folder)

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """(B, L, d) UMT5 states as diffusers makes them: the prompts cleaned (:func:`prompt_clean`), padded to
        ``max_sequence_length``, encoded with their mask, and each caption's states after its tokens zeroed."""
        ids, mask = tokenize(self.tokenizer, [prompt_clean(p) for p in prompts], max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        mask = self._put_replicated(jnp.asarray(mask, jnp.int32))
        states = self._text_encoder_fn()(ids, mask)
        return (states * (mask[..., None] > 0)).astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (UMT5 states,), and for image-to-video
        the condition: channels (mask and image latents) put after the latents' (diffusers' order), or with
        ``expand_timesteps`` (TI2V-5B) the image's latent frame put in place of frame 0, whose tokens then run at
        timestep 0; for Wan 2.1 I2V then the CLIP image states (``encoder_hidden_states_image``)."""
        first_frame = self.expand_timesteps

        def embed_args(x, texts, t):
            if len(texts) > 1 and first_frame:  # TI2V-5B: the image's latent frame in place of frame 0, timestep 0
                return x.at[:, :, :1].set(texts[1].astype(x.dtype)), t, texts[0], None, jnp.zeros_like(t)
            if len(texts) > 1:
                x = jnp.concatenate([x, texts[1].astype(x.dtype)], axis=1)
            return x, t, texts[0], (texts[2] if len(texts) > 2 else None)

        return self._flow_step_fn(do_cfg, warmup, embed_args, scheduler=self.scheduler)

    def _condition_shapes(self, latent_shape) -> tuple:
        """Shapes of the step's inputs after the text (image-to-video: its condition); none for text-to-video."""
        return ()

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of the latents (B, C, F, h, w), unscaled with the VAE's
        latents mean / std -> (B, F, H, W, 3) in [0, 1]."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, tiling=None, **kw):
            frame_chunk = None
            if tiling == LOW_MEMORY_DECODE:  # (diffusers' own loop: the same video at a tenth of the memory)
                frame_chunk, tiling = 1, None
            return vae_wan.decode(vae, vae_wan.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype),
                                  frame_chunk=frame_chunk, tiling=tiling, **kw)

        return self._jit_decode("fn", decode)

    def stages(self, timesteps) -> list[tuple[int, int]]:
        """:func:`expert_stages` of this pipeline: [(first step, expert)], expert 1 = ``transformer_2``."""
        boundary = None if self.boundary_ratio is None else \
            self.boundary_ratio * self.scheduler_config.num_train_timesteps
        return expert_stages(timesteps, boundary)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, C, F, h, w), diffusers' layout."""
        vc = self.vae_config
        s, st = vc.scale_factor_spatial, vc.scale_factor_temporal
        return (batch, self.transformer_config.in_channels, (num_frames - 1) // st + 1, height // s, width // s)

    def output_frames(self, num_frames: int) -> int:
        """Frames of the video made for ``num_frames``: ``(num_frames - 1) // 4 * 4 + 1`` (diffusers rounds such
        a count the same way, with a warning)."""
        st = self.vae_config.scale_factor_temporal
        return (num_frames - 1) // st * st + 1

    def schedule(self, num_inference_steps: int):
        return self.scheduler.make_schedule(self.scheduler_config, num_inference_steps)

    def _init_state(self, shape):
        if self.scheduler is unipc:  # (last sample, the previous converted model outputs)
            return unipc.init_state(shape, jnp.float32, self.scheduler_config.solver_order)
        return flow_match.init_state()

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, self.transformer_config.text_dim), self.dtype),
                 *(sd((n,) + shp[1:], jnp.float32) for shp in self._condition_shapes(shape)))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._latent_sharding(shape)),
                             jax.eval_shape(lambda: self._init_state(shape)))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, state, jnp.int32(0), kv, texts, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    def _video_tokens(self, latent_shape) -> int:
        """The transformer's video tokens for latents of ``latent_shape`` (B, C, F, h, w)."""
        pt, ph, pw = self.transformer_config.patch_size
        return (latent_shape[2] // pt) * (latent_shape[3] // ph) * (latent_shape[4] // pw)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, guidance_scale_2: float | None = None,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> WanPipelineOutput:
        """``guidance_scale_2``: a two-expert (Wan 2.2 A14B) pipeline's guidance in its low-noise steps (default:
        ``guidance_scale``, as diffusers')."""
        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              guidance_scale_2=guidance_scale_2, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress)

    def _generate(self, prompt, negative_prompt, *, height, width, num_frames, num_inference_steps, guidance_scale,
                  guidance_scale_2, prompt_embeds, negative_prompt_embeds, latents, max_sequence_length,
                  num_videos_per_prompt, seed, output_type, progress, condition=None, init=None) -> WanPipelineOutput:
        """The call; ``condition(latent_shape)``: the step's extra inputs of one video (a tuple: (1, C, T, h, w) the
        image condition, (1, N, d) the CLIP image states for Wan 2.1), the same for every row (image-to-video), or
        None; ``init(sched, latents, latent_shape, rng, timer) -> (schedule, initial latents)``: video-to-video's
        start (:class:`WanVideoToVideoPipeline`), or None."""
        if guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError("guidance_scale_2 is only for a two-expert pipeline (Wan 2.2 A14B: transformer_2 and "
                             "boundary_ratio); this one has one transformer.")
        if self.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, max(guidance_scale, guidance_scale_2 or 0.0))
        made = self.output_frames(num_frames)
        if made != num_frames:
            log.warning("num_frames=%d: the VAE makes %dk+1 frames; this video has %d (as diffusers').", num_frames,
                        self.vae_config.scale_factor_temporal, made)
        sched = self.schedule(num_inference_steps)  # refuses a step count the schedule cannot take, first
        do_cfg = guidance_scale > 1.0 or (guidance_scale_2 or 0.0) > 1.0
        timer = StageTimer()

        # 1. text: UMT5; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            texts = self._text_inputs(prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch, per,
                                      do_cfg, max_sequence_length)

        # 2. latents (diffusers' layout: B, C, F, h, w); image-to-video: the condition of each row
        shape = self.latent_shape(batch * per, height, width, num_frames)
        if condition is not None:
            with timer.stage("image_encoding"):
                conds = condition(shape)
                texts += tuple(self._put_condition(c, batch * per, do_cfg) for c in conds)
                jax.block_until_ready(texts)
        rng = jax.random.key(seed)
        if init is not None:
            sched, latents = init(sched, latents, shape, rng, timer)
        latents = self._initial_latents(latents, shape, rng, 1.0,
                                        "batch, channels, latent frames, height/8, width/8")

        # 3. denoise: one jitted step per iteration
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        experts = [(self.transformer, guidance_scale), (self.transformer_2, guidance_scale_2)]
        stages = [(first, nnx.split(experts[e][0])[1],
                   (texts, sched_arrays, self._put_replicated(jnp.float32(experts[e][1])), rng))
                  for first, e in self.stages(sched.timesteps)]
        state = jax.device_put(self._init_state(shape), self._latent_sharding(shape))
        finish = None
        if condition is not None and self.expand_timesteps:  # the first frame is the image's, as in every step
            first = conds[0][:, :, :1]
            finish = lambda lat: lat.at[:, :, :1].set(jnp.broadcast_to(first, lat[:, :, :1].shape))  # noqa
        out = self._denoise_and_decode(timer, do_cfg, latents, state, stages[0][2], len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), stages=stages, finish=finish,
                                       kv=self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape)))
        return WanPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _text_inputs(self, prompts, negative_prompt, prompt_embeds, negative_prompt_embeds, batch: int, per: int,
                     do_cfg: bool, max_sequence_length: int) -> tuple:
        """(UMT5 states,) of the step: the prompts' (or ``prompt_embeds``), [negative; positive] for CFG, placed as
        the transformer's batch (each row ``per`` times)."""
        tc = self.transformer_config
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
        emb = jnp.asarray(prompt_embeds, self.dtype)
        if emb.ndim != 3 or emb.shape[2] != tc.text_dim:
            raise ValueError(f"prompt_embeds {tuple(emb.shape)}: this model takes (batch, tokens, {tc.text_dim}).")
        if do_cfg:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch), emb.shape[1])
            nemb = jnp.asarray(negative_prompt_embeds, self.dtype)
            if nemb.shape != emb.shape:
                raise ValueError(f"negative_prompt_embeds {nemb.shape} must have the shape of prompt_embeds "
                                 f"{emb.shape}.")
            emb = jnp.concatenate([nemb, emb])
        texts = (self._put_batch(emb, do_cfg, per),)
        return jax.block_until_ready(texts)


def check_last_image(tc, given: bool) -> None:
    """Wan 2.1's CLIP-conditioned transformers: FLF2V (``pos_embed_seq_len``) takes the first and the last frame's
    states, I2V one image's; refuse the other count (diffusers fails on it deep inside the transformer)."""
    if not tc.takes_image:
        return
    if tc.pos_embed_seq_len is not None and not given:
        raise ValueError("This is a first-last-frame model (Wan 2.1 FLF2V: pos_embed_seq_len="
                         f"{tc.pos_embed_seq_len}, two images' CLIP states): give last_image too.")
    if tc.pos_embed_seq_len is None and given:
        raise ValueError("last_image: this Wan 2.1 I2V model conditions on one image's CLIP states; first-last-frame "
                         "videos need the FLF2V model (pos_embed_seq_len set).")


def _resizable(frame, height: int, width: int):
    """A uint8 (H, W, 3) frame of another size as a PIL image (resized by ``preprocess_image`` as diffusers resizes
    PIL frames); anything else as it is."""
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape[:2] != (height, width):
        from PIL import Image

        return Image.fromarray(frame)
    return frame


class WanVideoToVideoPipeline(WanVaeEncoding, WanPipeline):
    """Video-to-video with Wan 2.1 (diffusers' ``WanVideoToVideoPipeline``; SDEdit on videos) on a Wan text-to-video
    folder: the video's frames, resized to ``height`` x ``width``, are encoded by the Wan VAE (the posterior's mode,
    ``sample_mode="argmax"`` as diffusers; normalized by ``latents_mean`` / ``latents_std``) and noised to the sigma
    where the last ``int(num_inference_steps * strength)`` steps start
    (:func:`xdit_jax.schedulers.flow_match.video_strength_start`, diffusers' rule for this pipeline); only those
    steps run, the scheduler (UniPC or flow-matching Euler) started there afresh as diffusers' (no begin index:
    :func:`xdit_jax.schedulers.unipc.from_step`). The rest is :class:`WanPipeline`'s (its jitted step, CFG over
    ``cfg``, meshes, PipeFusion). The output has the video's frame count (4k + 1 of them: frames past the last such
    are dropped by the encoder, as diffusers').

    Known differences: the noise is a JAX draw from ``seed`` (diffusers': torch's ``generator``); custom
    ``timesteps`` are not taken; ``num_videos_per_prompt`` is honoured (diffusers' pipeline forces 1); two-expert
    (Wan 2.2 A14B) folders are refused (diffusers' pipeline has no second transformer)."""

    PIPELINE_CLASSES = ("WanVideoToVideoPipeline", "WanPipeline")

    def __call__(self, video=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 strength: float = 0.8,
                 num_videos_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> WanPipelineOutput:
        """diffusers' WanVideoToVideoPipeline call and defaults (480 x 832: :meth:`default_video`, 50 steps, guidance 5,
        strength 0.8; ``generator`` -> ``seed``). ``video``: the frames, a list of PIL images or (H, W, 3) arrays
        (uint8, resized as PIL images where their size differs; or floats in [0, 1] at ``height`` x ``width``), or an
        array (T, H, W, 3); ``latents``: initial latents (B, C, T', h, w) used as given (no video encoded, as
        diffusers; ``video`` may then be None)."""
        if self.boundary_ratio is not None:
            raise NotImplementedError("Video-to-video on a two-expert (Wan 2.2 A14B) folder: diffusers' "
                                      "WanVideoToVideoPipeline has no transformer_2; use a one-transformer Wan.")
        if self.scheduler is unipc and not self.scheduler_config.use_flow_sigmas:
            raise NotImplementedError("Video-to-video needs a flow-sigma scheduler (Wan's UniPC with use_flow_sigmas, "
                                      "or flow-matching Euler).")
        if video is None and latents is None:
            raise ValueError("WanVideoToVideoPipeline needs video=, the frames to start from (or latents=).")
        if video is not None and latents is not None:
            raise ValueError("Give either video or latents, not both (as diffusers).")
        frames = None if video is None else list(video)
        if frames is not None and not frames:
            raise ValueError("video= has no frames.")
        start = flow_match.video_strength_start(num_inference_steps, strength)
        if start >= num_inference_steps:
            raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no "
                             "denoising step (int(steps x strength) = 0); raise either.")
        dv = self.default_video()
        height = dv["height"] if height is None else height
        width = dv["width"] if width is None else width
        s = self.vae_config.scale_factor_temporal
        num_frames = len(frames) if frames is not None else (np.shape(latents)[2] - 1) * s + 1

        def init(sched, given, shape, rng, timer):
            sched = (unipc.from_step(self.scheduler_config, sched, start) if self.scheduler is unipc
                     else flow_match.from_step(sched, start))
            if given is not None:
                return sched, given
            with timer.stage("video_encoding"):
                pixels = jnp.concatenate([preprocess_image(_resizable(f, height, width), height, width)[:, :, None]
                                          for f in frames], axis=2)
                clean = self.image_latents(pixels)  # (1, C, T', h, w): the posterior's mode
                clean = jnp.broadcast_to(clean, shape)
                noised = flow_match.scale_noise(sched, clean, self._normal(jax.random.fold_in(rng, 2), shape))
                jax.block_until_ready(noised)
            return sched, noised

        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              guidance_scale_2=None, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress, init=init)


class WanImageToVideoPipeline(WanPipeline):
    """Image-to-video, diffusers' ``WanImageToVideoPipeline``. Wan 2.1 I2V-14B and Wan 2.2 I2V-A14B: the first frame
    (and optionally the last) encoded by the Wan VAE's encoder, a mask of the given frames and those latents
    concatenated to the noise latents' channels at every step (the transformer's ``in_channels``: latents + 4 mask +
    latents). Wan 2.1 also conditions on the image's CLIP states (``image_encoder``: the penultimate layer of a CLIP
    ViT-H/14 on the image as ``image_processor`` prepares it; 257 tokens), which every block cross-attends with their
    own K/V; FLF2V-14B (``pos_embed_seq_len``) on the first and the last frame's, side by side. TI2V-5B
    (``expand_timesteps``): the image's latent frame in place of the first latent frame at every step, its tokens at
    timestep 0 (``first_frame_timestep``), and in the result. Everything else as :class:`WanPipeline` (two experts,
    meshes, PipeFusion); the image encoders run once per call: the VAE's split over the mesh, the CLIP tower (float32)
    replicated."""

    def __init__(self, *, vae_encoder, image_encoder=None, image_encoder_config=None, image_processor=None,
                 **kwargs):
        """``image_encoder`` / ``image_encoder_config`` (:class:`xdit_jax.models.clip.CLIPVisionConfig`) /
        ``image_processor`` (transformers' ``CLIPImageProcessor``): Wan 2.1's CLIP image encoder and its
        preprocessing, required by a transformer with ``image_dim`` and taken by no other."""
        super().__init__(**kwargs)
        self.vae_encoder = vae_encoder
        vc, tc = self.vae_config, self.transformer_config
        want = vc.z_dim if self.expand_timesteps else 2 * vc.z_dim + vc.scale_factor_temporal
        if tc.in_channels != want:
            raise ValueError(f"transformer in_channels {tc.in_channels} is not "
                             f"{'the latents' if self.expand_timesteps else 'latents + mask + image latents'} "
                             f"({want}).")
        if tc.takes_image and (image_encoder is None or image_processor is None):
            raise ValueError("This transformer (image_dim set: Wan 2.1 I2V) cross-attends to CLIP image states: give "
                             "image_encoder, image_encoder_config and image_processor (the checkpoint's).")
        if image_encoder is not None and not tc.takes_image:
            raise ValueError("image_encoder given, but the transformer takes no image states (image_dim is None).")
        if image_encoder is not None and image_encoder_config is None:
            raise ValueError("image_encoder needs its image_encoder_config (xdit_jax.models.clip.CLIPVisionConfig).")
        if image_encoder is not None and image_encoder_config.hidden_size != tc.image_dim:
            raise ValueError(f"image_encoder's hidden_size {image_encoder_config.hidden_size} is not the "
                             f"transformer's image_dim {tc.image_dim}.")
        self.image_encoder, self.image_encoder_config = image_encoder, image_encoder_config
        self.image_processor = image_processor

    PIPELINE_CLASSES = ("WanImageToVideoPipeline", "WanPipeline")  # (TI2V-5B's folder says WanPipeline)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """As :class:`WanPipeline`'s, for a ``WanImageToVideoPipeline`` folder or TI2V-5B's (a ``WanPipeline`` folder
        with ``expand_timesteps``, as diffusers loads it); the VAE's encoder (``vae/encoder_params``, written by
        conversion) and Wan 2.1's CLIP image encoder."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_wan_encoder

        index = read_json(folder / "model_index.json")
        if kind == "WanPipeline" and not index.get("expand_timesteps"):
            raise ValueError(f"{folder} holds a text-to-video WanPipeline, not a WanImageToVideoPipeline (of the "
                             "WanPipeline folders only TI2V-5B's, with expand_timesteps, also takes an image).")
        replicated = NamedSharding(mesh, P())
        vc = vae_wan.WanVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        out = dict(super()._extra_parts(folder, mesh, dtype, kind),
                   vae_encoder=load_vae_encoder(folder, vc, dtype, replicated, vae_wan_encoder))
        if _listed(index, "image_encoder"):  # Wan 2.1 I2V / FLF2V: the CLIP vision tower and its preprocessing
            # in float32 whatever the pipeline's dtype (diffusers' recipe; 257 tokens once per call)
            cfg, encoder = load_component(folder, "image_encoder", jnp.float32, replicated)
            out.update(image_encoder=encoder, image_encoder_config=cfg, image_processor=load_image_processor(folder))
        return out

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, z_dim, F, h, w): the noise latents (the transformer's input adds the condition's channels)."""
        shape = super().latent_shape(batch, height, width, num_frames)
        return (shape[0], self.vae_config.z_dim) + shape[2:]

    def _condition_shapes(self, latent_shape) -> tuple:
        b, _, t, h, w = latent_shape
        if self.expand_timesteps:  # TI2V-5B: the image's latent frame
            return ((b, self.vae_config.z_dim, 1, h, w),)
        shapes = ((b, self.vae_config.scale_factor_temporal + self.vae_config.z_dim, t, h, w),)
        if self.image_encoder is not None:  # Wan 2.1: the CLIP image states (FLF2V: two images')
            tc = self.transformer_config
            tokens = tc.pos_embed_seq_len or self.image_encoder_config.num_positions
            shapes += ((b, tokens, tc.image_dim),)
        return shapes

    def encode_image(self, images) -> jnp.ndarray:
        """(1, N x 257, image_dim) float32: the penultimate CLIP states of ``images`` (a list: the first frame, or the
        first and the last for FLF2V) side by side, as diffusers' ``encode_image`` (``hidden_states[-2]``) and its
        image embedder's view make them. Images: PIL, or arrays (H, W, 3) uint8 or float in [0, 1] (rounded to uint8,
        as the processor's PIL backend does with floats)."""
        images = [rgb_image(im) for im in images]
        images = [np.round(im * 255).astype(np.uint8) if isinstance(im, np.ndarray) and im.dtype != np.uint8 else im
                  for im in images]
        pixels = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        if "clip" not in self._decode_cache:
            graphdef, state = nnx.split(self.image_encoder)

            @jax.jit
            def penultimate(state, pixels):  # (the encoder's own dtype: float32, see from_pretrained)
                return nnx.merge(graphdef, state).penultimate(pixels).astype(jnp.float32)

            self._decode_cache["clip"] = lambda px: penultimate(state, self._put_replicated(px))
        states = self._decode_cache["clip"](jnp.asarray(pixels, jnp.float32))
        return states.reshape(1, -1, states.shape[-1])

    def conditions(self, image, last_image, shape, image_embeds=None) -> tuple:
        """The step's inputs of one video beside the noise: (:meth:`image_condition`,) and for Wan 2.1 the CLIP image
        states (:meth:`encode_image`, or ``image_embeds`` given)."""
        cond = (self.image_condition(image, last_image, shape),)
        if self.image_encoder is None:
            return cond
        if image_embeds is None:
            image_embeds = self.encode_image([image] if last_image is None else [image, last_image])
        return cond + (jnp.asarray(image_embeds, jnp.float32).reshape(1, -1, self.transformer_config.image_dim),)

    def _check_images(self, last_image, image_embeds, num_frames: int) -> None:
        """Refuse what the image encoders cannot take, before any heavy work."""
        tc = self.transformer_config
        if last_image is not None and self.output_frames(num_frames) < 2:
            raise ValueError(f"last_image: a video of {self.output_frames(num_frames)} frame has no last frame apart "
                             f"from the first; give num_frames >= {self.vae_config.scale_factor_temporal + 1}.")
        if image_embeds is not None and self.image_encoder is None:
            raise ValueError("image_embeds are CLIP image states: only a Wan 2.1 image-to-video model (an image "
                             "encoder, image_dim set) takes them.")
        if self.image_encoder is None:
            return
        if image_embeds is None:
            check_last_image(tc, last_image is not None)
        if image_embeds is not None:
            want = tc.pos_embed_seq_len or self.image_encoder_config.num_positions
            got = np.shape(image_embeds)
            if got[-1] != tc.image_dim or int(np.prod(got[:-1])) != want:
                raise ValueError(f"image_embeds {got}: this model takes {want} CLIP states of width {tc.image_dim} "
                                 f"per video (e.g. ({want}, {tc.image_dim})).")

    def _encode_fn(self):
        """Jitted VAE encode (B, 3, F, H, W) in [-1, 1] -> scaled latents, replicated: frame 0 then chunks of four
        frames, as diffusers', the image plane split over every device of the mesh
        (:func:`xdit_jax.parallel.vae.sharded_encode`)."""
        if "encode" not in self._decode_cache:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from xdit_jax.models import vae_wan_encoder
            from xdit_jax.parallel.vae import sharded_encode

            graphdef, state = nnx.split(self.vae_encoder)
            vc, mesh = self.vae_config, self.mesh

            def encode(model, video):
                # diffusers' chunks of four frames in a scan: the activations of 4 frames alive, not of all 81
                return vae_wan_encoder.encode(model, video, frame_chunk=vae_wan_encoder.CHUNK)

            @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
            def enc(state, video):
                z = sharded_encode(encode, nnx.merge(graphdef, state), video.astype(self.dtype), mesh,
                                   factor=vc.scale_factor_spatial)
                return vae_wan_encoder.scale_latents(vc, z.astype(jnp.float32))

            self._decode_cache["encode"] = lambda video: enc(state, self._put_replicated(video))
        return self._decode_cache["encode"]

    def image_condition(self, image, last_image, shape) -> jnp.ndarray:
        """The condition (1, 4 + z_dim, T, h, w) of latents of ``shape``, as diffusers' ``prepare_latents``: the
        video [image, zeros..., (last_image)] encoded and scaled, after a mask of the given frames (frame 0's
        mask repeated ``scale_factor_temporal`` times, then folded into channels)."""
        _, _, t, h, w = shape
        st, s = self.vae_config.scale_factor_temporal, self.vae_config.scale_factor_spatial
        height, width = h * s, w * s
        frames = (t - 1) * st + 1
        first = preprocess_image(image, height, width)[:, :, None]
        if self.expand_timesteps:  # TI2V-5B: the image alone, one latent frame
            if last_image is not None:
                raise ValueError("last_image is not taken by TI2V-5B (expand_timesteps); give the first frame only.")
            return self._encode_fn()(first).astype(jnp.float32)
        parts = [first, jnp.zeros((1, 3, frames - 1 - (last_image is not None), height, width), jnp.float32)]
        if last_image is not None:
            parts.append(preprocess_image(last_image, height, width)[:, :, None])
        latents = self._encode_fn()(jnp.concatenate(parts, axis=2))
        given = jnp.zeros((frames,), jnp.float32).at[0].set(1.0)
        if last_image is not None:
            given = given.at[-1].set(1.0)
        given = jnp.concatenate([jnp.repeat(given[:1], st), given[1:]])  # (st * t,)
        mask = jnp.broadcast_to(given.reshape(t, st).T[None, :, :, None, None], (1, st, t, h, w))
        return jnp.concatenate([mask, latents.astype(jnp.float32)], axis=1)

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, last_image=None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_scale_2: float | None = None, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True, image_embeds=None) -> WanPipelineOutput:
        """``image``: the first frame (a PIL image, resized to ``width`` x ``height`` as diffusers does, or an
        array of that size); ``last_image``: the last frame too (first-last-frame: Wan 2.2 I2V-A14B, Wan 2.1
        FLF2V); ``image_embeds`` (Wan 2.1): CLIP image states to use instead of encoding ``image`` (diffusers'
        argument; one video's, e.g. (257, 1280)); the rest as :meth:`WanPipeline.__call__`."""
        if image is None:
            raise ValueError("image-to-video needs an image (the first frame).")
        self._check_images(last_image, image_embeds, num_frames or self.default_video()["num_frames"])
        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              guidance_scale_2=guidance_scale_2, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress,
                              condition=lambda shape: self.conditions(image, last_image, shape, image_embeds))


def load_image_processor(folder):
    """The checkpoint's ``image_processor`` (transformers' CLIP preprocessing: resize the short side, center crop,
    normalize; its PIL backend, which needs no torch); under ``from_config`` without that folder, CLIP's defaults
    (224 x 224, OpenAI's mean / std: the Wan 2.1 checkpoints')."""
    from pathlib import Path

    from xdit_jax.pipelines.denoise import _RANDOM_WEIGHTS
    from xdit_jax.safetensors_io import CheckpointError

    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as processor_class
    path = Path(folder) / "image_processor"
    if path.is_dir():
        return processor_class.from_pretrained(path)
    if _RANDOM_WEIGHTS.get() is not None:
        return processor_class()
    raise CheckpointError(f"{path} is missing: a Wan 2.1 image-to-video checkpoint ships its CLIP image processor "
                          "there (preprocessor_config.json); download the folder again or copy it from the hub's.")
