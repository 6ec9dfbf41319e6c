"""scripts/benchmark.py's step for SANA-Video and Wan VACE: the full-size folders and tiny presets read with their
pipelines' shapes and inputs, the family of a config without a class name (default, nothing compiled); slow: each tiny
preset against diffusers' transformer on the same weights and inputs with the compiled program's FLOPs == the
analytic formula, a sequence mesh, PipeFusion, the full-size parameter counts == diffusers' on the meta device."""

import numpy as np
import pytest

from tests.jax_util import bench_rows_vs_diffusers, full_size_parameter_counts
from xdit_jax import bench
from xdit_jax.bench_families import family_of_config

_rows = bench_rows_vs_diffusers


def test_sana_video_workloads():
    """sana-video-tiny's and the 2B release folder's shapes (81 x 480 x 832 through Wan's VAE) and inputs; FLOPs linear
    in the CFG batch; the family of a config without a class name; nothing compiled."""
    assert {"sana-video-tiny", "sana-video-cpu-small", *bench.SANA_VIDEO_MODELS} <= set(bench.PRESET_HELP)
    w = bench.load_workload("sana-video-tiny")
    assert w.family == "sana_video" and w.cfg and w.latent_shape() == (2, 4, 3, 4, 6) and w.fam.tokens(w) == (18, 16)
    assert [a.shape for a in w.fam.make_inputs(w).values()] == [(2, 4, 3, 4, 6), (2, 16, 24), (2,), (2, 16)]
    assert w.fam.analytic_flops(w)["total"] == 2 * w.fam.analytic_flops(bench.load_workload("sana-video-tiny",
                                                                                            cfg=False))["total"]
    w = bench.load_workload("sana-video-2b-480p")
    assert w.family == "sana_video" and w.cfg and (w.num_frames, w.height, w.width) == (81, 480, 832)
    assert w.latent_shape() == (2, 16, 21, 60, 104) and w.fam.tokens(w) == (21 * 30 * 52, 300)
    assert w.fam.make_inputs(w)["mask"].sum(axis=1).tolist() == [1, 40]  # the negative prompt "": its BOS
    t = {k: v for k, v in w.transformer.items() if k != "_class_name"}
    assert family_of_config(t) == "sana_video"
    assert family_of_config({k: v for k, v in t.items() if k != "rope_max_seq_len"}) == "sana"


def test_wan_vace_workloads():
    """wan-vace-tiny's and the VACE release folders' shapes (81 x 480 x 832) and inputs (random control latents at the
    video's frames, the same for both CFG halves; scale 1 per VACE layer); --layers keeps the VACE layers below it."""
    assert {"wan-vace-tiny", "wan-vace-cpu-small", *bench.WAN_VACE_MODELS} <= set(bench.PRESET_HELP)
    w = bench.load_workload("wan-vace-tiny")
    assert w.family == "wan_vace" and w.cfg and w.latent_shape() == (2, 4, 3, 4, 6) and w.fam.tokens(w) == (18, 16)
    inputs = w.fam.make_inputs(w)
    assert [a.shape for a in inputs.values()] == [(2, 4, 3, 4, 6), (2, 16, 32), (2,), (2, 72, 3, 4, 6), (2, 2)]
    assert np.array_equal(inputs["control"][0], inputs["control"][1])
    w = bench.load_workload("wan2.1-vace-14b")
    assert w.family == "wan_vace" and (w.num_frames, w.height, w.width) == (81, 480, 832)
    assert w.latent_shape() == (2, 16, 21, 60, 104) and w.fam.tokens(w) == (32760, 512)
    assert w.transformer["vace_layers"] == list(range(0, 40, 5)) and w.fam.make_inputs(w)["control"].shape[1] == 96
    flops = w.fam.analytic_flops(w)
    assert flops["total"] == pytest.approx(flops["per_block"] * 40 + flops["vace"], rel=0.01)
    assert w.fam.with_layers(w.transformer, 12)["vace_layers"] == [0, 5, 10]
    assert bench.load_workload("wan2.1-vace-1.3b").transformer["vace_layers"] == list(range(0, 30, 2))
    assert family_of_config({k: v for k, v in w.transformer.items() if k != "_class_name"}) == "wan_vace"


@pytest.mark.slow
@pytest.mark.parametrize("model,family,shape", [("sana-video-tiny", "sana_video", [2, 4, 3, 4, 6]),
                                                ("wan-vace-tiny", "wan_vace", [2, 4, 3, 4, 6])])
def test_rows_vs_diffusers(monkeypatch, model, family, shape):
    """The tiny presets on one device against diffusers (fp32); the compiled program's FLOPs == the formula."""
    one = _rows(monkeypatch, model, [None])["single device"]
    assert one["family"] == family and one["latent_shape"] == shape and one["video_tokens"] == 18


@pytest.mark.slow
@pytest.mark.parametrize("model,mesh", [("sana-video-tiny", "cfg=2,ring=2,ulysses=2"),
                                        ("wan-vace-tiny", "cfg=2,ulysses=3")])
def test_sequence_mesh_rows_vs_diffusers(monkeypatch, model, mesh):
    """The tiny presets on a sequence mesh (the 18 tokens padded to the degree) against diffusers."""
    _rows(monkeypatch, model, [mesh])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sana-video-tiny", "wan-vace-tiny"])
def test_pipefusion_rows_run(monkeypatch, model):
    """PipeFusion's patched step (stale buffers: not compared) compiles and runs: SANA-Video's token-mixer buffers
    with a frame's halo, Wan VACE's two looped stacks."""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model=model, meshes=["pipefusion=2", "cfg=2,pipefusion=2"],
                                                      steps=1, settle=0, log=lambda s: None))
    assert len(rows) == 2
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["pipefusion_patches"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sana-video-2b-480p", "wan2.1-vace-14b", "wan2.1-vace-1.3b"])
def test_full_size_parameter_count(name):
    """The full-size folders: our module's parameters (shapes only) count diffusers' on the meta device."""
    ours, theirs = full_size_parameter_counts(name)
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("sana-video-2b-480p", dict(layers=2, height=128, width=128, num_frames=17)),
                                     ("wan2.1-vace-14b", dict(layers=6, height=128, width=128, num_frames=17))])
def test_full_width_flops_compile_only(name, kw):
    """The full-size folders at full width with a few blocks (Wan VACE: 6 main blocks, VACE blocks after 0 and 5),
    small sizes, compiled on abstract shapes (no weights): the compiled program's dots are the analytic count;
    cfg=2,pipefusion=2 compiles."""
    rows = bench.run_step_benchmark(bench.StepOptions(model=name, meshes=[None, "cfg=2,pipefusion=2"],
                                                      compile_only=True, log=lambda s: None, **kw))
    by_mesh = {r["mesh"]: r for r in rows}
    for r in rows:
        assert "error" not in r, r.get("error")
    row = by_mesh["single device"]
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("model,mesh", [("sana-video-tiny", "cfg=2"), ("wan-vace-tiny", None)])
def test_e2e(model, mesh):
    """--e2e builds the family's pipeline from xdit_jax.tiny's configs with random weights and times its stages
    (Wan VACE: WanVACEPipeline without a video, as diffusers: a zero video, the mask all ones)."""
    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model=model, meshes=[mesh], log=lambda s: None), steps=2)
    assert row["kind"] == "e2e" and "error" not in row, row.get("error")
    assert row["output_shape"] == [1, 9, 32, 48, 3] and row["mesh"] == (mesh or "single device")
    assert row["warm_stages_s"]["denoising"] > 0
