"""HunyuanVideo image-to-video, diffusers' ``HunyuanVideoImageToVideoPipeline`` on a JAX mesh, for both transformer
kinds (``image_condition_type``): "latent_concat" (hunyuanvideo-community/HunyuanVideo-I2V) and "token_replace"
(HunyuanVideo-I2V-33ch's kind).

    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained("hunyuanvideo-community/HunyuanVideo-I2V",
                                                            mesh="ulysses=8", dtype="bfloat16")
    out = pipe(image, "A man plays a red electric guitar.", height=320, width=512, num_frames=61, seed=42)

As diffusers (on :class:`xdit_jax.pipelines.hunyuan_video.HunyuanVideoPipeline`):

* the text encoder is LLaVA (:mod:`xdit_jax.models.llava`): the templated prompt (:data:`DEFAULT_PROMPT_TEMPLATE`,
  whose ``<image>`` token is widened to ``image_emb_len`` image tokens, :func:`expand_image_tokens`, with diffusers'
  attention mask and ``position_ids``) and the image (the checkpoint's ``image_processor``: CLIP's resize, crop and
  normalization) through the vision tower, the projector and the Llama layers; ``hidden_states[-3]`` cropped as
  diffusers crops it (:func:`crop_states`): the image's states every ``image_embed_interleave``-th (2 for
  latent_concat, 4 for token_replace), then the prompt's states without the template and the assistant header's 4
  tokens; CLIP-L's pooled output of the prompt as in text-to-video. A negative prompt (true CFG) is encoded with a
  black image and interleave 2, as diffusers does (token_replace: its texts then differ in length from the prompt's;
  the shorter is padded with masked tokens, :func:`pad_text`, to run both in one batch);
* the image's latents: the VAE encoder's mode (``argmax``) times ``scaling_factor``; the starting latents ``0.999
  noise + 0.001 image`` (float32, diffusers' ``t``) on every frame. latent_concat: each step's input is ``[latents,
  image latents on frame 0 (zeros after), mask (1 on frame 0)]`` on channels; token_replace: the latents with the
  image's latents as frame 0, whose tokens the transformer modulates with timestep 0's embedding, and frame 0 set
  to the image's latents after the last step. The condition rides as a step input, batch-sharded as the text;
* the last: latent_concat drops the first latent frame (``output_type="latent"``) or the decoded video's first 4
  frames; token_replace keeps them.

Defaults: 720 x 1280, 129 frames, 50 steps, ``guidance_scale`` 1.0 (diffusers' I2V default), true CFG off.
Differences: one ``image`` for every prompt (diffusers takes a list, one per prompt); ``num_videos_per_prompt`` > 1
and ``compile_step`` are refused; the prompt template is checked (its ``image_emb_len`` against the vision tower's
tokens, its ``<image>`` at ``image_emb_start``), where diffusers fails later or silently overwrites tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import vae_hunyuan_video as hv_vae
from xdit_jax.pipelines import hunyuan_video as hvp
from xdit_jax.pipelines.denoise import (
    StageTimer,
    negative_prompts,
    peak_memory_bytes,
    prompt_batch,
    tokenize,
)
from xdit_jax.schedulers import flow_match

DEFAULT_PROMPT_TEMPLATE = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following aspects "
        "according to the reference image: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "crop_start": 103,
    "image_emb_start": 5,
    "image_emb_end": 581,
    "image_emb_len": 576,
}
START_FRACTION = np.float32(0.999)  # diffusers' prepare_latents: latents * t + image_latents * (1 - t)


def expand_image_tokens(ids, mask, max_length: int, image_token: int, emb_len: int, emb_start: int, emb_end: int,
                        pad_token: int):
    """diffusers' ``_expand_input_ids_with_image_tokens`` (numpy): each ``image_token`` widened to ``emb_len``
    tokens -> (ids, attention mask: 1 where not ``pad_token``, position_ids: ``cumsum(mask) - 1``, 1 on padding)."""
    ids = np.asarray(ids)
    is_image = ids == image_token
    width = max_length + int(is_image.sum(-1).max()) * (emb_len - 1)
    new_pos = np.cumsum(is_image * (emb_len - 1) + 1, -1) - 1
    out = np.full((ids.shape[0], width), pad_token, ids.dtype)
    rows, cols = np.nonzero(~is_image)
    out[rows, new_pos[rows, cols]] = ids[rows, cols]
    out[:, emb_start:emb_end] = image_token
    m = (out != pad_token).astype(np.asarray(mask).dtype)
    pos = np.where(m == 0, 1, np.cumsum(m, -1) - 1)
    return out, m, pos


def crop_states(states, ids, mask, crop_start: int, emb_len: int, emb_start: int, emb_end: int, end_header: int,
                interleave: int):
    """diffusers' crop of the LLaVA states (B, L_expanded, D) (numpy): ``(image states [::interleave] then the
    prompt's states without the template and the assistant header, their mask)``; ``ids`` / ``mask``: the
    tokenizer's (not expanded)."""
    states, ids, mask = np.asarray(states), np.asarray(ids), np.asarray(mask)
    if crop_start is None or crop_start <= 0:
        return states, mask
    text_crop = crop_start - 1 + emb_len
    rows, cols = np.nonzero(ids == end_header)
    if cols.shape[0] == 2:  # (diffusers' case of a truncated assistant header: one row)
        cols = np.concatenate([cols, [ids.shape[-1] - 1]])
    assistant = cols.reshape(ids.shape[0], -1)[:, -1] + 1
    embs, masks = [], []
    for i in range(ids.shape[0]):
        a = int(assistant[i])
        prompt = np.concatenate([states[i, text_crop:a - 1 + emb_len - 4], states[i, a - 1 + emb_len:]])
        pmask = np.concatenate([mask[i, crop_start:a - 4], mask[i, a:]])
        image = states[i, emb_start:emb_end]
        imask = np.ones(image.shape[0], mask.dtype)
        if 0 < interleave < 6:
            image, imask = image[::interleave], imask[::interleave]
        embs.append(np.concatenate([image, prompt]))
        masks.append(np.concatenate([imask, pmask]))
    return np.stack(embs), np.stack(masks)


def pixel_values(image_processor, image) -> np.ndarray:
    """(1, 3, S, S) float32: the image as LLaVA's CLIP image processor prepares it (PIL, or an array (H, W, 3) uint8
    or floats in [0, 1], rounded to uint8 as the processor's PIL backend does)."""
    from xdit_jax.pipelines.denoise import rgb_image

    im = rgb_image(image)
    if isinstance(im, np.ndarray) and im.dtype != np.uint8:
        im = np.round(im * 255).astype(np.uint8)
    return np.asarray(image_processor(images=[im], return_tensors="np")["pixel_values"], np.float32)


def llava_prompt_embeds(tokenizer, cfg, image_processor, prompts: list[str], max_sequence_length: int = 256,
                        template: dict | None = None, image=None, interleave: int = 2, encode=None):
    """diffusers' ``_get_llama_prompt_embeds`` of HunyuanVideo I2V (``num_hidden_layers_to_skip=2``): (states (B,
    image tokens / interleave + max_sequence_length - 4, D), mask) of the templated prompts with ``image`` (one for
    every prompt). ``cfg``: the :class:`~xdit_jax.models.llava.LlavaConfig`; ``encode(ids, mask, position_ids,
    pixel_values) -> hidden_states[-3]`` (a pipeline's jitted LLaVA)."""
    template = DEFAULT_PROMPT_TEMPLATE if template is None else template
    crop_start = template.get("crop_start")
    emb_len = template.get("image_emb_len", 576)
    emb_start, emb_end = template.get("image_emb_start", 5), template.get("image_emb_end", 581)
    if crop_start is None:  # diffusers: the template's tokens less 5
        crop_start = tokenizer(template["template"], padding="max_length", return_tensors="np")["input_ids"]
        crop_start = crop_start.shape[-1] - 5
    length = max_sequence_length + crop_start
    enc = tokenizer([template["template"].format(p) for p in prompts], max_length=length, padding="max_length",
                    truncation=True, return_tensors="np", return_attention_mask=True)
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    features = cfg.vision.num_patches + (cfg.vision_feature_select_strategy == "full")
    if emb_len != features or emb_end - emb_start != emb_len:
        raise ValueError(f"prompt_template's image_emb_len {emb_len} (image_emb_start {emb_start}, image_emb_end "
                         f"{emb_end}) does not match the vision tower's {features} image features.")
    is_image = ids == cfg.image_token_index
    if not (is_image.sum(-1) == 1).all() or not is_image[:, emb_start].all():
        raise ValueError(f"prompt_template must hold one <image> token (id {cfg.image_token_index}), at token "
                         f"{emb_start} (image_emb_start) of the tokenized prompt.")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else tokenizer.pad_token_id
    x_ids, x_mask, x_pos = expand_image_tokens(ids, mask, length, cfg.image_token_index, emb_len, emb_start, emb_end,
                                               pad)
    pixels = np.repeat(pixel_values(image_processor, image), len(prompts), axis=0)
    states = encode(x_ids.astype(np.int32), x_mask.astype(np.int32), x_pos.astype(np.int32), pixels)
    return crop_states(jax.device_get(states), ids, mask, crop_start, emb_len, emb_start, emb_end,
                       tokenizer.convert_tokens_to_ids("<|end_header_id|>"), interleave)


def pad_text(emb, mask, n_emb, n_mask):
    """Both (states, mask) pairs padded at the end to the longer's length (zero states, mask 0)."""
    length = max(emb.shape[1], n_emb.shape[1])

    def pad(e, m):
        extra = length - e.shape[1]
        if extra <= 0:
            return e, m
        return (jnp.concatenate([e, jnp.zeros((e.shape[0], extra) + e.shape[2:], e.dtype)], axis=1),
                jnp.concatenate([m, jnp.zeros((m.shape[0], extra), m.dtype)], axis=1))

    return (*pad(emb, mask), *pad(n_emb, n_mask))


class HunyuanVideoImageToVideoPipeline(hvp.HunyuanVideoPipeline):
    """Image-to-video with HunyuanVideo-I2V — see the module docstring."""

    PIPELINE_CLASSES = ("HunyuanVideoImageToVideoPipeline",)

    def __init__(self, *, vae_encoder, image_processor, **parts):
        super().__init__(**parts)
        self.vae_encoder, self.image_processor = vae_encoder, image_processor
        tc, c = self.transformer_config, self.vae_config.latent_channels
        self.condition_type = tc.image_condition_type
        if self.condition_type not in ("latent_concat", "token_replace"):
            raise ValueError(f"image_condition_type={tc.image_condition_type!r}: HunyuanVideo image-to-video needs an "
                             "image-to-video transformer ('latent_concat' or 'token_replace').")
        want = 2 * c + 1 if self.condition_type == "latent_concat" else c
        if tc.in_channels != want:
            raise ValueError(f"transformer in_channels {tc.in_channels}: {self.condition_type} takes {want} (the VAE's "
                             f"{c} latent channels" + (" twice and the mask)." if want != c else ")."))

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The VAE's encoder (``vae/encoder_params``, written by conversion; float32, one frame) and the CLIP image
        processor of the LLaVA text encoder."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_hunyuan_video_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder
        from xdit_jax.pipelines.wan import load_image_processor

        vc = hv_vae.HunyuanVideoVAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return {**super()._extra_parts(folder, mesh, dtype, kind),
                "vae_encoder": load_vae_encoder(folder, vc, jnp.float32, NamedSharding(mesh, P()),
                                                vae_hunyuan_video_encoder),
                "image_processor": load_image_processor(folder)}

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        shape = super().latent_shape(batch, height, width, num_frames)
        return (shape[0], self.vae_config.latent_channels) + shape[2:]

    # ------------------------------------------------------------------ text (LLaVA) + image

    def _llava_fn(self):
        fns = self.__dict__.setdefault("_text_fns", {})
        if "llava" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            index = -(hvp.NUM_HIDDEN_LAYERS_TO_SKIP + 1)
            enc = jax.jit(lambda state, *a: nnx.merge(graphdef, state).hidden_state(*a, index))
            fns["llava"] = lambda *a: enc(state, *(self._put_replicated(jnp.asarray(x)) for x in a))
        return fns["llava"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256, prompt_template: dict | None = None,
                      image=None, image_embed_interleave: int = 2):
        """((B, L, d) LLaVA states, (B, L) int32 mask, (B, d_clip) pooled CLIP) as diffusers' ``encode_prompt``
        with ``image`` (one, for every prompt)."""
        if image is None:
            raise ValueError("HunyuanVideo image-to-video encodes the prompt with the image: pass image.")
        emb, emask = llava_prompt_embeds(self.tokenizer, self.text_encoder.cfg, self.image_processor, prompts,
                                         max_sequence_length, prompt_template, image, image_embed_interleave,
                                         self._llava_fn())
        clip_ids, _ = tokenize(self.tokenizer_2, prompts, hvp.CLIP_TOKENS)
        pooled = self._clip_pooled_fn()(clip_ids)
        return jnp.asarray(emb, self.dtype), jnp.asarray(emask, jnp.int32), pooled.astype(self.dtype)

    def _encode_fn(self):
        """Jitted: an image (1, 3, 1, H, W) in [-1, 1] -> the posterior's mode times ``scaling_factor`` (1, C, 1, h,
        w), replicated."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "vae_encode" not in fns:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from xdit_jax.models import vae_hunyuan_video_encoder

            graphdef, state = nnx.split(self.vae_encoder)
            vc, mesh = self.vae_config, (self.mesh if self.mesh.size > 1 else None)

            def enc(state, x):
                z = vae_hunyuan_video_encoder.encode(nnx.merge(graphdef, state), x, mesh=mesh)
                return z.astype(jnp.float32) * vc.scaling_factor

            jitted = jax.jit(enc, out_shardings=NamedSharding(self.mesh, P()))
            fns["vae_encode"] = lambda x: jitted(state, self._put_replicated(x))
        return fns["vae_encode"]

    def image_latents(self, image, height: int, width: int) -> jax.Array:
        """(1, C, 1, h, w): the image (resized as diffusers' ``VideoProcessor.preprocess``) encoded and scaled."""
        from xdit_jax.pipelines.denoise import preprocess_image

        return self._encode_fn()(preprocess_image(image, height, width)[:, :, None])

    # ------------------------------------------------------------------ the step

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """As text-to-video's, with ``texts[4]``: latent_concat's condition (image latents + mask, (B, C + 1, F, h,
        w)) beside the noise on channels, or token_replace's image latents (B, C, 1, h, w) as the first frame (the
        Euler step is per element: the first frame's update is dropped, as diffusers never makes it)."""
        guided = self.transformer_config.guidance_embeds
        if self.condition_type == "latent_concat":
            join = lambda x, c: jnp.concatenate([x, c.astype(x.dtype)], axis=1)  # noqa: E731
        else:
            join = lambda x, c: x.at[:, :, :1].set(c.astype(x.dtype))  # noqa: E731
        return self._flow_step_fn(do_cfg, warmup, lambda x, texts, t: (
            join(x, texts[4]), t, texts[0], texts[1], texts[2], texts[3] if guided else None))

    def compile_step(self, *a, **kw):
        raise NotImplementedError("compile_step of HunyuanVideo image-to-video is not provided (the step takes the "
                                  "image condition too); run the pipeline.")

    # ------------------------------------------------------------------ call

    def __call__(self, image=None, prompt: str | list[str] | None = None, prompt_2=None, negative_prompt=None,
                 negative_prompt_2=None, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 true_cfg_scale: float = 1.0, guidance_scale: float = 1.0, num_videos_per_prompt: int = 1,
                 latents=None, prompt_embeds=None, pooled_prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 negative_prompt_attention_mask=None, prompt_template: dict | None = None,
                 max_sequence_length: int = 256, image_embed_interleave: int | None = None, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> hvp.HunyuanVideoPipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent")."""
        del prompt_2, negative_prompt_2  # (diffusers reads neither)
        if image is None:
            raise ValueError("HunyuanVideo image-to-video needs an image (the first frame).")
        if num_videos_per_prompt != 1:
            raise ValueError("num_videos_per_prompt > 1 is not supported for HunyuanVideo image-to-video.")
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type,
                                      "(with pooled_prompt_embeds and prompt_attention_mask)")
        if prompt_embeds is not None and (pooled_prompt_embeds is None or prompt_attention_mask is None):
            raise ValueError("prompt_embeds need pooled_prompt_embeds and prompt_attention_mask.")
        replace = self.condition_type == "token_replace"
        interleave = (4 if replace else 2) if image_embed_interleave is None else int(image_embed_interleave)
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        do_cfg = true_cfg_scale > 1.0 and has_negative
        self.check_inputs(height, width, num_frames, batch, true_cfg_scale if do_cfg else 1.0)
        sched = self.schedule(num_inference_steps, sigmas)
        timer = StageTimer()

        # 1. the image's latents (diffusers encodes it before the text)
        shape = self.latent_shape(batch, height, width, num_frames)
        with timer.stage("image_encoding"):
            z = self.image_latents(image, height, width)
            frames = shape[2]
            full = jnp.repeat(z, frames, axis=2)
            cond = z if replace else jnp.concatenate(
                [full.at[:, :, 1:].set(0.0), jnp.zeros((1, 1) + full.shape[2:], jnp.float32).at[:, :, 0].set(1.0)],
                axis=1)

        # 2. text
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_prompt(
                    prompts, max_sequence_length, prompt_template, image, interleave)
            emb, mask, pooled = self._checked(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "prompt")
            if do_cfg:
                from PIL import Image

                if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None or \
                        negative_prompt_attention_mask is None:
                    # diffusers: a black image, and encode_prompt's default interleave (2)
                    n_emb, n_mask, n_pooled = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                 max_sequence_length, prompt_template,
                                                                 Image.new("RGB", (width, height), 0), 2)
                    if negative_prompt_embeds is not None and negative_prompt_attention_mask is not None:
                        n_emb, n_mask = negative_prompt_embeds, negative_prompt_attention_mask
                    if negative_pooled_prompt_embeds is not None:
                        n_pooled = negative_pooled_prompt_embeds
                else:
                    n_emb, n_mask, n_pooled = (negative_prompt_embeds, negative_prompt_attention_mask,
                                               negative_pooled_prompt_embeds)
                n_emb, n_mask, n_pooled = self._checked(n_emb, n_mask, n_pooled, "negative_prompt")
                # token_replace: the prompt's image states every 4th, the negative's every 2nd (diffusers' two
                # passes differ in length); one batch here, the shorter padded with masked tokens (the text mask
                # is a prefix: the padding is outside every sample's valid keys, which changes nothing)
                emb, mask, n_emb, n_mask = pad_text(emb, mask, n_emb, n_mask)
                if n_emb.shape != emb.shape:
                    raise ValueError(f"negative prompt embeddings {n_emb.shape} must have the prompt's shape "
                                     f"{emb.shape}.")
                emb, mask, pooled = (jnp.concatenate([a, b]) for a, b in ((n_emb, emb), (n_mask, mask),
                                                                          (n_pooled, pooled)))
            guidance = jnp.full((emb.shape[0],), guidance_scale * 1000.0, jnp.float32)
            texts = tuple(self._put_batch(x, do_cfg) for x in (emb, mask, pooled, guidance))
            texts += (self._put_condition(cond, batch, do_cfg),)
            jax.block_until_ready(texts)

        # 3. latents: 0.999 noise + 0.001 image (diffusers' prepare_latents, float32)
        rng = jax.random.key(seed)
        noise = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                      "batch, channels, (frames - 1) // 4 + 1, height/8, width/8")
        start = noise * START_FRACTION + full * (np.float32(1.0) - START_FRACTION)
        start = jax.device_put(start, self._latent_sharding(shape))

        # 4. denoise, then the VAE; the image's frame dropped
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(true_cfg_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape), text_len=texts[0].shape[1])
        out = self._denoise_and_decode(timer, do_cfg, start, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv,
                                       finish=(lambda x: x.at[:, :, :1].set(z)) if replace else None)
        if not replace:  # latent_concat: the image's frame dropped (diffusers)
            out = out[:, :, 1:] if output_type == "latent" else out[:, self.vae_config.temporal_compression_ratio:]
        return hvp.HunyuanVideoPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
