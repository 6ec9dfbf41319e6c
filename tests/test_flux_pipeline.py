"""The FLUX pipeline from a diffusers save_pretrained folder == diffusers' FluxPipeline, on one device and on
meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_flux, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.flux import FluxPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, STEPS, MSL = 48, 80, 3, 16  # 6 x 10 latents: 3 x 5 = 15 packed image tokens (+ 16 text = 31 joint)

_BUILT = {}


def build(tmp_path_factory, guided: bool = True):
    """(torch pipeline, our pipeline, our converted folder), made once per variant."""
    if guided not in _BUILT:
        tp = make_torch_flux(guidance_embeds=guided)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"flux-{guided}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[guided] = (tp, FluxPipeline.from_pretrained(converted), converted)
    return _BUILT[guided]


def initial_latents(batch=1, seed=0):
    """Packed latents (B, 15, 16), diffusers' ``latents`` argument."""
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, prompt, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 max_sequence_length=MSL, output_type=output_type, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def test_image_matches_diffusers(tmp_path_factory):
    """FLUX.1-dev-like: embedded guidance 3.5, dynamic shifting (mu from the 12 image tokens)."""
    tp, ours, _ = build(tmp_path_factory)
    lat = initial_latents()
    ref = _diffusers(tp, PROMPT, lat, "np", guidance_scale=3.5)
    out = ours(PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
               guidance_scale=3.5, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides: 3 steps, then the VAE (shift and scale); pixels in [0, 1]. The float32 floor is the
    # timestep/guidance sinusoids (see test_flux_transformer); 2e-4 is 1/20 of an 8-bit level, while a
    # wrong packing, RoPE grid, schedule or VAE shift moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("guided", [True, False])
def test_latents_match_diffusers_true_cfg_batch(guided, tmp_path_factory):
    """Two prompts with diffusers' true CFG (negative prompt, true_cfg_scale 2), two images each where guided
    (num_images_per_prompt, as diffusers' run of each prompt twice: its own num_images_per_prompt fails with
    true CFG); schnell-like too (no guidance embedding, a static shift of 1)."""
    tp, ours, _ = build(tmp_path_factory, guided)
    prompts = [PROMPT, "A cat."]
    per = 2 if guided else 1
    lat = initial_latents(batch=2 * per, seed=1)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0, guidance_scale=3.5)
    ref = _diffusers(tp, [p for p in prompts for _ in range(per)], lat, "latent", **kw)
    out = ours(prompts, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
               output_type="latent", progress=False, num_images_per_prompt=per, **kw).images
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# The single-axis meshes are slow-marked: the combined mesh covers their axes here, and the transformer's
# tests run every mesh; `pytest -m slow` runs them.
SLOW = pytest.mark.slow
# data, cfg and ring in one mesh (three prompts with true CFG: data=2 pads the batch to 4, each half on its cfg
# group) and ulysses=3 run by default; the pairs they replace are slow-marked too.
MESHES = ["ulysses=3", "data=2,cfg=2,ring=2", pytest.param("data=2,ring=2", marks=SLOW),
          pytest.param("cfg=2,ulysses=2", marks=SLOW), pytest.param("ulysses=2,ring=2", marks=SLOW),
          pytest.param("ulysses=2", marks=SLOW), pytest.param("ring=2", marks=SLOW)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(mesh, tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    batch = 3 if "data=2" in mesh else 1  # 3 prompts: data=2 pads the transformer's batch to 4
    prompts = [PROMPT, "A cat.", "A red car."][:batch]
    kw = dict(height=H, width=W, num_inference_steps=2, latents=initial_latents(batch=batch, seed=2),
              max_sequence_length=MSL, progress=False)
    if "cfg=2" in mesh:
        kw.update(negative_prompt=NEG, true_cfg_scale=2.0)
    ref = ours(prompts, **kw).images
    out = FluxPipeline.from_pretrained(folder, mesh=mesh)(prompts, **kw).images
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the 2 layers of the model's largest block"):
        FluxPipeline.from_pretrained(folder, mesh="pipefusion=3")  # before any weight is read
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=W)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="come together"):
        ours(PROMPT, negative_prompt_embeds=np.zeros((1, MSL, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="Give either negative_prompt"):
        ours(PROMPT, negative_prompt=NEG, negative_prompt_embeds=np.zeros((1, MSL, 32), np.float32),
             negative_pooled_prompt_embeds=np.zeros((1, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="true CFG"):
        FluxPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, negative_prompt=NEG, height=H, width=W)
    with pytest.raises(ValueError, match="greater than 512"):
        ours(PROMPT, height=H, width=W, max_sequence_length=600)
    with pytest.raises(ValueError, match="cfg=2 splits"):
        FluxPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W)  # no negative prompt
