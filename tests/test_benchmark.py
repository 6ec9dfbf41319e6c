"""scripts/benchmark.py: the tiny preset end to end (rows, positive numbers), the GPU-side selection
logic (dtype, device peaks) without a GPU, the analytic FLOPs against the compiled program, the
subcommand dispatch. Smoke tests, not timing assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xdit_jax import bench

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    """The tiny preset against diffusers, 2 timed steps, two extra variants, profiled, --json (a subprocess,
    as a user runs it: its own jax, one CPU device)."""
    prof = tmp_path_factory.mktemp("profile")
    return _run(["step", "--model", "tiny", "--steps", "2", "--json", "--settle", "0", "--compare", "diffusers",
                 "--variant", "heads:attention=heads_major", "--variant", "unroll:scan=unroll",
                 "--variant", "unstacked:scan=unstacked", "--e2e", "1",
                 "--profile", str(prof)])


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    # one CPU device (no simulated devices); LLVM at -O0 as the rest of the suite (conftest): the rows are checked
    # for numbers and presence, not speed
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()], res.stderr


def test_tiny_rows_present_and_positive(tiny_rows):
    rows, stderr = tiny_rows
    assert [r["impl"] for r in rows] == ["xdit_jax", "heads", "unroll", "unstacked", "diffusers", "xdit_jax pipeline"]
    assert "step med s" in stderr  # the table went to stderr
    # --profile: two more calls of the first build traced (no device kernels on the CPU)
    prof = rows[0]["profile"]
    assert prof["calls"] == 2 and list(Path(prof["folder"]).rglob("perfetto_trace.json.gz"))
    assert "no device kernel events" in stderr
    # the variants of one mesh share the first's weights
    assert all(r["stages_s"]["init_weights"] < 0.1 for r in rows[1:4])
    assert rows[2]["scan_variant"] == "unroll" and rows[3]["scan_variant"] == "unstacked"
    e2e = rows.pop()
    assert e2e["kind"] == "e2e" and "error" not in e2e, e2e.get("error")
    for label in ("cold", "warm"):
        assert e2e[f"{label}_total_s"] > 0
        assert {"text_encoding", "denoising", "decoding"} <= set(e2e[f"{label}_stages_s"])
    assert e2e["output_shape"] == [1, 9, 64, 96, 3]
    for r in rows:
        assert r["kind"] == "step" and r["model"] == "tiny" and r["dtype"] == "float32"
        assert r["steps_timed"] == 2 and len(r["step_times_s"]) == 2
        assert r["step_median_s"] > 0 and r["step_min_s"] > 0 and r["step_max_s"] >= r["step_min_s"]
        assert r["flops_analytic"] > 0 and r["tflops_achieved"] > 0
        assert r["stages_s"]["first_call"] > 0 and r["stages_s"]["timed_steps"] > 0
        # fp32 on the CPU: the roofline is the host's measured sgemm rate, for ours and diffusers alike
        assert r["peak_tflops"] > 0 and r["peak_source"].startswith("measured") and r["fraction_of_peak"] > 0
    for r in rows[:4]:
        assert r["compile_s"] > 0 and r["lower_s"] > 0
        assert r["ratio_vs_diffusers"] > 0
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_source"] in ("xla_memory_analysis", "device_memory_stats")
        # the compiled program's dots (loops by trip count) are the analytic count
        assert r["flops_hlo"] == pytest.approx(r["flops_analytic"], rel=1e-6)
        assert r["max_abs_diff_vs_diffusers"] < 1e-4  # same weights, same inputs: equal work
    assert rows[0]["video_tokens"] == 3 * 4 * 6 and rows[0]["text_tokens"] == 16


def test_compile_only_sequence_parallel_reports_collectives():
    """Abstract shapes on 4 simulated devices: compiles USP, counts the all-to-alls (nothing is run)."""
    rows, _ = _run(["--model", "tiny", "--compile-only", "--host-devices", "4", "--mesh", "1",
                    "--mesh", "cfg=2,ulysses=2", "--mesh", "pipefusion=2", "--json"])
    assert [r["mesh"] for r in rows] == ["single device", "cfg=2,ulysses=2", "pipefusion=2"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and "step_median_s" not in r
    assert rows[0]["collective_bytes"] == 0
    assert rows[1]["collective_bytes"] > 0 and rows[1]["collectives"]["all-to-all"] > 0
    # per device: the step batch of 2 is split over cfg=2 and the sequence over ulysses=2
    assert rows[1]["flops_hlo"] < rows[0]["flops_hlo"] / 2
    # PipeFusion (2 stages, 2 patches): activations permuted stage to stage, the output all-reduced
    pf = rows[2]
    assert pf["pipefusion_patches"] == 2 and set(pf["collectives"]) >= {"collective-permute", "all-reduce"}
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"].get("all-to-all", 0) == 0


def test_trace_summary_groups_device_kernels(tmp_path):
    """The profile summary: kernels on the device's stream lines only (the XLA Ops line repeats them),
    summed by name and category, per step."""
    import gzip

    from xdit_jax import trace_summary

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    kernels = [("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300.0), ("nvjet_sm90_tst_128x224", 100.0),
               ("nvjet_sm90_tst_128x224", 100.0), ("loop_multiply_fusion", 40.0), ("memcpy128", 20.0),
               ("ncclDevKernel_AllReduce", 10.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d, "ts": i} for i, (n, d) in enumerate(kernels)]
    events += [{"ph": "X", "pid": 1, "tid": 8, "name": "fusion.1", "dur": 999.0, "ts": 0},
               {"ph": "X", "pid": 2, "tid": 3, "name": "PjitFunction", "dur": 5000.0, "ts": 0}]
    path = tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = trace_summary.summarize(trace_summary.load_events(trace_summary.find_trace(tmp_path)), steps=2)
    assert s["device_s_per_step"] == pytest.approx(285e-6)
    assert s["categories"] == pytest.approx({"attention": 150e-6, "matmul": 100e-6, "other fusions": 20e-6,
                                             "copy": 10e-6, "collective": 5e-6})
    assert s["top"][1][:3] == ("nvjet_sm90_tst_128x224", pytest.approx(100e-6), 1)
    assert "attention" in trace_summary.format_summary(s)
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        trace_summary.find_trace(tmp_path / "plugins" / "nothing")


def test_analytic_flops_formula():
    # one block of the 2B shape by hand: B=2, S=832+226, d=1920, T=512
    t = dict(num_attention_heads=30, attention_head_dim=64, num_layers=1, time_embed_dim=512, text_embed_dim=4096,
             in_channels=16, out_channels=16, patch_size=2)
    f = bench.analytic_flops(t, (2, 13, 16, 16, 16), 226)
    b, s, d = 2, 832 + 226, 1920
    block = 24 * b * s * d * d + 4 * b * s * s * d + 24 * b * 512 * d
    assert f["per_block"] == block and f["tokens"] == s
    rest = 2 * b * 832 * 64 * d + 2 * b * 226 * 4096 * d + 2 * b * (d * 512 + 512 * 512) + 2 * b * 512 * 2 * d \
        + 2 * b * 832 * d * 64
    assert f["total"] == block + rest
    # 1.5: frames are patched in pairs
    f15 = bench.analytic_flops(dict(t, patch_size_t=2), (2, 14, 16, 16, 16), 226)
    assert f15["tokens"] == 7 * 64 + 226


@pytest.mark.parametrize("backend,requested,want", [
    ("gpu", None, "bfloat16"), ("gpu", "auto", "bfloat16"), ("cuda", "auto", "bfloat16"), ("tpu", None, "bfloat16"),
    ("cpu", None, "float32"), ("cpu", "auto", "float32"), ("gpu", "fp32", "float32"), ("cpu", "bf16", "bfloat16"),
])
def test_dtype_selection(backend, requested, want):
    assert bench.select_dtype(requested, backend) == want


def test_dtype_selection_rejects_unknown():
    with pytest.raises(ValueError, match="Unknown dtype"):
        bench.select_dtype("int8", "gpu")


@pytest.mark.parametrize("kind,dtype,prec,want", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989.4),   # SXM
    ("NVIDIA H100 PCIe", "bfloat16", None, 756.5),
    ("NVIDIA H100 NVL", "bfloat16", None, 835.0),
    ("NVIDIA H200", "bfloat16", None, 989.4),
    ("NVIDIA H200 NVL", "bfloat16", None, 835.0),
    ("NVIDIA H100 80GB HBM3", "float32", None, 494.7),     # TF32 at default precision
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 66.9),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", None, 312.0),
])
def test_device_peaks(kind, dtype, prec, want):
    peak, what = bench.peak_tflops(kind, dtype, prec)
    assert peak == want and "dense" in what


@pytest.mark.parametrize("backend,requested,dtype,want", [
    ("gpu", None, "bfloat16", "cudnn"), ("gpu", "auto", "float16", "cudnn"), ("gpu", "auto", "float32", "xla"),
    ("cpu", "auto", "bfloat16", "xla"), ("tpu", None, "bfloat16", "xla"), ("gpu", "xla", "bfloat16", "xla"),
])
def test_attention_backend_selection(backend, requested, dtype, want):
    assert bench.select_attention_backend(requested, backend, dtype) == want


def test_unknown_device_has_no_peak():
    peak, why = bench.peak_tflops("cpu", "float32")
    assert peak is None and "cpu" in why
    assert bench.fraction_of_peak(1e12, 1.0, None) is None


def test_fraction_of_peak_on_gpu():
    peak, _ = bench.peak_tflops("NVIDIA H100 80GB HBM3", bench.select_dtype(None, "gpu"))
    # 494.7 TFLOP in one second on one H100 SXM at bf16 is half its peak; on 2 devices a quarter
    assert bench.fraction_of_peak(494.7e12, 1.0, peak) == pytest.approx(0.5)
    assert bench.fraction_of_peak(494.7e12, 1.0, peak, n_devices=2) == pytest.approx(0.25)
    assert bench.default_settle_seconds("gpu") == 0.0 and bench.default_settle_seconds("cpu") > 0


def test_workloads():
    w = bench.load_workload("cpu-small")
    assert w.latent_shape() == (2, 13, 16, 16, 16) and w.tokens() == (832, 226)
    assert w.transformer["num_layers"] == 2 and w.transformer["num_attention_heads"] == 30
    w2 = bench.load_workload("cogvideox-2b")
    assert (w2.height, w2.width, w2.num_frames) == (480, 720, 49) and w2.tokens() == (13 * 30 * 45, 226)
    w5 = bench.load_workload("cogvideox-5b")
    assert w5.transformer["num_layers"] == 42 and w5.transformer["use_rotary_positional_embeddings"]
    w15 = bench.load_workload("cogvideox1.5-5b")
    assert w15.latent_shape()[1] == 22 and w15.tokens()[0] == 11 * 48 * 85  # 21 latent frames padded to 22
    with pytest.raises(ValueError, match="Unknown model"):
        bench.load_workload("nope")


def test_configs_load_in_diffusers_and_ours():
    from diffusers import CogVideoXTransformer3DModel

    from xdit_jax.models import cogvideox, t5, vae_cogvideox

    for name in bench.FULL_MODELS:
        folder = bench.CONFIG_DIR / name
        t, defaults = bench.load_model_dir(folder)
        cogvideox.CogVideoXConfig.from_dict(t)
        cfg = CogVideoXTransformer3DModel.load_config(folder / "transformer")
        assert cfg["num_layers"] == t["num_layers"]
        vae_cogvideox.CogVideoXVAEConfig.from_dict(bench.read_json(folder / "vae" / "config.json"))
        t5.T5Config.from_dict(bench.read_json(folder / "text_encoder" / "config.json"))
        assert {"height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps"} <= set(defaults)


def test_cogvideox_image_to_video_rows_vs_diffusers(tmp_path, monkeypatch):
    """Tiny CogVideoX I2V config folders: 5B-I2V's (its learned positional table at the sample size) and 1.5-I2V's
    (ofs): the step against diffusers on one device, the analytic FLOPs (the ofs embedding counted) == the compiled
    program's. (Its pipeline from these configs end to end: test_cli's CogVideoX image-to-video run.)"""
    import json

    from xdit_jax import tiny

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    for name, extra in [("5b-i2v", dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)),
                        ("1.5-i2v", dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                                         ofs_embed_dim=32))]:
        folder = tmp_path / name
        tiny.write_configs(folder, "cogvideox", dict(extra, in_channels=8))
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="CogVideoXImageToVideoPipeline")))
        (folder / "defaults.json").write_text(json.dumps({"height": 64, "width": 96, "num_frames": 9}))
        rows = bench.run_step_benchmark(bench.StepOptions(model=str(folder), steps=1, compare="diffusers", settle=0,
                                                          log=lambda s: None))
        assert all("error" not in r for r in rows), [r.get("error") for r in rows]
        one = next(r for r in rows if r["impl"] == "xdit_jax")
        assert one["max_abs_diff_vs_diffusers"] < 1e-4, name  # fp32, outputs of order 1
        assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9), name


def test_compiler_option_parsing():
    opts = bench.parse_compiler_options(["xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
                                         "xla_cpu_enable_fast_math=true", "xla_cpu_parallel_codegen_split_count=4"])
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
                    "xla_cpu_enable_fast_math": True, "xla_cpu_parallel_codegen_split_count": 4}
    v = bench.parse_variant("x:attention=heads_major;backend=cudnn;xla_cpu_enable_fast_math=false")
    assert v.label == "x" and v.attention == "heads_major" and v.attention_backend == "cudnn"
    assert v.compiler_options == {"xla_cpu_enable_fast_math": False}
    with pytest.raises(ValueError):
        bench.parse_variant("x:attention=nope")
    assert bench.parse_variant("u:scan=unroll").scan == "unroll"
    with pytest.raises(ValueError, match="Unknown scan variant"):
        bench.parse_variant("u:scan=sideways")


def test_subcommands(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("xdit_benchmark_script", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    seen = {}

    class FakeVaeBench:
        @staticmethod
        def main(argv):
            seen["argv"] = argv
            return 0

    import xdit_jax.parallel as par

    monkeypatch.setitem(sys.modules, "xdit_jax.parallel.vae_bench", FakeVaeBench)
    monkeypatch.setattr(par, "vae_bench", FakeVaeBench, raising=False)
    assert benchmark.main(["vae-memory", "--model", "tiny"]) == 0
    assert seen["argv"] == ["--model", "tiny"]
    monkeypatch.setitem(sys.modules, "xdit_jax.parallel.vae_bench", None)  # import fails
    monkeypatch.delattr(par, "vae_bench", raising=False)
    assert benchmark.main(["vae-memory"]) == 2
    assert "vae_bench is not available" in capsys.readouterr().err
    assert benchmark.main(["bogus"]) == 2
    assert benchmark.main(["step", "--list"]) == 0
    assert "cpu-small" in capsys.readouterr().out


def test_hlo_flops_counts_loops():
    import jax
    import jax.numpy as jnp

    def f(a, b):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None, length=4)[0]

    compiled = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((16, 16))).compile()
    assert bench.hlo_matmul_flops(compiled.as_text()) == 4 * 2 * 8 * 16 * 16


def test_attention_kernel_bench_smoke(capsys):
    """scripts/bench_attention.py on a tiny shape: the XLA kernel, the (interpreted) Pallas kernel and the
    Mosaic backend's plumbing (its reference kernel off a GPU; float16 inside) agree, cuDNN is skipped off a
    GPU, the table has a positive median for each kernel that ran."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "scripts" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shape", "1,40,2,16", "--dtype", "float32", "--kernels", "xla,pallas:16x16,mosaic:64x64,cudnn",
                     "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == {"xla", "pallas:16x16", "mosaic:64x64"} | ({"cudnn"} if jax_has_gpu() else set())
    for name, tol in (("xla", 1e-5), ("pallas:16x16", 1e-5), ("mosaic:64x64", 2e-3)):  # mosaic: float16 (|out| < 2)
        assert float(rows[name][1]) > 0 and float(rows[name][4]) <= tol


def jax_has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# ----------------------------------------------------------------------------------------------
# PixArt
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixart_rows():
    """pixart-tiny (PixArt-alpha shaped: caption mask, micro-conditions, learned sigma) against
    diffusers on one device, a USP mesh and PipeFusion, 2 timed steps, --json (a subprocess)."""
    return _run(["step", "--model", "pixart-tiny", "--steps", "2", "--json", "--settle", "0", "--compare",
                 "diffusers", "--host-devices", "4", "--mesh", "1", "--mesh", "cfg=2,ulysses=2",
                 "--mesh", "pipefusion=2"])


def test_pixart_tiny_rows_vs_diffusers(pixart_rows):
    rows, stderr = pixart_rows
    assert [(r["mesh"], r["impl"]) for r in rows] == [
        ("single device", "xdit_jax"), ("cfg=2,ulysses=2", "xdit_jax"), ("pipefusion=2", "xdit_jax"),
        ("torch cpu", "diffusers")]
    assert "16 image + 16 caption tokens (6 in the prompt's mask)" in stderr and "step med s" in stderr
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "pixart-tiny" and r["family"] == "pixart"
        assert r["latent_shape"] == [2, 4, 8, 8] and r["image_tokens"] == 16 and r["text_tokens"] == 16
        assert r["text_valid_tokens"] == 6 and r["additional_conditions"] is True
        assert r["steps_timed"] == 2 and r["step_median_s"] > 0 and r["step_max_s"] >= r["step_min_s"] > 0
        assert r["flops_analytic"] > 0 and r["tflops_achieved"] > 0 and r["fraction_of_peak"] > 0
        assert "video_tokens" not in r and "num_frames" not in r
    one, usp, pf = rows[:3]
    for r in (one, usp, pf):
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["ratio_vs_diffusers"] > 0
        assert r["flops_xla_cost_analysis"] > 0
    # the compiled program's dots and convolutions are the analytic count (one device)
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-6)
    # same weights, inputs (caption mask, resolution, aspect ratio) and model: the same output
    # (fp32; outputs of order 2), on one device and sequence-parallel
    assert one["max_abs_diff_vs_diffusers"] < 1e-4 and usp["max_abs_diff_vs_diffusers"] < 1e-4
    assert one["collective_bytes"] == 0
    assert usp["collectives"]["all-to-all"] > 0 and usp["flops_hlo"] < one["flops_hlo"] / 2
    # PipeFusion's patched step: the image tokens' K/V buffers are an argument; activations permuted
    assert pf["pipefusion_patches"] == 2 and pf["collectives"]["collective-permute"] > 0


def _pixart_flops_by_hand(b, s, txt, d, cap, cin, cout, p, layers, size_conditions):
    per_block = (8 * b * s * d * d + 4 * b * s * s * d          # self-attention: q, k, v, out; QK^T, PV
                 + 4 * b * s * d * d + 4 * b * txt * d * d      # cross-attention: q, out; k, v on the caption
                 + 4 * b * s * txt * d                          # cross-attention QK^T, PV
                 + 16 * b * s * d * d)                          # MLP d -> 4d -> d
    once = (2 * b * s * cin * p * p * d                         # patch embedding
            + 2 * b * (256 * d + d * d) + 2 * b * d * 6 * d     # timestep embedding, adaln_single
            + 2 * b * txt * (cap * d + d * d)                   # caption projection
            + 2 * b * s * d * p * p * cout)                     # output projection
    if size_conditions:  # 2 resolution values + 1 aspect ratio per sample: 256 -> d/3 -> d/3 each
        once += 3 * 2 * b * (256 * d // 3 + (d // 3) ** 2)
    return layers * per_block + once


def test_pixart_analytic_flops_formula():
    t = dict(num_attention_heads=16, attention_head_dim=72, num_layers=2, in_channels=4, out_channels=8,
             patch_size=2, cross_attention_dim=1152, caption_channels=4096, sample_size=128)
    for extra, cond in [({}, True), ({"use_additional_conditions": False}, False)]:  # alpha (by sample_size), Sigma
        f = bench.pixart_analytic_flops(dict(t, **extra), (2, 4, 64, 64), 300)
        want = _pixart_flops_by_hand(2, 1024, 300, 1152, 4096, 4, 8, 2, 2, cond)
        assert f["total"] == want and f["tokens"] == 1024
        assert f["attention"] == 2 * (4 * 2 * 1024 * 1024 * 1152 + 4 * 2 * 1024 * 300 * 1152)
        assert f["linear"] + f["attention"] == f["total"]


def test_pixart_workloads():
    w = bench.load_workload("pixart-cpu-small")
    assert w.family == "pixart" and w.transformer["num_layers"] == 2
    assert w.transformer["num_attention_heads"] * w.transformer["attention_head_dim"] == 1152
    assert w.latent_shape() == (2, 4, 64, 64) and w.tokens() == (1024, 300)
    x = bench.make_inputs(w)
    assert list(x) == ["latents", "embeds", "t", "mask"]  # Sigma: no micro-conditions
    assert x["embeds"].shape == (2, 300, 4096) and x["mask"].shape == (2, 300)
    # CFG: the negative prompt "" (its EOS) first, then the prompt's 40 tokens
    assert x["mask"].sum(1).tolist() == [1, 40] and x["mask"][1, :40].all() and x["mask"][0, 0] == 1
    wa = bench.load_workload("pixart-alpha-1024")
    assert (wa.height, wa.width) == (1024, 1024) and wa.tokens() == (128 // 2 * 128 // 2, 120)
    xa = bench.make_inputs(wa)
    assert xa["resolution"].tolist() == [[1024, 1024]] * 2 and xa["aspect_ratio"].tolist() == [[1.0]] * 2
    ws = bench.load_workload(str(bench.CONFIG_DIR / "pixart-sigma-1024"), height=512, width=768, batch=2, cfg=False)
    assert ws.family == "pixart" and ws.latent_shape() == (2, 4, 64, 96) and ws.tokens() == (32 * 48, 300)
    assert bench.make_inputs(ws)["mask"].sum(1).tolist() == [40, 40]
    with pytest.raises(ValueError, match="no frames"):
        bench.load_workload("pixart-tiny", num_frames=9)


def test_pixart_configs_load_in_diffusers_and_ours():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from xdit_jax.models import pixart, t5, vae_kl
    from xdit_jax.pipelines import pixart as pixart_pipeline
    from xdit_jax.schedulers import dpmsolver

    vae_scale = {"pixart-alpha-1024": 0.18215, "pixart-sigma-1024": 0.13025}
    for name in bench.PIXART_MODELS:
        folder = bench.CONFIG_DIR / name
        t, defaults = bench.load_model_dir(folder)
        cfg = pixart.PixArtConfig.from_dict(t)
        assert cfg.additional_conditions == (name == "pixart-alpha-1024") and cfg.learned_sigma
        assert PixArtTransformer2DModel.load_config(folder / "transformer")["num_layers"] == cfg.num_layers == 28
        vcfg = vae_kl.AutoencoderKLConfig.from_dict(bench.read_json(folder / "vae" / "config.json"))
        assert AutoencoderKL.load_config(folder / "vae")["scaling_factor"] == vcfg.scaling_factor == vae_scale[name]
        t5.T5Config.from_dict(bench.read_json(folder / "text_encoder" / "config.json"))
        sched = bench.read_json(folder / "scheduler" / "scheduler_config.json")
        ours = dpmsolver.DPMSolverConfig.from_dict(sched)
        theirs = DPMSolverMultistepScheduler.from_config(sched).config
        default = DPMSolverMultistepScheduler().config  # the file holds diffusers' defaults
        for k in ("algorithm_type", "solver_order", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                  "prediction_type", "lower_order_final", "timestep_spacing"):
            assert theirs[k] == default[k] == getattr(ours, k), k
        # the pipeline takes the folder's model_index class and agrees with defaults.json
        kind = bench.read_json(folder / "model_index.json")["_class_name"]
        assert pixart_pipeline.MAX_SEQUENCE_LENGTH[kind] == defaults["max_sequence_length"]
        assert pixart_pipeline.default_size(*pixart_pipeline.read_configs(folder)) == \
            {"height": defaults["height"], "width": defaults["width"]} == {"height": 1024, "width": 1024}
        assert {"hub_id", "num_inference_steps", "guidance_scale"} <= set(defaults)


# PixArt-XL-2 (d = 16 x 72 = 1152, 28 blocks), counted by hand from diffusers' modules:
#   patch embed conv 4*2*2*d + d = 19,584; timestep embedder 256*d + d + d*d + d = 1,624,320;
#   adaln_single linear d*6d + 6d = 7,969,536; caption projection 4096*d + d + d*d + d = 6,048,000;
#   per block: 2 attentions 8(d*d + d) = 10,626,048, MLP d*4d + 4d + 4d*d + d = 10,622,592,
#   scale_shift_table 6d = 6,912 -> 21,255,552 x 28 = 595,155,456; head: table 2d + proj_out d*32 + 32 = 39,200;
#   alpha only: resolution and aspect-ratio embedders 2 x (256*384 + 384 + 384*384 + 384) = 493,056.
PIXART_XL_PARAMS = {"pixart-alpha-1024": 611_349_152, "pixart-sigma-1024": 610_856_096}


def test_pixart_full_size_parameter_count():
    """Both full-size configs build abstractly (nothing allocated) with PixArt-XL-2's ~611M parameters,
    exactly as many as diffusers' model of the same config (built on torch's meta device)."""
    import inspect

    import jax
    import torch
    from diffusers import PixArtTransformer2DModel
    from flax import nnx

    from xdit_jax.models import pixart

    takes = inspect.signature(PixArtTransformer2DModel.__init__).parameters
    for name, want in PIXART_XL_PARAMS.items():
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        assert bench.family_of_config(t) == "pixart"  # the hub's class name, Transformer2DModel
        cfg = pixart.PixArtConfig.from_dict(t)
        _, state = nnx.split(nnx.eval_shape(lambda: pixart.PixArtTransformer2DModel(cfg, rngs=nnx.Rngs(0))))
        ours = sum(x.size for x in jax.tree.leaves(state))
        with torch.device("meta"):
            tm = PixArtTransformer2DModel.from_config({k: v for k, v in t.items() if k in takes})
        assert ours == sum(p.numel() for p in tm.parameters()) == want, name
        assert abs(ours - 611e6) / 611e6 < 0.01


@pytest.mark.parametrize("name", ["pixart-alpha-1024", "pixart-sigma-1024"])
def test_pixart_full_width_step_matches_diffusers(name):
    """The released configs at full width (1 layer, 128 x 128: 64 image tokens, the real caption length)
    in-process against diffusers: alpha's micro-conditions and Sigma's positions reach both sides alike,
    and the compiled program's FLOPs are the analytic count."""
    rows = bench.run_step_benchmark(bench.StepOptions(model=name, layers=1, height=128, width=128, steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    ours, ref = rows
    assert ours["impl"] == "xdit_jax" and ref["impl"] == "diffusers" and "error" not in ours
    assert ours["image_tokens"] == 64 and ours["text_tokens"] == (120 if "alpha" in name else 300)
    assert ours["flops_hlo"] == pytest.approx(ours["flops_analytic"], rel=1e-6)
    # fp32 both sides, outputs of order 2: a wrong condition, position or mask moves them by >1e-2
    assert ours["max_abs_diff_vs_diffusers"] < 1e-4 * max(1.0, ref["ref_abs_max"])
    assert ours["step_median_s"] > 0 and ref["step_median_s"] > 0


# ----------------------------------------------------------------------------------------------
# HunyuanDiT
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # (the default run's time: the transformer's parity is its own file's, the FLOPs formula
# the full-width compile-only test's, both by default; the bench rows of the newer families are slow too)
def test_hunyuandit_tiny_rows_vs_diffusers():
    """hunyuandit-tiny (v1.0/1.1 shaped: both text masks, image meta + style, learned sigma, 6 layers
    with long skips) against diffusers on one device and a USP mesh (in-process: the session's 8
    simulated devices), 1 timed step; the PipeFusion row runs the three stacks over 2 stages, the long skips
    riding with each patch."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="hunyuandit-tiny", meshes=[None, "cfg=2,ulysses=2",
                                                                                      "pipefusion=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    table = bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ulysses=2", "xdit_jax"), ("pipefusion=2", "xdit_jax"), ("single device", "xdit_jax"),
        ("torch cpu", "diffusers")]
    assert "16 image + 77 BERT + 256 mT5 tokens (6 / 6 in the prompt's masks)" in table and "step med s" in table
    pf = by_mesh.pop("pipefusion=2")
    assert "error" not in pf, pf.get("error")
    assert pf["step_path"] == "embed/run_pipefusion(2 patches)/head" and pf["step_median_s"] > 0
    assert pf["pipefusion_patches"] == 2 and pf["pipefusion_layer_slots"] == [2, 2, 2]  # down, mid, skip
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"]["all-reduce"] > 0
    for r in by_mesh.values():
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "hunyuandit-tiny" and r["family"] == "hunyuandit"
        assert r["latent_shape"] == [2, 4, 8, 8] and r["image_tokens"] == 16 and r["text_tokens"] == 333
        assert (r["bert_tokens"], r["t5_tokens"], r["bert_valid_tokens"], r["t5_valid_tokens"]) == (77, 256, 6, 6)
        assert r["style_and_image_meta"] is True and r["layers"] == 6 and r["skip_layers"] == 2
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
        assert "video_tokens" not in r and "num_frames" not in r
    one, usp = by_mesh["single device"], by_mesh["cfg=2,ulysses=2"]
    for r in (one, usp):
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["ratio_vs_diffusers"] > 0
        assert r["flops_xla_cost_analysis"] > 0
        # same weights and inputs (both texts and masks, meta sizes, style, the pipeline's RoPE): fp32,
        # outputs of order 2; a wrong mask, skip order or RoPE moves them by > 0.1
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    # the compiled program's dots and convolutions (scans by trip count) are the analytic count
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert one["collective_bytes"] == 0
    assert usp["collectives"]["all-to-all"] > 0 and usp["flops_hlo"] < one["flops_hlo"] / 2


def _hunyuan_flops_by_hand(b, s, d, ff, layers, meta, p=2, cin=4, cout=8, l1=77, l2=256, dc=1024, d5=2048,
                           pooled=1024):
    txt = l1 + l2
    per_block = (2 * b * d * d                                   # norm1's shift from the conditioning vector
                 + 8 * b * s * d * d + 4 * b * s * s * d          # self-attention: q, k, v, out; QK^T, PV
                 + 4 * b * s * d * d + 4 * b * txt * dc * d       # cross-attention: q, out; k, v on the text
                 + 4 * b * s * txt * d                            # cross-attention QK^T, PV
                 + 4 * b * s * d * ff)                            # MLP d -> ff -> d
    skip = 2 * b * s * (2 * d) * d                                # skip_linear on [x; skip]
    extra_in = pooled + (6 * 256 + d if meta else 0)
    once = (2 * b * s * cin * p * p * d                           # patch embedding
            + 2 * b * l2 * (d5 * 4 * d5 + 4 * d5 * dc)            # mT5 projection d5 -> 4 d5 -> dc
            + 2 * b * (256 * d + d * d)                           # timestep embedding
            + 2 * b * d5 * d5 + 2 * 2 * b * (l2 + 1) * d5 * d5    # pooler q (1 token), k, v ([mean; mT5])
            + 2 * 2 * b * (l2 + 1) * d5 + 2 * b * d5 * pooled     # pooler QK^T, PV; c_proj
            + 2 * b * (extra_in * 4 * d + 4 * d * d)              # extra embedder
            + 2 * b * d * 2 * d + 2 * b * s * d * p * p * cout)   # norm_out modulation, output projection
    return layers * per_block + (layers // 2 - 1) * skip + once


def test_hunyuandit_analytic_flops_formula():
    t, _ = bench.load_model_dir(bench.CONFIG_DIR / "hunyuandit-v1.2")
    assert bench.family_of_config(t) == "hunyuandit"
    d = 16 * 88
    ff = int(d * 4.3637)
    assert ff == 6144
    for meta in (False, True):  # v1.2; v1.0/1.1 (image-meta sizes and style in the extra embedder)
        cfg = dict(t, num_layers=4, use_style_cond_and_image_meta_size=meta)
        f = bench.hunyuandit_analytic_flops(cfg, (2, 4, 64, 64))
        assert f["total"] == _hunyuan_flops_by_hand(2, 1024, d, ff, 4, meta) and f["tokens"] == 1024
        assert f["linear"] + f["attention"] == f["total"]
    full = bench.hunyuandit_analytic_flops(t, (2, 4, 128, 128))
    assert full["total"] == _hunyuan_flops_by_hand(2, 4096, d, ff, 40, False)


def test_hunyuandit_workloads():
    w = bench.load_workload("hunyuandit-cpu-small")
    assert w.family == "hunyuandit" and w.transformer["num_layers"] == 4 and w.transformer["hidden_size"] == 1408
    assert w.latent_shape() == (2, 4, 64, 64) and w.tokens() == (1024, 77 + 256)
    x = bench.make_inputs(w)
    assert list(x) == ["latents", "t", "embeds", "mask", "embeds_t5", "mask_t5"]  # v1.2: no meta, no style
    assert x["embeds"].shape == (2, 77, 1024) and x["embeds_t5"].shape == (2, 256, 2048)
    assert x["t"].dtype.kind == "f"
    # CFG: the negative prompt "" first (BERT [CLS] [SEP], mT5 EOS), then the prompt's 40 + 40 tokens
    assert x["mask"].sum(1).tolist() == [2, 40] and x["mask_t5"].sum(1).tolist() == [1, 40]
    assert x["mask"][1, :40].all() and x["mask_t5"][0, 0] == 1
    wt = bench.load_workload("hunyuandit-tiny")
    xt = bench.make_inputs(wt)
    assert xt["image_meta_size"].tolist() == [[1024, 1024, 64, 64, 0, 0]] * 2 and xt["style"].tolist() == [0, 0]
    assert wt.transformer["num_layers"] % 2 == 0
    wf = bench.load_workload("hunyuandit-v1.2")
    assert (wf.height, wf.width) == (1024, 1024) and wf.tokens() == (4096, 333) and wf.transformer["num_layers"] == 40
    wn = bench.load_workload(str(bench.CONFIG_DIR / "hunyuandit-v1.2"), height=768, width=1280, cfg=False)
    assert wn.family == "hunyuandit" and wn.latent_shape() == (1, 4, 96, 160)
    assert bench.make_inputs(wn)["mask"].sum(1).tolist() == [40]
    with pytest.raises(ValueError, match="HunyuanDiT .text-to-image. model: it has no frames"):
        bench.load_workload("hunyuandit-tiny", num_frames=9)


def test_hunyuandit_config_folder_loads_in_diffusers_transformers_and_ours():
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel
    from transformers import BertConfig, T5Config

    from xdit_jax.models import bert, hunyuandit, t5, vae_kl
    from xdit_jax.pipelines import hunyuandit as hunyuandit_pipeline
    from xdit_jax.schedulers import ddpm

    folder = bench.CONFIG_DIR / "hunyuandit-v1.2"
    t, defaults = bench.load_model_dir(folder)
    cfg = hunyuandit.HunyuanDiTConfig.from_dict(t)
    assert (cfg.inner_dim, cfg.ff_inner_dim, cfg.out_ch, cfg.num_layers) == (1408, 6144, 8, 40)
    assert not cfg.use_style_cond_and_image_meta_size
    assert HunyuanDiT2DModel.load_config(folder / "transformer")["num_layers"] == 40
    vcfg = vae_kl.AutoencoderKLConfig.from_dict(bench.read_json(folder / "vae" / "config.json"))
    assert AutoencoderKL.load_config(folder / "vae")["scaling_factor"] == vcfg.scaling_factor == 0.13025
    b = bench.read_json(folder / "text_encoder" / "config.json")
    assert bert.BertConfig.from_dict(b).hidden_size == BertConfig(**b).hidden_size == cfg.cross_attention_dim
    m = bench.read_json(folder / "text_encoder_2" / "config.json")
    assert t5.T5Config.from_dict(m).d_model == T5Config(**m).d_model == cfg.cross_attention_dim_t5
    sched = bench.read_json(folder / "scheduler" / "scheduler_config.json")
    ours, theirs = ddpm.DDPMConfig.from_dict(sched), DDPMScheduler.from_config(sched).config
    for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "steps_offset",
              "timestep_spacing", "variance_type", "clip_sample"):
        assert theirs[k] == sched[k], k
        if hasattr(ours, k):
            assert getattr(ours, k) == sched[k], k
    index = bench.read_json(folder / "model_index.json")
    assert index["_class_name"] == "HunyuanDiTPipeline" and {"text_encoder_2", "tokenizer_2"} <= set(index)
    assert hunyuandit_pipeline.default_size(*hunyuandit_pipeline.read_configs(folder)) == \
        {"height": defaults["height"], "width": defaults["width"]} == {"height": 1024, "width": 1024}
    assert defaults["hub_id"] == "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (50, 5.0)


# HunyuanDiT-v1.2 (d = 16 x 88 = 1408, ff 6144, 40 blocks), diffusers' modules: 21 blocks without a skip
# of 34,091,712 (norm1 shift d^2 + d and its LayerNorm 2d; attn1 4(d^2 + d) + q/k norms 4 x 88; norm2 2d;
# attn2 2(d^2 + d) + 2(1024 d + d) + 4 x 88; norm3 2d; MLP 2 d 6144 + 6144 + d) and 19 with one of
# 38,063,680 (+ skip_norm 4d, skip_linear 2d^2 + d); time_extra_emb (timestep MLP, mT5 pooler, extra
# embedder) 31,263,360; the mT5 projection 25,175,040; norm_out 3,967,744; text padding 333 x 1024;
# proj_out 1408 x 32 + 32; patch embed 4 x 4 x 1408 + 1408.
HUNYUANDIT_V12_PARAMS = 1_499_952_032


def test_hunyuandit_full_size_parameter_count():
    """The full-size config builds abstractly (nothing allocated) with HunyuanDiT's 1.5B parameters,
    exactly as many as diffusers' model of the same config (built on torch's meta device)."""
    import jax
    import torch
    from diffusers import HunyuanDiT2DModel
    from flax import nnx

    from xdit_jax.models import hunyuandit

    t, _ = bench.load_model_dir(bench.CONFIG_DIR / "hunyuandit-v1.2")
    cfg = hunyuandit.HunyuanDiTConfig.from_dict(t)
    _, state = nnx.split(nnx.eval_shape(lambda: hunyuandit.HunyuanDiT2DModel(cfg, rngs=nnx.Rngs(0))))
    ours = sum(x.size for x in jax.tree.leaves(state))
    with torch.device("meta"):
        tm = HunyuanDiT2DModel(**{k: v for k, v in t.items() if not k.startswith("_")})
    assert ours == sum(p.numel() for p in tm.parameters()) == HUNYUANDIT_V12_PARAMS


def test_hunyuandit_full_width_flops_compile_only():
    """The released config at full width, 4 layers (one pushes a skip, two in the middle, one pops it)
    at 128 x 128, compiled on abstract shapes (no weights): the compiled program's dots and
    convolutions (scans by trip count) are the analytic count, the text projection, pooler and
    skip_linear included."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="hunyuandit-v1.2", layers=4, height=128, width=128,
                                                      compile_only=True, log=lambda s: None))
    (row,) = rows
    assert "error" not in row and row["image_tokens"] == 64 and row["skip_layers"] == 1
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)
    assert row["flops_xla_cost_analysis"] > 0


# ----------------------------------------------------------------------------------------------
# Mochi
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # (the default run's time: the transformer's parity is its own file's, the FLOPs formula
# the full-width compile-only test's, both by default; the bench rows of the newer families are slow too)
def test_mochi_tiny_rows_vs_diffusers():
    """mochi-tiny (3 blocks: 2 scanned + the last, 6 of 16 caption tokens real in the prompt's half, 1 in
    the negative's) against diffusers on one device, the USP and ring meshes and PipeFusion (2 stages of
    one scanned block, the last block on the last stage; in-process: the session's 8 simulated devices), 1
    timed step."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="mochi-tiny", meshes=[None, "cfg=2,ulysses=2,ring=2",
                                                                                 "pipefusion=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    table = bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ring=2,ulysses=2", "xdit_jax"), ("pipefusion=2", "xdit_jax"),
        ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    assert "24 video + 16 caption tokens (6 in the prompt's mask)" in table and "step med s" in table
    pf = by_mesh.pop("pipefusion=2")
    assert "error" not in pf, pf.get("error")
    assert pf["pipefusion_patches"] == 2 and pf["pipefusion_layer_slots"] == 2 and pf["step_median_s"] > 0
    # activations and the caption stream permuted stage to stage, the output all-reduced
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"]["all-reduce"] > 0
    for r in by_mesh.values():
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "mochi-tiny" and r["family"] == "mochi"
        assert r["latent_shape"] == [2, 12, 2, 6, 8] and r["video_tokens"] == 24 and r["text_tokens"] == 16
        assert r["text_valid_tokens"] == 6 and r["latent_frames"] == 2 and r["num_frames"] == 7
        assert r["layers"] == 3 and r["caption_dim"] == 16
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
        assert 0 < r["flops_attention_padding"] < r["flops_analytic"]
    ours = [by_mesh[m] for m in ("single device", "cfg=2,ring=2,ulysses=2")]
    for r in ours:
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["ratio_vs_diffusers"] > 0
        assert r["flops_xla_cost_analysis"] > 0
        # same weights (random RoPE frequencies too) and inputs (the caption mask): fp32, outputs of order
        # 2; a caption mask ignored or RoPE pairs rotated the other way move them by ~1
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one, usp = ours
    # the compiled program's dots and convolutions (the scan by trip count) are the analytic count plus the
    # attention over the caption's padding, which our kernel computes masked and diffusers cuts out
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"] + one["flops_attention_padding"], rel=1e-9)
    assert one["collective_bytes"] == 0
    assert usp["collectives"]["all-to-all"] > 0 and usp["collectives"]["collective-permute"] > 0
    assert usp["flops_hlo"] < one["flops_hlo"] / 2


def _mochi_flops_by_hand(b, s, valid, layers, txt=256, d=3072, dc=1536, dt=4096, tdim=256, c=12, p=2):
    ff, ffc = 8192 * d // 3072, 4096 * dc // 1536  # (4 x dim x 2) // 3 at 3072 and 1536
    first = (8 * b * d * d + 8 * b * d * dc                         # norm1 (d -> 4d), norm1_context (d -> 4 dc)
             + 8 * b * s * d * d                                    # video q, k, v, out
             + 6 * b * txt * dc * d + 2 * b * txt * d * dc          # caption q, k, v; to_add_out
             + sum(4 * (s + v) ** 2 * d for v in valid)             # QK^T, PV over [video; valid caption]
             + 2 * b * s * d * 2 * ff + 2 * b * s * ff * d          # SwiGLU d -> 2F, F -> d
             + 2 * b * txt * dc * 2 * ffc + 2 * b * txt * ffc * dc)  # caption SwiGLU
    last = (8 * b * d * d + 2 * b * d * dc + 8 * b * s * d * d + 4 * b * txt * dc * d
            + sum(4 * s * (s + v) * d for v in valid) + 6 * b * s * d * ff)
    once = (2 * b * s * c * p * p * d                               # patch embedding
            + 2 * b * (tdim * d + d * d)                            # timestep embedding
            + 2 * b * (txt + 1) * dt * 2 * dt + 2 * b * dt * dt     # pooler to_kv, to_q
            + 4 * b * (txt + 1) * dt + 2 * b * dt * d               # pooler QK^T, PV; to_out
            + 2 * b * txt * dt * dc                                 # caption_proj
            + 2 * s * 3 * d // 2                                    # RoPE angles (S, 3) x (3, H, hd / 2)
            + 2 * b * d * 2 * d + 2 * b * s * d * p * p * c)        # norm_out modulation, proj_out
    padding = (layers - 1) * sum(4 * ((s + txt) ** 2 - (s + v) ** 2) * d for v in valid) \
        + sum(4 * s * (txt - v) * d for v in valid)
    return (layers - 1) * first + last + once, padding


def test_mochi_analytic_flops_formula():
    t, _ = bench.load_model_dir(bench.CONFIG_DIR / "mochi-1-preview")
    assert bench.family_of_config(t) == "mochi"
    f = bench.mochi_analytic_flops(dict(t, num_layers=4), (2, 12, 8, 16, 16), 256, [1, 40])
    total, padding = _mochi_flops_by_hand(2, 512, [1, 40], 4)
    assert f["total"] == total and f["attention_padding"] == padding and f["tokens"] == 512
    assert f["linear"] + f["attention"] == f["total"]
    assert bench.mochi_analytic_flops(t, (1, 12, 8, 16, 16), 256, 40)["total"] == \
        _mochi_flops_by_hand(1, 512, [40], 48)[0]  # one count for every sample
    # full size, 163 x 480 x 848 with CFG: 28 x 30 x 53 video tokens, ~3.3 PFLOP a step, 71% attention
    full = bench.workload_flops(bench.load_workload("mochi-1-preview"))
    assert full["total"] == _mochi_flops_by_hand(2, 44520, [1, 40], 48)[0]
    assert full["total"] == pytest.approx(3310.17e12, rel=1e-5)
    assert 0.70 < full["attention"] / full["total"] < 0.72 and full["attention_padding"] < 0.01 * full["total"]


def test_mochi_workloads():
    w = bench.load_workload("mochi-cpu-small")
    assert w.family == "mochi" and w.transformer["num_layers"] == 2 and w.transformer["pooled_projection_dim"] == 1536
    assert (w.vae_scale_spatial, w.vae_scale_temporal) == (8, 6)
    assert w.latent_shape() == (2, 12, 8, 16, 16) and w.tokens() == (512, 256)
    x = bench.make_inputs(w)
    assert list(x) == ["latents", "embeds", "t", "mask"]  # MochiTransformer3DModel's argument order
    assert x["embeds"].shape == (2, 256, 4096) and x["t"].dtype.kind == "f" and x["mask"].dtype.kind == "i"
    # CFG: diffusers' default negative prompt "" first (its EOS), then a typical prompt's 40 tokens
    assert x["mask"].sum(1).tolist() == [1, 40] and x["mask"][1, :40].all() and x["mask"][0, 0] == 1
    wf = bench.load_workload("mochi-1-preview")
    assert (wf.height, wf.width, wf.num_frames) == (480, 848, 163) and wf.transformer["num_layers"] == 48
    assert wf.latent_shape() == (2, 12, 28, 60, 106) and wf.tokens() == (28 * 30 * 53, 256)
    wn = bench.load_workload(str(bench.CONFIG_DIR / "mochi-1-preview"), height=480, width=480, num_frames=19,
                             cfg=False)
    assert wn.family == "mochi" and wn.latent_shape() == (1, 12, 4, 60, 60)
    assert bench.make_inputs(wn)["mask"].sum(1).tolist() == [40]
    assert bench.load_workload("mochi-tiny").latent_shape() == (2, 12, 2, 6, 8)


# Mochi 1 preview (d = 24 x 128 = 3072, caption 1536, 48 blocks): ours has 10,022,959,024 parameters;
# diffusers' model 4,718,720 more: the last block's caption query projection and norm (1536 x 3072 + 128),
# whose output it drops (context_pre_only).
MOCHI_1_PARAMS = 10_022_959_024
MOCHI_LAST_BLOCK_CAPTION_QUERY = 1536 * 3072 + 128


def test_mochi_full_size_parameter_count():
    """The full-size config builds abstractly (nothing allocated) with Mochi 1's 10B parameters: diffusers'
    model of the same config (on torch's meta device) less the last block's unused caption query."""
    import jax
    import torch
    from diffusers import MochiTransformer3DModel
    from flax import nnx

    from xdit_jax.models import mochi

    t, _ = bench.load_model_dir(bench.CONFIG_DIR / "mochi-1-preview")
    cfg = mochi.MochiConfig.from_dict(t)
    _, state = nnx.split(nnx.eval_shape(lambda: mochi.MochiTransformer3DModel(cfg, rngs=nnx.Rngs(0))))
    ours = sum(x.size for x in jax.tree.leaves(state))
    with torch.device("meta"):
        tm = MochiTransformer3DModel(**{k: v for k, v in t.items() if not k.startswith("_")})
    assert ours == sum(p.numel() for p in tm.parameters()) - MOCHI_LAST_BLOCK_CAPTION_QUERY == MOCHI_1_PARAMS


def test_mochi_full_width_flops_compile_only():
    """The released config at full width, 2 layers (one scanned, the last), 13 frames at 128 x 128, compiled
    on abstract shapes (no weights): the compiled program's dots and convolutions are the analytic count
    plus the masked attention over the caption's padding; PipeFusion cannot split one scanned block in two."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="mochi-1-preview", layers=2, height=128, width=128,
                                                      num_frames=13, meshes=[None, "pipefusion=2"],
                                                      compile_only=True, log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    row = by_mesh["single device"]
    assert "error" not in row and row["video_tokens"] == 3 * 8 * 8 and row["text_tokens"] == 256
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"] + row["flops_attention_padding"], rel=1e-9)
    assert row["flops_xla_cost_analysis"] > 0
    assert "pipefusion=2 is more stages than the model's 1 layers" in by_mesh["pipefusion=2"]["error"]


@pytest.mark.parametrize("model,mesh,cfg,shape", [
    pytest.param("mochi-tiny", None, None, [1, 7, 48, 64, 3],  # video: the frames the workload asks for
                 marks=pytest.mark.slow),  # (the tiny CogVideoX's e2e in test_tiny_rows covers the video path)
    ("flux-tiny", "cfg=2", True, [1, 48, 80, 3]),  # true CFG (a negative prompt) split over cfg=2
])
def test_e2e_every_family(model, mesh, cfg, shape):
    """--e2e builds the family's pipeline from its configs with random weights and times its stages."""
    opts = bench.StepOptions(model=model, meshes=[mesh], cfg=cfg, log=lambda s: None)
    (row,) = bench.run_e2e_benchmark(opts, steps=2)
    assert row["kind"] == "e2e" and row["model"] == model and "error" not in row, row.get("error")
    assert row["output_shape"] == shape and row["mesh"] == (mesh or "single device")
    for label in ("cold", "warm"):
        assert {"text_encoding", "denoising", "decoding"} <= set(row[f"{label}_stages_s"])
        assert row[f"{label}_total_s"] > 0 and row[f"{label}_stages_s"]["denoising"] > 0
    if cfg:
        assert row["call"]["true_cfg_scale"] > 1 and row["call"]["negative_prompt"] == ""
    assert "end to end (" in bench.format_e2e([row])


# ----------------------------------------------------------------------------------------------
# FLUX.1
# ----------------------------------------------------------------------------------------------

def test_flux_tiny_rows_vs_diffusers():
    """flux-tiny (FLUX.1-dev shaped: embedded guidance; 15 image tokens, so every sequence mesh pads) against
    diffusers on one device and the USP mesh (in-process: the session's 8 simulated devices),
    one sample per prompt (FLUX's default), 1 timed step (true CFG: the next test, slow).
    The PipeFusion row runs both stacks over 2 stages (a patched step)."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="flux-tiny", meshes=[None, "ulysses=2,ring=2", "pipefusion=2",
                                                                                "cfg=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    table = bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2", "xdit_jax"), ("pipefusion=2", "xdit_jax"), ("ring=2,ulysses=2", "xdit_jax"),
        ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    assert ("15 image + 16 T5 tokens (2 double- + 2 single-stream blocks, one sample per prompt)" in table
            and "step med s" in table)
    # one sample per prompt: nothing for a cfg axis to split (--cfg: the next test)
    assert by_mesh.pop("cfg=2")["error"].startswith("ValueError: A step batch of 1 cannot be split over data x cfg")
    pf = by_mesh.pop("pipefusion=2")
    assert "error" not in pf, pf.get("error")
    assert pf["step_path"] == "embed/run_pipefusion(2 patches)/head" and pf["step_median_s"] > 0
    assert pf["pipefusion_patches"] == 2 and pf["pipefusion_layer_slots"] == [2, 2]  # double, single: 1 + 1 a stage
    # the patch (image tokens and its text) permuted stage to stage, round the stages once per stack
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"]["all-reduce"] > 0
    for r in by_mesh.values():
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "flux-tiny" and r["family"] == "flux"
        assert r["latent_shape"] == [1, 15, 16] and r["image_tokens"] == 15 and r["text_tokens"] == 16
        assert r["step_batch"] == 1 and r["true_cfg"] is False and r["guidance_embeds"] is True
        assert (r["layers"], r["double_layers"], r["single_layers"]) == (4, 2, 2)
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
        assert "video_tokens" not in r and "num_frames" not in r
    ours = [by_mesh[m] for m in ("single device", "ring=2,ulysses=2")]
    for r in ours:
        assert r["step_path"] == "transformer_over_mesh"
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["ratio_vs_diffusers"] > 0
        # same weights and inputs (pooled text, embedded guidance, the pipeline's position ids): fp32, outputs
        # of order 2 (measured 2e-6); a RoPE axis, stream swap or gate order moves them by O(1)
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one, usp = ours
    # the compiled program's dots (both scans by trip count) are the analytic count: no mask, no padding
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert one["collective_bytes"] == 0
    assert usp["collectives"]["all-to-all"] > 0 and usp["collectives"]["collective-permute"] > 0
    assert usp["flops_hlo"] < one["flops_hlo"] / 2


@pytest.mark.slow  # (the default run's time: FLUX's true CFG vs diffusers is tests/test_flux_pipeline.py's, default)
def test_flux_tiny_true_cfg_rows_vs_diffusers():
    """flux-tiny with true CFG (--cfg: the negative prompt's batch) on one device and a cfg x ulysses mesh."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="flux-tiny", meshes=[None, "cfg=2,ulysses=2"],
                                                      cfg=True, steps=1, compare="diffusers", settle=0,
                                                      log=lambda s: None))
    assert "true CFG" in bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert set(by_mesh) == {"single device", "cfg=2,ulysses=2", "torch cpu"}
    for mesh in ("single device", "cfg=2,ulysses=2"):
        r = by_mesh[mesh]
        assert "error" not in r, r.get("error")
        assert r["step_batch"] == 2 and r["latent_shape"] == [2, 15, 16] and r["true_cfg"] is True
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert by_mesh["cfg=2,ulysses=2"]["collectives"]["all-to-all"] > 0


def _flux_flops_by_hand(b, s, txt, n, m, d=3072, c=64, dj=4096, pooled=768, guidance=True):
    j = s + txt
    double = (2 * 2 * b * d * 6 * d                    # norm1, norm1_context: d -> 6d each
              + 4 * 2 * b * s * d * d                  # image q, k, v, out
              + 4 * 2 * b * txt * d * d                # text q, k, v, to_add_out
              + 2 * 2 * b * j * j * d                  # QK^T, PV over [text; image]
              + 2 * 2 * b * s * d * 4 * d              # image MLP d -> 4d -> d
              + 2 * 2 * b * txt * d * 4 * d)           # text MLP
    single = (2 * b * d * 3 * d                        # norm: d -> 3d
              + 3 * 2 * b * j * d * d                  # q, k, v
              + 2 * b * j * d * 4 * d                  # proj_mlp d -> 4d
              + 2 * b * j * 5 * d * d                  # proj_out 5d -> d
              + 2 * 2 * b * j * j * d)                 # QK^T, PV
    once = (2 * b * s * c * d + 2 * b * txt * dj * d   # x_embedder, context_embedder
            + 2 * b * (256 * d + d * d) * (2 if guidance else 1)   # timestep (+ guidance) embedder
            + 2 * b * (pooled * d + d * d)             # pooled-text embedder
            + 2 * b * d * 2 * d + 2 * b * s * d * c)   # norm_out modulation, proj_out
    return n * double + m * single + once


def test_flux_analytic_flops_formula():
    for name, guided, txt in [("flux.1-dev", True, 512), ("flux.1-schnell", False, 256)]:
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        assert bench.family_of_config(t) == "flux"
        assert bench.family_of_config({k: v for k, v in t.items() if k != "_class_name"}) == "flux"
        f = bench.flux_analytic_flops(dict(t, num_layers=2, num_single_layers=3), (2, 256, 64), txt)
        assert f["total"] == _flux_flops_by_hand(2, 256, txt, 2, 3, guidance=guided) and f["tokens"] == 256
        assert f["linear"] + f["attention"] == f["total"]
        assert f["attention"] == 5 * 4 * 2 * (256 + txt) ** 2 * 3072
        # full size at 1024 x 1024, one sample: 64 x 64 = 4,096 image tokens
        full = bench.workload_flops(bench.load_workload(name))
        assert full["total"] == _flux_flops_by_hand(1, 4096, txt, 19, 38, guidance=guided)
    assert bench.workload_flops(bench.load_workload("flux.1-dev"))["total"] == pytest.approx(74.3847e12, rel=1e-5)
    assert bench.workload_flops(bench.load_workload("flux.1-schnell"))["total"] == pytest.approx(69.4666e12, rel=1e-5)


def test_flux_workloads():
    w = bench.load_workload("flux-cpu-small")
    assert w.family == "flux" and not w.cfg and w.step_batch == 1
    assert (w.transformer["num_layers"], w.transformer["num_single_layers"]) == (1, 1)
    assert w.transformer["num_attention_heads"] * w.transformer["attention_head_dim"] == 3072
    assert w.latent_shape() == (1, 256, 64) and w.tokens() == (256, 256)
    x = bench.make_inputs(w)
    # FluxTransformer2DModel's arguments; the position ids are host arrays (trace-time constants)
    assert list(x) == ["latents", "embeds", "pooled", "t", "guidance", "img_ids", "txt_ids"]
    assert bench.FAMILIES["flux"].host_inputs == ("img_ids", "txt_ids")
    assert x["embeds"].shape == (1, 256, 4096) and x["pooled"].shape == (1, 768)
    assert x["t"].tolist() == [0.5] and x["guidance"].tolist() == [3.5]
    assert x["img_ids"].shape == (256, 3) and x["img_ids"][17].tolist() == [0, 1, 1] and not x["txt_ids"].any()
    wc = bench.load_workload("flux-cpu-small", cfg=True, batch=2)  # diffusers' true CFG: both halves
    assert wc.step_batch == 4 and bench.make_inputs(wc)["latents"].shape == (4, 256, 64)
    wd = bench.load_workload("flux.1-dev")
    assert (wd.height, wd.width) == (1024, 1024) and wd.tokens() == (4096, 512) and wd.latent_shape()[0] == 1
    assert (wd.transformer["num_layers"], wd.transformer["num_single_layers"]) == (19, 38)
    ws = bench.load_workload("flux.1-schnell", layers=2)
    assert ws.tokens() == (4096, 256) and (ws.transformer["num_layers"], ws.transformer["num_single_layers"]) == (2, 2)
    assert "guidance" not in bench.make_inputs(bench.load_workload("flux.1-schnell", height=256, width=256))
    wf = bench.load_workload(str(bench.CONFIG_DIR / "flux.1-dev"), height=768, width=1360)
    assert wf.family == "flux" and wf.latent_shape() == (1, 48 * 85, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        bench.load_workload("flux-tiny", height=40).latent_shape()
    with pytest.raises(ValueError, match="FLUX .text-to-image. model: it has no frames"):
        bench.load_workload("flux-tiny", num_frames=9)
    # the other families keep both CFG halves by default
    assert bench.load_workload("pixart-tiny").cfg and bench.load_workload("tiny").step_batch == 2


def test_flux_cfg_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("xdit_benchmark_script_flux", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    parse = benchmark.step_parser().parse_args
    assert parse([]).cfg is None and parse(["--cfg"]).cfg is True and parse(["--no-cfg"]).cfg is False
    assert {"flux-tiny", "flux-cpu-small", "flux.1-dev", "flux.1-schnell"} <= set(bench.PRESET_HELP)


def test_flux_config_folders_load_in_diffusers_transformers_and_ours():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, T5Config

    from xdit_jax.models import clip, flux, t5, vae_kl
    from xdit_jax.pipelines import flux as flux_pipeline
    from xdit_jax.schedulers import flow_match

    for name in bench.FLUX_MODELS:
        dev = name == "flux.1-dev"
        folder = bench.CONFIG_DIR / name
        t, defaults = bench.load_model_dir(folder)
        cfg = flux.FluxConfig.from_dict(t)
        assert (cfg.inner_dim, cfg.num_layers, cfg.num_single_layers, cfg.out_ch) == (3072, 19, 38, 64)
        assert cfg.guidance_embeds == dev and cfg.axes_dims_rope == (16, 56, 56)
        theirs = FluxTransformer2DModel.load_config(folder / "transformer")
        assert theirs["num_single_layers"] == 38 and theirs["guidance_embeds"] == dev
        vcfg = vae_kl.AutoencoderKLConfig.from_dict(bench.read_json(folder / "vae" / "config.json"))
        v = AutoencoderKL.load_config(folder / "vae")
        assert v["scaling_factor"] == vcfg.scaling_factor == 0.3611 and v["shift_factor"] == vcfg.shift_factor == 0.1159
        assert v["latent_channels"] * 4 == cfg.in_channels and not v["use_quant_conv"]
        c = bench.read_json(folder / "text_encoder" / "config.json")
        ours_clip = clip.CLIPTextConfig.from_dict(c)
        assert ours_clip.hidden_size == CLIPTextConfig(**c).hidden_size == cfg.pooled_projection_dim == 768
        assert (ours_clip.eos_token_id, ours_clip.max_position_embeddings, ours_clip.hidden_act) == (2, 77, "quick_gelu")
        m = bench.read_json(folder / "text_encoder_2" / "config.json")
        assert t5.T5Config.from_dict(m).d_model == T5Config(**m).d_model == cfg.joint_attention_dim
        sched = bench.read_json(folder / "scheduler" / "scheduler_config.json")
        ours, theirs = flow_match.FlowMatchEulerConfig.from_dict(sched), FlowMatchEulerDiscreteScheduler.from_config(
            sched).config
        for k in ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                  "max_image_seq_len", "num_train_timesteps"):
            assert theirs[k] == sched[k] == getattr(ours, k), k
        assert (ours.shift, ours.use_dynamic_shifting) == ((3.0, True) if dev else (1.0, False))
        index = bench.read_json(folder / "model_index.json")
        assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
        assert index["text_encoder"][1] == "CLIPTextModel" and index["tokenizer_2"][1] == "T5TokenizerFast"
        assert flux_pipeline.default_size(*flux_pipeline.read_configs(folder)) == \
            {"height": defaults["height"], "width": defaults["width"]} == {"height": 1024, "width": 1024}
        assert defaults["hub_id"] == ("black-forest-labs/FLUX.1-dev" if dev else "black-forest-labs/FLUX.1-schnell")
        assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["max_sequence_length"]) == \
            ((28, 3.5, 512) if dev else (4, 0.0, 256))


# FLUX.1 (d = 24 x 128 = 3072): 19 double-stream blocks of 36 d^2 + 30 d + 4 x 128 parameters (two d -> 6d
# modulations, image and text q/k/v/out and MLPs d -> 4d -> d with biases, the four q/k RMS norms), 38
# single-stream blocks of 15 d^2 + 11 d + 2 x 128 (d -> 3d, q/k/v, d -> 4d, 5d -> d), the embedders (x 64 -> d,
# context 4096 -> d, timestep 256 -> d -> d, pooled 768 -> d -> d) and the head (d -> 2d, d -> 64): schnell;
# dev's guidance embedder 256 d + d^2 + 2d more.
FLUX_PARAMS = {"flux.1-dev": 11_901_408_320, "flux.1-schnell": 11_891_178_560}


def test_flux_full_size_parameter_count():
    """Both full-size configs build abstractly (nothing allocated) with FLUX.1's 11.9B parameters, exactly as many
    as diffusers' model of the same config (built on torch's meta device)."""
    import jax
    import torch
    from diffusers import FluxTransformer2DModel
    from flax import nnx

    from xdit_jax.models import flux

    for name, want in FLUX_PARAMS.items():
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        cfg = flux.FluxConfig.from_dict(t)
        _, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: flux.FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0))))
        ours = sum(x.size for x in jax.tree.leaves(state))
        with torch.device("meta"):
            tm = FluxTransformer2DModel(**{k: v for k, v in t.items() if not k.startswith("_")})
        assert ours == sum(p.numel() for p in tm.parameters()) == want, name


@pytest.mark.parametrize("name", ["flux.1-dev", "flux.1-schnell"])
def test_flux_full_width_flops_compile_only(name):
    """The released configs at full width, 1 double- + 1 single-stream block, 128 x 128 (64 image tokens and the
    real T5 length), compiled on abstract shapes (no weights): the compiled program's dots are the analytic
    count (with and without the guidance embedder); PipeFusion over more stages than a stack's layers is
    refused."""
    rows = bench.run_step_benchmark(bench.StepOptions(model=name, layers=1, height=128, width=128,
                                                      meshes=[None, "pipefusion=2"], compile_only=True,
                                                      log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    row = by_mesh["single device"]
    assert "error" not in row and row["image_tokens"] == 64 and row["text_tokens"] == (512 if "dev" in name else 256)
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)
    assert row["flops_xla_cost_analysis"] > 0
    assert "pipefusion=2 is more stages than the 1 layers of the model's largest block stack" in \
        by_mesh["pipefusion=2"]["error"]


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # (the default run's time: the transformer's parity is its own file's, the FLOPs formula
# the full-width compile-only test's, both by default; the bench rows of the newer families are slow too)
def test_sd3_tiny_rows_vs_diffusers():
    """sd3-tiny (SD3.5 Medium shaped: two dual-attention blocks, rms q/k norms; 15 image tokens, so the sequence
    meshes pad; 77 CLIP + 16 T5 tokens, no mask) against diffusers on one device and a cfg x USP mesh
    (in-process: the session's 8 simulated devices), both CFG halves, 1 timed step. (PipeFusion rows over looped
    stacks: FLUX's and HunyuanDiT's tests; SD3.5 Medium's runs of blocks under PipeFusion:
    tests/test_pipefusion_stacks.py.)"""
    rows = bench.run_step_benchmark(bench.StepOptions(model="sd3-tiny", meshes=[None, "cfg=2,ulysses=2,ring=2"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    table = bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ring=2,ulysses=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    assert "15 image + 93 text tokens (77 CLIP + 16 T5, no mask)" in table and "step med s" in table
    for r in by_mesh.values():
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "sd3-tiny" and r["family"] == "sd3"
        assert r["latent_shape"] == [2, 4, 6, 10] and r["image_tokens"] == 15 and r["text_tokens"] == 93
        assert r["t5_tokens"] == 16 and r["step_batch"] == 2 and r["layers"] == 5
        assert r["qk_norm"] == "rms_norm" and r["dual_attention_layers"] == [0, 1]
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
        assert "video_tokens" not in r and "num_frames" not in r
    ours = [by_mesh[m] for m in ("single device", "cfg=2,ring=2,ulysses=2")]
    for r in ours:
        assert r["step_path"] == "embed/run_blocks/head"
        assert r["compile_s"] > 0 and r["peak_memory_bytes"] > 0 and r["ratio_vs_diffusers"] > 0
        # same weights and inputs: fp32, outputs of order 1; a stream swap, gate order or position crop moves
        # them by O(1)
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one, usp = ours
    # the compiled program's dots and convolutions (both scans by trip count) are the analytic count: no mask,
    # the last block's text queries not computed
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert one["collective_bytes"] == 0
    assert usp["collectives"]["all-to-all"] > 0 and usp["collectives"]["collective-permute"] > 0
    assert usp["flops_hlo"] < one["flops_hlo"] / 2


def _sd3_flops_by_hand(b, s, txt, n, d, dual=(), c=16, p=2, dj=4096, pooled=2048):
    j = s + txt
    block = (2 * 2 * b * d * 6 * d                     # norm1, norm1_context: d -> 6d each
             + 4 * 2 * b * s * d * d                   # image q, k, v, out
             + 4 * 2 * b * txt * d * d                 # text q, k, v, to_add_out
             + 2 * 2 * b * j * j * d                   # QK^T, PV over [image; text]
             + 2 * 2 * b * s * d * 4 * d               # image MLP d -> 4d -> d
             + 2 * 2 * b * txt * d * 4 * d)            # text MLP
    last = (2 * b * d * 6 * d + 2 * b * d * 2 * d      # norm1 (d -> 6d), norm1_context (continuous, d -> 2d)
            + 4 * 2 * b * s * d * d                    # image q, k, v, out
            + 2 * 2 * b * txt * d * d                  # text k, v
            + 2 * 2 * b * s * j * d                    # the image rows' QK^T, PV
            + 2 * 2 * b * s * d * 4 * d)               # image MLP
    dual_extra = (2 * b * d * 3 * d                    # norm1's 3 more chunks (d -> 9d)
                  + 4 * 2 * b * s * d * d              # attn2 q, k, v, out
                  + 2 * 2 * b * s * s * d)             # attn2 over the image
    once = (2 * b * s * c * p * p * d + 2 * b * txt * dj * d   # patch conv, context_embedder
            + 2 * b * (256 * d + d * d)                        # timestep embedder
            + 2 * b * (pooled * d + d * d)                     # pooled-text embedder
            + 2 * b * d * 2 * d + 2 * b * s * d * p * p * c)   # norm_out modulation, proj_out
    return (n - 1) * block + last + len(dual) * dual_extra + once


def test_sd3_analytic_flops_formula():
    for name, d, n in [("sd3-medium", 1536, 24), ("sd3.5-large", 2432, 38)]:
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        assert bench.family_of_config(t) == "sd3"
        assert bench.family_of_config({k: v for k, v in t.items() if k != "_class_name"}) == "sd3"
        f = bench.sd3_analytic_flops(dict(t, num_layers=3), (2, 16, 32, 32), 333)
        assert f["total"] == _sd3_flops_by_hand(2, 256, 333, 3, d) and f["tokens"] == 256
        assert f["linear"] + f["attention"] == f["total"]
        assert f["attention"] == 2 * 4 * 2 * (256 + 333) ** 2 * d + 4 * 2 * 256 * (256 + 333) * d
        # SD3.5 Medium's dual-attention blocks
        f2 = bench.sd3_analytic_flops(dict(t, num_layers=3, dual_attention_layers=[0, 2]), (2, 16, 32, 32), 333)
        assert f2["total"] == _sd3_flops_by_hand(2, 256, 333, 3, d, dual=(0, 2))
        # full size at 1024 x 1024 with CFG: 64 x 64 = 4,096 image + 77 CLIP + 256 T5 tokens
        full = bench.workload_flops(bench.load_workload(name))
        assert full["total"] == _sd3_flops_by_hand(2, 4096, 333, n, d)
    assert bench.workload_flops(bench.load_workload("sd3-medium"))["total"] == pytest.approx(17.7874e12, rel=1e-5)
    assert bench.workload_flops(bench.load_workload("sd3.5-large"))["total"] == pytest.approx(62.2057e12, rel=1e-5)


def test_sd3_workloads():
    w = bench.load_workload("sd3-cpu-small")
    assert w.family == "sd3" and w.cfg and w.step_batch == 2 and w.transformer["num_layers"] == 2
    assert w.transformer["num_attention_heads"] * w.transformer["attention_head_dim"] == 1536
    assert w.latent_shape() == (2, 16, 64, 64) and w.tokens() == (1024, 333)
    x = bench.make_inputs(w)
    assert list(x) == ["latents", "embeds", "pooled", "t"]  # SD3Transformer2DModel's argument order
    assert x["embeds"].shape == (2, 333, 4096) and x["pooled"].shape == (2, 2048) and x["t"].tolist() == [500.0] * 2
    for name in bench.SD3_MODELS:
        wf = bench.load_workload(name)
        assert (wf.height, wf.width) == (1024, 1024) and wf.tokens() == (4096, 333) and wf.step_batch == 2
    assert bench.load_workload("sd3.5-large", layers=2).transformer["num_layers"] == 2
    wn = bench.load_workload(str(bench.CONFIG_DIR / "sd3-medium"), height=768, width=1360, cfg=False)
    assert wn.family == "sd3" and wn.latent_shape() == (1, 16, 96, 170) and wn.tokens() == (48 * 85, 333)
    with pytest.raises(ValueError, match="SD3 .text-to-image. model: it has no frames"):
        bench.load_workload("sd3-tiny", num_frames=9)
    assert bench.load_workload("sd3-tiny").latent_shape() == (2, 4, 6, 10)
    assert {"sd3-tiny", "sd3-cpu-small", "sd3-medium", "sd3.5-large"} <= set(bench.PRESET_HELP)


def test_sd3_config_folders_load_in_diffusers_transformers_and_ours():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, T5Config

    from xdit_jax.models import clip, sd3, t5, vae_kl
    from xdit_jax.pipelines import sd3 as sd3_pipeline
    from xdit_jax.schedulers import flow_match

    for name in bench.SD3_MODELS:
        large = name == "sd3.5-large"
        folder = bench.CONFIG_DIR / name
        t, defaults = bench.load_model_dir(folder)
        cfg = sd3.SD3Config.from_dict(t)
        assert (cfg.inner_dim, cfg.num_layers) == ((2432, 38) if large else (1536, 24))
        assert cfg.qk_norm == ("rms_norm" if large else None) and cfg.dual_attention_layers == ()
        assert (cfg.pos_embed_max_size, cfg.out_ch, cfg.pooled_projection_dim) == (192, 16, 2048)
        theirs = SD3Transformer2DModel.load_config(folder / "transformer")
        assert theirs["caption_projection_dim"] == cfg.inner_dim and theirs["qk_norm"] == cfg.qk_norm
        tc, vc = sd3_pipeline.read_configs(folder)
        assert tc == cfg and sd3_pipeline.vae_scale_factor(vc) == 8
        vcfg = vae_kl.AutoencoderKLConfig.from_dict(bench.read_json(folder / "vae" / "config.json"))
        v = AutoencoderKL.load_config(folder / "vae")
        assert v["scaling_factor"] == vcfg.scaling_factor == 1.5305 and v["shift_factor"] == vcfg.shift_factor == 0.0609
        assert v["latent_channels"] == cfg.in_channels == 16 and not v["use_quant_conv"]
        widths = []
        for sub, hidden, act in (("text_encoder", 768, "quick_gelu"), ("text_encoder_2", 1280, "gelu")):
            c = bench.read_json(folder / sub / "config.json")
            ours_clip = clip.CLIPTextConfig.from_dict(c)
            assert ours_clip.hidden_size == CLIPTextConfig(**c).hidden_size == c["projection_dim"] == hidden
            assert (ours_clip.max_position_embeddings, ours_clip.hidden_act) == (77, act)
            assert c["architectures"] == ["CLIPTextModelWithProjection"]
            widths.append(hidden)
        assert sum(widths) == cfg.pooled_projection_dim  # the pooled CLIP-L and CLIP-G embeddings side by side
        m = bench.read_json(folder / "text_encoder_3" / "config.json")
        assert t5.T5Config.from_dict(m).d_model == T5Config(**m).d_model == cfg.joint_attention_dim
        sched = bench.read_json(folder / "scheduler" / "scheduler_config.json")
        ours = flow_match.FlowMatchEulerConfig.from_dict(sched)
        theirs = FlowMatchEulerDiscreteScheduler.from_config(sched).config
        assert theirs["shift"] == ours.shift == 3.0 and not ours.use_dynamic_shifting
        assert theirs["num_train_timesteps"] == ours.num_train_timesteps == 1000
        index = bench.read_json(folder / "model_index.json")
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
        assert index["text_encoder_3"][1] == "T5EncoderModel" and index["tokenizer_3"][1] == "T5TokenizerFast"
        assert defaults["hub_id"] == ("stabilityai/stable-diffusion-3.5-large" if large
                                      else "stabilityai/stable-diffusion-3-medium-diffusers")
        assert (defaults["height"], defaults["width"], defaults["num_inference_steps"],
                defaults["max_sequence_length"]) == (1024, 1024, 28, 256)
        assert defaults["guidance_scale"] == (3.5 if large else 7.0)


def test_sd3_full_width_flops_compile_only():
    """SD3 Medium at full width, 2 layers (one scanned, the last), 128 x 128 (64 image + 333 text tokens),
    compiled on abstract shapes (no weights): the compiled program's dots and convolutions are the analytic
    count; PipeFusion cannot split one scanned block in two."""
    rows = bench.run_step_benchmark(bench.StepOptions(model="sd3-medium", layers=2, height=128, width=128,
                                                      meshes=[None, "pipefusion=2"], compile_only=True,
                                                      log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    row = by_mesh["single device"]
    assert "error" not in row and row["image_tokens"] == 64 and row["text_tokens"] == 333
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)
    assert row["flops_xla_cost_analysis"] > 0
    assert "pipefusion=2 is more stages than the model's 1 layers" in by_mesh["pipefusion=2"]["error"]


# SD3 Medium (d = 24 x 64 = 1536, 24 joint blocks) and SD3.5 Large (d = 38 x 64 = 2432, 38 blocks, q/k RMS norms):
# ours has 2,025,967,168 and 8,050,710,400 parameters; diffusers' model the last block's text query projection
# (d x d + d) more, and in SD3.5 its RMS norm (64), whose output it drops (context_pre_only).
SD3_PARAMS = {"sd3-medium": (2_025_967_168, 1536 * 1536 + 1536),
              "sd3.5-large": (8_050_710_400, 2432 * 2432 + 2432 + 64)}


def test_sd3_full_size_parameter_count():
    """Both full-size configs build abstractly (nothing allocated) with SD3 Medium's 2.0B and SD3.5 Large's 8.1B
    parameters: diffusers' model of the same config (on torch's meta device) less the last block's unused
    text query. (The 192 x 192 position table, a buffer in diffusers, is not counted on either side.)"""
    import jax
    import torch
    from diffusers import SD3Transformer2DModel
    from flax import nnx

    from xdit_jax.models import sd3

    for name, (want, unused) in SD3_PARAMS.items():
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        cfg = sd3.SD3Config.from_dict(t)
        _, state = nnx.split(nnx.eval_shape(lambda cfg=cfg: sd3.SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0))))
        leaves = jax.tree_util.tree_leaves_with_path(state)
        ours = sum(x.size for kp, x in leaves if not jax.tree_util.keystr(kp).startswith("['pos_embed']['pos_embed']"))
        with torch.device("meta"):
            tm = SD3Transformer2DModel(**{k: v for k, v in t.items() if not k.startswith("_")})
        assert ours == sum(p.numel() for p in tm.parameters()) - unused == want, name


# ----------------------------------------------------------------------------------------------
# Wan 2.1
# ----------------------------------------------------------------------------------------------

def test_wan_tiny_rows_vs_diffusers(monkeypatch):
    """wan-tiny (18 video tokens; 16 UMT5 tokens, zero after the prompt's 6 and the negative's 1) against diffusers
    on one device and PipeFusion (2 stages of one block, its K/V buffers over the video tokens only: the caption is
    a cross-attention context; in-process: the session's 8 simulated devices), 1 timed step. (The sequence meshes:
    tests/test_wan_transformer.py; the benchmark's wiring of them is the same for every family.)"""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="wan-tiny", meshes=[None, "pipefusion=2"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    table = bench.format_table(rows)
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("pipefusion=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    assert "18 video + 16 caption tokens (6 of the prompt's, the rest zeros" in table
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "wan-tiny" and r["family"] == "wan"
        assert r["latent_shape"] == [2, 4, 3, 4, 6] and r["video_tokens"] == 18 and r["text_tokens"] == 16
        assert r["latent_frames"] == 3 and r["num_frames"] == 9 and r["layers"] == 2 and r["ffn_dim"] == 40
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
    pf, one = by_mesh["pipefusion=2"], by_mesh["single device"]
    assert pf["step_path"] == "embed/run_pipefusion(2 patches)/head" and pf["pipefusion_layer_slots"] == 2
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"]["all-reduce"] > 0
    assert one["step_path"] == "embed/run_blocks/head" and one["flops_xla_cost_analysis"] > 0
    # same weights and inputs: fp32, outputs of order 2; RoPE parts or gates swapped move them by O(1)
    assert one["max_abs_diff_vs_diffusers"] < 1e-4
    # the compiled program's dots and convolutions (the scan by trip count) are the analytic count
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9) and one["collective_bytes"] == 0


# Slow (the default run's time): the Wan family's bench rows run in test_wan_tiny_rows_vs_diffusers, Wan 2.1 I2V's
# numerics in tests/test_wan21_i2v_pipeline.py
@pytest.mark.slow
def test_wan21_image_to_video_rows_vs_diffusers(tmp_path, monkeypatch):
    """A tiny Wan 2.1 I2V config folder (5 CLIP image states of width 16: image_size 28, patch 14) and its FLF2V form
    (2 x 5 with the position table): the step against diffusers (which assumes 512 caption tokens) on one device,
    the analytic FLOPs (the image embedder, attn2's added K/V and their attention) == the compiled program's, and
    FLF2V end to end."""
    import json

    from xdit_jax import tiny

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    for pos in (None, 10):
        folder = tiny.write_wan_i2v_configs(tmp_path / f"i2v-{pos}", flf2v=pos is not None)
        (folder / "defaults.json").write_text(json.dumps({"height": 32, "width": 48, "num_frames": 9}))
        rows = bench.run_step_benchmark(bench.StepOptions(model=str(folder), steps=1, compare="diffusers", settle=0,
                                                          log=lambda s: None))
        one = next(r for r in rows if r["impl"] == "xdit_jax")
        assert all("error" not in r for r in rows), [r.get("error") for r in rows]
        assert one["image_tokens"] == (pos or 5) and one["text_tokens"] == 512 and one["latent_shape"] == [2, 12, 3,
                                                                                                            4, 6]
        assert one["max_abs_diff_vs_diffusers"] < 1e-4  # fp32, outputs of order 1 (as wan-tiny's)
        assert f"+ {pos or 5} CLIP image states" in bench.format_table(rows)
        assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
        without = bench.wan_analytic_flops(json.loads((folder / "transformer" / "config.json").read_text()),
                                           tuple(one["latent_shape"]), 512)["total"]
        assert one["flops_analytic"] > without  # the image's share is counted
    # --e2e on the FLF2V folder: random first and last frames through the CLIP and VAE encoders, then the video
    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model=str(folder), log=lambda s: None), steps=2)
    assert "error" not in row, row.get("error")
    assert row["output_shape"] == [1, 9, 32, 48, 3] and row["warm_stages_s"]["image_encoding"] > 0


def _wan_flops_by_hand(b, s, txt, n, d, ffn, c=16, cout=16, dt=4096, tdim=256, patch=4):
    block = (4 * 2 * b * s * d * d + 2 * 2 * b * s * s * d      # attn1: q, k, v, out; QK^T, PV
             + 2 * 2 * b * s * d * d + 2 * 2 * b * txt * d * d  # attn2: q, out; k, v on the caption
             + 2 * 2 * b * s * txt * d                          # attn2: QK^T, PV
             + 2 * 2 * b * s * d * ffn)                         # FFN d -> F -> d
    once = (2 * b * s * c * patch * d                           # patch embedding (Conv3d)
            + 2 * b * (tdim * d + d * d) + 2 * b * d * 6 * d    # time_embedder, time_proj
            + 2 * b * txt * (dt * d + d * d)                    # text_embedder
            + 2 * b * s * d * cout * patch)                     # proj_out
    return n * block + once


def test_wan_analytic_flops_and_workloads():
    for name, d, ffn, n, (h, w), s in [("wan2.1-t2v-1.3b", 1536, 8960, 30, (480, 832), 21 * 30 * 52),
                                       ("wan2.1-t2v-14b", 5120, 13824, 40, (720, 1280), 21 * 45 * 80)]:
        t, _ = bench.load_model_dir(bench.CONFIG_DIR / name)
        assert bench.family_of_config(t) == "wan"
        assert bench.family_of_config({k: v for k, v in t.items() if k != "_class_name"}) == "wan"
        f = bench.wan_analytic_flops(dict(t, num_layers=3), (2, 16, 5, 16, 16), 512)
        assert f["total"] == _wan_flops_by_hand(2, 320, 512, 3, d, ffn) and f["tokens"] == 320
        assert f["linear"] + f["attention"] == f["total"]
        wf = bench.load_workload(name)  # 81 frames at the release's size, CFG, 512 UMT5 tokens
        assert (wf.height, wf.width, wf.num_frames) == (h, w, 81) and wf.family == "wan"
        assert (wf.vae_scale_spatial, wf.vae_scale_temporal) == (8, 4) and wf.tokens() == (s, 512)
        assert bench.workload_flops(wf)["total"] == _wan_flops_by_hand(2, s, 512, n, d, ffn)
    assert bench.workload_flops(bench.load_workload("wan2.1-t2v-1.3b"))["total"] == pytest.approx(566.0036e12,
                                                                                                   rel=1e-6)
    # Wan 2.2: A14B's step is one 14B expert's; TI2V-5B at 121 x 704 x 1280 through its 16x VAE, 48 channels
    a14b = bench.load_workload("wan2.2-t2v-a14b")
    assert bench.workload_flops(a14b)["total"] == bench.workload_flops(bench.load_workload("wan2.1-t2v-14b"))["total"]
    ti2v = bench.load_workload("wan2.2-ti2v-5b")
    assert (ti2v.vae_scale_spatial, ti2v.vae_scale_temporal) == (16, 4) and ti2v.latent_shape() == (2, 48, 31, 44, 80)
    assert bench.workload_flops(ti2v)["total"] == _wan_flops_by_hand(2, 31 * 22 * 40, 512, 30, 3072, 14336, c=48,
                                                                     cout=48)
    i2v = bench.load_workload("wan2.2-i2v-a14b")  # the step's input: noise, mask and image latents (16 + 4 + 16)
    assert i2v.latent_shape() == (2, 36, 21, 60, 104)
    assert bench.workload_flops(i2v)["total"] == _wan_flops_by_hand(2, 21 * 30 * 52, 512, 40, 5120, 13824, c=36)
    # Wan 2.1 I2V / FLF2V: 257 (514) CLIP image states cross-attended with their own K/V, and the image embedder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from xdit_jax.models import clip

    for name, (h, w_), img in [("wan2.1-i2v-14b-480p", (480, 832), 257), ("wan2.1-flf2v-14b-720p", (720, 1280), 514)]:
        wi = bench.load_workload(name)
        s = (h // 16) * (w_ // 16) * 21
        d = 5120
        extra = 40 * (4 * 2 * img * d * d + 4 * 2 * s * img * d) + 2 * 2 * img * (1280 * 1280 + 1280 * d)
        assert bench.workload_flops(wi)["total"] == _wan_flops_by_hand(2, s, 512, 40, d, 13824, c=36) + extra
        folder = bench.CONFIG_DIR / name
        assert clip.CLIPVisionConfig.from_dict(bench.read_json(folder / "image_encoder" / "config.json")).num_positions \
            == 257 == (CLIPVisionConfig.from_pretrained(folder / "image_encoder").image_size // 14) ** 2 + 1
        assert CLIPImageProcessor.from_pretrained(folder / "image_processor").crop_size == {"height": 224, "width": 224}
    w = bench.load_workload("wan-cpu-small")
    assert w.transformer["num_layers"] == 2 and w.latent_shape() == (2, 16, 5, 16, 16) and w.tokens() == (320, 512)
    x = bench.make_inputs(w)
    assert list(x) == ["latents", "embeds", "t"] and x["t"].dtype == "int64" and x["embeds"].shape == (2, 512, 4096)
    # WanPipeline's zero-padding: the negative prompt "" keeps 1 row (its EOS), the prompt 40
    assert (abs(x["embeds"]).sum(-1) > 0).sum(1).tolist() == [1, bench.WAN_TEXT_VALID] == [1, 40]
    wn = bench.load_workload(str(bench.CONFIG_DIR / "wan2.1-t2v-1.3b"), height=256, width=256, num_frames=33,
                             cfg=False)
    assert wn.latent_shape() == (1, 16, 9, 32, 32) and wn.tokens() == (9 * 16 * 16, 512)
    assert (abs(bench.make_inputs(wn)["embeds"]).sum(-1) > 0).sum(1).tolist() == [40]
    assert bench.load_workload("wan-tiny").latent_shape() == (2, 4, 3, 4, 6)
    assert {"wan-tiny", "wan-cpu-small", *bench.WAN_MODELS} <= set(bench.PRESET_HELP)


def test_latte_tiny_rows_vs_diffusers(monkeypatch):
    """latte-tiny (3 frames x 6 patch positions, 16 T5 tokens) against diffusers on one device and ring=2 (the
    patch positions over the ring, padded to 8; the temporal attention local), 1 timed step; the full-size preset's
    shapes and FLOPs without compiling it."""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="latte-tiny", meshes=[None, "ring=2"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("ring=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["kind"] == "step" and r["model"] == "latte-tiny" and r["family"] == "latte"
        assert r["latent_shape"] == [2, 4, 3, 4, 6] and r["video_tokens"] == 18 and r["text_tokens"] == 16
        assert r["steps_timed"] == 1 and r["step_median_s"] > 0 and r["flops_analytic"] > 0
    one, ring = by_mesh["single device"], by_mesh["ring=2"]
    for r in (one, ring):
        # same weights and inputs, fp32, outputs of order 1: a frame-order or layout slip moves them by O(1)
        assert r["max_abs_diff_vs_diffusers"] < 1e-4 and r["ratio_vs_diffusers"] > 0
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9) and one["collective_bytes"] == 0
    assert ring["collectives"]["collective-permute"] > 0  # the spatial K/V round the ring; nothing else talks
    w = bench.load_workload("latte-1")
    assert (w.height, w.width, w.num_frames, w.latent_shape()) == (512, 512, 16, (2, 4, 16, 64, 64))
    assert w.fam.tokens(w) == (16 * 32 * 32, 120)
    assert {"latte-tiny", "latte-cpu-small", *bench.LATTE_MODELS} <= set(bench.PRESET_HELP)
    assert bench.load_workload("latte-cpu-small").latent_shape() == (2, 4, 16, 16, 16)


def test_consisid_tiny_rows_vs_diffusers(monkeypatch):
    """consisid-tiny (the face extractor over 2 x 577 ViT states, 2 face cross-attentions; the extractor inside the
    step as diffusers runs it) against diffusers on one device: the step, and the analytic FLOPs (the face branch
    counted) == the compiled program's (its PipeFusion row: test_consisid_tiny_pipefusion_row)."""
    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model="consisid-tiny", steps=1, compare="diffusers", settle=0,
                                                      meshes=[None], log=lambda s: None))
    one = next(r for r in rows if r["impl"] == "xdit_jax" and r["mesh"] == "single device")
    assert "error" not in one, one.get("error")
    assert one["max_abs_diff_vs_diffusers"] < 1e-4  # fp32, outputs of order 1 (measured 1.1e-6)
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)


@pytest.mark.slow
def test_consisid_tiny_pipefusion_row(monkeypatch):
    """consisid-tiny's PipeFusion row runs (the model's pipefusion_blocks: each stage's face cross-attentions on the
    patch's rows; its exactness: tests/test_consisid_transformer.py, tests/test_consisid_pipeline.py)."""
    from xdit_jax.mesh import MeshSpec

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    rows = bench.run_step_benchmark(bench.StepOptions(model="consisid-tiny", steps=1, settle=0,
                                                      meshes=[MeshSpec.parse("pipefusion=2")], log=lambda s: None))
    pf = next(r for r in rows if r["mesh"] == "pipefusion=2")
    assert "error" not in pf, pf.get("error")
    assert pf["pipefusion_patches"] == 2 and pf["pipefusion_layer_slots"] == 4 and pf["step_median_s"] > 0
    assert pf["collectives"]["collective-permute"] > 0 and pf["collectives"]["all-reduce"] > 0
