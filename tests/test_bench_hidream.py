"""scripts/benchmark.py's step for HiDream-I1: the full-size folder and tiny presets read with the pipeline's shapes
and inputs, the family of a config without a class name (default, nothing compiled); slow: the tiny preset against
diffusers' transformer on the same weights and inputs with the compiled program's FLOPs == the analytic formula (the
mixture of experts dense, as our model runs it), a sequence mesh, PipeFusion, the full-size parameter count ==
diffusers' on the meta device, the full width compiled on abstract shapes."""

import pytest

from tests.jax_util import bench_rows_vs_diffusers, full_size_parameter_counts
from xdit_jax import bench
from xdit_jax.bench_families import family_of_config

_rows = bench_rows_vs_diffusers


def test_hidream_workloads():
    """hidream-tiny's and HiDream-I1-Full's shapes (1024 x 1024: 4,096 image tokens; 128 T5 + 128 Llama tokens, the
    32 Llama layers batch first) and inputs; FLOPs linear in the CFG batch, the dense experts' excess over diffusers'
    top-k work; --layers keeps each block's Llama layer; the family of a config without a class name."""
    assert {"hidream-tiny", "hidream-cpu-small", *bench.HIDREAM_MODELS} <= set(bench.PRESET_HELP)
    w = bench.load_workload("hidream-tiny")
    assert w.family == "hidream" and w.cfg and w.latent_shape() == (2, 4, 8, 8) and w.fam.tokens(w) == (16, 32)
    assert [a.shape for a in w.fam.make_inputs(w).values()] == [(2, 4, 8, 8), (2, 16, 32), (2, 3, 16, 32), (2, 32),
                                                                (2,)]
    assert w.fam.analytic_flops(w)["total"] == 2 * w.fam.analytic_flops(bench.load_workload("hidream-tiny",
                                                                                            cfg=False))["total"]
    w = bench.load_workload("hidream-i1-full")
    assert w.family == "hidream" and w.cfg and (w.height, w.width) == (1024, 1024)
    assert w.latent_shape() == (2, 16, 128, 128) and w.fam.tokens(w) == (4096, 256)
    assert w.fam.llama_layers(w) == 32
    flops = w.fam.analytic_flops(w)
    assert flops["total"] == pytest.approx(16 * flops["per_block"] + 32 * flops["per_single_block"], rel=0.01)
    assert 0.3 < flops["moe_dense_excess"] / flops["total"] < 0.4  # half the routed experts' work is zero-weighted
    t = w.fam.with_layers(w.transformer, 2)
    assert (t["num_layers"], t["num_single_layers"], t["llama_layers"]) == (2, 2, [0, 1, 16, 17])
    assert family_of_config({k: v for k, v in w.transformer.items() if k != "_class_name"}) == "hidream"


@pytest.mark.slow
def test_rows_vs_diffusers(monkeypatch):
    """The tiny preset on one device and cfg=2,ring=2,ulysses=2 against diffusers (fp32); the compiled program's FLOPs
    == the formula (every routed expert on every token)."""
    rows = _rows(monkeypatch, "hidream-tiny", [None, "cfg=2,ring=2,ulysses=2"])
    one = rows["single device"]
    assert one["family"] == "hidream" and one["latent_shape"] == [2, 4, 8, 8] and one["image_tokens"] == 16


@pytest.mark.slow
def test_pipefusion_rows_run(monkeypatch):
    """PipeFusion's patched step (stale buffers: not compared) compiles and runs: both stacks looped over the stages,
    each patch carrying the whole text stream."""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model="hidream-tiny", meshes=["pipefusion=2",
                                                                                    "cfg=2,pipefusion=2"],
                                                      steps=1, settle=0, log=lambda s: None))
    assert len(rows) == 2
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["pipefusion_patches"] == 2


@pytest.mark.slow
def test_full_size_parameter_count():
    """configs/hidream-i1-full: our module's parameters (shapes only) count diffusers' on the meta device."""
    ours, theirs = full_size_parameter_counts("hidream-i1-full")
    assert ours == theirs and 16e9 < ours < 18e9


@pytest.mark.slow
def test_full_width_flops_compile_only():
    """The full-size folder at full width with 2 + 2 blocks at 256 x 256, compiled on abstract shapes (no weights):
    the compiled program's dots are the analytic count; cfg=2,pipefusion=2 compiles."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="hidream-i1-full", meshes=[None, "cfg=2,pipefusion=2"],
                                                      compile_only=True, log=lambda s: None, layers=2, height=256,
                                                      width=256))
    by_mesh = {r["mesh"]: r for r in rows}
    for r in rows:
        assert "error" not in r, r.get("error")
    row = by_mesh["single device"]
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)


@pytest.mark.slow
def test_e2e():
    """--e2e builds HiDreamImagePipeline from xdit_jax.tiny's configs with random weights (its default_sample_size set
    to the workload's area: 64 x 64, as the tests) and times its stages, CFG over cfg=2."""
    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model="hidream-tiny", meshes=["cfg=2"], log=lambda s: None),
                                     steps=2)
    assert row["kind"] == "e2e" and "error" not in row, row.get("error")
    assert row["output_shape"] == [1, 64, 64, 3] and row["mesh"] == "cfg=2"
    assert row["warm_stages_s"]["denoising"] > 0
