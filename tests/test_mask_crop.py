"""Inpainting's ``padding_mask_crop`` steps (xdit_jax.pipelines.mask_crop) against diffusers' VaeImageProcessor on
the same PIL images: the crop region, the fill and crop resizes, the paste back; bit-exact (the same PIL operations).
The pipelines' runs against diffusers: tests/test_flux_pipeline.py, tests/test_sd3_pipeline.py (slow)."""

import numpy as np
import pytest
from PIL import Image

from xdit_jax.pipelines import mask_crop


def _processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def _mask(h, w, box):
    m = np.zeros((h, w), np.uint8)
    y1, y2, x1, x2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


def _picture(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# masks in the middle, at each border, a thin line, nearly the whole image; output aspect ratios wide, tall, square
CASES = [((90, 120), (30, 50, 40, 70), (48, 80), 8), ((90, 120), (0, 10, 0, 100), (64, 64), 0),
         ((90, 120), (80, 90, 110, 120), (80, 48), 16), ((60, 200), (20, 22, 5, 195), (48, 80), 4),
         ((100, 70), (1, 99, 30, 31), (96, 32), 2), ((64, 64), (2, 62, 2, 62), (32, 96), 32)]


@pytest.mark.parametrize("size,box,out,pad", CASES)
def test_steps_match_diffusers(size, box, out, pad):
    proc = _processor()
    mask, image = _mask(*size, box), _picture(*size, seed=sum(box))
    oh, ow = out
    region = mask_crop.crop_region(mask, ow, oh, pad)
    assert region == proc.get_crop_region(mask, ow, oh, pad=pad)
    x1, y1, x2, y2 = region
    assert 0 <= x1 < x2 <= size[1] and 0 <= y1 < y2 <= size[0]
    piece = image.crop(region)
    np.testing.assert_array_equal(np.asarray(mask_crop.resize_and_fill(piece, ow, oh)),
                                  np.asarray(proc.resize(piece, oh, ow, resize_mode="fill")))
    np.testing.assert_array_equal(np.asarray(mask_crop.resize_and_crop(_picture(oh, ow, 1), x2 - x1, y2 - y1)),
                                  np.asarray(proc.resize(_picture(oh, ow, 1), y2 - y1, x2 - x1, resize_mode="crop")))
    inpainted = _picture(oh, ow, 2)
    ours = np.asarray(mask_crop.paste_back(mask, image, inpainted, region))
    np.testing.assert_array_equal(ours, np.asarray(proc.apply_overlay(mask, image, inpainted, region)))
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(ours[keep], np.asarray(image)[keep])  # outside the mask: the original, exactly


def test_what_the_pipeline_gets_and_bad_input():
    """MaskCrop.of: the cropped image and mask at the output size; finish pastes (B, H, W, 3) floats back into the
    original's size; refused: a pad that is not a count, arrays, a mask of another size, an all-black mask."""
    from types import SimpleNamespace

    mask, image = _mask(90, 120, (30, 50, 40, 70)), _picture(90, 120, 3)
    assert mask_crop.MaskCrop.of(image, mask, 48, 80, None) is None
    crop = mask_crop.MaskCrop.of(image, mask, 48, 80, 8)
    assert crop.image.size == crop.mask.size == (80, 48) and crop.box == mask_crop.crop_region(mask, 80, 48, 8)
    out = SimpleNamespace(images=np.random.default_rng(0).random((2, 48, 80, 3)).astype(np.float32))
    pasted = crop.finish(out, "np").images
    assert pasted.shape == (2, 90, 120, 3) and pasted.dtype == np.float32
    levels = (pasted[0] * 255).round().astype(np.uint8)  # 8-bit levels, as diffusers' PIL output
    np.testing.assert_array_equal(levels[np.asarray(mask) == 0], np.asarray(image)[np.asarray(mask) == 0])
    latents = SimpleNamespace(images=np.zeros((1, 16, 6, 10)))
    assert crop.finish(latents, "latent") is latents
    for args, needle in [((image, mask, 48, 80, -1), "pixels >= 0"), ((image, mask, 48, 80, 2.5), "pixels >= 0"),
                         ((np.asarray(image), mask, 48, 80, 4), "one PIL image and one PIL mask"),
                         ((image, _mask(90, 100, (0, 5, 0, 5)), 48, 80, 4), "a mask of the image's size"),
                         ((image, _mask(90, 120, (0, 0, 0, 0)), 48, 80, 4), "no white pixel")]:
        with pytest.raises(ValueError, match=needle):
            mask_crop.MaskCrop.of(*args)
