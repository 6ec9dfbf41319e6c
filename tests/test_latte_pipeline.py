"""The Latte pipeline from a diffusers save_pretrained folder == diffusers' LattePipeline, on one device and on
meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_latte, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.latte import LattePipeline

PROMPT = "A small dog running on a beach at sunset."
PROMPTS = [PROMPT, "A cat."]
# 3 frames of 32 x 48: 4 x 6 latents, 2 x 3 = 6 patch positions (not square: the interpolated position table).
F, H, W, STEPS = 3, 32, 48, 3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    tp = make_torch_latte(video_length=F)
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("latte"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))  # diffusers folder, converted
    return tp, LattePipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, F, H // 8, W // 8)).astype(np.float32)


def run_torch(tp, prompt, latents, **kw):
    with torch.no_grad():
        return tp(prompt=prompt, video_length=F, height=H, width=W, num_inference_steps=STEPS,
                  latents=torch.from_numpy(latents), clean_caption=False, **kw).frames


# Latents: O(1-3) after 3 DDIM steps from x_999 (epsilon: x0 = (x - sqrt(1-a) eps) / sqrt(a) grows the model's
# rounding by 1 / sqrt(a) ~ 150 at t = 999, then shrinks it again by sqrt(a') at t' = 666): 1e-5 relative to
# their size is ~100 float32 ulps, while a wrong mask, frame order or schedule moves them by 1e-2 or more.
def _close_latents(out, ref):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_one_prompt_video_matches_diffusers(pipes):
    """One prompt with CFG: the embeddings cut to the prompt's tokens, the negative ones alike; then the video."""
    tp, ours, _ = pipes
    lat = initial_latents()
    ref = run_torch(tp, PROMPT, lat, output_type="np")
    out = ours(PROMPT, video_length=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               progress=False).frames
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # pixels in [0, 1] from the tiny VAE: 1e-4 is ~1/40 of an 8-bit level
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_two_prompts_latents_match_diffusers(pipes):
    """Two prompts with CFG: the embeddings multiplied by their masks, 120 tokens, the negative unmasked; with
    the temporal attention off (diffusers' enable_temporal_attentions=False) too."""
    tp, ours, _ = pipes
    lat = initial_latents(batch=2, seed=1)
    for temporal in (True, False):
        ref = run_torch(tp, PROMPTS, lat, output_type="latent", enable_temporal_attentions=temporal).numpy()
        out = ours(PROMPTS, video_length=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
                   output_type="latent", enable_temporal_attentions=temporal, progress=False).frames
        assert out.shape == ref.shape == (2, 4, F, H // 8, W // 8)
        _close_latents(out, ref)


# cfg x ulysses over the 6 patch positions (ulysses=2 divides them, so the mesh adds ring=2: 8 positions padded);
# data x ring with two prompts; PipeFusion (its patched steps are not the exact step: they equal the
# same displaced-patch rule run sequentially on one device, checked against that).
# (data=2,ring=2 slow-marked for the default run's time: the data axis runs in the other pipelines' data meshes and
# the CLI's data=3; `pytest -m slow`)
MESHES = ["cfg=2,ring=2,ulysses=2", pytest.param("data=2,ring=2", marks=pytest.mark.slow),
          pytest.param("ulysses=3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(pipes, mesh):
    _, ours, folder = pipes
    prompts = PROMPTS if "data=2" in mesh else PROMPT
    lat = initial_latents(batch=2 if "data=2" in mesh else 1, seed=2)
    kw = dict(video_length=F, height=H, width=W, num_inference_steps=2, latents=lat, progress=False)
    ref = ours(prompts, **kw).frames
    out = LattePipeline.from_pretrained(folder, mesh=mesh)(prompts, **kw).frames  # frames decoded over the mesh
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_pipefusion_matches_sequential_rule(pipes):
    """48 x 64: 3 x 4 = 12 patch positions, two patches of 8 (PipeFusion's granule): a real split."""
    _, ours, folder = pipes
    lat = np.random.default_rng(3).standard_normal((1, 4, F, 6, 8)).astype(np.float32)
    kw = dict(video_length=F, height=48, width=64, num_inference_steps=3, latents=lat, progress=False,
              output_type="latent")
    exact = ours(PROMPT, **kw).frames
    ref = LattePipeline.from_pretrained(folder, pipefusion_patches=2)(PROMPT, **kw).frames
    out = LattePipeline.from_pretrained(folder, mesh="pipefusion=2")(PROMPT, **kw).frames
    # seen: out == ref bit for bit here, while the patched rule moves the latents (O(40)) by 6e-3 from the exact
    # run; the tolerance (float32 rounding of sums in another order) sits far below that.
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ)


def test_bad_input_is_refused(pipes):
    _, ours, _ = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=48, video_length=F)
    with pytest.raises(ValueError, match="video_length"):
        ours(PROMPT, video_length=0)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages"):
        LattePipeline.from_pretrained(pipes[2], mesh="pipefusion=3")
    with pytest.raises(ValueError, match="cfg=2"):
        LattePipeline.from_pretrained(pipes[2], mesh="cfg=2")(PROMPT, guidance_scale=1.0, video_length=F)


def test_generate_cli_video(pipes, tmp_path, capsys):
    """generate.py on a Latte folder: an .mp4 of the asked frames and fps, on a sequence-parallel mesh."""
    import imageio.v3 as iio

    from xdit_jax import cli

    out = tmp_path / "latte.mp4"
    rc = cli.main(["--model", str(pipes[2]), "--output", str(out), "--steps", "2", "--num-frames", str(F),
                   "--height", str(H), "--width", str(W), "--fps", "4", "--mesh", "ring=2", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out).shape == (F, H, W, 3)
    printed = capsys.readouterr().out
    assert '"model_family": "latte"' in printed and "at 4 fps" in printed
