"""Orbax save / restore of parameter pytrees (nested dicts of arrays), with shardings."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Write ``params`` to ``path`` (which must not exist). Every process calls it (orbax coordinates)."""
    ck = _checkpointer()
    ck.save(Path(path).absolute(), params)
    ck.wait_until_finished()


def restore_params(path: str | os.PathLike, dtype=None, sharding=None) -> dict:
    """Read a params pytree. ``dtype``: cast floating leaves on read; ``sharding``: a
    ``jax.sharding.Sharding`` for every leaf, or a callable ``(path, shape) -> Sharding``
    (default: replicated on the first local device)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"No converted parameters at {path}.")
    ck = _checkpointer()
    meta = ck.metadata(path)
    tree = getattr(meta, "item_metadata", None) or meta
    tree = getattr(tree, "tree", tree)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(kp, m):
        dt = np.dtype(m.dtype)
        if dtype is not None and (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
            dt = np.dtype(dtype)
        sh = sharding(kp, m.shape) if callable(sharding) else (sharding or default)
        return jax.ShapeDtypeStruct(tuple(m.shape), dt, sharding=sh)

    abstract = jax.tree_util.tree_map_with_path(target, tree, is_leaf=lambda x: hasattr(x, "shape"))
    return ck.restore(path, abstract)
