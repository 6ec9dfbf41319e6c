"""Where a profiled step's device time goes: kernels from a jax profiler trace, grouped.

    python -m xdit_jax.trace_summary DIR [--steps N] [--top 20]

``DIR`` is a folder written by ``jax.profiler.trace(DIR, create_perfetto_trace=True)`` (``benchmark.py
--profile DIR`` writes one); the newest ``perfetto_trace.json.gz`` under it is read. Kernel events on the
device's stream lines are summed by kernel name and by a coarse category (attention, matmul, collective,
copy, other fusions); ``--steps`` divides the totals by the number of profiled steps. Off a GPU the trace
has no device streams and the summary says so.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# First match wins; kernel names of cuDNN, cuBLAS/CUTLASS, NCCL and XLA's own fusions (lower-cased).
CATEGORIES = (
    ("attention", re.compile(r"sdpa|fmha|flash|attention|fprop_.*softmax")),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|triton_gemm|cublas|__dot|dot_")),
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|allreduce|all_gather|all-gather|all_to_all|"
                              r"all-to-all|collective|permute|reduce_scatter")),
    ("copy", re.compile(r"memcpy|memset|copy|transpose")),
)


def category(kernel_name: str) -> str:
    low = kernel_name.lower()
    for cat, pattern in CATEGORIES:
        if pattern.search(low):
            return cat
    return "other fusions"


def find_trace(folder: str | Path) -> Path:
    paths = sorted(Path(folder).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}: profile with "
                                "jax.profiler.trace(DIR, create_perfetto_trace=True) (benchmark.py --profile DIR)")
    return paths[-1]


def load_events(path: str | Path) -> dict:
    path = Path(path)
    raw = gzip.open(path, "rt") if path.suffix == ".gz" else open(path)
    with raw as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"traceEvents": data}


def summarize(trace: dict, steps: int = 1) -> dict:
    """Device kernel time per category and per kernel name (seconds per step), from a trace event dict."""
    events = trace.get("traceEvents", [])
    proc, thread = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = (e.get("args") or {}).get("name", "")
        if e.get("name") == "process_name":
            proc[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            thread[(e.get("pid"), e.get("tid"))] = name
    devices = {pid for pid, name in proc.items() if re.search(r"gpu|device:(?!cpu)", name.lower())}
    streams = {k for k, name in thread.items() if k[0] in devices and name.lower().startswith("stream")}
    per_kernel: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in devices:
            continue
        if streams and (e.get("pid"), e.get("tid")) not in streams:
            continue  # the "XLA Ops" / "XLA Modules" lines repeat the kernels' time under other names
        per_kernel[e.get("name", "?")] += float(e.get("dur", 0.0)) * 1e-6
        count[e.get("name", "?")] += 1
    per_cat: dict[str, float] = defaultdict(float)
    for name, t in per_kernel.items():
        per_cat[category(name)] += t
    total = sum(per_kernel.values())
    n = max(int(steps), 1)
    return {
        "devices": sorted(proc[p] for p in devices),
        "kernels": len(per_kernel),
        "device_s_per_step": total / n,
        "categories": {k: v / n for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "top": [(name, t / n, count[name] // n, category(name))
                for name, t in sorted(per_kernel.items(), key=lambda kv: -kv[1])],
    }


def format_summary(s: dict, top: int = 20) -> str:
    if not s["kernels"]:
        return "trace summary: no device kernel events (not a GPU trace, or the profiler saw no device)"
    total = s["device_s_per_step"]
    lines = [f"device kernel time per step: {total * 1e3:.1f} ms over {s['kernels']} kernel names "
             f"({', '.join(s['devices'])})", f"{'category':16s} {'ms/step':>10s} {'share':>7s}"]
    lines += [f"{k:16s} {v * 1e3:10.2f} {v / total:7.1%}" for k, v in s["categories"].items()]
    lines.append(f"{'kernel (top ' + str(top) + ')':72s} {'ms/step':>9s} {'calls':>6s} category")
    for name, t, calls, cat in s["top"][:top]:
        short = name if len(name) <= 72 else name[:69] + "..."
        lines.append(f"{short:72s} {t * 1e3:9.2f} {calls:6d} {cat}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a jax profiler folder (or a perfetto_trace.json[.gz] file)")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (totals are divided)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    p = Path(args.folder)
    s = summarize(load_events(p if p.is_file() else find_trace(p)), args.steps)
    print(json.dumps(s) if args.json else format_summary(s, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
