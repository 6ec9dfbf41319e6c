"""Kandinsky 5.0 text-to-video, diffusers' ``Kandinsky5T2VPipeline`` on a JAX mesh.

    pipe = Kandinsky5T2VPipeline.from_pretrained("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers",
                                                 mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat and a dog baking a cake together in a kitchen.", seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

As diffusers: the cleaned prompt (HTML entities unescaped, whitespace collapsed; ftfy where installed) inside
Kandinsky's video prompt template (:data:`PROMPT_TEMPLATE`), tokenized by the Qwen2.5-VL tokenizer padded to the
longest prompt and truncated at ``128 + max_sequence_length`` tokens, the language model's last hidden states
(no attention mask, as diffusers calls it) less the first :data:`TEMPLATE_START` (128) tokens — every remaining token,
the padding of a batch's shorter prompts too, is text of the transformer (diffusers passes no text mask); CLIP-L's
pooled output of the prompt (77 tokens) as the pooled projection; classifier-free guidance when ``guidance_scale >
1`` with diffusers' default negative prompt (:data:`DEFAULT_NEGATIVE`), ``uncond + s (cond - uncond)``, the two
passes one batch ``[negative; prompt]`` over the ``cfg`` axis (each padded to the longer with masked tokens:
diffusers runs them as separate calls of their own lengths); the scheduler's default sigmas (shifted by its
``shift``) and the Euler step inside one jitted step; channels-last latents (B, (F - 1) // 4 + 1, H / 8, W / 8, C)
as diffusers'; the RoPE scale factor (1, 2, 2) for heights and widths in 480..854, else (1, 3.16, 3.16) (diffusers'
``_get_scale_factor``); HunyuanVideo's VAE on ``latents / scaling_factor``. Defaults 512 x 768, 121 frames, 50 steps,
guidance 5.0, 24 fps.

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the visual tokens over ``ring`` x ``ulysses`` (the
text stack runs whole on every device; the visual blocks cross-attend to it locally), PipeFusion over the visual
stack.

Differences from diffusers, on purpose: ``num_frames`` must be 4k + 1 (diffusers rounds others down with a warning);
an over-long prompt is cut by the tokenizer's truncation (diffusers cuts the text at the decoded tail first, which
can differ by a token); the latents and the timestep stay float32 in bf16 too. Refused: the sparse "nabla"
attention of the 10 s checkpoints (:class:`~xdit_jax.models.kandinsky5.Kandinsky5Config`). Image-to-video and
image-to-image: :mod:`xdit_jax.pipelines.kandinsky5_i2v`, :mod:`xdit_jax.pipelines.kandinsky5_i2i`.
"""

from __future__ import annotations

import html
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import kandinsky5 as k5
from xdit_jax.models import vae_hunyuan_video as hv_vae
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

Kandinsky5PipelineOutput = CogVideoXPipelineOutput
CLIP_TOKENS = 77
TEMPLATE_START = 128  # diffusers' prompt_template_encode_start_idx
MAX_SEQUENCE_LENGTH = 1024  # diffusers' check_inputs: "max_sequence_length must be less than 1024"
PROMPT_TEMPLATE = "\n".join([
    "<|im_start|>system\nYou are a prompt engineer. Describe the video in detail.",
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
    "Describe the location of the video, main characters or objects and their action.",
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
    "animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user\n{}<|im_end|>",
])
DEFAULT_NEGATIVE = ("Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
                    "deformed, walking backwards")


def prompt_clean(text: str) -> str:
    """diffusers' ``prompt_clean``: ftfy's fix (where installed), HTML entities unescaped twice, whitespace
    collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def scale_factor(height: int, width: int) -> tuple:
    """diffusers' ``_get_scale_factor``: the RoPE's (frames, rows, columns) angle divisors."""
    if 480 <= height <= 854 and 480 <= width <= 854:
        return (1, 2, 2)
    return (1, 3.16, 3.16)


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, k5.Kandinsky5Config, hv_vae.HunyuanVideoVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 512 x 768, 121 frames; its example writes them at 24 fps."""
    return {"height": 512, "width": 768, "num_frames": 121, "fps": 24}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 5.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work."""
    st, s = vc.temporal_compression_ratio, vc.spatial_compression_ratio
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or \
            (num_frames - 1) % st:
        raise ValueError(f"num_frames must be {st}k + 1 (1, 5, 9, ..., 121: the VAE's causal frames), got "
                         f"{num_frames!r}.")
    pt, ph, pw = tc.patch_size
    check_size_and_mesh(height, width, s * max(ph, pw, 2), tc.num_visual_blocks, batch, mesh_spec, guidance_scale)
    grid = (((num_frames - 1) // st + 1) // pt, height // s // ph, width // s // pw)
    if max(grid) > max(k5.ROPE_MAX_POS):
        raise ValueError(f"{height} x {width} x {num_frames} frames makes a {grid} token grid; Kandinsky 5.0's RoPE "
                         f"tables hold {k5.ROPE_MAX_POS[0]} positions per axis.")


class Kandinsky5T2VPipeline(VideoPipelineBase):
    """Text-to-video with Kandinsky 5.0 — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    _vae = hv_vae

    PIPELINE_CLASSES = ("Kandinsky5T2VPipeline",)
    CONFIG = k5.Kandinsky5Config
    PROMPT_TEMPLATE, TEMPLATE_START, DEFAULT_NEGATIVE = PROMPT_TEMPLATE, TEMPLATE_START, DEFAULT_NEGATIVE
    _scale_factor = staticmethod(scale_factor)
    MORE_TEXT_ENCODERS = ("_2",)  # CLIP (the first: Qwen2.5-VL)
    stacks = staticmethod(k5.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def _qwen_fn(self):
        """``fn(ids) -> last_hidden_state`` of the Qwen2.5-VL language model without a mask (as diffusers), jitted."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "qwen" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).last_hidden_state)
            fns["qwen"] = lambda ids: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)))
        return fns["qwen"]

    def _clip_pooled_fn(self):
        fns = self.__dict__.setdefault("_text_fns", {})
        if "clip_pooled" not in fns:
            graphdef, state = nnx.split(self.text_encoder_2)
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).pooler_output)
            fns["clip_pooled"] = lambda ids: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)))
        return fns["clip_pooled"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512):
        """((B, L, d) Qwen states, (B, d_clip) pooled CLIP) as diffusers' ``encode_prompt``: every row L tokens
        (the batch's longest templated prompt less the template's first tokens, :data:`TEMPLATE_START`)."""
        prompts = [prompt_clean(p) for p in prompts]
        start = self.TEMPLATE_START
        enc = self.tokenizer([self.PROMPT_TEMPLATE.format(p) for p in prompts], max_length=start + max_sequence_length,
                             truncation=True, padding=True, return_tensors="np")
        ids = np.asarray(enc["input_ids"])
        if ids.shape[1] <= start:
            raise ValueError(f"The templated prompts have {ids.shape[1]} tokens, not more than the template's "
                             f"{start} that are cut: this tokenizer is not Kandinsky 5.0's.")
        n = ids.shape[1]
        # one compile per 64 tokens: with causal attention and no mask, appended tokens change none before them
        pad = -n % 64
        if pad:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = np.concatenate([ids, np.full((ids.shape[0], pad), pad_id, ids.dtype)], axis=1)
        emb = self._qwen_fn()(ids)[:, start:n]
        clip_ids, _ = tokenize(self.tokenizer_2, prompts, CLIP_TOKENS)
        pooled = self._clip_pooled_fn()(clip_ids)
        return emb.astype(self.dtype), pooled.astype(self.dtype)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """Channels last, as diffusers': (B, (F - 1) // 4 + 1, H / 8, W / 8, C)."""
        vc = self.vae_config
        s, st = vc.spatial_compression_ratio, vc.temporal_compression_ratio
        return (batch, (num_frames - 1) // st + 1, height // s, width // s, self.transformer_config.in_visual_dim)

    def _decode_fn(self):
        """The HunyuanVideo VAE's decode of ``latents / scaling_factor`` (the channels-last latents moved first)."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, **kw):
            z = hv_vae.unscale_latents(vc, jnp.moveaxis(latents.astype(jnp.float32), -1, 1))
            return hv_vae.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`) for the RoPE scale factor :attr:`_scale` (one cache
        per factor); ``texts``: (Qwen states, their bool mask, pooled CLIP), a row each; ``guidance``: the CFG
        scale."""
        sf = self._scale
        self._step_cache = self.__dict__.setdefault("_scale_caches", {}).setdefault(sf, {})
        tc = self.transformer_config

        def embed_args(x, texts, t):
            if tc.visual_cond:  # (a T2V pass of an image-conditioned model: zero condition and mask, as diffusers)
                x = jnp.concatenate([x, *self._visual_cond(x, texts)], axis=-1)
            return x, texts[0], t, texts[2], sf, texts[1]

        return self._flow_step_fn(do_cfg, warmup, embed_args, scheduler=self._scheduler)

    _scheduler = None  # (the Euler step of flow_match; image-to-video's keeps its first frame)

    def _visual_cond(self, x, texts) -> tuple:
        """The ``visual_cond`` channels of an image-conditioned model beside the latents ``x``: (condition, mask
        (B, F, h, w, 1)); here zeros and :meth:`_cond_mask`."""
        return jnp.zeros_like(x), self._cond_mask(x)

    @staticmethod
    def _cond_mask(x):
        """The ``visual_cond`` mask channel (B, F, h, w, 1) of an image-conditioned model: zeros (no given frame)."""
        return jnp.zeros(x.shape[:-1] + (1,), x.dtype)

    def _step_extras(self, batch: int, do_cfg: bool, per: int) -> tuple:
        """More inputs of the jitted step after (states, mask, pooled) (``texts[3:]``, placed as the batch): none."""
        return ()

    def _video_tokens(self, latent_shape) -> int:
        return int(np.prod(self.transformer.grid(latent_shape)))

    def schedule(self, num_inference_steps: int):
        """diffusers' ``set_timesteps(num_inference_steps)`` of the folder's scheduler."""
        return flow_match.make_schedule(self.scheduler_config, num_inference_steps)

    def _texts(self, emb, pooled, what: str):
        tc = self.transformer_config
        emb, pooled = jnp.asarray(emb, self.dtype), jnp.asarray(pooled, self.dtype)
        if emb.ndim != 3 or emb.shape[2] != tc.in_text_dim or pooled.shape != (emb.shape[0], tc.in_text_dim2):
            raise ValueError(f"{what} embeddings {tuple(emb.shape)} and pooled {tuple(pooled.shape)}: this model "
                             f"takes (batch, tokens, {tc.in_text_dim}) and (batch, {tc.in_text_dim2}).")
        return emb, pooled

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                     text_len: int = 512):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        do_cfg = guidance_scale > 1.0
        tc = self.transformer_config
        self._scale = self._scale_factor(height, width)
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, text_len, tc.in_text_dim), self.dtype), sd((n, text_len), jnp.bool_),
                 sd((n, tc.in_text_dim2), self.dtype))
        texts += tuple(sd((n,) + a.shape[1:], a.dtype) for a in self._step_extras(batch, do_cfg, 1))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, jnp.float32(guidance_scale),
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, num_videos_per_prompt: int = 1,
                 latents=None, prompt_embeds_qwen=None, prompt_embeds_clip=None, negative_prompt_embeds_qwen=None,
                 negative_prompt_embeds_clip=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> Kandinsky5PipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent"; the ``*_cu_seqlens``
        are not needed: the embeddings' rows are all text, as diffusers uses them)."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        out, timer = self._generate(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                                    guidance_scale, num_videos_per_prompt, latents, prompt_embeds_qwen,
                                    prompt_embeds_clip, negative_prompt_embeds_qwen, negative_prompt_embeds_clip,
                                    max_sequence_length, seed, output_type, progress)
        return Kandinsky5PipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _generate(self, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                  num_per_prompt, latents, prompt_embeds_qwen, prompt_embeds_clip, negative_prompt_embeds_qwen,
                  negative_prompt_embeds_clip, max_sequence_length, seed, output_type, progress):
        """The call's work (videos; the text-to-image pipeline's with one frame) -> (output, timer)."""
        prompts, batch = prompt_batch(prompt, prompt_embeds_qwen, output_type, "(with prompt_embeds_clip)")
        if prompt_embeds_qwen is not None and prompt_embeds_clip is None:
            raise ValueError("prompt_embeds_qwen need prompt_embeds_clip (the pooled CLIP embedding).")
        if (negative_prompt_embeds_qwen is None) != (negative_prompt_embeds_clip is None):
            raise ValueError("Give negative_prompt_embeds_qwen and negative_prompt_embeds_clip together.")
        if not 0 < max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{MAX_SEQUENCE_LENGTH}, got {max_sequence_length}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        per = per_prompt(num_per_prompt, "num_videos_per_prompt")
        do_cfg = guidance_scale > 1.0
        self.check_inputs(height, width, num_frames, batch, guidance_scale)
        self._scale = self._scale_factor(height, width)
        sched = self.schedule(num_inference_steps)
        timer = StageTimer()

        # 1. text: Qwen states (all rows text), pooled CLIP; [negative; prompt] for CFG, padded with masked tokens
        with timer.stage("text_encoding"):
            if prompt_embeds_qwen is None:
                prompt_embeds_qwen, prompt_embeds_clip = self.encode_prompt(prompts, max_sequence_length)
            emb, pooled = self._texts(prompt_embeds_qwen, prompt_embeds_clip, "prompt")
            mask = jnp.ones(emb.shape[:2], bool)
            if do_cfg:
                if negative_prompt_embeds_qwen is None:
                    neg = negative_prompts(self.DEFAULT_NEGATIVE if negative_prompt is None else negative_prompt, batch)
                    negative_prompt_embeds_qwen, negative_prompt_embeds_clip = self.encode_prompt(
                        neg, max_sequence_length)
                n_emb, n_pooled = self._texts(negative_prompt_embeds_qwen, negative_prompt_embeds_clip,
                                              "negative_prompt")
                if n_emb.shape[0] != emb.shape[0]:
                    raise ValueError(f"{n_emb.shape[0]} negative embeddings for {emb.shape[0]} prompts.")
                width_t = max(emb.shape[1], n_emb.shape[1])
                pad = lambda a: jnp.pad(a, ((0, 0), (0, width_t - a.shape[1])) + ((0, 0),) * (a.ndim - 2))  # noqa
                emb = jnp.concatenate([pad(n_emb), pad(emb)])
                mask = jnp.concatenate([pad(jnp.ones(n_emb.shape[:2], bool)), pad(mask)])
                pooled = jnp.concatenate([n_pooled, pooled])
            texts = tuple(self._put_batch(x, do_cfg, per) for x in (emb, mask, pooled))
            texts += self._step_extras(batch, do_cfg, per)
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, F', h, w, C)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, latent frames, height/8, width/8, channels")

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(guidance_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv)
        return out, timer
