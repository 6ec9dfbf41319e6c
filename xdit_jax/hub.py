"""Find a model: a local folder, or a hub id fetched with huggingface_hub (cached)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from xdit_jax.safetensors_io import CheckpointError

# What a pipeline needs from the hub: configs, tokenizer files and safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer/*", "tokenizer_2/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder for ``model``: the folder itself, or a hub snapshot downloaded on first use.

    Raises ``CheckpointError`` with what to do when neither works (e.g. offline).
    """
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; --model wants a folder (diffusers layout or converted).")
        return p
    name = str(model)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"Model folder {name!r} does not exist (and it is not a hub id like 'THUDM/CogVideoX-2b').")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, no network ...
        raise CheckpointError(
            f"{name!r} is not a local folder, and downloading it from the hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pass the path of a local diffusers folder (e.g. made with `huggingface-cli download "
            f"{name} --local-dir DIR` on a machine with access), or check the id and your network."
        ) from None
