"""Kandinsky 5.0 image-to-image (editing), diffusers' ``Kandinsky5I2IPipeline`` on a JAX mesh: the text-to-image
pipeline (:mod:`xdit_jax.pipelines.kandinsky5_t2i`) with the image read twice.

    pipe = Kandinsky5I2IPipeline.from_pretrained("kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers", mesh="cfg=2")
    out = pipe(image, "Make the cat wear a red hat", seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers:

* the size: ``height`` / ``width``, else the image's, snapped (with a warning) to the resolution list's nearest aspect
  ratio (:data:`~xdit_jax.pipelines.kandinsky5_t2i.RESOLUTIONS`);
* Qwen2.5-VL reads the image, halved (PIL's ``resize``), through its vision tower
  (:mod:`xdit_jax.models.qwen2_5_vl_vision`, the image processor's settings from ``tokenizer/``: diffusers' tokenizer is
  a ``Qwen2VLProcessor``) inside the editing template (:data:`PROMPT_TEMPLATE`, the image after the prompt), with the
  attention mask and the image tokens' 3-D positions (transformers' ``get_rope_index``: the processor hands
  ``mm_token_type_ids`` on); the last hidden states less the first :data:`TEMPLATE_START` (54) tokens; the negative
  prompt ("" by default) with the same image;
* the image resized to the output (Lanczos) and encoded by FLUX's ``AutoencoderKL`` encoder (float32): a sample of
  the posterior times ``scaling_factor`` (no shift, as diffusers' pipeline) is the ``visual_cond`` condition beside the
  noise at every step, the mask channel all ones;
* the rest (CLIP, CFG 3.5, 50 steps, the scheduler, the decode) as the text-to-image pipeline, over every mesh.

Differences, on purpose: one image for every prompt (diffusers' processor takes one image per prompt); ``latents``
are the noise (B, 1, h, w, C) (diffusers returns given latents unchanged, the condition the caller's); the image
latents' sample uses the call's ``seed`` (torch's generator draws other numbers); a prompt longer than
``max_sequence_length`` is refused (diffusers cuts its text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.models import qwen2_5_vl as qv
from xdit_jax.models import qwen2_5_vl_vision as vv
from xdit_jax.pipelines.denoise import preprocess_image, tokenize
from xdit_jax.pipelines.image import VaeEncoding
from xdit_jax.pipelines.kandinsky5 import CLIP_TOKENS, prompt_clean
from xdit_jax.pipelines.kandinsky5_t2i import Kandinsky5ImagePipelineOutput, Kandinsky5T2IPipeline
from xdit_jax.pipelines.qwenimage_edit import QwenVision, _pil

PROMPT_TEMPLATE = ("<|im_start|>system\nYou are a prompt engineer. Based on the provided source image (first image) "
                   "and target image (second image), create an interesting text prompt that can be used together with "
                   "the source image to create the target image:<|im_end|><|im_start|>user{}<|vision_start|>"
                   "<|image_pad|><|vision_end|><|im_end|>")
TEMPLATE_START = 54


class Kandinsky5I2IPipeline(QwenVision, VaeEncoding, Kandinsky5T2IPipeline):
    """Image-to-image with Kandinsky 5.0 — see the module docstring."""

    PIPELINE_CLASSES = ("Kandinsky5I2IPipeline",)
    PROMPT_TEMPLATE, TEMPLATE_START = PROMPT_TEMPLATE, TEMPLATE_START
    PROCESSOR_FOLDER = "tokenizer"  # (the image processor's settings saved with the tokenizer)
    PROCESSOR_REQUIRED = "Kandinsky 5.0 I2I"

    def __init__(self, **kw):
        super().__init__(**kw)
        if not self.transformer_config.visual_cond:
            raise ValueError("This transformer has no visual_cond input: not a Kandinsky 5.0 image-to-image model.")
        self._vl_image = self._cond_latents = None

    # ------------------------------------------------------------------ text with the image

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 1024):
        """((B, L, d) Qwen states, (B, d_clip) pooled CLIP) of the prompts with the call's image (diffusers'
        ``encode_prompt``): every row L tokens, the batch's longest less :data:`TEMPLATE_START`."""
        if self._vl_image is None or self.vision is None:
            raise ValueError("Kandinsky 5.0 I2I encodes prompts with its image: call the pipeline with one (and load "
                             "it with from_pretrained: the vision tower).")
        prompts = [prompt_clean(p) for p in prompts]
        encode_vision, encode = self._vision_fns()
        pix, grid = vv.preprocess(self._vl_image, self.processor_config)
        merge = self.vision.cfg.spatial_merge_size
        count = int(np.prod(grid)) // merge ** 2
        features = encode_vision(pix, vv.vision_layout([grid], self.vision.cfg))
        ids, mask = qv.tokenize_edit(self.tokenizer, [self.PROMPT_TEMPLATE.format(p) for p in prompts], [count])
        n = int(mask.sum(1).max())
        if n > self.TEMPLATE_START + max_sequence_length:
            raise ValueError(f"The templated prompt and image make {n} tokens, more than {self.TEMPLATE_START} + "
                             f"max_sequence_length ({max_sequence_length}); shorten the prompt.")
        if n <= self.TEMPLATE_START:
            raise ValueError(f"The templated prompts have {n} tokens, not more than the template's "
                             f"{self.TEMPLATE_START} that are cut: this tokenizer is not Kandinsky 5.0's.")
        image_token_id = self.tokenizer.convert_tokens_to_ids(qv.IMAGE_PAD)
        feat_idx = qv.image_feature_index(ids, image_token_id, count)
        pos = qv.rope_index(ids, mask, image_token_id, [grid] * len(prompts), merge)
        cos, sin = qv.mrope_cos_sin(pos, self.text_encoder.cfg, self.mrope_section)
        emb = encode(ids, mask, features, feat_idx, cos, sin)[:, self.TEMPLATE_START:n]
        clip_ids, _ = tokenize(self.tokenizer_2, prompts, CLIP_TOKENS)
        pooled = self._clip_pooled_fn()(clip_ids)
        return emb.astype(self.dtype), pooled.astype(self.dtype)

    # ------------------------------------------------------------------ the image's latents

    @staticmethod
    def _image_noise(shape, rng):
        """The standard normal draw (channels last) of the image latents' sample (diffusers'
        ``latent_dist.sample(generator)``)."""
        return jax.random.normal(rng, shape, jnp.float32)

    def image_condition(self, pixels, rng) -> jax.Array:
        """Pixels (1, 3, H, W) in [-1, 1] -> the posterior's sample times ``scaling_factor`` (1, 1, h, w, C)."""
        mean, std = self._moments(pixels)
        mean, std = (jnp.moveaxis(a, 1, -1)[:, None] for a in (mean, std))
        return (mean + std * self._image_noise(mean.shape, rng)) * self.vae_config.scaling_factor

    def _visual_cond(self, x, texts) -> tuple:
        """The image's latents (``texts[3]``, a row per sample) and a mask of ones (diffusers' ``prepare_latents``)."""
        return texts[3].astype(x.dtype), jnp.ones(x.shape[:-1] + (1,), x.dtype)

    def _step_extras(self, batch: int, do_cfg: bool, per: int) -> tuple:
        z = jnp.broadcast_to(self._cond_latents, (batch,) + self._cond_latents.shape[1:])
        return (self._put_batch(jnp.concatenate([z, z]) if do_cfg else z, do_cfg, per),)

    # ------------------------------------------------------------------ call

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, guidance_scale: float = 3.5, text_len: int = 512):
        ds = self.default_size()
        h, w = (height or ds["height"]), (width or ds["width"])
        shape = self.latent_shape(1, h, w)
        self._cond_latents = jnp.zeros(shape, jnp.float32)
        try:
            return super().compile_step(batch, height=h, width=w, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, text_len=text_len)
        finally:
            self._cond_latents = None

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds_qwen=None, prompt_embeds_clip=None,
                 negative_prompt_embeds_qwen=None, negative_prompt_embeds_clip=None, max_sequence_length: int = 1024,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> Kandinsky5ImagePipelineOutput:
        """diffusers' arguments (``image``: a PIL image or an (H, W, 3) array; ``generator`` -> ``seed``;
        ``output_type`` "np" or "latent": (B, 1, h, w, C))."""
        if image is None:
            raise ValueError("image must be given: Kandinsky 5.0 image-to-image edits it.")
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError(f"{len(image)} images: Kandinsky 5.0 image-to-image takes one (for every prompt).")
            image = image[0]
        image = _pil(image)
        if height is None and width is None:
            width, height = image.size
        elif height is None or width is None:
            raise ValueError("Give height and width together (or neither: the image's size).")
        if (width, height) not in self.resolutions:
            w, h = self.resolutions[int(np.argmin([abs(a / b - width / height) for a, b in self.resolutions]))]
            width, height = w, h  # (the text-to-image call warns about sizes not in the list; this one is silent)
        self.check_inputs(height, width, 1, 1, guidance_scale)
        self._vl_image = image.resize((image.size[0] // 2, image.size[1] // 2))
        self._cond_latents = self.image_condition(preprocess_image(image, height, width),
                                                  jax.random.fold_in(jax.random.key(seed), 1))
        try:
            return super().__call__(prompt, negative_prompt, height=height, width=width,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    num_images_per_prompt=num_images_per_prompt, latents=latents,
                                    prompt_embeds_qwen=prompt_embeds_qwen, prompt_embeds_clip=prompt_embeds_clip,
                                    negative_prompt_embeds_qwen=negative_prompt_embeds_qwen,
                                    negative_prompt_embeds_clip=negative_prompt_embeds_clip,
                                    max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                                    progress=progress)
        finally:
            self._vl_image = self._cond_latents = None
