"""Communication accounting: what the compiled program sends, and what the strategies should send.

:func:`collective_stats` reads the compiled HLO text of a jitted function
(``jax.jit(f).lower(*args).compile().as_text()``; the ``Compiled`` or ``Lowered`` object is also
accepted) and lists every collective instruction with how often it runs and how many bytes it
moves per device. The shapes in a compiled SPMD module are per-device shapes, so no division by
the device count is needed.

What is counted
---------------
* Ops: ``all-to-all``, ``collective-permute``, ``all-gather``, ``all-reduce``, ``reduce-scatter``.
  Asynchronous forms count once: ``<op>-start`` is counted (as ``<op>``), ``<op>-done`` is not;
  an op wrapped in an ``async-start`` computation is counted inside that computation.
* ``bytes``: the sum of the instruction's OPERAND sizes (elements x dtype size) for one
  execution, looked up from the operands' defining instructions (compiled HLO text does not
  print operand shapes) or read inline where printed. For an all-to-all this is the whole local
  buffer, of which ``(n-1)/n`` actually leaves the device (``wire_bytes``); for a
  collective-permute it is the block each device sends; for all-gather the local shard; for
  all-reduce / reduce-scatter the full local buffer.
* ``count``: how many times the instruction runs in one call of the program: the product of the
  trip counts of the ``while`` loops around it (through any ``calls=`` / ``to_apply=`` /
  ``body=`` nesting). A loop's trip count comes from its ``known_trip_count`` backend config; if
  absent, best effort: a loop condition holding one integer scalar constant ``N`` and a
  ``direction=LT`` compare is taken as ``N - init`` (init from ``known_init_step``, else 0).
  A loop whose trip count cannot be found counts once and marks its ops ``trip_count_known=False``.
  Conditionals (``branch_computations``) count every branch once (an upper bound).
* Not counted: point-to-point ``send``/``recv`` (some GPU pipelining passes lower a
  collective-permute into them) and host transfers.

Analytic volumes (:func:`ulysses_bytes`, :func:`ring_bytes`, :func:`attention_bytes`) use the same
operand convention, per device, for one call of :func:`xdit_jax.parallel.attention.attention`
on the GLOBAL shapes (batch B as seen by one device, i.e. already divided by data*cfg):

* ``S_pad = ceil(S / (R*U)) * (R*U)``, ``H_pad = ceil(H / U) * U`` (zero heads for Ulysses).
* Ulysses: four all-to-alls (q, k, v in; the output back), each of the local buffer
  ``B * S_pad/(R*U) * H_pad * D`` elements: ``4 * B * S_pad/(R*U) * H_pad * D * itemsize``.
  On the wire each sends ``(U-1)/U`` of that.
* Ring: K and V blocks of ``B * S_pad/R * H_pad/U * D`` elements, each sent ``R - 1`` times:
  ``2 * (R-1) * B * S_pad/R * H_pad/U * D * itemsize``.
"""

from __future__ import annotations

import re

import numpy as np

from xdit_jax.hlo import SHAPE_RE, Module, shape_bytes

__all__ = ["COLLECTIVES", "collective_stats", "summarize", "counts", "shape_bytes", "ulysses_bytes", "ring_bytes",
           "attention_bytes"]

COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")

_NAME_RE = re.compile(r"%?([A-Za-z_][\w.\-]*)")


def _group_size(attrs: str) -> int | None:
    m = re.search(r"replica_groups=\{(\{[^=]*?\})\}", attrs)
    if m:
        first = re.match(r"\{([^}]*)\}", m.group(1))
        return len([x for x in first.group(1).split(",") if x.strip()]) if first else None
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:  # mesh-axes form (newer XLA): mesh['data'=1,...,'ulysses'=4] {'ulysses'}
        sizes = {a: int(n) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        size = 1
        for tok in m.group(2).split(","):
            name = re.search(r"'([^']+)'", tok)
            sub = re.search(r":\((\d+)\)(\d+)", tok)  # a sub-axis 'x':(offset)size
            if name:
                size *= int(sub.group(2)) if sub else sizes.get(name.group(1), 1)
        return size
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)  # iota form: [groups,size]<=[n]
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if m:  # the devices connected to the first source (one ring)
        pairs = [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
        if not pairs:
            return None
        group, frontier = {pairs[0][0]}, [pairs[0][0]]
        while frontier:
            x = frontier.pop()
            for a, b in pairs:
                for y in ((b,) if a == x else ()) + ((a,) if b == x else ()):
                    if y not in group:
                        group.add(y)
                        frontier.append(y)
        return len(group)
    return None


def _canonical(opcode: str) -> tuple[str | None, bool]:
    for op in COLLECTIVES:
        if opcode == op:
            return op, False
        if opcode == op + "-start":
            return op, True
    return None, False


def collective_stats(compiled_or_hlo_text) -> list[dict]:
    """Every collective of a compiled program: one dict per HLO instruction.

    Keys: ``op`` (one of :data:`COLLECTIVES`), ``name``, ``computation``, ``count`` (executions
    per program call, loop trip counts included), ``bytes`` (operand bytes per execution, per
    device), ``total_bytes`` (count x bytes), ``wire_bytes`` (total bytes that leave the device:
    ``(n-1)/n`` of it for all-to-all with group size n, else total_bytes), ``group_size``,
    ``async``, ``trip_count_known``. See the module docstring for what is counted.
    """
    text = compiled_or_hlo_text
    if not isinstance(text, str):
        if hasattr(text, "compile") and not hasattr(text, "cost_analysis"):
            text = text.compile()  # a Lowered
        text = text.as_text()
    mod = Module(text)
    if mod.entry is None:
        return []
    mult, exact = mod.execution_counts()
    stats = []
    for cname in mod.order:
        if not mult.get(cname):
            continue
        shapes = {name: shape for name, shape, *_ in mod.comps[cname]}
        for name, shape, opcode, args, attrs in mod.comps[cname]:
            op, is_async = _canonical(opcode)
            if op is None:
                continue
            if SHAPE_RE.search(args):  # operand shapes printed inline
                nbytes = shape_bytes(args)
            else:
                nbytes = sum(shape_bytes(shapes.get(n, "")) for n in _NAME_RE.findall(args))
            if nbytes == 0 and not is_async:
                nbytes = shape_bytes(shape)  # fall back to the result shape
            n = _group_size(attrs)
            count = mult[cname]
            total = count * nbytes
            wire = total * (n - 1) / n if (op == "all-to-all" and n) else total
            stats.append(dict(op=op, name=name, computation=cname, count=count, bytes=nbytes,
                              total_bytes=total, wire_bytes=int(wire), group_size=n,
                              async_=is_async, trip_count_known=exact[cname]))
    for s in stats:
        s["async"] = s.pop("async_")
    return stats


def summarize(stats: list[dict], key: str = "total_bytes") -> dict[str, int]:
    """Bytes per device per collective kind, e.g. ``{"all-to-all": 4864, "collective-permute": 0}``
    (every kind in :data:`COLLECTIVES` present; ``key="wire_bytes"`` for bytes on the wire)."""
    out = {op: 0 for op in COLLECTIVES}
    for s in stats:
        out[s["op"]] += s[key]
    return out


def counts(stats: list[dict]) -> dict[str, int]:
    """Executions per program call per collective kind."""
    out = {op: 0 for op in COLLECTIVES}
    for s in stats:
        out[s["op"]] += s["count"]
    return out


# --------------------------------------------------------------------------------------------
# Analytic volumes of one attention call (per device, operand convention; module docstring).
# --------------------------------------------------------------------------------------------

def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def _padded(seq_len: int, heads: int, ring: int, ulysses: int) -> tuple[int, int]:
    deg = ring * ulysses
    return -(-seq_len // deg) * deg, -(-heads // ulysses) * ulysses


def ulysses_bytes(batch: int, seq_len: int, heads: int, head_dim: int, ulysses: int, ring: int = 1,
                  dtype="float32") -> int:
    """All-to-all bytes per device: ``4 * B * S_pad/(R*U) * H_pad * D * itemsize`` (0 if U == 1).
    ``batch``: the batch one device sees; ``seq_len``: the global (padded or not) length."""
    if ulysses == 1:
        return 0
    s_pad, h_pad = _padded(seq_len, heads, ring, ulysses)
    return 4 * batch * (s_pad // (ring * ulysses)) * h_pad * head_dim * _itemsize(dtype)


def ring_bytes(batch: int, seq_len: int, heads: int, head_dim: int, ring: int, ulysses: int = 1,
               dtype="float32") -> int:
    """Collective-permute bytes per device: ``2 * (R-1) * B * S_pad/R * H_pad/U * D * itemsize``."""
    if ring == 1:
        return 0
    s_pad, h_pad = _padded(seq_len, heads, ring, ulysses)
    return 2 * (ring - 1) * batch * (s_pad // ring) * (h_pad // ulysses) * head_dim * _itemsize(dtype)


def attention_bytes(batch: int, seq_len: int, heads: int, head_dim: int, ring: int = 1,
                    ulysses: int = 1, dtype="float32") -> dict[str, int]:
    """Expected :func:`summarize` of one attention call (USP: both terms)."""
    out = {op: 0 for op in COLLECTIVES}
    out["all-to-all"] = ulysses_bytes(batch, seq_len, heads, head_dim, ulysses, ring, dtype)
    out["collective-permute"] = ring_bytes(batch, seq_len, heads, head_dim, ring, ulysses, dtype)
    return out
