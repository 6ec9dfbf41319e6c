"""Lumina-Image 2.0 text-to-image (Alpha-VLLM/Lumina-Image-2.0), diffusers' ``Lumina2Pipeline`` on a JAX mesh.

    pipe = Lumina2Pipeline.from_pretrained("Alpha-VLLM/Lumina-Image-2.0", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", num_inference_steps=30, guidance_scale=4.0, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: each prompt prefixed with the system prompt (``system_prompt + " <Prompt Start> " + prompt``; the
negative prompt, "" by default, without it), Gemma 2 on the tokens padded on the right to ``max_sequence_length``
(256), ``hidden_states[-2]`` and the attention mask (the transformer reads its row sums: here the kept-token counts,
the caption array cropped to the batch's longest prompt rounded up to 32 tokens: the padded keys are masked either
way); latents (B, 16, H / 8, W / 8) (H, W multiples of 16); sigmas ``linspace(1, 1/n, n)`` shifted by the scheduler
(``mu`` from the image tokens where it shifts dynamically), the transformer fed ``1 - t / 1000`` and its output
negated into the Euler step; CFG when ``guidance_scale > 1`` as ``neg + g (pos - neg)``, with ``cfg_normalization``
(the guided prediction rescaled to the positive one's norm over the last (width) axis) and ``cfg_trunc_ratio``
(steps ``i`` with ``(i + 1) / n > cfg_trunc_ratio`` unguided); the VAE (FLUX's 16-channel ``AutoencoderKL``)
decodes ``latents / scaling_factor + shift_factor``. Defaults as diffusers: 1024 x 1024 (``sample_size`` x 8),
30 steps, guidance 4.

The transformer step, the mesh layout (prompts over ``data``, CFG's halves over ``cfg``, the image tokens over
``ring`` x ``ulysses`` with the caption as the masked context, PipeFusion over the noise refiner then the main
layers), the loop and the decode are :class:`xdit_jax.pipelines.zimage.ZImagePipeline`'s; this class changes the
text encoding, the transformer's timestep, the guidance rule and the defaults.

Not supported: a ``generator`` (``seed`` instead); output types other than "np" and "latent".
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import gemma2, lumina2, zimage
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    per_prompt,
    prompt_batch,
    warn_if_truncated,
)
from xdit_jax.pipelines.image import ImagePipelineOutput, vae_scale_factor
from xdit_jax.pipelines.zimage import ZImagePipeline
from xdit_jax.schedulers import flow_match

Lumina2PipelineOutput = ImagePipelineOutput
# diffusers' Lumina2Pipeline.system_prompt
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")
HIDDEN_STATE_INDEX = -2  # _get_gemma_prompt_embeds: hidden_states[-2]
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_MAX_SEQUENCE_LENGTH = 30, 4.0, 256


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, lumina2.Lumina2Config)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' default: ``sample_size`` x the VAE's 8 (1024 x 1024 for Lumina-Image 2.0)."""
    side = (128 if tc is None else tc.sample_size) * (8 if vc is None else vae_scale_factor(vc))
    return {"height": side, "width": side}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = DEFAULT_GUIDANCE, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    from xdit_jax.mesh import MeshSpec

    if MeshSpec.parse(mesh_spec).cfg == 2 and guidance_scale <= 1:
        raise ValueError("Mesh cfg=2 splits the two halves of classifier-free guidance, which Lumina 2 runs only with "
                         "guidance_scale > 1; drop cfg=2 or raise the guidance scale.")
    if not 1 <= max_sequence_length <= lumina2.MAX_CAPTION:
        raise ValueError(f"max_sequence_length must be in [1, {lumina2.MAX_CAPTION}] (as diffusers); got "
                         f"{max_sequence_length}.")
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), zimage.pipefusion_stacks(tc)["stacked_layers"], batch,
                        mesh_spec, 2.0)


def system_prompts(prompts, system_prompt: str | None = None) -> list[str]:
    """``encode_prompt``'s text for each prompt: ``system_prompt + " <Prompt Start> " + prompt``."""
    sp = SYSTEM_PROMPT if system_prompt is None else system_prompt
    return [sp + " <Prompt Start> " + p for p in prompts]


class Lumina2Pipeline(ZImagePipeline):
    """Text-to-image with Lumina-Image 2.0 — see the module docstring."""

    PIPELINE_CLASSES = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline")  # (diffusers' earlier name of it)
    CONFIG = lumina2.Lumina2Config

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def _gemma_fn(self):
        """``fn(ids, mask) -> hidden_states[-2]`` of the Gemma 2 encoder (only the layers it needs), jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "gemma2" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_state(ids, mask,
                                                                                          HIDDEN_STATE_INDEX))
            fns["gemma2"] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                                  self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns["gemma2"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """((B, L, cap_feat_dim) Gemma 2 ``hidden_states[-2]``, (B, L) attention mask) as diffusers'
        ``_get_gemma_prompt_embeds`` (the texts as given: :func:`system_prompts` adds the system prompt)."""
        ids, mask = gemma2.tokenize_prompts(self.tokenizer, prompts, max_sequence_length)
        warn_if_truncated(self.tokenizer, prompts, max_sequence_length)  # (with diffusers' warning)
        return np.asarray(self._gemma_fn()(ids, mask), np.float32), np.asarray(mask, np.int32)

    def schedule(self, num_inference_steps: int, image_seq_len: int, sigmas=None):
        """diffusers' Lumina2Pipeline schedule: sigmas linspace(1, 1/n, n) (or the caller's); ``mu`` (used where the
        scheduler shifts dynamically) from diffusers' ``image_seq_len = latents.shape[1]``: the latent *channels*
        (16), not the image tokens, as diffusers 0.42 computes it (``image_seq_len`` here is not read)."""
        del image_seq_len
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        cfg = self.scheduler_config
        mu = cfg.mu(self.transformer_config.in_channels) if cfg.use_dynamic_shifting else None
        return flow_match.make_schedule(cfg, sigmas=sigmas, mu=mu)

    @staticmethod
    def _model_timestep(t):
        """diffusers' ``1 - t / num_train_timesteps`` (Lumina's t = 0 is the noise)."""
        return 1.0 - t / 1000.0

    @staticmethod
    def _guided(pos, neg, g, norm):
        """``neg + g (pos - neg)``; ``norm`` > 0 (cfg_normalization): times ``|pos| / |guided|`` over the last
        (width) axis, as diffusers' ``torch.norm(..., dim=-1)``; ``g`` 0 (cfg_trunc_ratio's unguided steps):
        ``pos``."""
        guided = neg + g * (pos - neg)
        pos_n = jnp.sqrt(jnp.sum(jnp.square(pos), axis=-1, keepdims=True))
        new_n = jnp.sqrt(jnp.sum(jnp.square(guided), axis=-1, keepdims=True))
        guided = jnp.where(norm > 0, guided * (pos_n / new_n), guided)
        return jnp.where(g > 0, guided, pos)

    @staticmethod
    def _image_token_count(n: int) -> int:
        return n  # no pad tokens

    CFG_ABOVE = 1.0  # diffusers' do_classifier_free_guidance: guidance_scale > 1

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     caption_tokens: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """The compiled denoising step for these shapes, without running it (``guidance_scale > 1``: the CFG
        step); ``caption_tokens``: the caption array's length (rounded up to 32)."""
        return super().compile_step(batch, height=height, width=width, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, caption_tokens=caption_tokens)

    def _check_request(self, height, width, batch, guidance_scale):
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, sigmas=None, guidance_scale: float = DEFAULT_GUIDANCE,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_attention_mask=None, system_prompt: str | None = None, cfg_trunc_ratio: float = 1.0,
                 cfg_normalization: bool = True, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> Lumina2PipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent");
        ``prompt_embeds`` (B, L, cap_feat_dim) with ``prompt_attention_mask`` (B, L) (and the negative pair for
        CFG), as diffusers' ``encode_prompt`` returns them."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type, "with prompt_attention_mask")
        per = per_prompt(num_images_per_prompt)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        do_cfg = guidance_scale > 1
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("prompt_embeds need their prompt_attention_mask (as diffusers' encode_prompt returns).")
        if prompt_embeds is not None and do_cfg and negative_prompt_embeds is None:
            raise ValueError("When `prompt_embeds` is provided without `prompt`, `negative_prompt_embeds` (with "
                             "`negative_prompt_attention_mask`) must also be provided for classifier-free guidance.")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds need their negative_prompt_attention_mask.")
        tc = self.transformer_config
        check_request(tc, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale, max_sequence_length)
        timer = StageTimer()

        # 1. text: Gemma 2's hidden_states[-2] and the kept-token counts; [prompt; negative] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = self.encode_prompt(system_prompts(prompts, system_prompt),
                                                                          max_sequence_length)
            caps = [(prompt_embeds, prompt_attention_mask, "prompt_embeds")]
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                        negative_prompts(negative_prompt, batch), max_sequence_length)
                caps.append((negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt_embeds"))
            checked = []
            for feats, mask, what in caps:
                feats = np.asarray(feats, np.float32)
                lens = lumina2.lens_from_mask(mask, what.replace("embeds", "attention_mask"))
                if feats.ndim != 3 or feats.shape[0] != batch or feats.shape[2] != tc.cap_feat_dim or \
                        feats.shape[:2] != np.shape(mask):
                    raise ValueError(f"{what} {feats.shape} with mask {np.shape(mask)}: this model takes ({batch}, "
                                     f"tokens, {tc.cap_feat_dim}) and a ({batch}, tokens) mask.")
                checked.append((feats, lens))
            length = zimage.ceil_to(max(int(c[1].max()) for c in checked))
            lumina2.check_caption_length(max(int(c[1].max()) for c in checked), tc)
            feats = np.concatenate([np.pad(f[:, :length], ((0, 0), (0, length - min(f.shape[1], length)), (0, 0)))
                                    for f, _ in checked])
            lens = np.concatenate([c[1] for c in checked])
            texts = (self._put_batch(jnp.asarray(feats, self.dtype), do_cfg, per),
                     self._put_batch(jnp.asarray(lens, jnp.int32), do_cfg, per))
            jax.block_until_ready(texts)

        def per_step(timesteps):
            n = len(timesteps)
            guided = (np.arange(1, n + 1) / n) <= cfg_trunc_ratio  # diffusers: (i + 1) / n > ratio -> unguided
            return np.where(guided, guidance_scale, 0.0).astype(np.float32), 1.0 if cfg_normalization else 0.0

        return self._generate(timer, texts, length, batch * per, do_cfg, height, width, num_inference_steps, sigmas,
                              per_step, latents, seed, output_type, progress)
