"""Mesh specs ("cfg=2,ulysses=2") -> a named jax Mesh over ``jax.devices()`` (all processes).

Axis order, outer to inner: data, cfg, pipefusion, ring, ulysses — the axis that talks most
(ulysses) gets neighbouring devices. Axes left out of a spec are 1.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "cfg", "pipefusion", "ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int = 1
    cfg: int = 1
    pipefusion: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    def __str__(self) -> str:
        named = [f"{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1]
        return ",".join(named) or "single device"

    @classmethod
    def parse(cls, spec: "str | MeshSpec | dict | None") -> "MeshSpec":
        """Parse ``"cfg=2,ulysses=2"`` (also a dict or a MeshSpec; None or "" is one device)."""
        if spec is None or isinstance(spec, MeshSpec):
            return spec or cls()
        if isinstance(spec, dict):
            items = list(spec.items())
        else:
            items = []
            for part in str(spec).replace(" ", "").split(","):
                if not part:
                    continue
                if "=" not in part:
                    raise ValueError(f"Bad mesh entry {part!r}: write axis=degree, e.g. 'cfg=2,ulysses=2'.")
                k, v = part.split("=", 1)
                items.append((k, v))
        out = {}
        for k, v in items:
            if k not in AXES:
                raise ValueError(f"Unknown mesh axis {k!r}; the axes are {', '.join(AXES)}.")
            if k in out:
                raise ValueError(f"Mesh axis {k!r} is given twice.")
            try:
                n = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"Mesh degree for {k!r} must be an integer, got {v!r}.") from None
            if n < 1:
                raise ValueError(f"Mesh degree for {k!r} must be >= 1, got {n}.")
            out[k] = n
        ms = cls(**out)
        if ms.cfg not in (1, 2):
            raise ValueError(f"cfg must be 1 or 2 (the two halves of classifier-free guidance), got {ms.cfg}.")
        return ms


def build_mesh(spec: "str | MeshSpec | None" = None, devices=None) -> Mesh:
    """A Mesh with the five named axes over the first ``spec.size`` devices."""
    ms = MeshSpec.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    if ms.size > len(devices):
        fits = [n for n in (1, 2, 4, 8, 16, 32) if n <= len(devices)]
        raise ValueError(f"Mesh {ms} needs {ms.size} devices but only {len(devices)} are available "
                         f"(meshes of {', '.join(map(str, fits))} devices fit).")
    arr = np.array(devices[: ms.size], dtype=object).reshape(ms.shape)
    try:
        from jax.sharding import AxisType

        return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    except (ImportError, TypeError):
        return Mesh(arr, AXES)
