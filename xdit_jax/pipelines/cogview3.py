"""CogView3-Plus text-to-image, diffusers' ``CogView3PlusPipeline`` (THUDM/CogView3-Plus-3B) on a JAX mesh.

    pipe = CogView3PlusPipeline.from_pretrained("path/or/hub-id", mesh="cfg=2,ulysses=2", dtype="bfloat16")
    out = pipe("A photo of an astronaut riding a horse on mars.", height=1024, width=1024, guidance_scale=7.0)
    out.images   # (batch, height, width, 3) float in [0, 1]

CogVideoX's parts on an image: T5 (``max_sequence_length`` 224 tokens, padded, no mask), the transformer's joint
[text; image] sequence sharded over (ring, ulysses) by :func:`xdit_jax.parallel.sequence.run_blocks` or pipelined by
PipeFusion (each patch a run of the joint sequence, as CogVideoX's), CFG's two halves on the ``cfg`` axis, the
CogVideoX DDIM (or DPM) step inside the one jitted step, and the SD-style ``AutoencoderKL`` (16 latent channels)
decoding ``latents / scaling_factor`` split over the mesh. The size conditions ``original_size`` (default: the
image's), ``crops_coords_top_left`` (default (0, 0)) and the target size (the image's) are diffusers'.

The negative prompt as diffusers': without ``negative_prompt`` the unconditional half's text states are zeros (not
the encoded ""); with one, its T5 states. One difference on purpose: ``negative_prompt_embeds`` given without a
``negative_prompt`` are used (diffusers replaces them with zeros then).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax import schedulers
from xdit_jax.models import cogview3plus
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipeline
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.image import (  # noqa: F401  (this family's API too)
    ImagePipelineBase,
    ImagePipelineOutput,
    default_size,
    vae_scale_factor,
)

CogView3PipelineOutput = ImagePipelineOutput
MAX_SEQUENCE_LENGTH = 224  # diffusers' default prompt tokens
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 5.0  # diffusers' call defaults (the model card uses guidance 7.0)


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files."""
    return image.read_configs(folder, cogview3plus.CogView3PlusConfig)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = DEFAULT_GUIDANCE) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    s = vae_scale_factor(vc)
    check_size_and_mesh(height, width, s * tc.patch_size, tc.num_layers, batch, mesh_spec, guidance_scale)
    cogview3plus.check_input_shape(tc, height // s, width // s)  # the position table's size


class CogView3PlusPipeline(ImagePipelineBase):
    """Text-to-image with CogView3-Plus — see the module docstring."""

    PIPELINE_CLASSES = ("CogView3PlusPipeline",)
    CONFIG = cogview3plus.CogView3PlusConfig
    SCHEDULERS = CogVideoXPipeline.SCHEDULERS  # CogVideoXDDIMScheduler (the release's) or CogVideoXDPMScheduler
    STACKED = cogview3plus.STACKED

    # T5 as CogVideoX encodes it: ids padded to the length (truncated with diffusers' warning), no mask
    tokenize = CogVideoXPipeline.tokenize
    encode_prompt = CogVideoXPipeline.encode_prompt

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn` with the CogVideoX scheduler's update); ``texts``:
        (T5 states, the size conditions (3, 2): original size, target size, crop's top left)."""
        return self._flow_step_fn(do_cfg, warmup, lambda x, texts, t: (x, texts[0], t, *texts[1]),
                                  scheduler=schedulers.cogvideox)

    def _sizes(self, height: int, width: int, original_size, crops_coords_top_left):
        """The size conditions as the step takes them: (3, 2) float32 [original, target, crop], replicated."""
        sizes = np.asarray([original_size or (height, width), (height, width), crops_coords_top_left], np.float32)
        return self._put_replicated(jnp.asarray(sizes))

    def _kv_cache(self, step_batch: int, text_len: int, height: int, width: int, abstract: bool = False):
        """PipeFusion's K/V buffers for the joint [text; image] sequence; None without PipeFusion."""
        return self._pipefusion_buffers(step_batch, text_len + self._image_tokens(height, width), abstract)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it: for
        cost/memory analysis and communication accounting (:mod:`xdit_jax.parallel.comm`)."""
        ds = self.default_size()
        height, width = height or ds["height"], width or ds["width"]
        tc = self.transformer_config
        check_request(tc, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        do_cfg = guidance_scale > 1.0
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (jax.ShapeDtypeStruct((n, max_sequence_length, tc.text_embed_dim), self.dtype,
                                      sharding=self._batch_sharding(3, do_cfg)),
                 jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=self._replicated()))
        sched = jax.tree.map(jnp.asarray, schedulers.make_schedule(self.scheduler_config, num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._kv_cache(n, max_sequence_length, height, width, abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, latents, jnp.int32(0), kv, texts, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> CogView3PipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent");
        ``prompt_embeds`` / ``negative_prompt_embeds``: (B, L, d_model) T5 states; ``latents`` (B, C, h, w)."""
        ds = self.default_size()
        height, width = height or ds["height"], width or ds["width"]
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        tc = self.transformer_config
        check_request(tc, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        do_cfg = guidance_scale > 1.0
        timer = StageTimer()

        # 1. text: T5 states; with CFG [negative; prompt], the negative zeros unless given (diffusers')
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length)
            emb = jnp.asarray(prompt_embeds, self.dtype)
            if emb.ndim != 3 or emb.shape[2] != tc.text_embed_dim:
                raise ValueError(f"prompt_embeds {tuple(emb.shape)}: this model takes (batch, tokens, "
                                 f"{tc.text_embed_dim}) T5 states.")
            if do_cfg:
                if negative_prompt is not None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch), emb.shape[1])
                neg = jnp.zeros_like(emb) if negative_prompt_embeds is None else jnp.asarray(negative_prompt_embeds,
                                                                                            self.dtype)
                if neg.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {neg.shape} and prompt_embeds {emb.shape} must have the "
                                     "same shape (diffusers concatenates them).")
                emb = jnp.concatenate([neg, emb])
            texts = (self._put_batch(emb, do_cfg, per), self._sizes(height, width, original_size,
                                                                    crops_coords_top_left))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, h, w)
        shape = self.latent_shape(batch * per, height, width)
        sched = schedulers.make_schedule(self.scheduler_config, num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, jax.random.fold_in(rng, 1 << 20), sched.init_noise_sigma,
                                        "batch, channels, height/8, width/8")

        # 3. denoise (one jitted step per iteration), 4. decode
        state = jax.jit(schedulers.init_state, out_shardings=latents.sharding)(latents)
        args = (texts, jax.tree.map(jnp.asarray, sched), self._put_replicated(jnp.float32(guidance_scale)), rng)
        out = self._denoise_and_decode(timer, do_cfg, latents, state, args, num_inference_steps, progress,
                                       output_type, self._decode_fn(),
                                       kv=self._kv_cache(texts[0].shape[0], emb.shape[1], height, width))
        return CogView3PipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
