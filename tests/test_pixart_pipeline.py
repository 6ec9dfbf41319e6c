"""The PixArt pipeline from a diffusers save_pretrained folder == diffusers' PixArtSigma/AlphaPipeline,
on one device and on meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_pixart, save_torch_pipeline, step_compiles_once
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.pixart import PixArtPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, STEPS = 64, 96, 4
MSL = tiny.PIXART_MAX_SEQUENCE_LENGTH


_BUILT = {}


def build(variant, tmp_path_factory):
    """(variant, torch pipeline, our pipeline, our converted folder), made once per variant."""
    if variant not in _BUILT:
        tp = make_torch_pixart(variant)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"pixart-{variant}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))  # diffusers folder, converted
        _BUILT[variant] = (variant, tp, PixArtPipeline.from_pretrained(converted), converted)
    return _BUILT[variant]


@pytest.fixture(scope="module", params=["sigma", "alpha"])
def pipes(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    """The meshes are exercised on one variant: the variants differ only outside the blocks."""
    return build("sigma", tmp_path_factory)


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, H // 8, W // 8)).astype(np.float32)


def run_torch(tp, latents, prompt=PROMPT, **kw):
    with torch.no_grad():
        return tp(prompt=prompt, negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS,
                  latents=torch.from_numpy(latents), max_sequence_length=MSL, use_resolution_binning=False,
                  clean_caption=False, **kw).images


def test_images_match_diffusers(pipes):
    variant, tp, ours, _ = pipes
    lat = initial_latents()
    ref = run_torch(tp, lat, guidance_scale=4.5, output_type="np")
    out = ours(PROMPT, NEG, height=H, width=W, num_inference_steps=STEPS, latents=lat, guidance_scale=4.5,
               max_sequence_length=MSL, use_resolution_binning=False, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 on both sides: 4 DPM-Solver++ steps with CFG, then the VAE; pixels in [0, 1]. 1e-4 is ~1/40
    # of an 8-bit level, while a wrong mask, position table or schedule moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_latents_match_diffusers_batch_no_cfg(pipes):
    """Two prompts of different lengths (different text masks), two images each (num_images_per_prompt, as
    diffusers' run of each prompt twice), guidance off (no CFG batch)."""
    variant, tp, ours, _ = pipes
    prompts = [PROMPT, "A cat."]
    lat = initial_latents(batch=4, seed=1)
    with torch.no_grad():
        ref = tp(prompt=[p for p in prompts for _ in (0, 1)], height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 guidance_scale=1.0, max_sequence_length=MSL, use_resolution_binning=False, clean_caption=False,
                 output_type="latent").images.numpy()
    out = ours(prompts, height=H, width=W, num_inference_steps=STEPS, latents=lat, guidance_scale=1.0,
               max_sequence_length=MSL, use_resolution_binning=False, output_type="latent", progress=False,
               num_images_per_prompt=2).images
    # The first DPM-Solver++ step's x0 = (x - sigma eps) / alpha at t = 999 multiplies the model's output,
    # and its float32 rounding, by sigma / alpha ~ 156 (linear betas), so these latents are O(100):
    # compare at float32 rounding relative to their size (a wrong mask or schedule is off by >1e-2 of it).
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# The single-axis meshes are slow-marked: the combined mesh covers their axes here, and the transformer's
# tests run every mesh; `pytest -m slow` runs them.
SLOW = pytest.mark.slow
MESHES = ["cfg=2,ulysses=2,ring=2", "ulysses=3", "data=2,ulysses=2",
          pytest.param("cfg=2", marks=SLOW), pytest.param("ulysses=2", marks=SLOW), pytest.param("ring=2", marks=SLOW)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(sigma, mesh, caplog):
    """The mesh run == one device up to float rounding, its step compiled once (step 0 and 1 share it)."""
    _, _, ours, folder = sigma
    batch = 2 if "data=2" in mesh else 1
    prompts = [PROMPT, "A cat."][:batch]
    lat = initial_latents(batch=batch, seed=2)
    kw = dict(height=H, width=W, num_inference_steps=2, latents=lat, max_sequence_length=MSL, progress=False)
    ref = ours(prompts, **kw).images
    pipe = PixArtPipeline.from_pretrained(folder, mesh=mesh)
    with step_compiles_once(caplog):
        out = pipe(prompts, **kw).images
    # parallel output equals one device up to float rounding (sums in another order)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_resolution_binning_matches_diffusers():
    """Our bin tables and diffusers' give the same size for every request; the resize-and-crop back
    to the requested size equals diffusers' (torch bilinear, no antialiasing)."""
    import torch
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as pa
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as ps

    from xdit_jax.pipelines.pixart import aspect_ratio_bins, binned_size, resize_and_crop

    tables = {32: pa.ASPECT_RATIO_256_BIN, 64: pa.ASPECT_RATIO_512_BIN, 128: pa.ASPECT_RATIO_1024_BIN,
              256: ps.ASPECT_RATIO_2048_BIN}
    rng = np.random.default_rng(0)
    for sample_size, table in tables.items():
        assert aspect_ratio_bins(sample_size) == {k: (int(h), int(w)) for k, (h, w) in table.items()}
        for h, w in rng.integers(64, 4096, size=(200, 2)):
            assert binned_size(int(h), int(w), sample_size) == \
                PixArtImageProcessor.classify_height_width_bin(int(h), int(w), ratios=table)
    assert binned_size(100, 60, 8) == (100, 60)  # no bins for this sample size: as asked
    for (h, w), (nh, nw) in [((64, 96), (50, 70)), ((64, 96), (100, 90)), ((40, 40), (40, 40))]:
        x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
        ref = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), nw, nh).numpy()
        out = np.asarray(resize_and_crop(x, nh, nw))
        assert out.shape == ref.shape == (2, 3, nh, nw)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # float32 interpolation weights


@pytest.mark.parametrize("mesh", ["pipefusion=2", "cfg=2,pipefusion=2,ulysses=2"])
def test_pipefusion_matches_sequential_rule(sigma, mesh):
    """PipeFusion on PixArt, no model code involved: the patched steps equal the same displaced-patch
    rule run sequentially on one device (README, PipeFusion); one exact warm-up step, then three patched."""
    folder = sigma[3]
    lat = initial_latents(seed=3)
    kw = dict(height=H, width=W, num_inference_steps=4, latents=lat, max_sequence_length=MSL, progress=False,
              output_type="latent")
    exact = PixArtPipeline.from_pretrained(folder)(PROMPT, **kw).images
    ref = PixArtPipeline.from_pretrained(folder, pipefusion_patches=2, pipefusion_warmup_steps=1)(PROMPT, **kw).images
    out = PixArtPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=1)(PROMPT, **kw).images
    # Latents are O(500) here (see above); seen: |out - ref| <= 3e-4 (5e-7 of their size, float32
    # rounding), while the patched rule moves them by 0.2 from the exact run: the tolerance sits in between.
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 50 * atol  # the patched steps really ran (stale K/V differ)


def test_hub_class_names_and_bad_input(sigma, tmp_path):
    """The hub's PixArt folders call the transformer ``Transformer2DModel``: converted and loaded the
    same. Bad input: a clear ValueError before any step."""
    import json
    import shutil

    _, tp, ours, _ = sigma
    src = tmp_path / "hub-like"
    save_torch_pipeline(tp, src)
    index = json.loads((src / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (src / "model_index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    (src / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel"}))
    hub = PixArtPipeline.from_pretrained(converted_folder(src, cache_dir=tmp_path / "cache"))
    kw = dict(height=H, width=W, num_inference_steps=1, latents=initial_latents(), max_sequence_length=MSL,
              output_type="latent", progress=False)
    np.testing.assert_array_equal(hub(PROMPT, **kw).images, ours(PROMPT, **kw).images)

    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), **kw)
    with pytest.raises(ValueError, match="T5 states"):
        ours(prompt_embeds=np.zeros((1, MSL, 7), np.float32), prompt_attention_mask=np.ones((1, MSL)), **kw)
    with pytest.raises(ValueError, match="latents have shape"):
        ours(PROMPT, **{**kw, "latents": np.zeros((1, 4, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, **{**kw, "height": 40, "latents": None})
    other = tmp_path / "not-pixart"
    shutil.copytree(src, other)
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    with pytest.raises(ValueError, match="not PixArt"):
        PixArtPipeline.from_pretrained(converted_folder(other, cache_dir=tmp_path / "cache"))
