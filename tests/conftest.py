"""Test session setup: 8 simulated CPU devices (before jax is imported), fp32 matmuls, seeded torch."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# As generate.py and benchmark.py run simulated devices: XLA:CPU's concurrency-optimized scheduler off (it ran a
# PipeFusion x ring step nondeterministically: xdit_jax.parallel.pipefusion.CPU_RING_TEXT_FLAG; the same test time)
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
# The tests check numbers, not speed: XLA:CPU's LLVM backend at -O0 compiles the many small test programs ~40% faster
# (compiling is most of this suite's time; the same HLO passes run, and the float math is not reordered).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One persistent compilation cache per test run, shared by the xdist workers (they inherit this process's
# environment) and the generate.py children: the same tiny programs compile in several files (~15% of the
# suite's CPU time measured on the pipeline/CLI files). A fresh folder per run, removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xdit_jax_test_xla_cache_")
    os.environ["XDIT_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    """The run's compilation cache goes with the process that made it (the xdist controller, or the one process)."""
    if os.environ.get("XDIT_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
    """xdist's loadfile hands out the files in the order pytest_collection_modifyitems leaves them (not by test count)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The test files longest first (``tests/file_times.json``, seconds measured by ``scripts/test_file_times.py``;
    a file not listed counts as the median), each file's tests in their own order: with ``--dist loadfile`` a long
    file handed out last would keep one worker busy while the other idles (longest-first is the classic greedy
    schedule: the two workers finish within about the shortest file of each other)."""
    import json
    import statistics
    from pathlib import Path

    path = Path(__file__).with_name("file_times.json")
    if not path.exists():
        return
    times = json.loads(path.read_text())
    default = statistics.median(times.values()) if times else 0.0
    items.sort(key=lambda item: -times.get(item.nodeid.split("::")[0], default))
