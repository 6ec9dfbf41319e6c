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
def tiny_rows():
    """The tiny preset against diffusers, 2 timed steps, one extra variant, --json (a subprocess,
    as a user runs it: its own jax, one CPU device)."""
    return _run(["step", "--model", "tiny", "--steps", "2", "--json", "--settle", "0", "--compare", "diffusers",
                 "--variant", "heads:attention=heads_major", "--e2e", "1"])


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()], res.stderr


def test_tiny_rows_present_and_positive(tiny_rows):
    rows, stderr = tiny_rows
    assert [r["impl"] for r in rows] == ["xdit_jax", "heads", "diffusers", "xdit_jax pipeline"]
    assert "step med s" in stderr  # the table went to stderr
    e2e = rows.pop()
    assert e2e["kind"] == "e2e" and "error" not in e2e, e2e.get("error")
    for label in ("cold", "warm"):
        assert e2e[f"{label}_total_s"] > 0
        assert {"text_encoding", "denoising", "decoding"} <= set(e2e[f"{label}_stages_s"])
    assert e2e["frames_shape"] == [1, 9, 64, 96, 3]
    for r in rows:
        assert r["kind"] == "step" and r["model"] == "tiny" and r["dtype"] == "float32"
        assert r["steps_timed"] == 2 and len(r["step_times_s"]) == 2
        assert r["step_median_s"] > 0 and r["step_min_s"] > 0 and r["step_max_s"] >= r["step_min_s"]
        assert r["flops_analytic"] > 0 and r["tflops_achieved"] > 0
        assert r["stages_s"]["first_call"] > 0 and r["stages_s"]["timed_steps"] > 0
        # fp32 on the CPU: the roofline is the host's measured sgemm rate, for ours and diffusers alike
        assert r["peak_tflops"] > 0 and r["peak_source"].startswith("measured") and r["fraction_of_peak"] > 0
    for r in rows[:2]:
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
    """scripts/bench_attention.py on a tiny shape: the XLA kernel and the (interpreted) Pallas kernel
    agree, cuDNN is skipped off a GPU, the table has a positive median for each kernel that ran."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "scripts" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shape", "1,40,2,16", "--dtype", "float32", "--kernels", "xla,pallas:16x16,cudnn",
                     "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert set(rows) == {"xla", "pallas:16x16"} | ({"cudnn"} if jax_has_gpu() else set())
    for name in ("xla", "pallas:16x16"):
        assert float(rows[name][1]) > 0 and float(rows[name][4]) <= 1e-5


def jax_has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"
