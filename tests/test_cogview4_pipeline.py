"""The CogView4 pipeline from a diffusers save_pretrained folder == diffusers' CogView4Pipeline (tiny random weights,
fp32), on one device and on meshes (8 simulated CPU devices); its schedule == diffusers' exactly."""

import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_cogview4, pipeline_runs, torch_and_our_pipeline
from xdit_jax.mesh import build_mesh
from xdit_jax.pipelines.cogview4 import CogView4Pipeline, make_schedule

PROMPT = "A small dog running on a beach at sunset, cinematic lighting, in the rain."
PROMPTS = [PROMPT, "A cat."]  # 2 prompts padded to the longer, then to 32 GLM tokens; the negative "" to 16
# 64 x 64 images: 4 x 8 x 8 latents, 16 image tokens; 2 steps; SDXL conditions of their own
H, W, STEPS = 64, 64, 2
LATENT = (4, 8, 8)
CALL = dict(height=H, width=W, num_inference_steps=STEPS, original_size=(96, 80), crops_coords_top_left=(8, 16))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_cogview4, CogView4Pipeline, tmp_path_factory, "cogview4")


initial_latents, run_torch, run_ours = pipeline_runs(LATENT, CALL)


def test_schedule_matches_diffusers(pipes):
    """Timesteps and sigmas bit-equal to what CogView4Pipeline hands the scheduler (mu from the image tokens, the
    linear time shift), for several sizes and step counts, and with the caller's sigmas."""
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift, retrieve_timesteps

    tp, ours, _ = pipes
    for n, h, w, sigmas in ((2, 64, 64, None), (50, 1024, 1024, None), (7, 768, 1360, None),
                            (3, 64, 64, [1.0, 0.6, 0.2])):
        seq = (h // 8) * (w // 8) // 4
        ts = np.linspace(1000, 1.0, n).astype(np.int64).astype(np.float32)
        sg = ts / 1000 if sigmas is None else sigmas
        cfg = tp.scheduler.config
        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.base_shift, cfg.max_shift)
        ref_t, _ = retrieve_timesteps(tp.scheduler, n, "cpu", ts, sg, mu=mu)
        got = make_schedule(ours.scheduler_config, n, seq, sigmas=sigmas)
        np.testing.assert_array_equal(got.timesteps, ref_t.numpy())
        np.testing.assert_array_equal(got.sigmas, tp.scheduler.sigmas.numpy())


@pytest.fixture(scope="module")
def cfg_two_prompts(pipes):
    tp, ours, _ = pipes
    lat = initial_latents(2, seed=1)
    ref = run_torch(tp, PROMPTS, lat, output_type="latent")
    return lat, ref, run_ours(ours, PROMPTS, lat, output_type="latent")


def test_cfg_two_prompts_match_diffusers(cfg_two_prompts):
    """Two prompts (left-padded to the longer, then to 32 GLM tokens), CFG 5 with the default negative prompt "" (16
    tokens: the two halves of different lengths), SDXL conditions of their own: the latents after 2 steps."""
    _, ref, out = cfg_two_prompts
    # latents O(3.2) after 2 Euler steps, both sides fp32: measured max |diff| 2.7e-6 (8.5e-7 of the scale); a wrong
    # padding side, hidden state, mu, timestep or size condition moves them by 1e-2 and more
    assert_close_latents(out, ref)


def test_image_matches_diffusers(pipes):
    """One prompt with a negative prompt: the decoded image (latents / scaling_factor through the VAE)."""
    tp, ours, _ = pipes
    lat = initial_latents()
    kw = dict(negative_prompt="Waves crash against black rocks.", guidance_scale=3.0)
    ref = run_torch(tp, PROMPT, lat, output_type="np", **kw)
    out = run_ours(ours, PROMPT, lat, **kw)
    assert out.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # pixels in [0, 1]: measured max |diff| 1.9e-6


def test_mesh_equals_one_device(pipes, cfg_two_prompts):
    """cfg x ring x ulysses: the halves over cfg, the 16 image tokens and the 32 text tokens over ring 2 x ulysses 2."""
    _, _, folder = pipes
    lat, _, one = cfg_two_prompts
    pipe = CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,ring=2,ulysses=2"))
    out = run_ours(pipe, PROMPTS, lat, output_type="latent")
    np.testing.assert_allclose(out, one, atol=1e-5 * np.abs(one).max(), rtol=0)


def test_bad_requests(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=72, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2"))(PROMPT, height=H, width=W,
                                                                           guidance_scale=1.0)
    with pytest.raises(ValueError, match="GLM states"):
        ours(None, prompt_embeds=np.zeros((1, 16, 7), np.float32), height=H, width=W, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours(PROMPT, height=H, width=W, num_inference_steps=0, progress=False)


@pytest.mark.slow
def test_prompt_embeds_match_prompts(pipes):
    """diffusers' encode_prompt output as prompt_embeds / negative_prompt_embeds == the prompts."""
    tp, ours, _ = pipes
    lat = initial_latents()
    neg = "Waves crash against black rocks."
    with torch.no_grad():
        pe, ne = tp.encode_prompt(PROMPT, neg, device=torch.device("cpu"))
    kw = dict(output_type="latent", num_inference_steps=1)
    out = run_ours(ours, None, lat, prompt_embeds=pe.numpy(), negative_prompt_embeds=ne.numpy(), **kw)
    assert_close_latents(out, run_torch(tp, PROMPT, lat, negative_prompt=neg, **kw))


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 (the 2 blocks one per stage, the 16 image tokens in two patches, the text sliced with them) with
    CFG == the same patched rule on one device (pipefusion_patches=2); with cfg and ulysses too."""
    _, ours, folder = pipes
    lat = initial_latents(1, seed=5)
    kw = dict(output_type="latent", num_inference_steps=3)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(CogView4Pipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=2")), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()  # measured 0 (the same program order), latents O(3.3)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ: measured 0.02)
    cfg_pf = run_ours(CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,pipefusion=2,ulysses=2")),
                      PROMPT, lat, **kw)
    # the CFG halves split and Ulysses inside each patch: float reordering, measured 1.4e-6
    np.testing.assert_allclose(cfg_pf, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_images_per_prompt_over_data(pipes):
    """num_images_per_prompt=2 of two prompts with CFG on data=2 == diffusers; data=3 (4 rows padded to 6) == data=2."""
    tp, _, folder = pipes
    lat = initial_latents(4, seed=7)
    kw = dict(output_type="latent", num_images_per_prompt=2, negative_prompt=["", "blurry"])
    out = run_ours(CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("data=2")), PROMPTS, lat, **kw)
    assert_close_latents(out, run_torch(tp, PROMPTS, lat, **kw))
    padded = run_ours(CogView4Pipeline.from_pretrained(folder, mesh=build_mesh("data=3")), PROMPTS, lat, **kw)
    np.testing.assert_allclose(padded, out, atol=1e-5 * np.abs(out).max(), rtol=0)


@pytest.mark.slow
def test_compile_step(pipes):
    """The CFG step compiles for given shapes without running."""
    import jax

    _, ours, _ = pipes
    compiled = ours.compile_step(2, height=H, width=W, num_inference_steps=STEPS, text_tokens=48)
    shapes = [a.shape for a in jax.tree.leaves(compiled.args_info) if hasattr(a, "shape")]
    assert (4, 48, 32) in shapes and (2,) + LATENT in shapes


@pytest.mark.slow
def test_cli_tiny_cogview4(tmp_path, capsys, monkeypatch):
    """scripts/generate.py --model tiny-cogview4: a .png with CFG and a negative prompt on cfg x ulysses 3 (the 16
    image tokens padded to 18 over the 3 devices of a CFG half); cfg=2 without guidance (> 1) refused."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c.png"
    rc = cli.main(["--model", "tiny-cogview4", "--output", str(out), "--negative-prompt", "blurry", "--mesh",
                   "cfg=2,ulysses=3", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (64, 64, 3) and image.std() > 1
    assert '"model_family": "cogview4"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-cogview4", "--output", str(tmp_path / "n.png"), "--mesh", "cfg=2",
                   "--guidance-scale", "1", "--no-progress"])
    assert rc == 2 and "guidance_scale > 1" in capsys.readouterr().err


@pytest.mark.slow  # (the default run's budget; the transformer's parity and mesh tests are the default ones)
def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of cogview4-tiny (24 image + 32 text tokens, CFG) against diffusers' transformer on
    one device and cfg=2,ring=2,ulysses=2; the compiled program's FLOPs == the analytic count."""
    from xdit_jax import bench
    from xdit_jax.bench_families import family_of_config
    from xdit_jax.tiny import COGVIEW4_TRANSFORMER

    assert family_of_config(dict(COGVIEW4_TRANSFORMER)) == "cogview4"
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="cogview4-tiny", meshes=[None, "cfg=2,ring=2,ulysses=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ring=2,ulysses=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "cogview4" and r["latent_shape"] == [2, 4, 8, 12] and r["image_tokens"] == 24
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["cfg=2,ring=2,ulysses=2"]):
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)


@pytest.mark.slow
def test_benchmark_e2e_tiny():
    """--e2e builds cogview4-tiny's pipeline from its configs with random weights and times its stages (cfg=2)."""
    from xdit_jax import bench

    opts = bench.StepOptions(model="cogview4-tiny", meshes=["cfg=2,ulysses=2"], log=lambda s: None)
    (row,) = bench.run_e2e_benchmark(opts, steps=2)
    assert row["kind"] == "e2e" and "error" not in row, row.get("error")
    assert row["output_shape"] == [1, 64, 96, 3]


@pytest.mark.slow
def test_random_pipeline_is_laid_out_as_a_checkpoint(tmp_path):
    """``from_config`` (random weights from configs alone) builds the modules ``from_pretrained`` builds from a tiny
    checkpoint of the same configs, on pipefusion=2 (tests/test_from_config.py's rule)."""
    from tests.test_from_config import _layout
    from xdit_jax import tiny

    ckpt = tiny.make_tiny_model(tmp_path / "ckpt", family="cogview4")
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny.write_configs(configs, "cogview4")
    loaded = CogView4Pipeline.from_pretrained(ckpt, mesh="pipefusion=2", dtype="bfloat16")
    random = CogView4Pipeline.from_config(configs, mesh="pipefusion=2", dtype="bfloat16", seed=3)
    for name in ("transformer", "vae", "text_encoder"):
        assert _layout(getattr(random, name)) == _layout(getattr(loaded, name)), name
    assert type(random.tokenizer).__name__ == type(loaded.tokenizer).__name__
