r"""Map a flat PyTorch state dict onto the parameters of a Flax NNX module.

The Flax modules in ``xdit_jax.models`` name their submodules exactly as the diffusers /
transformers modules do, so the map is derived, not written out: a Flax leaf path
``('transformer_blocks', 'attn1', 'to_q', 'kernel')`` reads the torch key
``transformer_blocks.{i}.attn1.to_q.weight`` for every layer ``i`` (stacked collections carry a
leading layer axis) and applies the layout change its leaf name implies:

=============  ============================  =======================================
Flax leaf      torch name                    transform
=============  ============================  =======================================
``kernel``     ``weight`` (2-D, Linear)      transpose ``(out, in) -> (in, out)``
``kernel``     ``weight`` (4/5-D, Conv)      ``(O, I, *k) -> (*k, I, O)``
``scale``      ``weight`` (norms)            none
``embedding``  ``weight`` (nn.Embedding)     none
other          same name                     none
=============  ============================  =======================================

Whatever does not follow the rule is a *table* per model: ``renames`` — ordered
``(regex, replacement)`` pairs applied with ``re.sub`` to the dotted torch name derived from the Flax
path (layer indices already in place), e.g. ``(r"\.to_out\.", ".to_out.0.")``; ``ignore`` —
torch keys (regexes) that exist in checkpoints but carry no parameter of ours (buffers).
Missing, unexpected and misshaped tensors are all reported in one clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from xdit_jax.safetensors_io import CheckpointError

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _torch_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 2:
            return arr.T
        if arr.ndim >= 3:
            return np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
    return arr


def expected_shapes(module_fn) -> dict:
    """Pure dict of ``jax.ShapeDtypeStruct`` for the params of the module ``module_fn()`` builds."""
    abstract = nnx.eval_shape(module_fn)
    return to_pure_dict(nnx.state(abstract, nnx.Param))


def to_pure_dict(state) -> dict:
    """``nnx.State`` -> nested dict of arrays (works across flax versions)."""
    if hasattr(nnx, "to_pure_dict"):
        return nnx.to_pure_dict(state)
    return state.to_pure_dict()


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def _unflatten(items):
    out: dict = {}
    for path, v in items:
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def _stack_spec(spec, flax_prefix: tuple) -> tuple[tuple, int, int]:
    """A ``stacked`` entry -> (torch name parts, first torch layer index, layer count)."""
    if isinstance(spec, (int, np.integer)):
        return flax_prefix, 0, int(spec)
    torch_name, first, count = spec
    return tuple(str(torch_name).split(".")), int(first), int(count)


def map_state_dict(
    flat: Mapping[str, np.ndarray],
    expected: Mapping,
    *,
    stacked: Mapping[str, int | tuple[str, int, int]] | None = None,
    renames: Sequence[tuple[str, str]] = (),
    ignore: Iterable[str] = (),
    dtype=None,
    what: str = "checkpoint",
) -> dict:
    """Build the Flax params pure dict ``expected`` from the torch state dict ``flat``.

    ``stacked`` maps the Flax name of a stacked collection (e.g. ``"transformer_blocks"``) to its
    layer count; its leaves carry a leading layer axis gathered from ``name.{i}.`` torch keys. The
    count may instead be a triple ``(torch_name, first, count)``: layer ``i`` of the Flax stack then
    reads the torch keys ``torch_name.{first + i}.`` — for a torch ``ModuleList`` split into several
    Flax stacks (HunyuanDiT's ``blocks_skip`` reads ``blocks.{n // 2 + 1 + i}``).
    ``dtype``: cast floating arrays to this dtype (``None`` keeps the expected leaf's dtype).
    """
    stacked = dict(stacked or {})
    ignore_re = [re.compile(p) for p in ignore]
    used: set[str] = set()
    missing: list[str] = []
    misshaped: list[str] = []
    items = []

    renames_re = [(re.compile(p), r) for p, r in renames]

    def torch_name(dotted_flax: str) -> str:
        for pat, rep in renames_re:
            dotted_flax = pat.sub(rep, dotted_flax)
        return dotted_flax

    for path, spec in _flatten(expected):
        leaf = path[-1]
        tleaf = _LEAF.get(leaf, leaf)
        n_layers = None
        stack_at = None
        for j in range(len(path) - 1):
            key = ".".join(path[: j + 1])
            if key in stacked:
                stack_prefix, first, n_layers = _stack_spec(stacked[key], path[: j + 1])
                stack_at = j + 1
                break
        want_shape = tuple(spec.shape)
        target_dtype = dtype if dtype is not None else spec.dtype

        def fetch(p):
            name = torch_name(".".join(p[:-1] + (tleaf,)))
            if name not in flat:
                missing.append(name)
                return None
            used.add(name)
            return _torch_layout(np.asarray(flat[name]), leaf)

        if n_layers is None:
            arr = fetch(path)
            if arr is None:
                continue
            if arr.shape != want_shape:
                misshaped.append(f"{torch_name('.'.join(path[:-1] + (tleaf,)))}: checkpoint {arr.shape} "
                                 f"(after layout change), model {want_shape}")
                continue
        else:
            layers = []
            for i in range(n_layers):
                p = stack_prefix + (str(first + i),) + path[stack_at:]
                a = fetch(p)
                if a is not None:
                    if a.shape != want_shape[1:]:
                        misshaped.append(f"{torch_name('.'.join(p[:-1] + (tleaf,)))}: checkpoint {a.shape} "
                                         f"(after layout change), model {want_shape[1:]}")
                        a = None
                layers.append(a)
            if any(a is None for a in layers):
                continue
            arr = np.stack(layers)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
            arr = arr.astype(target_dtype)
        items.append((path, arr))

    unexpected = sorted(k for k in flat if k not in used and not any(r.search(k) for r in ignore_re))
    if missing or unexpected or misshaped:
        lines = [f"The {what} does not match the model configuration:"]
        for title, lst in (("missing tensors", missing), ("unexpected tensors", unexpected),
                           ("tensors with the wrong shape", misshaped)):
            if lst:
                shown = ", ".join(lst[:8]) + (f", ... ({len(lst)} in all)" if len(lst) > 8 else "")
                lines.append(f"  {title}: {shown}")
        lines.append("Check that the folder's config.json belongs to these weights, "
                     "and that the files were not truncated.")
        raise CheckpointError("\n".join(lines))
    return _unflatten(items)


def build_module(module_fn, params: Mapping) -> nnx.Module:
    """The module ``module_fn()`` builds, holding ``params`` (a pure dict of arrays).

    The module is built abstractly (no random init, no memory), then the arrays are put in:
    loading a 5B model costs one copy of its weights, not two.
    """
    abstract = nnx.eval_shape(module_fn)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, dict(params)))
    return nnx.merge(graphdef, state)
