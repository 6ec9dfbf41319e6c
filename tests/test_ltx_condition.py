"""LTX-Video's condition pipeline == diffusers' LTXConditionPipeline (tiny random weights, the same random draws on
both sides: diffusers' ``randn_tensor`` and posterior samples are handed this pipeline's JAX draws), and its run on a
mesh == one device."""

import jax
import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_ltx, random_image, torch_and_our_pipeline
from xdit_jax.pipelines import ltx_condition
from xdit_jax.pipelines.ltx_condition import LTXConditionPipeline, LTXVideoCondition

PROMPT = "A small dog running on a beach at sunset."
SEED = 3
# 64 x 96 (2 x 3 latent tokens a frame); 2 steps; CFG with guidance_rescale; the image-condition noise on
CALL = dict(height=64, width=96, num_inference_steps=2, guidance_scale=3.0, guidance_rescale=0.3,
            max_sequence_length=16, frame_rate=24, image_cond_noise_scale=0.15)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return torch_and_our_pipeline(lambda: make_torch_ltx(condition=True), LTXConditionPipeline, tmp_path_factory,
                                  "ltx_condition")


def torch_with_our_draws(tp, monkeypatch, conds, num_frames, **kw):
    """diffusers' pipeline with its random draws replaced by ours, in its call order: the initial noise, each
    condition's posterior sample (``retrieve_latents``) and, for an appended one, its lerp noise, each step's
    image-condition noise. -> its latents (numpy, unpacked)."""
    from diffusers.pipelines.ltx import pipeline_ltx_condition as mod

    key = jax.random.key(SEED)
    posterior = iter(range(len(conds)))
    appended = iter([j for j, c in enumerate(conds) if c.frame_index != 0])
    steps = iter(range(CALL["num_inference_steps"]))
    calls = []

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        shape = tuple(shape)
        if calls.count("image_cond") == CALL["num_inference_steps"]:  # the decode's noise (decode_noise_scale 0 here)
            calls.append("decode")
            return torch.zeros(shape)
        if not calls:
            kind, idx = "initial", 0
        elif len(shape) == 5:
            kind, idx = "condition", next(appended)
        else:
            kind, idx = "image_cond", next(steps)
        calls.append(kind)
        return torch.from_numpy(np.asarray(ltx_condition.noise(key, kind, idx, shape)))

    def retrieve(enc, generator=None, sample_mode="sample"):
        dist = enc.latent_dist
        z = ltx_condition.noise(key, "posterior", next(posterior), tuple(dist.mean.shape))
        return dist.mean + dist.std * torch.from_numpy(np.asarray(z))

    monkeypatch.setattr(mod, "randn_tensor", randn)
    monkeypatch.setattr(mod, "retrieve_latents", retrieve)
    with torch.no_grad():
        kw = dict(CALL, **kw)
        if "prompt_embeds" not in kw:
            kw["prompt"] = PROMPT
        kw.setdefault("output_type", "latent")
        out = tp(conditions=conds, num_frames=num_frames, **kw).frames
    assert calls.count("image_cond") == CALL["num_inference_steps"]  # the image-condition noise was in use
    return out.numpy() if kw["output_type"] == "latent" else np.asarray(out)


@pytest.mark.slow  # (the default run: tests/test_ltx.py's condition test, on the image-to-video fixture's parts)
def test_image_condition_matches_diffusers_and_mesh(pipes, monkeypatch):
    """An image at frame 0 (diffusers' default use: the first latent frame blended, its tokens at timestep 0, never
    stepped, reset with the image-condition noise each step), 9 frames; then the same on cfg=2,ulysses=2."""
    tp, pipe, folder = pipes
    conds = [LTXVideoCondition(image=random_image(1, (96, 64)), frame_index=0)]
    ref = torch_with_our_draws(tp, monkeypatch, conds, 9)
    out = pipe(conditions=conds, prompt=PROMPT, num_frames=9, output_type="latent", seed=SEED, progress=False,
               **CALL).frames
    assert out.shape == ref.shape == (1, 8, 2, 2, 3)
    # float32 both sides, 2 steps: measured 1.5e-6 on latents up to 4.2 (assert_close_latents: 1e-5 of the scale)
    assert_close_latents(out, ref)
    par = LTXConditionPipeline.from_pretrained(folder, mesh="cfg=2,ulysses=2")
    out_par = par(conditions=conds, prompt=PROMPT, num_frames=9, output_type="latent", seed=SEED, progress=False,
                  **CALL).frames
    # the order of float32 sums (ulysses' all-to-all, the padded 12 -> 12 tokens): measured 4.8e-7
    np.testing.assert_allclose(out_par, out, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_video_condition_at_later_frame_matches_diffusers(pipes, monkeypatch):
    """A 17-frame video at frame 8 of 25 (strength 0.8): its first two latent frames appended as extra tokens with
    their own coordinates (lerped with noise), its third blended into the video's latent frame 3; with an image at
    frame 0 too (two conditions: three timestep groups)."""
    tp, pipe, _ = pipes
    frames = [random_image(10 + k, (96, 64)) for k in range(17)]
    conds = [LTXVideoCondition(image=random_image(1, (96, 64)), frame_index=0, strength=1.0),
             LTXVideoCondition(video=frames, frame_index=8, strength=0.8)]
    ref = torch_with_our_draws(tp, monkeypatch, conds, 25)
    out = pipe(conditions=conds, prompt=PROMPT, num_frames=25, output_type="latent", seed=SEED, progress=False,
               **CALL).frames
    assert out.shape == ref.shape == (1, 8, 4, 2, 3)
    assert_close_latents(out, ref)  # measured 1.9e-6 on latents up to 4.3
    # the decode of the video's tokens (the appended ones dropped) at decode_timestep 0.05, without decode noise
    dec = dict(decode_timestep=0.05, decode_noise_scale=0.0, output_type="np")
    ref = torch_with_our_draws(tp, monkeypatch, conds, 25, **dec)
    out = pipe(conditions=conds, prompt=PROMPT, num_frames=25, seed=SEED, progress=False, **CALL, **dec).frames
    assert out.shape == ref.shape == (1, 25, 64, 96, 3)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)  # frames in [0, 1]: float32 conv orderings


@pytest.mark.slow
def test_denoise_strength_matches_diffusers(pipes, monkeypatch):
    """Video-to-video editing: ``latents`` (the video to edit) mixed with the noise at the first sigma of a schedule
    started later by ``denoise_strength``; no condition (diffusers' per-token step still)."""
    from diffusers.pipelines.ltx import pipeline_ltx_condition as mod

    tp, pipe, _ = pipes
    key = jax.random.key(SEED)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(
        np.asarray(ltx_condition.noise(key, "initial", 0, tuple(shape)))))
    lat = np.random.default_rng(0).standard_normal((1, 8, 2, 2, 3)).astype(np.float32)
    kw = dict(CALL, num_inference_steps=4, num_frames=9, denoise_strength=0.6, output_type="latent")
    with torch.no_grad():
        ref = tp(prompt=PROMPT, latents=torch.from_numpy(lat), **kw).frames.numpy()
    out = pipe(prompt=PROMPT, latents=lat, seed=SEED, progress=False, **kw).frames
    assert_close_latents(out, ref)  # measured 6.3e-7 on latents up to 3.3


@pytest.mark.slow
def test_pipefusion(pipes):
    """PipeFusion over 2 stages with an image at frame 0 and a video at frame 8 (appended tokens, three timestep
    groups): every step a warm-up step equals one device; with 1 warm-up step (stale K/V in step 2) close."""
    _, pipe, folder = pipes
    frames = [random_image(10 + k, (96, 64)) for k in range(17)]
    conds = [LTXVideoCondition(image=random_image(1, (96, 64)), frame_index=0),
             LTXVideoCondition(video=frames, frame_index=8, strength=0.8)]
    kw = dict(CALL, conditions=conds, prompt=PROMPT, num_frames=25, output_type="latent", seed=SEED, progress=False)
    ref = pipe(**kw).frames
    exact = LTXConditionPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_warmup_steps=2)
    np.testing.assert_allclose(exact(**kw).frames, ref, atol=1e-5, rtol=0)  # measured 7.7e-7
    out = LTXConditionPipeline.from_pretrained(folder, mesh="cfg=2,pipefusion=2")(**kw).frames
    assert np.isfinite(out).all() and not np.allclose(out, ref, atol=1e-6)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()  # measured 1.7e-3 on latents up to 4.3


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ulysses=5", "cfg=2,ring=2,ulysses=2"])
def test_video_condition_mesh_equals_one_device(pipes, mesh):
    """The appended condition tokens and timestep groups sharded with the video's (36 tokens: ulysses=5 pads to 40)."""
    _, pipe, folder = pipes
    frames = [random_image(10 + k, (96, 64)) for k in range(17)]
    conds = [LTXVideoCondition(image=random_image(1, (96, 64)), frame_index=0),
             LTXVideoCondition(video=frames, frame_index=8, strength=0.8)]
    kw = dict(CALL, conditions=conds, prompt=PROMPT, num_frames=25, output_type="latent", seed=SEED, progress=False)
    out = LTXConditionPipeline.from_pretrained(folder, mesh=mesh)(**kw).frames
    np.testing.assert_allclose(out, pipe(**kw).frames, atol=1e-5, rtol=0)  # measured 4.8e-7 / 5.4e-7
