"""The Wan 2.1 pipeline from a diffusers save_pretrained folder == diffusers' WanPipeline, on one device and on
meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_wan, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.wan import WanPipeline, prompt_clean

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
F, H, W, STEPS, MSL = 9, 32, 48, 3, 16  # 3 x 4 x 6 latents: 18 video tokens after the 1x2x2 patches

_BUILT = {}


def build(tmp_path_factory, scheduler: str = "unipc"):
    """(torch pipeline, our pipeline, our converted folder), made once per scheduler."""
    if scheduler not in _BUILT:
        tp = make_torch_wan(scheduler=scheduler)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"wan-{scheduler}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[scheduler] = (tp, WanPipeline.from_pretrained(converted), converted)
    return _BUILT[scheduler]


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, (F - 1) // 4 + 1, H // 8, W // 8)).astype(
        np.float32)


def _diffusers(tp, prompt, lat, output_type, num_frames=F, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, num_frames=num_frames, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type=output_type, **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def test_prompt_clean_as_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference

    for text in ["  A  dog\n\trunning &amp;amp; jumping  ", "plain", "&lt;b&gt; bold", ""]:
        assert prompt_clean(text) == reference(text)


def test_video_matches_diffusers(tmp_path_factory):
    tp, ours, _ = build(tmp_path_factory)
    lat = initial_latents()
    ref = _diffusers(tp, PROMPT, lat, "np", negative_prompt=NEG, guidance_scale=5.0)
    out = ours(PROMPT, NEG, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, guidance_scale=5.0, progress=False).frames
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # fp32 both sides: 3 UniPC steps with CFG, then the causal VAE; pixels in [0, 1]. 1e-4 is ~1/40 of an 8-bit
    # level, while a wrong caption padding, schedule or latent unscaling moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheduler", ["unipc", "flow_match"])
def test_latents_match_diffusers_batch(scheduler, tmp_path_factory):
    """Two prompts of different lengths (the caption zero-padding differs per row), the default empty negative
    prompt, two videos a prompt (diffusers run with each prompt twice); UniPC and flow-matching Euler."""
    tp, ours, _ = build(tmp_path_factory, scheduler)
    prompts = [PROMPT, "A cat."]
    per = 2 if scheduler == "unipc" else 1
    lat = initial_latents(batch=2 * per, seed=1)
    ref = _diffusers(tp, [p for p in prompts for _ in range(per)], lat, "latent", guidance_scale=5.0)
    out = ours(prompts, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, output_type="latent", progress=False, num_videos_per_prompt=per).frames
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# data, cfg and ring in one mesh (three prompts: data=2 pads the batch to 4, each CFG half on its cfg group),
# ulysses=3 and PipeFusion run by default; the two meshes the first replaces are slow-marked (`pytest -m slow`;
# ulysses with ring: the transformer's tests).
MESHES = ["ulysses=3", "data=2,cfg=2,ring=2", "pipefusion=2",
          pytest.param("cfg=2,ulysses=2,ring=2", marks=pytest.mark.slow), pytest.param("data=2,ring=2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(mesh, tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    batch = 3 if "data=2" in mesh else 1  # 3 prompts: data=2 pads the transformer's batch to 4
    prompts = [PROMPT, "A cat.", "A red car."][:batch]
    kw = dict(num_frames=F, height=H, width=W, num_inference_steps=2, latents=initial_latents(batch=batch, seed=2),
              max_sequence_length=MSL, progress=False)
    if mesh.startswith("pipefusion"):  # PipeFusion's patches see one-step-old K/V after its exact warm-up step:
        kw["output_type"] = "latent"  # with 2 steps and 1 warm-up step the second step is patched
        ref = ours(prompts, **kw).frames
        pipe = WanPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=2)
        np.testing.assert_allclose(pipe(prompts, **kw).frames, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
        return
    ref = ours(prompts, **kw).frames
    out = WanPipeline.from_pretrained(folder, mesh=mesh)(prompts, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the model's 2 layers"):
        WanPipeline.from_pretrained(folder, mesh="pipefusion=3")
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        ours(PROMPT, num_frames=0, height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, num_frames=F, height=40, width=W)
    with pytest.raises(ValueError, match=r"this model takes \(batch, tokens, 32\)"):
        ours(prompt_embeds=np.zeros((1, MSL, 8), np.float32), num_frames=F, height=H, width=W, guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), negative_prompt_embeds=np.zeros((1, MSL + 1, 32)),
             num_frames=F, height=H, width=W)


def test_decode_frame_by_frame_where_one_pass_does_not_fit(tmp_path_factory, monkeypatch, caplog):
    """Where the one-pass decode's plan would not fit the device (faked: 1 KiB free), the decode runs one latent
    frame at a time (diffusers' own loop), with a warning: the same video, not tiles."""
    import logging

    import jax.numpy as jnp

    from xdit_jax.pipelines import denoise

    _, ours, _ = build(tmp_path_factory)
    lat = jnp.asarray(initial_latents(seed=3))
    ours._decode_cache.clear()
    ref = np.asarray(ours._decode_fn()(lat))
    monkeypatch.setattr(denoise, "device_free_bytes", lambda device: 1024)
    ours._decode_cache.clear()
    with caplog.at_level(logging.WARNING):
        out = np.asarray(ours._decode_fn()(lat))
    ours._decode_cache.clear()
    assert any("decoding frame by frame" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)  # the same convolutions, one frame at a time


# ---------------------------------------------------------------------------------------------- video-to-video

def test_video_to_video_matches_diffusers(tmp_path_factory, monkeypatch):
    """diffusers' WanVideoToVideoPipeline of the same parts, ours loaded from the text-to-video folder: 9 frames
    resized from 70 x 50, CFG, UniPC, strength 0.8 of 4 steps (its own rule: int(4 x 0.8) = 3 steps from
    timesteps[1], the scheduler's history started afresh there), the video encoded by the Wan VAE (the posterior's
    mode); the same torch noise both sides."""
    from diffusers import WanVideoToVideoPipeline as TorchV2V
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_video2video

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax.pipelines.wan import WanVideoToVideoPipeline

    # (diffusers 0.42.1's video-to-video calls ftfy unguarded; absent here: the text-to-video module's guarded clean)
    monkeypatch.setattr(pipeline_wan_video2video, "basic_clean", pipeline_wan.basic_clean)
    tp, _, folder = build(tmp_path_factory)
    tp = TorchV2V(**{k: v for k, v in tp.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler",
                                                                       "transformer")})
    ours = WanVideoToVideoPipeline.from_pretrained(folder)
    video = [picture(10 + i) for i in range(F)]
    draws = _torch_draws(monkeypatch, ours, 3, [(1, 4, (F - 1) // 4 + 1, H // 8, W // 8)])
    kw = dict(video=video, prompt=PROMPT, negative_prompt=NEG, height=H, width=W, strength=0.8, num_inference_steps=4,
              guidance_scale=5.0, max_sequence_length=MSL)
    with torch.no_grad():
        ref = tp(generator=torch.Generator().manual_seed(3), output_type="latent", **kw).frames.numpy()
    out = ours(output_type="latent", progress=False, **kw)
    assert not draws and "video_encoding" in out.timings
    assert out.frames.shape == ref.shape == (1, 4, (F - 1) // 4 + 1, H // 8, W // 8)
    scale = np.abs(ref).max()
    # fp32 both sides, the latents' bound (1e-5 of their scale). Measured 1.9e-6 of 3.3; image-to-image's start rule
    # (4 steps, not 3) moved them by 0.34, the UniPC schedule sliced with its history orders (not started afresh) by 3.2
    np.testing.assert_allclose(out.frames, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    with pytest.raises(ValueError, match="needs video="):
        ours(prompt=PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ours(video, PROMPT, height=H, width=W, strength=1.2)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        ours(video, PROMPT, height=H, width=W, strength=0.2, num_inference_steps=4)


@pytest.mark.slow  # (another pipeline to compile on a mesh, the tiny folder; the rule is the test above's)
def test_video_to_video_mesh_flow_match_and_cli(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """cfg=2,ring=2,ulysses=2 (the video's encode split over the mesh) == one device with JAX draws, two prompts x
    2 videos; the flow-matching Euler folder == diffusers (given latents: used as given from the strength's step);
    CLI --video on tiny-wan (WanVideoToVideoPipeline), --num-frames refused there."""
    import imageio.v3 as iio
    from diffusers import WanVideoToVideoPipeline as TorchV2V
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_video2video

    from tests.test_flux_pipeline import picture
    from xdit_jax import cli
    from xdit_jax.pipelines.wan import WanVideoToVideoPipeline

    monkeypatch.setattr(pipeline_wan_video2video, "basic_clean", pipeline_wan.basic_clean)
    _, _, folder = build(tmp_path_factory)
    video = [picture(20 + i) for i in range(F)]
    kw = dict(negative_prompt=NEG, height=H, width=W, strength=0.7, num_inference_steps=4, num_videos_per_prompt=2,
              max_sequence_length=MSL, output_type="latent", progress=False, seed=5)
    one = WanVideoToVideoPipeline.from_pretrained(folder)(video, [PROMPT, "A cat."], **kw).frames
    mesh = WanVideoToVideoPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2")
    out = mesh(video, [PROMPT, "A cat."], **kw).frames
    np.testing.assert_allclose(out, one, atol=1e-5 * np.abs(one).max(), rtol=0)

    tp, _, fm_folder = build(tmp_path_factory, "flow_match")
    tp = TorchV2V(**{k: v for k, v in tp.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler",
                                                                       "transformer")})
    lat = initial_latents(seed=7)
    kw = dict(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, strength=0.6, num_inference_steps=5,
              max_sequence_length=MSL, output_type="latent")
    with torch.no_grad():
        ref = tp(latents=torch.from_numpy(lat), **kw).frames.numpy()
    got = WanVideoToVideoPipeline.from_pretrained(fm_folder)(latents=lat, progress=False, **kw).frames
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, im in enumerate(video):
        im.save(frames / f"{i:02d}.png")
    dst = tmp_path / "v.mp4"
    rc = cli.main(["--model", "tiny-wan", "--output", str(dst), "--steps", "2", "--video", str(frames), "--strength",
                   "0.5", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(dst, index=None).shape[0] == F
    assert '"video_encoding"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-wan", "--output", str(tmp_path / "n.mp4"), "--video", str(frames),
                   "--num-frames", "5", "--no-progress"])
    assert rc == 2 and "--num-frames: Wan video-to-video" in capsys.readouterr().err
