"""scripts/benchmark.py's step for Cosmos-Predict2 (Text2Image, Video2World) and LongCat-Image: the full-size folders
and tiny presets read with the pipelines' shapes and inputs, the family of a config without a class name (default,
nothing compiled); slow: the tiny presets against diffusers' transformers on the same weights and inputs with the
compiled program's FLOPs == the analytic formula, a sequence mesh, PipeFusion, the full-size parameter counts ==
diffusers' on the meta device."""

import pytest

from tests.jax_util import bench_rows_vs_diffusers, full_size_parameter_counts
from xdit_jax import bench
from xdit_jax.bench_families import family_of_config

_rows = bench_rows_vs_diffusers


def test_cosmos_longcat_workloads():
    """Cosmos-Predict2 2B Text2Image (768 x 1360: 1 x 48 x 85 = 4,080 tokens) and Video2World (93 x 704 x 1280: 24 x
    44 x 80 = 84,480 tokens, a timestep per latent frame, the condition mask, fps), LongCat-Image at 1024 x 1024
    (4,096 image + 512 text tokens, the image ids after the text's); CFG doubles the FLOPs; the family of a config
    without a class name."""
    names = {"cosmos-tiny", "cosmos-v2w-tiny", "cosmos-cpu-small", "longcat-tiny", "longcat-cpu-small",
             *bench.COSMOS_MODELS, *bench.LONGCAT_IMAGE_MODELS}
    assert names <= set(bench.PRESET_HELP)
    w = bench.load_workload("cosmos-predict2-2b-text2image")
    assert w.family == "cosmos" and w.cfg and w.latent_shape() == (2, 16, 1, 96, 170) and w.fam.tokens(w) == (4080, 512)
    assert [a.shape for a in w.fam.make_inputs(w).values()] == [(2, 16, 1, 96, 170), (2, 512, 1024), (2,)]
    w = bench.load_workload("cosmos-predict2-2b-video2world")
    assert w.latent_shape() == (2, 16, 24, 88, 160) and w.fam.tokens(w) == (84480, 512) and w.fam.video_to_world(w)
    inputs = w.fam.make_inputs(w)
    assert inputs["t"].shape == (2, 24) and inputs["t"][0, 0] < 1e-3 < inputs["t"][0, 1]
    assert inputs["condition_mask"][:, :, 0].min() == 1 and inputs["condition_mask"][:, :, 1:].max() == 0
    assert family_of_config({k: v for k, v in w.transformer.items() if k != "_class_name"}) == "cosmos"
    w = bench.load_workload("longcat-image")
    assert w.family == "longcat_image" and w.cfg and w.latent_shape() == (2, 4096, 64)
    assert w.fam.tokens(w) == (4096, 512)
    ids = w.fam.make_inputs(w)["img_ids"]
    assert ids.shape == (4096, 3) and ids[0].tolist() == [1, 512, 512]
    flops = w.fam.analytic_flops(w)
    assert flops["total"] == pytest.approx(10 * flops["per_block"] + 20 * flops["per_single_block"], rel=0.01)
    assert flops["total"] == 2 * w.fam.analytic_flops(bench.load_workload("longcat-image", cfg=False))["total"]
    assert family_of_config({k: v for k, v in w.transformer.items() if k != "_class_name"}) == "longcat_image"
    assert family_of_config(bench.load_workload("flux.1-schnell").transformer) == "flux"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cosmos-tiny", "cosmos-v2w-tiny", "longcat-tiny"])
def test_rows_vs_diffusers(monkeypatch, model):
    """The tiny presets on one device and cfg=2,ring=2,ulysses=2 against diffusers (fp32); the compiled program's
    FLOPs == the formula."""
    rows = _rows(monkeypatch, model, [None, "cfg=2,ring=2,ulysses=2"])
    assert rows["single device"]["family"] in ("cosmos", "longcat_image")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cosmos-v2w-tiny", "longcat-tiny"])
def test_pipefusion_rows_run(monkeypatch, model):
    """PipeFusion's patched step (stale buffers: not compared) compiles and runs."""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model=model, meshes=["pipefusion=2", "cfg=2,pipefusion=2"],
                                                      steps=1, settle=0, log=lambda s: None))
    assert len(rows) == 2
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["pipefusion_patches"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name,lo,hi", [("cosmos-predict2-2b-text2image", 1.5e9, 2.5e9),
                                        ("cosmos-predict2-2b-video2world", 1.5e9, 2.5e9),
                                        ("longcat-image", 5e9, 7e9)])
def test_full_size_parameter_count(name, lo, hi):
    """configs/<name>: our module's parameters (shapes only) count diffusers' on the meta device."""
    ours, theirs = full_size_parameter_counts(name)
    assert ours == theirs and lo < ours < hi


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cosmos-predict2-2b-text2image", "longcat-image"])
def test_full_width_flops_compile_only(name):
    """The full-size folders at full width with 2 blocks (LongCat: 2 + 2) at 256 x 256, compiled on abstract shapes (no
    weights): the compiled program's dots are the analytic count (Cosmos 2B without learnable positions: the tiny
    model has them); cfg=2,pipefusion=2 compiles."""
    rows = bench.run_step_benchmark(bench.StepOptions(model=name, meshes=[None, "cfg=2,pipefusion=2"],
                                                      compile_only=True, log=lambda s: None, layers=2, height=256,
                                                      width=256))
    by_mesh = {r["mesh"]: r for r in rows}
    for r in rows:
        assert "error" not in r, r.get("error")
    row = by_mesh["single device"]
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)
