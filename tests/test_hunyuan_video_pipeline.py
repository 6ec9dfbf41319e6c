"""The HunyuanVideo pipeline from a diffusers save_pretrained folder == diffusers' HunyuanVideoPipeline (tiny random
weights, fp32), on one device and on meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_hunyuan_video, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.hunyuan_video import HunyuanVideoPipeline

PROMPT = "A small dog running on a beach at sunset."
PROMPTS = [PROMPT, "A cat."]
NEGATIVE = "Waves crash against black rocks."
# 5 frames of 32 x 32: 2 x 4 x 4 latents, 2 x 2 x 2 = 8 video tokens; 256 Llama tokens after the template.
F, H, W, STEPS = 5, 32, 32, 2
LATENT = (4, 2, 4, 4)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    tp = make_torch_hunyuan_video()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("hunyuanvideo"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))  # diffusers folder, converted
    return tp, HunyuanVideoPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch,) + LATENT).astype(np.float32)


def run_torch(tp, prompt, latents, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(latents), **kw).frames
    return out.numpy() if kw.get("output_type") == "latent" else out


def run_ours(pipe, prompt, latents, **kw):
    kw = dict(dict(num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=latents, progress=False), **kw)
    return pipe(prompt, **kw).frames


# Latents O(3) after 2 Euler steps. Both sides fp32: measured 3.4e-6 (1.3e-6 of their scale) for one prompt — the
# rounding of two fp32 implementations (the Llama and CLIP encoders, the transformer's sinusoids of t and of the
# 6,000 rad guidance: see tests/test_hunyuan_video_transformer.py). 1e-5 of the scale leaves room; a wrong text mask,
# template crop, pooled token, guidance or shift moves the latents by 1e-2 and more.
def _close_latents(out, ref):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_one_prompt_video_matches_diffusers(pipes):
    """One prompt, the embedded guidance (no true CFG: diffusers' default): the latents, then the video."""
    tp, ours, _ = pipes
    lat = initial_latents()
    _close_latents(run_ours(ours, PROMPT, lat, output_type="latent"), run_torch(tp, PROMPT, lat, output_type="latent"))
    ref = run_torch(tp, PROMPT, lat, output_type="np")
    out = run_ours(ours, PROMPT, lat)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # pixels in [0, 1] from the tiny VAE (measured 4.3e-6): 1e-4 is ~1/40 of an 8-bit level
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_two_prompts_latents_match_diffusers(pipes):
    """Two prompts of different lengths: each row's own text mask (the padding masked in the refiner and blocks)."""
    tp, ours, _ = pipes
    _, mask, _ = ours.encode_prompt(PROMPTS)
    lengths = np.asarray(mask).sum(1)
    assert mask.shape == (2, 256) and lengths[0] > lengths[1] > 0  # the template cropped: the prompts' tokens
    lat = initial_latents(batch=2, seed=1)
    out = run_ours(ours, PROMPTS, lat, output_type="latent", guidance_scale=4.0)
    ref = run_torch(tp, PROMPTS, lat, output_type="latent", guidance_scale=4.0)
    assert out.shape == ref.shape == (2,) + LATENT
    _close_latents(out, ref)


def test_true_cfg_latents_match_diffusers(pipes):
    """true_cfg_scale > 1 with a negative prompt: [negative; prompt] in one batch, neg + s (pos - neg)."""
    tp, ours, _ = pipes
    lat = initial_latents(seed=2)
    out = run_ours(ours, PROMPT, lat, output_type="latent", negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    ref = run_torch(tp, PROMPT, lat, output_type="latent", negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    _close_latents(out, ref)
    plain = run_ours(ours, PROMPT, lat, output_type="latent")
    assert np.abs(plain - out).max() > 1e-2  # true CFG changed the result


def test_given_embeddings_as_prompt(pipes):
    """prompt_embeds / pooled_prompt_embeds / prompt_attention_mask (diffusers' arguments) == the prompt."""
    _, ours, _ = pipes
    emb, mask, pooled = ours.encode_prompt([PROMPT])
    lat = initial_latents(seed=3)
    ref = run_ours(ours, PROMPT, lat, output_type="latent")
    out = run_ours(ours, None, lat, output_type="latent", prompt_embeds=np.asarray(emb),
                   pooled_prompt_embeds=np.asarray(pooled), prompt_attention_mask=np.asarray(mask))
    np.testing.assert_array_equal(out, ref)


# ring x ulysses over the 8 video tokens (the text sharded as the masked context); data x ulysses with two prompts;
# cfg x ring with true CFG (its two passes over cfg). The latents to float32 rounding of sums in another order.
MESHES = [("ring=2,ulysses=2", PROMPT, {}), ("cfg=2,ring=2", PROMPT, dict(negative_prompt=NEGATIVE,
                                                                         true_cfg_scale=3.0)),
          pytest.param("data=2,ulysses=2", PROMPTS, {}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh,prompt,kw", MESHES)
def test_meshes_match_one_device(pipes, mesh, prompt, kw):
    _, ours, folder = pipes
    lat = initial_latents(batch=1 if isinstance(prompt, str) else 2, seed=4)
    ref = run_ours(ours, prompt, lat, output_type="latent", **kw)
    out = run_ours(HunyuanVideoPipeline.from_pretrained(folder, mesh=mesh), prompt, lat, output_type="latent", **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over both stacks (the text sliced with the patches): == the same patched rule run on one device
    (pipefusion_patches=2). 64 x 32: 2 x 4 x 2 = 16 video tokens, two patches of 8 (PipeFusion's granule): a real
    split."""
    _, ours, folder = pipes
    lat = np.random.default_rng(5).standard_normal((1, 4, 2, 8, 4)).astype(np.float32)
    kw = dict(output_type="latent", num_inference_steps=3, height=64)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(HunyuanVideoPipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(HunyuanVideoPipeline.from_pretrained(folder, mesh="pipefusion=2"), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ)


def test_bad_input_is_refused(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=32, num_frames=F)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours(PROMPT, height=H, width=W, num_frames=6)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, 256, 32), np.float32), height=H, width=W, num_frames=F)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages"):
        HunyuanVideoPipeline.from_pretrained(folder, mesh="pipefusion=3")
    with pytest.raises(ValueError, match="cfg=2"):  # no negative prompt: no true CFG for the cfg axis to split
        HunyuanVideoPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W, num_frames=F,
                                                                   true_cfg_scale=3.0)


@pytest.mark.slow  # (17 s; the pipeline's parity and mesh tests above run by default, test_cli.py the CLI)
def test_generate_cli_video(tmp_path, monkeypatch, capsys):
    """generate.py --model tiny-hunyuanvideo (random weights, the stand-in tokenizers): an .mp4 of 4k+1 frames at
    24 fps, on a sequence-parallel mesh."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hunyuanvideo.mp4"
    rc = cli.main(["--model", "tiny-hunyuanvideo", "--output", str(out), "--steps", "2", "--mesh", "ring=2",
                   "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (F, H, W, 3) and video.std() > 1  # the tiny defaults: 5 frames of 32 x 32
    printed = capsys.readouterr().out
    assert '"model_family": "hunyuanvideo"' in printed and "at 24 fps" in printed


def test_full_size_configs_folder():
    """configs/hunyuanvideo (diffusers' layout of hunyuanvideo-community/HunyuanVideo) reads into the modules'
    configs; its defaults are the pipeline's; the release's sizes pass the checks, bad ones are named."""
    import json
    from pathlib import Path

    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.pipelines import hunyuan_video as hvp
    from xdit_jax.schedulers import flow_match

    root = Path(__file__).resolve().parents[1] / "configs" / "hunyuanvideo"
    for name, cls in model_components(root).items():
        _, cfg_cls = model_class(cls)
        cfg_cls.from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = hvp.read_configs(root)
    assert (tc.num_layers, tc.num_single_layers, tc.text_embed_dim, tc.pooled_projection_dim) == (20, 40, 4096, 768)
    assert flow_match.FlowMatchEulerConfig.from_json(root / "scheduler" / "scheduler_config.json").shift == 7.0
    defaults = json.loads((root / "defaults.json").read_text())
    dv = hvp.default_video(tc, vc)
    assert {k: defaults[k] for k in dv} == dv == {"height": 720, "width": 1280, "num_frames": 129, "fps": 24}
    hvp.check_request(tc, vc, 720, 1280, 129, 1, "cfg=2,ulysses=4", 2.0)
    with pytest.raises(ValueError, match="more stages"):
        hvp.check_request(tc, vc, 720, 1280, 129, 1, "pipefusion=64")


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of hunyuanvideo-tiny (12 video + 16 Llama tokens, 6 real) against diffusers'
    transformer on one device and ring=2; the full-size folder read as HunyuanVideo (not FLUX: both have
    num_single_layers) with its shapes and FLOPs, nothing compiled."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="hunyuanvideo-tiny", meshes=[None, "ring=2"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("ring=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "hunyuanvideo" and r["latent_shape"] == [1, 4, 2, 4, 6] and r["video_tokens"] == 12
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["ring=2"]):
        # same weights and inputs, fp32, outputs O(1): a text-mask or layout slip moves them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("hunyuanvideo")
    assert w.family == "hunyuanvideo" and not w.cfg and w.latent_shape() == (1, 16, 33, 90, 160)
    assert w.fam.tokens(w) == (33 * 45 * 80, 256)
