"""HunyuanImage-2.1 text-to-image, diffusers' ``HunyuanImagePipeline`` on a JAX mesh.

    pipe = HunyuanImagePipeline.from_pretrained("hunyuanvideo-community/HunyuanImage-2.1-Diffusers",
                                                mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe('A cat holding a sign that says "hello world"', seed=42)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers (0.42):

* the Qwen2.5-VL text: the prompt in :data:`PROMPT_TEMPLATE` (a plain string, not the chat template), padded to
  ``max_sequence_length + DROP_IDX`` (1000 + 34) tokens; ``hidden_states[-3]`` of the language model; the first
  :data:`DROP_IDX` tokens (the template's system part) dropped from the states and their mask;
* the ByT5 glyph text (:func:`extract_glyph_text`): the texts quoted in the prompt ('...', "...", ‘...’, “...”, in
  that order of kinds, not deduplicated) as ``Text "a". Text "b". ``, tokenized (byte-level, 128 tokens) and
  encoded by the T5 encoder, with its mask; a prompt without quotes gives zeros and an all-zero mask;
* the guider: ``ocr_guider`` where the prompts' ByT5 states are not all zero and the folder has one, else
  ``guider``, else none (no CFG). Both are diffusers' ``AdaptiveProjectedMixGuidance`` (all of its options:
  :func:`apg_mix`): CFG (``uncond + scale (cond - uncond)``, ``cond + ...`` with ``use_original_formulation``) up to
  step ``adaptive_projected_guidance_start_step``, adaptive projected guidance after it (the momentum-averaged
  difference, its norm capped at ``adaptive_projected_guidance_rescale``, its part parallel to the conditional
  prediction weighted by ``eta``, times ``adaptive_projected_guidance_scale``), the conditional prediction alone
  outside ``[int(start n), int(stop n))``, then ``rescale_noise_cfg`` by ``guidance_rescale``. The momentum
  buffer is carried from step to step as the scheduler's state of the jitted step. The two passes are one batch
  ``[negative; prompt]`` over the ``cfg`` mesh axis;
* sigmas ``linspace(1, 0, steps + 1)[:-1]`` shifted by the scheduler's ``shift``, the Euler step, in one jitted
  step; latents (B, 64, H / 32, W / 32); the VAE decode of ``latents / scaling_factor``, the image plane split over
  the mesh (:func:`xdit_jax.models.vae_hunyuanimage.decode`). Defaults: 2048 x 2048, 50 steps.

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the image tokens over ``ring`` x ``ulysses`` (the
text joins every attention as the masked context: :data:`xdit_jax.models.hunyuanimage.TEXT_KEYS`), PipeFusion over
the double- and single-stream stacks (HunyuanVideo's).

Differences from diffusers, on purpose: height and width must be multiples of the VAE's factor times the patch
(diffusers floors others with a warning); the latents and the timestep stay float32 in bf16 too; the APG projection
runs in float32 (diffusers: float64); a string ``negative_prompt`` serves every prompt of a batch. Refused: the
guidance-distilled and MeanFlow transformers (:class:`xdit_jax.models.hunyuanimage.HunyuanImageConfig`), the
refiner pipeline.
"""

from __future__ import annotations

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import hunyuanimage as hyi
from xdit_jax.models import vae_hunyuanimage as vae_hyi
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.hunyuan_video import HunyuanVideoPipeline
from xdit_jax.pipelines.hunyuan_video15 import byt5_states
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

HunyuanImagePipelineOutput = ImagePipelineOutput
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>")
DROP_IDX = 34  # diffusers' prompt_template_encode_start_idx
MAX_SEQUENCE_LENGTH = 1000  # diffusers' tokenizer_max_length (after the drop)
BYT5_MAX_LENGTH = 128  # diffusers' tokenizer_2_max_length
DEFAULT_SAMPLE_SIZE = 64  # diffusers' default_sample_size (x the VAE's 32: 2048 px)
GUIDER_DEFAULTS = {"_class_name": "AdaptiveProjectedMixGuidance", "guidance_scale": 3.5, "guidance_rescale": 0.0,
                   "adaptive_projected_guidance_scale": 10.0, "adaptive_projected_guidance_momentum": -0.5,
                   "adaptive_projected_guidance_rescale": 10.0, "eta": 0.0, "use_original_formulation": False,
                   "start": 0.0, "stop": 1.0, "adaptive_projected_guidance_start_step": 5, "enabled": True}


def extract_glyph_text(prompt: str) -> str | None:
    """diffusers' ``extract_glyph_text``: the texts in '...', then "...", then ‘...’, then “...” quotes, as
    ``Text "a". Text "b". ``; None without quotes."""
    found = []
    for pattern in (r"\'(.*?)\'", r"\"(.*?)\"", r"‘(.*?)’", r"“(.*?)”"):
        found.extend(re.findall(pattern, prompt))
    return ". ".join(f'Text "{t}"' for t in found) + ". " if found else None


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, hyi.HunyuanImageConfig, vae_hyi.HunyuanImageVAEConfig)


def default_size(tc=None, vc=None) -> dict:
    s = DEFAULT_SAMPLE_SIZE * (vc.spatial_compression_ratio if vc is not None else 32)
    return {"height": s, "width": s}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 1.0) -> None:
    """Refuse what the model cannot take, before any heavy work (``guidance_scale``: 2.0 where the guider runs both
    passes, else 1.0: whether the batch doubles)."""
    ph, pw = tc.patch_size
    if ph != pw:
        raise NotImplementedError(f"patch_size {tc.patch_size}: only square patches in the pipeline.")
    check_size_and_mesh(height, width, vc.spatial_compression_ratio * ph, hyi.pipefusion_stacks(tc)["stacked_layers"],
                        batch, mesh_spec, guidance_scale)


# ----- the guider -----

def check_guider(g: dict | None) -> dict:
    """A guider's config (diffusers' ``AdaptiveProjectedMixGuidance`` defaults filled in); None: no guider (diffusers'
    ``AdaptiveProjectedMixGuidance(enabled=False)``); another class or values out of range refused."""
    if g is None:
        return dict(GUIDER_DEFAULTS, enabled=False)
    cls = g.get("_class_name", GUIDER_DEFAULTS["_class_name"])
    if cls != "AdaptiveProjectedMixGuidance":
        raise ValueError(f"guider {cls!r}: HunyuanImagePipeline here runs diffusers' AdaptiveProjectedMixGuidance "
                         "only (the class HunyuanImage-2.1 ships with).")
    g = dict(GUIDER_DEFAULTS, **{k: v for k, v in g.items() if not k.startswith("_") or k == "_class_name"})
    if not 0.0 <= g["start"] < 1.0 or not g["start"] <= g["stop"] <= 1.0:
        raise ValueError(f"guider start {g['start']} / stop {g['stop']}: fractions of the schedule with 0 <= start < 1 "
                         "and start <= stop <= 1.")
    if not 0.0 <= g["guidance_rescale"] <= 1.0:
        raise ValueError(f"guider guidance_rescale {g['guidance_rescale']}: a mix factor in [0, 1].")
    return g


def read_guiders(folder: str | os.PathLike) -> dict:
    """{"guider": config, "ocr_guider": config} of those a diffusers or converted folder has (``guider_config.json``,
    diffusers' save, or ``config.json``)."""
    from pathlib import Path

    from xdit_jax.conversion import read_json

    out = {}
    for name in ("guider", "ocr_guider"):
        for file in ("guider_config.json", "config.json"):
            path = Path(folder) / name / file
            if path.exists():
                out[name] = read_json(path)
                break
    return out


def request_guidance(folder, prompts: list[str], guidance_scale: float | None = None) -> float:
    """The command line's check before any weights load: 2.0 where the guider the prompts pick (the OCR guider for
    quoted text) runs both passes (under ``guidance_scale`` where given), else 1.0."""
    g = read_guiders(folder)
    ocr = any(extract_glyph_text(p) is not None for p in prompts) and "ocr_guider" in g
    guider = check_guider(g["ocr_guider"] if ocr else g.get("guider"))
    if guidance_scale is not None:
        guider = dict(guider, guidance_scale=float(guidance_scale))
    return 2.0 if cfg_enabled(guider) else 1.0


def cfg_enabled(guider: dict, num_steps: int | None = None) -> bool:
    """Whether the two passes run at all (diffusers' ``_is_cfg_enabled`` at some step)."""
    neutral = 0.0 if guider["use_original_formulation"] else 1.0
    if not guider["enabled"] or math.isclose(guider["guidance_scale"], neutral):
        return False
    if num_steps is None:
        return True
    return int(guider["start"] * num_steps) < int(guider["stop"] * num_steps)


def guidance_vector(guider: dict, num_steps: int) -> np.ndarray:
    """The step's ``guidance`` argument for :func:`apg_mix` (float32): CFG's scale, guidance_rescale, original
    formulation, first and stop guided step, APG's scale, momentum, whether there is a momentum, the norm cap
    (``adaptive_projected_guidance_rescale``), eta, APG's start step, whether APG's scale is not neutral."""
    g = guider
    original = bool(g["use_original_formulation"])
    mom = g["adaptive_projected_guidance_momentum"]
    apg_ok = not math.isclose(g["adaptive_projected_guidance_scale"], 0.0 if original else 1.0)
    return np.asarray([g["guidance_scale"], g["guidance_rescale"], float(original), int(g["start"] * num_steps),
                       int(g["stop"] * num_steps), g["adaptive_projected_guidance_scale"],
                       0.0 if mom is None else mom, float(mom is not None), g["adaptive_projected_guidance_rescale"],
                       g["eta"], g["adaptive_projected_guidance_start_step"], float(apg_ok)], np.float32)


def apg_mix(uncond, cond, buf, g, i):
    """diffusers' ``AdaptiveProjectedMixGuidance.forward`` at step ``i`` (without ``guidance_rescale``), ``g``:
    :func:`guidance_vector`, ``buf``: the momentum buffer's running average (zeros before step 0). -> (the guided
    prediction, the buffer after this step). float32."""
    scale, original, first, stop = g[0], g[2], g[3], g[4]
    apg_scale, mom, has_mom, cap, eta, apg_start, apg_ok = g[5], g[6], g[7], g[8], g[9], g[10], g[11]
    guided = (i >= first) & (i < stop)
    diff = cond - uncond
    averaged = diff + mom * buf
    buf = jnp.where(guided & (has_mom > 0), averaged, buf)
    base = jnp.where(original > 0, cond, uncond)
    cfg = base + scale * diff
    axes = tuple(range(1, diff.ndim))
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))  # noqa: E731
    d = jnp.where(has_mom > 0, averaged, diff)
    d = jnp.where(cap > 0, d * jnp.minimum(1.0, cap / norm(d)), d)
    unit = cond / jnp.maximum(norm(cond), 1e-12)
    parallel = jnp.sum(d * unit, axis=axes, keepdims=True) * unit
    apg = base + apg_scale * ((d - parallel) + eta * parallel)
    apg_on = (i > apg_start) & (apg_ok > 0)
    return jnp.where(guided, jnp.where(apg_on, apg, cfg), cond), buf


def _pair(uncond, text, guidance, i):
    """The step's ``combine`` hook: the two predictions handed on to :class:`GuidedEuler` (which holds the momentum)."""
    return uncond, text, guidance, False


def _pair_rescaled(uncond, text, guidance, i):
    return uncond, text, guidance, True


class GuidedEuler:
    """The jitted step's scheduler: :func:`apg_mix` of the two predictions with the momentum buffer as the state,
    (``rescale_noise_cfg`` where the guider has a ``guidance_rescale``), then flow matching's Euler step."""

    @staticmethod
    def step(sched, i, pred, latents, state, noise=None):
        if isinstance(pred, tuple):
            from xdit_jax.pipelines.hunyuandit import rescale_guidance

            uncond, text, guidance, rescale = pred
            pred, buf = apg_mix(uncond, text, state[0], guidance, i)
            if rescale:
                pred = rescale_guidance(pred, text, guidance[1])
            state = (buf,)
        latents, _ = flow_match.step(sched, i, pred, latents, (), noise)
        return latents, state


class HunyuanImagePipeline(ImagePipelineBase):
    """Text-to-image with HunyuanImage-2.1 — see the module docstring. (HunyuanVideo's pipeline lends the Qwen
    encoder's jitted ``hidden_states[-3]``.)"""

    PIPELINE_CLASSES = ("HunyuanImagePipeline",)
    CONFIG = hyi.HunyuanImageConfig
    MORE_TEXT_ENCODERS = ("_2",)  # ByT5 (the first: Qwen2.5-VL's language model)
    stacks = staticmethod(hyi.pipefusion_stacks)
    _llama_fn = HunyuanVideoPipeline._llama_fn

    def __init__(self, *, guider: dict | None = None, ocr_guider: dict | None = None, **parts):
        super().__init__(**parts)
        self.guider = check_guider(guider)
        self.ocr_guider = check_guider(ocr_guider) if ocr_guider is not None else None
        self._rescale = False

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        return read_guiders(folder)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_config.spatial_compression_ratio
        return (batch, self.transformer_config.in_channels, height // s, width // s)

    def _image_tokens(self, height: int, width: int) -> int:
        p, s = self.transformer_config.patch_size[0], self.vae_config.spatial_compression_ratio
        return (height // s // p) * (width // s // p)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """(Qwen states (B, L, d), their int32 mask, ByT5 states (B, 128, d2), their int32 mask) as diffusers'
        ``encode_prompt`` (module docstring)."""
        enc = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=max_sequence_length + DROP_IDX,
                             padding="max_length", truncation=True, return_tensors="np")
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
        states = self._llama_fn()(ids, mask)[:, DROP_IDX:]
        mask = jnp.asarray(mask[:, DROP_IDX:], jnp.int32)

        emb2, mask2 = byt5_states(self, [extract_glyph_text(p) for p in prompts], BYT5_MAX_LENGTH)
        return states.astype(self.dtype), mask, emb2, mask2

    def _checked(self, emb, mask, emb2, mask2, what: str):
        """(Qwen states, int32 mask, ByT5 states, int32 mask), the states in the compute dtype, shapes checked."""
        tc = self.transformer_config
        emb, emb2 = jnp.asarray(emb, self.dtype), jnp.asarray(emb2, self.dtype)
        mask, mask2 = jnp.asarray(mask, jnp.int32), jnp.asarray(mask2, jnp.int32)
        d2 = tc.text_embed_2_dim if tc.text_embed_2_dim is not None else emb2.shape[-1]
        if emb.ndim != 3 or emb.shape[2] != tc.text_embed_dim or mask.shape != emb.shape[:2] or emb2.ndim != 3 or \
                emb2.shape[2] != d2 or mask2.shape != emb2.shape[:2] or emb2.shape[0] != emb.shape[0]:
            raise ValueError(f"{what} embeddings {tuple(emb.shape)} / mask {tuple(mask.shape)}, ByT5 "
                             f"{tuple(emb2.shape)} / mask {tuple(mask2.shape)}: this model takes (batch, tokens, "
                             f"{tc.text_embed_dim}), (batch, tokens), (batch, tokens_2, {d2}) and (batch, tokens_2).")
        return emb, mask, emb2, mask2

    def _step_fn(self, do_cfg: bool, warmup: bool = True, rescale: bool | None = None):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (Qwen states, mask, ByT5 states, mask), a
        row each; ``guidance``: :func:`guidance_vector`; the scheduler state: the APG momentum buffer. ``rescale``:
        the guider's ``rescale_noise_cfg`` (None: the running call's guider's)."""
        rescale = self._rescale if rescale is None else rescale

        def embed_args(x, texts, t):
            return (x, t) + tuple(texts)

        return self._flow_step_fn(do_cfg, warmup, embed_args, scheduler=GuidedEuler,
                                  combine=_pair_rescaled if rescale else _pair)

    def _video_tokens(self, latent_shape) -> int:  # (PipeFusion's sequence: the image tokens)
        return int(np.prod(self.transformer.grid(latent_shape)))

    def schedule(self, num_inference_steps: int, sigmas=None):
        """diffusers' sigmas ``linspace(1, 0, steps + 1)[:-1]`` (or the caller's), shifted by the scheduler."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if sigmas is None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        return flow_match.make_schedule(self.scheduler_config, sigmas=sigmas)

    def _decode_fn(self):
        """Jitted VAE decode over the whole mesh of ``latents / scaling_factor`` -> (B, H, W, 3) in [0, 1]."""
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, **kw):
            return vae_hyi.decode(vae, vae_hyi.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def _state(self, shape, do_cfg: bool):
        """The scheduler state of the first step: the APG momentum buffer (zeros), placed as the latents."""
        if not do_cfg:
            return ()
        return (jax.device_put(jnp.zeros(shape, jnp.float32), self._latent_sharding(shape)),)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, ocr: bool = False, guidance_scale: float | None = None,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it (``ocr``: under
        the ``ocr_guider``, as a prompt with quoted text; ``guidance_scale``: as the call's)."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        guider = self.ocr_guider if ocr and self.ocr_guider is not None else self.guider
        if guidance_scale is not None:
            guider = dict(guider, guidance_scale=float(guidance_scale))
        do_cfg = cfg_enabled(guider, num_inference_steps)
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec,
                      2.0 if do_cfg else 1.0)
        tc = self.transformer_config
        d2 = self.text_encoder_2.cfg.d_model
        shape = self.latent_shape(batch, height, width)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, tc.text_embed_dim), self.dtype), sd((n, max_sequence_length), jnp.int32),
                 sd((n, BYT5_MAX_LENGTH, d2), self.dtype), sd((n, BYT5_MAX_LENGTH), jnp.int32))
        state = (latents,) if do_cfg else ()
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True,
                                      text_len=max_sequence_length + BYT5_MAX_LENGTH)
        return self._step_fn(do_cfg, warmup=kv is None, rescale=guider["guidance_rescale"] > 0).lower(
            tstate, latents, state, jnp.int32(0), kv, texts, sched,
            jnp.asarray(guidance_vector(guider, num_inference_steps)), jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float | None = None, distilled_guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, prompt_embeds_2=None, prompt_embeds_mask_2=None,
                 negative_prompt_embeds_2=None, negative_prompt_embeds_mask_2=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> HunyuanImagePipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent"); ``guidance_scale``: this
        call's CFG scale for the guider it picks (None: the guider's config's, as diffusers, which sets it on the
        guider); ``distilled_guidance_scale``: the distilled model's, ignored here
        (only the base model loads); ``max_sequence_length``: diffusers' ``tokenizer_max_length`` (1000)."""
        if distilled_guidance_scale is not None:
            log.warning("distilled_guidance_scale is ignored: this HunyuanImage transformer is not "
                        "guidance-distilled (as in diffusers).")
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type,
                                      "(with prompt_embeds_mask, prompt_embeds_2 and prompt_embeds_mask_2)")
        given = (prompt_embeds, prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2)
        if prompt_embeds is not None and any(a is None for a in given):
            raise ValueError("prompt_embeds need prompt_embeds_mask, prompt_embeds_2 and prompt_embeds_mask_2 "
                             "(HunyuanImage reads the Qwen2.5-VL and the ByT5 states and their masks).")
        neg_given = (negative_prompt_embeds, negative_prompt_embeds_mask, negative_prompt_embeds_2,
                     negative_prompt_embeds_mask_2)
        if any(a is not None for a in neg_given) and any(a is None for a in neg_given):
            raise ValueError("negative_prompt_embeds need all four: negative_prompt_embeds(_2) and their masks.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Give either negative_prompt or negative_prompt_embeds, not both.")
        per = per_prompt(num_images_per_prompt)
        sched = self.schedule(num_inference_steps, sigmas)
        n = len(sched.timesteps)
        # the checks before any heavy work; the guider (hence cfg=2's use) as the prompts' quotes pick it (checked
        # again on the ByT5 states, diffusers' rule, after the text)
        guess = (self.guider if prompts is None or self.ocr_guider is None or
                 all(extract_glyph_text(p) is None for p in prompts) else self.ocr_guider)
        guess = guess if guidance_scale is None else dict(guess, guidance_scale=float(guidance_scale))
        check_request(self.transformer_config, self.vae_config, height, width, batch,
                      self.mesh_spec if prompts is not None else None, 2.0 if cfg_enabled(guess, n) else 1.0)
        timer = StageTimer()

        # 1. text: Qwen states + mask, ByT5 states + mask; the guider; [negative; prompt] for CFG
        with timer.stage("text_encoding"):
            texts = given if prompt_embeds is not None else self.encode_prompt(prompts, max_sequence_length)
            texts = self._checked(*texts, what="prompt")
            ocr = bool(np.any(np.asarray(texts[2]) != 0))
            guider = self.ocr_guider if ocr and self.ocr_guider is not None else self.guider
            if guidance_scale is not None:
                guider = dict(guider, guidance_scale=float(guidance_scale))
            do_cfg = cfg_enabled(guider, n)
            check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec,
                          2.0 if do_cfg else 1.0)
            if do_cfg:
                if negative_prompt_embeds is not None:
                    neg = self._checked(*neg_given, what="negative_prompt")
                else:
                    neg = self._checked(*self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                            max_sequence_length), what="negative_prompt")
                if any(a.shape != b.shape for a, b in zip(neg, texts)):
                    raise ValueError(f"negative prompt embeddings {[tuple(a.shape) for a in neg]} must have the "
                                     f"prompt's shapes {[tuple(a.shape) for a in texts]}.")
                texts = tuple(jnp.concatenate([a, b]) for a, b in zip(neg, texts))
            texts = tuple(self._put_batch(x, do_cfg, per) for x in texts)
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, h, w)
        shape = self.latent_shape(batch * per, height, width)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, latent channels, height / s, width / s")

        # 3. denoise: one jitted step per iteration (the momentum buffer as the scheduler's state); then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        g = self._put_replicated(jnp.asarray(guidance_vector(guider, n)))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape),
                                      text_len=int(texts[0].shape[1] + texts[2].shape[1]))
        self._rescale = guider["guidance_rescale"] > 0  # (the step's rescale_noise_cfg: this call's guider's)
        out = self._denoise_and_decode(timer, do_cfg, latents, self._state(shape, do_cfg),
                                       (texts, sched_arrays, g, rng), n, progress, output_type, self._decode_fn(),
                                       kv=kv)
        return HunyuanImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
