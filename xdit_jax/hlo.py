"""Reading compiled HLO text: computations, instructions, how often each computation runs.

One parser for the two accountings built on it: the collectives of a step
(:mod:`xdit_jax.parallel.comm`) and the FLOPs of its dots and convolutions
(:func:`matmul_flops`, used by the benchmark). XLA's own ``cost_analysis()`` counts the body of a
``while`` loop once, and the block stack is one ``lax.scan``: both accountings need the number of
times each computation runs, which :func:`execution_counts` derives from the loops' trip counts.
"""

from __future__ import annotations

import json
import math
import re

SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST_RE = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}


def dtype_size(dtype: str) -> float:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if dtype.startswith(("f8", "s8", "u8")):
        return 1
    return 0  # token, opaque, ...


def shape_bytes(shape_text: str) -> int:
    """Bytes of every array shape in ``shape_text`` (a shape or a tuple of shapes)."""
    total = 0.0
    for dtype, dims in SHAPE_RE.findall(shape_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * dtype_size(dtype)
    return int(total)


def dims(shape_text: str) -> list[int] | None:
    """The dimensions of the first array shape in ``shape_text``."""
    m = SHAPE_RE.search(shape_text)
    return None if not m else [int(d) for d in m.group(2).split(",") if d]


def match_paren(s: str, i: int) -> int:
    """Index just past the parenthesis group opening at s[i] == '('."""
    depth = 0
    for j in range(i, len(s)):
        depth += s[j] == "("
        depth -= s[j] == ")"
        if depth == 0:
            return j + 1
    return len(s)


def parse_instruction(line: str):
    """'%name = SHAPE opcode(args), attrs' -> (name, shape, opcode, args, attrs) or None."""
    s = line.strip().removeprefix("ROOT ")
    name, eq, rest = s.partition(" = ")
    if not eq:
        return None
    rest = rest.lstrip()
    end = match_paren(rest, 0) if rest.startswith("(") else rest.find(" ")
    if end < 0:
        return None
    shape, rest = rest[:end], rest[end:].lstrip()
    m = re.match(r"([a-z][a-z0-9\-_]*)\(", rest)
    if not m:
        return None
    close = match_paren(rest, m.end() - 1)
    return name.strip().lstrip("%"), shape, m.group(1), rest[m.end():close - 1], rest[close:]


class Module:
    """A parsed HLO module: ``comps`` {computation: [instruction tuples]}, ``order`` (as printed:
    callees before callers), ``entry``, ``params`` {computation: {parameter name: shape}}."""

    def __init__(self, text: str):
        self.comps: dict[str, list] = {}
        self.order: list[str] = []
        self.params: dict[str, dict[str, str]] = {}
        self.entry = cur = None
        for line in text.splitlines():
            st = line.strip()
            if cur is None:
                m = _COMP_RE.match(st)
                if m:
                    cur = m.group(2)
                    self.comps[cur] = []
                    self.order.append(cur)
                    self.entry = cur if m.group(1) else self.entry
                    self.params[cur] = {k.strip().lstrip("%"): v for k, _, v in
                                        (p.partition(":") for p in re.split(r",\s*(?![^\[]*\])", m.group(3)))}
                continue
            if st == "}":
                cur = None
                continue
            ins = parse_instruction(line)
            if ins is not None:
                self.comps[cur].append(ins)
        if self.entry is None and self.order:
            self.entry = self.order[-1]

    def execution_counts(self) -> tuple[dict[str, int], dict[str, bool]]:
        """({computation: runs per call of the entry}, {computation: whether every loop around it
        had a known trip count}). Loop bodies run ``trips`` times, conditions ``trips + 1``; a loop
        whose trip count cannot be found counts once. Conditionals count every branch (an upper
        bound)."""
        mult = {name: 0 for name in self.order}
        exact = {name: True for name in self.order}
        if self.entry is None:
            return mult, exact
        mult[self.entry] = 1
        for cname in reversed(self.order):  # callers are printed after their callees
            m = mult.get(cname, 0)
            if not m:
                continue
            for _, _, opcode, _, attrs in self.comps[cname]:
                called = callees(attrs)
                trips = None
                if opcode == "while":
                    cond = next((c for k, c in called if k == "condition"), None)
                    trips = self.trip_count(attrs, cond)
                for kind, callee in called:
                    if callee not in mult:
                        continue
                    factor = 1
                    if kind == "body":
                        factor = trips if trips is not None else 1
                        exact[callee] = exact[callee] and trips is not None
                    elif kind == "condition":
                        factor = (trips + 1) if trips is not None else 1
                    mult[callee] += m * factor
                    exact[callee] = exact[callee] and exact[cname]
        return mult, exact

    def trip_count(self, attrs: str, cond: str | None) -> int | None:
        """A ``while``'s trip count: its ``known_trip_count``; else, best effort, a condition (or its
        fusions) holding one integer scalar constant N and an LT compare: N - ``known_init_step``."""
        cfg = backend_config(attrs)
        n = cfg.get("known_trip_count", {}).get("n")
        if n is not None:
            return int(n)
        seen, stack, consts, has_lt = set(), [self.comps.get(cond, [])], [], False
        while stack:
            for _, shape, opcode, args, a in stack.pop():
                if opcode == "constant" and re.fullmatch(r"[su](8|16|32|64)\[\]", shape.split("{")[0]):
                    consts.append(int(args))
                has_lt |= opcode == "compare" and "direction=LT" in a
                for _, callee in callees(a):
                    if callee in self.comps and callee not in seen:
                        seen.add(callee)
                        stack.append(self.comps[callee])
        if len(consts) == 1 and has_lt:
            return max(consts[0] - int(cfg.get("known_init_step", {}).get("init", 0)), 0)
        return None


def backend_config(attrs: str) -> dict:
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


def callees(attrs: str) -> list[tuple[str, str]]:
    """(kind, computation) of every computation an instruction calls."""
    out = [(kind, name) for kind, name in _CALLEE_RE.findall(attrs)]
    for kind, names in _CALLEE_LIST_RE.findall(attrs):
        out += [(kind, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def _operand_dims(args: str, i: int, shapes: dict[str, str]) -> list[int] | None:
    """Dims of the i-th operand of an instruction (printed inline, or looked up by name)."""
    parts = [a.strip() for a in re.split(r",\s*(?![^\[{]*[\]}])", args) if a.strip()]
    if i >= len(parts):
        return None
    a = parts[i]
    return dims(a) if SHAPE_RE.search(a) else dims(shapes.get(a.split()[-1].lstrip("%"), ""))


def _int_list(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def matmul_flops(hlo_text: str) -> float | None:
    """FLOPs of the dots and convolutions of a compiled HLO module, loops counted by trip count:
    2 x (output elements) x (contracted size) for every ``dot`` (also cuBLAS gemm custom-calls) and
    ``convolution``. Element-wise work is not counted. None if no computation was found."""
    mod = Module(hlo_text)
    if mod.entry is None:
        return None
    mult, _ = mod.execution_counts()
    total = 0.0
    for cname in mod.order:
        mc = mult.get(cname, 0)
        if not mc:
            continue
        shapes = dict(mod.params.get(cname, {}))
        shapes.update({n: sh for n, sh, *_ in mod.comps[cname]})
        for _, shape, opcode, args, attrs in mod.comps[cname]:
            out = dims(shape)
            if out is None:
                continue
            n_out = math.prod(out)
            if opcode == "dot":
                lhs = _operand_dims(args, 0, shapes)
                if lhs is not None:
                    total += mc * 2.0 * n_out * math.prod(lhs[c] for c in _int_list(attrs, "lhs_contracting_dims"))
            elif opcode == "convolution":
                rhs = _operand_dims(args, 1, shapes)
                dl = re.search(r"dim_labels=\w+_(\w+)->", attrs)
                if rhs is not None and dl and "o" in dl.group(1):
                    total += mc * 2.0 * n_out * math.prod(rhs) / rhs[dl.group(1).index("o")]
            elif opcode == "custom-call" and "gemm" in attrs:
                lhs = _operand_dims(args, 0, shapes)
                cm = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
                if lhs is not None and cm:
                    k = math.prod(lhs[int(c.strip().strip('"'))] for c in cm.group(1).split(",") if c.strip())
                    total += mc * 2.0 * n_out * k
    return total


def memory_analysis_bytes(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program (bytes per device: arguments, output, aliases,
    temporaries, code) and ``peak_estimate_bytes`` from them, or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
        if m is None:
            return None
        out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "alias_size_in_bytes", "temp_size_in_bytes",
                                               "generated_code_size_in_bytes") if hasattr(m, k)}
        out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                                      + out.get("temp_size_in_bytes", 0) - out.get("alias_size_in_bytes", 0))
        return out
    except Exception:
        return None
