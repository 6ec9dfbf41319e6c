"""Wan 2.2 through WanPipeline == diffusers' WanPipeline: the two-expert A14B layout (transformer_2 switched in at
boundary_ratio, guidance_scale_2) and TI2V-5B's text-to-video (expand_timesteps, the Wan 2.2 VAE); on one device and
on meshes (8 simulated CPU devices)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_wan, random_image, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.wan import WanPipeline, expert_stages, pipeline_settings

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, MSL = 32, 48, 16
# A14B: 9 frames (3 latent frames of 4 x 6); 4 UniPC steps at shift 3 run at t = 999, 900, 750, 500: with
# boundary_ratio 0.875 the first two are the high-noise expert's, the last two the low-noise expert's.
F_A14B, STEPS = 9, 4
# TI2V (the tiny Wan 2.2 VAE: 2x temporal, 8x spatial with its patch): 5 frames -> 3 latent frames of 4 x 6.
F_TI2V = 5

_BUILT = {}


def build(tmp_path_factory, variant: str):
    """(torch pipeline, our pipeline, our converted folder), made once per variant."""
    if variant not in _BUILT:
        tp = make_torch_wan(variant=variant)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"wan-{variant}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[variant] = (tp, WanPipeline.from_pretrained(converted), converted)
    return _BUILT[variant]


def initial_latents(frames, temporal, batch=1, seed=0):
    shape = (batch, 4, (frames - 1) // temporal + 1, H // 8, W // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _diffusers(tp, lat, frames, output_type, **kw):
    with torch.no_grad():
        out = tp(prompt=PROMPT, negative_prompt=NEG, num_frames=frames, height=H, width=W,
                 num_inference_steps=STEPS, latents=torch.from_numpy(lat), max_sequence_length=MSL,
                 output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, lat, frames, output_type="np", steps=STEPS, **kw):
    return pipe(PROMPT, NEG, num_frames=frames, height=H, width=W, num_inference_steps=steps, latents=lat,
                max_sequence_length=MSL, output_type=output_type, progress=False, **kw).frames


def test_experts_switch_where_diffusers_does(tmp_path_factory):
    _, ours, _ = build(tmp_path_factory, "a14b")
    timesteps = ours.schedule(STEPS).timesteps
    assert ours.stages(timesteps) == [(0, 0), (2, 1)], timesteps
    assert expert_stages([999, 900, 875, 874, 500], 875.0) == [(0, 0), (3, 1)]  # t >= boundary: the first expert
    assert expert_stages([999, 500], None) == [(0, 0)]
    assert expert_stages([100, 50], 875.0) == [(0, 1)]  # all low-noise steps (e.g. a late start)


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_a14b_matches_diffusers(output_type, tmp_path_factory):
    """The high-noise expert with guidance 4 for two steps, the low-noise one with 3 for two (the model card's
    scales); the video (np) and, with the two experts swapped in guidance (latent), the latents."""
    tp, ours, _ = build(tmp_path_factory, "a14b")
    lat = initial_latents(F_A14B, 4)
    g, g2 = (4.0, 3.0) if output_type == "np" else (2.0, 6.0)
    ref = _diffusers(tp, lat, F_A14B, output_type, guidance_scale=g, guidance_scale_2=g2)
    out = _ours(ours, lat, F_A14B, output_type, guidance_scale=g, guidance_scale_2=g2)
    assert out.shape == ref.shape
    if output_type == "np":  # fp32 both sides; pixels in [0, 1]: 1e-4 is ~1/40 of an 8-bit level
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_low_noise_expert_is_used(tmp_path_factory):
    """Swapping the experts' parameters changes the latents (so transformer_2 really runs in the late steps)."""
    _, ours, _ = build(tmp_path_factory, "a14b")
    lat = initial_latents(F_A14B, 4, seed=5)
    ref = _ours(ours, lat, F_A14B, "latent", guidance_scale=4.0, guidance_scale_2=3.0)
    ours.transformer, ours.transformer_2 = ours.transformer_2, ours.transformer
    try:
        swapped = _ours(ours, lat, F_A14B, "latent", guidance_scale=4.0, guidance_scale_2=3.0)
    finally:
        ours.transformer, ours.transformer_2 = ours.transformer_2, ours.transformer
    assert np.abs(swapped - ref).max() > 1e-2 * np.abs(ref).max()


def test_ti2v_matches_diffusers(tmp_path_factory):
    """expand_timesteps (diffusers: one timestep per video token, all t) with the Wan 2.2 VAE (patch_size 2)."""
    tp, ours, _ = build(tmp_path_factory, "ti2v")
    assert ours.expand_timesteps and ours.vae_config.is_residual
    lat = initial_latents(F_TI2V, 2, seed=1)
    ref = _diffusers(tp, lat, F_TI2V, "np", guidance_scale=5.0)
    out = _ours(ours, lat, F_TI2V, guidance_scale=5.0)
    assert out.shape == ref.shape == (1, F_TI2V, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert ours.default_video() == {"height": 704, "width": 1280, "num_frames": 121, "fps": 24}


@pytest.mark.parametrize("variant,mesh,warmup", [("a14b", "cfg=2,ring=2", 1), ("a14b", "pipefusion=2", 2),
                                                 ("ti2v", "ulysses=2", 1)])
def test_meshes_match_one_device(variant, mesh, warmup, tmp_path_factory):
    """PipeFusion with 2 exact warm-up steps over 4 steps that switch experts at step 2: the warm-up starts again
    at the switch, so all four steps are exact and the latents equal one device's (with the warm-up only at the
    start, steps 2 and 3 would attend to the other expert's stale K/V)."""
    _, ours, folder = build(tmp_path_factory, variant)
    frames, temporal = (F_A14B, 4) if variant == "a14b" else (F_TI2V, 2)
    lat = initial_latents(frames, temporal, seed=2)
    kw = dict(guidance_scale=4.0, guidance_scale_2=3.0) if variant == "a14b" else dict(guidance_scale=5.0)
    output_type = "latent" if mesh.startswith("pipefusion") else "np"
    ref = _ours(ours, lat, frames, output_type, **kw)
    pipe = WanPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=warmup)
    out = _ours(pipe, lat, frames, output_type, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory, "a14b")
    _, one, _ = build(tmp_path_factory, "ti2v")  # (one transformer)
    with pytest.raises(ValueError, match="guidance_scale_2 is only for a two-expert pipeline"):
        one(PROMPT, num_frames=F_TI2V, height=H, width=W, guidance_scale_2=3.0)
    index = json.loads((folder / "model_index.json").read_text())
    with pytest.raises(ValueError, match="lists no transformer_2"):
        pipeline_settings({**index, "transformer_2": [None, None]}, folder)
    with pytest.raises(ValueError, match="within"):
        pipeline_settings({**index, "boundary_ratio": 1.5}, folder)
    with pytest.raises(ValueError, match="lists no transformer;"):
        pipeline_settings({**index, "transformer": [None, None]}, folder)
    assert pipeline_settings({**index, "boundary_ratio": None}, folder)["boundary_ratio"] is None  # (a warning)
    with pytest.raises(ValueError, match="share one architecture"):
        WanPipeline(transformer=ours.transformer, transformer_config=ours.transformer_config, vae=ours.vae,
                    vae_config=ours.vae_config, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                    scheduler_config=ours.scheduler_config, transformer_2=ours.transformer_2,
                    transformer_2_config=dataclasses.replace(ours.transformer_config, num_layers=1),
                    boundary_ratio=0.875)


# ------------------------------------------------------------------ image-to-video (Wan 2.2 I2V-A14B's layout)

def _image(seed, size=(W, H)):
    return random_image(seed, size)


def test_i2v_matches_diffusers(tmp_path_factory):
    """The first frame encoded by the VAE's encoder, the mask and its latents beside the noise at every step, two
    experts with their guidance scales: the video as diffusers' WanImageToVideoPipeline makes it."""
    from xdit_jax.pipelines.wan import WanImageToVideoPipeline

    tp, _, folder = build_i2v(tmp_path_factory)
    ours = WanImageToVideoPipeline.from_pretrained(folder)
    lat = initial_latents(F_A14B, 4, seed=3)
    image = _image(0)
    ref = _diffusers(tp, lat, F_A14B, "np", image=image, guidance_scale=4.0, guidance_scale_2=3.0)
    out = ours(image, PROMPT, NEG, num_frames=F_A14B, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, guidance_scale=4.0, guidance_scale_2=3.0, progress=False).frames
    assert out.shape == ref.shape == (1, F_A14B, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_i2v_last_image_and_resize_match_diffusers(tmp_path_factory):
    """First and last frames given, both PIL images of another size (resized as diffusers does), latents out."""
    tp, _, folder = build_i2v(tmp_path_factory)
    ours = _I2V["pipe"]
    lat = initial_latents(F_A14B, 4, seed=4)
    first, last = _image(1, (40, 24)), _image(2, (64, 40))
    ref = _diffusers(tp, lat, F_A14B, "latent", image=first, last_image=last, guidance_scale=5.0)
    out = ours(first, PROMPT, NEG, last_image=last, num_frames=F_A14B, height=H, width=W,
               num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL, guidance_scale=5.0,
               output_type="latent", progress=False).frames
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


# (cfg=2,ulysses=2 slow-marked for the default run's time: WanImageToVideoPipeline runs it in test_wan21_i2v_pipeline,
# the image condition over a mesh here in data=2,pipefusion=2; `pytest -m slow`)
@pytest.mark.parametrize("mesh", [pytest.param("cfg=2,ulysses=2", marks=pytest.mark.slow), "data=2,pipefusion=2"])
def test_i2v_meshes_match_one_device(mesh, tmp_path_factory):
    """Two prompts (data=2: one each) on one image; PipeFusion with warm-up 2 of 4 steps: exact."""
    from xdit_jax.pipelines.wan import WanImageToVideoPipeline

    _, _, folder = build_i2v(tmp_path_factory)
    prompts = [PROMPT, "A cat."]
    kw = dict(num_frames=F_A14B, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL,
              latents=initial_latents(F_A14B, 4, batch=2, seed=5), guidance_scale=4.0, guidance_scale_2=3.0,
              output_type="latent", progress=False)
    ref = _I2V["pipe"](_image(3), prompts, **kw).frames
    pipe = WanImageToVideoPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=2)
    out = pipe(_image(3), prompts, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_i2v_bad_input(tmp_path_factory):
    from xdit_jax.pipelines.wan import WanImageToVideoPipeline

    _, _, folder = build_i2v(tmp_path_factory)
    ours = _I2V["pipe"]
    with pytest.raises(ValueError, match="needs an image"):
        ours(prompt=PROMPT, num_frames=F_A14B, height=H, width=W)
    with pytest.raises(ValueError, match="resize it first"):
        ours(np.zeros((8, 8, 3), np.uint8), PROMPT, num_frames=F_A14B, height=H, width=W)
    with pytest.raises(ValueError, match="holds a text-to-video WanPipeline"):
        WanImageToVideoPipeline.from_pretrained(build(tmp_path_factory, "a14b")[2])
    # TI2V-5B's folder says WanPipeline (expand_timesteps): it loads for image-to-video too, as in diffusers
    assert WanImageToVideoPipeline.from_pretrained(build(tmp_path_factory, "ti2v")[2]).expand_timesteps
    with pytest.raises(ValueError, match="image_embeds are CLIP image states"):  # (Wan 2.1's, not this model's)
        ours(_image(0), PROMPT, image_embeds=np.zeros((5, 16), np.float32), num_frames=F_A14B, height=H, width=W)


def test_ti2v_image_to_video_matches_diffusers(tmp_path_factory):
    """TI2V-5B with an image (expand_timesteps): the image's latent frame in place of frame 0 at every step, its
    tokens at timestep 0, and in the result; the video as diffusers makes it, and on ring=2,ulysses=2 as on one
    device."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    from xdit_jax.pipelines.wan import WanImageToVideoPipeline

    pipeline_wan_i2v.prompt_clean = pipeline_wan.prompt_clean  # (see build_i2v)
    tp = make_torch_wan(variant="ti2v-image")
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("wan-ti2v-image")),
                              cache_dir=tmp_path_factory.mktemp("cache"))
    ours = WanImageToVideoPipeline.from_pretrained(folder)
    lat = initial_latents(F_TI2V, 2, seed=6)
    image = _image(4)
    ref = _diffusers(tp, lat, F_TI2V, "np", image=image, guidance_scale=5.0)
    kw = dict(num_frames=F_TI2V, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
              guidance_scale=5.0, progress=False)
    out = ours(image, PROMPT, NEG, **kw).frames
    assert out.shape == ref.shape == (1, F_TI2V, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # the latents too: the first frame's timestep reaches the later frames only through attention (here ~1e-3 of
    # the latents' scale, below the pixels' tolerance once decoded)
    ref_lat = _diffusers(tp, lat, F_TI2V, "latent", image=image, guidance_scale=5.0)
    out_lat = ours(image, PROMPT, NEG, output_type="latent", **kw).frames
    np.testing.assert_allclose(out_lat, ref_lat, atol=2e-5 * np.abs(ref_lat).max(), rtol=0)
    mesh = WanImageToVideoPipeline.from_pretrained(folder, mesh="ring=2,ulysses=2")
    np.testing.assert_allclose(mesh(image, PROMPT, NEG, **kw).frames, out, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="last_image is not taken by TI2V-5B"):
        ours(image, PROMPT, last_image=image, **kw)


_I2V = {}


def build_i2v(tmp_path_factory):
    """(torch pipeline, None, our converted folder) of the tiny I2V model, made once; our one-device pipeline in
    ``_I2V["pipe"]``."""
    if "tp" not in _I2V:
        from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

        from xdit_jax.pipelines.wan import WanImageToVideoPipeline

        # diffusers' I2V module calls ftfy unguarded (not installed here); its T2V module's prompt_clean is the same
        # function with the guard (and the one ours matches)
        pipeline_wan_i2v.prompt_clean = pipeline_wan.prompt_clean

        tp = make_torch_wan(variant="i2v")
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("wan-i2v"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _I2V.update(tp=tp, folder=converted, pipe=WanImageToVideoPipeline.from_pretrained(converted))
    return _I2V["tp"], None, _I2V["folder"]
