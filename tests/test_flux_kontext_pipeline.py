"""FLUX.1 Kontext from a diffusers save_pretrained folder == diffusers' FluxKontextPipeline (the reference image
VAE-encoded and appended to the latents' tokens), on one device and on a mesh (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import make_torch_flux, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.flux import FluxKontextPipeline, kontext_image_size, kontext_output_size

PROMPT = "Make the sky purple."
NEG = "blurry, low quality"
H, W, STEPS, MSL = 48, 80, 3, 16  # 15 packed latent tokens (+ 16 text)
MAX_AREA = H * W  # the requested size kept (diffusers rescales to max_area at the requested aspect ratio)

_BUILT = {}


def build(tmp_path_factory):
    if not _BUILT:
        tp = make_torch_flux(kontext=True)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("flux-kontext"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["x"] = (tp, FluxKontextPipeline.from_pretrained(converted), converted)
    return _BUILT["x"]


def picture(seed, size=(70, 50)):
    """A PIL image (width x height): 50 x 70 -> 48 x 64 pixels (floored to 16), 12 packed image tokens."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, image, prompt, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(image=image, prompt=prompt, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type=output_type, max_area=MAX_AREA,
                 _auto_resize=False, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, prompt, lat, output_type="np", **kw):
    return pipe(image, prompt, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
                output_type=output_type, max_area=MAX_AREA, _auto_resize=False, progress=False, **kw).images


def test_image_matches_diffusers(tmp_path_factory):
    """Kontext-dev-like: embedded guidance 3.5, dynamic shifting (mu from the 15 noisy tokens only)."""
    tp, ours, _ = build(tmp_path_factory)
    lat, image = initial_latents(), picture(1)
    ref = _diffusers(tp, image, PROMPT, lat, "np", guidance_scale=3.5)
    out = _ours(ours, image, PROMPT, lat, guidance_scale=3.5)
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides, as test_flux_pipeline's (2e-4 = 1/20 of an 8-bit level); a wrong image scale/shift, RoPE id
    # or token order moves pixels by 1e-2 or more. Measured 3.6e-6.
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)
    # the reference image matters: another image, another result
    other = _ours(ours, picture(2), PROMPT, lat, guidance_scale=3.5)
    assert np.abs(other - out).max() > 1e-3


def test_latents_match_diffusers_true_cfg_two_images(tmp_path_factory):
    """Two prompts, an image each, diffusers' true CFG (negative prompt, true_cfg_scale 2)."""
    tp, ours, _ = build(tmp_path_factory)
    images, prompts = [picture(3), picture(4)], [PROMPT, "Add a hat."]
    lat = initial_latents(batch=2, seed=1)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0, guidance_scale=3.5)
    ref = _diffusers(tp, images, prompts, lat, "latent", **kw)
    out = _ours(ours, images, prompts, lat, "latent", **kw)
    scale = np.abs(ref).max()
    # measured 1.9e-6 of the latents' scale (the sinusoids' float32 floor of test_flux_transformer)
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_mesh_matches_one_device(tmp_path_factory):
    """True CFG over cfg=2, the joint [text; latents; image] sequence (31 + 12 tokens) over ring x ulysses."""
    _, ours, folder = build(tmp_path_factory)
    lat, image = initial_latents(seed=2), picture(5)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0)
    ref = _ours(ours, image, PROMPT, lat, **kw)
    out = _ours(FluxKontextPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2"), image, PROMPT, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding (measured 1.7e-6)


def test_sizes_as_diffusers():
    """The reference image's size (floored to 16, then the trained resolution of the nearest aspect ratio) and the
    output size (the requested aspect ratio at max_area) as diffusers computes them."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    processor = VaeImageProcessor(vae_scale_factor=16)
    for w, h in ((70, 50), (1000, 1000), (1920, 1080), (600, 1400), (333, 777), (1200, 900)):
        ih, iw = processor.get_default_height_width(Image.new("RGB", (w, h)))
        assert kontext_image_size(h, w, auto_resize=False) == (ih, iw)
        _, rw, rh = min((abs(iw / ih - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        assert kontext_image_size(h, w) == (rh, rw)
    assert kontext_output_size(1024, 1024, 1024 ** 2) == (1024, 1024)
    assert kontext_output_size(720, 1280, 1024 ** 2) == (768, 1360)  # diffusers: round(sqrt(A r)) floored to 16


def test_bad_input(tmp_path_factory):
    _, ours, _ = build(tmp_path_factory)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        _ours(ours, [picture(1), picture(2)], [PROMPT] * 3, initial_latents(batch=3))
    with pytest.raises(ValueError, match="at least 16 x 16"):
        _ours(ours, picture(1, size=(12, 40)), PROMPT, initial_latents())
    with pytest.raises(ValueError, match="is not 48 x 64"):
        _ours(ours, np.zeros((50, 70, 3), np.uint8), PROMPT, initial_latents())
    with pytest.raises(ValueError, match="empty list"):
        _ours(ours, [], PROMPT, initial_latents())
