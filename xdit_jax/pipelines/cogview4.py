"""CogView4 text-to-image (THUDM/CogView4-6B), diffusers' ``CogView4Pipeline`` on a JAX mesh.

    pipe = CogView4Pipeline.from_pretrained("THUDM/CogView4-6B", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A photo of an astronaut riding a horse on mars", num_inference_steps=50, guidance_scale=5.0, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: the GLM-4 encoder's ``hidden_states[-2]`` of the prompts padded to the batch's longest and then on
the left with the pad token to a multiple of 16, no attention mask (:func:`xdit_jax.models.glm.prompt_embeds`); the
negative prompt ("" by default) encoded alike at its own length; latents (B, 16, H / 8, W / 8) (H, W multiples of
16); timesteps ``linspace(1000, 1, n)`` truncated to integers (or the caller's), sigmas ``timesteps / 1000`` (or
the caller's), shifted by the scheduler with CogView4's own ``mu = sqrt(image tokens / base_image_seq_len) *
max_shift + base_shift`` (the scheduler's linear time shift); the transformer fed the timestep and SDXL's size
conditions (``original_size`` default (H, W), ``target_size`` (H, W), ``crops_coords_top_left`` (0, 0)); CFG when
``guidance_scale > 1`` as ``uncond + g (cond - uncond)``; the VAE decodes ``latents / scaling_factor``.
Defaults as diffusers: 1024 x 1024 (``sample_size`` x 8), 50 steps, guidance 5.

Over the mesh: prompts over ``data``, CFG's halves over ``cfg`` (diffusers runs the negative and the positive prompt
as two calls, each at its own text length: here one batch, the shorter text padded with masked tokens, which
changes nothing), the image tokens over ``ring`` x ``ulysses`` with the text as the attention's context sharded
with them, PipeFusion over the one stack of blocks (the text sliced with the patches).

Not supported: a ``generator`` (``seed`` instead); output types other than "np" and "latent"; callbacks and
``attention_kwargs``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import cogview4, glm
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    warn_if_truncated,
)
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, vae_scale_factor
from xdit_jax.schedulers import flow_match

CogView4PipelineOutput = ImagePipelineOutput
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = 50, 5.0, 1024


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, cogview4.CogView4Config)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' default: ``sample_size`` x the VAE's 8 (1024 x 1024 for CogView4-6B)."""
    side = (128 if tc is None else tc.sample_size) * (8 if vc is None else vae_scale_factor(vc))
    return {"height": side, "width": side}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = DEFAULT_GUIDANCE) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work (diffusers: height and
    width multiples of 16)."""
    check_size_and_mesh(height, width, max(16, tc.patch_size * vae_scale_factor(vc)), tc.num_layers, batch,
                        mesh_spec, guidance_scale)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25,
                    max_shift: float = 0.75) -> float:
    """CogView4's ``mu`` (its pipeline's own ``calculate_shift``: the square root of the token ratio)."""
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def make_schedule(cfg: flow_match.FlowMatchEulerConfig, num_inference_steps: int, image_seq_len: int,
                  timesteps=None, sigmas=None) -> flow_match.FlowMatchSchedule:
    """diffusers' CogView4Pipeline schedule: timesteps ``linspace(N, 1, n)`` (or the caller's) cast to int64 then
    float32, sigmas ``timesteps / N`` (or the caller's), both handed to ``set_timesteps`` with CogView4's ``mu``."""
    n_train = cfg.num_train_timesteps
    if timesteps is None:
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        timesteps = np.linspace(n_train, 1.0, int(num_inference_steps))
    timesteps = np.asarray(timesteps).astype(np.int64).astype(np.float32)
    sigmas = timesteps / n_train if sigmas is None else np.asarray(sigmas, np.float32)
    mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, 0.25 if cfg.base_shift is None else cfg.base_shift,
                         0.75 if cfg.max_shift is None else cfg.max_shift)
    return flow_match.make_schedule(cfg, sigmas=sigmas, timesteps=timesteps, mu=mu)


class CogView4Pipeline(ImagePipelineBase):
    """Text-to-image with CogView4 — see the module docstring."""

    PIPELINE_CLASSES = ("CogView4Pipeline",)
    CONFIG = cogview4.CogView4Config
    stacks = staticmethod(cogview4.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def _glm_fn(self):
        """``fn(ids) -> hidden_states[-2]`` of the GLM encoder (only the layers it needs), jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "glm" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_state(ids, None,
                                                                                   glm.HIDDEN_STATE_INDEX))
            fns["glm"] = lambda ids: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)))
        return fns["glm"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """(B, L, hidden) GLM states as diffusers' ``_get_glm_embeds`` (L: the batch's longest, a multiple of 16)."""
        warn_if_truncated(self.tokenizer, prompts, max_sequence_length)
        return glm.prompt_embeds(self.tokenizer, self.text_encoder, prompts, max_sequence_length,
                                 encode=self._glm_fn())

    def schedule(self, num_inference_steps: int, height: int, width: int, timesteps=None, sigmas=None):
        return make_schedule(self.scheduler_config, num_inference_steps, self._image_tokens(height, width),
                             timesteps, sigmas)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (GLM states (rows, L, hidden), text mask
        (rows, L), size conditions (rows, 6): original (h, w), target (h, w), crop (top, left))."""
        def embed_args(x, texts, t):
            states, mask, sizes = texts
            return x, states, t, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6], mask

        return self._flow_step_fn(do_cfg, warmup, embed_args)

    def _check_request(self, height, width, batch, guidance_scale):
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     text_tokens: int = 128):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it
        (``guidance_scale > 1``: the CFG step); ``text_tokens``: the text's length (a multiple of 16)."""
        ds = self.default_size()
        height, width = (ds[k] if v is None else v for k, v in (("height", height), ("width", width)))
        do_cfg = guidance_scale > 1
        tc = self.transformer_config
        self._check_request(height, width, batch, guidance_scale)
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, text_tokens, tc.text_embed_dim), self.dtype), sd((n, text_tokens), jnp.bool_),
                 sd((n, 6), jnp.float32))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps, height, width))
        _, tstate = nnx.split(self.transformer)
        texts = texts + self._condition_specs(shape)
        kv = self._pipefusion_buffers(n, self._image_tokens(height, width), abstract=True, text_len=text_tokens)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    def _conditions(self, height: int, width: int, batch: int, per: int, rng, timer) -> tuple:
        """More step inputs after the text's (CogView4 Control's control latents); none here."""
        return ()

    def _condition_specs(self, latent_shape: tuple) -> tuple:
        """:meth:`_conditions`' shapes for :meth:`compile_step`; none here."""
        return ()

    # ------------------------------------------------------------------ call

    def _text(self, embeds, what: str):
        width = self.transformer_config.text_embed_dim
        e = jnp.asarray(embeds, self.dtype)
        if e.ndim != 3 or e.shape[2] != width or e.shape[1] < 1:
            raise ValueError(f"{what} {tuple(e.shape)}: this model takes (batch, tokens, {width}) GLM states.")
        return e

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 timesteps=None, sigmas=None, guidance_scale: float = DEFAULT_GUIDANCE, num_images_per_prompt: int = 1,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, original_size=None,
                 crops_coords_top_left=(0, 0), max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> CogView4PipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent")."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_images_per_prompt)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        if prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give negative_prompt_embeds with prompt_embeds, not with a prompt (as diffusers).")
        do_cfg = guidance_scale > 1
        self._check_request(height, width, batch, guidance_scale)
        sched = self.schedule(num_inference_steps, height, width, timesteps, sigmas)  # refuses a bad schedule first
        original_size = (height, width) if original_size is None else tuple(original_size)
        if len(original_size) != 2 or len(tuple(crops_coords_top_left)) != 2:
            raise ValueError(f"original_size {original_size} and crops_coords_top_left {crops_coords_top_left} are "
                             "(height, width) / (top, left) pairs.")
        timer = StageTimer()

        # 1. text: GLM's hidden_states[-2]; [negative; prompt] for CFG at one length (the shorter's keys masked)
        with timer.stage("text_encoding"):
            pos = self._text(self.encode_prompt(prompts, max_sequence_length) if prompt_embeds is None
                             else prompt_embeds, "prompt_embeds")
            texts = [pos]
            if do_cfg:
                neg = self._text(self.encode_prompt(negative_prompts(negative_prompt, batch), max_sequence_length)
                                 if negative_prompt_embeds is None else negative_prompt_embeds,
                                 "negative_prompt_embeds")
                if neg.shape[0] != batch:
                    raise ValueError(f"negative_prompt_embeds has {neg.shape[0]} rows for {batch} prompts.")
                texts = [neg, pos]
            length = max(t.shape[1] for t in texts)
            states = jnp.concatenate([jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0))) for t in texts])
            mask = np.concatenate([np.arange(length)[None].repeat(t.shape[0], 0) < t.shape[1] for t in texts])
            sizes = np.asarray([*original_size, height, width, *crops_coords_top_left], np.float32)
            sizes = np.broadcast_to(sizes, (states.shape[0], 6))
            texts = (self._put_batch(states, do_cfg, per), self._put_batch(jnp.asarray(mask), do_cfg, per),
                     self._put_batch(jnp.asarray(sizes), do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, h, w); a subclass's conditions ride at the end of the step's texts
        shape = self.latent_shape(batch * per, height, width)
        rng = jax.random.key(seed)
        texts = texts + self._conditions(height, width, batch, per, rng, timer)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, channels, height/8, width/8")

        # 3. denoise: one jitted step per iteration, then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        guidance = self._put_replicated(jnp.float32(guidance_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._image_tokens(height, width), text_len=length)
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, guidance, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv)
        return CogView4PipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
