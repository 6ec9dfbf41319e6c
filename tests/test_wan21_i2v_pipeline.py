"""Wan 2.1 image-to-video through WanImageToVideoPipeline == diffusers' WanImageToVideoPipeline: I2V-14B's layout (the
image's CLIP states cross-attended with their own K/V, the VAE-encoded first frame beside the noise) and FLF2V-14B's
(first and last frames; two images' CLIP states with a position table); on one device and on meshes (8 simulated CPU
devices)."""

import json

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_wan, random_image, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.wan import WanImageToVideoPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, F, STEPS = 32, 48, 9, 4  # 3 latent frames of 4 x 6
MSL = 512  # diffusers' Wan attention splits image from text states assuming 512 caption tokens

_BUILT = {}


def build(tmp_path_factory, variant: str):
    """(torch pipeline, our one-device pipeline, our converted folder), made once per variant."""
    if variant not in _BUILT:
        from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

        # diffusers' I2V module calls ftfy unguarded (not installed here); its T2V module's prompt_clean is the same
        # function with the guard (and the one ours matches)
        pipeline_wan_i2v.prompt_clean = pipeline_wan.prompt_clean
        tp = make_torch_wan(variant=variant)
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp(f"wan-{variant}")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[variant] = (tp, WanImageToVideoPipeline.from_pretrained(folder), folder)
    return _BUILT[variant]


def _image(seed, size=(W, H)):
    return random_image(seed, size)


def _latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, 3, H // 8, W // 8)).astype(np.float32)


def _diffusers(tp, image, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(image=image, prompt=PROMPT, negative_prompt=NEG, num_frames=F, height=H, width=W,
                 num_inference_steps=STEPS, latents=torch.from_numpy(lat), max_sequence_length=MSL,
                 output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, lat, output_type="np", prompt=PROMPT, **kw):
    return pipe(image, prompt, NEG, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
                max_sequence_length=MSL, output_type=output_type, progress=False, **kw).frames


def test_i2v_matches_diffusers(tmp_path_factory):
    """The video; the CLIP states == diffusers' encode_image; the latents with CLIP states given (image_embeds)."""
    tp, ours, folder = build(tmp_path_factory, "i2v-2.1")
    assert (folder / "image_processor" / "preprocessor_config.json").is_file()  # copied by the conversion
    image, lat = _image(0, (40, 24)), _latents(seed=1)  # (another size: resized for the VAE, cropped for CLIP)
    ref = _diffusers(tp, image, lat, "np", guidance_scale=5.0)
    out = _ours(ours, image, lat, guidance_scale=5.0)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)  # fp32 both sides; 1e-4 is ~1/40 of an 8-bit level
    with torch.no_grad():
        states = tp.encode_image(image, torch.device("cpu"))  # (1, 5, 16): hidden_states[-2]
    np.testing.assert_allclose(np.asarray(ours.encode_image([image])), states.numpy(), atol=1e-5, rtol=0)
    embeds = np.random.default_rng(2).standard_normal(tuple(states.shape)).astype(np.float32)
    # (diffusers refuses image and image_embeds together, yet needs the image for the VAE: its encoder returns them)
    tp.encode_image = lambda *a, **k: torch.from_numpy(embeds)
    try:
        ref_lat = _diffusers(tp, image, lat, "latent", guidance_scale=4.0)
    finally:
        del tp.encode_image
    out_lat = _ours(ours, image, lat, "latent", guidance_scale=4.0, image_embeds=embeds[0])
    np.testing.assert_allclose(out_lat, ref_lat, atol=2e-5 * np.abs(ref_lat).max(), rtol=0)
    # the CLIP states matter: the image's own give other latents
    assert np.abs(_ours(ours, image, lat, "latent", guidance_scale=4.0) - ref_lat).max() > 1e-3 * np.abs(ref_lat).max()


def test_image_inputs_reach_clip_as_diffusers_makes_them(tmp_path_factory):
    """A float array in [0, 1] next to a PIL image (FLF2V's two frames) gives the PIL image's CLIP states (each
    rescaled by itself); a transparent PNG is put on white first, as transformers' convert_to_rgb does."""
    from PIL import Image

    _, ours, _ = build(tmp_path_factory, "flf2v")
    first, last = _image(5), _image(6)
    ref = np.asarray(ours.encode_image([first, last]))
    mixed = np.asarray(ours.encode_image([first, np.asarray(last, np.float32) / 255.0]))
    np.testing.assert_allclose(mixed, ref, atol=1e-6, rtol=0)
    rgba = first.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)))
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    np.testing.assert_allclose(np.asarray(ours.encode_image([rgba, last])),
                               np.asarray(ours.encode_image([white, last])), atol=1e-6, rtol=0)


def test_flf2v_matches_diffusers(tmp_path_factory):
    """First and last frames (PIL, other sizes): the VAE condition of both and the two images' CLIP states side by
    side with the image embedder's position table; the encoder saved WithProjection (its projection unused)."""
    tp, ours, _ = build(tmp_path_factory, "flf2v")
    assert ours.transformer_config.pos_embed_seq_len == 10
    first, last, lat = _image(3, (64, 40)), _image(4, (40, 24)), _latents(seed=5)
    ref = _diffusers(tp, first, lat, "latent", last_image=last, guidance_scale=5.0)
    out = _ours(ours, first, lat, "latent", last_image=last, guidance_scale=5.0)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


# (PipeFusion with an image condition: test_wan22_pipeline's I2V data=2,pipefusion=2 in the default run)
@pytest.mark.parametrize("mesh", ["cfg=2,ulysses=2", pytest.param("data=2,pipefusion=2", marks=pytest.mark.slow)])
def test_meshes_match_one_device(mesh, tmp_path_factory):
    """Two prompts (data=2: one each) on one image; PipeFusion with every step a warm-up step (exact: its patched
    steps would see one-step-old K/V, by design)."""
    _, ours, folder = build(tmp_path_factory, "i2v-2.1")
    kw = dict(prompt=[PROMPT, "A cat."], guidance_scale=4.0)
    lat = _latents(batch=2, seed=6)
    ref = _ours(ours, _image(7), lat, "latent", **kw)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=STEPS)
    np.testing.assert_allclose(_ours(pipe, _image(7), lat, "latent", **kw), ref, atol=2e-5 * np.abs(ref).max(),
                               rtol=0)


def test_bad_input(tmp_path_factory):
    _, i2v, folder = build(tmp_path_factory, "i2v-2.1")
    _, flf2v, _ = build(tmp_path_factory, "flf2v")
    kw = dict(num_frames=F, height=H, width=W)
    with pytest.raises(ValueError, match="give last_image too"):
        flf2v(_image(0), PROMPT, **kw)
    with pytest.raises(ValueError, match="need the FLF2V model"):
        i2v(_image(0), PROMPT, last_image=_image(1), **kw)
    with pytest.raises(ValueError, match="image_embeds"):
        i2v(_image(0), PROMPT, image_embeds=np.zeros((6, 16), np.float32), **kw)
    with pytest.raises(ValueError, match="num_frames >= 5"):
        flf2v(_image(0), PROMPT, last_image=_image(1), **dict(kw, num_frames=3))
    with pytest.raises(ValueError, match="uint8"):
        i2v(np.zeros((H, W, 3), np.int64), PROMPT, **kw)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        i2v(np.full((H, W, 3), 2.0, np.float32), PROMPT, **kw)
    with pytest.raises(ValueError, match="image_encoder"):
        WanImageToVideoPipeline(vae_encoder=i2v.vae_encoder, transformer=i2v.transformer,
                                transformer_config=i2v.transformer_config, vae=i2v.vae, vae_config=i2v.vae_config,
                                text_encoder=i2v.text_encoder, tokenizer=i2v.tokenizer,
                                scheduler_config=i2v.scheduler_config)
    # a converted folder without the image processor: a clear error, not a crash inside transformers
    index = json.loads((folder / "model_index.json").read_text())
    moved = folder / "image_processor.moved"
    (folder / "image_processor").rename(moved)
    try:
        from xdit_jax.safetensors_io import CheckpointError

        with pytest.raises(CheckpointError, match="image_processor is missing"):
            WanImageToVideoPipeline.from_pretrained(folder)
    finally:
        moved.rename(folder / "image_processor")
    assert json.loads((folder / "model_index.json").read_text()) == index
