"""Inpainting's ``padding_mask_crop`` (diffusers' inpainting pipelines): only the part of the image around the mask
is inpainted, at the full output size, and pasted back into the original picture.

diffusers' steps, on PIL images (its ``VaeImageProcessor``): the mask's bounding box of non-black pixels, grown by
``pad`` pixels and then widened (or heightened) about its centre to the output's aspect ratio, kept inside the
image (:func:`crop_region`); image and mask cropped to it and resized to the output size, the remainder filled by
stretching the edge rows / columns (:func:`resize_and_fill`); after decoding, each result resized to the region's
size, cropping the excess (:func:`resize_and_crop`), placed there and composited under the original picture where the
mask is black (:func:`paste_back`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _pil():
    from PIL import Image

    return Image


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box of the mask's non-black pixels, ``pad`` pixels wider each side (inside the image),
    expanded about its centre to the aspect ratio ``width / height`` and shifted back inside the image."""
    m = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if not len(rows):
        raise ValueError("padding_mask_crop: the mask has no white pixel, so there is no region to inpaint.")
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)

    def grow(lo, hi, want, limit):  # grow [lo, hi) to ``want`` (float) about its centre, then back inside [0, limit]
        extra = int(want - (hi - lo))
        lo, hi = lo - extra // 2, hi + extra - extra // 2
        if hi >= limit:
            lo, hi = lo - (hi - limit), limit
        if lo < 0:
            lo, hi = 0, hi - lo
        return lo, min(hi, limit)

    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, (x2 - x1) / (width / height), h)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * (width / height), w)
    return x1, y1, x2, y2


def resize_and_fill(image, width: int, height: int):
    """The image resized to fit inside ``width`` x ``height`` keeping its aspect ratio (Lanczos), centred, and the
    margins filled by its first / last row (or column) stretched over them."""
    Image = _pil()
    wide = image.width / image.height > width / height
    sw = width if wide else image.width * height // image.height
    sh = height if not wide else image.height * width // image.width
    small = image.resize((sw, sh), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(small, box=(width // 2 - sw // 2, height // 2 - sh // 2))
    if wide and height // 2 - sh // 2 > 0:  # bands above and below
        band = height // 2 - sh // 2
        out.paste(small.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(small.resize((width, band), box=(0, sh, width, sh)), box=(0, band + sh))
    elif not wide and image.width / image.height < width / height and width // 2 - sw // 2 > 0:  # left and right
        band = width // 2 - sw // 2
        out.paste(small.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(small.resize((band, height), box=(sw, 0, sw, height)), box=(band + sw, 0))
    return out


def resize_and_crop(image, width: int, height: int):
    """The image resized to cover ``width`` x ``height`` keeping its aspect ratio (Lanczos), centred; the excess cut."""
    Image = _pil()
    tall = width / height <= image.width / image.height
    sw = width if not tall else image.width * height // image.height
    sh = height if tall else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((sw, sh), resample=Image.LANCZOS), box=(width // 2 - sw // 2, height // 2 - sh // 2))
    return out


def paste_back(mask, original, image, box):
    """``image`` (the inpainted crop) resized into ``box`` of a transparent canvas the original's size, with the
    original laid over it where the mask is black (its alpha: the inverted mask) -> an RGB image."""
    from PIL import ImageOps

    Image = _pil()
    keep = Image.new("RGBa", original.size)
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    canvas = Image.new("RGBA", original.size)
    canvas.paste(resize_and_crop(image, x2 - x1, y2 - y1), (x1, y1))
    out = canvas.convert("RGB").convert("RGBA")
    out.alpha_composite(keep.convert("RGBA"))
    return out.convert("RGB")


@dataclass
class MaskCrop:
    """One request's crop: the cropped image and mask (PIL, at the output size) to inpaint, and what pastes the
    results back (:meth:`finish`)."""

    image: object
    mask: object
    original: object
    original_mask: object
    box: tuple[int, int, int, int]

    @classmethod
    def of(cls, image, mask_image, height: int, width: int, pad: int | None) -> MaskCrop | None:
        """None without ``pad``; else the crop of a PIL ``image`` around the PIL ``mask_image`` (of its size)."""
        if pad is None:
            return None
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
            raise ValueError(f"padding_mask_crop={pad!r}: give a number of pixels >= 0 (or None).")
        pil = all(hasattr(x, "convert") and hasattr(x, "crop") for x in (image, mask_image))
        if not pil:
            raise ValueError("padding_mask_crop takes one PIL image and one PIL mask (as diffusers): pass "
                             "PIL.Image.open(...) for both.")
        if image.size != mask_image.size:
            raise ValueError(f"padding_mask_crop: the mask is {mask_image.size[0]} x {mask_image.size[1]} and the "
                             f"image {image.size[0]} x {image.size[1]}; give a mask of the image's size.")
        from xdit_jax.pipelines.denoise import rgb_image

        box = crop_region(mask_image, width, height, int(pad))
        original = rgb_image(image)
        return cls(resize_and_fill(original.crop(box), width, height),
                   resize_and_fill(mask_image.crop(box), width, height), original, mask_image, box)

    def finish(self, out, output_type: str):
        """The pipeline's output with each decoded image pasted back into the original (the original's size, 8-bit
        levels as diffusers' PIL output, in [0, 1]); latents as they are."""
        if output_type == "latent":
            return out
        Image = _pil()
        pasted = [np.asarray(paste_back(self.original_mask, self.original,
                                        Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)), self.box))
                  for im in out.images]
        out.images = np.stack(pasted).astype(np.float32) / 255.0
        return out
