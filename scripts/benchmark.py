#!/usr/bin/env python
"""Benchmark xdit_jax: one denoising step (default) or the VAE decode memory (``vae-memory``).

    python scripts/benchmark.py [step] --model cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model pixart-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model hunyuandit-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model mochi-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model flux-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model sd3-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model wan-cpu-small --compare diffusers --steps 7
    python scripts/benchmark.py step --model cogvideox-2b --mesh 1 --mesh cfg=2 --json
    python scripts/benchmark.py vae-memory ...        (xdit_jax.parallel.vae_bench)

``step`` prints a table (and, with ``--json``, one JSON object a line on stdout; the progress
goes to stderr). See docs/benchmarks.md for what each column means and the GPU runbook.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUBCOMMANDS = ("step", "vae-memory")


def step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py step",
        description="Time one transformer step (both CFG halves) of a DiT: compile, per-step latency, "
                    "memory, FLOPs, collectives; optionally against diffusers in the same run. "
                    "Subcommands: step (this, the default) and vae-memory (see 'benchmark.py vae-memory --help'). "
                    "Details: docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models: a preset (<family>-tiny: CI smoke tests; <family>-cpu-small: one or two blocks at a "
               "full-size width), a full-size model in configs/ with random weights, or a config folder; --list "
               "names them all with their shapes")
    p.add_argument("--model", default="cpu-small",
                   help="preset (tiny, cpu-small, <family>-tiny, <family>-cpu-small, ...: --list), a full-size model "
                        "in configs/ "
                        "(random weights), or a folder holding transformer/config.json [cpu-small]")
    p.add_argument("--mesh", action="append", default=None,
                   help="mesh spec, repeatable (e.g. --mesh 1 --mesh cfg=2); 1 = one device [1]")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up; 0: no step benchmark [5]")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls, the first timed as 'first_call' [1]")
    p.add_argument("--compare", choices=["diffusers", "none"], default="none",
                   help="also time diffusers' PyTorch transformer (same config, weights, inputs), interleaved")
    p.add_argument("--height", type=int, help="video / image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="video / image width in pixels")
    p.add_argument("--frames", type=int, help="video frames (CogVideoX 4k+1, Mochi 6k+1, Wan 4k+1; video models only)")
    p.add_argument("--layers", type=int, help="override the number of transformer layers (FLUX: N double- and N "
                                              "single-stream blocks)")
    p.add_argument("--batch", type=int, default=1, help="prompts per step (x2 with CFG) [1]")
    p.add_argument("--no-cfg", dest="cfg", action="store_const", const=False, default=None,
                   help="no classifier-free guidance (batch not doubled); FLUX's default")
    p.add_argument("--cfg", dest="cfg", action="store_const", const=True,
                   help="both CFG halves per prompt (batch doubled): the default except for FLUX, where it is "
                        "diffusers' true CFG (a negative prompt, true_cfg_scale > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to pause between timed calls (default 0.2 on CPU, 0 on accelerators)")
    p.add_argument("--matmul-precision", default=None,
                   help="jax_default_matmul_precision (default, high, highest); also picks the fp32 peak")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="persistent XLA compilation cache folder; run twice to see a cached compile")
    p.add_argument("--xla-flags", default=None,
                   help="appended to XLA_FLAGS before jax starts (process-wide), e.g. "
                        "'--xla_cpu_multi_thread_eigen=false'")
    p.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="per-compile XLA option of our step (repeatable), e.g. "
                        "xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=V;KEY=V",
                   help="an extra build of our step timed in the same run (repeatable): per-compile XLA options "
                        "(KEY=VALUE), backend=xla|cudnn|pallas, and the experiments attention=heads_major|per_head_map|"
                        "per_head_map4|query_chunks|jax_dpa and linear=f32acc (patched at trace time; the model "
                        "files are unchanged)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "cudnn", "pallas", "mosaic"],
                   help="the attention op's per-device kernel: auto = cudnn (flash) on GPU in bf16/fp16, xla "
                        "elsewhere [auto]")
    p.add_argument("--host-devices", type=int, default=None,
                   help="simulate N CPU devices (XLA_FLAGS --xla_force_host_platform_device_count)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the diffusers side (default: torch's)")
    p.add_argument("--no-check", action="store_true", help="skip the ours-vs-diffusers output check")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after timing, trace 2 more calls of our first build with jax.profiler into DIR "
                        "(perfetto trace) and print where the device time goes (python -m xdit_jax.trace_summary)")
    p.add_argument("--compile-only", action="store_true",
                   help="lower and compile on abstract shapes only (no weights, no steps): compile time, XLA memory, "
                        "HLO FLOPs and collectives of full-size models on any host (simulate devices with "
                        "--host-devices)")
    p.add_argument("--e2e", type=int, default=0, metavar="STEPS",
                   help="also run the whole pipeline (random weights) twice with STEPS denoising steps and report its "
                        "stages: text encoding, denoising, decoding (every family; small stand-in tokenizers)")
    p.add_argument("--e2e-text-layers", type=int, default=None,
                   help="T5 layers for --e2e (default: the config's; the cpu-small presets use 2)")
    p.add_argument("--json", action="store_true", help="one JSON object a line on stdout (table to stderr)")
    p.add_argument("--list", action="store_true", help="list the models and presets and exit")
    return p


def main_step(argv: list[str]) -> int:
    args = step_parser().parse_args(argv)
    # Process-wide XLA settings must be in the environment before jax is imported.
    flags = os.environ.get("XLA_FLAGS", "")
    if args.host_devices:  # with XLA:CPU's concurrency-optimized scheduler off (see pipefusion.CPU_RING_TEXT_FLAG)
        from xdit_jax.parallel.pipefusion import CPU_RING_TEXT_FLAG  # jax imported, its backends not started

        flags += f" --xla_force_host_platform_device_count={args.host_devices} {CPU_RING_TEXT_FLAG}"
    if args.xla_flags:
        flags += " " + args.xla_flags
    if flags.strip():
        os.environ["XLA_FLAGS"] = flags.strip()
    if args.compare == "diffusers":
        # torch shares the accelerator: do not let jax grab 75% of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    from xdit_jax import bench

    if args.list:
        for name, text in bench.PRESET_HELP.items():
            print(f"{name:18s} {text}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = bench.StepOptions(
        model=args.model, meshes=args.mesh or [None], dtype=args.dtype, steps=args.steps, warmup=args.warmup,
        compare=None if args.compare == "none" else args.compare,
        variants=[bench.parse_variant(v) for v in args.variant], height=args.height, width=args.width,
        num_frames=args.frames, layers=args.layers, batch=args.batch, cfg=args.cfg, seed=args.seed,
        settle=args.settle, matmul_precision=args.matmul_precision, compile_cache=args.compile_cache,
        compiler_options=bench.parse_compiler_options(args.xla_option), attention_backend=args.attention_backend,
        check=not args.no_check, compile_only=args.compile_only,
        profile=args.profile)
    rows = bench.run_step_benchmark(opts) if args.steps > 0 else []
    table = bench.format_table(rows) if rows else ""
    if args.e2e:
        text_layers = args.e2e_text_layers or (2 if args.model.endswith("cpu-small") else None)
        e2e = bench.run_e2e_benchmark(opts, args.e2e, text_layers)
        rows += e2e
        table = (table + "\n" if table else "") + bench.format_e2e(e2e)
    if args.json:
        print(table, file=sys.stderr, flush=True)
        print(bench.json_lines(rows), flush=True)
    else:
        print(table, flush=True)
    return 1 if rows and all("error" in r for r in rows) else 0


def main_vae_memory(argv: list[str]) -> int:
    try:
        from xdit_jax.parallel import vae_bench
    except ImportError as e:
        print(f"benchmark.py vae-memory: xdit_jax.parallel.vae_bench is not available in this checkout ({e}). "
              "It comes with the sharded VAE decode; update the checkout.", file=sys.stderr)
        return 2
    rc = vae_bench.main(argv)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "vae-memory":
        return main_vae_memory(argv[1:])
    if argv and argv[0] == "step":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        print(f"benchmark.py: unknown subcommand {argv[0]!r}; use one of {', '.join(SUBCOMMANDS)} "
              "(step is the default).", file=sys.stderr)
        return 2
    return main_step(argv)


if __name__ == "__main__":
    sys.exit(main())
