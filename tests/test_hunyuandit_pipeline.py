"""The HunyuanDiT pipeline from a diffusers save_pretrained folder == diffusers' HunyuanDiTPipeline, on one
device and on meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_hunyuandit, save_torch_pipeline, step_compiles_once
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.hunyuandit import HunyuanDiTPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, STEPS = 64, 96, 3

_BUILT = {}


def build(key, tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once per (variant, scheduler)."""
    if key not in _BUILT:
        variant, scheduler = key
        tp = make_torch_hunyuandit(variant, scheduler=scheduler)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"hunyuandit-{variant}-{scheduler}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[key] = (tp, HunyuanDiTPipeline.from_pretrained(converted), converted)
    return _BUILT[key]


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, H // 8, W // 8)).astype(np.float32)


def jax_noise(seed, shape, steps):
    """The scheduler noise our step draws (``normal(fold_in(key(seed), i))``), to hand to diffusers."""
    import jax

    return [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), shape)) for i in range(steps)]


@pytest.mark.parametrize("variant", ["v1.2", "v1.1"])
def test_images_match_diffusers_ddpm(variant, tmp_path_factory, monkeypatch):
    """As shipped (DDPM, v-prediction): diffusers' step noise replaced by the noise our step draws."""
    from diffusers.schedulers import scheduling_ddpm

    tp, ours, _ = build((variant, "ddpm"), tmp_path_factory)
    lat = initial_latents()
    noise = iter(jax_noise(7, lat.shape, STEPS))
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise)))
    with torch.no_grad():
        ref = tp(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), guidance_scale=5.0, use_resolution_binning=False,
                 output_type="np").images
    out = ours(PROMPT, NEG, height=H, width=W, num_inference_steps=STEPS, latents=lat, guidance_scale=5.0,
               use_resolution_binning=False, seed=7, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 on both sides: 3 steps with CFG, then the VAE; pixels in [0, 1]. 1e-4 is ~1/40 of an 8-bit level,
    # while a wrong mask, skip order or schedule moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_latents_match_diffusers_dpm_rescale_batch(tmp_path_factory):
    """DPM-Solver multistep, two prompts, two images each (num_images_per_prompt, as diffusers' run of each
    prompt twice: its own repeats the masks in another order than the embeddings), guidance_rescale on."""
    tp, ours, _ = build(("v1.2", "dpm"), tmp_path_factory)
    prompts = [PROMPT, "A cat."]
    lat = initial_latents(batch=4, seed=1)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, guidance_rescale=0.7,
              use_resolution_binning=False)
    with torch.no_grad():
        ref = tp(prompt=[p for p in prompts for _ in (0, 1)], latents=torch.from_numpy(lat), output_type="latent",
                 **kw).images.numpy()
    out = ours(prompts, latents=lat, output_type="latent", progress=False, num_images_per_prompt=2, **kw).images
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# The single-axis meshes are slow-marked: the combined mesh covers their axes here, and the transformer's
# tests run every mesh; `pytest -m slow` runs them.
SLOW = pytest.mark.slow
MESHES = ["cfg=2,ulysses=2,ring=2", pytest.param("ulysses=3", marks=SLOW), pytest.param("data=2", marks=SLOW), pytest.param("data=2,ulysses=2", marks=SLOW),
          pytest.param("cfg=2", marks=SLOW), pytest.param("ulysses=2", marks=SLOW), pytest.param("ring=2", marks=SLOW)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(mesh, tmp_path_factory, caplog):
    """The mesh run == one device up to float rounding, its step compiled once (step 0 and 1 share it)."""
    _, ours, folder = build(("v1.2", "ddpm"), tmp_path_factory)
    batch = {"data=2": 3}.get(mesh, 2 if "data=2" in mesh else 1)  # data=2 alone: 3 prompts, padded to 4
    prompts = [PROMPT, "A cat.", "A red car."][:batch]
    kw = dict(height=H, width=W, num_inference_steps=2, latents=initial_latents(batch=batch, seed=2),
              use_resolution_binning=False, progress=False)
    if mesh == "data=2":  # the padded batch (the decode is the other meshes' business)
        kw["output_type"] = "latent"
    ref = ours(prompts, **kw).images
    pipe = HunyuanDiTPipeline.from_pretrained(folder, mesh=mesh)
    with step_compiles_once(caplog):
        out = pipe(prompts, **kw).images
    # one device up to float rounding: pixels in [0, 1]; latents relative to their size
    np.testing.assert_allclose(out, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_binning_and_bad_input(tmp_path_factory):
    from diffusers.pipelines.hunyuandit import pipeline_hunyuandit as ph

    from xdit_jax.pipelines.hunyuandit import binned_size

    def diffusers_bin(h, w):  # HunyuanDiTPipeline.__call__'s rule
        h, w = int(h // 16 * 16), int(w // 16 * 16)
        if (h, w) not in ph.SUPPORTED_SHAPE:
            w, h = ph.map_to_standard_shapes(w, h)
        return int(h), int(w)

    for h, w in [(1024, 1024), (1000, 1000), (720, 1280), (900, 1200), (2000, 2000)] + \
            [tuple(x) for x in np.random.default_rng(0).integers(256, 2500, size=(200, 2))]:
        assert binned_size(h, w) == diffusers_bin(h, w), (h, w)
    _, ours, folder = build(("v1.2", "ddpm"), tmp_path_factory)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the 2 layers of the model's largest block"):
        HunyuanDiTPipeline.from_pretrained(folder, mesh="pipefusion=3")  # 6 layers: stacks of 2, before any read
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(prompt_embeds=np.zeros((1, 77, 32), np.float32), height=H, width=W, use_resolution_binning=False)
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match=r"prompt_embeds_2 \(1, 256, 8\) with mask"):
        ours(prompt_embeds=z(1, 77, 32), prompt_attention_mask=z(1, 77), prompt_embeds_2=z(1, 256, 8),
             prompt_attention_mask_2=z(1, 256), height=H, width=W, use_resolution_binning=False, guidance_scale=1.0)
