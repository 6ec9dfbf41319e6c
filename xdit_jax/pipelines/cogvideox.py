"""CogVideoX text-to-video, the diffusers ``CogVideoXPipeline`` on a JAX mesh.

    pipe = CogVideoXPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2", dtype="bfloat16")
    out = pipe("A small dog running on a beach.", num_frames=49, height=480, width=720, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

One denoising step (both CFG halves, guidance, scheduler update) is one jitted function; text
encoding and VAE decoding are their own jitted functions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax import schedulers
from xdit_jax.conversion import read_json
from xdit_jax.models import cogvideox, vae_cogvideox
from xdit_jax.pipelines.denoise import (
    StageTimer,
    as_numpy,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase

log = logging.getLogger("xdit_jax")
OFS = 2.0  # CogVideoXImageToVideoPipeline's ofs (CogVideoX1.5-I2V's transformer takes it)


@dataclasses.dataclass
class CogVideoXPipelineOutput:
    """``frames``: (B, F, H, W, 3) in [0, 1] for output_type="np"; the final latents
    (B, F, C, h, w), diffusers' layout, for output_type="latent". ``timings``: seconds per stage."""

    frames: np.ndarray
    timings: dict
    peak_memory_bytes: int | None = None


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 6.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work.

    ``tc``/``vc``: the transformer and VAE configs (cheap to read from a folder's config.json files).
    """
    step = 2 * int(vc.temporal_compression_ratio)
    if num_frames < 1 or (num_frames - 1) % step:
        lo = (max(num_frames, 1) - 1) // step * step + 1
        raise ValueError(f"num_frames={num_frames}: the VAE produces {step}k+1 frames "
                         f"(1, {1 + step}, ..., 49, ...); try {lo} or {lo + step}.")
    s = 2 ** (len(vc.block_out_channels) - 1)
    if tc.use_learned_positional_embeddings and (height, width) != (tc.sample_height * s, tc.sample_width * s):
        raise ValueError(f"{height} x {width}: this model's learned positional table (CogVideoX-5b-I2V) is for "
                         f"{tc.sample_height * s} x {tc.sample_width * s} videos only (as in diffusers); generate at "
                         "that size.")
    check_size_and_mesh(height, width, s * tc.patch_size, tc.num_layers, batch, mesh_spec, guidance_scale)


def default_video(tc, vc) -> dict:
    """Default height, width, frames and fps: diffusers' (the transformer's sample size x the VAE's
    spatial factor, its sample_frames, 8 fps), except CogVideoX1.5 (``patch_size_t``), whose config
    sample size (300) is no video size: there the release's 768 x 1360, 81 frames at 16 fps."""
    if tc.patch_size_t:
        return {"height": 768, "width": 1360, "num_frames": 81, "fps": 16}
    s = 2 ** (len(vc.block_out_channels) - 1)
    return {"height": tc.sample_height * s, "width": tc.sample_width * s, "num_frames": tc.sample_frames, "fps": 8}


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    folder = Path(folder)
    return (cogvideox.CogVideoXConfig.from_dict(read_json(folder / "transformer" / "config.json")),
            vae_cogvideox.CogVideoXVAEConfig.from_dict(read_json(folder / "vae" / "config.json")))


class CogVideoXPipeline(VideoPipelineBase):
    """Text-to-video with CogVideoX (2B, 5B, 1.5) — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)

    PIPELINE_CLASSES = ("CogVideoXPipeline",)
    CONFIG = cogvideox.CogVideoXConfig
    SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
    STACKED = cogvideox.STACKED

    def __init__(self, **parts):
        super().__init__(**parts)
        self.vae_scale_factor_spatial = 2 ** (len(self.vae_config.block_out_channels) - 1)
        self.vae_scale_factor_temporal = int(self.vae_config.temporal_compression_ratio)

    # ------------------------------------------------------------------ stages

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> np.ndarray:
        """Token ids as diffusers makes them: padded to max length, truncated with a warning."""
        return tokenize(self.tokenizer, prompts, max_sequence_length)[0]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 226) -> jax.Array:
        """(B, max_sequence_length, d_model) T5 embeddings (no attention mask, as diffusers)."""
        ids = self._put_replicated(jnp.asarray(self.tokenize(prompts, max_sequence_length), jnp.int32))
        return self._text_encoder_fn()(ids).astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng) ->
        (latents, sched_state, i + 1, kv)``; ``texts``: (T5 states,), and for image-to-video the image's latents
        (B, F, C, h, w), put after the latents' channels (diffusers' order); ``kv`` is PipeFusion's K/V buffers
        (None without it); ``warmup``: with PipeFusion, an exact step over the whole sequence (else a patched
        one). CogVideoX1.5-I2V's ``ofs`` is its pipeline's constant 2.0."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype
        ofs = OFS if self.transformer_config.ofs_embed_dim else None

        def blocks(params, joint, tokens, temb):  # runs on a local shard (xdit_jax.parallel.sequence)
            return self._model_blocks(nnx.merge(graphdef, params), joint, tokens, temb)

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            model = nnx.merge(graphdef, tstate)
            t = sched.timesteps[i]
            x = self._model_batch(latents, do_cfg).astype(dtype)
            if len(texts) > 1:  # image-to-video: the image's latents beside the noise's channels
                x = jnp.concatenate([x, texts[1].astype(dtype)], axis=2)
            joint, tokens, temb = model.embed(x, texts[0], jnp.broadcast_to(t, (x.shape[0],)), ofs,
                                              **self._embed_extra(texts))
            joint, kv = self._blocks_over_mesh(blocks, tstate, joint, tokens, temb, kv, warmup)
            pred = self._real_rows(model.head(joint, temb, x.shape).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:
                uncond, cond = jnp.split(pred, 2)
                pred = uncond + guidance[i] * (cond - uncond)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = schedulers.step(sched, i, pred, latents, sched_state, noise)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _model_blocks(self, model, joint, tokens, temb):
        """(Traced, on a local shard.) The transformer's block stack; ConsisID's takes PipeFusion's form there."""
        return model.blocks(joint, tokens, temb)

    def _embed_extra(self, texts) -> dict:
        """(Traced.) More keyword arguments of the transformer's ``embed`` from the step's ``texts`` (ConsisID: the
        identity tokens); none here."""
        return {}

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of the latents (B, F, C, h, w) -> (B, F, H, W, 3) in [0, 1]."""
        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, **kw):
            z = jnp.transpose(latents, (0, 2, 1, 3, 4)) / scaling  # (B, C, F, h, w)
            return vae_cogvideox.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int):
        """((B, F, C, h, w) of the latents, latent frames added in front for patch_size_t)."""
        tc = self.transformer_config
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        pt = tc.patch_size_t
        additional = (pt - latent_frames % pt) if pt and latent_frames % pt else 0
        return (batch, latent_frames + additional, tc.in_channels, height // self.vae_scale_factor_spatial,
                width // self.vae_scale_factor_spatial), additional

    def _kv_cache(self, latent_shape, step_batch: int, text_len: int, abstract: bool = False):
        """PipeFusion's K/V buffers (:meth:`PipelineBase._pipefusion_buffers`) for the joint [text; video]
        sequence of these shapes; None without PipeFusion."""
        tc = self.transformer_config
        f, (h, w) = latent_shape[1], latent_shape[3:]
        seq = text_len + (f // (tc.patch_size_t or 1)) * (h // tc.patch_size) * (w // tc.patch_size)
        return self._pipefusion_buffers(step_batch, seq, abstract)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                     max_sequence_length: int | None = None):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it:
        for cost/memory analysis and communication accounting (:mod:`xdit_jax.parallel.comm`)."""
        tc = self.transformer_config
        dv = self.default_video()
        height, width, num_frames = height or dv["height"], width or dv["width"], num_frames or dv["num_frames"]
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape, _ = self.latent_shape(batch, height, width, num_frames)
        seq = max_sequence_length or tc.max_text_seq_length
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        embeds = jax.ShapeDtypeStruct((n, seq, tc.text_embed_dim), self.dtype, sharding=self._batch_sharding(3, do_cfg))
        texts = (embeds, *(jax.ShapeDtypeStruct((n,) + shp[1:], jnp.float32,
                                                sharding=self._batch_sharding(len(shp), do_cfg))
                           for shp in self._condition_shapes(shape)))
        sched = jax.tree.map(jnp.asarray, schedulers.make_schedule(self.scheduler_config, num_inference_steps))
        guidance = jnp.asarray(schedulers.guidance_scales(sched, guidance_scale, False))
        _, tstate = nnx.split(self.transformer)
        # PipeFusion: the patched step (the warm-up step is the same program with one patch)
        kv = self._kv_cache(shape, embeds.shape[0], seq, abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, latents, jnp.int32(0), kv, texts, sched, guidance, jax.random.key(0)).compile()

    def _condition_shapes(self, latent_shape) -> tuple:
        """Shapes of the step's inputs after the text (image-to-video: the image's latents, ConsisID: its identity
        tokens too), each one row; none here."""
        return ()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
                 prompt_embeds=None, negative_prompt_embeds=None, latents=None, max_sequence_length: int = 226,
                 num_videos_per_prompt: int = 1, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> CogVideoXPipelineOutput:
        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              use_dynamic_cfg=use_dynamic_cfg, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress)

    def _generate(self, prompt, negative_prompt, *, height, width, num_frames, num_inference_steps, guidance_scale,
                  use_dynamic_cfg, prompt_embeds, negative_prompt_embeds, latents, max_sequence_length,
                  num_videos_per_prompt, seed, output_type, progress, condition=None) -> CogVideoXPipelineOutput:
        """The call; ``condition(latent_shape, rng)``: the image's latents of one video (1, F, C, h, w), the same for
        every row (image-to-video), or a tuple of such one-row inputs of the step (ConsisID: and its identity
        tokens), or None."""
        dv = self.default_video()
        height, width, num_frames = height or dv["height"], width or dv["width"], num_frames or dv["num_frames"]
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
            prompt_embeds = jnp.asarray(prompt_embeds, self.dtype)
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                max_sequence_length)
                negative_prompt_embeds = jnp.asarray(negative_prompt_embeds, self.dtype)
                if negative_prompt_embeds.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {negative_prompt_embeds.shape} and prompt_embeds "
                                     f"{prompt_embeds.shape} must have the same shape.")
                embeds = jnp.concatenate([negative_prompt_embeds, prompt_embeds])
            else:
                embeds = prompt_embeds
            embeds = self._put_batch(embeds, do_cfg, per)
            jax.block_until_ready(embeds)

        # 2. latents (diffusers layout: B, F, C, h, w); 1.5 pads latent frames to patch_size_t
        shape, additional = self.latent_shape(batch * per, height, width, num_frames)
        sched = schedulers.make_schedule(self.scheduler_config, num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, jax.random.fold_in(rng, 1 << 20), sched.init_noise_sigma,
                                        "batch, latent frames, channels, height/8, width/8")
        texts = (embeds,)
        if condition is not None:
            with timer.stage("image_encoding"):
                conds = condition(shape, jax.random.fold_in(rng, 2 << 20))
                texts += tuple(self._put_condition(c, batch * per, do_cfg)
                               for c in (conds if isinstance(conds, tuple) else (conds,)))
                jax.block_until_ready(texts)

        # 3. denoise: one jitted step per iteration
        guidance = jnp.asarray(schedulers.guidance_scales(sched, guidance_scale, use_dynamic_cfg))
        kv = self._kv_cache(shape, embeds.shape[0], embeds.shape[1])
        with timer.stage("denoising"):
            state = jax.jit(schedulers.init_state, out_shardings=latents.sharding)(latents)
            args = (texts, jax.tree.map(jnp.asarray, sched), guidance, rng)
            latents = self._denoise(do_cfg, latents, state, kv, args, num_inference_steps, progress)

        if output_type == "latent":
            return CogVideoXPipelineOutput(frames=as_numpy(latents), timings=timer.times,
                                           peak_memory_bytes=peak_memory_bytes())
        # 4. decode
        with timer.stage("decoding"):
            frames = as_numpy(jax.block_until_ready(self._decode_fn()(latents[:, additional:])))
        return CogVideoXPipelineOutput(frames=frames, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class CogVideoXImageToVideoPipeline(CogVideoXPipeline):
    """Image-to-video, diffusers' ``CogVideoXImageToVideoPipeline`` (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V): the image
    (resized as diffusers does) encoded by the VAE's encoder as a one-frame video, a sample of its latent distribution
    scaled (``scaling_factor``; its inverse where the VAE config says ``invert_scale_latents``, as diffusers), followed
    by zero frames, beside the noise latents' channels at every step (the transformer's ``in_channels``: twice the
    latents'). CogVideoX1.5-I2V's ``ofs`` is 2.0 and its latent frames are padded to a multiple of ``patch_size_t``
    with one more frame in front, dropped before decoding, as diffusers' (the image's latents sit at that frame 0,
    as there). 5B-I2V's learned positional table fixes its size to
    480 x 720. Everything else as :class:`CogVideoXPipeline` (every mesh, PipeFusion).

    Seeds: the image latents' sample uses the call's ``seed`` (diffusers' ``generator``); the numbers differ from
    torch's, the distribution does not."""

    def __init__(self, *, vae_encoder, **kwargs):
        super().__init__(**kwargs)
        self.vae_encoder = vae_encoder
        if self.transformer_config.in_channels != 2 * self.vae_config.latent_channels:
            raise ValueError(f"transformer in_channels {self.transformer_config.in_channels} is not twice the VAE's "
                             f"latent_channels {self.vae_config.latent_channels} (the noise and the image's latents): "
                             "not an image-to-video CogVideoX.")

    PIPELINE_CLASSES = ("CogVideoXImageToVideoPipeline",)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The VAE's encoder, read from ``vae/encoder_params`` (written by conversion)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_cogvideox_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        vc = vae_cogvideox.CogVideoXVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return {"vae_encoder": load_vae_encoder(folder, vc, dtype, NamedSharding(mesh, P()), vae_cogvideox_encoder)}

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int):
        """As :meth:`CogVideoXPipeline.latent_shape`, with the noise's channels (half the transformer's input)."""
        shape, additional = super().latent_shape(batch, height, width, num_frames)
        return shape[:2] + (self.vae_config.latent_channels,) + shape[3:], additional

    def _condition_shapes(self, latent_shape) -> tuple:
        return (latent_shape,)

    def _encode_fn(self):
        """Jitted VAE encode of one image (1, 3, 1, H, W) in [-1, 1] and a noise draw -> its scaled latent sample
        (1, 1, C, h, w), replicated; the image plane split over every device of the mesh
        (:func:`xdit_jax.parallel.vae.sharded_encode`)."""
        if "encode" not in self._decode_cache:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from xdit_jax.models import vae_cogvideox_encoder
            from xdit_jax.parallel.vae import sharded_encode

            graphdef, state = nnx.split(self.vae_encoder)
            vc, mesh = self.vae_config, self.mesh
            scale = 1.0 / vc.scaling_factor if vc.invert_scale_latents else vc.scaling_factor

            @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
            def enc(state, image, rng):
                mean, logvar = sharded_encode(vae_cogvideox_encoder.encode, nnx.merge(graphdef, state),
                                              image.astype(self.dtype), mesh, factor=self.vae_scale_factor_spatial)
                z = vae_cogvideox_encoder.sample(mean, logvar, self._image_noise(mean.shape, rng))
                return jnp.transpose(z.astype(jnp.float32), (0, 2, 1, 3, 4)) * scale  # (B, F, C, h, w)

            self._decode_cache["encode"] = lambda image, rng: enc(state, self._put_replicated(image), rng)
        return self._decode_cache["encode"]

    @staticmethod
    def _image_noise(shape, rng):
        """The standard normal draw of the image latents' sample (diffusers' ``latent_dist.sample(generator)``)."""
        return jax.random.normal(rng, shape, jnp.float32)

    def image_condition(self, image, shape, rng) -> jnp.ndarray:
        """The image's latents (1, F, C, h, w) for latents of ``shape`` (B, F, C, h, w), as diffusers'
        ``prepare_latents``: the encoded image's sample at frame 0 (with 1.5's padding that is the extra frame in
        front, dropped before decoding: as diffusers), zeros after."""
        from xdit_jax.pipelines.denoise import preprocess_image

        _, f, c, h, w = shape
        s = self.vae_scale_factor_spatial
        z = self._encode_fn()(preprocess_image(image, h * s, w * s)[:, :, None], rng)
        pt = self.transformer_config.patch_size_t
        if pt:  # diffusers' `first_frame = image_latents[:, : F % pt]` in front: nothing once F is a multiple
            assert f % pt == 0
        return jnp.concatenate([z, jnp.zeros((1, f - 1, c, h, w), jnp.float32)], axis=1)

    def _check_image_call(self, image, num_frames, prompt_embeds, max_sequence_length) -> None:
        """Refuse an image-to-video call without an image, or with a prompt length the learned table cannot take."""
        if image is None:
            raise ValueError("image-to-video needs an image (the first frame).")
        tc = self.transformer_config
        frames = num_frames or self.default_video()["num_frames"]
        if tc.use_learned_positional_embeddings and frames == tc.sample_frames and prompt_embeds is None \
                and max_sequence_length != tc.max_text_seq_length:
            raise ValueError(f"max_sequence_length={max_sequence_length}: this model's learned positional table "
                             f"(CogVideoX-5b-I2V) covers {tc.max_text_seq_length} text tokens at {tc.sample_frames} "
                             f"frames; use max_sequence_length={tc.max_text_seq_length}.")

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 6.0, use_dynamic_cfg: bool = False, prompt_embeds=None,
                 negative_prompt_embeds=None, latents=None, max_sequence_length: int = 226,
                 num_videos_per_prompt: int = 1, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> CogVideoXPipelineOutput:
        """``image``: the first frame (a PIL image, resized to ``width`` x ``height`` as diffusers does, or an array
        of that size); the rest as :meth:`CogVideoXPipeline.__call__`."""
        self._check_image_call(image, num_frames, prompt_embeds, max_sequence_length)
        return self._generate(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              use_dynamic_cfg=use_dynamic_cfg, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                              max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
                              seed=seed, output_type=output_type, progress=progress,
                              condition=lambda shape, rng: self.image_condition(image, shape, rng))
