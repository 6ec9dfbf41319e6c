"""Many processes, one mesh: ``jax.distributed`` with bounded waits (no hangs).

Every process calls :func:`initialize` before any other jax work. A peer that never joins makes
``initialize`` fail after ``timeout_s``; a peer that dies later is declared dead by the
coordination service after ``heartbeat_s`` and the survivors are stopped with an error.
Only process 0 writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

ENV = {"coordinator": "XDIT_COORDINATOR", "num_processes": "XDIT_NUM_PROCESSES", "process_id": "XDIT_PROCESS_ID"}


class DistributedError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProcessGroup:
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = 120
    heartbeat_s: int = 60

    @property
    def active(self) -> bool:
        return self.num_processes > 1

    @classmethod
    def from_args(cls, coordinator=None, num_processes=None, process_id=None, timeout_s=120,
                  heartbeat_s=60) -> "ProcessGroup":
        """Flags first, then XDIT_COORDINATOR / XDIT_NUM_PROCESSES / XDIT_PROCESS_ID."""
        coordinator = coordinator or os.environ.get(ENV["coordinator"])
        n = num_processes if num_processes is not None else os.environ.get(ENV["num_processes"])
        i = process_id if process_id is not None else os.environ.get(ENV["process_id"])
        n = int(n) if n is not None else 1
        i = int(i) if i is not None else 0
        if n < 1:
            raise ValueError(f"--num-processes must be >= 1, got {n}.")
        if n > 1:
            if not coordinator or ":" not in coordinator:
                raise ValueError("Several processes need --coordinator HOST:PORT (the address of process 0).")
            if not 0 <= i < n:
                raise ValueError(f"--process-id must be in [0, {n - 1}], got {i}.")
        if timeout_s < 1 or heartbeat_s < 1:
            raise ValueError("--dist-timeout and --heartbeat-timeout must be >= 1 second.")
        return cls(coordinator, n, i, int(timeout_s), int(heartbeat_s))


SUPERVISED = "XDIT_SUPERVISED"


def supervise(group: ProcessGroup, argv: list[str]) -> int | None:
    """Run this process's work in a child and turn a runtime abort into a clear error.

    The jax distributed runtime ends a process with a fatal log (SIGABRT) when a peer never joins
    or stops sending heartbeats; that cannot be caught in Python, so the parent watches the child
    and says what happened. Returns the exit code, or None inside the child (go on working).
    """
    if not group.active or os.environ.get(SUPERVISED):
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, SUPERVISED: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    child = subprocess.run([sys.executable, "-m", "xdit_jax.cli", *argv], env=env)
    rc = child.returncode
    if rc < 0 or rc == 134:
        print(f"error: process {group.process_id} of {group.num_processes} was stopped by the jax distributed "
              f"runtime: a peer did not join {group.coordinator} within --dist-timeout={group.timeout_s}s, or a "
              f"peer died and sent no heartbeat for --heartbeat-timeout={group.heartbeat_s}s. Start every process "
              "with the same --coordinator and --num-processes and check the other processes' logs.",
              file=sys.stderr)
        return 3
    return rc


def initialize(group: ProcessGroup) -> None:
    """Join the process group (no-op for one process). Raises DistributedError with what to check."""
    if not group.active:
        return
    import jax

    if _cpu_only():  # CPU collectives across processes go through gloo
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # older/newer jax without the option: its default is used
            pass
    try:
        jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                                   initialization_timeout=group.timeout_s,
                                   heartbeat_timeout_seconds=group.heartbeat_s,
                                   shutdown_timeout_seconds=max(10, group.heartbeat_s))
    except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError here
        raise DistributedError(
            f"Process {group.process_id} of {group.num_processes} could not join the group at "
            f"{group.coordinator} within {group.timeout_s}s ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Check that every process was started with the same --coordinator and --num-processes, that "
            "process 0 is running, and that the port is reachable.") from None
    if jax.process_count() != group.num_processes:
        raise DistributedError(f"Joined a group of {jax.process_count()} processes, expected {group.num_processes}: "
                               "start every process with the same --num-processes as process 0.")


def _cpu_only() -> bool:
    plats = os.environ.get("JAX_PLATFORMS", "")
    if plats:
        return plats.split(",")[0] == "cpu"
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def call_on_process_zero(module: str, func: str, name: str, **kwargs) -> None:
    """Process 0 calls ``module.func(**kwargs)`` (JSON-able kwargs) — in a fresh single-process
    interpreter when there are several processes, so that its file writes (orbax) join no barrier
    of the group — and every process waits for it at barrier ``name``."""
    import importlib
    import json

    import jax

    if jax.process_count() == 1:
        getattr(importlib.import_module(module), func)(**kwargs)
        return
    if jax.process_index() == 0:
        code = (f"import importlib, json; getattr(importlib.import_module({module!r}), {func!r})"
                f"(**json.loads({json.dumps(kwargs)!r}))")
        env = {k: v for k, v in os.environ.items() if k not in ENV.values()}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise DistributedError(f"{module}.{func} failed in the helper process:\n{r.stderr[-4000:]}")
    barrier(name)


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
