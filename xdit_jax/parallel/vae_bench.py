"""``benchmark.py vae-memory``: per-device memory of the sharded VAE decode, from XLA.

For each device count N the decode of one video (``--frames`` x ``--height`` x ``--width``
pixels; random weights) is compiled on a mesh of N simulated CPU devices — abstract parameters
(``jax.ShapeDtypeStruct``), so nothing big is allocated — and XLA's compiled memory analysis
gives the per-device bytes. One JSON line per N::

    {"bench": "vae_decode_memory", "devices": N, "peak_bytes_per_device": ..., ...}

``peak_bytes_per_device`` = argument + output + temp - alias bytes of the per-device SPMD
program: the replicated weights and the (replicated) latents, this device's block of the frames,
and XLA's temp heap at its peak (all live activations, conv caches, halos). ``--run`` also
materialises random weights and times the decode (``decode_s``, after a warm-up call).

Measured (CogVideoX-2b VAE, 49 x 480 x 720, simulated CPU devices, shard_map, height split):

    devices              1        2        4        8
    bf16 peak GiB     11.64     6.62     3.67     2.29   (0.197x of one device at 8)
    fp32 peak GiB     17.04    10.93     5.72     2.99   (0.175x)

(0.23-0.46 GiB of it the replicated weights.) On one H100 (``--platform default --run``): bf16
10.3 GiB, 0.88 s; fp32 20.8 GiB, 1.48 s; bf16 with diffusers' default tiling 3.05 GiB, 1.32 s.

The CPU devices are simulated (``jax_num_cpu_devices``), set here when jax's backends are not
started yet; otherwise start python with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# CogVideoX-2b's vae/config.json (the 5B's decoder is the same).
COGVIDEOX_2B = dict(block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3,
                    norm_num_groups=32, temporal_compression_ratio=4, scaling_factor=1.15258426)


def _ensure_cpu_devices(n: int) -> None:
    import jax

    try:
        from jax._src import xla_bridge

        started = bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # pragma: no cover
        started = True
    if not started:
        try:
            jax.config.update("jax_num_cpu_devices", max(n, 1))
        except Exception:  # pragma: no cover - older jax
            pass
    have = len(jax.devices("cpu"))
    if have < n:
        raise SystemExit(f"vae-memory needs {n} CPU devices but jax has {have}; run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")


def _config(name: str):
    """``tiny``, ``cogvideox-2b``, a model of ``configs/`` (its ``vae/config.json``) or a folder."""
    from pathlib import Path

    from xdit_jax import tiny
    from xdit_jax.models.vae_cogvideox import CogVideoXVAEConfig

    if name == "tiny":
        return CogVideoXVAEConfig.from_dict(tiny.VAE)
    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    for folder in (repo_configs / name, Path(name)):
        for f in (folder / "vae" / "config.json", folder / "config.json"):
            if f.is_file():
                return CogVideoXVAEConfig.from_json(f)
    if name == "cogvideox-2b":
        return CogVideoXVAEConfig(**COGVIDEOX_2B)
    raise SystemExit(f"unknown --model {name!r}: tiny, cogvideox-2b, a name in configs/ or a folder "
                     "holding (vae/)config.json")


def measure(cfg, *, devices: int, frames: int, height: int, width: int, dtype: str = "bfloat16",
            strategy: str = "shard_map", tiling=None, run: bool = False, batch: int = 1,
            platform: str = "cpu") -> dict:
    """Compile (and with ``run`` time) the decode on ``devices`` CPU devices; one result row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from xdit_jax.models import vae_cogvideox as vae
    from xdit_jax.parallel.vae import choose_grid

    dt = jnp.dtype(dtype)
    s, tc = cfg.spatial_compression_ratio, int(cfg.temporal_compression_ratio)
    if height % s or width % s or (frames - 1) % tc:
        raise SystemExit(f"--height/--width must be multiples of {s} and --frames of the form {tc}k+1")
    lat = (batch, cfg.latent_channels, (frames - 1) // tc + 1, height // s, width // s)
    devs = jax.devices(platform) if platform != "default" else jax.devices()
    if len(devs) < devices:
        raise SystemExit(f"{devices} devices asked for, {len(devs)} {platform} devices present")
    mesh = Mesh(np.asarray(devs[:devices]), ("devices",))
    graphdef, abstract = nnx.split(nnx.eval_shape(vae.module_fn(cfg, dt)))
    rep = NamedSharding(mesh, P())

    def fn(state, z):
        model = nnx.merge(graphdef, state)
        return vae.decode(model, z.astype(dt), mesh=mesh if devices > 1 else None, strategy=strategy,
                          tiling=tiling)

    jfn = jax.jit(fn, in_shardings=(rep, rep))
    t0 = time.perf_counter()
    compiled = jfn.lower(abstract, jax.ShapeDtypeStruct(lat, jnp.float32)).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    temp, arg, out = int(m.temp_size_in_bytes), int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias = int(getattr(m, "alias_size_in_bytes", 0) or 0)
    row = {"bench": "vae_decode_memory", "devices": devices, "peak_bytes_per_device": arg + out + temp - alias,
           "temp_bytes": temp, "argument_bytes": arg, "output_bytes": out,
           "grid": list(choose_grid(devices, lat[-2], lat[-1])) if devices > 1 else [1, 1],
           "frames": frames, "height": height, "width": width, "latent_shape": list(lat), "dtype": dt.name,
           "strategy": strategy if devices > 1 else "single", "tiled": tiling is not None,
           "platform": devs[0].platform,
           "compile_s": round(compile_s, 2)}
    if run:
        rng = np.random.default_rng(0)
        state = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), abstract)
        state = jax.device_put(state, rep)
        z = jax.device_put(jnp.asarray(rng.standard_normal(lat), jnp.float32), rep)
        jax.block_until_ready(compiled(state, z))  # warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, z))
        row["decode_s"] = round(time.perf_counter() - t0, 3)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py vae-memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cogvideox-2b",
                    help="cogvideox-2b (random weights), another name in configs/, a folder, or tiny")
    ap.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    ap.add_argument("--frames", type=int, default=None, help="pixel frames (default 49; tiny: 9)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 64)")
    ap.add_argument("--width", type=int, default=None, help="pixels (default 720; tiny: 96)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--strategy", default="shard_map", choices=("shard_map", "gspmd"))
    ap.add_argument("--tiling", action="store_true", help="diffusers' enable_tiling() defaults")
    ap.add_argument("--run", action="store_true", help="also run it once and report decode_s")
    ap.add_argument("--platform", default="cpu", help="cpu (simulated devices, the default) or default "
                    "(jax's default backend, e.g. the GPUs)")
    ap.add_argument("--json", action="store_true", help="one JSON line per device count")
    args = ap.parse_args(argv)

    counts = [int(x) for x in str(args.devices).split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("--devices: give positive counts, e.g. 1,2,4,8")
    if args.platform == "cpu":
        _ensure_cpu_devices(max(counts))
    cfg = _config(args.model)
    tiny_model = args.model == "tiny"
    frames = args.frames or (9 if tiny_model else 49)
    height = args.height or (cfg.sample_height if tiny_model else 480)
    width = args.width or (cfg.sample_width if tiny_model else 720)
    tiling = None
    if args.tiling:
        from xdit_jax.models.vae_cogvideox import default_tiling

        tiling = default_tiling(cfg)
    base = None
    for n in counts:
        row = measure(cfg, devices=n, frames=frames, height=height, width=width, dtype=args.dtype,
                      strategy=args.strategy, tiling=tiling, run=args.run, batch=args.batch,
                      platform=args.platform)
        row = {"model": args.model, **row}
        if base is None and n == 1:
            base = row["peak_bytes_per_device"]
        if base:
            row["ratio_to_1_device"] = round(row["peak_bytes_per_device"] / base, 4)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            extra = f"  decode {row['decode_s']:.2f} s" if "decode_s" in row else ""
            ratio = f"  ({row['ratio_to_1_device']:.3f}x of 1 device)" if "ratio_to_1_device" in row else ""
            print(f"{n} device(s), grid {row['grid']}: peak {_size(row['peak_bytes_per_device'])}/device "
                  f"(temp {_size(row['temp_bytes'])}, arguments {_size(row['argument_bytes'])}){ratio}"
                  f"  compile {row['compile_s']:.1f} s{extra}", flush=True)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    sys.exit(main())
