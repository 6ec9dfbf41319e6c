"""The SANA pipeline from a diffusers save_pretrained folder == diffusers' SanaPipeline (latents and decoded
image), on one device and on a mesh; resolution binning tables == diffusers'."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_sana, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.sana import SanaPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, STEPS = 32, 64, 3  # diffusers takes multiples of 32 only: 8 x 16 latents, 128 image tokens
MSL = tiny.SANA_MAX_SEQUENCE_LENGTH


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tp = make_torch_sana()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("sana"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))  # converted on first use
    return tp, SanaPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0, h=H, w=W):
    return np.random.default_rng(seed).standard_normal((batch, 4, h // 4, w // 4)).astype(np.float32)


def test_image_matches_diffusers(pipes):
    """Default complex human instruction (356 prompt tokens selected down to 16), a negative prompt, CFG, DPM-Solver++
    with flow sigmas, DC-AE decode."""
    tp, ours, _ = pipes
    lat = initial_latents()
    with torch.no_grad():
        ref = tp(prompt=PROMPT, negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, use_resolution_binning=False,
                 guidance_scale=4.5, output_type="np").images
    out = ours(PROMPT, NEG, height=H, width=W, num_inference_steps=STEPS, latents=lat, guidance_scale=4.5,
               max_sequence_length=MSL, use_resolution_binning=False, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides, pixels in [0, 1]: measured 2.9e-6; 1e-4 is 1/40 of an 8-bit level, while a wrong token
    # selection, mask or schedule moves pixels by >1e-2 (dropping the instruction moves them by 0.59).
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_latents_match_diffusers_batch_no_cfg(pipes):
    """Two prompts of different lengths, two images each, no instruction, guidance off (no CFG batch). diffusers runs
    each prompt twice instead of num_images_per_prompt=2: its encode_prompt repeats the embeddings per prompt but the
    masks per batch ([P, P, C, C] with masks [P, C, P, C]), a mismatch we do not copy."""
    tp, ours, _ = pipes
    prompts = [PROMPT, "A cat."]
    lat = initial_latents(batch=4, seed=1)
    with torch.no_grad():
        ref = tp(prompt=[p for p in prompts for _ in (0, 1)], height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), guidance_scale=1.0, max_sequence_length=MSL,
                 use_resolution_binning=False, complex_human_instruction=[], output_type="latent").images.numpy()
    out = ours(prompts, height=H, width=W, num_inference_steps=STEPS, latents=lat, guidance_scale=1.0,
               max_sequence_length=MSL, use_resolution_binning=False, complex_human_instruction=[],
               output_type="latent", progress=False, num_images_per_prompt=2).images
    # flow latents of scale 3.7: measured 1.5e-6.
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_qk_norm_timestep_scale_matches_diffusers(tmp_path_factory):
    """SANA 1.5's transformer (q/k RMSNorms in both attentions) on SanaPipeline, with a timestep_scale (diffusers'
    SanaPipeline multiplies the timestep by it): CFG, 2 steps, image."""
    tp = make_torch_sana(seed=3, qk_norm="rms_norm_across_heads", timestep_scale=0.5)
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("sana15"))
    ours = SanaPipeline.from_pretrained(converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache15")))
    lat = initial_latents(seed=4)
    kw = dict(height=H, width=W, num_inference_steps=2, guidance_scale=4.5, max_sequence_length=MSL,
              use_resolution_binning=False)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, negative_prompt=NEG, latents=torch.from_numpy(lat), output_type="np", **kw).images
    out = ours(PROMPT, NEG, latents=lat, progress=False, **kw).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # as test_image_matches_diffusers (fp32, pixels in [0, 1]): measured 2.1e-6; without the timestep_scale the
    # pixels move by 0.18.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", pytest.param("ulysses=3", marks=pytest.mark.slow)])
def test_mesh_matches_one_device(pipes, mesh):
    _, ours, folder = pipes
    lat = initial_latents(seed=2, h=36, w=48)  # 9 x 12 = 108 tokens: padded to 112 over ring x ulysses = 4, 111 over ulysses=3
    kw = dict(height=36, width=48, num_inference_steps=2, latents=lat, max_sequence_length=MSL,
              use_resolution_binning=False, complex_human_instruction=[], progress=False)
    ref = ours(PROMPT, **kw).images
    out = SanaPipeline.from_pretrained(folder, mesh=mesh)(PROMPT, **kw).images
    # parallel output equals one device up to float rounding: measured 5.4e-7 (both meshes).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_resolution_binning_tables_match_diffusers():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    from xdit_jax.pipelines.sana import aspect_ratio_bins, binned_size

    for s, table in {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN,
                     128: ASPECT_RATIO_4096_BIN}.items():
        assert aspect_ratio_bins(s) == {k: (int(h), int(w)) for k, (h, w) in table.items()}
    assert binned_size(1000, 1500, 32) == (832, 1216) and binned_size(100, 100, 8) == (100, 100)


def test_bad_requests(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 4"):
        ours(PROMPT, height=30, width=48, use_resolution_binning=False, progress=False)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the model's 2 layers"):
        SanaPipeline.from_pretrained(folder, mesh="pipefusion=3")
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(prompt_embeds=np.zeros((1, 4, 24), np.float32), progress=False)


def test_full_size_configs_folder():
    """configs/sana-1600m-1024px reads into the modules' configs: the transformer has SANA 1600M's 1604.5M
    parameters, the text encoder gemma-2-2b's 2614M, the DC-AE 32x compression; 1024 x 1024 passes the checks over
    a mesh, PipeFusion too (up to 20 stages)."""
    from pathlib import Path

    import jax
    from flax import nnx

    from xdit_jax.conversion import read_json
    from xdit_jax.models import gemma2, sana
    from xdit_jax.pipelines import sana as sp

    root = Path(__file__).resolve().parents[1] / "configs" / "sana-1600m-1024px"
    tc, vc = sp.read_configs(root)
    gc = gemma2.Gemma2Config.from_dict(read_json(root / "text_encoder" / "config.json"))
    count = lambda make: sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))  # noqa: E731
    assert count(lambda: sana.SanaTransformer2DModel(tc)) == 1_604_462_752
    assert count(lambda: gemma2.Gemma2Model(gc)) == 2_614_341_888
    assert vc.spatial_compression_ratio == 32 and tc.caption_channels == gc.hidden_size
    defaults = read_json(root / "defaults.json")
    assert sp.binned_size(defaults["height"], defaults["width"], tc.sample_size) == (1024, 1024)
    sp.check_request(tc, vc, 1024, 1024, 1, "cfg=2,ulysses=4", defaults["guidance_scale"])
    sp.check_request(tc, vc, 1024, 1024, 1, "cfg=2,pipefusion=4", 4.5)
    with pytest.raises(ValueError, match="pipefusion=40 is more stages than the model's 20 layers"):
        sp.check_request(tc, vc, 1024, 1024, 1, "pipefusion=40", 4.5)
    from xdit_jax.schedulers import dpmsolver

    scfg = dpmsolver.DPMSolverConfig.from_dict(read_json(root / "scheduler" / "scheduler_config.json"))
    assert scfg.use_flow_sigmas and scfg.flow_shift == 3.0 and scfg.prediction_type == "flow_prediction"


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of sana-tiny (96 image + 16 Gemma tokens, 6 real) against diffusers' transformer on
    one device and ulysses=3 (the linear attention's psum and the conv's halos); a PipeFusion row (pipefusion=2, a
    patched step on zero buffers: runs, no diffusers comparison); HLO FLOPs == the analytic formula; the full-size
    folder read as SANA with its shapes, nothing compiled."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="sana-tiny", meshes=[None, "ulysses=3", "pipefusion=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("pipefusion=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers"),
        ("ulysses=3", "xdit_jax")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "sana" and r["latent_shape"] == [2, 4, 8, 12] and r["image_tokens"] == 96
    by_mesh = {r["mesh"]: r for r in rows}
    pf = by_mesh["pipefusion=2"]
    assert pf["pipefusion_patches"] == 2 and pf["pipefusion_layer_slots"] == 2 and pf["step_median_s"] > 0
    assert pf["step_path"] == "embed/run_pipefusion(2 patches)/head"
    for r in (by_mesh["single device"], by_mesh["ulysses=3"]):
        # same weights and inputs, fp32, outputs O(1): measured 5.4e-7 (one device), 7.2e-7 (ulysses=3); a mask or
        # layout slip moves them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("sana-1600m-1024px")
    assert w.family == "sana" and w.cfg and w.latent_shape() == (2, 32, 32, 32)
    assert w.fam.tokens(w) == (1024, 300)


@pytest.mark.slow
def test_benchmark_full_width_rows_vs_diffusers(monkeypatch):
    """sana-cpu-small (SANA 1600M's width: 70 linear heads x 32, GLUMBConv 5600, 2 blocks, 512 x 512: 256 image + 300
    text tokens) against diffusers on one device and cfg=2,ring=2,ulysses=2 (76 s on 2 cores: slow)."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model="sana-cpu-small", meshes=[None, "cfg=2,ring=2,ulysses=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    for mesh in ("single device", "cfg=2,ring=2,ulysses=2"):
        assert "error" not in by_mesh[mesh], by_mesh[mesh].get("error")
        # fp32, outputs O(1): measured 2.5e-6 (one device), 2.1e-6 (the mesh)
        assert by_mesh[mesh]["max_abs_diff_vs_diffusers"] < 1e-4
    assert by_mesh["single device"]["flops_hlo"] == pytest.approx(by_mesh["single device"]["flops_analytic"], rel=1e-9)


@pytest.mark.parametrize("name,pipeline,scheduler", [("sana1.5-1.6b-1024px", "SanaPipeline", "dpmsolver"),
                                                     ("sana-sprint-1.6b-1024px", "SanaSprintPipeline", "scm")])
def test_sana15_and_sprint_configs_folders(name, pipeline, scheduler):
    """configs/sana1.5-1.6b-1024px and configs/sana-sprint-1.6b-1024px: the transformer (q/k norms; Sprint's guidance
    embedder) holds as many weights as diffusers' build of the same config.json (meta device); the folder names our
    pipeline class and a scheduler we run; 1024 x 1024 passes the request checks."""
    import json
    from pathlib import Path

    import jax
    from diffusers import SanaTransformer2DModel as TorchModel
    from flax import nnx

    from xdit_jax.models import sana
    from xdit_jax.pipelines import pipeline_class
    from xdit_jax.pipelines import sana as sp
    from xdit_jax.pipelines.denoise import pipeline_class_name
    from xdit_jax.schedulers import scheduler_from_config

    root = Path(__file__).resolve().parents[1] / "configs" / name
    tc, vc = sp.read_configs(root)
    hub = json.loads((root / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        ref = sum(p.numel() for p in TorchModel(**{k: v for k, v in hub.items() if not k.startswith("_")}).parameters())
    state = nnx.state(nnx.eval_shape(lambda: sana.SanaTransformer2DModel(tc)), nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(state)) == ref
    assert pipeline_class(pipeline_class_name(root)).__name__ == pipeline
    module, _ = scheduler_from_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    assert module.__name__.endswith(scheduler)
    sp.check_request(tc, vc, 1024, 1024, 2, None, 1.0)
