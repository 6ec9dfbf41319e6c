"""Ovis-Image text-to-image (AIDC-AI/Ovis-Image-7B), diffusers' ``OvisImagePipeline`` on a JAX mesh.

    pipe = OvisImagePipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe('A poster with the words "OVIS-IMAGE"', negative_prompt="", seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

FLUX.1's pipeline (:class:`xdit_jax.pipelines.flux.FluxPipeline`: packed 2 x 2 latents, sigmas ``linspace(1, 1/n,
n)`` with ``mu`` from the packed sequence length where the scheduler shifts dynamically, FLUX's VAE with its shift
and scale, the decode split over the mesh) with Ovis-Image's text and guidance, as diffusers 0.42.1:

* each prompt is put after Ovis' system prompt (:data:`SYSTEM_PROMPT`) in one user message of Qwen3's chat template
  (``add_generation_prompt=True, enable_thinking=False``), tokenized without special tokens, padded and truncated to
  ``max_sequence_length + 28`` (at most 256 + 28); the Qwen3 encoder (:mod:`xdit_jax.models.qwen3`) runs with the
  tokenizer's mask and its ``last_hidden_state`` (after the final norm), zeroed on the padding, loses its first 28
  tokens (``user_prompt_begin_id``: the template and system prompt) -> (B, max_sequence_length, hidden), no mask
  for the transformer;
* the text's RoPE ids are (0, i, i) (:func:`xdit_jax.models.ovis_image.text_ids`), the image's FLUX's (0, row, col);
* classifier-free guidance when ``guidance_scale > 1`` (default 5), the negative prompt "" by default:
  ``neg + g (pos - neg)``, both halves in one batch (split over ``cfg=2``).

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the image tokens over ``ring`` x ``ulysses`` (padded
to any degree), the text sharded with them and joining every attention as the context
(:meth:`xdit_jax.models.flux.FluxTransformer2DModel.blocks`, ``run_blocks(..., text=TEXT_KEYS)``); PipeFusion splits
both block stacks over all stages (FLUX's looped two-stack form), the text sliced with the patches.

Known differences: t x 1000 enters its sinusoid in float32 also in bf16 (diffusers rounds it to the model dtype
first); both CFG halves run in one batch, so ``prompt_embeds`` and ``negative_prompt_embeds`` (or the negative prompt's
encoding at ``max_sequence_length``) must have the same length (diffusers runs them in two passes; a clear error here);
``negative_prompt_embeds`` are taken beside the default ``negative_prompt=""`` (diffusers 0.42.1 refuses the pair
unless ``negative_prompt=None`` is given); ``generator`` -> ``seed`` (JAX draws); custom ``sigmas``,
``joint_attention_kwargs`` and callbacks are not taken; output types "np" and "latent".
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import flux, ovis_image, qwen3
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
from xdit_jax.pipelines.flux import FluxPipeline, default_size, pack_latents  # noqa: F401  (this family's API too)
from xdit_jax.pipelines.image import ImagePipelineOutput, vae_scale_factor
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

OvisImagePipelineOutput = ImagePipelineOutput
DEFAULT_STEPS = 50  # diffusers' OvisImagePipeline defaults
DEFAULT_GUIDANCE = 5.0
MAX_SEQUENCE_LENGTH = 256
SYSTEM_PROMPT = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial "
                 "relationships of the objects and background: ")
USER_PROMPT_BEGIN_ID = 28  # the templated tokens before the prompt's, dropped from the encoder's output


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, ovis_image.OvisImageConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = DEFAULT_GUIDANCE) -> None:
    """Refuse what the model cannot take, before any heavy work (``cfg=2`` needs ``guidance_scale > 1``)."""
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), ovis_image.pipefusion_stacks(tc)["stacked_layers"],
                        batch, mesh_spec, guidance_scale)


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """diffusers' ``_get_messages``: the system prompt and the prompt in one user message of the chat template."""
    return qwen3.format_prompts(tokenizer, [SYSTEM_PROMPT + p for p in prompts], enable_thinking=False)


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """(ids, mask) (B, max_sequence_length + 28) as diffusers' ``_get_ovis_prompt_embeds`` makes them."""
    messages = format_prompts(tokenizer, prompts)
    length = max_sequence_length + USER_PROMPT_BEGIN_ID
    enc = tokenizer(messages, padding="max_length", truncation=True, max_length=length, add_special_tokens=False,
                    return_tensors="np")
    warn_if_truncated(tokenizer, messages, length)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


class OvisImagePipeline(FluxPipeline):
    """Text-to-image with Ovis-Image — see the module docstring."""

    PIPELINE_CLASSES = ("OvisImagePipeline",)
    CONFIG = ovis_image.OvisImageConfig
    MORE_TEXT_ENCODERS = ()  # Qwen3 only
    stacks = staticmethod(ovis_image.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """(B, max_sequence_length, hidden) Qwen3 states as diffusers' ``_get_ovis_prompt_embeds``: the last hidden
        state, zeroed on the padding, without the first 28 tokens."""
        ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        out = self._text_encoder_fn()(self._put_replicated(jnp.asarray(ids)), self._put_replicated(jnp.asarray(mask)))
        states = out.last_hidden_state * jnp.asarray(mask, out.last_hidden_state.dtype)[..., None]
        return states[:, USER_PROMPT_BEGIN_ID:].astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng) ->
        (latents, sched_state, i + 1, kv)``; ``texts``: (Qwen3 states,); ``scale``: the CFG scale; ``rope``: the
        image and text RoPE tables; ``kv``: PipeFusion's K/V buffers (``warmup``: an exact step that fills them) or
        None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence / pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng):
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (x.shape[0],))
            model = nnx.merge(graphdef, tstate)
            h, tokens, cond, _ = model.embed(x.astype(dtype), texts[0], t, rope=rope)
            h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond, kv, warmup)
            pred = self._real_rows(model.head(h, cond).astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:  # [negative; positive]
                neg, pos = jnp.split(pred, 2)
                pred = neg + scale * (pos - neg)
            noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32) \
                if sched.needs_noise else None
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state, noise)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _text(self, embeds, what: str):
        tc = self.transformer_config
        embeds = jnp.asarray(embeds, self.dtype)
        if embeds.ndim != 3 or embeds.shape[2] != tc.joint_attention_dim:
            raise ValueError(f"{what} {tuple(embeds.shape)}: this model takes (batch, tokens, "
                             f"{tc.joint_attention_dim}) Qwen3 states.")
        return embeds

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = "", *,
                 guidance_scale: float = DEFAULT_GUIDANCE, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> OvisImagePipelineOutput:
        """diffusers' OvisImagePipeline call and defaults (50 steps, guidance 5, the negative prompt "", 256 text
        tokens; ``generator`` -> ``seed``). ``latents``: packed (B, (H/16)(W/16), 4C) as diffusers'."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        if negative_prompt_embeds is not None and negative_prompt not in (None, ""):
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        if max_sequence_length > MAX_SEQUENCE_LENGTH or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}] (diffusers' limit), got "
                             f"{max_sequence_length}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        do_cfg = guidance_scale > 1
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        timer = StageTimer()
        tc = self.transformer_config

        # 1. text: Qwen3 states; [negative; positive] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
            emb = self._text(prompt_embeds, "prompt_embeds")
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                max_sequence_length)
                nemb = self._text(negative_prompt_embeds, "negative_prompt_embeds")
                if nemb.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {nemb.shape} must have the shape of prompt_embeds "
                                     f"{emb.shape} (both halves run in one batch).")
                emb = jnp.concatenate([nemb, emb])
            elif negative_prompt_embeds is not None:
                log.warning("negative_prompt_embeds are not used: guidance needs guidance_scale > 1 (as in diffusers).")
            texts = (self._put_batch(emb, do_cfg, per),)
            jax.block_until_ready(texts)

        # 2. latents (packed, diffusers' layout), RoPE tables, schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(num_inference_steps, shape[1])
        rng = jax.random.key(seed)
        if latents is None:
            latents = pack_latents(jax.random.normal(rng, (batch * per, tc.in_channels // 4, h, w), jnp.float32))
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, (height/16) x (width/16) tokens, channels x 4")
        rope = (flux.rope_tables(flux.image_ids(h // 2, w // 2), tc.axes_dims_rope),
                flux.rope_tables(ovis_image.text_ids(emb.shape[1]), tc.axes_dims_rope))
        rope = jax.tree.map(self._put_replicated, rope)

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(guidance_scale))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rope, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn((h, w)),
                                       kv=self._pipefusion_buffers(len(texts[0]), shape[1], text_len=emb.shape[1]))
        return OvisImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
