"""ChronoEdit through ChronoEditPipeline == diffusers' ChronoEditPipeline (tiny random weights, fp32): the transformer
(its RoPE: two frames at positions 0 and rope_temporal_skip_len - 1, ChronoEdit's split of a head dim of 16), the
edit's latents after 2 steps (2 latent frames), temporal reasoning (the cut to the end frames mid-way, UniPC's history
cut too; and the whole video decoded where no step follows the reasoning steps), meshes == one device."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_chronoedit, random_image, save_torch_pipeline
from xdit_jax.pipelines.chronoedit import ChronoEditPipeline
from xdit_jax.pipelines.denoise import converted_folder

PROMPT = "Add a small hat to the dog."
NEG = "blurry, low quality"
H, W, STEPS = 32, 48, 2  # latents of 4 x 6
MSL = 512  # diffusers' Wan attention splits image from text states assuming 512 caption tokens

_BUILT = {}


def build(tmp_path_factory):
    """(torch pipeline, our one-device pipeline, our converted folder), made once."""
    if not _BUILT:
        tp = make_torch_chronoedit()
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("chronoedit")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["parts"] = (tp, ChronoEditPipeline.from_pretrained(folder), folder)
    return _BUILT["parts"]


def _latents(frames=2, batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, frames, H // 8, W // 8)).astype(np.float32)


def _diffusers(tp, image, lat, output_type="latent", steps=STEPS, **kw):
    with torch.no_grad():
        out = tp(image=image, prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_inference_steps=steps,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, lat, output_type="latent", steps=STEPS, prompt=PROMPT, **kw):
    return pipe(image, prompt, NEG, height=H, width=W, num_inference_steps=steps, latents=lat,
                max_sequence_length=MSL, output_type=output_type, progress=False, **kw)


def test_edit_matches_diffusers(tmp_path_factory):
    """The edit's latents after 2 steps with CFG (2 latent frames: RoPE frame positions 0 and 4; ChronoEdit's split of
    a head dim of 16); the input image of another size (resized for the VAE). The caption and CLIP states are given
    (UMT5's and CLIP's encoders are Wan's, tested in tests/test_wan21_i2v_pipeline.py; they are left out here for the
    default run's time; test_edited_image_matches_diffusers runs them)."""
    tp, ours, _ = build(tmp_path_factory)
    rng = np.random.default_rng(3)
    pe, ne = (rng.standard_normal((1, MSL, 32)).astype(np.float32) for _ in range(2))
    ie = rng.standard_normal((1, 5, 16)).astype(np.float32)
    image, lat = random_image(0, (40, 24)), _latents(seed=1)
    # (diffusers refuses image and image_embeds together, yet needs the image for the VAE: its encoder returns them)
    tp.encode_image = lambda *a, **k: torch.from_numpy(ie)
    try:
        with torch.no_grad():
            ref = tp(image=image, prompt_embeds=torch.from_numpy(pe), negative_prompt_embeds=torch.from_numpy(ne),
                     height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                     output_type="latent", guidance_scale=5.0).frames.numpy()
    finally:
        del tp.encode_image
    out = ours(image, prompt_embeds=pe, negative_prompt_embeds=ne, image_embeds=ie[0], height=H, width=W,
               num_inference_steps=STEPS, latents=lat, output_type="latent", guidance_scale=5.0, progress=False)
    assert out.images is None and out.frames.shape == ref.shape == (1, 4, 2, H // 8, W // 8)
    np.testing.assert_allclose(out.frames, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)  # measured 2.1e-6 of 3.2


@pytest.mark.slow
def test_transformer_matches_diffusers(tmp_path_factory):
    """The transformer on 2 latent frames (RoPE frame positions 0 and rope_temporal_skip_len - 1) and on 3 (0, 1, 2),
    jitted; its RoPE is not Wan's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdit_jax.models import chronoedit, wan

    tp, ours, _ = build(tmp_path_factory)
    graphdef, state = nnx.split(ours.transformer)
    fwd = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    rng = np.random.default_rng(3)
    for frames in (2, 3):
        x = rng.standard_normal((1, 12, frames, 4, 6)).astype(np.float32)
        text = rng.standard_normal((1, MSL, 32)).astype(np.float32)
        img = rng.standard_normal((1, 5, 16)).astype(np.float32)
        with torch.no_grad():
            ref = tp.transformer(torch.from_numpy(x), torch.tensor([700.0]), torch.from_numpy(text),
                                 torch.from_numpy(img), return_dict=False)[0].numpy()
        out = np.asarray(fwd(state, jnp.asarray(x), jnp.float32(700.0), jnp.asarray(text), jnp.asarray(img)))
        np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)  # measured 4.8e-7 of 1.7
    tc = ours.transformer_config
    assert not np.allclose(chronoedit.rope_table(tc, 2, 2, 3)[0], wan.rope_table(tc, 2, 2, 3)[0])


@pytest.mark.slow
def test_edited_image_matches_diffusers(tmp_path_factory):
    """The decoded video (5 frames) == diffusers' frames; images = its last frame, the edit."""
    tp, ours, _ = build(tmp_path_factory)
    image, lat = random_image(2, (W, H)), _latents(seed=4)
    ref = _diffusers(tp, image, lat, "np", guidance_scale=4.0)
    out = _ours(ours, image, lat, "np", guidance_scale=4.0)
    assert out.frames.shape == ref.shape == (1, 5, H, W, 3)
    np.testing.assert_allclose(out.frames, ref, atol=1e-4, rtol=0)  # fp32 both sides; ~1/40 of an 8-bit level
    np.testing.assert_array_equal(out.images, out.frames[:, -1])


@pytest.mark.slow
def test_temporal_reasoning_matches_diffusers(tmp_path_factory):
    """num_frames=13 (4 latent frames): 1 reasoning step, then the end frames (the UniPC history cut with them) for
    2 more; and 3 reasoning steps of 3: no cut, the whole video decoded (diffusers' video_reason + video_edit)."""
    tp, ours, _ = build(tmp_path_factory)
    image, lat = random_image(5, (W, H)), _latents(frames=4, seed=6)
    kw = dict(num_frames=13, guidance_scale=4.0, enable_temporal_reasoning=True)
    ref = _diffusers(tp, image, lat, steps=3, num_temporal_reasoning_steps=1, **kw)
    out = _ours(ours, image, lat, steps=3, num_temporal_reasoning_steps=1, **kw).frames
    assert out.shape == ref.shape == (1, 4, 2, H // 8, W // 8)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    ref = _diffusers(tp, image, lat, "np", steps=2, num_temporal_reasoning_steps=2, **kw)
    out = _ours(ours, image, lat, "np", steps=2, num_temporal_reasoning_steps=2, **kw)
    assert out.frames.shape == ref.shape == (1, 13, H, W, 3)
    np.testing.assert_allclose(out.frames, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, reasoning", [("cfg=2,ulysses=2", False), ("ring=2,ulysses=2", True),
                                             ("data=2,pipefusion=2", True)])
def test_meshes_match_one_device(mesh, reasoning, tmp_path_factory):
    """Two prompts on one image; with temporal reasoning the cut mid-way (PipeFusion: new K/V buffers, every step a
    warm-up step: exact)."""
    _, ours, folder = build(tmp_path_factory)
    kw = dict(prompt=[PROMPT, "A cat."], guidance_scale=4.0, steps=3)
    if reasoning:
        kw.update(num_frames=9, enable_temporal_reasoning=True, num_temporal_reasoning_steps=1)
    lat = _latents(frames=3 if reasoning else 2, batch=2, seed=7)
    ref = _ours(ours, random_image(8, (W, H)), lat, **kw).frames
    pipe = ChronoEditPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=3)
    out = _ours(pipe, random_image(8, (W, H)), lat, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_bad_input(tmp_path_factory):
    """Refused before any heavy work (the latents' shape: after the image's VAE encode, compiled by the test above)."""
    _, ours, _ = build(tmp_path_factory)
    image = random_image(0, (W, H))
    kw = dict(height=H, width=W, max_sequence_length=MSL)
    with pytest.raises(ValueError, match="give image="):
        ours(None, PROMPT, **kw)
    with pytest.raises(ValueError, match="enable_temporal_reasoning=True for a longer video"):
        ours(image, PROMPT, num_frames=9, **kw)
    with pytest.raises(ValueError, match="with enable_temporal_reasoning=True only"):
        ours(image, PROMPT, num_temporal_reasoning_steps=2, **kw)
    with pytest.raises(ValueError, match="must be an int >= 0"):
        ours(image, PROMPT, enable_temporal_reasoning=True, num_temporal_reasoning_steps=-1, **kw)
    with pytest.raises(ValueError, match="takes one image"):
        ours(image, PROMPT, last_image=image, **kw)
    with pytest.raises(ValueError, match="multiples"):
        ours(image, PROMPT, height=40, width=W, max_sequence_length=MSL)
    with pytest.raises(ValueError, match="latents have shape"):
        ours(image, prompt_embeds=np.zeros((1, MSL, 32), np.float32), image_embeds=np.zeros((5, 16), np.float32),
             guidance_scale=1.0, latents=_latents(frames=3), **kw)


@pytest.mark.slow
def test_cli(tmp_path, capsys, monkeypatch):
    """generate.py: --model tiny-chronoedit (made in a fresh cache) with --image writes the edit as a PNG of the tiny
    default size, on cfg=2; --image is required; a configs folder with --random-weights runs too."""
    from PIL import Image

    from xdit_jax import cli, tiny

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "in.png"
    random_image(9, (40, 24)).save(image)
    out = tmp_path / "edit.png"
    base = ["--model", "tiny-chronoedit", "--no-progress", "--output", str(out)]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(base))
    assert e.value.code == 2 and "give the image to edit with --image" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(image), "--mesh", "cfg=2", "--json"]) == 0
    assert Image.open(out).size == (48, 32)
    assert '"model_family": "chronoedit"' in capsys.readouterr().out
    configs = tiny.write_chronoedit_configs(tmp_path / "chronoedit")
    assert cli.main(["--model", str(configs), "--random-weights", "--image", str(image), "--steps", "2", "--height",
                     "16", "--width", "32", "--max-sequence-length", "16", "--no-progress", "--overwrite",
                     "--output", str(out)]) == 0
    assert Image.open(out).size == (32, 16)
