"""The Sana Sprint pipeline from a diffusers save_pretrained folder == diffusers' SanaSprintPipeline (latents and
decoded image; diffusers' SCM step noise replaced by the noise our step draws), on one device and on a mesh."""

import jax
import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_sana_sprint, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.sana import SanaSprintPipeline

PROMPT = "A small dog running on a beach at sunset."
H, W = 32, 64  # 8 x 16 latents
MSL = tiny.SANA_MAX_SEQUENCE_LENGTH
SEED = 7


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tp = make_torch_sana_sprint()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("sana-sprint"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, SanaSprintPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0, h=H, w=W):
    return np.random.default_rng(seed).standard_normal((batch, 4, h // 4, w // 4)).astype(np.float32)


def _diffusers(tp, monkeypatch, shape, steps, **kw):
    """diffusers' run with its SCM step noise replaced by ours (``normal(fold_in(key(SEED), i))``)."""
    from diffusers.schedulers import scheduling_scm

    noise = iter([np.array(jax.random.normal(jax.random.fold_in(jax.random.key(SEED), i), shape))
                  for i in range(steps)])
    monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda shape, **k: torch.from_numpy(next(noise)))
    with torch.no_grad():
        return tp(num_inference_steps=steps, **kw).images


def test_image_matches_diffusers(pipes, monkeypatch):
    """The defaults: 2 steps (angles 1.5708, 1.3), guidance 4.5 embedded, the complex human instruction; image."""
    tp, ours, _ = pipes
    lat = initial_latents()
    kw = dict(height=H, width=W, max_sequence_length=MSL, use_resolution_binning=False)
    ref = _diffusers(tp, monkeypatch, lat.shape, 2, prompt=PROMPT, latents=torch.from_numpy(lat), output_type="np",
                     **kw)
    out = ours(PROMPT, latents=lat, seed=SEED, progress=False, **kw).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides, pixels in [0, 1]: measured 1.2e-6; 1e-4 is 1/40 of an 8-bit level (a wrong angle transform,
    # guidance scale (2.0 for 4.5: 0.26) or step noise moves pixels by >1e-2).
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_latents_match_diffusers_batch_steps(pipes, monkeypatch):
    """Two prompts, two images each, 3 steps on the linspace schedule (intermediate_timesteps=None), no
    instruction, guidance 3.0: latents."""
    tp, ours, _ = pipes
    prompts = [PROMPT, "A cat."]
    lat = initial_latents(batch=4, seed=1)
    kw = dict(height=H, width=W, max_sequence_length=MSL, use_resolution_binning=False, guidance_scale=3.0,
              intermediate_timesteps=None, complex_human_instruction=[])
    ref = _diffusers(tp, monkeypatch, lat.shape, 3, prompt=[p for p in prompts for _ in (0, 1)],
                     latents=torch.from_numpy(lat), output_type="latent", **kw).numpy()
    out = ours(prompts, num_inference_steps=3, latents=lat, seed=SEED, output_type="latent", progress=False,
               num_images_per_prompt=2, **kw).images
    # latents of scale 2.5: measured 7.2e-7.
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_mesh_matches_one_device(pipes):
    _, ours, folder = pipes
    lat = initial_latents(batch=2, seed=2, h=36, w=48)  # 9 x 12 = 108 tokens: padded to 112 over ring x ulysses
    kw = dict(height=36, width=48, latents=lat, max_sequence_length=MSL, use_resolution_binning=False,
              complex_human_instruction=[], progress=False, seed=3)
    ref = ours([PROMPT, "A cat."], **kw).images
    out = SanaSprintPipeline.from_pretrained(folder, mesh="data=2,ring=2,ulysses=2")([PROMPT, "A cat."], **kw).images
    # parallel output equals one device up to float rounding (the step noise is drawn whole, then split): measured 6.3e-7
    # (ulysses=3: 4.2e-7).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_custom_timesteps_and_refusals(pipes):
    """Custom angles (diffusers' set_timesteps(timesteps=...)) equal to the default ones give the default run; what
    diffusers refuses is refused (intermediate angle with 3 steps, custom angles with max_timesteps, a negative
    prompt: Sprint has none)."""
    _, ours, _ = pipes
    kw = dict(height=H, width=W, latents=initial_latents(seed=5), max_sequence_length=MSL, use_resolution_binning=False,
              complex_human_instruction=[], output_type="latent", progress=False, seed=1)
    ref = ours(PROMPT, **kw).images
    out = ours(PROMPT, timesteps=[1.5708, 1.3, 0.0], max_timesteps=None, intermediate_timesteps=None, **kw).images
    np.testing.assert_array_equal(out, ref)
    for bad, needle in [(dict(num_inference_steps=3), "Intermediate"), (dict(timesteps=[1.5, 1.0, 0.0]), "max_timesteps"),
                        (dict(negative_prompt="blurry"), "negative prompt")]:
        with pytest.raises(ValueError, match=needle):
            ours(PROMPT, **{**kw, **bad})
    from xdit_jax.mesh import MeshSpec
    from xdit_jax.pipelines.sana import check_sprint_mesh

    with pytest.raises(ValueError, match="embeds its guidance"):
        check_sprint_mesh(MeshSpec(cfg=2))
