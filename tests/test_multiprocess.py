"""Two processes x 2 simulated devices form one 4-device mesh and write the one-process video;
a process whose peer never joins exits with a clear error in bounded time."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xdit_jax import cli

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-progress", "--mesh", "cfg=2,ulysses=2", "--steps", "2", "--height", "32", "--width", "48",
        "--num-frames", "9", "--prompt", "A dog on a beach."]
MESH = ARGS.index("--mesh") + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cache):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process simulates its own 2 devices
    # (the suite's LLVM -O0, tests/conftest.py: compiling is most of a child's time too)
    env.update(JAX_PLATFORMS="cpu", XDIT_JAX_CACHE=str(cache), XLA_FLAGS="--xla_backend_optimization_level=0")
    return env


def read_frames(folder):
    import imageio.v3 as iio

    return np.stack([iio.imread(f) for f in sorted(Path(folder).glob("*.png"))]).astype(int)


# PipeFusion x Ulysses: K/V buffers, stages and all-to-alls across the processes; cfg=2,ulysses=2 (the same
# mechanism) is slow-marked to keep the default run under 20 minutes (`pytest -m slow` runs it).
@pytest.mark.parametrize("mesh", [pytest.param("cfg=2,ulysses=2", marks=pytest.mark.slow), "ulysses=2,pipefusion=2"])
def test_two_processes_equal_one(tmp_path, monkeypatch, mesh):
    args = ARGS[:MESH] + [mesh] + ARGS[MESH + 1:]
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDIT_JAX_CACHE", str(cache))
    assert cli.main(args + ["--output", str(tmp_path / "one")]) == 0  # this process: 4 of its 8 devices
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), *args, "--output",
                               str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--dist-timeout", "120"], env=child_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "wrote" in outs[0] and "wrote" not in outs[1]  # only process 0 writes
    one, two = read_frames(tmp_path / "one"), read_frames(tmp_path / "two")
    assert one.shape == two.shape == (9, 32, 48, 3)
    # Same mesh and program, 8-bit pixels: the fp32 results round to the same levels.
    assert np.abs(one - two).max() <= 1


def test_peer_never_joins(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *ARGS, "--output",
                        str(tmp_path / "lonely"), "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes",
                        "2", "--process-id", "0", "--dist-timeout", "5"], env=child_env(tmp_path / "cache"),
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == 3
    assert "did not join" in r.stderr and "--dist-timeout=5s" in r.stderr
    assert elapsed < 90
    assert not (tmp_path / "lonely").exists()


def test_bad_process_flags(capsys):
    import pytest

    for argv, needle in [(["--num-processes", "2"], "--coordinator"),
                         (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"], "--process-id"),
                         (["--num-processes", "2", "--coordinator", "h:1", "--mesh", "ulysses=3"], "split evenly")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_process_count_mismatch(tmp_path):
    """Process 1 claims a group of 4 against a coordinator of 2: both stop with an error, in bounded time."""
    port = free_port()
    base = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--no-progress", "--steps", "1", "--height",
            "32", "--width", "48", "--num-frames", "1", "--output", str(tmp_path / "out"), "--dist-timeout", "12",
            "--coordinator", f"127.0.0.1:{port}"]
    p0 = subprocess.Popen(base + ["--mesh", "cfg=2,ulysses=2", "--num-processes", "2", "--process-id", "0"],
                          env=child_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r1 = subprocess.run(base + ["--mesh", "cfg=2,ulysses=4", "--num-processes", "4", "--process-id", "1"],
                        env=child_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    err0 = p0.communicate(timeout=300)[1]
    assert r1.returncode == 3 and "same --num-processes" in r1.stderr
    assert p0.returncode == 3 and "error: process 0 of 2" in err0
    assert not (tmp_path / "out").exists()


def test_peer_dies_mid_run(tmp_path):
    """Process 1 is killed while denoising: process 0 stops with a clear error within about
    --heartbeat-timeout seconds instead of hanging in a collective."""
    import signal

    port = free_port()
    base = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--mesh", "cfg=2,ulysses=2", "--steps", "1000",
            "--height", "64", "--width", "96", "--num-frames", "9", "--output", str(tmp_path / "out"),
            "--dist-timeout", "120", "--heartbeat-timeout", "5", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2"]
    logs = [open(tmp_path / f"p{i}.txt", "w+") for i in range(2)]
    procs = [subprocess.Popen(base + ["--process-id", str(i)], env=child_env(tmp_path / "cache"), stdout=logs[i],
                              stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while "denoising" not in (tmp_path / "p0.txt").read_text():  # process 0's bar: the step loop runs
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "p0.txt").read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out0 = (tmp_path / "p0.txt").read_text()
    assert rc == 3 and "died" in out0, out0[-2000:]
    assert elapsed < 60
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the CogVideoX two-process cases cover the mechanism; kept for `pytest -m slow`
def test_two_processes_equal_one_image_family(tmp_path, monkeypatch):
    """An image family across 2 processes: the tiny PixArt's tiny model is made by process 0 alone, its
    .png equals the one-process one."""
    import imageio.v3 as iio

    args = ["--model", "tiny-pixart", "--no-progress", "--mesh", "cfg=2,ring=2", "--steps", "2", "--height", "32",
            "--width", "48", "--prompt", "A dog on a beach."]
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDIT_JAX_CACHE", str(cache))
    assert cli.main(args + ["--output", str(tmp_path / "one.png")]) == 0
    cache2 = tmp_path / "cache2"  # a fresh cache: the processes must make the tiny model themselves
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), *args, "--output",
                               str(tmp_path / "two.png"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                               "2", "--process-id", str(i), "--dist-timeout", "120"], env=child_env(cache2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    one, two = (iio.imread(tmp_path / n).astype(int) for n in ("one.png", "two.png"))
    assert one.shape == two.shape == (32, 48, 3) and np.abs(one - two).max() <= 1  # as above
