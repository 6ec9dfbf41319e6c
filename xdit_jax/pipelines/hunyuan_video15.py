"""HunyuanVideo-1.5 text-to-video, diffusers' ``HunyuanVideo15Pipeline`` on a JAX mesh.

    pipe = HunyuanVideo15Pipeline.from_pretrained("hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
                                                  mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat walks on the grass, realistic", num_frames=121, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

As diffusers (0.42):

* the Qwen2.5-VL text: the prompt as a chat (:data:`SYSTEM_MESSAGE` as the system turn, the prompt, or " " for an
  empty one, as the user turn, the generation prompt added) through the tokenizer's chat template, padded to
  ``max_sequence_length + CROP_START`` (1000 + 108) tokens; ``hidden_states[-3]`` of the language model
  (``num_hidden_layers_to_skip`` 2); the first :data:`CROP_START` tokens (the template's system part) cropped, the
  states and their mask;
* the ByT5 glyph text (:func:`extract_glyph_texts`): the texts quoted in the prompt ("..." or “...”), deduplicated
  where more than one, as ``Text "a". Text "b". ``; tokenized (byte-level, 256 tokens) and encoded by the T5
  encoder, with its mask; a prompt without quotes gives zeros and an all-zero mask (its ByT5 tokens then take no
  part);
* the guider (``guider/config.json``, diffusers' ``ClassifierFreeGuidance``, all of its options): CFG when enabled,
  ``guidance_scale`` not 1 (0 with ``use_original_formulation``) and the step within ``[int(start n), int(stop n))``
  of the n steps, the negative prompt ("" by default) encoded as the prompt is; ``pred = uncond + scale (cond -
  uncond)`` (``cond + ...`` with ``use_original_formulation``), the cond prediction alone outside the range, then
  ``rescale_noise_cfg`` by ``guidance_rescale`` (:func:`guided`, :func:`guided_rescaled`); the two passes one
  batch ``[negative; prompt]`` over the ``cfg`` mesh axis (a step outside the range still runs both and takes the
  prompt's);
* sigmas ``linspace(1, 0, steps + 1)[:-1]`` shifted by the scheduler's ``shift``, the Euler step, in one jitted
  step; latents (B, latent_channels, (F - 1) // 4 + 1, H / 16, W / 16); the transformer's input is the latents,
  the zero condition latents (T2V: ``latent_channels`` zeros) and the zero mask channel, concatenated
  (``in_channels`` = 2 x latent + 1); the VAE decode of ``latents / scaling_factor``, the image plane split over
  the mesh (:func:`xdit_jax.models.vae_hunyuan_video15.decode`). The default size: the transformer's
  ``target_size`` bucket nearest 16:9 (:func:`default_size`; 480 x 848 for target_size 640), 121 frames, 50 steps.

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the video tokens over ``ring`` x ``ulysses`` (the
text joins every attention as the masked context: :data:`xdit_jax.models.hunyuan_video15.TEXT_KEYS`), PipeFusion
over the block stack.

Differences from diffusers, on purpose: ``num_frames`` must be 4k + 1 (diffusers rounds others down silently); the
latents and the timestep stay float32 in bf16 too (diffusers rounds the timestep to bf16); a string
``negative_prompt`` serves every prompt of a batch.

Image-to-video: :class:`HunyuanVideo15ImageToVideoPipeline` (diffusers' ``HunyuanVideo15ImageToVideoPipeline``; the
SigLIP vision tower :mod:`xdit_jax.models.siglip`, the VAE encoder :mod:`xdit_jax.models.vae_hunyuan_video15_encoder`).
"""

from __future__ import annotations

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.models import hunyuan_video15 as hv15
from xdit_jax.models import vae_hunyuan_video15 as vae15
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.hunyuan_video import HunyuanVideoPipeline, HunyuanVideoPipelineOutput
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

HunyuanVideo15PipelineOutput = HunyuanVideoPipelineOutput
# diffusers' system_message (its line continuations keep each next line's 8 leading spaces)
SYSTEM_MESSAGE = ("You are a helpful assistant. Describe the video by detailing the following aspects:         "
                  "1. The main content and theme of the video.         "
                  "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
                  "         "
                  "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.  "
                  "       4. background environment, light, style and atmosphere.         "
                  "5. camera angles, movements, and transitions used in the video.")
CROP_START = 108  # diffusers' prompt_template_encode_start_idx
MAX_SEQUENCE_LENGTH = 1000  # diffusers' tokenizer_max_length (after the crop)
BYT5_MAX_LENGTH = 256  # diffusers' tokenizer_2_max_length
DEFAULT_ASPECT = (16, 9)  # diffusers' default_aspect_ratio (width, height)


def extract_glyph_texts(prompt: str) -> str | None:
    """diffusers' ``extract_glyph_texts``: the texts in "..." or “...” quotes (deduplicated, in order, where more
    than one), as ``Text "a". Text "b". ``; None without quotes."""
    found = [a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", prompt)]
    found = list(dict.fromkeys(found)) if len(found) > 1 else found
    return ". ".join(f'Text "{t}"' for t in found) + ". " if found else None


def crop_size_list(base_size: int, patch_size: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """HunyuanVideo-1.5's ``generate_crop_size_list``: (width, height) buckets of about ``base_size**2`` pixels."""
    num_patches = round((base_size / patch_size) ** 2)
    out, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def bucket_size(target_size: int, spatial: int, height: float, width: float) -> tuple[int, int]:
    """diffusers' ``calculate_default_height_width(height, width, target_size)``: of the buckets of about
    ``target_size**2`` pixels (:func:`crop_size_list`) whose first / second entry ratio lies on the same side of
    ``height / width`` as 1 (``get_closest_ratio``), the closest; diffusers reads the bucket's first entry as the
    height."""
    buckets = crop_size_list(target_size, spatial)
    ratios = np.array([round(float(h) / float(w), 5) for h, w in buckets])
    aspect = float(height) / float(width)
    diff = ratios - aspect
    pick = [(i, x) for i, x in enumerate(diff) if (x <= 0 if aspect >= 1 else x >= 0)]
    i = min(pick, key=lambda p: abs(p[1]))[0]
    return buckets[i]


def default_size(target_size: int, spatial: int) -> tuple[int, int]:
    """(height, width) of text-to-video: :func:`bucket_size` of diffusers' default 16:9."""
    return bucket_size(target_size, spatial, DEFAULT_ASPECT[1], DEFAULT_ASPECT[0])


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, hv15.HunyuanVideo15Config, vae15.HunyuanVideo15VAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: the ``target_size`` bucket nearest 16:9, 121 frames; diffusers' example writes 15
    fps, as here."""
    h, w = default_size(tc.target_size if tc is not None else 640, vc.spatial_compression_ratio if vc else 16)
    return {"height": h, "width": w, "num_frames": 121, "fps": 15}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 1.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work (``guidance_scale``: the
    guider's, which decides whether the batch doubles)."""
    st = vc.temporal_compression_ratio
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or \
            (num_frames - 1) % st:
        raise ValueError(f"num_frames must be {st}k + 1 (1, 5, 9, ..., 121: the VAE's causal frames), got "
                         f"{num_frames!r}.")
    check_size_and_mesh(height, width, vc.spatial_compression_ratio * tc.patch_size, tc.num_layers, batch,
                        mesh_spec, guidance_scale)



def byt5_states(pipe, glyphs: list[str | None], max_length: int):
    """(ByT5 states (B, max_length, d) in the pipeline's dtype, their int32 mask) of the glyph texts, one per prompt
    (None: the prompt quotes nothing: zeros and an all-zero mask), as diffusers' HunyuanVideo-1.5 / HunyuanImage-2.1
    ``_get_byt5_prompt_embeds``: ``pipe.tokenizer_2`` padded to ``max_length``, ``pipe.text_encoder_2`` (T5)."""
    emb = np.zeros((len(glyphs), max_length, pipe.text_encoder_2.cfg.d_model), np.float32)
    mask = np.zeros((len(glyphs), max_length), np.int32)
    rows = [i for i, g in enumerate(glyphs) if g is not None]
    if rows:
        tok = pipe.tokenizer_2([glyphs[i] for i in rows], padding="max_length", max_length=max_length,
                               truncation=True, add_special_tokens=True, return_tensors="np")
        out = np.asarray(pipe._text_encoder_fn("text_encoder_2")(
            pipe._put_replicated(jnp.asarray(tok.input_ids, jnp.int32)),
            pipe._put_replicated(jnp.asarray(tok.attention_mask, jnp.int32))).astype(jnp.float32))
        emb[rows], mask[rows] = out, tok.attention_mask
    return jnp.asarray(emb).astype(pipe.dtype), jnp.asarray(mask)


class HunyuanVideo15Pipeline(HunyuanVideoPipeline):
    """Text-to-video with HunyuanVideo-1.5 — see the module docstring. (1.0's pipeline lends the Qwen encoder's
    jitted ``hidden_states[-3]`` and the schedule.)"""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    _vae = vae15

    PIPELINE_CLASSES = ("HunyuanVideo15Pipeline",)
    CONFIG = hv15.HunyuanVideo15Config
    MORE_TEXT_ENCODERS = ("_2",)  # ByT5 (the first: Qwen2.5-VL's language model)
    stacks = staticmethod(hv15.pipefusion_stacks)

    def __init__(self, *, guider: dict | None = None, **parts):
        super().__init__(**parts)
        self.guider = check_guider(guider or {})

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        from xdit_jax.conversion import read_json

        path = folder / "guider" / "guider_config.json"
        if not path.exists():
            path = folder / "guider" / "config.json"
        return {"guider": read_json(path) if path.exists() else {}}

    # ------------------------------------------------------------------ stages

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                      crop_start: int = CROP_START, byt5_max_length: int = BYT5_MAX_LENGTH):
        """(Qwen states (B, L, d), their int32 mask, ByT5 states (B, L2, d2), their int32 mask) as diffusers'
        ``encode_prompt`` (module docstring)."""
        chats = [[{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": p if p else " "}]
                 for p in prompts]
        enc = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 padding="max_length", max_length=max_sequence_length + crop_start,
                                                 truncation=True, return_tensors="np")
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
        states = self._llama_fn()(ids, mask)[:, crop_start:]
        mask = jnp.asarray(mask[:, crop_start:], jnp.int32)

        emb2, mask2 = byt5_states(self, [extract_glyph_texts(p) for p in prompts], byt5_max_length)
        return states.astype(self.dtype), mask, emb2, mask2

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        """(B, latent_channels, (F - 1) // 4 + 1, H / s, W / s) (the transformer takes 2 x + 1 channels more)."""
        vc = self.vae_config
        s, st = vc.spatial_compression_ratio, vc.temporal_compression_ratio
        return (batch, vc.latent_channels, (num_frames - 1) // st + 1, height // s, width // s)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (Qwen states, mask, ByT5 states, mask),
        a row each; the transformer's input the latents with T2V's zero condition latents and mask channel."""
        extra = self.transformer_config.in_channels - self.vae_config.latent_channels

        def embed_args(x, texts, t):
            cond = jnp.zeros((x.shape[0], extra) + x.shape[2:], x.dtype)
            return (jnp.concatenate([x, cond], axis=1), t) + tuple(texts)

        return self._flow_step_fn(do_cfg, warmup, embed_args, combine=self._guided())

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, guidance_scale: float | None = None,
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it."""
        from flax import nnx

        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        scale = self.guider["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        do_cfg = cfg_enabled(self.guider, scale, num_inference_steps)
        self.check_inputs(height, width, num_frames, batch, 2.0 if do_cfg else 1.0)
        tc = self.transformer_config
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, tc.text_embed_dim), self.dtype), sd((n, max_sequence_length), jnp.int32),
                 sd((n, BYT5_MAX_LENGTH, tc.text_embed_2_dim), self.dtype), sd((n, BYT5_MAX_LENGTH), jnp.int32))
        texts += self._extra_text_specs(n, shape, sd)
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True,
                                      text_len=context_tokens(texts))
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched,
            jnp.asarray(guidance_vector(self.guider, scale, num_inference_steps)),
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, sigmas=None, guidance_scale: float | None = None,
                 guidance_rescale: float | None = None,
                 num_videos_per_prompt: int = 1, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, prompt_embeds_2=None,
                 prompt_embeds_mask_2=None, negative_prompt_embeds_2=None, negative_prompt_embeds_mask_2=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> HunyuanVideo15PipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent"); ``guidance_scale``:
        the guider's (None: ``guider/config.json``'s), as ``guidance_rescale`` (diffusers sets both on the guider);
        ``max_sequence_length``: diffusers' ``tokenizer_max_length`` (1000)."""
        if guidance_rescale is not None:  # this call's guider: the same call under it
            call = dict(locals())  # every argument, as given
            del call["self"], call["guidance_rescale"]
            saved, self.guider = self.guider, check_guider(dict(self.guider, guidance_rescale=guidance_rescale))
            try:
                return HunyuanVideo15Pipeline.__call__(self, **call)
            finally:
                self.guider = saved
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type,
                                      "(with prompt_embeds_mask, prompt_embeds_2 and prompt_embeds_mask_2)")
        given = (prompt_embeds, prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2)
        if prompt_embeds is not None and any(a is None for a in given):
            raise ValueError("prompt_embeds need prompt_embeds_mask, prompt_embeds_2 and prompt_embeds_mask_2 "
                             "(HunyuanVideo-1.5 reads the Qwen2.5-VL and the ByT5 states and their masks).")
        neg_given = (negative_prompt_embeds, negative_prompt_embeds_mask, negative_prompt_embeds_2,
                     negative_prompt_embeds_mask_2)
        if any(a is not None for a in neg_given) and any(a is None for a in neg_given):
            raise ValueError("negative_prompt_embeds need all four: negative_prompt_embeds(_2) and their masks.")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        scale = self.guider["guidance_scale"] if guidance_scale is None else float(guidance_scale)
        sched = self.schedule(num_inference_steps, sigmas)
        do_cfg = cfg_enabled(self.guider, scale, len(sched.timesteps))
        self.check_inputs(height, width, num_frames, batch, 2.0 if do_cfg else 1.0)
        timer = StageTimer()

        # 1. text: Qwen states + mask, ByT5 states + mask; [negative; prompt] for CFG
        with timer.stage("text_encoding"):
            texts = given if prompt_embeds is not None else self.encode_prompt(prompts, max_sequence_length)
            texts = self._checked(*texts, what="prompt")
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
            texts = tuple(self._put_batch(x, do_cfg, per) for x in texts) + self._extra_texts(batch * per, do_cfg)
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout: B, C, F, h, w)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, latent channels, (frames - 1) // 4 + 1, height/16, width/16")

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale_arr = self._put_replicated(jnp.asarray(guidance_vector(self.guider, scale, len(sched.timesteps))))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape),
                                      text_len=context_tokens(texts))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale_arr, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv)
        return HunyuanVideo15PipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _guided(self):
        """The step's guidance combination for this guider (:func:`guided` or :func:`guided_rescaled`)."""
        return guided_rescaled if self.guider["guidance_rescale"] > 0 else guided

    def _extra_texts(self, batch: int, do_cfg: bool) -> tuple:
        """More inputs of the step after the text's (image-to-video's image), placed as the batch: none here."""
        return ()

    def _extra_text_specs(self, rows: int, shape: tuple, spec) -> tuple:
        """The abstract :meth:`_extra_texts` of :meth:`compile_step` (``spec(shape, dtype)``: placed as the batch):
        none here."""
        return ()

    def _checked(self, emb, mask, emb2, mask2, what: str):
        """(Qwen states, int32 mask, ByT5 states, int32 mask), the states in the compute dtype, shapes checked."""
        tc = self.transformer_config
        emb, emb2 = jnp.asarray(emb, self.dtype), jnp.asarray(emb2, self.dtype)
        mask, mask2 = jnp.asarray(mask, jnp.int32), jnp.asarray(mask2, jnp.int32)
        if emb.ndim != 3 or emb.shape[2] != tc.text_embed_dim or mask.shape != emb.shape[:2] or emb2.ndim != 3 or \
                emb2.shape[2] != tc.text_embed_2_dim or mask2.shape != emb2.shape[:2] or emb2.shape[0] != emb.shape[0]:
            raise ValueError(f"{what} embeddings {tuple(emb.shape)} / mask {tuple(mask.shape)}, ByT5 "
                             f"{tuple(emb2.shape)} / mask {tuple(mask2.shape)}: this model takes (batch, tokens, "
                             f"{tc.text_embed_dim}), (batch, tokens), (batch, tokens_2, {tc.text_embed_2_dim}) and "
                             "(batch, tokens_2).")
        return emb, mask, emb2, mask2


def check_guider(g: dict) -> dict:
    """The guider's config (diffusers' ``ClassifierFreeGuidance`` defaults filled in); another guider class, or values
    out of range, refused."""
    cls = g.get("_class_name", "ClassifierFreeGuidance")
    if cls != "ClassifierFreeGuidance":
        raise ValueError(f"guider {cls!r}: HunyuanVideo15Pipeline here runs diffusers' ClassifierFreeGuidance only.")
    g = dict({"guidance_scale": 7.5, "guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0,
              "stop": 1.0, "enabled": True}, **g)
    if not 0.0 <= g["start"] < 1.0 or not g["start"] <= g["stop"] <= 1.0:
        raise ValueError(f"guider start {g['start']} / stop {g['stop']}: fractions of the schedule with 0 <= start < 1 "
                         "and start <= stop <= 1 (diffusers' ClassifierFreeGuidance).")
    if not 0.0 <= g["guidance_rescale"] <= 1.0:
        raise ValueError(f"guider guidance_rescale {g['guidance_rescale']}: a mix factor in [0, 1].")
    return g


def context_tokens(texts: tuple) -> int:
    """The context's tokens in the step's ``texts`` (states at the even places: Qwen, ByT5[, the image's SigLIP]; the
    masks and image-to-video's first-frame condition at the odd ones)."""
    return sum(t.shape[1] for t in texts[::2])


def guided_steps(guider: dict, num_steps: int) -> tuple[int, int]:
    """The steps ``[first, stop)`` where diffusers' ``ClassifierFreeGuidance`` guides: ``int(start n)``,
    ``int(stop n)``."""
    return int(guider["start"] * num_steps), int(guider["stop"] * num_steps)


def cfg_enabled(guider: dict, scale: float, num_steps: int | None = None) -> bool:
    """Whether CFG's two passes run at all (diffusers' ``ClassifierFreeGuidance._is_cfg_enabled`` at some step):
    enabled, the scale not 1 (not 0 with ``use_original_formulation``), and the guided range of ``num_steps`` not
    empty."""
    neutral = 0.0 if guider.get("use_original_formulation") else 1.0
    if not guider.get("enabled", True) or math.isclose(scale, neutral):
        return False
    if num_steps is None:
        return True
    first, stop = guided_steps(guider, num_steps)
    return first < stop


def guidance_vector(guider: dict, scale: float, num_steps: int):
    """The step's ``guidance`` argument for :func:`guided`: (scale, rescale, original formulation, first guided
    step, stop step), float32."""
    first, stop = guided_steps(guider, num_steps)
    return np.asarray([scale, guider["guidance_rescale"], float(bool(guider["use_original_formulation"])), first,
                       stop], np.float32)


def guided(uncond, text, guidance, i):
    """diffusers' ``ClassifierFreeGuidance.forward`` at step ``i`` without ``guidance_rescale`` (``guidance``:
    :func:`guidance_vector`): within the guided steps ``base + scale (text - uncond)`` (base: ``uncond``, or
    ``text`` with the original formulation), outside them ``text``."""
    scale, original, first, stop = guidance[0], guidance[2], guidance[3], guidance[4]
    pred = jnp.where(original > 0, text, uncond) + scale * (text - uncond)
    return jnp.where((i >= first) & (i < stop), pred, text)


def guided_rescaled(uncond, text, guidance, i):
    """:func:`guided`, then diffusers' ``rescale_noise_cfg`` towards ``text`` by the guider's ``guidance_rescale``
    (a step of its own: selecting between the two in one program changes XLA's fusion of the plain sum)."""
    from xdit_jax.pipelines.hunyuandit import rescale_guidance

    return rescale_guidance(guided(uncond, text, guidance, i), text, guidance[1])


def resize_and_crop(image, height: int, width: int):
    """diffusers' ``VideoProcessor.resize(image, height, width, resize_mode="crop")``: the image scaled (Lanczos) to
    cover ``width`` x ``height``, centred, the excess cropped; a PIL image in RGB."""
    from PIL import Image

    from xdit_jax.pipelines.denoise import rgb_image

    image = rgb_image(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image if image.dtype == np.uint8 else (image * 255).round().astype(np.uint8))
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


class HunyuanVideo15ImageToVideoPipeline(HunyuanVideo15Pipeline):
    """Image-to-video with HunyuanVideo-1.5 (diffusers' ``HunyuanVideo15ImageToVideoPipeline``): the size is the
    ``target_size`` bucket nearest the image's aspect ratio (:func:`bucket_size`), the image resized and centre-cropped
    to it (:func:`resize_and_crop`); its SigLIP states (``feature_extractor`` then ``image_encoder``'s
    ``last_hidden_state``) join the transformer's context in both CFG halves; its VAE latents (the encoder's mode x
    ``scaling_factor``) are the first latent frame of the condition channels, the mask channel 1 there and 0 after.
    The rest as :class:`HunyuanVideo15Pipeline`. A ``use_meanflow`` transformer (the step-distilled models') gets
    MeanFlow's ``timestep_r``: the next step's timestep (0 at the last), as diffusers."""

    PIPELINE_CLASSES = ("HunyuanVideo15ImageToVideoPipeline",)

    def __init__(self, *, image_encoder=None, feature_extractor=None, vae_encoder=None, **parts):
        super().__init__(**parts)
        self.image_encoder, self.feature_extractor, self.vae_encoder = image_encoder, feature_extractor, vae_encoder

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_hunyuan_video15_encoder as enc
        from xdit_jax.pipelines.denoise import _RANDOM_WEIGHTS, load_component, load_vae_encoder

        replicated = NamedSharding(mesh, P())
        icfg, image_encoder = load_component(folder, "image_encoder", dtype, replicated)
        if _RANDOM_WEIGHTS.get() is not None or not (folder / "feature_extractor").is_dir():
            from transformers import SiglipImageProcessor

            feature_extractor = SiglipImageProcessor(size={"height": icfg.image_size, "width": icfg.image_size})
        else:
            from transformers import AutoImageProcessor

            feature_extractor = AutoImageProcessor.from_pretrained(folder / "feature_extractor")
        vc = vae15.HunyuanVideo15VAEConfig.from_dict(
            __import__("json").loads((folder / "vae" / "config.json").read_text()))
        return dict(super()._extra_parts(folder, mesh, dtype, kind), image_encoder=image_encoder,
                    feature_extractor=feature_extractor,
                    vae_encoder=load_vae_encoder(folder, vc, dtype, replicated, enc))

    def encode_image(self, image, height: int, width: int):
        """(SigLIP states (1, tokens, image_embed_dim) in the compute dtype, the condition (1, latent + 1, 1, h, w):
        the image's scaled latents and the mask channel's 1) of an image already resized to ``height`` x
        ``width``."""
        from xdit_jax.models import vae_hunyuan_video15_encoder as enc
        from xdit_jax.pipelines.denoise import preprocess_image

        pixels = self.feature_extractor.preprocess(images=image, do_resize=True, return_tensors="np",
                                                   do_convert_rgb=True)["pixel_values"]
        fns = self.__dict__.setdefault("_image_fns", {})
        if not fns:
            from flax import nnx

            gi, si = nnx.split(self.image_encoder)
            ge, se = nnx.split(self.vae_encoder)
            fns["siglip"] = jax.jit(lambda s, x: nnx.merge(gi, s)(x))
            fns["vae"] = jax.jit(lambda s, x: enc.encode(nnx.merge(ge, s), x))
            fns["states"] = (si, se)
        si, se = fns["states"]
        states = fns["siglip"](si, self._put_replicated(jnp.asarray(pixels, self.dtype)))
        video = preprocess_image(image, height, width)[:, :, None].astype(self.dtype)
        latents = fns["vae"](se, self._put_replicated(video)).astype(jnp.float32) * self.vae_config.scaling_factor
        cond = jnp.concatenate([latents, jnp.ones(latents.shape[:1] + (1,) + latents.shape[2:], jnp.float32)], 1)
        return states.astype(self.dtype), cond

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The step of :class:`HunyuanVideo15Pipeline` with the image: ``texts`` ends with the SigLIP states and the
        first frame's condition (latents + mask channel); the later frames' condition is zero."""

        meanflow = self.transformer_config.use_meanflow

        def embed_args(x, texts, t, i, sched):
            emb, mask, emb2, mask2, image, first = texts
            rest = jnp.zeros(first.shape[:2] + (x.shape[2] - 1,) + x.shape[3:], x.dtype)
            cond = jnp.concatenate([first.astype(x.dtype), rest], axis=2)
            n = sched.timesteps.shape[0]  # MeanFlow's timestep_r: the next step's timestep, 0 after the last
            r = jnp.where(i + 1 < n, sched.timesteps[jnp.minimum(i + 1, n - 1)], 0.0) if meanflow else None
            return (jnp.concatenate([x, cond], axis=1), t, emb, mask, emb2, mask2, image, None, r)

        return self._flow_step_fn(do_cfg, warmup, embed_args, combine=self._guided(), embed_step=True)

    def _extra_text_specs(self, rows: int, shape: tuple, spec) -> tuple:
        """The image's inputs for :meth:`compile_step`: SigLIP states (rows, patches, image_embed_dim) and the first
        frame's condition (rows, latent + 1, 1, h, w); ``height`` / ``width`` there: the image's bucket."""
        ic = self.image_encoder.cfg
        return (spec((rows, ic.num_patches, self.transformer_config.image_embed_dim), self.dtype),
                spec((rows, shape[1] + 1, 1) + shape[3:], jnp.float32))

    def __call__(self, image, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 *, num_frames: int = 121, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float | None = None, guidance_rescale: float | None = None,
                 num_videos_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, prompt_embeds_2=None, prompt_embeds_mask_2=None,
                 negative_prompt_embeds_2=None, negative_prompt_embeds_mask_2=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, seed: int = 0, output_type: str = "np",
                 progress: bool = True, height: int | None = None, width: int | None = None):
        """diffusers' arguments (``image``: a PIL image or an (H, W, 3) array; the size comes from it: ``height`` /
        ``width`` are refused, as diffusers takes none)."""
        if height is not None or width is not None:
            raise ValueError("height / width: HunyuanVideo-1.5 image-to-video sizes the video from the image (the "
                             "target_size bucket nearest its aspect ratio), as diffusers; drop them.")
        if image is None:
            raise ValueError("image: HunyuanVideo15ImageToVideoPipeline needs the first frame's image.")
        from xdit_jax.pipelines.denoise import rgb_image

        picture = rgb_image(image)
        h0, w0 = (picture.shape[:2] if isinstance(picture, np.ndarray) else (picture.height, picture.width))
        height, width = bucket_size(self.transformer_config.target_size, self.vae_config.spatial_compression_ratio,
                                    h0, w0)
        picture = resize_and_crop(picture, height, width)
        self._image = picture
        try:
            return super().__call__(prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                                    num_inference_steps=num_inference_steps, sigmas=sigmas,
                                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                    num_videos_per_prompt=num_videos_per_prompt,
                                    latents=latents, prompt_embeds=prompt_embeds,
                                    prompt_embeds_mask=prompt_embeds_mask,
                                    negative_prompt_embeds=negative_prompt_embeds,
                                    negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                                    prompt_embeds_2=prompt_embeds_2, prompt_embeds_mask_2=prompt_embeds_mask_2,
                                    negative_prompt_embeds_2=negative_prompt_embeds_2,
                                    negative_prompt_embeds_mask_2=negative_prompt_embeds_mask_2,
                                    max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                                    progress=progress)
        finally:
            self._image = None

    def _extra_texts(self, batch: int, do_cfg: bool) -> tuple:
        """The image's (SigLIP states, first-frame condition), each row of the step's batch the same."""
        states, cond = self.encode_image(self._image, self._image.height, self._image.width)
        return tuple(self._put_condition(a, batch, do_cfg) for a in (states, cond))
