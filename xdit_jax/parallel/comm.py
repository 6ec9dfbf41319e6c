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

import json
import math
import re

import numpy as np

COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_NAME_RE = re.compile(r"%?([A-Za-z_][\w.\-]*)")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST_RE = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


def _dtype_size(dtype: str) -> float:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith("f8") or dtype.startswith("s8") or dtype.startswith("u8"):
        return 1
    return 0  # token, opaque, ...


def shape_bytes(shape_text: str) -> int:
    """Bytes of every array shape in ``shape_text`` (a shape or a tuple of shapes)."""
    total = 0.0
    for dtype, dims in _SHAPE_RE.findall(shape_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _dtype_size(dtype)
    return int(total)


def _match_paren(s: str, i: int) -> int:
    """Index just past the parenthesis group opening at s[i] == '('."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _parse_instruction(line: str):
    """'%name = SHAPE opcode(args), attrs' -> (name, shape, opcode, args, attrs) or None."""
    s = line.strip()
    if s.startswith("ROOT "):
        s = s[5:]
    eq = s.find(" = ")
    if eq < 0:
        return None
    name = s[:eq].strip().lstrip("%")
    rest = s[eq + 3:].lstrip()
    if rest.startswith("("):
        end = _match_paren(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end], rest[end:].lstrip()
    m = re.match(r"([a-z][a-z0-9\-_]*)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    close = _match_paren(rest, m.end() - 1)
    return name, shape, opcode, rest[m.end():close - 1], rest[close:]


def _parse_module(text: str):
    """-> (computations: {name: [instr tuples]}, order: [names in text order], entry name)."""
    comps, order, entry, cur = {}, [], None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMP_RE.match(line.strip())
            if m:
                cur = m.group(2)
                comps[cur] = []
                order.append(cur)
                if m.group(1):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        ins = _parse_instruction(line)
        if ins is not None:
            comps[cur].append(ins)
    if entry is None and order:
        entry = order[-1]
    return comps, order, entry


def _backend_config(attrs: str) -> dict:
    i = attrs.find("backend_config=")
    if i < 0:
        return {}
    j = i + len("backend_config=")
    if j >= len(attrs) or attrs[j] != "{":
        return {}
    depth = 0
    for k in range(j, len(attrs)):
        depth += attrs[k] == "{"
        depth -= attrs[k] == "}"
        if depth == 0:
            try:
                return json.loads(attrs[j:k + 1])
            except ValueError:
                return {}
    return {}


def _callees(attrs: str) -> list[tuple[str, str]]:
    out = [(kind, name) for kind, name in _CALLEE_RE.findall(attrs)]
    for kind, names in _CALLEE_LIST_RE.findall(attrs):
        out += [(kind, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def _trip_count(attrs: str, cond: list, comps: dict) -> int | None:
    cfg = _backend_config(attrs)
    n = cfg.get("known_trip_count", {}).get("n")
    if n is not None:
        return int(n)
    # Best effort: one integer scalar constant and an LT compare in the condition (or its fusions).
    seen, stack, consts, has_lt = set(), [cond], [], False
    while stack:
        instrs = stack.pop()
        for _, shape, opcode, args, a in instrs:
            if opcode == "constant" and re.fullmatch(r"[su](8|16|32|64)\[\]", shape.split("{")[0]):
                consts.append(int(args))
            has_lt |= opcode == "compare" and "direction=LT" in a
            for _, callee in _callees(a):
                if callee in comps and callee not in seen:
                    seen.add(callee)
                    stack.append(comps[callee])
    if len(consts) == 1 and has_lt:
        init = int(cfg.get("known_init_step", {}).get("init", 0))
        return max(consts[0] - init, 0)
    return None


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
    comps, order, entry = _parse_module(text)
    mult = {name: 0 for name in order}
    exact = {name: True for name in order}
    if entry is None:
        return []
    mult[entry] = 1
    # Computations are printed callees first, so walking backwards visits callers first.
    for cname in reversed(order):
        m = mult.get(cname, 0)
        if not m:
            continue
        for _, _, opcode, _, attrs in comps[cname]:
            callees = _callees(attrs)
            trips = None
            if opcode == "while":
                cond = next((c for k, c in callees if k == "condition"), None)
                trips = _trip_count(attrs, comps.get(cond, []), comps)
            for kind, callee in callees:
                if callee not in mult:
                    continue
                factor = 1
                if kind == "body":
                    factor = trips if trips is not None else 1
                    if trips is None:
                        exact[callee] = False
                elif kind == "condition":
                    factor = (trips + 1) if trips is not None else 1
                mult[callee] += m * factor
                exact[callee] = exact[callee] and exact[cname]
    stats = []
    for cname in order:
        if not mult.get(cname):
            continue
        shapes = {name: shape for name, shape, *_ in comps[cname]}
        for name, shape, opcode, args, attrs in comps[cname]:
            op, is_async = _canonical(opcode)
            if op is None:
                continue
            if _SHAPE_RE.search(args):  # operand shapes printed inline
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
