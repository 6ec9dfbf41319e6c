"""The Mochi pipeline from a diffusers save_pretrained folder == diffusers' MochiPipeline, on one device and on
meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_mochi, save_torch_pipeline, step_compiles_once
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.mochi import MochiPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
F, H, W, STEPS, MSL = 7, 32, 48, 3, 16  # 2 x 4 x 6 latents: 12 video tokens after the 2x2 patches

_BUILT = {}


def build(tmp_path_factory, force_zeros: bool = False):
    """(torch pipeline, our pipeline, our converted folder), made once per setting."""
    if force_zeros not in _BUILT:
        tp = make_torch_mochi(force_zeros_for_empty_prompt=force_zeros)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"mochi-{force_zeros}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[force_zeros] = (tp, MochiPipeline.from_pretrained(converted), converted)
    return _BUILT[force_zeros]


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 12, (F - 1) // 6 + 1, H // 8, W // 8)).astype(
        np.float32)


def _diffusers(tp, prompt, lat, output_type, num_frames=F, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, num_frames=num_frames, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def test_video_matches_diffusers(tmp_path_factory):
    tp, ours, _ = build(tmp_path_factory)
    lat = initial_latents()
    # 8 frames asked, as diffusers takes any count: 2 latent frames, a 7-frame video on both sides
    ref = _diffusers(tp, PROMPT, lat, "np", num_frames=F + 1, negative_prompt=NEG, guidance_scale=4.5)
    out = ours(PROMPT, NEG, num_frames=F + 1, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, guidance_scale=4.5, progress=False).frames
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # fp32 both sides: 3 steps with CFG, then the causal VAE; pixels in [0, 1]. 1e-4 is ~1/40 of an 8-bit
    # level, while a wrong caption mask, schedule or latent unscaling moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("force_zeros", [False, True])
def test_latents_match_diffusers_batch(force_zeros, tmp_path_factory):
    """Two prompts, the default empty negative prompt; with force_zeros_for_empty_prompt the negative
    captions are zero ids with an empty mask (diffusers' rule); two videos a prompt without it
    (num_videos_per_prompt, as diffusers' run of each prompt twice: its own repeats the masks in another
    order than the embeddings)."""
    tp, ours, _ = build(tmp_path_factory, force_zeros)
    prompts = [PROMPT, "A cat."]
    per = 1 if force_zeros else 2
    lat = initial_latents(batch=2 * per, seed=1)
    ref = _diffusers(tp, [p for p in prompts for _ in range(per)], lat, "latent", guidance_scale=4.5)
    out = ours(prompts, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, output_type="latent", progress=False, num_videos_per_prompt=per).frames
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# The single-axis meshes are slow-marked: the combined mesh covers their axes here, and the transformer's
# tests run every mesh; `pytest -m slow` runs them.
SLOW = pytest.mark.slow
# data, cfg and ring in one mesh (three prompts: data=2 pads the batch to 4, each CFG half on its cfg group) and
# ulysses=3 run by default; the meshes they replace are slow-marked too (ulysses with ring: the transformer's tests).
# (data=2,cfg=2,ring=2 slow for the default run's time: data x cfg x ring runs by default in FLUX's and Wan's tests)
MESHES = ["ulysses=3", pytest.param("data=2,cfg=2,ring=2", marks=SLOW),
          pytest.param("cfg=2,ulysses=2,ring=2", marks=SLOW),
          pytest.param("data=2,ring=2", marks=SLOW),
          pytest.param("cfg=2", marks=SLOW), pytest.param("ulysses=2", marks=SLOW), pytest.param("ring=2", marks=SLOW)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(mesh, tmp_path_factory, caplog):
    """The mesh run == one device up to float rounding, its step compiled once (step 0 and 1 share it)."""
    _, ours, folder = build(tmp_path_factory)
    batch = 3 if "data=2" in mesh else 1  # 3 prompts: data=2 pads the transformer's batch to 4
    prompts = [PROMPT, "A cat.", "A red car."][:batch]
    kw = dict(num_frames=F, height=H, width=W, num_inference_steps=2, latents=initial_latents(batch=batch, seed=2),
              max_sequence_length=MSL, progress=False)
    ref = ours(prompts, **kw).frames
    pipe = MochiPipeline.from_pretrained(folder, mesh=mesh)
    with step_compiles_once(caplog):
        out = pipe(prompts, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    with pytest.raises(ValueError, match="pipefusion=2 is more stages than the model's 1 layers"):  # 1 stacked
        MochiPipeline.from_pretrained(folder, mesh="pipefusion=2")
    with pytest.raises(ValueError, match="num_steps >= 2"):  # diffusers divides by zero there
        ours(PROMPT, num_frames=F, height=H, width=W, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        ours(PROMPT, num_frames=0, height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, num_frames=F, height=40, width=W)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), num_frames=F, height=H, width=W)
    with pytest.raises(ValueError, match=r"this model takes \(batch, tokens, 32\)"):
        ours(prompt_embeds=np.zeros((1, MSL, 8), np.float32), prompt_attention_mask=np.ones((1, MSL)),
             num_frames=F, height=H, width=W, guidance_scale=1.0)


def test_caption_mask_checks(tmp_path_factory, caplog):
    """A negative mask of the wrong shape is refused; a non-prefix mask runs with a warning."""
    import logging

    _, ours, _ = build(tmp_path_factory)
    emb, mask = np.zeros((1, MSL, 32), np.float32), np.ones((1, MSL), np.int64)
    with pytest.raises(ValueError, match="negative_prompt_embeds .* with mask"):
        ours(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=emb,
             negative_prompt_attention_mask=mask[:, :-1], num_frames=F, height=H, width=W)
    holes = mask.copy()
    holes[0, 2] = 0
    with caplog.at_level(logging.WARNING):
        ours(prompt_embeds=emb, prompt_attention_mask=holes, num_frames=F, height=H, width=W, guidance_scale=1.0,
             num_inference_steps=2, output_type="latent", progress=False)
    assert any("keeps tokens after a masked one" in r.getMessage() for r in caplog.records)
