"""Cosmos-Predict2: the transformer == diffusers' CosmosTransformer3DModel, Cosmos2TextToImagePipeline and
Cosmos2VideoToWorldPipeline from diffusers save_pretrained folders == diffusers' (safety checker: a pass-through
stand-in there, none here), on one device and on meshes (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_cosmos, random_image, save_torch_cosmos
from xdit_jax.models import cosmos
from xdit_jax.pipelines.cosmos import DEFAULT_NEGATIVE_PROMPT, Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline
from xdit_jax.pipelines.denoise import converted_folder

PROMPT = "A robot arm picks up a red cube."
NEG = "blurry, low quality"
H, W, STEPS, MSL = 32, 32, 2, 16  # 4 x 4 latents: 4 tokens after the 1x2x2 patches (ulysses=3 pads them)
F = 9  # Video2World: 3 latent frames, the first 2 given by a 5-frame video

_BUILT = {}


def build(tmp_path_factory, v2w: bool):
    """(torch pipeline, our pipeline, our converted folder), made once per pipeline. Video2World on both sides takes
    the posterior's mode (diffusers' sample uses torch's generator, ours JAX's)."""
    if v2w not in _BUILT:
        tp = make_torch_cosmos(v2w=v2w)
        folder = save_torch_cosmos(tp, tmp_path_factory.mktemp("cosmos-v2w" if v2w else "cosmos"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        cls = Cosmos2VideoToWorldPipeline if v2w else Cosmos2TextToImagePipeline
        pipe = cls.from_pretrained(converted)
        if v2w:
            pipe._image_noise = lambda shape, rng: jnp.zeros(shape, jnp.float32)
        _BUILT[v2w] = (tp, pipe, converted)
    return _BUILT[v2w]


def _latents(frames=1, batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, frames, H // 8, W // 8)).astype(np.float32)


def _video(n=5):
    return [random_image(i, (W, H)) for i in range(n)]


def _mode(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def _close(out, ref, rel=1e-5):
    # fp32 both sides; latents O(1-3) after 2 Karras steps from sigma 80 (the velocity divides by sigma, so the
    # first step's rounding is that of 80-sized values: ~5e-6); a wrong preconditioning, CFG rule or mask moves them
    # by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=rel * np.abs(ref).max(), rtol=0)


@pytest.mark.slow  # (the default Video2World pipeline test runs this transformer on these inputs against diffusers')
def test_transformer_matches_diffusers(tmp_path_factory):
    """Video2World's transformer on its inputs: a timestep per latent frame, the condition mask, fps-scaled RoPE,
    the padding mask (a pixel-sized all-zero mask resized) and the learnable positions; a non-square grid."""
    tp, pipe, _ = build(tmp_path_factory, True)
    rng = np.random.default_rng(0)
    b, f, h, w = 2, 3, 6, 10
    x = rng.standard_normal((b, 4, f, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, 5, 32)).astype(np.float32)
    cm = np.zeros((b, 1, f, h, w), np.float32)
    cm[:, :, :2] = 1
    t = rng.uniform(0, 1, (b, 1, f, 1, 1)).astype(np.float32)
    pm = np.zeros((1, 1, 8 * h, 8 * w), np.float32)
    with torch.no_grad():
        ref = tp.transformer(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc), fps=16,
                             condition_mask=torch.from_numpy(cm), padding_mask=torch.from_numpy(pm),
                             return_dict=False)[0].numpy()
    out = np.asarray(jax.jit(lambda m, *a: m(*a, fps=16, condition_mask=cm, padding_mask=pm))(
        pipe.transformer, x, t, enc))
    assert out.shape == ref.shape == (b, 4, f, h, w)
    # fp32; outputs O(3); seen 7e-7 (2 blocks of width 24)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_text_to_image_matches_diffusers_and_mesh(tmp_path_factory):
    """Latents after 2 steps with CFG (diffusers' default negative prompt), then the same on cfg=2,ulysses=3 (6 of
    the 8 devices; 4 tokens padded to 6)."""
    tp, pipe, folder = build(tmp_path_factory, False)
    lat = _latents()
    with torch.no_grad():
        ref = tp(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=3.0,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type="latent").images.numpy()
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=3.0, latents=lat, max_sequence_length=MSL,
              output_type="latent", progress=False)
    out = pipe(PROMPT, **kw).images
    assert out.shape == ref.shape == (1, 4, H // 8, W // 8)
    _close(out, ref)
    meshed = Cosmos2TextToImagePipeline.from_pretrained(folder, mesh="cfg=2,ulysses=3")
    # (the one-device T5 states: the text encoder is not compiled again on the mesh)
    embeds = dict(prompt_embeds=pipe.encode_prompt([PROMPT], MSL),
                  negative_prompt_embeds=pipe.encode_prompt([DEFAULT_NEGATIVE_PROMPT], MSL))
    _close(meshed(**embeds, **kw).images, out)


def test_video_to_world_matches_diffusers(tmp_path_factory, monkeypatch):
    """A 5-frame video (2 latent frames given, the rest padded with its last frame) and 9 frames out: latents after
    2 steps with CFG."""
    from diffusers.pipelines.cosmos import pipeline_cosmos2_video2world

    monkeypatch.setattr(pipeline_cosmos2_video2world, "retrieve_latents", _mode)
    tp, pipe, _ = build(tmp_path_factory, True)
    lat = _latents(3)
    call = dict(negative_prompt=NEG, height=H, width=W, num_frames=F, num_inference_steps=STEPS, guidance_scale=3.0,
                max_sequence_length=MSL, output_type="latent")
    with torch.no_grad():
        ref = tp(video=_video(), prompt=PROMPT, latents=torch.from_numpy(lat), **call).frames.numpy()
    out = pipe(video=_video(), prompt=PROMPT, latents=lat, progress=False, **call).frames
    assert out.shape == ref.shape == (1, 4, 3, H // 8, W // 8)
    _close(out, ref)


@pytest.mark.slow
def test_text_to_image_decoded(tmp_path_factory):
    """The decoded image: diffusers' safety-checker pass rounds it down to 8 bits, ours does not (1/255 apart)."""
    tp, pipe, _ = build(tmp_path_factory, False)
    lat = _latents(seed=1)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS,
                 guidance_scale=7.0, latents=torch.from_numpy(lat), max_sequence_length=MSL,
                 output_type="np").images
    out = pipe(PROMPT, NEG, height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.0, latents=lat,
               max_sequence_length=MSL, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    assert np.all(out - ref >= -1e-4) and np.all(out - ref <= 1 / 255 + 1e-4)


@pytest.mark.slow
def test_image_to_world_matches_diffusers(tmp_path_factory, monkeypatch):
    """One image (a PIL image of another size, resized as diffusers does): 1 latent frame given; decoded video."""
    from diffusers.pipelines.cosmos import pipeline_cosmos2_video2world

    monkeypatch.setattr(pipeline_cosmos2_video2world, "retrieve_latents", _mode)
    tp, pipe, _ = build(tmp_path_factory, True)
    lat = _latents(3, seed=2)
    image = random_image(7, (48, 40))
    call = dict(negative_prompt=NEG, height=H, width=W, num_frames=F, num_inference_steps=STEPS, guidance_scale=7.0,
                max_sequence_length=MSL, output_type="latent")
    with torch.no_grad():
        ref = tp(image=image, prompt=PROMPT, latents=torch.from_numpy(lat), **call).frames.numpy()
    out = pipe(image=image, prompt=PROMPT, latents=lat, progress=False, **call).frames
    _close(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "data=2,pipefusion=2"])
def test_video_to_world_meshes_match_one_device(tmp_path_factory, mesh):
    """Two prompts; PipeFusion with every step a warm-up step (exact)."""
    _, ours, folder = build(tmp_path_factory, True)
    kw = dict(video=_video(), prompt=[PROMPT, "A cat."], negative_prompt=NEG, height=H, width=W, num_frames=F,
              num_inference_steps=STEPS, guidance_scale=3.0, latents=_latents(3, batch=2, seed=3),
              max_sequence_length=MSL, output_type="latent", progress=False)
    ref = ours(**kw).frames
    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=STEPS)
    pipe._image_noise = ours._image_noise
    _close(pipe(**kw).frames, ref)


@pytest.mark.slow
def test_bad_input_and_refusals(tmp_path_factory):
    import json

    _, t2i, folder = build(tmp_path_factory, False)
    _, v2w, _ = build(tmp_path_factory, True)
    with pytest.raises(ValueError, match="multiple"):
        t2i(PROMPT, height=40, width=W, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="exactly one of image"):
        v2w(prompt=PROMPT, height=H, width=W, num_frames=F)
    with pytest.raises(ValueError, match="max_size"):
        t2i(PROMPT, height=H, width=W * 20, num_inference_steps=STEPS)
    # Cosmos 1.0 / 2.5 folders: a clear refusal before any conversion
    other = tmp_path_factory.mktemp("cosmos1")
    (other / "model_index.json").write_text(json.dumps({"_class_name": "CosmosTextToWorldPipeline"}))
    with pytest.raises(NotImplementedError, match="Cosmos 1.0"):
        Cosmos2TextToImagePipeline.from_pretrained(other)
    with pytest.raises(NotImplementedError, match="Cosmos 2.5"):
        cosmos.CosmosConfig.from_dict({"img_context_dim_in": 1152})


@pytest.mark.slow
def test_cli_tiny_cosmos(tmp_path, monkeypatch):
    """The command line: tiny-cosmos (an image) and tiny-cosmos-v2w with --image and --fps on ulysses=3 (a video)."""
    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "a.png"
    assert cli.main(["--model", "tiny-cosmos", "--prompt", PROMPT, "--output", str(out), "--no-progress"]) == 0
    assert out.exists()
    image = tmp_path / "first.png"
    random_image(0, (48, 40)).save(image)
    out = tmp_path / "b.mp4"
    assert cli.main(["--model", "tiny-cosmos-v2w", "--prompt", PROMPT, "--image", str(image), "--fps", "8",
                     "--mesh", "ulysses=3", "--output", str(out), "--no-progress"]) == 0
    assert out.exists()


@pytest.mark.slow
def test_pipefusion_patched_steps_match_the_rule(tmp_path_factory):
    """PipeFusion's patched steps (after one warm-up step: stale K/V of the later patches) on pipefusion=2 == the same
    rule run sequentially on one device (pipefusion_patches=2), Text2Image on 8 x 8 latents (16 tokens, 2 patches; on
    the 4 tokens of 32 x 32 the patched steps happen to equal the exact ones)."""
    _, _, folder = build(tmp_path_factory, False)
    lat = np.random.default_rng(4).standard_normal((1, 4, 1, 8, 8)).astype(np.float32)
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.0, latents=lat,
              max_sequence_length=MSL, output_type="latent", progress=False)
    ref = Cosmos2TextToImagePipeline.from_pretrained(folder, pipefusion_patches=2)(PROMPT, **kw).images
    plain = Cosmos2TextToImagePipeline.from_pretrained(folder)(PROMPT, **kw).images
    out = Cosmos2TextToImagePipeline.from_pretrained(folder, mesh="cfg=2,pipefusion=2")(PROMPT, **kw).images
    _close(out, ref)
    # the patched steps really ran (PipeFusion's approximation: stale K/V of the later patch; measured 3.8e-4 of 3.5,
    # 10x the tolerance above: Cosmos' x0 is mostly the skip term at these sigmas)
    assert np.abs(ref - plain).max() > 5e-5 * np.abs(plain).max()
