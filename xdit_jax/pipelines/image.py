"""What the text-to-image families (PixArt, HunyuanDiT) share on top of :class:`PipelineBase`: an
SD/SDXL ``AutoencoderKL`` whose decode is split over the mesh, the output, sizes and latent shapes."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.models import vae_kl
from xdit_jax.pipelines.denoise import PipelineBase
from xdit_jax.pipelines.mask_crop import MaskCrop
from xdit_jax.schedulers import flow_match


@dataclasses.dataclass
class ImagePipelineOutput:
    """``images``: (B, H, W, 3) in [0, 1] for output_type="np"; the final latents (B, C, h, w),
    diffusers' layout, for output_type="latent". ``timings``: seconds per stage."""

    images: np.ndarray
    timings: dict
    peak_memory_bytes: int | None = None


def read_configs(folder: str | os.PathLike, transformer_config_cls, vae_config_cls=None):
    """(transformer config, VAE config) of a diffusers or converted folder, from its config.json files (the VAE's
    config class: ``vae_config_cls``, by default the SD/SDXL ``AutoencoderKL``'s)."""
    from pathlib import Path

    from xdit_jax.conversion import read_json

    folder = Path(folder)
    vae_config_cls = vae_config_cls or vae_kl.AutoencoderKLConfig
    return (transformer_config_cls.from_dict(read_json(folder / "transformer" / "config.json")),
            vae_config_cls.from_dict(read_json(folder / "vae" / "config.json")))


def vae_scale_factor(vc) -> int:
    return 2 ** (len(vc.block_out_channels) - 1)


def default_size(tc, vc) -> dict:
    """diffusers' default: the transformer's sample size times the VAE's factor (1024 x 1024 for the
    1024 px checkpoints)."""
    s = tc.sample_size * vae_scale_factor(vc)
    return {"height": s, "width": s}


def resize_and_crop(images, height: int, width: int):
    """diffusers' ``resize_and_crop_tensor`` on (B, C, H, W): bilinear resize (half-pixel centres, no
    antialiasing, like torch's ``interpolate(align_corners=False)``) so the image covers
    ``height x width``, then a center crop."""
    b, c, h, w = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    images = jax.image.resize(images, (b, c, rh, rw), method="linear", antialias=False)
    y, x = (rh - height) // 2, (rw - width) // 2
    return images[:, :, y:y + height, x:x + width]


class ImagePipelineBase(PipelineBase):
    """Sizes, latent shapes and the VAE decode of a text-to-image pipeline."""

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        s = vae_scale_factor(self.vae_config)
        return (batch, self.transformer_config.in_channels, height // s, width // s)

    def _binned_text_request(self, prompt, prompt_embeds, prompt_attention_mask, height, width, binning: bool,
                             num_images_per_prompt, guidance_scale, output_type, binned_size, check_request,
                             what: str):
        """The start of a resolution-binned cross-attention family's call (PixArt, SANA): the size asked for
        (default: the model's), the size it runs at (``binned_size`` of it with ``binning``), the prompts and their
        count, the samples per prompt; checked with the family's ``check_request``. ``what``: the family's name
        in the errors. Returns (requested (h, w), (h, w), prompts, batch, per)."""
        from xdit_jax.pipelines.denoise import per_prompt, prompt_batch

        ds = self.default_size()
        height, width = height or ds["height"], width or ds["width"]
        requested = (height, width)
        if binning:
            height, width = binned_size(height, width, self.transformer_config.sample_size)
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError(f"prompt_embeds need their prompt_attention_mask ({what}'s cross attention uses it).")
        per = per_prompt(num_images_per_prompt, "num_images_per_prompt")
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)
        return requested, (height, width), prompts, batch, per

    def _masked_text_batch(self, embeds, mask, do_cfg: bool, per: int, negative, negative_mask, encode_negative,
                           what: str):
        """The step's text of a cross-attention family (PixArt, SANA): ``embeds`` (B, L, caption_channels) ``what``
        states and their (B, L) ``mask``, checked; with CFG ``[negative; prompt]`` (``encode_negative(L)`` makes the
        negative's (states, mask) where not given), as diffusers concatenates them; placed as the transformer's batch
        (:meth:`PipelineBase._put_batch`, ``per`` samples a prompt). Returns (embeds, mask)."""
        import jax.numpy as jnp

        embeds, mask = jnp.asarray(embeds, self.dtype), jnp.asarray(mask, jnp.int32)
        channels = self.transformer_config.caption_channels
        if embeds.ndim != 3 or embeds.shape[-1] != channels or mask.shape != embeds.shape[:2]:
            raise ValueError(f"prompt_embeds {tuple(embeds.shape)} with mask {tuple(mask.shape)}: this model takes "
                             f"(batch, tokens, {channels}) {what} states and a (batch, tokens) mask.")
        if do_cfg:
            if negative is None:
                negative, negative_mask = encode_negative(embeds.shape[1])
            elif negative_mask is None:
                raise ValueError("negative_prompt_embeds need their negative_prompt_attention_mask.")
            neg = jnp.asarray(negative, self.dtype)
            if neg.shape != embeds.shape:
                raise ValueError(f"negative_prompt_embeds {neg.shape} and prompt_embeds {embeds.shape} must have the "
                                 "same shape (diffusers concatenates them).")
            embeds = jnp.concatenate([neg, embeds])
            mask = jnp.concatenate([jnp.asarray(negative_mask, jnp.int32), mask])
        embeds, mask = self._put_batch(embeds, do_cfg, per), self._put_batch(mask, do_cfg, per)
        jax.block_until_ready(embeds)
        return embeds, mask

    def _image_tokens(self, height: int, width: int) -> int:
        """The transformer's image tokens (patches) for an image of ``height`` x ``width`` pixels."""
        p, s = self.transformer_config.patch_size, vae_scale_factor(self.vae_config)
        return (height // s // p) * (width // s // p)

    def _decode_fn(self, size: tuple[int, int] | None = None):
        """Jitted VAE decode over the whole mesh (spatially split, xdit_jax.parallel.vae) -> (B, H, W, 3)
        in [0, 1]; ``size``: resized and cropped to this (height, width) (PixArt's resolution binning)."""
        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, **kw):
            return vae_kl.decode(vae, (latents / scaling).astype(dtype), **kw)

        post = None if size is None else (lambda image: resize_and_crop(image, *size))
        return self._jit_decode(("fn", size), decode, post)


def forward_call(call, pipe, args: dict, **hooks):
    """``call(pipe, ...)``: a base pipeline's call (unbound, e.g. ``FluxPipeline._generate``) given, for each of its
    parameters, the value of that name in ``args`` (a subclass call's ``locals()``: its arguments, as it adjusted
    them) and the ``hooks`` (the subclass's start: image-to-image's, inpainting's, a condition); the subclasses'
    one way to forward their calls."""
    import inspect

    names = [n for n in inspect.signature(call).parameters if n != "self" and n not in hooks]
    return call(pipe, **{n: args[n] for n in names if n in args}, **hooks)


class VaeEncoding:
    """A mixin for the pipelines that encode an image with an SD/SDXL/FLUX ``AutoencoderKL`` (FLUX.1 Kontext's
    reference, the image-to-image pipelines' start): the VAE's encoder (``vae/encoder_params``, written by
    conversion) in float32, as diffusers' recipes upcast the VAE for encoding (force_upcast); the image plane split
    over the mesh. Put it before the pipeline class: ``class FluxImg2ImgPipeline(VaeEncoding, FluxPipeline)``."""

    IMAGE_LATENTS_MODE = False  # image-to-image / inpainting latents: the posterior's mode (no draw), not a sample

    def __init__(self, *, vae_encoder=None, **kw):
        super().__init__(**kw)
        self.vae_encoder = vae_encoder

    @classmethod
    def _extra_parts(cls, folder, mesh_obj, dtype, kind: str) -> dict:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_kl_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        vc = vae_kl.AutoencoderKLConfig.from_dict(read_json(folder / "vae" / "config.json"))
        return {**super()._extra_parts(folder, mesh_obj, dtype, kind),
                "vae_encoder": load_vae_encoder(folder, vc, jnp.float32, NamedSharding(mesh_obj, P()),
                                                vae_kl_encoder)}

    def _moments(self, images):
        """The encoder's (mean, std) of images (N, 3, H, W) in [-1, 1]: (N, C, H/f, W/f) each, unscaled."""
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_kl_encoder
        from xdit_jax.parallel.vae import sharded_encode

        if self.vae_encoder is None:
            raise ValueError(f"This pipeline has no VAE encoder; load it with {type(self).__name__}.from_pretrained.")
        fns = self.__dict__.setdefault("_text_fns", {})
        if "vae_encode" not in fns:
            graphdef, state = nnx.split(self.vae_encoder)
            mesh = self.mesh if self.mesh.size > 1 else None

            def encode(state, x):
                mean, logvar = sharded_encode(vae_kl_encoder.encode, nnx.merge(graphdef, state), x, mesh)
                return mean, jnp.exp(0.5 * logvar)

            jitted = jax.jit(encode, out_shardings=NamedSharding(self.mesh, P()))
            fns["vae_encode"] = lambda x: jitted(state, x)
        return fns["vae_encode"](jnp.asarray(images, jnp.float32))

    def image_latents(self, images, key=None) -> jax.Array:
        """Images (N, 3, H, W) in [-1, 1] -> diffusion latents (N, C, H/f, W/f), ``(z - shift_factor) *
        scaling_factor``: ``z`` the posterior's mode, or with ``key`` a sample of it (``mean + std * eps``, diffusers'
        ``retrieve_latents`` default, the image-to-image pipelines')."""
        mean, std = self._moments(images)
        z = mean if key is None else mean + std * self._normal(key, mean.shape)
        return self._scale_latents(z)

    def _scale_latents(self, z) -> jax.Array:
        """The encoder's latents -> the diffusion model's: ``(z - shift_factor) * scaling_factor``."""
        from xdit_jax.models import vae_kl_encoder

        return vae_kl_encoder.scale_latents(self.vae_config, z)

    def _normal(self, key, shape) -> jax.Array:
        """Standard normal draws (float32): the posterior's sample and image-to-image's noise."""
        return jax.random.normal(key, shape, jnp.float32)

    # ------------------------------------------------------------------ image-to-image

    @staticmethod
    def strength_start(image, num_inference_steps: int, strength: float) -> int:
        """Image-to-image's checks (an image given, steps left) and its first step (diffusers' ``get_timesteps``)."""
        if image is None or (isinstance(image, (list, tuple)) and not image):
            raise ValueError("An image-to-image pipeline needs image=, the picture to start from (the text-to-image "
                             "pipeline generates from the text alone).")
        start = flow_match.strength_start(num_inference_steps, strength)
        if start >= num_inference_steps:
            raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no "
                             "denoising step; raise either.")
        return start

    def noised_image_latents(self, image, height: int, width: int, sched, batch: int, per: int, rng,
                             timer) -> tuple[jax.Array, jax.Array, jax.Array]:
        """diffusers' img2img / inpaint ``prepare_latents``: :meth:`clean_image_latents` noised to the schedule's first
        sigma (:func:`xdit_jax.schedulers.flow_match.scale_noise`; the noise drawn after the posterior's sample, as
        diffusers) -> (noised, clean, noise) latents, (batch x per, C, h, w) each."""
        clean = self.clean_image_latents(image, height, width, batch, per, rng, timer)
        with timer.stage("image_encoding"):
            noise = self._normal(jax.random.fold_in(rng, 2), clean.shape)
            noised = flow_match.scale_noise(sched, clean, noise)
            jax.block_until_ready(noised)
        return noised, clean, noise

    def clean_image_latents(self, image, height: int, width: int, batch: int, per: int, rng, timer) -> jax.Array:
        """The image(s) (one, or one per prompt: a PIL image or an (H, W, 3) array each) resized to ``height`` x
        ``width`` and encoded (the posterior sampled) -> (batch x per, C, h, w) latents, each prompt's ``per`` samples
        from its image."""
        from xdit_jax.pipelines.denoise import preprocess_image

        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, batch):
            raise ValueError(f"{len(images)} images for {batch} prompts: give one image, or one per prompt.")
        with timer.stage("image_encoding"):
            pixels = jnp.concatenate([preprocess_image(im, height, width) for im in images])
            clean = self.image_latents(pixels, key=None if self.IMAGE_LATENTS_MODE else jax.random.fold_in(rng, 1))
            clean = jnp.repeat(clean, batch * per // len(images), axis=0)
            jax.block_until_ready(clean)
        return clean

    def img2img_init(self, image, height, width, num_inference_steps: int, strength: float, pack=None):
        """Image-to-image's checks and start hook, one for every image-to-image pipeline: (height, width, ``init``),
        the size defaulted as the text-to-image pipeline's and ``init(sched, given, batch, per, rng, timer)`` -> (the
        schedule from diffusers' strength step on, the initial latents: ``given`` as they are, else the image's
        latents noised to that step, in ``pack``'s layout)."""
        start = self.strength_start(image, num_inference_steps, strength)
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        pack = pack or (lambda x: x)

        def init(sched, given, batch, per, rng, timer):
            sched = flow_match.from_step(sched, start)
            if given is not None:
                return sched, given
            return sched, pack(self.noised_image_latents(image, height, width, sched, batch, per, rng, timer)[0])

        return height, width, init

    def inpaint_init(self, image, mask_image, height, width, num_inference_steps: int, strength: float, factor: int,
                     pack=None, padding_mask_crop: int | None = None):
        """Inpainting's checks and start hook, one for every inpainting pipeline: (height, width, ``init``,
        ``finish``), the size defaulted as the text-to-image pipeline's and ``init(sched, given, batch, per, rng,
        timer)`` -> (the schedule from diffusers' strength step on, initial latents, :meth:`kept_region`); the mask
        (white: repaint) taken at the latent size (``factor``: the VAE's), the latents in ``pack``'s layout.
        ``padding_mask_crop``: only the region around the mask (:class:`~xdit_jax.pipelines.mask_crop.MaskCrop`) is
        inpainted, and ``finish(output, output_type)`` pastes the decoded images back into the original."""
        if mask_image is None:
            raise ValueError(f"{type(self).__name__} needs mask_image= (white: repaint, black: keep).")
        start = self.strength_start(image, num_inference_steps, strength)
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        crop = MaskCrop.of(image, mask_image, height, width, padding_mask_crop)
        if crop is not None:
            image, mask_image = crop.image, crop.mask
        mask = preprocess_mask(mask_image, height, width)[:, :, ::factor, ::factor]  # (torch's nearest, exact factor)

        def init(sched, given, batch, per, rng, timer):  # (given latents: the kept region's noise too, as diffusers)
            sched = flow_match.from_step(sched, start)
            return (sched, *self.inpaint_start(image, mask, height, width, sched, batch, per, rng, timer, given, pack))

        return height, width, init, (crop.finish if crop is not None else lambda out, output_type: out)

    def inpaint_start(self, image, mask, height: int, width: int, sched, batch: int, per: int, rng, timer,
                      given=None, pack=None) -> tuple[jax.Array, flow_match.KeptRegion]:
        """Inpainting's start (diffusers' inpaint ``prepare_latents``): (initial latents, :meth:`kept_region`), the
        latents in the layout ``pack`` makes of (B, C, h, w) (e.g. FLUX's packing) and the (1, 1, h, w) ``mask``.
        Given ``latents`` serve, as diffusers', as both the initial latents and the kept region's noise: no noise is
        drawn then (the posterior's sample still is, first, as diffusers). They are (B, C, h, w), as diffusers' inpaint
        pipelines take them (packing them as their noise), or already in the ``pack`` layout."""
        pack = pack or (lambda x: x)
        if given is None:
            noised, clean, noise = self.noised_image_latents(image, height, width, sched, batch, per, rng, timer)
            return pack(noised), self.kept_region(clean, noise, mask, pack)
        clean = self.clean_image_latents(image, height, width, batch, per, rng, timer)
        given = jnp.asarray(given, jnp.float32)
        packed = tuple(pack(clean).shape)
        if tuple(given.shape) not in (tuple(clean.shape), packed):
            raise ValueError(f"latents {tuple(given.shape)}: this request's initial latents are {tuple(clean.shape)}"
                             + (f" (packed: {packed})." if packed != tuple(clean.shape) else "."))
        if given.shape == clean.shape:
            given = pack(given)
        return given, self.kept_region(clean, given, mask, pack, packed=True)

    def kept_region(self, clean, noise, mask, layout=None, packed: bool = False) -> flow_match.KeptRegion:
        """Inpainting's :class:`~xdit_jax.schedulers.flow_match.KeptRegion` of (B, C, h, w) clean latents, their noise
        and a (1, 1, h, w) mask, each put in the latents' ``layout`` (e.g. FLUX's packing) and placement (``packed``:
        the noise is in that layout already)."""
        layout = layout or (lambda x: x)
        parts = [layout(jnp.broadcast_to(jnp.asarray(a, jnp.float32), clean.shape)) for a in (clean, mask)]
        noise = jnp.asarray(noise, jnp.float32) if packed else layout(jnp.asarray(noise, jnp.float32))
        parts.insert(1, noise)
        return flow_match.KeptRegion(*(jax.device_put(a, self._latent_sharding(a.shape)) for a in parts))


class WanVaeEncoding(VaeEncoding):
    """:class:`VaeEncoding` for the Wan 2.1-style causal 3-D VAE (``AutoencoderKLWan``; Qwen-Image's
    ``AutoencoderKLQwenImage``: the same encoder, one frame), whose latents are normalized by ``latents_mean`` /
    ``latents_std``: the encoder (``vae/encoder_params``, :mod:`xdit_jax.models.vae_wan_encoder`) in the pipeline's
    dtype, as diffusers runs it; the plane split over the mesh. Images (N, 3, H, W) are encoded as one frame and give
    (N, C, H/f, W/f); videos (N, 3, T, H, W) give (N, C, T', H/f, W/f). ``VAE_ENCODER_CONFIG``: the VAE config class
    (``from_dict`` of ``vae/config.json``)."""

    VAE_ENCODER_CONFIG = None

    @classmethod
    def _extra_parts(cls, folder, mesh_obj, dtype, kind: str) -> dict:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.models import vae_wan, vae_wan_encoder
        from xdit_jax.pipelines.denoise import load_vae_encoder

        config = cls.VAE_ENCODER_CONFIG or vae_wan.WanVAEConfig
        vc = config.from_dict(read_json(folder / "vae" / "config.json"))
        return {**super(VaeEncoding, cls)._extra_parts(folder, mesh_obj, dtype, kind),
                "vae_encoder": load_vae_encoder(folder, vc, dtype, NamedSharding(mesh_obj, P()), vae_wan_encoder)}

    def _moments(self, images):
        """The encoder's (mean, std), float32, unnormalized: images (N, 3, H, W) -> (N, C, h, w) each (one frame);
        videos (N, 3, T, H, W) -> (N, C, T', h, w)."""
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_wan_encoder
        from xdit_jax.parallel.vae import sharded_encode

        if self.vae_encoder is None:
            raise ValueError(f"This pipeline has no VAE encoder; load it with {type(self).__name__}.from_pretrained.")
        fns = self.__dict__.setdefault("_text_fns", {})
        if "vae_moments" not in fns:
            graphdef, state = nnx.split(self.vae_encoder)
            mesh = self.mesh if self.mesh.size > 1 else None
            factor, dtype = self.vae_encoder.config.spatial_compression_ratio, self.vae_encoder.dtype

            def encode(state, x):
                frames = x[:, :, None] if x.ndim == 4 else x
                mean, logvar = sharded_encode(lambda m, y: vae_wan_encoder.encode(m, y, moments=True),
                                              nnx.merge(graphdef, state), frames.astype(dtype), mesh, factor=factor)
                if x.ndim == 4:
                    mean, logvar = mean[:, :, 0], logvar[:, :, 0]
                return mean, jnp.exp(0.5 * logvar)

            jitted = jax.jit(encode, out_shardings=NamedSharding(self.mesh, P()))
            fns["vae_moments"] = lambda x: jitted(state, self._put_replicated(jnp.asarray(x, jnp.float32)))
        return fns["vae_moments"](images)

    def _scale_latents(self, z) -> jax.Array:
        """``(z - latents_mean) / latents_std`` per channel (float32), as diffusers' image-to-image pipelines."""
        from xdit_jax.models import vae_wan_encoder

        if z.ndim == 4:
            return vae_wan_encoder.scale_latents(self.vae_config, z[:, :, None].astype(jnp.float32))[:, :, 0]
        return vae_wan_encoder.scale_latents(self.vae_config, z.astype(jnp.float32))


def preprocess_mask(mask, height: int, width: int) -> np.ndarray:
    """An inpainting mask as diffusers' ``mask_processor`` makes it: a PIL image resized to ``width`` x ``height``
    (Lanczos), then grey, or an array (H, W) / (H, W, 1) of that size (uint8, or floats in [0, 1]); binarized at 0.5
    -> (1, 1, height, width) float32 of 0 (keep) and 1 (repaint)."""
    if hasattr(mask, "convert") and hasattr(mask, "resize"):  # a PIL image
        from PIL import Image

        if mask.size != (width, height):
            mask = mask.resize((width, height), resample=Image.LANCZOS)
        array = np.asarray(mask.convert("L"), np.float32) / 255.0
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim != 2 or array.shape != (height, width):
            raise ValueError(f"mask_image array {array.shape}: give (height, width) = ({height}, {width}) values (or a "
                             "PIL image, resized as diffusers does).")
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return (array >= 0.5).astype(np.float32)[None, None]
