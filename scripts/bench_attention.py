"""Time per-device attention kernels alone on one shape: cuDNN, Mosaic GPU (FlashAttention-3), Pallas, XLA.

    python scripts/bench_attention.py                                  # CogVideoX-5B at 49x480x720, CFG
    python scripts/bench_attention.py --shape 2,17776,30,64            # the 2B layer
    python scripts/bench_attention.py --shape 1,64,2,16 --dtype float32 --kernels xla,pallas   # CPU smoke

Each kernel runs ``block_attention`` as the model does (the joint sequence, no padding), warmed up,
then ``--steps`` calls interleaved; the table shows the median, TFLOP/s (4 B S^2 H D per call) and
the max difference from the first kernel. ``pallas:BQxBK[xWARPSxSTAGES]`` picks tiles, e.g.
``pallas:128x64x4x3``; ``mosaic:BQxBKV[xSTAGES]`` the tiles of jax's FlashAttention-3 Mosaic GPU kernel
(H100/H200), e.g. ``mosaic:64x128x2``. Off a GPU the Pallas kernel runs in the interpreter and the Mosaic
one's reference stands in: tiny shapes only.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_KERNELS = ("cudnn,mosaic,mosaic:64x64x2,mosaic:64x128x3,mosaic:64x256x2,mosaic:128x128x2,mosaic:128x64x2,"
                   "pallas")


def make_kernel(name: str, scale: float):
    from xdit_jax.parallel.attention import block_attention
    from xdit_jax.parallel.mosaic_attention import Tiles, fa3_attention
    from xdit_jax.parallel.pallas_attention import flash_attention

    if name.startswith("pallas:"):
        parts = [int(x) for x in name.split(":", 1)[1].split("x")]
        tiles = dict(zip(("block_q", "block_k", "num_warps", "num_stages"), parts))
        return lambda q, k, v: flash_attention(q, k, v, scale=scale, **tiles)[0]
    if name.startswith("mosaic:"):
        tiles = Tiles.parse(name.split(":", 1)[1])
        return lambda q, k, v: fa3_attention(q, k, v, scale=scale, tiles=tiles)[0]
    if name not in ("xla", "cudnn", "pallas", "mosaic"):
        raise SystemExit(f"unknown kernel {name!r}: use xla, cudnn, pallas, mosaic, pallas:BQxBK[xWARPSxSTAGES] "
                         "or mosaic:BQxBKV[xSTAGES]")
    return functools.partial(lambda q, k, v, backend: block_attention(q, k, v, scale=scale, backend=backend,
                                                                      need_lse=False)[0], backend=name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,17776,48,64", help="B,S,H,D [2,17776,48,64: CogVideoX-5B, CFG]")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--kernels", default=DEFAULT_KERNELS, help=f"comma-separated [{DEFAULT_KERNELS}]")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    b, s, h, d = (int(x) for x in args.shape.split(","))
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.float32).astype(dtype) for x in keys)
    flops = 4.0 * b * s * s * h * d
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    fns, outs, times = {}, {}, {}
    for name in names:
        try:
            fn = jax.jit(make_kernel(name, d ** -0.5))
            t0 = time.perf_counter()
            outs[name] = np.asarray(fn(q, k, v).astype(jnp.float32))
            fns[name], times[name] = fn, []
            print(f"[attn] {name}: compiled and ran in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
        except Exception as e:  # a kernel this device cannot run (cuDNN off a GPU, a tile Triton refuses)
            print(f"[attn] {name}: skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
    order = list(fns)
    for i in range(args.steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](q, k, v))
            times[name].append(time.perf_counter() - t0)
    print(f"attention B,S,H,D = {b},{s},{h},{d} {args.dtype} on {jax.devices()[0].device_kind}; "
          f"{flops / 1e12:.2f} TFLOP per call; {args.steps} calls each, interleaved")
    print(f"{'kernel':24s} {'median ms':>10s} {'min ms':>8s} {'TFLOP/s':>8s} {'max |diff|':>11s}")
    first = order[0] if order else None
    for name in order:
        med = statistics.median(times[name])
        diff = float(np.abs(outs[name] - outs[first]).max())
        print(f"{name:24s} {med * 1e3:10.2f} {min(times[name]) * 1e3:8.2f} {flops / med / 1e12:8.1f} {diff:11.2e}")
    return 0 if order else 1


if __name__ == "__main__":
    raise SystemExit(main())
