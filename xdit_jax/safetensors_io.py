"""Read diffusers/transformers safetensors checkpoints into numpy, without torch.

Handles a single ``*.safetensors`` file, a sharded checkpoint with its ``*.safetensors.index.json``,
and the ``variant`` files diffusers writes (``diffusion_pytorch_model.bf16.safetensors``).
bf16 tensors come back as ``ml_dtypes.bfloat16`` arrays (numpy has no native bf16).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: missing, corrupt, or not matching the model."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (copied out of a memory map)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes).")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path} is truncated or corrupt (header length {n} > file size).")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
            base = 8 + n
            out: dict[str, np.ndarray] = {}
            if size == base:
                return out
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    dtype = _DTYPES.get(info.get("dtype"))
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
                    start, end = info["data_offsets"]
                    if base + end > size:
                        raise CheckpointError(f"{path} is truncated: tensor {name!r} runs past the end of the file.")
                    shape = tuple(info["shape"])
                    view = np.frombuffer(mm, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                         offset=base + start)
                    out[name] = view.reshape(shape).copy()
                    del view  # the map cannot close while a view of it exists
            return out
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint file {path} does not exist.") from None


def find_weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files that make up the checkpoint in a diffusers component folder.

    Prefers a sharded index when there is one; a ``variant`` (e.g. ``"bf16"``) picks
    ``name.variant.safetensors`` files, and is tried automatically when no plain file exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder.")
    files = sorted(p.name for p in folder.iterdir())

    def pick(var):
        suffix = f".{var}.safetensors" if var else ".safetensors"
        if var is None:
            idx = [f for f in files if f.endswith(".safetensors.index.json") and f.count(".") == 3]
        else:  # diffusers/transformers write name.safetensors.index.VAR.json; also name.VAR.safetensors.index.json
            idx = [f for f in files if f.endswith(f".safetensors.index.{var}.json")
                   or f.endswith(f".{var}.safetensors.index.json")]
        if idx:
            with open(folder / idx[0]) as fh:
                try:
                    weight_map = json.load(fh)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{folder / idx[0]} is not a valid index file: {e}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{folder}: the index names shard(s) that are missing: {missing}.")
            return [folder / s for s in shards]
        singles = [f for f in files if f.endswith(suffix) and "-of-" not in f]
        if var is None:
            singles = [f for f in singles if f.count(".") == 1]
        return [folder / singles[0]] if singles else []

    if variant:
        found = pick(variant)
    else:
        found = pick(None)
        if not found:
            for var in ("fp32", "bf16", "fp16"):
                found = pick(var)
                if found:
                    break
    if not found:
        bins = [f for f in files if f.endswith(".bin") or f.endswith(".pt")]
        hint = (" It holds only PyTorch pickles (.bin); re-save it with safetensors "
                "(diffusers: save_pretrained(..., safe_serialization=True))." if bins else "")
        raise CheckpointError(f"No safetensors weights found in {folder}.{hint}")
    return found


def load_component_weights(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of one diffusers component folder (``transformer/``, ``vae/`` ...)."""
    out: dict[str, np.ndarray] = {}
    for f in find_weight_files(folder, variant):
        out.update(read_safetensors(f))
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays as a safetensors file (used by tests to forge checkpoints)."""
    inv = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {"dtype": inv[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
