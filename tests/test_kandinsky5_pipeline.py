"""The Kandinsky 5.0 pipeline from a diffusers save_pretrained folder == diffusers' Kandinsky5T2VPipeline (tiny random
weights, fp32, 2 steps): latents and video with CFG; a cfg=2,ring=2,ulysses=2 mesh == one device."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_kandinsky5, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.kandinsky5 import Kandinsky5T2VPipeline

PROMPT = "A small dog running on a beach at sunset."
NEGATIVE = "A cat."  # shorter than the prompt: the CFG batch pads it with masked tokens
# 5 frames of 32 x 32: 2 x 4 x 4 latents (channels last), 8 visual tokens; ~246 Qwen tokens after the 128 cut
F, H, W, STEPS = 5, 32, 32, 2
LATENT = (2, 4, 4, 4)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    tp = make_torch_kandinsky5()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("kandinsky5"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, Kandinsky5T2VPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch,) + LATENT).astype(np.float32)


def run_torch(tp, prompt, latents, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(latents.copy()), **kw).frames  # (it steps them in place)
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def run_ours(pipe, prompt, latents, **kw):
    kw = dict(dict(num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=latents, progress=False), **kw)
    return pipe(prompt, **kw).frames


def test_cfg_video_matches_diffusers(pipes):
    """Guidance 5 with a shorter negative prompt: the latents, then the video."""
    tp, ours, _ = pipes
    lat = initial_latents()
    ref = run_torch(tp, PROMPT, lat, negative_prompt=NEGATIVE, output_type="latent")
    out = run_ours(ours, PROMPT, lat, negative_prompt=NEGATIVE, output_type="latent")
    assert out.shape == ref.shape == (1,) + LATENT
    # latents O(7) after 2 Euler steps, both sides fp32: measured 2.0e-5 (2.8e-6 of their scale), the two fp32
    # implementations' rounding (Qwen, CLIP, the transformer, bf16-rounded q / k); a wrong crop, mask, shift or scale
    # factor moves them by 1e-2 and more
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    ref = run_torch(tp, PROMPT, lat, negative_prompt=NEGATIVE, output_type="np")
    out = run_ours(ours, PROMPT, lat, negative_prompt=NEGATIVE)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # pixels in [0, 1] from the tiny VAE (measured 7.4e-6)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.slow  # (the default tests: the transformer's ring=2,ulysses=4 == one device)
@pytest.mark.parametrize("mesh,warmup", [("cfg=2,ring=2,ulysses=2", 1),
                                         ("pipefusion=2,ulysses=2", 2)])  # (PipeFusion: both steps exact)
def test_mesh_equals_one_device(pipes, mesh, warmup):
    tp, ours, converted = pipes
    lat = initial_latents(seed=1)
    ref = run_ours(ours, PROMPT, lat, output_type="latent")
    pipe = Kandinsky5T2VPipeline.from_pretrained(converted, mesh=mesh, pipefusion_warmup_steps=warmup)
    out = run_ours(pipe, PROMPT, lat, output_type="latent")
    # measured 6.8e-6 of 10.9 (cfg=2,ring=2,ulysses=2)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=mesh)


@pytest.mark.slow
def test_pipefusion_patched_steps_equal_sequential_reference(pipes):
    """64 x 64 (2 x 4 x 4 tokens), 3 steps: pipefusion=2's patched steps (stale K/V of the later patch) == the same rule
    run sequentially on one device, and != the exact run."""
    _, ours, converted = pipes
    lat = np.random.default_rng(2).standard_normal((1, 2, 8, 8, 4)).astype(np.float32)
    kw = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    exact = run_ours(ours, PROMPT, lat, **kw)
    seq = run_ours(Kandinsky5T2VPipeline.from_pretrained(converted, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(Kandinsky5T2VPipeline.from_pretrained(converted, mesh="pipefusion=2"), PROMPT, lat, **kw)
    np.testing.assert_allclose(out, seq, atol=1e-5 * np.abs(seq).max(), rtol=0)
    assert np.abs(seq - exact).max() > 1e-2


def test_bad_input(pipes):
    _, ours, _ = pipes
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours.check_inputs(H, W, 6, 1, 5.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.check_inputs(40, W, F, 1, 5.0)


def test_kandinsky5_pipeline_classes():
    from xdit_jax import pipelines
    from xdit_jax.pipelines.kandinsky5_i2i import Kandinsky5I2IPipeline
    from xdit_jax.pipelines.kandinsky5_i2v import Kandinsky5I2VPipeline

    assert pipelines.pipeline_class("Kandinsky5I2VPipeline") is Kandinsky5I2VPipeline
    assert pipelines.pipeline_class("Kandinsky5I2IPipeline") is Kandinsky5I2IPipeline


@pytest.mark.slow  # (another variant on the same transformer)
def test_text_to_image_matches_diffusers(tmp_path_factory):
    """Kandinsky5T2IPipeline, 2 steps at 32 x 32 with CFG 3.5 and the default negative "": latents, then the image."""
    from tests.fixtures import make_torch_kandinsky5_t2i
    from xdit_jax.pipelines.kandinsky5_t2i import Kandinsky5T2IPipeline

    tp = make_torch_kandinsky5_t2i()
    tp.resolutions = [(32, 32)]  # (diffusers snaps other sizes to its list: 1024 x 1024 for a square)
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("kandinsky5_t2i"))
    ours = Kandinsky5T2IPipeline.from_pretrained(converted_folder(folder, cache_dir=tmp_path_factory.mktemp("c")))
    ours.resolutions = ((32, 32),)
    lat = np.random.default_rng(3).standard_normal((1, 1, 4, 4, 4)).astype(np.float32)
    kw = dict(height=32, width=32, num_inference_steps=STEPS)
    with torch.no_grad():
        ref = tp(PROMPT, latents=torch.from_numpy(lat.copy()), output_type="latent", **kw).image.numpy()
        ref_img = np.asarray(tp(PROMPT, latents=torch.from_numpy(lat.copy()), output_type="np", **kw).image)
    out = ours(PROMPT, latents=lat, output_type="latent", progress=False, **kw).images
    assert out.shape == ref.shape == (1, 1, 4, 4, 4)
    # measured 8.7e-5 of 6.9 in 2 of 64 entries, ~3e-6 elsewhere: a q / k entry rounded to the other bfloat16
    # neighbour after the RoPE (diffusers rounds them so; the fp32 inputs differ by ulps) moves a few outputs by ~1e-4
    np.testing.assert_allclose(out, ref, atol=3e-5 * np.abs(ref).max(), rtol=0)
    img = ours(PROMPT, latents=lat, progress=False, **kw).images
    assert img.shape == ref_img.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(img, ref_img, atol=1e-4, rtol=0)  # (measured 3.1e-5)
