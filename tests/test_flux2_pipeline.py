"""The FLUX.2 klein pipeline from a diffusers save_pretrained folder == diffusers' Flux2KleinPipeline (tiny random
weights, fp32): its Qwen3 prompt embeddings, latents and decoded image; a cfg x ring x ulysses mesh == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_flux2_klein, pipeline_runs, torch_and_our_pipeline
from xdit_jax.mesh import build_mesh
from xdit_jax.models import qwen3
from xdit_jax.pipelines.flux2 import Flux2KleinPipeline, compute_empirical_mu

PROMPT = "A small dog running on a beach at sunset."
PROMPTS = [PROMPT, "A cat."]
# 64 x 64 images: latents (16, 4, 4) = 16 image tokens; 2 steps; 32 Qwen3 tokens (every one kept, padding included)
H, W, STEPS, TOKENS = 64, 64, 2, 32
LATENT = (16, 4, 4)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_flux2_klein, Flux2KleinPipeline, tmp_path_factory, "flux2")


initial_latents, run_torch, run_ours = pipeline_runs(
    LATENT, dict(height=H, width=W, num_inference_steps=STEPS, max_sequence_length=TOKENS))


# Latents O(4.5) after 2 Euler steps, fp32 both sides: measured 1.4e-6 (CFG 3, one prompt), the rounding of two
# fp32 implementations; 1e-5 of the scale leaves room; a wrong layer, template, bn statistic, shift or patch
# order moves them by 1e-2+.
_close_latents = assert_close_latents


def test_prompt_embeds_match_diffusers(pipes):
    """``_get_qwen3_prompt_embeds``: the chat template without thinking, hidden states 9, 18, 27 (the last after the
    final norm in this 27-layer encoder) stacked into the features; and other layer sets (the embeddings, negative
    indices) against transformers' hidden_states."""
    tp, ours, _ = pipes
    with torch.no_grad():
        ref = tp._get_qwen3_prompt_embeds(tp.text_encoder, tp.tokenizer, PROMPTS, max_sequence_length=TOKENS).numpy()
    out = np.asarray(ours.encode_prompt(PROMPTS, TOKENS))
    assert out.shape == ref.shape == (2, TOKENS, 72)
    # fp32, features O(17) after 27 random layers: measured 3.3e-5 (2e-6 of the scale)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    ids, mask = qwen3.tokenize(ours.tokenizer, PROMPTS, TOKENS, enable_thinking=False)
    layers = (0, 4, -2)
    with torch.no_grad():
        hs = tp.text_encoder(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                             output_hidden_states=True).hidden_states
    ref = torch.stack([hs[k] for k in layers], dim=1).permute(0, 2, 1, 3).reshape(2, TOKENS, -1).numpy()
    out = np.asarray(jax.jit(qwen3.stacked_hidden_states, static_argnums=3)(ours.text_encoder, jnp.asarray(ids),
                                                                           jnp.asarray(mask), layers))
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    with pytest.raises(ValueError, match="text_encoder_out_layers"):
        qwen3.stacked_hidden_states(ours.text_encoder, ids, mask, (9, 28))


def test_empirical_mu_matches_diffusers():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as ref

    for n, steps in [(16, 2), (4096, 4), (4301, 50), (1024, 28)]:
        assert compute_empirical_mu(n, steps) == ref(n, steps)


def test_cfg_image_matches_diffusers(pipes):
    """One prompt, CFG 3 (negative ""): the latents (diffusers' de-normalised, unpatchified ones), then the image."""
    tp, ours, _ = pipes
    lat = initial_latents()
    kw = dict(guidance_scale=3.0)
    _close_latents(run_ours(ours, PROMPT, lat, output_type="latent", **kw),
                   run_torch(tp, PROMPT, lat, output_type="latent", **kw))
    ref = run_torch(tp, PROMPT, lat, output_type="np", **kw)
    out = run_ours(ours, PROMPT, lat, **kw)
    assert out.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # pixels in [0, 1]: measured 2.4e-6


@pytest.fixture(scope="module")
def cfg_two_prompts(pipes):
    tp, ours, _ = pipes
    lat = initial_latents(2, seed=1)
    kw = dict(output_type="latent", guidance_scale=2.5)
    return lat, run_torch(tp, PROMPTS, lat, **kw), run_ours(ours, PROMPTS, lat, **kw)


def test_two_prompts_match_diffusers(cfg_two_prompts):
    _, ref, out = cfg_two_prompts  # measured 1.5e-6 at O(4.5)
    _close_latents(out, ref)


def test_mesh_equals_one_device(pipes, cfg_two_prompts):
    """cfg=2 x ring=2 x ulysses=2: the halves over cfg, 16 image / 32 text / 48 joint tokens over ring x ulysses
    (2 heads: Ulysses pads them), the VAE decode split over the 8 devices."""
    _, _, folder = pipes
    lat, _, one = cfg_two_prompts
    pipe = Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,ring=2,ulysses=2"))
    out = run_ours(pipe, PROMPTS, lat, output_type="latent", guidance_scale=2.5)
    np.testing.assert_allclose(out, one, atol=2e-5, rtol=0)  # float reordering only: measured 1.4e-6, latents O(4.5)


@pytest.mark.slow
def test_distilled_and_prompt_embeds(pipes):
    """``prompt_embeds`` == the prompt; a step-distilled checkpoint (is_distilled) runs without CFG at any guidance
    scale, as diffusers (== guidance 1)."""
    tp, ours, _ = pipes
    lat = initial_latents(seed=2)
    with torch.no_grad():
        pe = tp._get_qwen3_prompt_embeds(tp.text_encoder, tp.tokenizer, [PROMPT], max_sequence_length=TOKENS)
    kw = dict(output_type="latent", num_inference_steps=1)
    ref = run_torch(tp, PROMPT, lat, guidance_scale=1.0, **kw)
    _close_latents(run_ours(ours, None, lat, prompt_embeds=pe.numpy(), guidance_scale=1.0, **kw), ref)
    ours.is_distilled = True
    try:
        np.testing.assert_array_equal(run_ours(ours, PROMPT, lat, guidance_scale=4.0, **kw),
                                      run_ours(ours, PROMPT, lat, guidance_scale=1.0, **kw))
    finally:
        ours.is_distilled = False


def reference_images():
    """A 100 x 70 image (centre-cropped to 96 x 64) and a 64 x 64 one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]


def test_reference_image_matches_diffusers(pipes):
    """A reference image (100 x 70, cropped to 96 x 64, VAE-encoded, patchified and normalised, ids t = 10) appended to
    the noisy tokens, with CFG: == diffusers; it changes the result."""
    tp, ours, _ = pipes
    lat = initial_latents(1, seed=3)
    kw = dict(output_type="latent", guidance_scale=2.5)
    out = run_ours(ours, PROMPT, lat, image=reference_images()[0], **kw)
    ref = run_torch(tp, PROMPT, lat, image=reference_images()[0], **kw)
    _close_latents(out, ref)  # measured 3e-7 at O(4.5)
    # the image really entered (tiny random weights: measured 0.046, 1000x the tolerance)
    assert np.abs(out - run_ours(ours, PROMPT, lat, **kw)).max() > 0.01


@pytest.mark.slow
def test_reference_images_sizes_and_mesh(pipes):
    """Two reference images of different sizes (ids t = 10, 20) == diffusers; the output size defaults to the first
    image's cropped size (64 x 96), the image == diffusers; the reference tokens over cfg=2 x ulysses=3 == one
    device."""
    tp, ours, folder = pipes
    kw = dict(output_type="latent", guidance_scale=2.5)
    _close_latents(run_ours(ours, PROMPT, initial_latents(), image=reference_images(), **kw),
                   run_torch(tp, PROMPT, initial_latents(), image=reference_images(), **kw))  # measured 9.5e-7
    lat = np.random.default_rng(4).standard_normal((1, 16, 4, 6)).astype(np.float32)
    image = reference_images()[0]
    with torch.no_grad():
        ref = tp(prompt=PROMPT, image=image, latents=torch.from_numpy(lat), num_inference_steps=STEPS,
                 max_sequence_length=TOKENS, output_type="np", guidance_scale=1.0).images
    out = ours(PROMPT, image=image, latents=lat, num_inference_steps=STEPS, max_sequence_length=TOKENS,
               guidance_scale=1.0, progress=False).images
    assert out.shape == ref.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # measured 3.1e-6
    kw = dict(kw, image=reference_images())
    one = run_ours(ours, PROMPT, initial_latents(), **kw)
    mesh = run_ours(Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,ulysses=3")), PROMPT,
                    initial_latents(), **kw)
    np.testing.assert_allclose(mesh, one, atol=2e-5, rtol=0)  # measured 7.2e-7


def test_bad_input(pipes):
    _, ours, folder = pipes
    lat = initial_latents()
    with pytest.raises(ValueError, match="too small"):
        run_ours(ours, PROMPT, lat, image=np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        run_ours(ours, PROMPT, lat, image=np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 16"):
        run_ours(ours, PROMPT, None, height=72)
    with pytest.raises(ValueError, match="expected"):
        run_ours(ours, PROMPT, lat[:, :8])
    with pytest.raises(ValueError, match="cfg=2"):
        run_ours(Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("cfg=2")), PROMPT, lat,
                 guidance_scale=1.0)


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over both stacks (2 + 2 blocks, looped; the text sliced with the patches) with CFG == the same
    patched rule on one device (pipefusion_patches=2)."""
    _, ours, folder = pipes
    lat = initial_latents(1, seed=5)
    kw = dict(output_type="latent", num_inference_steps=3, guidance_scale=2.0)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(Flux2KleinPipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=2")), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ)
    cfg_pf = run_ours(Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,pipefusion=2,ulysses=2")),
                      PROMPT, lat, **kw)
    np.testing.assert_allclose(cfg_pf, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    # with a reference image's tokens in the patched sequence: measured 6.0e-7 (patched vs exact: 1.9e-3)
    kw["image"] = reference_images()[0]
    ref = run_ours(Flux2KleinPipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(Flux2KleinPipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=2")), PROMPT, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)


def test_full_size_configs_folder():
    """configs/flux.2-klein-4b (diffusers' layout of black-forest-labs/FLUX.2-klein-4B) reads into the modules'
    configs; its defaults are the CLI's for a step-distilled klein; the release's sizes pass the checks."""
    import json
    from pathlib import Path

    from flax import nnx

    from xdit_jax import cli
    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.models import flux2, llama
    from xdit_jax.pipelines import flux2 as fp
    from xdit_jax.schedulers import flow_match

    root = Path(__file__).resolve().parents[1] / "configs" / "flux.2-klein-4b"
    cfgs = {}
    for name, cls in model_components(root).items():
        _, cfg_cls = model_class(cls)
        cfgs[name] = cfg_cls.from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = fp.read_configs(root)
    assert (tc.inner_dim, tc.num_layers, tc.num_single_layers, tc.axes_dims_rope) == (3072, 5, 20, (32,) * 4)
    assert tc.joint_attention_dim == 3 * cfgs["text_encoder"].hidden_size == 7680 and not tc.guidance_embeds
    assert vc.bn_channels == tc.in_channels == 128 and fp.is_distilled(root)
    sched = flow_match.FlowMatchEulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
    assert sched.use_dynamic_shifting
    defaults = json.loads((root / "defaults.json").read_text())
    assert {k: defaults[k] for k in ("height", "width")} == fp.default_size(tc, vc) == {"height": 1024, "width": 1024}
    d = cli.DEFAULTS["flux2"]
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (d["distilled_steps"],
                                                                            d["distilled_guidance_scale"]) == (4, 1.0)
    fp.check_request(tc, vc, 1024, 1024, 1, "ulysses=4", False)
    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    # abstract builds (nothing allocated): the 3.9B transformer ("4B"; == diffusers' built on the meta device),
    # Qwen3-4B (tied embeddings)
    assert count(nnx.eval_shape(lambda: flux2.Flux2Transformer2DModel(tc))) == 3_875_544_576
    assert count(nnx.eval_shape(lambda: llama.LlamaModel(cfgs["text_encoder"]))) == 4_022_468_096
    with pytest.raises(ValueError, match="multiples of 16"):
        fp.check_request(tc, vc, 1000, 1024)


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of flux2-tiny (15 image + 16 text tokens) against diffusers' transformer on one
    device (ring=2 x ulysses=2 too in the slow set: measured the same 2.4e-7); the compiled program's FLOPs == the
    analytic count; the full-size folder read as FLUX.2 (not FLUX.1) with its shapes, nothing compiled."""
    from xdit_jax import bench
    from xdit_jax.bench_families import family_of_config

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="flux2-tiny", meshes=[None], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "flux2" and r["latent_shape"] == [1, 15, 16] and r["image_tokens"] == 15
    by_mesh = {r["mesh"]: r for r in rows}
    # same weights and inputs, fp32, outputs O(1): measured 2.4e-7; a RoPE / modulation slip: O(0.1)
    assert by_mesh["single device"]["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("flux.2-klein-4b")
    assert w.family == "flux2" and not w.cfg and w.latent_shape() == (1, 4096, 128)
    assert w.fam.tokens(w) == (4096, 512)
    assert family_of_config(json_config("flux.2-klein-4b")) == "flux2"
    assert family_of_config(json_config("flux.1-dev")) == "flux"


def json_config(name):
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    return json.loads((root / name / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def dev_pipes(tmp_path_factory):
    """FLUX.2-dev: (torch Flux2Pipeline, ours, converted folder)."""
    from tests.fixtures import make_torch_flux2_dev
    from xdit_jax.pipelines.flux2 import Flux2Pipeline

    return torch_and_our_pipeline(make_torch_flux2_dev, Flux2Pipeline, tmp_path_factory, "flux2dev")


def test_dev_matches_diffusers(dev_pipes):
    """FLUX.2-dev (diffusers' Flux2Pipeline): Mistral 3's hidden states 10, 20, 30 of the system + user chat; two
    prompts with the guidance scale embedded (no CFG): the packed latents diffusers returns; the image of one."""
    tp, ours, _ = dev_pipes
    with torch.no_grad():
        ref = tp._get_mistral_3_small_prompt_embeds(tp.text_encoder, tp.tokenizer, PROMPTS,
                                                    max_sequence_length=TOKENS).numpy()
    out = np.asarray(ours.encode_prompt(PROMPTS, TOKENS))
    assert out.shape == ref.shape == (2, TOKENS, 72)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)  # measured 2.8e-5 of 13.6
    lat = initial_latents(2, seed=1)
    kw = dict(output_type="latent", guidance_scale=3.5)
    _close_latents(run_ours(ours, PROMPTS, lat, **kw), run_torch(tp, PROMPTS, lat, **kw))  # measured 4.8e-7 of 2.9
    with pytest.raises(ValueError, match="no negative prompt"):
        run_ours(ours, PROMPT, lat[:1], negative_prompt="blurry")


@pytest.mark.slow
def test_dev_image_and_mesh(dev_pipes):
    """FLUX.2-dev's decoded image == diffusers; over data=2 x ring=2 x ulysses=2 (two prompts, one sample each) == one
    device."""
    tp, ours, folder = dev_pipes
    from xdit_jax.pipelines.flux2 import Flux2Pipeline

    lat = initial_latents(1, seed=1)
    ref = run_torch(tp, PROMPT, lat, output_type="np", guidance_scale=2.0)
    np.testing.assert_allclose(run_ours(ours, PROMPT, lat, guidance_scale=2.0), ref, atol=2e-5,
                               rtol=0)  # measured 2.3e-6
    lat = initial_latents(2, seed=6)
    kw = dict(output_type="latent", guidance_scale=3.5)
    one = run_ours(ours, PROMPTS, lat, **kw)
    out = run_ours(Flux2Pipeline.from_pretrained(folder, mesh=build_mesh("data=2,ring=2,ulysses=2")), PROMPTS, lat,
                   **kw)
    np.testing.assert_allclose(out, one, atol=2e-5, rtol=0)  # float reordering only


def test_dev_full_size_configs_folder():
    """configs/flux.2-dev reads into the modules' configs (transformer 32.2B == diffusers' meta build; Mistral 3's
    language model 5120 wide: 3 x 5120 = joint_attention_dim) and as the FLUX.2 bench family, guidance embedded."""
    import json
    from pathlib import Path

    from flax import nnx

    from xdit_jax import bench
    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.models import flux2
    from xdit_jax.pipelines import flux2 as fp

    root = Path(__file__).resolve().parents[1] / "configs" / "flux.2-dev"
    cfgs = {name: model_class(cls)[1].from_dict(json.loads((root / name / "config.json").read_text()))
            for name, cls in model_components(root).items()}
    tc, vc = fp.read_configs(root)
    assert tc.guidance_embeds and tc.joint_attention_dim == 3 * cfgs["text_encoder"].hidden_size == 15360
    assert vc.bn_channels == tc.in_channels == 128 and not fp.is_distilled(root)
    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(nnx.eval_shape(lambda: flux2.Flux2Transformer2DModel(tc))) == 32_223_281_152
    w = bench.load_workload("flux.2-dev")
    assert w.family == "flux2" and not w.cfg and w.latent_shape() == (1, 4096, 128)
