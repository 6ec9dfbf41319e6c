"""The Lumina 2 pipeline from a diffusers save_pretrained folder == diffusers' Lumina2Pipeline (tiny random weights,
fp32), on one device and on meshes (8 simulated CPU devices)."""

import jax
import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_lumina2, pipeline_runs, torch_and_our_pipeline
from xdit_jax.mesh import build_mesh
from xdit_jax.pipelines.lumina2 import Lumina2Pipeline

PROMPT = "A small dog running on a beach at sunset."
# with the system prompt: 110 and 97 Gemma stand-in tokens (captions of different lengths, one array of 128)
PROMPTS = [PROMPT, "A cat."]
NEGATIVE = "Waves crash against black rocks."
# 64 x 64 images: 4 x 8 x 8 latents, 16 image tokens; 2 steps; 128 Gemma tokens
H, W, STEPS, TOKENS = 64, 64, 2, 128
LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_lumina2, Lumina2Pipeline, tmp_path_factory, "lumina2")


initial_latents, run_torch, run_ours = pipeline_runs(
    LATENT, dict(height=H, width=W, num_inference_steps=STEPS, max_sequence_length=TOKENS))


# Latents O(3) after 2 Euler steps, both sides fp32: measured 1.4e-6 (one prompt, CFG 4 normalized), 9.5e-7 (two
# prompts, truncated CFG), 1.3e-6 (prompt_embeds, 1 step) at latents 3.2-3.4 (Gemma 2's and the transformer's float32
# rounding). 1e-5 of the scale leaves room; a wrong system prompt, hidden state, mask, shift, mu,
# timestep or guidance rule moves them by 1e-2+.
_close_latents = assert_close_latents


def test_image_matches_diffusers(pipes):
    """One prompt at diffusers' defaults otherwise (CFG 4 with the "" negative prompt, cfg_normalization): the
    latents, then the decoded image."""
    tp, ours, _ = pipes
    lat = initial_latents()
    _close_latents(run_ours(ours, PROMPT, lat, output_type="latent"), run_torch(tp, PROMPT, lat, output_type="latent"))
    ref = run_torch(tp, PROMPT, lat, output_type="np")
    out = run_ours(ours, PROMPT, lat)
    assert out.shape == ref.shape == (1, H, W, 3)
    # pixels in [0, 1]: measured max |diff| 1.5e-6 (the VAE on latents 1.4e-6 apart)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


# two prompts of different lengths, a negative prompt each (one "": another length again), CFG truncated after the
# first of 2 steps ((i + 1) / n > 0.5 on the second), no normalization
CFG = dict(guidance_scale=3.0, negative_prompt=[NEGATIVE, ""], cfg_trunc_ratio=0.5, cfg_normalization=False)


@pytest.fixture(scope="module")
def cfg_two_prompts(pipes):
    tp, ours, _ = pipes
    lat = initial_latents(2, seed=1)
    ref = run_torch(tp, PROMPTS, lat, output_type="latent", **CFG)
    return lat, ref, run_ours(ours, PROMPTS, lat, output_type="latent", **CFG)


def test_cfg_prompts_of_different_lengths_match_diffusers(cfg_two_prompts):
    _, ref, out = cfg_two_prompts
    _close_latents(out, ref)


def test_mesh_equals_one_device(pipes, cfg_two_prompts):
    """cfg x ring x ulysses (the halves over cfg, the 16 image tokens and the 128-token caption over ring 2 x
    ulysses 2)."""
    _, _, folder = pipes
    lat, _, one = cfg_two_prompts
    pipe = Lumina2Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,ring=2,ulysses=2"))
    out = run_ours(pipe, PROMPTS, lat, output_type="latent", **CFG)
    # float reordering only: measured max |diff| 8.3e-7 (latents O(3))
    np.testing.assert_allclose(out, one, atol=2e-5, rtol=0)


def test_prompt_embeds_with_masks_as_diffusers(pipes):
    """diffusers' encode_prompt outputs (padded states and masks, 128 tokens) == the prompts."""
    tp, ours, _ = pipes
    lat = initial_latents()
    with torch.no_grad():
        pe, pm, ne, nm = tp.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device=torch.device("cpu"),
                                          max_sequence_length=TOKENS)
    kw = dict(guidance_scale=2.0, output_type="latent")  # (2 steps: the first test's compiled step)
    out = run_ours(ours, None, lat, prompt_embeds=pe.numpy(), prompt_attention_mask=pm.numpy(),
                   negative_prompt_embeds=ne.numpy(), negative_prompt_attention_mask=nm.numpy(), **kw)
    _close_latents(out, run_torch(tp, PROMPT, lat, negative_prompt=NEGATIVE, **kw))


def test_long_prompt_is_truncated_with_diffusers_warning(pipes, caplog):
    """A prompt past max_sequence_length: cut to it (the encoder's ids) with diffusers' warning naming the cut part;
    a short one: no warning."""
    import logging

    _, ours, _ = pipes
    with caplog.at_level(logging.WARNING, logger="xdit_jax"):
        ours.encode_prompt(["a cat"], max_sequence_length=8)
    assert "truncated" not in caplog.text
    long = " ".join(["a small dog running on a beach at sunset"] * 4)
    with caplog.at_level(logging.WARNING, logger="xdit_jax"):
        embeds, mask = ours.encode_prompt([long], max_sequence_length=8)
    assert embeds.shape[1] == mask.shape[1] == 8 and mask.all()
    assert "truncated because `max_sequence_length` is set to 8 tokens" in caplog.text


@pytest.mark.slow
def test_images_per_prompt_over_data(pipes):
    """num_images_per_prompt=2 of two prompts with CFG on data=2 == diffusers given each prompt twice. (diffusers'
    own num_images_per_prompt repeats the states per prompt, [p0, p0, p1, p1], but tiles the masks, [m0, m1, m0, m1]:
    prompts of different lengths get each other's masks there; here each sample keeps its prompt's mask.) Without
    CFG (guidance 1) too."""
    tp, _, folder = pipes
    lat = initial_latents(4, seed=7)
    pipe = Lumina2Pipeline.from_pretrained(folder, mesh=build_mesh("data=2"))
    twice = [p for p in PROMPTS for _ in range(2)]
    for g in (2.0, 1.0):
        kw = dict(output_type="latent", guidance_scale=g)
        # measured 9.8e-7 (CFG) and 8.3e-7 (none) at latents O(3.6-3.8)
        _close_latents(run_ours(pipe, PROMPTS, lat, num_images_per_prompt=2, **kw), run_torch(tp, twice, lat, **kw))


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over both stacks (the noise refiner's 1 layer, the main layers' 2, looped; the caption sliced with
    the patches) with CFG: == the same patched rule run on one device (pipefusion_patches=2)."""
    _, ours, folder = pipes
    lat = initial_latents(1, seed=5)
    kw = dict(output_type="latent", num_inference_steps=3, guidance_scale=2.0, negative_prompt=NEGATIVE)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(Lumina2Pipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(Lumina2Pipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=2")), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()  # measured 0 (the same program order), latents O(3.3)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ: measured 5.5e-2)
    cfg_pf = run_ours(Lumina2Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,pipefusion=2,ulysses=2")),
                      PROMPT, lat, **kw)
    # with the CFG halves split and Ulysses inside each patch: float reordering, measured 6.0e-7
    np.testing.assert_allclose(cfg_pf, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_compile_step(pipes):
    _, ours, _ = pipes
    compiled = ours.compile_step(2, height=H, width=W, num_inference_steps=STEPS, guidance_scale=2.0, caption_tokens=40)
    shapes = [a.shape for a in jax.tree.leaves(compiled.args_info) if hasattr(a, "shape")]
    assert (4, 64, 24) in shapes and (2,) + LATENT in shapes  # [prompt; negative] x 2 captions of 64; the latents


def test_bad_requests(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=72, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        Lumina2Pipeline.from_pretrained(folder, mesh=build_mesh("cfg=2"))(PROMPT, height=H, width=W,
                                                                          guidance_scale=1.0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(PROMPT, height=H, width=W, max_sequence_length=600)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(None, prompt_embeds=np.zeros((1, 3, 24), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="right padding"):
        ours(None, prompt_embeds=np.zeros((1, 3, 24), np.float32), prompt_attention_mask=np.array([[0, 1, 1]]),
             guidance_scale=1.0, height=H, width=W)


def test_full_size_configs_folder():
    """configs/lumina-image-2.0 (diffusers' layout of Alpha-VLLM/Lumina-Image-2.0) reads into the modules' configs;
    its defaults are the CLI's; the release's sizes pass the checks, bad ones are named."""
    import json
    from pathlib import Path

    from flax import nnx

    from xdit_jax import cli
    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.models import gemma2, lumina2
    from xdit_jax.pipelines import lumina2 as lp
    from xdit_jax.schedulers import flow_match

    root = Path(__file__).resolve().parents[1] / "configs" / "lumina-image-2.0"
    cfgs = {}
    for name, cls in model_components(root).items():
        _, cfg_cls = model_class(cls)
        cfgs[name] = cfg_cls.from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = lp.read_configs(root)
    assert (tc.dim, tc.n_layers, tc.n_heads, tc.kv_heads, tc.n_refiner_layers) == (2304, 26, 24, 8, 2)
    assert (tc.attention_head_dim, tc.ffn_dim, tc.adaln_dim) == (96, 9216, 1024)
    assert tc.cap_feat_dim == cfgs["text_encoder"].hidden_size == 2304
    assert vc.latent_channels == tc.in_channels == 16 and vc.shift_factor is not None
    sched = flow_match.FlowMatchEulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
    assert sched.shift == 6.0 and not sched.use_dynamic_shifting
    defaults = json.loads((root / "defaults.json").read_text())
    assert {k: defaults[k] for k in ("height", "width")} == lp.default_size(tc, vc) == {"height": 1024, "width": 1024}
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (
        cli.DEFAULTS["lumina2"]["steps"], cli.DEFAULTS["lumina2"]["guidance_scale"]) == (30, 4.0)
    lp.check_request(tc, vc, 1024, 1024, 1, "cfg=2,ulysses=4", 4.0)
    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    # abstract builds (nothing allocated): the 2.6B transformer (diffusers' module of this config on the meta device:
    # 2,609,769,152 too), Gemma 2 2B (tied embeddings)
    assert count(nnx.eval_shape(lambda: lumina2.Lumina2Transformer2DModel(tc))) == 2_609_769_152
    assert count(nnx.eval_shape(lambda: gemma2.Gemma2Model(cfgs["text_encoder"]))) == 2_614_341_888
    with pytest.raises(ValueError, match="multiples of 16"):
        lp.check_request(tc, vc, 1000, 1024)


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of lumina2-tiny (24 image tokens, a 32-token caption of which 20 kept, CFG: 2
    samples) against diffusers' transformer on one device and cfg=2,ulysses=3; the compiled program's FLOPs == the
    analytic count; the full-size folder read as Lumina 2 (not Z-Image) with its shapes, nothing compiled."""
    from xdit_jax import bench
    from xdit_jax.bench_families import family_of_config

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="lumina2-tiny", meshes=[None, "cfg=2,ulysses=3"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ulysses=3", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "lumina2" and r["latent_shape"] == [2, 4, 8, 12] and r["image_tokens"] == 24
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["cfg=2,ulysses=3"]):
        # same weights and inputs, fp32, outputs O(1): measured 4.8e-7 (one device) and 4.8e-7 (cfg=2,ulysses=3); a
        # mask, RoPE position or K/V-head slip moves them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-5
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert {"lumina2-tiny", "lumina2-cpu-small", *bench.LUMINA2_MODELS} <= set(bench.PRESET_HELP)
    w = bench.load_workload("lumina-image-2.0")
    assert w.family == "lumina2" and w.cfg and w.latent_shape() == (2, 16, 128, 128)
    assert w.fam.tokens(w) == (64 * 64, 128)
    assert family_of_config({k: v for k, v in w.transformer.items() if k != "_class_name"}) == "lumina2"
