"""LTX-Video text-to-video and image-to-video, diffusers' ``LTXPipeline`` / ``LTXImageToVideoPipeline`` on a mesh.

    pipe = LTXPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A woman walks on a beach at sunset.", height=512, width=704, num_frames=161, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

T5 (128 tokens; the encoder sees the padding, as diffusers calls it without the mask; the transformer's
cross-attention masks it), the packed latents (B, S, C) as diffusers keeps them (``latents=`` takes its layout),
the flow-matching Euler schedule ``linspace(1, 1/N)`` shifted by ``mu = calculate_shift(video tokens)`` (the
scheduler config's ``base/max_image_seq_len``, ``base/max_shift``; LTX ships ``shift_terminal``), RoPE scaled by
``(VAE temporal ratio / frame_rate, spatial ratio, spatial ratio)``, CFG over the ``cfg`` axis with
``guidance_rescale``, the video tokens sharded over (ring, ulysses) by
:func:`xdit_jax.parallel.sequence.run_blocks`. The decode: latents denormalized by the VAE's per-channel
statistics; a timestep-conditioned VAE (0.9.1+) gets ``decode_timestep`` and the latents mixed with noise by
``decode_noise_scale`` (default: the decode timestep), as diffusers; the noise is drawn from the call's seed (JAX's
generator: not torch's numbers). The VAE decode is split over the mesh (:mod:`xdit_jax.models.vae_ltx`).

Image-to-video (``LTXImageToVideoPipeline``): the image encoded by the VAE's encoder
(:mod:`xdit_jax.models.vae_ltx_encoder`; the posterior sampled with a JAX key), normalized, as the first latent
frame; its tokens at timestep 0 in the transformer (diffusers' ``t * (1 - conditioning_mask)``) and kept through
the scheduler steps (only the later frames are stepped).

Differences from diffusers, by design: the latents stay float32 between steps also in bf16, and so does the
timestep the transformer sees. PipeFusion (``pipefusion`` mesh axis, or ``pipefusion_patches``) splits the
stacked blocks into stages and the video into patches (the RoPE tables and the image frame's mask travel with each
patch; the caption is cross-attended whole).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import ltx, vae_ltx
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    masked_text_for_cfg,
    peak_memory_bytes,
    per_prompt,
    preprocess_image,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

LTXPipelineOutput = CogVideoXPipelineOutput
MAX_SEQUENCE_LENGTH = 128


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, ltx.LTXConfig, vae_ltx.LTXVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 512 x 704, 161 frames at 25 fps."""
    return {"height": 512, "width": 704, "num_frames": 161, "fps": 25}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 3.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    check_size_and_mesh(height, width, vc.spatial_ratio * tc.patch_size, tc.num_layers, batch, mesh_spec,
                        guidance_scale)


def pack(latents, p: int = 1, pt: int = 1):
    """diffusers' ``_pack_latents``: (B, C, F, H, W) -> (B, F/pt * H/p * W/p, C * pt * p * p)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // pt, pt, h // p, p, w // p, p).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


def unpack(latents, frames: int, height: int, width: int, p: int = 1, pt: int = 1):
    """diffusers' ``_unpack_latents``: the inverse of :func:`pack`; frames, height, width in patches."""
    b = latents.shape[0]
    x = latents.reshape(b, frames, height, width, -1, pt, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, -1, frames * pt, height * p, width * p)


class LTXPipeline(VideoPipelineBase):
    """Text-to-video with LTX-Video — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    _vae = vae_ltx

    PIPELINE_CLASSES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")  # (one set of parts)
    CONFIG = ltx.LTXConfig
    STACKED = ltx.STACKED
    I2V = False


    # ------------------------------------------------------------------ shapes

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """(latent frames, rows, columns) of the transformer's tokens (in patches)."""
        vc, tc = self.vae_config, self.transformer_config
        s, st = vc.spatial_ratio, vc.temporal_ratio
        return ((num_frames - 1) // st + 1) // tc.patch_size_t, height // s // tc.patch_size, \
            width // s // tc.patch_size

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """diffusers' packed latents: (B, tokens, C * pt * p * p)."""
        tc = self.transformer_config
        f, h, w = self.latent_grid(height, width, num_frames)
        return (batch, f * h * w, tc.in_channels)

    def output_frames(self, num_frames: int) -> int:
        st = self.vae_config.temporal_ratio
        return (num_frames - 1) // st * st + 1

    def schedule(self, num_inference_steps: int, video_tokens: int):
        """diffusers' sigmas ``linspace(1, 1/N, N)`` shifted by ``mu`` of the video token count."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        sc = self.scheduler_config
        mu = flow_match.calculate_shift(video_tokens, sc.base_image_seq_len or 256, sc.max_image_seq_len or 4096,
                                        0.5 if sc.base_shift is None else sc.base_shift,
                                        1.15 if sc.max_shift is None else sc.max_shift)
        return flow_match.make_schedule(sc, sigmas=sigmas, mu=mu)

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """((B, L, d) T5 embeddings, (B, L) mask) as diffusers makes them (T5 run without the mask)."""
        ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        ids = self._put_replicated(jnp.asarray(ids, jnp.int32))
        return self._text_encoder_fn()(ids, None).astype(self.dtype), jnp.asarray(mask, jnp.int32)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng)``; ``texts``: (T5
        embeds, mask, rope_interpolation_scale); ``guidance``: (scale, rescale). The latent grid is the call's
        (``self._grid``, part of the cache key)."""
        grid, i2v = self._grid, self.I2V
        key = ("ltx", do_cfg, warmup, grid, i2v)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        first_tokens = grid[1] * grid[2]

        def blocks(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            emb, mask, rope_scale = texts
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(sched.timesteps[i], (x.shape[0],))
            h, tokens, cond = model.embed(x.astype(dtype), emb, t, mask, *grid, rope_scale,
                                          jnp.zeros_like(t) if i2v else None)
            h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond, kv, warmup)
            pred = model.head(h, cond, x.shape, tokens).astype(jnp.float32)
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:
                from xdit_jax.pipelines.hunyuandit import rescale_guidance

                scale, rescale = guidance[0], guidance[1]
                uncond, text = jnp.split(pred, 2)
                pred = uncond + scale * (text - uncond)
                pred = jnp.where(rescale > 0, rescale_guidance(pred, text, rescale), pred)
            new, sched_state = flow_match.step(sched, i, pred, latents, sched_state)
            if i2v:  # the image's latent frame is kept (diffusers steps only frames 1:)
                new = jnp.where((jnp.arange(new.shape[1]) < first_tokens)[None, :, None], latents, new)
            return self._step_out(new, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_ltx(self, decode_timestep):
        """Jitted decode of denormalized latents (B, C, F, h, w) at ``decode_timestep`` (a tuple per sample, or
        None for a VAE without timestep conditioning) -> (B, F', H, W, 3) in [0, 1]."""
        temb = None if decode_timestep is None else np.asarray(decode_timestep, np.float32)

        def decode(vae, z, **kw):
            return vae_ltx.decode(vae, z.astype(self.dtype), None if temb is None else jnp.asarray(temb), **kw)

        return self._jit_decode(("ltx", None if temb is None else tuple(temb.tolist())), decode)

    def decode_latents(self, latents, grid, batch: int, decode_timestep, decode_noise_scale, rng):
        """diffusers' decode of the packed latents: unpacked, denormalized, for a timestep-conditioned VAE mixed
        with noise by ``decode_noise_scale`` and decoded at ``decode_timestep``."""
        tc, vc = self.transformer_config, self.vae_config
        z = unpack(jnp.asarray(latents, jnp.float32), *grid, tc.patch_size, tc.patch_size_t)
        z = vae_ltx.denormalize(self.vae, z)
        temb = None
        if vc.timestep_conditioning:
            temb = list(decode_timestep) if isinstance(decode_timestep, (list, tuple)) else [decode_timestep] * batch
            if decode_noise_scale is None:
                scale = temb
            else:
                scale = list(decode_noise_scale) if isinstance(decode_noise_scale, (list, tuple)) else \
                    [decode_noise_scale] * batch
            if len(temb) != batch or len(scale) != batch:
                raise ValueError(f"decode_timestep / decode_noise_scale: one value, or one per video ({batch}).")
            s = jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1, 1, 1)
            noise = jax.random.normal(jax.random.fold_in(rng, 1 << 20), z.shape, jnp.float32)
            z = (1 - s) * z + s * noise
            temb = tuple(float(v) for v in temb)
        return self._decode_ltx(temb)(z)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        self._grid = self.latent_grid(height, width, num_frames)
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, self.transformer_config.caption_channels), self.dtype),
                 sd((n, max_sequence_length), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.float32))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps, shape[1]))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, shape[1], abstract=True)  # PipeFusion: the patched step
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched,
            jnp.asarray([guidance_scale, 0.0], jnp.float32), jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def _initial_packed(self, latents, shape, grid, rng, image, height, width):
        """The initial packed latents: Gaussian (or the given ones) — image-to-video overrides it."""
        return self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                     "batch, tokens (latent frames x rows x columns), channels: diffusers' packed "
                                     "latents")

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, image=None, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 frame_rate: float | None = None, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 guidance_rescale: float = 0.0, prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_embeds=None, negative_prompt_attention_mask=None, latents=None,
                 decode_timestep=0.0, decode_noise_scale=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> LTXPipelineOutput:
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        frame_rate = dv["fps"] if frame_rate is None else frame_rate
        if self.I2V and image is None and latents is None:
            raise ValueError("LTXImageToVideoPipeline needs an image (or latents holding its first frame).")
        if not self.I2V and image is not None:
            raise ValueError("LTXPipeline is text-to-video; load an LTXImageToVideoPipeline for an image input "
                             "(LTXImageToVideoPipeline.from_pretrained on the same folder).")
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "(with prompt_attention_mask)")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("prompt_embeds need prompt_attention_mask (the transformer attends to the kept tokens).")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds need negative_prompt_attention_mask.")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}.")
        if frame_rate <= 0:
            raise ValueError(f"frame_rate must be positive, got {frame_rate}.")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        made = self.output_frames(num_frames)
        if made != num_frames:
            log.warning("num_frames=%d: the VAE makes %dk+1 frames; this video has %d (as diffusers').", num_frames,
                        self.vae_config.temporal_ratio, made)
        grid = self.latent_grid(height, width, num_frames)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        sched = self.schedule(num_inference_steps, shape[1])
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()
        tc, vc = self.transformer_config, self.vae_config

        # 1. text: T5 with its mask; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            emb, mask = masked_text_for_cfg(self, prompts, batch, tc.caption_channels, do_cfg, max_sequence_length,
                                            prompt_embeds, prompt_attention_mask, negative_prompt,
                                            negative_prompt_embeds, negative_prompt_attention_mask)
            scale = jnp.asarray([vc.temporal_ratio / frame_rate, vc.spatial_ratio, vc.spatial_ratio], jnp.float32)
            texts = (self._put_batch(emb, do_cfg, per), self._put_batch(mask, do_cfg, per),
                     self._put_replicated(scale))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' packed layout)
        rng = jax.random.key(seed)
        with timer.stage("image_encoding" if self.I2V else "latents"):
            latents = self._initial_packed(latents, shape, grid, rng, image, height, width)

        # 3. denoise: one jitted step per iteration
        self._grid = grid
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.asarray([guidance_scale, guidance_rescale], jnp.float32))
        with timer.stage("denoising"):
            kv = self._pipefusion_buffers(texts[0].shape[0], shape[1])
            latents = self._denoise(do_cfg, latents, flow_match.init_state(), kv,
                                    (texts, sched_arrays, guidance, rng), len(sched.timesteps), progress)
        if output_type == "latent":
            out = np.asarray(jax.device_get(latents))
        else:
            with timer.stage("decoding"):
                out = np.asarray(jax.device_get(jax.block_until_ready(
                    self.decode_latents(latents, grid, batch * per, decode_timestep, decode_noise_scale, rng))))
        return LTXPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class LTXImageToVideoPipeline(LTXPipeline):
    """Image-to-video with LTX-Video: the image is the first frame — see the module docstring."""

    PIPELINE_CLASSES = ("LTXImageToVideoPipeline", "LTXPipeline", "LTXConditionPipeline")
    I2V = True

    def __init__(self, *, vae_encoder=None, **parts):
        self.vae_encoder = vae_encoder
        super().__init__(**parts)

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, **kwargs) -> LTXPipelineOutput:
        """As diffusers' ``LTXImageToVideoPipeline.__call__(image, prompt, ...)``: the first frame (a PIL image or an
        array (H, W, 3), resized to the video's size) and :meth:`LTXPipeline.__call__`'s arguments."""
        return super().__call__(prompt, negative_prompt, image=image, **kwargs)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The VAE's encoder (conversion writes it beside the decoder)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_ltx_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        vc = vae_ltx.LTXVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return {"vae_encoder": load_vae_encoder(folder, vc, dtype, NamedSharding(mesh, P()), vae_ltx_encoder)}

    def encode_image(self, image, height: int, width: int, rng):
        """diffusers' ``prepare_latents`` image half: the VAE posterior of the image (one frame) sampled
        (``retrieve_latents``), normalized by the per-channel statistics -> (1, C, 1, h, w) float32."""
        pixels = preprocess_image(image, height, width)[:, :, None]  # (1, 3, 1, H, W)
        return self._sample_posterior(pixels, jax.random.fold_in(rng, 1 << 21))

    def _sample_posterior(self, pixels, key):
        """The VAE posterior of ``pixels`` (1, 3, F, H, W) in [-1, 1] sampled with ``key`` and normalized by the
        latents' statistics -> (1, C, f, h, w) float32 (the encoder one jitted program, shared by the pipelines of a
        process with the same encoder)."""
        if self.vae_encoder is None:
            raise ValueError(f"This pipeline has no VAE encoder: load it with {type(self).__name__}.from_pretrained.")
        graphdef, state = nnx.split(self.vae_encoder)
        mean, logvar = _encoder_moments(graphdef, jnp.dtype(self.dtype).name, state, self._put_replicated(pixels))
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return vae_ltx.normalize(self.vae, z)

    def _initial_packed(self, latents, shape, grid, rng, image, height, width):
        """diffusers: the image's latent as the first latent frame, Gaussian noise in the others (given
        ``latents``: used as they are, their first frame the condition)."""
        if latents is not None:
            return super()._initial_packed(latents, shape, grid, rng, image, height, width)
        tc = self.transformer_config
        cond = self.encode_image(image, height, width, rng)  # (1, C, 1, h, w)
        c = cond.shape[1]
        noise = jax.random.normal(rng, (shape[0], c, grid[0] * tc.patch_size_t, grid[1] * tc.patch_size,
                                        grid[2] * tc.patch_size), jnp.float32)
        first = (jnp.arange(noise.shape[2]) == 0)[None, None, :, None, None]
        z = jnp.where(first, jnp.broadcast_to(cond, (shape[0], c, 1) + cond.shape[3:]), noise)
        return jax.device_put(pack(z, tc.patch_size, tc.patch_size_t), self._latent_sharding(shape))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encoder_moments(graphdef, dtype: str, state, x):
    """(mean, logvar) float32 of the LTX VAE encoder (``graphdef`` / ``state``) on ``x`` in ``dtype``."""
    from xdit_jax.models import vae_ltx_encoder

    mean, logvar = vae_ltx_encoder.encode(nnx.merge(graphdef, state), x.astype(dtype))
    return mean.astype(jnp.float32), logvar.astype(jnp.float32)
