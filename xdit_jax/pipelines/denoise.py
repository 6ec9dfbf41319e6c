"""The shared denoise loop and pipeline plumbing every model family uses.

The loop is plain Python over a jitted step: it drives the progress bar and never pulls
a value back to the host between steps (the arrays stay on device; only the final
``block_until_ready`` waits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass
class StageTimer:
    """Wall-clock seconds per stage ("text_encoding", "denoising", "decoding"...)."""

    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def denoise_loop(step: Callable[[Any, int], Any], carry: Any, num_steps: int, *, progress: bool = True,
                 desc: str = "denoising") -> Any:
    """``carry = step(carry, i)`` for i in range(num_steps), with a tqdm bar; returns the carry."""
    from tqdm.auto import tqdm

    show = progress and jax.process_index() == 0
    for i in tqdm(range(num_steps), desc=desc, disable=not show, unit="step"):
        carry = step(carry, i)
    return jax.block_until_ready(carry)


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the local devices (max over devices), where the backend reports it."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # backends without stats
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def as_numpy(x) -> np.ndarray:
    """Fetch a (possibly sharded, possibly multi-process) array to the host as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
