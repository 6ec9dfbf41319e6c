"""The LongCat-Image-Edit pipeline from a diffusers save_pretrained folder == diffusers' LongCatImageEditPipeline (slow:
the prompt's states with the image through Qwen2.5-VL's vision tower, latents after 2 steps with CFG, a mesh). The
output area is an argument here (diffusers' constant 1024^2, patched in its module for the tiny model); Qwen2.5-VL's
positions as diffusers 0.42.1 gets them from transformers 5.23 (``mrope=False``: 0 .. L-1)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_longcat_edit, random_image, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.longcat_image import LongCatImageEditPipeline, edit_dimensions

PROMPT = 'Make it "red".'  # (within the 16 tokens: diffusers' edit fails on a truncation, len(len(...)))
H, W, STEPS = 48, 80, 2  # the image's 80 x 48 at an area of 80 * 48: 15 noisy + 15 image tokens of 64 channels
AREA = H * W

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tp = make_torch_longcat_edit()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("longcat_edit"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    ours = LongCatImageEditPipeline.from_pretrained(converted, mrope=False)
    ours.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    return tp, ours, converted


def _diffusers(tp, image, lat, monkeypatch, **kw):
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as mod

    orig = mod.calculate_dimensions
    monkeypatch.setattr(mod, "calculate_dimensions", lambda area, ratio: orig(AREA, ratio))
    with torch.no_grad():
        return tp(image, PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(lat), output_type="latent",
                  **kw).images.numpy()


def test_dimensions_match_diffusers():
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

    for area, ratio in [(1024 * 1024, 1.0), (1024 * 1024, 4 / 3), (1024 * 1024, 0.61), (AREA, W / H)]:
        assert edit_dimensions(area, ratio) == calculate_dimensions(area, ratio)


def test_latents_match_diffusers(built, monkeypatch):
    tp, ours, converted = built
    image = random_image(3, (W, H))
    lat = np.random.default_rng(0).standard_normal((1, (H // 16) * (W // 16), 64)).astype(np.float32)
    ref = _diffusers(tp, image, lat, monkeypatch)
    kw = dict(num_inference_steps=STEPS, latents=lat, output_type="latent", progress=False, image_area=AREA)
    out = ours(image, PROMPT, **kw).images
    scale = np.abs(ref).max()
    # fp32; latents O(4.7); measured max |diff| 2.4e-6
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    ref = _diffusers(tp, image, lat, monkeypatch, negative_prompt="blurry", guidance_scale=6.0)
    out = ours(image, PROMPT, negative_prompt="blurry", guidance_scale=6.0, **kw).images
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    mesh = LongCatImageEditPipeline.from_pretrained(converted, mesh="cfg=2,ring=2,ulysses=2", mrope=False)
    mesh.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    np.testing.assert_allclose(mesh(image, PROMPT, negative_prompt="blurry", guidance_scale=6.0, **kw).images, out,
                               atol=1e-5 * scale, rtol=0)
    with pytest.raises(ValueError, match="both height and width"):
        ours(image, PROMPT, height=H, **kw)


def test_pipefusion_matches_sequential_rule(built):
    """PipeFusion on pipefusion=2 (the image's tokens patched with the noisy ones) == its sequential reference on one
    device (the same 2 patches, 1 exact warm-up step)."""
    _, _, converted = built
    image = random_image(3, (W, H))
    lat = np.random.default_rng(0).standard_normal((1, (H // 16) * (W // 16), 64)).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, latents=lat, output_type="latent", progress=False, image_area=AREA)
    outs = []
    for extra in (dict(pipefusion_patches=2), dict(mesh="pipefusion=2")):
        pipe = LongCatImageEditPipeline.from_pretrained(converted, mrope=False, **extra)
        pipe.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
        outs.append(pipe(image, PROMPT, **kw).images)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5 * np.abs(outs[0]).max(), rtol=0)
