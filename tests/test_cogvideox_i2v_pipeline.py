"""CogVideoX image-to-video through CogVideoXImageToVideoPipeline == diffusers' CogVideoXImageToVideoPipeline: 5B-I2V's
layout (the image's latents beside the noise, a learned positional table) and 1.5-I2V's (ofs, patch_size_t's padding
frame, invert_scale_latents); on one device and on meshes (8 simulated CPU devices)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_pipeline, random_image, save_torch_pipeline
from xdit_jax.pipelines.cogvideox import CogVideoXImageToVideoPipeline
from xdit_jax.pipelines.denoise import converted_folder

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, F, STEPS, MSL = 64, 96, 9, 3, 16  # 5B-I2V's learned table: the tiny config's sample size (8 x 12 latents)

_BUILT = {}


def _mode_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def build(tmp_path_factory, variant: str):
    """(torch pipeline, our one-device pipeline, our converted folder), made once per variant. Both sides take the
    image latents' mode (no sampling noise): diffusers' sample uses torch's generator, ours JAX's."""
    if variant not in _BUILT:
        tp = make_torch_pipeline(variant)
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp(f"cogvideox-{variant}")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
        pipe._image_noise = lambda shape, rng: jnp.zeros(shape, jnp.float32)
        _BUILT[variant] = (tp, pipe, folder)
    return _BUILT[variant]


def _image(seed, size=(W, H)):
    return random_image(seed, size)


def _latents(variant, batch=1, seed=0):
    frames = 3 if variant == "5b-i2v" else 4  # 1.5: 3 latent frames padded to 4 (patch_size_t 2)
    return np.random.default_rng(seed).standard_normal((batch, frames, 4, H // 8, W // 8)).astype(np.float32)


def _diffusers(tp, image, lat, output_type, monkeypatch, **kw):
    from diffusers.pipelines.cogvideo import pipeline_cogvideox_image2video

    monkeypatch.setattr(pipeline_cogvideox_image2video, "retrieve_latents", _mode_latents)
    with torch.no_grad():
        out = tp(image=image, prompt=PROMPT, negative_prompt=NEG, num_frames=F, height=H, width=W,
                 num_inference_steps=STEPS, latents=torch.from_numpy(lat), max_sequence_length=MSL,
                 output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, lat, output_type="np", prompt=PROMPT, **kw):
    return pipe(image, prompt, NEG, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
                max_sequence_length=MSL, output_type=output_type, progress=False, **kw).frames


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_matches_diffusers(variant, tmp_path_factory, monkeypatch):
    """The video (a PIL image of another size, resized as diffusers does) and the latents; 1.5's padding frame in
    front is dropped before decoding, as diffusers'."""
    tp, ours, _ = build(tmp_path_factory, variant)
    image, lat = _image(0, (80, 48)), _latents(variant, seed=1)
    ref = _diffusers(tp, image, lat, "np", monkeypatch, guidance_scale=6.0)
    out = _ours(ours, image, lat, guidance_scale=6.0)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # fp32 both sides; 1e-4 is ~1/40 of an 8-bit level
    ref_lat = _diffusers(tp, image, lat, "latent", monkeypatch, guidance_scale=4.0, use_dynamic_cfg=True)
    out_lat = _ours(ours, image, lat, "latent", guidance_scale=4.0, use_dynamic_cfg=True)
    np.testing.assert_allclose(out_lat, ref_lat, atol=2e-5 * np.abs(ref_lat).max(), rtol=0)
    # the image matters (its latents enter every step)
    other = _ours(ours, _image(9, (80, 48)), lat, "latent", guidance_scale=4.0, use_dynamic_cfg=True)
    assert np.abs(other - out_lat).max() > 1e-3 * np.abs(out_lat).max()


def test_image_latents_are_sampled(tmp_path_factory):
    """Without the test's override the image latents are a sample of the VAE's distribution (diffusers'
    ``latent_dist.sample``): mean + std x a normal draw of the call's key, scaled; other keys, other draws."""
    _, _, folder = build(tmp_path_factory, "5b-i2v")
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder)
    import jax

    from xdit_jax.models import vae_cogvideox_encoder
    from xdit_jax.pipelines.denoise import preprocess_image

    shape = (1, 3, 4, H // 8, W // 8)
    a, b = (np.asarray(pipe.image_condition(_image(1), shape, jax.random.key(s))) for s in (0, 1))
    assert np.abs(a - b).max() > 0 and np.all(a[:, 1:] == 0) and np.all(b[:, 1:] == 0)
    # frame 0 = scaling_factor * (mean + std * N(0, 1) drawn from the key): diffusers' sample, our draw
    mean, logvar = vae_cogvideox_encoder.encode(pipe.vae_encoder, preprocess_image(_image(1), H, W)[:, :, None])
    want = vae_cogvideox_encoder.sample(mean, logvar, jax.random.normal(jax.random.key(0), mean.shape))
    want = np.asarray(want).transpose(0, 2, 1, 3, 4) * pipe.vae_config.scaling_factor
    np.testing.assert_allclose(a[:, :1], want, atol=1e-5 * np.abs(want).max(), rtol=0)


# (PipeFusion with an image condition: test_wan22_pipeline's I2V data=2,pipefusion=2 in the default run)
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2", pytest.param("data=2,pipefusion=2", marks=pytest.mark.slow)])
def test_meshes_match_one_device(mesh, tmp_path_factory):
    """Two prompts on one image; PipeFusion with every step a warm-up step (exact)."""
    _, ours, folder = build(tmp_path_factory, "5b-i2v")
    kw = dict(prompt=[PROMPT, "A cat."], guidance_scale=6.0)
    lat = _latents("5b-i2v", batch=2, seed=2)
    ref = _ours(ours, _image(3), lat, "latent", **kw)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=STEPS)
    pipe._image_noise = ours._image_noise
    np.testing.assert_allclose(_ours(pipe, _image(3), lat, "latent", **kw), ref, atol=2e-5 * np.abs(ref).max(),
                               rtol=0)


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory, "5b-i2v")
    with pytest.raises(ValueError, match="needs an image"):
        ours(prompt=PROMPT, num_frames=F, height=H, width=W)
    with pytest.raises(ValueError, match="learned positional table"):
        ours(_image(0), PROMPT, num_frames=F, height=H, width=W + 16)
    with pytest.raises(ValueError, match="max_sequence_length=16"):  # (before any encoding)
        ours(_image(0), PROMPT, num_frames=F, height=H, width=W, max_sequence_length=8)
    with pytest.raises(ValueError, match="resize it first"):
        ours(np.zeros((8, 8, 3), np.uint8), PROMPT, num_frames=F, height=H, width=W, max_sequence_length=MSL)
    from xdit_jax.pipelines.cogvideox import CogVideoXPipeline

    with pytest.raises(ValueError, match="not CogVideoXImageToVideoPipeline; load it with xdit_jax.CogVideoXPipeline"):
        CogVideoXImageToVideoPipeline.from_pretrained(converted_folder(
            save_torch_pipeline(make_torch_pipeline("5b"), tmp_path_factory.mktemp("t2v"))))
    with pytest.raises(ValueError, match="holds a CogVideoXImageToVideoPipeline pipeline, not CogVideoXPipeline; "
                                         "load it with xdit_jax.CogVideoXImageToVideoPipeline"):
        CogVideoXPipeline.from_pretrained(folder)
