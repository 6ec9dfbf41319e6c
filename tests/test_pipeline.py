"""The whole pipeline from a diffusers save_pretrained folder == diffusers' CogVideoXPipeline."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_pipeline, save_torch_pipeline
from xdit_jax import CogVideoXPipeline, tiny

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, FRAMES, STEPS = 64, 96, 9, 3


@pytest.fixture(scope="module", params=["2b", "1.5"])
def pipes(request, tmp_path_factory):
    tp = make_torch_pipeline(request.param)
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"cogvideox-{request.param}"))
    cache = tmp_path_factory.mktemp("cache")
    ours = CogVideoXPipeline.from_pretrained(folder, cache_dir=cache)
    return request.param, tp, ours


def initial_latents(tp, variant, batch=1, seed=0):
    lf = (FRAMES - 1) // 4 + 1
    if variant == "1.5" and lf % 2:
        lf += 1
    g = np.random.default_rng(seed)
    return g.standard_normal((batch, lf, tp.transformer.config.in_channels, H // 8, W // 8)).astype(np.float32)


def run_torch(tp, latents, **kw):
    with torch.no_grad():
        return tp(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                  max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, **kw).frames


def run_ours(ours, latents, **kw):
    return ours(PROMPT, NEG, height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, latents=latents,
                max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, progress=False, **kw).frames


@pytest.mark.parametrize("dynamic", [False, True])
def test_frames_match_diffusers(pipes, dynamic):
    variant, tp, ours = pipes
    lat = initial_latents(tp, variant)
    ref = run_torch(tp, lat, guidance_scale=6.0, use_dynamic_cfg=dynamic, output_type="np")
    out = run_ours(ours, lat, guidance_scale=6.0, use_dynamic_cfg=dynamic, output_type="np")
    assert out.shape == ref.shape == (1, FRAMES, H, W, 3)
    # fp32 throughout on both sides: 3 transformer evaluations with CFG x6, then the VAE. Pixel
    # values are in [0, 1]; 1e-4 is ~1/40 of an 8-bit level, far below any visible change,
    # while a wrong layout, position table or schedule moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_latents_match_diffusers(pipes):
    """Two prompts, two videos each (num_videos_per_prompt; diffusers' CogVideoX ignores it, so its run gets
    each prompt twice: a prompt's videos next to each other, the order of diffusers' embeddings)."""
    variant, tp, ours = pipes
    lat = initial_latents(tp, variant, batch=4, seed=1)
    with torch.no_grad():
        ref = tp(prompt=[PROMPT, PROMPT, "A cat sleeping on a sofa.", "A cat sleeping on a sofa."], height=H,
                 width=W, num_frames=FRAMES, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 guidance_scale=4.5, max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, output_type="latent").frames.numpy()
    out = ours([PROMPT, "A cat sleeping on a sofa."], height=H, width=W, num_frames=FRAMES,
               num_inference_steps=STEPS, latents=lat, guidance_scale=4.5, num_videos_per_prompt=2,
               max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, output_type="latent", progress=False).frames
    assert out.shape == ref.shape
    # latents are O(1); the same fp32 reasoning as above.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_default_video():
    """diffusers' defaults (sample size x 8, sample_frames, 8 fps); CogVideoX1.5's release size instead of
    its config's 300 x 300 sample size (2400 x 2400 pixels)."""
    import json
    from pathlib import Path

    from xdit_jax.models.cogvideox import CogVideoXConfig
    from xdit_jax.models.vae_cogvideox import CogVideoXVAEConfig
    from xdit_jax.pipelines.cogvideox import default_video

    root = Path(__file__).resolve().parents[1] / "configs"
    load = lambda m, c: json.loads((root / m / c / "config.json").read_text())
    got = {m: default_video(CogVideoXConfig.from_dict(load(m, "transformer")), CogVideoXVAEConfig.from_dict(load(m, "vae")))
           for m in ("cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b")}
    assert got["cogvideox-2b"] == got["cogvideox-5b"] == {"height": 480, "width": 720, "num_frames": 49, "fps": 8}
    assert got["cogvideox1.5-5b"] == {"height": 768, "width": 1360, "num_frames": 81, "fps": 16}
