"""Qwen-Image-Edit, diffusers' ``QwenImageEditPipeline`` (Qwen-Image-Edit: one image) and
``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / 2511: one or more images) on a JAX mesh.

    pipe = QwenImageEditPipeline.from_pretrained("Qwen/Qwen-Image-Edit", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe(Image.open("cat.png"), "Make the cat wear a red hat", negative_prompt=" ", true_cfg_scale=4.0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: the image's aspect ratio at ``vae_image_area`` (1024^2) pixels, each side rounded to 32, gives the
output size (unless ``height`` / ``width`` are given; floored to 16) and the size the image is resized to (Lanczos)
for the VAE. Edit: that resized image is also what Qwen2.5-VL sees; Plus: each image is resized to its aspect ratio
at ``condition_image_area`` (384^2) for Qwen2.5-VL and at 1024^2 for the VAE, and the output size follows the last
image. Qwen2.5-VL reads the images through its vision tower (:mod:`xdit_jax.models.qwen2_5_vl_vision`, the image
processor's resize to multiples of 28 within its pixel bounds) inside the edit template
(:func:`xdit_jax.models.qwen2_5_vl.qwen_edit_prompt_embeds`, the first 64 tokens cropped; the negative prompt with
the same images). Each image is VAE-encoded (the Wan 2.1 encoder, ``latent_dist.mode()``, normalized by the latents'
mean / std) and packed in 2 x 2 patches; its tokens follow the noisy latents' in the transformer's sequence at every
step, with RoPE positions of their own (image ``i``: frame index ``i``); the prediction keeps the noisy tokens. With
``zero_cond_t`` (2511) the condition tokens are modulated by timestep 0. Everything else is
:class:`~xdit_jax.pipelines.qwenimage.QwenImagePipeline`'s: true CFG over ``cfg``, the joint sequence (noisy and
condition tokens, padded to the degree) over ``ring`` x ``ulysses``, PipeFusion over the blocks (the condition tokens
are patched with the noisy ones and recomputed every step, as FLUX Kontext's), the VAE decode over the mesh.

Differences from diffusers, on purpose:

* Qwen2.5-VL's positions: by default the image tokens get the 3-D multimodal RoPE positions (``get_rope_index``),
  what the model is trained with and what transformers computes when it is given ``mm_token_type_ids``. diffusers
  0.42.1 calls transformers 5.23 without them, so there every token gets the 1-D position ``0 .. L-1``;
  ``mrope=False`` (``from_pretrained(..., mrope=False)`` or the attribute) reproduces that.
* Several prompts take the same image(s) each (diffusers' processor refuses a batch of prompts for one image; its
  Plus pipeline refuses batches).
* An image array (H, W, 3) (uint8, or floats in [0, 1]) is taken as that picture (diffusers reads arrays as
  tensors of another layout); ``vae_image_area`` / ``condition_image_area`` are arguments (diffusers' constants).
* The text states are not cut at ``max_sequence_length`` (diffusers' edit pipelines do not cut either).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xdit_jax.conversion import read_json
from xdit_jax.models import qwen2_5_vl as qv
from xdit_jax.models import qwen2_5_vl_vision as vv
from xdit_jax.models import vae_qwenimage as qvae
from xdit_jax.pipelines.denoise import load_extra_params, preprocess_image, rgb_image
from xdit_jax.pipelines.flux import pack_latents
from xdit_jax.pipelines.image import WanVaeEncoding
from xdit_jax.pipelines.qwenimage import QwenImagePipeline, QwenImagePipelineOutput

log = logging.getLogger("xdit_jax")

VAE_IMAGE_AREA = 1024 * 1024  # diffusers' calculate_dimensions(1024 * 1024, ...) / VAE_IMAGE_SIZE
CONDITION_IMAGE_AREA = 384 * 384  # diffusers' CONDITION_IMAGE_SIZE (Plus)


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """diffusers' ``calculate_dimensions``: (width, height) of aspect ratio ``ratio`` (width / height) at about
    ``target_area`` pixels, each rounded to a multiple of 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def _pil(image):
    """A PIL RGB image of a PIL image or an (H, W, 3) array (uint8, or floats in [0, 1])."""
    from PIL import Image

    image = rgb_image(image)
    if isinstance(image, np.ndarray):
        a = image if image.dtype == np.uint8 else np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(a)
    return image


def _resize(image, width: int, height: int):
    """diffusers' ``VaeImageProcessor.resize`` of a PIL image (Lanczos)."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def load_vision(folder, dtype, sharding) -> vv.Qwen25VisionTransformer:
    """Qwen2.5-VL's vision tower of a converted folder (``text_encoder/vision_params``, written by conversion); random
    under ``from_config``."""
    cfg = vv.VisionConfig.from_dict(read_json(Path(folder) / "text_encoder" / "config.json"))
    params = load_extra_params(folder, "text_encoder/vision_params", "Qwen2.5-VL's vision tower (an older xdit_jax, "
                               "or a text encoder without visual.* tensors)",
                               lambda: vv.Qwen25VisionTransformer(cfg, dtype=dtype), "vision", dtype, sharding)
    return vv.build(cfg, params, dtype)


def load_processor_config(folder, subfolder: str = "processor", required: str | None = None) -> vv.ProcessorConfig:
    """The Qwen2-VL image processor's settings: ``subfolder/preprocessor_config.json`` (the released checkpoints) or
    ``subfolder/processor_config.json`` (transformers 5's save, its ``image_processor`` entry where nested);
    transformers' defaults where neither exists, or with ``required`` (who needs them) a clear error."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / subfolder / name
        if path.exists():
            d = read_json(path)
            return vv.ProcessorConfig.from_dict(d.get("image_processor", d))
    if required:
        raise ValueError(f"{folder}/{subfolder} has no preprocessor_config.json / processor_config.json: {required} "
                         "reads the image with Qwen2VLProcessor's settings saved there.")
    log.warning("%s has no %s/ settings: Qwen2VLImageProcessor's defaults (max_pixels 1003520).", folder, subfolder)
    return vv.ProcessorConfig()


class QwenVision:
    """A mixin for the pipelines that read an image with Qwen2.5-VL's vision tower (Qwen-Image-Edit, Kandinsky 5.0
    I2I, LongCat-Image-Edit): the tower (``text_encoder/vision_params``), the image processor's settings
    (``PROCESSOR_FOLDER``; ``PROCESSOR_REQUIRED``: who refuses to run on transformers' defaults), the multimodal RoPE
    sections and ``mrope`` (the image tokens' 3-D positions), and the jitted (vision, text) encoders."""

    PROCESSOR_FOLDER = "processor"
    PROCESSOR_REQUIRED: str | None = None

    def __init__(self, *, vision=None, processor_config=None, mrope_section=(16, 24, 24), mrope: bool = True, **kw):
        super().__init__(**kw)
        self.vision = vision
        self.processor_config = processor_config if processor_config is not None else vv.ProcessorConfig()
        self.mrope_section, self.mrope = tuple(mrope_section), bool(mrope)

    @classmethod
    def from_pretrained(cls, model, *, mrope: bool = True, **kw):
        """The base pipeline's ``from_pretrained``; ``mrope``: the image tokens' 3-D positions in Qwen2.5-VL (the
        class docstring)."""
        pipe = super().from_pretrained(model, **kw)
        pipe.mrope = bool(mrope)
        return pipe

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """The base's parts (a VAE's encoder), Qwen2.5-VL's vision tower, the image processor's settings."""
        return {**super()._extra_parts(folder, mesh, dtype, kind),
                "vision": load_vision(folder, dtype, NamedSharding(mesh, P())),
                "processor_config": load_processor_config(folder, cls.PROCESSOR_FOLDER, cls.PROCESSOR_REQUIRED),
                "mrope_section": qv.mrope_section(read_json(Path(folder) / "text_encoder" / "config.json"))}

    def _vision_fns(self):
        """(encode_vision(pixels, layout), encode(ids, mask, features, feat_idx, cos, sin)) jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "vision" not in fns:
            vg, vs = nnx.split(self.vision)
            lg, ls = nnx.split(self.text_encoder)
            vfn = jax.jit(lambda st, x, lay: nnx.merge(vg, st)(x, lay))
            lfn = jax.jit(lambda st, i, m, f, fi, c, s: qv.encode_with_images(nnx.merge(lg, st), i, m, f, fi, (c, s)))
            put = self._put_replicated
            fns["vision"] = (
                lambda x, lay: vfn(vs, put(jnp.asarray(x, self.dtype)), jax.tree.map(lambda a: put(jnp.asarray(a)),
                                                                                      lay)),
                lambda i, m, f, fi, c, s: lfn(ls, *(put(jnp.asarray(a)) for a in (i, m, f, fi, c, s))))
        return fns["vision"]


class QwenImageEditPipeline(QwenVision, WanVaeEncoding, QwenImagePipeline):
    """Image editing with Qwen-Image-Edit — see the module docstring."""

    PIPELINE_CLASSES = ("QwenImageEditPipeline",)
    VAE_ENCODER_CONFIG = qvae.QwenImageVAEConfig
    PLUS = False

    # ------------------------------------------------------------------ stages

    def encode_prompt_with_images(self, prompts: list[str], images: list):
        """((B, L, d) states in the compute dtype, (B, L) int32 mask) of the prompts with the (already resized)
        images, as diffusers' ``encode_prompt`` (``num_images_per_prompt=1``)."""
        if self.vision is None:
            raise ValueError("This pipeline has no vision tower; load it with from_pretrained.")
        encode_vision, encode = self._vision_fns()
        emb, mask = qv.qwen_edit_prompt_embeds(self.tokenizer, self.text_encoder, self.vision, prompts, images,
                                               self.processor_config, plus=self.PLUS, section=self.mrope_section,
                                               mrope=self.mrope, encode=encode, encode_vision=encode_vision)
        return jnp.asarray(emb, self.dtype), jnp.asarray(mask, jnp.int32)

    def encode_image(self, pixels) -> jax.Array:
        """diffusers' ``_encode_vae_image`` (``latent_dist.mode()``) + ``_pack_latents``: (N, 3, H, W) in [-1, 1] ->
        packed normalized latents (N, (H/16)(W/16), 4 z_dim), the image plane split over the mesh
        (:class:`xdit_jax.pipelines.image.WanVaeEncoding`)."""
        return pack_latents(self.image_latents(pixels))

    def _sizes(self, images, vae_image_area: int, condition_image_area: int):
        """(output size (height, width) before the caller's, [(VL image, VAE pixels (1, 3, H, W))] per image)."""
        if self.PLUS:
            out = []
            for im in images:
                w, h = im.size
                cw, ch = calculate_dimensions(condition_image_area, w / h)
                vw, vh = calculate_dimensions(vae_image_area, w / h)
                out.append((_resize(im, cw, ch), preprocess_image(im, vh, vw)))
            w, h = images[-1].size
        else:
            w, h = images[0].size
            cw, ch = calculate_dimensions(vae_image_area, w / h)
            small = _resize(images[0], cw, ch)
            out = [(small, preprocess_image(small, ch, cw))]
        cw, ch = calculate_dimensions(vae_image_area, w / h)
        return (ch, cw), out

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_images: int = 1, **kw):
        """:meth:`QwenImagePipeline.compile_step` with ``num_images`` condition images of the output's size (the
        default: 1024 x 1024) appended."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        h, w = self.latent_grid(height, width)
        return super().compile_step(batch, height=height, width=width,
                                    condition_shapes=[(1, h // 2, w // 2)] * int(num_images), **kw)

    # ------------------------------------------------------------------ call

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, true_cfg_scale: float = 4.0,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50, sigmas=None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, max_sequence_length: int = 512,
                 vae_image_area: int = VAE_IMAGE_AREA, condition_image_area: int = CONDITION_IMAGE_AREA,
                 seed: int = 0, output_type: str = "np", progress: bool = True, _init=None,
                 _reference=None) -> QwenImagePipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent"). ``image``: a PIL image
        or an (H, W, 3) array; Plus: one or a list of them. ``_init``: inpainting's start
        (:class:`QwenImageEditInpaintPipeline`), ``_reference(pixels) -> (1, tokens, 4C)``: the condition images'
        packed latents (default: each image's posterior mode)."""
        if image is None:
            raise ValueError(f"{type(self).__name__} edits an image: pass image= (a PIL image or an (H, W, 3) "
                             "array); for text-to-image load the Qwen-Image checkpoint with QwenImagePipeline.")
        images = [_pil(im) for im in (image if isinstance(image, (list, tuple)) else [image])]
        if not images:
            raise ValueError("image: an empty list; give an image.")
        if not self.PLUS and len(images) != 1:
            raise ValueError(f"Qwen-Image-Edit takes one image, got {len(images)} (several images: "
                             "Qwen-Image-Edit-2509 / 2511, QwenImageEditPlusPipeline).")
        if min(vae_image_area, condition_image_area) < 32 * 32:
            raise ValueError(f"vae_image_area / condition_image_area must be at least 32 x 32 pixels, got "
                             f"{vae_image_area} / {condition_image_area}.")
        for im in images:
            if max(im.size) / min(im.size) > 200:
                raise ValueError(f"image of {im.size[0]} x {im.size[1]}: Qwen2.5-VL takes aspect ratios below 200.")
        (ch, cw), parts = self._sizes(images, vae_image_area, condition_image_area)
        multiple = 2 * self.vae_config.spatial_compression_ratio
        height = (height or ch) // multiple * multiple
        width = (width or cw) // multiple * multiple
        vl_images = [p[0] for p in parts]
        pixels = [p[1] for p in parts]
        s = multiple

        def condition(batch, per, do_cfg, timer):
            with timer.stage("image_encoding"):
                packed = (_reference(pixels) if _reference is not None else  # (1, tokens, 4C)
                          jnp.concatenate([self.encode_image(px) for px in pixels], axis=1))
                rows = jnp.repeat(packed, batch * per, axis=0)
                placed = self._put_batch(jnp.concatenate([rows, rows]) if do_cfg else rows, do_cfg)
                jax.block_until_ready(placed)
            return placed, [(1, px.shape[2] // s, px.shape[3] // s) for px in pixels]

        return self._generate(prompt, negative_prompt, true_cfg_scale=true_cfg_scale, height=height, width=width,
                              num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                              num_images_per_prompt=num_images_per_prompt, latents=latents,
                              prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                              negative_prompt_embeds=negative_prompt_embeds,
                              negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                              max_sequence_length=max_sequence_length, seed=seed, output_type=output_type,
                              progress=progress, encode=lambda p: self.encode_prompt_with_images(p, vl_images),
                              condition=condition, text_cut=1 << 30, init=_init)


class QwenImageEditInpaintPipeline(QwenImageEditPipeline):
    """Inpainting with Qwen-Image-Edit (diffusers' ``QwenImageEditInpaintPipeline``) on a Qwen-Image-Edit folder: the
    edit (the prompt read with the image by Qwen2.5-VL, the image's latents after the noisy ones) with inpainting's
    start and kept region (white repaints, black keeps), at the edit's output size (the image's aspect ratio at
    ``vae_image_area``; ``height`` / ``width`` are not taken, as diffusers'). As diffusers, the image's latents are a
    sample of the posterior (the first draw, then the noise; its third, the masked image's sample, feeds nothing of
    the step), serving as both the condition tokens and the kept region.

    Known differences: the draws are JAX draws from ``seed``; ``masked_image_latents`` and ``padding_mask_crop`` are
    refused (diffusers crops the image it resized with coordinates from the mask at its own size); given ``latents``
    serve as both the initial latents and the kept region's noise (diffusers 0.42.1 returns them alone from
    ``prepare_latents``, where three values are unpacked, and fails)."""

    PIPELINE_CLASSES = ("QwenImageEditInpaintPipeline", "QwenImageEditPipeline")

    def __call__(self, image=None, prompt: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, *, mask_image=None, masked_image_latents=None,
                 true_cfg_scale: float = 4.0, height: int | None = None, width: int | None = None,
                 padding_mask_crop: int | None = None, strength: float = 0.6, num_inference_steps: int = 50,
                 sigmas=None, guidance_scale: float | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, max_sequence_length: int = 512,
                 vae_image_area: int = VAE_IMAGE_AREA, condition_image_area: int = CONDITION_IMAGE_AREA,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> QwenImagePipelineOutput:
        """diffusers' QwenImageEditInpaintPipeline call and defaults (``generator`` -> ``seed``; strength 0.6).
        ``image``: a PIL image or an (H, W, 3) array; ``mask_image``: a PIL image, or an (H, W) array at the output
        size."""
        if masked_image_latents is not None or padding_mask_crop is not None:
            raise NotImplementedError("masked_image_latents and padding_mask_crop are not supported by Qwen-Image-Edit "
                                      "inpainting here: give the image and its mask.")
        if image is None or isinstance(image, (list, tuple)):
            raise ValueError("QwenImageEditInpaintPipeline needs image= (one PIL image or (H, W, 3) array) and "
                             "mask_image=.")
        (h, w), _ = self._sizes([_pil(image)], vae_image_area, condition_image_area)
        multiple = 2 * self.vae_config.spatial_compression_ratio
        h, w = h // multiple * multiple, w // multiple * multiple
        n = len(sigmas) if sigmas is not None else num_inference_steps
        _, _, init, _ = self.inpaint_init(image, mask_image, h, w, n, strength,
                                          self.vae_config.spatial_compression_ratio, pack_latents)
        clean = {}

        def start(sched, given, batch, per, rng, timer):  # (the image's sampled latents: the condition's too)
            sched, latents, kept = init(sched, given, batch, per, rng, timer)
            clean["packed"] = kept.image[:1]
            return sched, latents, kept

        return super().__call__(image, prompt, negative_prompt, true_cfg_scale=true_cfg_scale, height=h, width=w,
                                num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                                num_images_per_prompt=num_images_per_prompt, latents=latents,
                                prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                                negative_prompt_embeds=negative_prompt_embeds,
                                negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                                max_sequence_length=max_sequence_length, vae_image_area=vae_image_area,
                                condition_image_area=condition_image_area, seed=seed, output_type=output_type,
                                progress=progress, _init=start, _reference=lambda pixels: clean["packed"])


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 / 2511 (diffusers' ``QwenImageEditPlusPipeline``): one or more images, each as
    "Picture i:" in the prompt (resized to ``condition_image_area``) and as condition latents (``vae_image_area``);
    2511's ``zero_cond_t`` transformer. See the module docstring."""

    PIPELINE_CLASSES = ("QwenImageEditPlusPipeline",)
    PLUS = True
