#!/usr/bin/env python
"""Time diffusers' CogVideoX VAE decode (49x480x720, bf16, random weights) on a CUDA GPU, untiled and tiled:
the reference row of docs/benchmarks.md next to `python -m xdit_jax.parallel.vae_bench --run`."""
import json
import time

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX

cfg = json.load(open("configs/cogvideox-2b/vae/config.json"))
cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
vae = AutoencoderKLCogVideoX(**cfg).to("cuda", torch.bfloat16).eval()
z = torch.randn(1, 16, 13, 60, 90, device="cuda", dtype=torch.bfloat16)
for tiling in (False, True):
    if tiling: vae.enable_tiling()
    else: vae.disable_tiling()
    torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    ts = []
    try:
        for i in range(3):
            t = time.perf_counter()
            with torch.no_grad(): out = vae.decode(z).sample
            torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        print(f"diffusers VAE decode 49x480x720 bf16 tiling={tiling}: median {np.median(ts):.3f}s (runs {[round(x,3) for x in ts]}), peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB, out {tuple(out.shape)}", flush=True)
    except torch.OutOfMemoryError:
        print(f"tiling={tiling}: OOM", flush=True)
    torch.cuda.empty_cache()
