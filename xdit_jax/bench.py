"""Benchmark library behind ``scripts/benchmark.py``: one denoising step of a DiT, measured.

What one benchmark row holds (see ``docs/benchmarks.md`` for the table and the runbook):

- compile time (``lower`` + ``compile`` of the jitted step; a second run with
  ``--compile-cache DIR`` shows the persistent cache at work),
- per-step latency: median and spread of N calls after warm-up, each ``block_until_ready``,
- wall time of each stage of the run (weights, inputs, lower, compile, first call, timed steps),
- peak device memory (``device.memory_stats()`` where the backend has it, else XLA's compiled
  memory analysis: arguments + outputs + temporaries - aliased),
- model FLOPs per step: analytic (:func:`analytic_flops`), counted in the compiled program
  (:func:`xdit_jax.hlo.matmul_flops`, loops by trip count) and XLA's ``cost_analysis()`` (loop bodies
  once); the achieved TFLOP/s and, on a device with a known spec peak (:data:`PEAK_TFLOPS`), its
  fraction,
- bytes moved by collectives per step (``xdit_jax.parallel.comm``, where present),
- with ``compare="diffusers"``: the diffusers PyTorch transformer on the same config, weights and
  inputs, timed interleaved with ours in the same process; the ratio ours / diffusers per step.

The step is built by :func:`build_step` alone, so it can later be swapped for the pipeline's full
step on a mesh. What differs between model families (CogVideoX, PixArt-alpha / Sigma, HunyuanDiT,
Mochi, FLUX.1, SD3 / 3.5, Wan 2.1: inputs, the arguments of ``embed``, analytic FLOPs, the diffusers reference,
a forward over the mesh of its own where the model has one) is in :mod:`xdit_jax.bench_families`.
Weights are passed to the jitted function as arguments (``nnx.split`` / ``nnx.merge``), never
closed over as constants. Variants (:class:`Variant`) build the same step
with other XLA options or, as trace-time experiments that leave the model files alone, another
attention kernel (:data:`ATTENTION_VARIANTS`) or float32-accumulating linears.
:func:`run_e2e_benchmark` times the whole pipeline's stages instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from xdit_jax.bench_families import (  # noqa: F401
    FAMILIES,
    HUNYUAN_TEXT_VALID,
    MOCHI_TEXT_VALID,
    PIXART_TEXT_VALID,
    WAN_TEXT_VALID,
    Family,
    TorchReference,
    family_of_config,
    family_of_model,
    flux_analytic_flops,
    hunyuandit_analytic_flops,
    mochi_analytic_flops,
    pixart_analytic_flops,
    sd3_analytic_flops,
    wan_analytic_flops,
    wan_vae_scales,
)
from xdit_jax.bench_families import cogvideox_analytic_flops as analytic_flops  # noqa: F401
from xdit_jax.bench_variants import (  # noqa: F401
    ATTENTION_VARIANTS,
    LINEAR_VARIANTS,
    Variant,
    attention_override,
    linear_override,
    parse_compiler_options,
    parse_variant,
    scan_override,
)
from xdit_jax.hlo import matmul_flops as hlo_matmul_flops
from xdit_jax.hlo import memory_analysis_bytes

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FULL_MODELS = ("cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v")
PIXART_MODELS = ("pixart-alpha-1024", "pixart-sigma-1024")
COGVIEW3_MODELS = ("cogview3-plus-3b",)
HUNYUANDIT_MODELS = ("hunyuandit-v1.2",)
MOCHI_MODELS = ("mochi-1-preview",)
FLUX_MODELS = ("flux.1-dev", "flux.1-schnell")
SD3_MODELS = ("sd3-medium", "sd3.5-large")
WAN_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.2-i2v-a14b",
              "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "wan2.1-flf2v-14b-720p")
LATTE_MODELS = ("latte-1",)
HUNYUAN_VIDEO_MODELS = ("hunyuanvideo",)
HUNYUAN_VIDEO15_MODELS = ("hunyuanvideo-1.5-480p",)
QWEN_IMAGE_MODELS = ("qwen-image",)
ZIMAGE_MODELS = ("z-image-turbo",)
SANA_MODELS = ("sana-1600m-1024px",)
CHROMA_MODELS = ("chroma1-hd",)
LUMINA2_MODELS = ("lumina-image-2.0",)
FLUX2_MODELS = ("flux.2-klein-4b",)
LTX_MODELS = ("ltx-video-0.9.0", "ltx-video-0.9.1")
HUNYUAN_IMAGE_MODELS = ("hunyuanimage-2.1",)
KANDINSKY5_MODELS = ("kandinsky5-t2v-lite-5s",)
SANA_VIDEO_MODELS = ("sana-video-2b-480p",)
WAN_VACE_MODELS = ("wan2.1-vace-14b", "wan2.1-vace-1.3b")
HIDREAM_MODELS = ("hidream-i1-full",)
COSMOS_MODELS = ("cosmos-predict2-2b-text2image", "cosmos-predict2-2b-video2world")
LONGCAT_IMAGE_MODELS = ("longcat-image",)
IMAGE_FAMILIES = ("pixart", "hunyuandit", "flux", "sd3", "qwenimage", "zimage", "sana", "chroma", "cogview4",
                  "lumina2", "flux2", "cogview3", "hunyuanimage", "hidream",
                  "longcat_image")  # text-to-image: no frames

# --------------------------------------------------------------------------------------------
# Device peaks and dtype selection (pure functions: unit-tested without a GPU)
# --------------------------------------------------------------------------------------------

# Dense (no sparsity) spec-sheet peaks in TFLOP/s, matched against ``device.device_kind`` in
# order (first substring match wins, so the specific names come first). "tf32" is what an
# fp32 matmul gets on these GPUs at JAX's default precision; "fp32" is the CUDA-core peak
# (precision "highest").
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    ("H200 NVL", "NVIDIA H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", "NVIDIA H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", "NVIDIA H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", "NVIDIA H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", "NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", "NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", "NVIDIA L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("TPU v6", "TPU v6e", {"bf16": 918.0}),
    ("TPU v5p", "TPU v5p", {"bf16": 459.0}),
    ("TPU v5 lite", "TPU v5e", {"bf16": 197.0}),
    ("TPU v5e", "TPU v5e", {"bf16": 197.0}),
    ("TPU v4", "TPU v4", {"bf16": 275.0}),
]

ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "f16": "float16"}


def select_dtype(requested: str | None, backend: str) -> str:
    """The compute dtype name: ``requested`` if given, else bfloat16 on an accelerator, float32 on CPU."""
    if requested not in (None, "", "auto"):
        if requested not in DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {requested!r}; use auto, float32, bfloat16 or float16.")
        return DTYPE_NAMES[requested]
    return "bfloat16" if backend.lower() in ACCELERATOR_BACKENDS else "float32"


def select_attention_backend(requested: str | None, backend: str, dtype: str) -> str:
    """The attention op's kernel for a platform and dtype name: the library's own rule
    (:func:`xdit_jax.parallel.attention.resolve_backend`; cuDNN on a GPU in bf16/fp16)."""
    from xdit_jax.parallel.attention import resolve_backend

    return resolve_backend(requested, jnp_dtype(DTYPE_NAMES.get(dtype, dtype)), platform=backend)


def peak_tflops(device_kind: str, dtype: str, matmul_precision: str | None = None) -> tuple[float | None, str]:
    """(dense spec peak TFLOP/s, what it is) for a device kind and compute dtype; (None, why) if unknown."""
    dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype == "float32":
        key = "fp32" if (matmul_precision or "").lower() in ("highest", "float32") else "tf32"
    else:
        key = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    kind = device_kind or ""
    for pattern, name, peaks in PEAK_TFLOPS:
        if pattern.lower() in kind.lower():
            if key in peaks:
                return peaks[key], f"{name} {key} dense spec"
            return None, f"no {key} peak listed for {name}"
    return None, f"no spec peak known for device kind {kind!r}"


def measure_host_sgemm_tflops(n: int = 2048, repeats: int = 5) -> float:
    """The best float32 GEMM rate of this host, measured now: the host BLAS under numpy (OpenBLAS,
    as fast as torch's MKL here), an (n x n) @ (n x n) product, best of ``repeats``. The CPU has
    no spec peak in :data:`PEAK_TFLOPS` and its clock drifts, so its roofline is measured."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b  # threads up, pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e12


def fraction_of_peak(flops_per_step: float | None, step_seconds: float | None, peak: float | None,
                     n_devices: int = 1) -> float | None:
    """Achieved / peak, the peak summed over the devices the step runs on."""
    if not flops_per_step or not step_seconds or not peak:
        return None
    return flops_per_step / step_seconds / 1e12 / (peak * n_devices)


def default_settle_seconds(backend: str) -> float:
    """Pause between timed calls. On CPU the idle worker threads of one runtime (XLA's Eigen pool,
    torch's OpenMP team) spin for a while after a call and would steal the cores from the next."""
    return 0.0 if backend.lower() in ACCELERATOR_BACKENDS else 0.2


# --------------------------------------------------------------------------------------------
# Workloads: presets and full-size configs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Workload:
    """What one step computes: a transformer config and the video/image and text shapes it runs on.
    ``family`` (an entry of :data:`FAMILIES`) says what the shapes mean (``xdit_jax.bench_families``)."""

    name: str
    transformer: dict  # diffusers config.json of the transformer
    height: int
    width: int
    num_frames: int
    batch: int = 1  # prompts; the step runs 2x this with CFG
    cfg: bool = True  # load_workload: the family's default (FLUX: one sample per prompt) unless asked
    vae_scale_spatial: int = 8
    vae_scale_temporal: int = 4
    defaults: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    family: str = "cogvideox"
    # PixArt, Mochi, FLUX, Wan: text tokens; SD3: its T5 tokens (after the 77 CLIP ones); default: defaults.json's
    # max_sequence_length
    text_tokens: int | None = None
    # real tokens in the prompt's text mask(s): PixArt's caption (PIXART_TEXT_VALID); HunyuanDiT's BERT
    # and mT5 masks both (HUNYUAN_TEXT_VALID); Mochi's T5 caption (MOCHI_TEXT_VALID); Wan's UMT5 caption, zero
    # after these rows (WAN_TEXT_VALID)
    text_valid: int | None = None
    # the configs folder of the model's other components (text encoders, VAE, scheduler: --e2e builds the
    # pipeline from it); None: xdit_jax.tiny's
    folder: str | None = None

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def step_batch(self) -> int:
        return self.batch * (2 if self.cfg else 1)

    @property
    def text_len(self) -> int:
        return self.fam.text_len(self)

    def latent_shape(self) -> tuple[int, ...]:
        """diffusers' layout: CogVideoX (B, F, C, h, w) (1.5 pads latent frames to a multiple of
        patch_size_t), PixArt, HunyuanDiT and SD3 (B, C, h, w), Mochi and Wan (B, C, F, h, w), FLUX packed (B, S, C)."""
        return self.fam.latent_shape(self)

    def tokens(self) -> tuple[int, int]:
        """(video or image tokens, text tokens) per sample."""
        return self.fam.tokens(self)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def load_model_dir(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(transformer config, defaults) of a model config folder (``configs/<name>`` or a diffusers folder)."""
    folder = Path(folder)
    tpath = folder / "transformer" / "config.json"
    if not tpath.exists() and (folder / "config.json").exists():
        tpath = folder / "config.json"
    if not tpath.exists():
        raise FileNotFoundError(f"{folder}: no transformer/config.json (nor config.json) in it.")
    defaults = read_json(folder / "defaults.json") if (folder / "defaults.json").exists() else {}
    return read_json(tpath), defaults


def mochi_vae_scales(folder: Path) -> tuple[int, int]:
    """(spatial, temporal) compression of a Mochi folder's VAE: the products of its ``spatial_expansions``
    and ``temporal_expansions`` (Mochi 1: 8 and 6); (8, 6) without a vae/config.json."""
    vae = folder / "vae" / "config.json"
    if not vae.exists():
        return 8, 6
    v = read_json(vae)
    return math.prod(v.get("spatial_expansions", [2, 2, 2])), math.prod(v.get("temporal_expansions", [1, 2, 3]))


def wan_folder_vae_scales(folder: Path) -> tuple[int, int]:
    """(spatial, temporal) compression of a Wan folder's VAE (:func:`wan_vae_scales`: Wan 2.1 8 and 4, Wan 2.2's
    VAE 16 and 4); (8, 4) without a vae/config.json."""
    vae = folder / "vae" / "config.json"
    return wan_vae_scales(read_json(vae) if vae.exists() else None)


def _tiny_workload() -> Workload:
    from xdit_jax import tiny

    t = dict(tiny.TRANSFORMER)
    vae = tiny.VAE
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return Workload("tiny", t, height=t["sample_height"] * scale, width=t["sample_width"] * scale,
                    num_frames=t["sample_frames"], vae_scale_spatial=scale,
                    vae_scale_temporal=int(vae["temporal_compression_ratio"]), source="xdit_jax.tiny",
                    defaults=dict(num_inference_steps=4, guidance_scale=6.0))


def _consisid_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's ConsisID (3 heads x 16, 4 blocks, face cross-attentions after blocks 0 and 2; the extractor's 2
    # scales of 577 face-ViT states) at its learned table's 9 x 64 x 96: 72 video + 16 text tokens
    t = dict(tiny.CONSISID_TRANSFORMER)
    scale = 2 ** (len(tiny.VAE["block_out_channels"]) - 1)
    return Workload("consisid-tiny", t, height=t["sample_height"] * scale, width=t["sample_width"] * scale,
                    num_frames=t["sample_frames"], vae_scale_spatial=scale, family="consisid",
                    text_tokens=int(t["max_text_seq_length"]),  # (its learned table's: --e2e passes it on)
                    source="xdit_jax.tiny's ConsisID, 3 heads x 16, 4 layers",
                    defaults=dict(num_inference_steps=4, guidance_scale=6.0))


def _cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "cogvideox-2b")
    t = dict(t, num_layers=2)
    return Workload("cpu-small", t, height=128, width=128, num_frames=49, folder=str(CONFIG_DIR / "cogvideox-2b"),
                    source="configs/cogvideox-2b, 2 layers",
                    defaults=defaults)


def _pixart_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's PixArt made PixArt-alpha shaped (micro-conditions need a width divisible by 3):
    # every input path of the family (caption mask, resolution, aspect ratio, learned sigma) runs.
    t = dict(tiny.PIXART_TRANSFORMER, num_attention_heads=3, attention_head_dim=8, cross_attention_dim=24,
             use_additional_conditions=True)
    size = t["sample_size"] * 8
    return Workload("pixart-tiny", t, height=size, width=size, num_frames=1, family="pixart",
                    text_tokens=tiny.PIXART_MAX_SEQUENCE_LENGTH, text_valid=6,
                    source="xdit_jax.tiny's PixArt, 3 heads x 8, with micro-conditions",
                    defaults=dict(num_inference_steps=4, guidance_scale=4.5))


def _cogview3_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's CogView3-Plus (2 heads x 16, 2 blocks) at 48 x 80: a 3 x 5 patch grid (the sequence meshes pad
    # the 15 image + 16 T5 tokens), both CFG halves
    t = dict(tiny.COGVIEW3_TRANSFORMER)
    return Workload("cogview3-tiny", t, height=48, width=80, num_frames=1, family="cogview3",
                    text_tokens=tiny.COGVIEW3_MAX_SEQUENCE_LENGTH,
                    source="xdit_jax.tiny's CogView3-Plus, 2 heads x 16, 2 layers",
                    defaults=dict(num_inference_steps=2, guidance_scale=5.0))


def _pixart_cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "pixart-sigma-1024")
    t = dict(t, num_layers=2)
    return Workload("pixart-cpu-small", t, height=512, width=512, num_frames=1, family="pixart",
                    text_tokens=int(defaults.get("max_sequence_length", 300)), text_valid=PIXART_TEXT_VALID,
                    folder=str(CONFIG_DIR / "pixart-sigma-1024"), source="configs/pixart-sigma-1024, 2 layers",
                    defaults=defaults)


def _hunyuandit_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's HunyuanDiT (2 heads x 8, 6 layers: 2 push a skip, 2 in the middle, 2 pop one,
    # the releases' 77 + 256 text tokens) made v1.0/1.1 shaped: every input path of the family (both
    # text masks, image-meta sizes, style, learned sigma) runs.
    t = dict(tiny.HUNYUAN_TRANSFORMER, use_style_cond_and_image_meta_size=True)
    size = t["sample_size"] * 8
    return Workload("hunyuandit-tiny", t, height=size, width=size, num_frames=1, family="hunyuandit",
                    text_valid=6, source="xdit_jax.tiny's HunyuanDiT, 2 heads x 8, 6 layers, with image meta + style",
                    defaults=dict(num_inference_steps=4, guidance_scale=5.0))


def _hunyuandit_cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "hunyuandit-v1.2")
    t = dict(t, num_layers=4)
    return Workload("hunyuandit-cpu-small", t, height=512, width=512, num_frames=1, family="hunyuandit",
                    folder=str(CONFIG_DIR / "hunyuandit-v1.2"), source="configs/hunyuandit-v1.2, 4 layers",
                    defaults=defaults)


def _mochi_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Mochi (2 heads x 16, a 16-wide caption stream, 16 T5 tokens) with 3 blocks, so that the
    # stacked blocks' scan runs twice before the last block; 7 frames of 48 x 64 with the tiny VAE's 6x / 8x.
    t = dict(tiny.MOCHI_TRANSFORMER, num_layers=3)
    spatial = math.prod(tiny.MOCHI_VAE["spatial_expansions"])
    temporal = math.prod(tiny.MOCHI_VAE["temporal_expansions"])
    return Workload("mochi-tiny", t, height=48, width=64, num_frames=7, vae_scale_spatial=spatial,
                    vae_scale_temporal=temporal, family="mochi", text_valid=6,
                    source="xdit_jax.tiny's Mochi, 2 heads x 16, caption 16 wide, 3 layers",
                    defaults={"num_inference_steps": 4, "guidance_scale": 4.5})


def _mochi_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "mochi-1-preview"
    t, defaults = load_model_dir(folder)
    t = dict(t, num_layers=2)
    spatial, temporal = mochi_vae_scales(folder)
    return Workload("mochi-cpu-small", t, height=128, width=128, num_frames=43, vae_scale_spatial=spatial,
                    vae_scale_temporal=temporal, family="mochi", text_valid=MOCHI_TEXT_VALID,
                    folder=str(folder), source="configs/mochi-1-preview, 2 layers", defaults=defaults)


def _flux_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's FLUX (FLUX.1-dev shaped: 2 heads x 16, 2 double- + 2 single-stream blocks, embedded
    # guidance, RoPE axes 4 + 6 + 6) at 48 x 80: a 3 x 5 grid of packed tokens, so that the sequence meshes pad.
    t = dict(tiny.FLUX_TRANSFORMER)
    scale = 2 ** (len(tiny.FLUX_VAE["block_out_channels"]) - 1)
    return Workload("flux-tiny", t, height=48, width=80, num_frames=1, vae_scale_spatial=scale, family="flux",
                    text_tokens=16, source="xdit_jax.tiny's FLUX, 2 heads x 16, 2 + 2 blocks",
                    defaults={"num_inference_steps": 4, "guidance_scale": 3.5, "max_sequence_length": 16})


def _flux_cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "flux.1-dev")
    t = dict(t, num_layers=1, num_single_layers=1)
    return Workload("flux-cpu-small", t, height=256, width=256, num_frames=1, family="flux", text_tokens=256,
                    folder=str(CONFIG_DIR / "flux.1-dev"), defaults=defaults,
                    source="configs/flux.1-dev, 1 double- + 1 single-stream block")


def _chroma_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Chroma (2 heads x 16, 2 double- + 2 single-stream blocks, a 2-layer approximator 32 wide) at
    # 48 x 80: a 3 x 5 grid of packed tokens (the sequence meshes pad); 16 T5 tokens, 6 kept (+ one padding token)
    t = dict(tiny.CHROMA_TRANSFORMER)
    scale = 2 ** (len(tiny.FLUX_VAE["block_out_channels"]) - 1)
    return Workload("chroma-tiny", t, height=48, width=80, num_frames=1, vae_scale_spatial=scale, family="chroma",
                    text_tokens=16, text_valid=6, source="xdit_jax.tiny's Chroma, 2 heads x 16, 2 + 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 5.0, "max_sequence_length": 16})


def _chroma_cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "chroma1-hd")
    # 2 single-stream blocks: with one, XLA drops the last block's unused text MLP (its text output is discarded),
    # which a scan over several does not (so the compiled FLOPs == the analytic count, as at full size)
    t = dict(t, num_layers=1, num_single_layers=2)
    return Workload("chroma-cpu-small", t, height=256, width=256, num_frames=1, family="chroma", text_tokens=256,
                    folder=str(CONFIG_DIR / "chroma1-hd"), defaults=defaults,
                    source="configs/chroma1-hd, 1 double- + 2 single-stream blocks")


def _sd3_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's SD3 (2 heads x 16) made SD3.5 Medium shaped: 5 blocks (the first two with the dual attention
    # attn2, so two stacked runs of 2, then the last: PipeFusion runs on 2 stages), q/k RMS norms; 48 x 80: a 3 x 5
    # grid of image tokens, so that the sequence meshes pad; 77 CLIP + 16 T5 tokens.
    t = dict(tiny.SD3_TRANSFORMER, num_layers=5, qk_norm="rms_norm", dual_attention_layers=[0, 1])
    scale = 2 ** (len(tiny.SD3_VAE["block_out_channels"]) - 1)
    return Workload("sd3-tiny", t, height=48, width=80, num_frames=1, vae_scale_spatial=scale, family="sd3",
                    text_tokens=16, source="xdit_jax.tiny's SD3, 2 heads x 16, 5 layers (2 dual), rms q/k norms",
                    defaults={"num_inference_steps": 4, "guidance_scale": 7.0, "max_sequence_length": 16})


def _sd3_cpu_small_workload() -> Workload:
    t, defaults = load_model_dir(CONFIG_DIR / "sd3-medium")
    t = dict(t, num_layers=2)
    return Workload("sd3-cpu-small", t, height=512, width=512, num_frames=1, family="sd3", text_tokens=256,
                    folder=str(CONFIG_DIR / "sd3-medium"), source="configs/sd3-medium, 2 layers",
                    defaults=defaults)


def _wan_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Wan 2.1 (2 heads x 12, 2 blocks, UMT5 32 wide) at its 9 frames of 32 x 48: 3 x 4 x 6 latents,
    # 3 x 2 x 3 = 18 video tokens (so that the 4-way sequence meshes pad); 16 UMT5 tokens, 6 of the prompt's real.
    spatial, temporal = wan_vae_scales(tiny.WAN_VAE)
    return Workload("wan-tiny", dict(tiny.WAN_TRANSFORMER), height=32, width=48, num_frames=9,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="wan", text_tokens=16,
                    text_valid=6, source="xdit_jax.tiny's Wan 2.1, 2 heads x 12, 2 layers",
                    defaults={"num_inference_steps": 4, "guidance_scale": 5.0, "max_sequence_length": 16})


def _wan_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "wan2.1-t2v-1.3b"
    t, defaults = load_model_dir(folder)
    t = dict(t, num_layers=2)
    spatial, temporal = wan_folder_vae_scales(folder)
    return Workload("wan-cpu-small", t, height=128, width=128, num_frames=17, vae_scale_spatial=spatial,
                    vae_scale_temporal=temporal, family="wan", text_valid=WAN_TEXT_VALID, folder=str(folder),
                    source="configs/wan2.1-t2v-1.3b, 2 layers", defaults=defaults)


def _skyreels_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's SkyReels-V2 (Wan 2.1's tiny blocks + the fps embedding) stepping as the diffusion-forcing
    # pipeline: 13 frames of 32 x 48 -> 4 x 4 x 6 latents, 4 x 2 x 3 = 24 video tokens, a timestep per latent frame,
    # causal blocks of 2 frames (the block mask over the sequence meshes); 16 UMT5 tokens, 6 real.
    spatial, temporal = wan_vae_scales(tiny.WAN_VAE)
    t = dict(tiny.SKYREELS_V2_TRANSFORMER, inject_sample_info=True, num_frame_per_block=2)
    return Workload("skyreels-tiny", t, height=32, width=48, num_frames=13, vae_scale_spatial=spatial,
                    vae_scale_temporal=temporal, family="skyreels_v2", text_tokens=16, text_valid=6,
                    source="xdit_jax.tiny's SkyReels-V2, 2 heads x 12, 2 layers, diffusion forcing",
                    defaults={"num_inference_steps": 4, "guidance_scale": 6.0, "max_sequence_length": 16, "fps": 24,
                              "causal_block_size": 2})


def ltx_vae_scales(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of an LTX-Video VAE config (32, 8 for the releases)."""
    from xdit_jax.models.vae_ltx import LTXVAEConfig

    cfg = LTXVAEConfig.from_dict(vae)
    return cfg.spatial_ratio, cfg.temporal_ratio


def _ltx_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's LTX-Video (2 heads x 8, 2 blocks, T5 32 wide) at 17 frames of 64 x 96: 3 x 2 x 3 = 18 video
    # tokens (so that the 4-way sequence meshes pad); 16 T5 tokens, 6 of the prompt's real.
    spatial, temporal = ltx_vae_scales(tiny.LTX_VAE)
    return Workload("ltx-tiny", dict(tiny.LTX_TRANSFORMER), height=64, width=96, num_frames=17,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="ltx", text_tokens=16,
                    text_valid=6, source="xdit_jax.tiny's LTX-Video, 2 heads x 8, 2 layers",
                    defaults={"num_inference_steps": 4, "guidance_scale": 3.0, "max_sequence_length": 16})


def _ltx_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "ltx-video-0.9.0"
    t, defaults = load_model_dir(folder)
    spatial, temporal = ltx_vae_scales(read_json(folder / "vae" / "config.json"))
    return Workload("ltx-cpu-small", dict(t, num_layers=2), height=256, width=256, num_frames=41,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="ltx", folder=str(folder),
                    source="configs/ltx-video-0.9.0, 2 layers", defaults=defaults)


def _latte_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Latte (2 heads x 8, 2 layer pairs, caption 32 wide) at 3 frames of 32 x 48: 4 x 6 latents,
    # 2 x 3 = 6 patch positions a frame (so that the 4-way sequence meshes pad); 16 T5 tokens.
    scale = 2 ** (len(tiny.LATTE_VAE["block_out_channels"]) - 1)
    return Workload("latte-tiny", dict(tiny.LATTE_TRANSFORMER), height=32, width=48, num_frames=3,
                    vae_scale_spatial=scale, family="latte", text_tokens=16,
                    source="xdit_jax.tiny's Latte, 2 heads x 8, 2 layer pairs",
                    defaults={"num_inference_steps": 4, "guidance_scale": 7.5})


def _latte_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "latte-1"
    t, defaults = load_model_dir(folder)
    return Workload("latte-cpu-small", dict(t, num_layers=2), height=128, width=128, num_frames=16, family="latte",
                    folder=str(folder), source="configs/latte-1, 2 layer pairs", defaults=defaults)


def _hunyuan_video_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's HunyuanVideo (2 heads x 8, 2 double- + 2 single-stream blocks, Llama states 32 wide) at 5 frames
    # of 32 x 48: 2 x 4 x 6 latents, 2 x 2 x 3 = 12 video tokens (so that the 8-way sequence meshes pad); 16 Llama
    # tokens (6 real).
    return Workload("hunyuanvideo-tiny", dict(tiny.HUNYUAN_VIDEO_TRANSFORMER), height=32, width=48, num_frames=5,
                    family="hunyuanvideo", text_tokens=16, text_valid=6, cfg=False,
                    source="xdit_jax.tiny's HunyuanVideo, 2 heads x 8, 2 + 2 blocks",
                    defaults={"num_inference_steps": 4, "guidance_scale": 6.0, "max_sequence_length": 16})


def _hunyuan_video_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "hunyuanvideo"
    t, defaults = load_model_dir(folder)
    return Workload("hunyuanvideo-cpu-small", dict(t, num_layers=1, num_single_layers=1), height=128, width=128,
                    num_frames=17, family="hunyuanvideo", cfg=False, folder=str(folder),
                    source="configs/hunyuanvideo, 1 double- + 1 single-stream block", defaults=defaults)


def _hunyuan_video15_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's HunyuanVideo-1.5 (2 heads x 8, 2 blocks, Qwen states 32 wide, ByT5 16 wide) at 5 frames of
    # 32 x 48: 2 x 4 x 6 latents (patch 1) = 48 video tokens; 16 Qwen tokens (6 real) + 256 ByT5 (16 real); CFG
    return Workload("hunyuanvideo15-tiny", dict(tiny.HUNYUAN_VIDEO15_TRANSFORMER), height=32, width=48, num_frames=5,
                    family="hunyuan_video15", text_tokens=16, text_valid=6,
                    source="xdit_jax.tiny's HunyuanVideo-1.5, 2 heads x 8, 2 blocks",
                    defaults={"num_inference_steps": 4, "guidance_scale": 6.0, "max_sequence_length": 16})


def _hunyuan_video15_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "hunyuanvideo-1.5-480p"
    t, defaults = load_model_dir(folder)
    return Workload("hunyuanvideo15-cpu-small", dict(t, num_layers=1), height=128, width=128, num_frames=17,
                    vae_scale_spatial=16, family="hunyuan_video15", text_tokens=64, folder=str(folder),
                    source="configs/hunyuanvideo-1.5-480p, 1 block", defaults=defaults)


def _qwen_image_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Qwen-Image (2 heads x 16, 2 blocks, Qwen2.5-VL states 32 wide, RoPE axes 4 + 6 + 6) at 48 x 80:
    # a 3 x 5 grid of packed tokens, so that the sequence meshes pad; 16 text tokens; true CFG (its default)
    return Workload("qwenimage-tiny", dict(tiny.QWEN_IMAGE_TRANSFORMER), height=48, width=80, num_frames=1,
                    family="qwenimage", text_tokens=16, source="xdit_jax.tiny's Qwen-Image, 2 heads x 16, 2 blocks",
                    defaults={"num_inference_steps": 4, "true_cfg_scale": 4.0, "max_sequence_length": 16})


def _qwen_image_edit_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # qwenimage-tiny stepping as Qwen-Image-Edit-2511 (QwenImageEditPlusPipeline, zero_cond_t): one condition image
    # of the output's aspect at a VAE image area of 48 x 80 pixels (diffusers' rounding of each side to 32: 64 x 64, a
    # 4 x 4 packed grid after the noisy 3 x 5: 31 image tokens), its timestep-0 modulation; 16 text tokens
    return Workload("qwenimage-edit-tiny", dict(tiny.QWEN_IMAGE_TRANSFORMER, zero_cond_t=True), height=48, width=80,
                    num_frames=1, family="qwenimage", text_tokens=16,
                    source="xdit_jax.tiny's Qwen-Image as Edit-2511, 2 heads x 16, 2 blocks",
                    defaults={"num_inference_steps": 4, "true_cfg_scale": 4.0, "tiny_family": "qwenimage-edit-plus",
                              "vae_image_area": 48 * 80})


def _qwen_image_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "qwen-image"
    t, defaults = load_model_dir(folder)
    return Workload("qwenimage-cpu-small", dict(t, num_layers=1), height=256, width=256, num_frames=1,
                    family="qwenimage", text_tokens=64, folder=str(folder), defaults=defaults,
                    source="configs/qwen-image, 1 block")


def _zimage_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Z-Image (2 heads x 16, 2 main + 1 + 1 refiner layers, caption 32 wide) at 64 x 96: a 4 x 6 grid
    # of patches, 24 image tokens padded to 32 by the model; a 32-token caption array, 20 kept tokens (the rest
    # masked as keys).
    return Workload("zimage-tiny", dict(tiny.ZIMAGE_TRANSFORMER), height=64, width=96, num_frames=1, family="zimage",
                    text_tokens=32, text_valid=20, cfg=False, source="xdit_jax.tiny's Z-Image, 2 heads x 16, 2 layers",
                    defaults={"num_inference_steps": 2, "guidance_scale": 0.0, "max_sequence_length": 64})


def _zimage_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "z-image-turbo"
    t, defaults = load_model_dir(folder)
    return Workload("zimage-cpu-small", dict(t, n_layers=2, n_refiner_layers=1), height=256, width=256,
                    num_frames=1, family="zimage", text_tokens=64, text_valid=50, cfg=False, folder=str(folder),
                    source="configs/z-image-turbo, 2 layers + 1 + 1 refiner layers", defaults=defaults)


def _cogview4_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's CogView4 (2 heads x 16, 2 blocks, GLM states 32 wide) at 64 x 96: a 4 x 6 grid of patches, 24
    # image tokens; 32 text tokens; CFG (the pipeline's default guidance 5): both halves per prompt.
    return Workload("cogview4-tiny", dict(tiny.COGVIEW4_TRANSFORMER), height=64, width=96, num_frames=1,
                    family="cogview4", text_tokens=32, source="xdit_jax.tiny's CogView4, 2 heads x 16, 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 5.0})


def _lumina2_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Lumina 2 (2 query heads x 16 over 1 K/V head, 2 main + 1 + 1 refiner layers, Gemma states 24
    # wide) at 64 x 96: a 4 x 6 grid of patches, 24 image tokens; a 32-token caption array, 20 kept tokens (the rest
    # masked as keys); CFG (the pipeline's default guidance 4): both halves per prompt.
    return Workload("lumina2-tiny", dict(tiny.LUMINA2_TRANSFORMER), height=64, width=96, num_frames=1,
                    family="lumina2", text_tokens=32, text_valid=20,
                    source="xdit_jax.tiny's Lumina 2, 2 heads x 16 over 1 K/V head, 2 layers",
                    defaults={"num_inference_steps": 2, "guidance_scale": 4.0, "max_sequence_length": 128})


def _lumina2_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "lumina-image-2.0"
    t, defaults = load_model_dir(folder)
    return Workload("lumina2-cpu-small", dict(t, num_layers=2, num_refiner_layers=1), height=256, width=256,
                    num_frames=1, family="lumina2", text_tokens=128, text_valid=100, folder=str(folder),
                    source="configs/lumina-image-2.0, 2 layers + 1 + 1 refiner layers", defaults=defaults)


def _flux2_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's FLUX.2 klein (2 heads x 16, 2 double- + 2 single-stream blocks, text 72 wide) at 48 x 80: a
    # 3 x 5 grid of packed tokens (the sequence meshes pad), 16 text tokens, one sample per prompt (klein distilled).
    t = dict(tiny.FLUX2_TRANSFORMER)
    return Workload("flux2-tiny", t, height=48, width=80, num_frames=1, family="flux2", text_tokens=16, cfg=False,
                    source="xdit_jax.tiny's FLUX.2 klein, 2 heads x 16, 2 + 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 1.0, "max_sequence_length": 16})


def _flux2_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "flux.2-klein-4b"
    t, defaults = load_model_dir(folder)
    return Workload("flux2-cpu-small", dict(t, num_layers=1, num_single_layers=1), height=256, width=256,
                    num_frames=1, family="flux2", text_tokens=128, cfg=False, folder=str(folder), defaults=defaults,
                    source="configs/flux.2-klein-4b, 1 double- + 1 single-stream block")


def _sana_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's SANA (2 linear heads x 8, 2 blocks, Gemma states 24 wide; its DC-AE compresses 4x) at 32 x 48:
    # 8 x 12 = 96 image tokens (the 8-way sequence meshes pad: 96 = 8 x 12, ulysses=3 / 5 do), 16 Gemma tokens (6 real).
    scale = 2 ** (len(tiny.SANA_VAE["decoder_block_out_channels"]) - 1)
    return Workload("sana-tiny", dict(tiny.SANA_TRANSFORMER), height=32, width=48, num_frames=1, vae_scale_spatial=scale,
                    family="sana", text_tokens=tiny.SANA_MAX_SEQUENCE_LENGTH, text_valid=6,
                    source="xdit_jax.tiny's SANA, 2 heads x 8, 2 blocks",
                    defaults=dict(num_inference_steps=4, guidance_scale=4.5))


def _sana_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "sana-1600m-1024px"
    t, defaults = load_model_dir(folder)
    return Workload("sana-cpu-small", dict(t, num_layers=2), height=512, width=512, num_frames=1,
                    vae_scale_spatial=32, family="sana", text_tokens=int(defaults.get("max_sequence_length", 300)),
                    folder=str(folder), source="configs/sana-1600m-1024px, 2 layers", defaults=defaults)


def _sana_sprint_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Sana Sprint (the SANA tiny blocks with q/k RMS norms across heads and the guidance embedding)
    # at sana-tiny's 32 x 48: 96 image + 16 Gemma tokens (6 real), one sample per prompt (the guidance embedded)
    w = _sana_tiny_workload()
    return dataclasses.replace(w, name="sana-sprint-tiny", transformer=dict(tiny.SANA_SPRINT_TRANSFORMER),
                               cfg=False, source="xdit_jax.tiny's Sana Sprint, 2 heads x 8, 2 blocks",
                               defaults=dict(num_inference_steps=2, guidance_scale=4.5, tiny_family="sana-sprint"))


def _hunyuan_image_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's HunyuanImage-2.1 (2 heads x 8, 2 double- + 2 single-stream blocks, 1 refiner block, Qwen states
    # 32 wide, ByT5 16 wide; its VAE 8x) at 32 x 48: a 4 x 6 latent grid (patch 1), 24 image tokens (the 8-way sequence
    # meshes pad); 16 Qwen tokens (6 real) + 128 ByT5 (16 real in the prompt's half); the guider's CFG
    return Workload("hunyuanimage-tiny", dict(tiny.HUNYUANIMAGE_TRANSFORMER), height=32, width=48, num_frames=1,
                    vae_scale_spatial=int(tiny.HUNYUANIMAGE_VAE["spatial_compression_ratio"]), family="hunyuanimage",
                    text_tokens=16, text_valid=6, source="xdit_jax.tiny's HunyuanImage-2.1, 2 heads x 8, 2 + 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 3.5, "max_sequence_length": 16})


def _hunyuan_image_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "hunyuanimage-2.1"
    t, defaults = load_model_dir(folder)
    # 16 of the release's 28 heads (2048 wide: the fp32 weights of both sides fit this shared host), 1 double- + 1
    # single-stream block, 1 refiner block; 512 x 512 through the 32x VAE: 16 x 16 = 256 image + 64 Qwen + 128 ByT5
    return Workload("hunyuanimage-cpu-small", dict(t, num_attention_heads=16, num_layers=1, num_single_layers=1,
                                                   num_refiner_layers=1), height=512, width=512, num_frames=1,
                    vae_scale_spatial=32, family="hunyuanimage", text_tokens=64, folder=str(folder), defaults=defaults,
                    source="configs/hunyuanimage-2.1 at 16 heads, 1 + 1 blocks, 1 refiner block")


def _kandinsky5_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "kandinsky5-t2v-lite-5s"
    t, defaults = load_model_dir(folder)
    # the release's width (28 heads x 64, ff 7168), its 2 text blocks, 2 visual blocks; 17 frames of 128 x 128: 5 x 8 x
    # 8 = 320 visual + 64 Qwen tokens, CFG
    return Workload("kandinsky5-cpu-small", dict(t, num_visual_blocks=2), height=128, width=128, num_frames=17,
                    family="kandinsky5", text_tokens=64, folder=str(folder), defaults=defaults,
                    source="configs/kandinsky5-t2v-lite-5s, 2 visual blocks")


def _kandinsky5_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Kandinsky 5.0 (2 heads x 16, 2 text + 2 visual blocks, Qwen and CLIP 32 wide) with the release's
    # visual_cond (9 input channels: 4 noise + 4 zero condition + the zero mask) at 5 frames of 32 x 48: 2 x 4 x 6
    # latents, 2 x 2 x 3 = 12 visual tokens; 16 Qwen tokens (the negative prompt's 6 in its half, padded), CFG
    return Workload("kandinsky5-tiny", dict(tiny.KANDINSKY5_TRANSFORMER, visual_cond=True), height=32, width=48,
                    num_frames=5, family="kandinsky5", text_tokens=16, text_valid=6,
                    source="xdit_jax.tiny's Kandinsky 5.0, 2 heads x 16, 2 + 2 blocks, visual_cond",
                    defaults={"num_inference_steps": 2, "guidance_scale": 5.0})


def _sana_video_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's SANA-Video (2 linear heads x 12, 2 blocks, the frame conv, Gemma states 24 wide) at 9 frames of
    # 32 x 48 through Wan's tiny VAE (8x, 4x): 3 x 4 x 6 latents, 3 x 2 x 3 = 18 video tokens (the 4-way sequence
    # meshes pad); 16 Gemma tokens, 6 of the prompt's real; CFG
    spatial, temporal = wan_vae_scales(tiny.WAN_VAE)
    return Workload("sana-video-tiny", dict(tiny.SANA_VIDEO_TRANSFORMER), height=32, width=48, num_frames=9,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="sana_video", text_tokens=16,
                    text_valid=6, source="xdit_jax.tiny's SANA-Video, 2 heads x 12, 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 6.0, "max_sequence_length": 16,
                              "tiny_family": "sana-video"})


def _sana_video_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "sana-video-2b-480p"
    t, defaults = load_model_dir(folder)
    spatial, temporal = wan_folder_vae_scales(folder)
    # the release's width (20 linear heads x 112, GLUMBTempConv x 3), 2 blocks; 17 frames of 128 x 128: 5 x 8 x 8 = 320
    # video + 300 Gemma tokens, CFG
    return Workload("sana-video-cpu-small", dict(t, num_layers=2), height=128, width=128, num_frames=17,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="sana_video",
                    text_tokens=int(defaults.get("max_sequence_length", 300)), folder=str(folder), defaults=defaults,
                    source="configs/sana-video-2b-480p, 2 blocks")


def _wan_vace_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Wan VACE (Wan's tiny 2 heads x 12, 2 blocks, + 2 VACE blocks: hints after layers 0 and 1; 72
    # control channels) at 9 frames of 32 x 48: 3 x 4 x 6 latents, 18 video tokens (the 4-way sequence meshes pad), the
    # random control latents at the same frames; 16 UMT5 tokens, 6 real; CFG
    spatial, temporal = wan_vae_scales(tiny.WAN_VAE)
    return Workload("wan-vace-tiny", dict(tiny.WAN_VACE_TRANSFORMER), height=32, width=48, num_frames=9,
                    vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="wan_vace", text_tokens=16,
                    text_valid=6, source="xdit_jax.tiny's Wan VACE, 2 heads x 12, 2 + 2 VACE blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 5.0, "max_sequence_length": 16})


def _wan_vace_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "wan2.1-vace-1.3b"
    t, defaults = load_model_dir(folder)
    spatial, temporal = wan_folder_vae_scales(folder)
    # Wan2.1-VACE-1.3B's width (12 heads x 128, ffn 8960, 96 control channels), 4 blocks with its every-2nd-layer VACE
    # blocks (0, 2); 17 frames of 128 x 128: 5 x 8 x 8 = 320 video + 512 UMT5 tokens (40 real), CFG
    return Workload("wan-vace-cpu-small", FAMILIES["wan_vace"].with_layers(t, 4), height=128, width=128,
                    num_frames=17, vae_scale_spatial=spatial, vae_scale_temporal=temporal, family="wan_vace",
                    text_valid=WAN_TEXT_VALID, folder=str(folder), defaults=defaults,
                    source="configs/wan2.1-vace-1.3b, 4 blocks + 2 VACE blocks")


def _hidream_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's HiDream-I1 (4 heads x 16, 2 double- + 2 single-stream blocks, 3 routed experts (2 active) + the
    # shared one, T5 / Llama states 32 wide, 3 Llama layers) at 64 x 64: 8 x 8 latents, 16 image tokens; 16 T5 + 16
    # Llama tokens (the text stream 32); CFG
    return Workload("hidream-tiny", dict(tiny.HIDREAM_TRANSFORMER), height=64, width=64, num_frames=1,
                    family="hidream", text_tokens=16, source="xdit_jax.tiny's HiDream-I1, 4 heads x 16, 2 + 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 5.0, "max_sequence_length": 16})


def _cosmos_tiny_workload(v2w: bool = False) -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's Cosmos-Predict2 (2 heads x 12, 2 blocks, adaLN-LoRA 8, the learnable positions, T5 32 wide) on
    # Wan's tiny VAE. Text2Image at 64 x 64: 1 x 8 x 8 latents, 16 video tokens; Video2World (the condition-mask
    # channel: in 5) at 9 x 32 x 48: 3 x 4 x 6 latents, 3 x 2 x 3 = 18 tokens (the 4-way sequence meshes pad), the
    # first latent frame conditioned, fps 16. 16 T5 tokens (6 real), CFG
    spatial, temporal = wan_vae_scales(tiny.WAN_VAE)
    t = dict(tiny.COSMOS_V2W_TRANSFORMER if v2w else tiny.COSMOS_TRANSFORMER)
    name, (frames, h, w) = ("cosmos-v2w-tiny", (9, 32, 48)) if v2w else ("cosmos-tiny", (1, 64, 64))
    return Workload(name, t, height=h, width=w, num_frames=frames, vae_scale_spatial=spatial,
                    vae_scale_temporal=temporal, family="cosmos", text_tokens=16, text_valid=6,
                    source=f"xdit_jax.tiny's Cosmos-Predict2 {'Video2World' if v2w else 'Text2Image'}, 2 heads x 12, "
                           f"2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 7.0, "max_sequence_length": 16})


def _cosmos_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "cosmos-predict2-2b-video2world"
    t, defaults = load_model_dir(folder)
    # the 2B Video2World width (16 heads x 128, adaLN-LoRA 256), 2 blocks; 17 frames at 128 x 128: 5 x 8 x 8 = 320
    # video + 512 T5 tokens (40 real), the first latent frame conditioned, CFG
    return Workload("cosmos-cpu-small", dict(t, num_layers=2), height=128, width=128, num_frames=17, family="cosmos",
                    folder=str(folder), defaults=defaults, source="configs/cosmos-predict2-2b-video2world, 2 blocks")


def _longcat_tiny_workload() -> Workload:
    from xdit_jax import tiny

    # xdit_jax.tiny's LongCat-Image (FLUX's tiny blocks: 2 heads x 16, 2 double- + 2 single-stream, Qwen states 32
    # wide, no pooled / guidance embedding) at 48 x 80: a 3 x 5 grid of packed tokens (the sequence meshes pad);
    # 16 text tokens (the image ids start after them), CFG
    scale = 2 ** (len(tiny.FLUX_VAE["block_out_channels"]) - 1)
    return Workload("longcat-tiny", dict(tiny.LONGCAT_TRANSFORMER), height=48, width=80, num_frames=1,
                    vae_scale_spatial=scale, family="longcat_image", text_tokens=16,
                    source="xdit_jax.tiny's LongCat-Image, 2 heads x 16, 2 + 2 blocks",
                    defaults={"num_inference_steps": 2, "guidance_scale": 4.5, "max_sequence_length": 16})


def _longcat_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "longcat-image"
    t, defaults = load_model_dir(folder)
    # the release's width (24 heads x 128, Qwen2.5-VL 3584), 1 double- + 1 single-stream block at 256 x 256: 16 x 16
    # = 256 image + 512 text tokens, CFG
    return Workload("longcat-cpu-small", FAMILIES["longcat_image"].with_layers(t, 1), height=256, width=256,
                    num_frames=1, family="longcat_image", folder=str(folder), defaults=defaults,
                    source="configs/longcat-image, 1 + 1 blocks")


def _hidream_cpu_small_workload() -> Workload:
    folder = CONFIG_DIR / "hidream-i1-full"
    t, defaults = load_model_dir(folder)
    # the release's width (20 heads x 128, 4 routed experts of 6912 + the shared 3584), 1 double- + 1 single-stream
    # block (their Llama layers 0 and 16); 128 x 128: 8 x 8 = 64 image + 64 T5 + 64 Llama tokens, CFG (0.35 TFLOP)
    return Workload("hidream-cpu-small", FAMILIES["hidream"].with_layers(t, 1), height=128, width=128, num_frames=1,
                    family="hidream", text_tokens=64, folder=str(folder), defaults=defaults,
                    source="configs/hidream-i1-full, 1 + 1 blocks")


PRESETS: dict[str, Callable[[], Workload]] = {"tiny": _tiny_workload, "cpu-small": _cpu_small_workload,
                                              "pixart-tiny": _pixart_tiny_workload,
                                              "pixart-cpu-small": _pixart_cpu_small_workload,
                                              "cogview3-tiny": _cogview3_tiny_workload,
                                              "hunyuandit-tiny": _hunyuandit_tiny_workload,
                                              "hunyuandit-cpu-small": _hunyuandit_cpu_small_workload,
                                              "mochi-tiny": _mochi_tiny_workload,
                                              "mochi-cpu-small": _mochi_cpu_small_workload,
                                              "flux-tiny": _flux_tiny_workload,
                                              "flux-cpu-small": _flux_cpu_small_workload,
                                              "chroma-tiny": _chroma_tiny_workload,
                                              "chroma-cpu-small": _chroma_cpu_small_workload,
                                              "sd3-tiny": _sd3_tiny_workload,
                                              "sd3-cpu-small": _sd3_cpu_small_workload,
                                              "ltx-tiny": _ltx_tiny_workload,
                                              "ltx-cpu-small": _ltx_cpu_small_workload,
                                              "wan-tiny": _wan_tiny_workload,
                                              "wan-cpu-small": _wan_cpu_small_workload,
                                              "skyreels-tiny": _skyreels_tiny_workload,
                                              "latte-tiny": _latte_tiny_workload,
                                              "latte-cpu-small": _latte_cpu_small_workload,
                                              "hunyuanvideo-tiny": _hunyuan_video_tiny_workload,
                                              "hunyuanvideo-cpu-small": _hunyuan_video_cpu_small_workload,
                                              "hunyuanvideo15-tiny": _hunyuan_video15_tiny_workload,
                                              "hunyuanvideo15-cpu-small": _hunyuan_video15_cpu_small_workload,
                                              "qwenimage-tiny": _qwen_image_tiny_workload,
                                              "qwenimage-cpu-small": _qwen_image_cpu_small_workload,
                                              "qwenimage-edit-tiny": _qwen_image_edit_tiny_workload,
                                              "zimage-tiny": _zimage_tiny_workload,
                                              "zimage-cpu-small": _zimage_cpu_small_workload,
                                              "flux2-tiny": _flux2_tiny_workload,
                                              "flux2-cpu-small": _flux2_cpu_small_workload,
                                              "sana-tiny": _sana_tiny_workload,
                                              "sana-cpu-small": _sana_cpu_small_workload,
                                              "sana-sprint-tiny": _sana_sprint_tiny_workload,
                                              "lumina2-tiny": _lumina2_tiny_workload,
                                              "cogview4-tiny": _cogview4_tiny_workload,
                                              "lumina2-cpu-small": _lumina2_cpu_small_workload,
                                              "consisid-tiny": _consisid_tiny_workload,
                                              "hunyuanimage-tiny": _hunyuan_image_tiny_workload,
                                              "kandinsky5-tiny": _kandinsky5_tiny_workload,
                                              "hunyuanimage-cpu-small": _hunyuan_image_cpu_small_workload,
                                              "kandinsky5-cpu-small": _kandinsky5_cpu_small_workload,
                                              "sana-video-tiny": _sana_video_tiny_workload,
                                              "sana-video-cpu-small": _sana_video_cpu_small_workload,
                                              "wan-vace-tiny": _wan_vace_tiny_workload,
                                              "wan-vace-cpu-small": _wan_vace_cpu_small_workload,
                                              "hidream-tiny": _hidream_tiny_workload,
                                              "hidream-cpu-small": _hidream_cpu_small_workload,
                                              "cosmos-tiny": _cosmos_tiny_workload,
                                              "cosmos-v2w-tiny": lambda: _cosmos_tiny_workload(v2w=True),
                                              "cosmos-cpu-small": _cosmos_cpu_small_workload,
                                              "longcat-tiny": _longcat_tiny_workload,
                                              "longcat-cpu-small": _longcat_cpu_small_workload}
PRESET_HELP = {
    "tiny": "xdit_jax.tiny's 4x16-head, 2-layer CogVideoX at 9x64x96 (CI smoke test)",
    "cpu-small": "CogVideoX-2B width (30 heads x 64), 2 layers, 49 frames at 128x128: 832 video + 226 text tokens",
    "consisid-tiny": "xdit_jax.tiny's ConsisID (3x16 heads, 4 layers, 2 face cross-attentions) at 9x64x96: 72 video + "
                     "16 text tokens, the face extractor over 2 x 577 ViT states",
}
for _m in FULL_MODELS:
    PRESET_HELP[_m] = f"full-size configs/{_m} with random weights at its default resolution"
PRESET_HELP.update({
    "pixart-tiny": "a 3x8-head, 2-layer PixArt-alpha-shaped model at 64x64: 16 image + 16 text tokens (CI smoke test)",
    "pixart-cpu-small": f"PixArt-Sigma XL width (16 heads x 72), 2 layers, 512x512: 1024 image + 300 text tokens "
                        f"({PIXART_TEXT_VALID} real)",
})
PRESET_HELP["cogview3-tiny"] = ("a 2x16-head, 2-layer CogView3-Plus at 48x80: 15 image + 16 T5 tokens in one joint "
                                "attention, both CFG halves (CI smoke test)")
for _m in COGVIEW3_MODELS:
    PRESET_HELP[_m] = f"full-size configs/{_m} with random weights at 1024x1024 (4096 image + 224 T5 tokens)"
for _m in PIXART_MODELS:
    PRESET_HELP[_m] = f"full-size configs/{_m} with random weights at 1024x1024 (4096 image tokens)"
PRESET_HELP.update({
    "hunyuandit-tiny": "a 2x8-head, 6-layer HunyuanDiT (long skips, image meta + style) at 64x64: 16 image + "
                       "77 BERT + 256 mT5 tokens (CI smoke test)",
    "hunyuandit-cpu-small": f"HunyuanDiT-v1.2 width (16 heads x 88), 4 layers, 512x512: 1024 image + 77 BERT + 256 "
                            f"mT5 tokens ({HUNYUAN_TEXT_VALID[0]} / {HUNYUAN_TEXT_VALID[1]} real)",
})
for _m in HUNYUANDIT_MODELS:
    PRESET_HELP[_m] = f"full-size configs/{_m} with random weights at 1024x1024 (4096 image tokens)"
PRESET_HELP.update({
    "mochi-tiny": "a 2x16-head, 3-layer Mochi (caption stream 16 wide) at 7x48x64: 24 video + 16 caption tokens "
                  "(6 real; CI smoke test)",
    "mochi-cpu-small": f"Mochi 1 width (24 heads x 128, caption 1536), 2 layers, 43 frames at 128x128: 8x8x8 = 512 "
                       f"video + 256 T5 tokens ({MOCHI_TEXT_VALID} real)",
})
for _m in MOCHI_MODELS:
    PRESET_HELP[_m] = (f"full-size configs/{_m} with random weights at 163x480x848 (28x30x53 = 44,520 video + 256 "
                       f"T5 tokens)")
PRESET_HELP.update({
    "flux-tiny": "a 2x16-head FLUX.1-dev-shaped model (2 double- + 2 single-stream blocks) at 48x80: 15 image + 16 "
                 "text tokens, one sample per prompt (CI smoke test)",
    "flux-cpu-small": "FLUX.1-dev width (24 heads x 128), 1 double- + 1 single-stream block, 256x256: 16x16 = 256 "
                      "image + 256 T5 tokens, one sample per prompt",
})
PRESET_HELP.update({
    "chroma-tiny": "a 2x16-head Chroma (2 double- + 2 single-stream blocks, 2-layer approximator) at 48x80: 15 image "
                   "+ 16 T5 tokens (6 real), both CFG halves (CI smoke test)",
    "chroma-cpu-small": "Chroma1-HD width (24 heads x 128), 1 double- + 2 single-stream blocks, 256x256: 16x16 = 256 "
                        "image + 256 T5 tokens (40 real), both CFG halves",
    "chroma1-hd": "full-size configs/chroma1-hd with random weights at 1024x1024 (4096 image + 512 T5 tokens, both "
                  "CFG halves)",
})
for _m in FLUX_MODELS:
    PRESET_HELP[_m] = (f"full-size configs/{_m} with random weights at 1024x1024 (4096 image + "
                       f"{512 if _m.endswith('dev') else 256} T5 tokens, one sample per prompt)")
PRESET_HELP.update({
    "sd3-tiny": "a 2x16-head, 5-layer SD3.5-Medium-shaped model (2 dual-attention blocks, rms q/k norms) at 48x80: "
                "15 image + 77 CLIP + 16 T5 tokens (CI smoke test)",
    "sd3-cpu-small": "SD3 Medium width (24 heads x 64), 2 layers, 512x512: 32x32 = 1024 image + 77 CLIP + 256 T5 "
                     "tokens",
})
for _m in SD3_MODELS:
    PRESET_HELP[_m] = (f"full-size configs/{_m} with random weights at 1024x1024 (4096 image + 77 CLIP + 256 T5 "
                       f"tokens)")
PRESET_HELP.update({
    "ltx-tiny": "a 2x8-head, 2-layer LTX-Video (T5 32 wide) at 17x64x96: 3x2x3 = 18 video + 16 T5 tokens (6 real; CI "
                "smoke test)",
    "ltx-cpu-small": "LTX-Video 2B width (32 heads x 64), 2 layers, 41 frames at 256x256: 6x8x8 = 384 video + 128 T5 "
                     "tokens (40 real)",
})
for _m in LTX_MODELS:
    PRESET_HELP[_m] = (f"full-size configs/{_m} with random weights at 161x512x704 (21x16x22 = 7,392 video + 128 T5 "
                       f"tokens)")
PRESET_HELP.update({
    "wan-tiny": "a 2x12-head, 2-layer Wan 2.1 (UMT5 32 wide) at 9x32x48: 18 video + 16 caption tokens (6 real, "
                "the rest zeros; CI smoke test)",
    "wan-cpu-small": f"Wan 2.1 1.3B width (12 heads x 128, FFN 8960), 2 layers, 17 frames at 128x128: 5x8x8 = 320 "
                     f"video + 512 UMT5 tokens ({WAN_TEXT_VALID} real, the rest zeros)",
})
PRESET_HELP["wan2.1-t2v-1.3b"] = ("full-size configs/wan2.1-t2v-1.3b with random weights at 81x480x832 "
                                  "(21x30x52 = 32,760 video + 512 UMT5 tokens)")
PRESET_HELP["wan2.1-t2v-14b"] = ("full-size configs/wan2.1-t2v-14b with random weights at 81x720x1280 "
                                 "(21x45x80 = 75,600 video + 512 UMT5 tokens)")
PRESET_HELP["wan2.2-t2v-a14b"] = ("full-size configs/wan2.2-t2v-a14b with random weights at 81x720x1280: one expert's "
                                  "step (both are 14B Wan 2.1 shapes; 21x45x80 = 75,600 video + 512 UMT5 tokens)")
PRESET_HELP["wan2.2-i2v-a14b"] = ("full-size configs/wan2.2-i2v-a14b with random weights at 81x480x832: one expert's "
                                  "step, 36 input channels (noise, mask, image latents; 21x30x52 = 32,760 video + 512 "
                                  "UMT5 tokens)")
PRESET_HELP["wan2.1-i2v-14b-480p"] = ("full-size configs/wan2.1-i2v-14b-480p with random weights at 81x480x832: "
                                      "36 input channels, cross-attention to 512 UMT5 + 257 CLIP image states "
                                      "(21x30x52 = 32,760 video tokens)")
PRESET_HELP["wan2.1-i2v-14b-720p"] = ("full-size configs/wan2.1-i2v-14b-720p with random weights at 81x720x1280: "
                                      "as 480p, 21x45x80 = 75,600 video tokens")
PRESET_HELP["wan2.1-flf2v-14b-720p"] = ("full-size configs/wan2.1-flf2v-14b-720p with random weights at 81x720x1280: "
                                        "first-last-frame, 2 x 257 CLIP image states (21x45x80 = 75,600 video tokens)")
PRESET_HELP["wan2.2-ti2v-5b"] = ("full-size configs/wan2.2-ti2v-5b with random weights at 121x704x1280 (Wan 2.2 VAE, "
                                 "16x spatial: 31x22x40 = 27,280 video + 512 UMT5 tokens)")
PRESET_HELP.update({
    "skyreels-tiny": "a 2x12-head, 2-layer SkyReels-V2 (Wan 2.1's tiny blocks, the fps embedding) stepping as the "
                     "diffusion-forcing pipeline at 13x32x48: 24 video tokens, a timestep per latent frame, causal "
                     "blocks of 2 frames, 16 caption tokens (6 real; CI smoke test)",
    "skyreels-v2-df-1.3b-540p": "full-size configs/skyreels-v2-df-1.3b-540p with random weights at 97x544x960 "
                                "(25x34x60 = 51,000 video + 512 UMT5 tokens; a timestep per latent frame, causal "
                                "blocks of 5 frames, the fps embedding)",
    "latte-tiny": "a 2x8-head Latte (2 spatial + temporal layer pairs, caption 32 wide) at 3x32x48: 3 frames x 6 "
                  "patch positions + 16 T5 tokens (CI smoke test)",
    "latte-cpu-small": "Latte-1 width (16 heads x 72), 2 layer pairs, 16 frames at 128x128: 16 frames x 8x8 = 1024 "
                       "video + 120 T5 tokens",
    "latte-1": "full-size configs/latte-1 with random weights at 16x512x512 (16 frames x 32x32 = 16,384 video + 120 "
               "T5 tokens; spatial attention over a frame's 1024 patches, temporal over the 16 frames)",
    "hunyuanvideo-tiny": "a 2x8-head HunyuanVideo (2 double- + 2 single-stream blocks, Llama states 32 wide) at "
                         "5x32x48: 12 video + 16 Llama tokens (6 real), one sample per prompt (CI smoke test)",
    "hunyuanvideo-cpu-small": "HunyuanVideo width (24 heads x 128), 1 double- + 1 single-stream block, 17 frames at "
                              "128x128: 5x8x8 = 320 video + 256 Llama tokens, one sample per prompt",
    "hunyuanvideo15-tiny": "a 2x8-head HunyuanVideo-1.5 (2 double-stream blocks, Qwen states 32 wide, ByT5 16 wide) "
                           "at 5x32x48: 48 video + 16 Qwen (6 real) + 256 ByT5 (16 real) tokens, CFG (CI smoke test)",
    "hunyuanvideo15-cpu-small": "HunyuanVideo-1.5 width (16 heads x 128), 1 block, 17 frames at 128x128: 5x8x8 = 320 "
                                "video + 64 Qwen + 256 ByT5 tokens, CFG",
    "hunyuanvideo-1.5-480p": "full-size configs/hunyuanvideo-1.5-480p with random weights at 121x480x848 (31x30x53 = "
                             "49,290 video + 1000 Qwen + 256 ByT5 tokens, CFG: 2 samples per prompt)",
    "qwenimage-tiny": "a 2x16-head Qwen-Image (2 double-stream blocks, Qwen2.5-VL states 32 wide) at 48x80: 15 "
                      "image + 16 text tokens, true CFG (CI smoke test)",
    "qwenimage-cpu-small": "Qwen-Image width (24 heads x 128), 1 block at 256x256: 256 image + 64 text tokens, "
                           "true CFG",
    "qwenimage-edit-tiny": "qwenimage-tiny as Qwen-Image-Edit-2511: 15 noisy + 16 condition-image tokens (zero_cond_t) "
                           "+ 16 text tokens, true CFG (CI smoke test)",
    "qwen-image-edit": "full-size configs/qwen-image-edit with random weights at 1024x1024: 4096 noisy + 4096 "
                       "condition tokens + 64 text and 1369 image tokens (Qwen2.5-VL's view of the image), true CFG",
    "qwen-image-edit-2511": "full-size configs/qwen-image-edit-2511 with random weights at 1024x1024: 4096 noisy + "
                            "4096 condition tokens (zero_cond_t) + 64 text and 196 image tokens, true CFG",
    "qwen-image": "full-size configs/qwen-image with random weights at 1328x1328 (83x83 = 6,889 image + 64 text "
                  "tokens, true CFG: 2 samples per prompt)",
    "hunyuanvideo": "full-size configs/hunyuanvideo with random weights at 129x720x1280 (33x45x80 = 118,800 video + "
                    "256 Llama tokens, one sample per prompt)",
    "cogview4-tiny": "a 2x16-head CogView4 (2 blocks, GLM states 32 wide) at 64x96: 24 image + 32 text tokens, CFG "
                     "(CI smoke test)",
    "cogview4-6b": "full-size configs/cogview4-6b with random weights at 1024x1024 (64x64 = 4096 image + 128 GLM "
                   "tokens, CFG: 2 samples per prompt)",
    "zimage-tiny": "a 2x16-head Z-Image (2 main + 1 noise + 1 context refiner layers, caption 32 wide) at 64x96: 24 "
                   "image tokens (padded to 32) + 32 caption tokens (20 kept), no CFG (CI smoke test)",
    "zimage-cpu-small": "Z-Image-Turbo width (30 heads x 128), 2 main + 1 + 1 refiner layers, 256x256: 16x16 = 256 "
                        "image + 64 caption tokens (50 kept), no CFG",
    "z-image-turbo": "full-size configs/z-image-turbo with random weights at 1024x1024 (64x64 = 4096 image + 64 "
                     "caption tokens, no CFG: Turbo's guidance 0)",
    "flux2-tiny": "a 2x16-head FLUX.2-klein-shaped model (2 double- + 2 single-stream blocks) at 48x80: 15 image + 16 "
                  "Qwen3 tokens, one sample per prompt (CI smoke test)",
    "flux2-cpu-small": "FLUX.2 klein 4B width (24 heads x 128), 1 double- + 1 single-stream block, 256x256: 16x16 = "
                       "256 image + 128 Qwen3 tokens, one sample per prompt",
    "flux.2-klein-4b": "full-size configs/flux.2-klein-4b with random weights at 1024x1024 (64x64 = 4096 image + 512 "
                       "Qwen3 tokens, step-distilled: one sample per prompt)",
    "sana-tiny": "a 2x8-head, 2-block SANA (linear attention, GLUMBConv) at 32x48: 96 image + 16 Gemma tokens (6 real; "
                 "CI smoke test)",
    "sana-cpu-small": "SANA 1600M width (70 linear heads x 32), 2 blocks, 512x512: 16x16 = 256 image + 300 Gemma tokens",
    "sana-sprint-tiny": "sana-tiny as Sana Sprint (q/k RMS norms, the guidance embedded): 96 image + 16 Gemma tokens, "
                        "one sample per prompt (CI smoke test)",
    "sana-sprint-1.6b-1024px": "full-size configs/sana-sprint-1.6b-1024px with random weights at 1024x1024 (32x32 = "
                               "1024 image + 300 Gemma tokens, one sample per prompt: the guidance embedded)",
    "sana1.5-1.6b-1024px": "full-size configs/sana1.5-1.6b-1024px with random weights at 1024x1024 (32x32 = 1024 "
                           "image + 300 Gemma tokens, CFG)",
    "sana-1600m-1024px": "full-size configs/sana-1600m-1024px with random weights at 1024x1024 (32x32 = 1024 image + 300 "
                         "Gemma tokens)",
    "lumina2-tiny": "a 2x16-head Lumina 2 (1 K/V head; 2 main + 1 noise + 1 context refiner layers, caption 24 wide) at "
                    "64x96: 24 image + 32 caption tokens (20 kept), CFG (CI smoke test)",
    "lumina2-cpu-small": "Lumina-Image 2.0 width (24 heads x 96 over 8 K/V heads), 2 main + 1 + 1 refiner layers, "
                         "256x256: 16x16 = 256 image + 128 caption tokens (100 kept), CFG",
    "lumina-image-2.0": "full-size configs/lumina-image-2.0 with random weights at 1024x1024 (64x64 = 4096 image + 128 "
                        "caption tokens, CFG: 2 samples per prompt)",
})

PRESET_HELP.update({
    "hunyuanimage-tiny": "a 2x8-head HunyuanImage-2.1 (2 double- + 2 single-stream blocks, Qwen states 32 wide, ByT5 "
                         "16 wide) at 32x48: 24 image + 16 Qwen (6 real) + 128 ByT5 (16 real) tokens, CFG (CI smoke "
                         "test)",
    "hunyuanimage-2.1": "full-size configs/hunyuanimage-2.1 with random weights at 2048x2048 (32x VAE: 64x64 = 4096 "
                        "image + 1000 Qwen + 128 ByT5 tokens, CFG: 2 samples per prompt)",
    "kandinsky5-tiny": "a 2x16-head Kandinsky 5.0 (2 text + 2 visual blocks, visual_cond) at 5x32x48: 12 visual + 16 "
                       "Qwen tokens (the negative prompt's 6), CFG (CI smoke test)",
    "hunyuanimage-cpu-small": "HunyuanImage-2.1 at 16 heads x 128, 1 double- + 1 single-stream block, 1 refiner block, "
                              "512x512: 16x16 = 256 image + 64 Qwen + 128 ByT5 tokens, CFG",
    "kandinsky5-cpu-small": "Kandinsky 5.0 T2V Lite width (28 heads x 64, ff 7168), 2 text + 2 visual blocks, 17 frames "
                            "at 128x128: 5x8x8 = 320 visual + 64 Qwen tokens, CFG",
    "kandinsky5-t2v-lite-5s": "full-size configs/kandinsky5-t2v-lite-5s with random weights at 121x512x768 (5 s at 24 "
                              "fps: 31x32x48 = 47,616 visual + 64 Qwen tokens, CFG: 2 samples per prompt)",
})


PRESET_HELP.update({
    "sana-video-tiny": "a 2x12-head SANA-Video (2 blocks, the frame conv, Gemma states 24 wide) at 9x32x48: 18 video "
                       "+ 16 Gemma tokens (6 real), CFG (CI smoke test)",
    "sana-video-cpu-small": "SANA-Video 2B width (20 linear heads x 112, GLUMBTempConv x3), 2 blocks, 17 frames at "
                            "128x128: 5x8x8 = 320 video + 300 Gemma tokens, CFG",
    "sana-video-2b-480p": "full-size configs/sana-video-2b-480p with random weights at 81x480x832 (21x30x52 = 32,760 "
                          "video + 300 Gemma tokens, CFG: 2 samples per prompt)",
    "wan-vace-tiny": "a 2x12-head Wan VACE (2 blocks + 2 VACE blocks, 72 control channels) at 9x32x48: 18 video + 16 "
                     "UMT5 tokens (6 real), random control latents, CFG (CI smoke test)",
    "wan-vace-cpu-small": "Wan2.1-VACE-1.3B width (12 heads x 128, ffn 8960), 4 blocks + 2 VACE blocks, 17 frames at "
                          "128x128: 5x8x8 = 320 video + 512 UMT5 tokens, random control latents (96 channels), CFG",
    "wan2.1-vace-14b": "full-size configs/wan2.1-vace-14b with random weights at 81x480x832 (21x30x52 = 32,760 video + "
                       "512 UMT5 tokens, 40 blocks + 8 VACE blocks, random control latents, CFG: 2 samples per prompt)",
    "wan2.1-vace-1.3b": "full-size configs/wan2.1-vace-1.3b with random weights at 81x480x832 (32,760 video + 512 UMT5 "
                        "tokens, 30 blocks + 15 VACE blocks, random control latents, CFG)",
})


PRESET_HELP.update({
    "hidream-tiny": "a 4x16-head HiDream-I1 (2 double- + 2 single-stream blocks, 3 routed experts) at 64x64: 16 image "
                    "+ 16 T5 + 16 Llama tokens, CFG (CI smoke test)",
    "hidream-cpu-small": "HiDream-I1 width (20 heads x 128, 4 routed experts, 2 active: run densely), 1 double- + 1 "
                         "single-stream block at 128x128: 64 image + 64 T5 + 64 Llama tokens, CFG",
    "hidream-i1-full": "full-size configs/hidream-i1-full with random weights at 1024x1024 (64x64 = 4,096 image + 128 "
                       "T5 + 128 Llama tokens, 16 + 32 blocks, CFG: 2 samples per prompt)",
})


PRESET_HELP.update({
    "cosmos-tiny": "a 2x12-head, 2-block Cosmos-Predict2 Text2Image at 64x64: 1x4x4 = 16 image + 16 T5 tokens "
                   "(6 real), CFG (CI smoke test)",
    "cosmos-v2w-tiny": "a 2x12-head, 2-block Cosmos-Predict2 Video2World at 9x32x48: 3x2x3 = 18 video + 16 T5 tokens "
                       "(6 real), a timestep per latent frame (the first conditioned), CFG (CI smoke test)",
    "cosmos-cpu-small": "Cosmos-Predict2 2B Video2World width (16 heads x 128), 2 blocks, 17 frames at 128x128: "
                        "5x8x8 = 320 video + 512 T5 tokens (40 real), the first latent frame conditioned, CFG",
    "cosmos-predict2-2b-text2image": "full-size configs/cosmos-predict2-2b-text2image with random weights at "
                                     "768x1360 (1x48x85 = 4,080 image + 512 T5 tokens, 28 blocks, "
                                     "CFG: 2 samples per prompt)",
    "cosmos-predict2-2b-video2world": "full-size configs/cosmos-predict2-2b-video2world with random weights at "
                                      "93x704x1280 (24x44x80 = 84,480 video + 512 T5 tokens, 28 blocks, a timestep "
                                      "per latent frame, CFG)",
    "longcat-tiny": "a 2x16-head LongCat-Image (2 double- + 2 single-stream blocks, Qwen states 32 wide) at 48x80: 15 "
                    "image + 16 text tokens, CFG (CI smoke test)",
    "longcat-cpu-small": "LongCat-Image width (24 heads x 128), 1 double- + 1 single-stream block at 256x256: 256 "
                         "image + 512 Qwen2.5-VL tokens, CFG",
    "longcat-image": "full-size configs/longcat-image with random weights at 1024x1024 (4,096 image + 512 Qwen2.5-VL "
                     "tokens, 10 double- + 20 single-stream blocks, CFG: 2 samples per prompt)",
})


def load_workload(name: str, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                  layers: int | None = None, batch: int = 1, cfg: bool | None = None) -> Workload:
    """A preset (:data:`PRESETS`), a full-size model in ``configs/``, or a config folder path. ``cfg``:
    both CFG halves per prompt; None: the family's default (:attr:`Family.default_cfg`: FLUX one sample)."""
    if name in PRESETS:
        w = PRESETS[name]()
    else:
        folder = CONFIG_DIR / name if (CONFIG_DIR / name).is_dir() else Path(name)
        if not folder.is_dir():
            known = sorted(PRESETS) + sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()) \
                if CONFIG_DIR.is_dir() else sorted(PRESETS)
            raise ValueError(f"Unknown model {name!r}: give one of {', '.join(known)} or a config folder.")
        t, d = load_model_dir(folder)
        family = family_of_config(t)
        if family == "qwenimage":  # no sample size in its config: defaults.json's, else diffusers' 1024 x 1024
            w = Workload(folder.name, t, height=int(d.get("height", 1024)), width=int(d.get("width", 1024)),
                         num_frames=1, defaults=d, source=str(folder), folder=str(folder), family=family)
        elif family == "sana":  # DC-AE: 2^(blocks - 1) = 32x
            vae = folder / "vae" / "config.json"
            blocks = read_json(vae).get("decoder_block_out_channels", [0] * 6) if vae.exists() else [0] * 6
            spatial = 2 ** (len(blocks) - 1)
            size = int(t.get("sample_size", 32)) * spatial
            w = Workload(folder.name, t, height=int(d.get("height", size)), width=int(d.get("width", size)),
                         num_frames=1, vae_scale_spatial=spatial, defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family == "hunyuanimage":  # the size: defaults.json's, else diffusers' 2048 x 2048; its 32x VAE
            vae = folder / "vae" / "config.json"
            spatial = int(read_json(vae).get("spatial_compression_ratio", 32)) if vae.exists() else 32
            w = Workload(folder.name, t, height=int(d.get("height", 2048)), width=int(d.get("width", 2048)),
                         num_frames=1, vae_scale_spatial=spatial, defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family == "kandinsky5":  # the size: defaults.json's, else diffusers' 512 x 768 x 121; HunyuanVideo's VAE
            w = Workload(folder.name, t, height=int(d.get("height", 512)), width=int(d.get("width", 768)),
                         num_frames=int(d.get("num_frames", 121)), defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family in IMAGE_FAMILIES:
            size = int(t.get("sample_size", 128)) * 8
            w = Workload(folder.name, t, height=int(d.get("height", size)), width=int(d.get("width", size)),
                         num_frames=1, defaults=d, source=str(folder), folder=str(folder), family=family)
        elif family == "mochi":  # no sample sizes in its config: defaults.json's, else diffusers' 480 x 848 x 19
            spatial, temporal = mochi_vae_scales(folder)
            w = Workload(folder.name, t, height=int(d.get("height", 480)), width=int(d.get("width", 848)),
                         num_frames=int(d.get("num_frames", 19)), vae_scale_spatial=spatial,
                         vae_scale_temporal=temporal, defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family == "latte":  # the sample size (x 8) and video_length, as LattePipeline's defaults
            size = int(t.get("sample_size", 64)) * 8
            w = Workload(folder.name, t, height=int(d.get("height", size)), width=int(d.get("width", size)),
                         num_frames=int(d.get("num_frames", t.get("video_length", 16))), defaults=d,
                         source=str(folder), folder=str(folder), family=family)
        elif family == "hunyuan_video15":  # the size: defaults.json's, else diffusers' 480 x 848 x 121; 16x VAE
            vae = folder / "vae" / "config.json"
            spatial = int(read_json(vae).get("spatial_compression_ratio", 16)) if vae.exists() else 16
            w = Workload(folder.name, t, height=int(d.get("height", 480)), width=int(d.get("width", 848)),
                         num_frames=int(d.get("num_frames", 121)), vae_scale_spatial=spatial, defaults=d,
                         source=str(folder), folder=str(folder), family=family)
        elif family == "hunyuanvideo":  # no sample sizes in its config: defaults.json's, else diffusers' defaults
            w = Workload(folder.name, t, height=int(d.get("height", 720)), width=int(d.get("width", 1280)),
                         num_frames=int(d.get("num_frames", 129)), defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family == "ltx":  # no sample sizes in its config: defaults.json's, else LTXPipeline's 512 x 704 x 161
            spatial, temporal = ltx_vae_scales(read_json(folder / "vae" / "config.json"))
            w = Workload(folder.name, t, height=int(d.get("height", 512)), width=int(d.get("width", 704)),
                         num_frames=int(d.get("num_frames", 161)), vae_scale_spatial=spatial,
                         vae_scale_temporal=temporal, defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        elif family in ("wan", "skyreels_v2", "wan_vace", "sana_video", "cosmos"):  # defaults.json's, else 480 x 832
            # x 81 (Cosmos-Predict2: Wan 2.1's VAE; Text2Image one frame, defaults.json's)
            spatial, temporal = wan_folder_vae_scales(folder)
            if family == "skyreels_v2" and d.get("causal_block_size"):  # as the DF pipeline sets it on the model
                t = dict(t, num_frame_per_block=int(d["causal_block_size"]))
            w = Workload(folder.name, t, height=int(d.get("height", 480)), width=int(d.get("width", 832)),
                         num_frames=int(d.get("num_frames", 81)), vae_scale_spatial=spatial,
                         vae_scale_temporal=temporal, defaults=d, source=str(folder), folder=str(folder),
                         family=family)
        else:
            w = Workload(folder.name, t, height=int(d.get("height", t["sample_height"] * 8)),
                         width=int(d.get("width", t["sample_width"] * 8)),
                         num_frames=int(d.get("num_frames", t["sample_frames"])), defaults=d, source=str(folder),
                         folder=str(folder), family=family)
    if w.family in IMAGE_FAMILIES and num_frames not in (None, 1):
        raise ValueError(f"{w.name} is a {w.fam.title} (text-to-image) model: it has no frames "
                         f"(drop --frames).")
    if layers is not None:
        w.transformer = w.fam.with_layers(w.transformer, int(layers))
    w.height, w.width = height or w.height, width or w.width
    w.num_frames = num_frames or w.num_frames
    w.batch, w.cfg = batch, (w.fam.cfg_default(w) if cfg is None else bool(cfg))
    w.fam.check_cfg(w)
    return w


# --------------------------------------------------------------------------------------------
# Analytic FLOPs
# --------------------------------------------------------------------------------------------

def workload_flops(w: Workload) -> dict[str, float]:
    """Analytic matmul FLOPs of one forward of ``w`` (the family's formula: :func:`analytic_flops` for
    CogVideoX, :func:`pixart_analytic_flops` for PixArt, :func:`hunyuandit_analytic_flops` for HunyuanDiT,
    :func:`mochi_analytic_flops` for Mochi, :func:`flux_analytic_flops` for FLUX, :func:`sd3_analytic_flops` for
    SD3, :func:`wan_analytic_flops` for Wan; ``xdit_jax.bench_families``)."""
    return w.fam.analytic_flops(w)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------

def summarize_times(times: list[float]) -> dict[str, float]:
    """Median and spread of a list of seconds."""
    xs = sorted(times)
    n = len(xs)
    if n == 0:
        return {}

    def q(p):
        k = (n - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "p25": q(0.25), "p75": q(0.75),
            "iqr": q(0.75) - q(0.25), "mean": statistics.fmean(xs),
            "stdev": statistics.stdev(xs) if n > 1 else 0.0, "n": n}


def host_peak_rss_bytes() -> int | None:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb) * (1 if sys.platform == "darwin" else 1024)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# Our step
# --------------------------------------------------------------------------------------------

def jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[DTYPE_NAMES[name]]


def make_inputs(w: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """The step's random inputs, numpy, batch first, in the step's argument order (the family's:
    CogVideoX latents (B, F, C, h, w), text embeddings (B, L, D_txt), timesteps (B,); PixArt adds the
    caption mask and its micro-conditions)."""
    return w.fam.make_inputs(w, seed)


def batch_sharding(mesh, ndim: int):
    """Batch axis over (cfg, data), as the pipeline shards the doubled CFG batch; the rest replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P(("cfg", "data"), *([None] * (ndim - 1))))


def build_step(graphdef, mesh=None, dtype=None, attention_backend: str = "xla",
               patches: int | None = None, num_layers=None, family: Family | None = None, stacked=None,
               input_names: tuple[str, ...] = ("latents", "embeds", "t"),
               host_inputs: dict | None = None, text: tuple = (), pf_text: tuple = ()) -> tuple[Callable, str]:
    """The benchmarked step, ``(state, *inputs) -> noise_pred`` on the CFG batch, jitted; ``inputs``
    in the order of ``input_names`` (the keys of :func:`make_inputs`; CogVideoX: latents, embeds, t).

    The transformer forward for both CFG halves, weights as arguments, run as the pipeline runs
    it: ``embed`` -> ``xdit_jax.parallel.sequence.run_blocks`` over the mesh -> ``head`` (where
    the tree has them; else the plain ``model(...)`` call), or the family's own forward over the mesh
    where it has one (:meth:`Family.mesh_forward`: FLUX's two block phases). ``family`` (default CogVideoX)
    gives the arguments of ``embed``; ``host_inputs``: the family's host arrays (:attr:`Family.host_inputs`),
    constants of the trace, not arguments. ``text``: the family's text keys, sharded over the sequence group
    (``run_blocks``' ``text``); ``pf_text``: those PipeFusion slices with the patches on this mesh (empty: each
    patch carries the whole text). Returns (jitted step, which path).
    This is the one function to swap for the pipeline's full step (guidance + scheduler update).
    ``patches``: PipeFusion (:mod:`xdit_jax.parallel.pipefusion`), the step is then
    ``(state, *inputs, kv) -> (noise_pred, kv)``, a patched (not warm-up) step; ``stacked`` / ``num_layers``:
    the stacks it splits (:meth:`Family.stacks`, :meth:`Family.stacked_layers`).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    dtype = dtype or jnp.float32
    family = family or FAMILIES["cogvideox"]
    names = tuple(input_names)
    try:
        from xdit_jax.parallel.sequence import run_blocks
    except ImportError:
        run_blocks = None

    staged = run_blocks is not None and all(hasattr(family.model_class, a) for a in ("embed", "blocks", "head"))
    forward = family.mesh_forward()

    def blocks(params, joint, tokens, cond):
        return nnx.merge(graphdef, params).blocks(joint, tokens, cond)

    def pf_blocks(params, joint, tokens, cond):  # PipeFusion's form of the blocks (Family.pipefusion_method)
        return getattr(nnx.merge(graphdef, params), family.pipefusion_method)(joint, tokens, cond)

    def step(state, *args):
        kv = None
        if patches:
            args, kv = args[:-1], args[-1]
        inputs = dict(zip(names, args), **(host_inputs or {}))
        model = nnx.merge(graphdef, state)
        if mesh is not None:
            inputs["latents"] = jax.lax.with_sharding_constraint(inputs["latents"],
                                                                 batch_sharding(mesh, inputs["latents"].ndim))
        embed_args = family.embed_args(inputs, dtype)
        shape = embed_args[0].shape
        if patches:
            from xdit_jax.parallel.pipefusion import run_pipefusion

            joint, tokens, cond = model.embed(*embed_args)[:3]  # (FLUX's embed also gives its text tables)
            joint, kv = run_pipefusion(pf_blocks, state, joint, tokens, cond, kv, mesh, patches=patches, warmup=False,
                                       stacked=stacked or family.stacked, backend=attention_backend,
                                       num_layers=num_layers, text=pf_text or None)
            return model.head(joint, cond, shape).astype(jnp.float32), kv
        if forward is not None:
            pred = forward(graphdef, state, embed_args, mesh, attention_backend)
        elif staged:
            joint, tokens, cond = model.embed(*embed_args)
            joint = run_blocks(blocks, state, joint, tokens, cond, mesh, backend=attention_backend, text=text or None)
            pred = model.head(joint, cond, shape)
        else:
            from xdit_jax.parallel.attention import AttentionConfig, attention_context

            with attention_context(AttentionConfig(mesh=mesh, backend=attention_backend)):
                pred = model(*embed_args)
        return pred.astype(jnp.float32)

    # Named arguments (state, latents, embeds, ..., kv) for the compiled program's parameter names.
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    step.__signature__ = inspect.Signature([inspect.Parameter(n, positional)
                                            for n in ("state", *names, *(("kv",) if patches else ()))])
    if patches:
        return jax.jit(step, donate_argnums=(len(names) + 1,)), f"embed/run_pipefusion({patches} patches)/head"
    path = forward.__name__ if forward is not None else ("embed/run_blocks/head" if staged else "model()")
    return jax.jit(step), path


def init_random_state(cfg, dtype, seed: int = 0, sharding=None):
    """(graphdef, state) of a randomly initialised transformer (of ``cfg``'s family), made on device
    by one jitted init."""
    import jax
    from flax import nnx

    model_class = family_of_model(cfg).model_class

    def make():
        return model_class(cfg, dtype=dtype, rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=sharding)()
    return graphdef, state


def state_from_params(cfg, params: dict, dtype, sharding=None):
    """(graphdef, state) of a transformer holding ``params`` (a pure dict, e.g. from diffusers weights)."""
    import jax
    from flax import nnx

    model = family_of_model(cfg).build(cfg, params, dtype)
    graphdef, state = nnx.split(model)
    if sharding is not None:
        state = jax.device_put(state, sharding)
    return graphdef, state


def xla_cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else {}
        return float(ca.get("flops")) if ca and ca.get("flops") is not None else None
    except Exception:
        return None


def device_peak_bytes() -> int | None:
    import jax

    peaks = []
    for dev in jax.local_devices():
        try:
            stats = dev.memory_stats() or {}
        except Exception:
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def collective_summary(hlo_text: str) -> tuple[float | None, Any]:
    """(bytes per device per step, {collective: bytes}) from ``xdit_jax.parallel.comm``;
    (None, why) where that module is absent or fails (the column is then skipped)."""
    try:
        from xdit_jax.parallel import comm
    except ImportError:
        return None, "xdit_jax.parallel.comm not available"
    try:
        stats = comm.collective_stats(hlo_text)
        summary = comm.summarize(stats)
    except Exception as e:  # the accounting is another module's; never fail the benchmark on it
        return None, f"collective accounting failed: {type(e).__name__}: {e}"
    total = None
    if isinstance(summary, dict):
        nums = [v for v in summary.values() if isinstance(v, (int, float))]
        total = float(sum(nums)) if nums else None
    try:
        json.dumps(summary)
    except (TypeError, ValueError):
        summary = str(summary)
    return total, summary


_CACHE_EVENTS = {"hits": 0, "misses": 0}
_LISTENING = False


def _listen_cache_events():
    global _LISTENING
    if _LISTENING:
        return
    try:
        from jax import monitoring

        def on_event(event, **kw):
            if event == "/jax/compilation_cache/cache_hits":
                _CACHE_EVENTS["hits"] += 1
            elif event == "/jax/compilation_cache/cache_misses":
                _CACHE_EVENTS["misses"] += 1

        monitoring.register_event_listener(on_event)
        _LISTENING = True
    except Exception:
        pass


def enable_compile_cache(directory: str) -> None:
    """Persistent compilation cache in ``directory``; every executable is written (no size/time floor)."""
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _listen_cache_events()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StepOptions:
    model: str = "cpu-small"
    meshes: list = dataclasses.field(default_factory=lambda: [None])
    dtype: str | None = None  # None / "auto": bf16 on an accelerator, fp32 on CPU
    steps: int = 5
    warmup: int = 1
    compare: str | None = None  # "diffusers"
    variants: list = dataclasses.field(default_factory=list)  # extra Variant()s besides the default
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    layers: int | None = None
    batch: int = 1
    cfg: bool | None = None  # both CFG halves per prompt; None: the family's default (FLUX: one sample)
    seed: int = 0
    settle: float | None = None
    matmul_precision: str | None = None
    compile_cache: str | None = None
    compiler_options: dict = dataclasses.field(default_factory=dict)
    attention_backend: str | None = None  # None / "auto": select_attention_backend
    check: bool = True
    compile_only: bool = False  # lower and compile on abstract shapes; no weights, no timed steps
    profile: str | None = None  # folder: profile 2 more calls of our first build (jax.profiler, perfetto trace)
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)


class _Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


@dataclasses.dataclass
class _Runner:
    """One thing timed in the interleaved loop: a compiled step of ours, or the diffusers model."""

    row: dict
    call: Callable[[], Any]  # runs one step and waits for it
    timer: _Timer
    fetch: Callable[[Any], np.ndarray] = np.asarray
    times: list = dataclasses.field(default_factory=list)


def environment_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device_kind": dev.device_kind, "n_devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import flax

        info["flax"] = flax.__version__
    except Exception:
        pass
    return info


def _mesh_spec(spec):
    from xdit_jax.mesh import MeshSpec

    return MeshSpec.parse(None if spec in (None, "", "1", "single") else spec)


def run_step_benchmark(opts: StepOptions) -> list[dict]:
    """Run the step benchmark: one row (dict) per (mesh, variant) of ours, one for diffusers if compared."""
    import jax

    log = opts.log
    t_start = time.perf_counter()
    if opts.compile_cache:
        enable_compile_cache(opts.compile_cache)
    if opts.matmul_precision:
        jax.config.update("jax_default_matmul_precision", opts.matmul_precision)
    env = environment_info()
    backend = env["backend"]
    dtype_name = select_dtype(opts.dtype, backend)
    dtype = jnp_dtype(dtype_name)
    settle = default_settle_seconds(backend) if opts.settle is None else opts.settle
    opts = dataclasses.replace(opts, attention_backend=select_attention_backend(opts.attention_backend, backend,
                                                                                  dtype_name))
    w = load_workload(opts.model, height=opts.height, width=opts.width, num_frames=opts.num_frames,
                      layers=opts.layers, batch=opts.batch, cfg=opts.cfg)
    fam = w.fam
    tcfg = fam.config(w.transformer)
    shape = w.latent_shape()
    fam.check(tcfg, shape)
    flops = workload_flops(w)
    sv, st = w.tokens()
    peak, peak_src = peak_tflops(env["device_kind"], dtype_name, opts.matmul_precision)
    host_peak = peak is None and backend == "cpu" and dtype_name == "float32" and not opts.compile_only
    if host_peak:  # every simulated CPU device shares the same cores: one peak for the whole host
        peak = measure_host_sgemm_tflops()
        peak_src = "measured: host BLAS sgemm 2048^3 via numpy, best of 5 (all simulated devices together)"
    fields = fam.row_fields(w, tcfg)
    log(f"[bench] {w.name}: latents {shape}, {sv} {fam.token_word} + {st} text tokens, {fields['layers']} layers, "
        f"{dtype_name} on {env['n_devices']} x {env['device_kind']} ({backend}); "
        f"analytic {flops['total'] / 1e9:.2f} GFLOP/step")
    base = {"kind": "step", "model": w.name, "source": w.source, "dtype": dtype_name, "latent_shape": list(shape),
            **fields, "step_batch": w.step_batch, "flops_analytic": flops["total"],
            "flops_attention": flops["attention"],
            # Mochi: attention FLOPs over the caption's padding, which our masked kernel computes and the
            # analytic count (diffusers' work) leaves out; flops_hlo = flops_analytic + this on one device
            **({"flops_attention_padding": flops["attention_padding"]} if "attention_padding" in flops else {}),
            "peak_tflops": peak, "peak_source": peak_src, "settle_s": settle, "warmup": opts.warmup,
            "matmul_precision": opts.matmul_precision, "compile_cache": opts.compile_cache, **env}

    inputs = make_inputs(w, opts.seed)
    ref = params = None
    prep = _Timer()
    if opts.compare == "diffusers" and opts.compile_only:
        raise ValueError("compile-only runs nothing, so there is nothing to compare with diffusers.")
    if opts.compare == "diffusers":
        with prep.stage("init_weights"):
            ref = fam.torch_reference(w.transformer, dtype_name, seed=opts.seed)
            params = fam.params_from_torch(ref.state_dict_np, tcfg, dtype=dtype)
            ref.state_dict_np = None
        with prep.stage("to_device"):
            ref.set_inputs(inputs, w)
    elif opts.compare not in (None, "", "none"):
        raise ValueError(f"compare={opts.compare!r}: only 'diffusers' is supported.")

    variants = [Variant(compiler_options=dict(opts.compiler_options))] + list(opts.variants)
    runners: list[_Runner] = []
    rows: list[dict] = []
    weights: dict = {}  # by mesh: the variants of one mesh share one copy of the weights
    for spec in opts.meshes:
        ms = _mesh_spec(spec)
        for var in variants:
            row = dict(base, impl=var.label, mesh=str(ms), mesh_devices=ms.size,
                       attention_backend="xla" if var.attention else (var.attention_backend or opts.attention_backend),
                       compiler_options=var.compiler_options or None, attention_variant=var.attention,
                       linear_variant=var.linear, scan_variant=var.scan)
            try:
                runners.append(_prepare_ours(row, tcfg, dtype, ms, var, inputs, params, opts,
                                             family=fam, attention_tokens=fam.attention_tokens(w),
                                             text_tokens=fam.kv_text_tokens(w), weights=weights))
            except Exception as e:  # e.g. a mesh the engine cannot run yet: report it, go on
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"[bench] {row['mesh']} {var.label}: skipped ({row['error'].splitlines()[0][:200]})")
                rows.append(row)
    if opts.compile_only:
        for r in runners:
            r.row["stages_s"] = {k: round(v, 4) for k, v in r.timer.stages.items()}
            r.row["xla_peak_bytes"] = (r.row.get("xla_memory") or {}).get("peak_estimate_bytes")
            r.row["peak_memory_bytes"] = r.row["xla_peak_bytes"]
            r.row["peak_memory_source"] = "xla_memory_analysis"
            r.row["total_run_s"] = time.perf_counter() - t_start
            rows.append(r.row)
        return rows
    if ref is not None:
        row = dict(base, impl="diffusers", mesh=f"torch {ref.device}", mesh_devices=1, attention_backend="sdpa",
                   torch=ref.torch.__version__, torch_threads=ref.torch.get_num_threads())
        try:
            import diffusers

            row["diffusers"] = diffusers.__version__
        except Exception:
            pass
        t = _Timer()
        t.stages.update(prep.stages)
        runners.append(_Runner(row=row, call=ref, timer=t, fetch=ref.to_numpy))

    # Warm-up (the first call is its own stage), the output check, then the interleaved timed loop.
    first = {}
    for r in runners:
        with r.timer.stage("first_call"):
            first[id(r)] = r.fetch(r.call())
        for _ in range(max(opts.warmup - 1, 0)):
            r.call()
        time.sleep(settle)
    if opts.check and ref is not None:
        ref_runner = runners[-1]
        want = first[id(ref_runner)].astype(np.float32)
        ref_runner.row["ref_abs_max"] = float(np.abs(want).max())
        for r in runners[:-1]:
            got = first[id(r)].astype(np.float32)
            r.row["max_abs_diff_vs_diffusers"] = float(np.abs(got - want).max())
            log(f"[bench] check {r.row['mesh']} {r.row['impl']}: max |ours - diffusers| = "
                f"{r.row['max_abs_diff_vs_diffusers']:.3e} (max |diffusers| = {np.abs(want).max():.3f})")
    first.clear()
    log(f"[bench] timing {opts.steps} steps x {len(runners)} runners, interleaved (settle {settle}s)")
    for i in range(opts.steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):  # ABBA order cancels slow drift
            t0 = time.perf_counter()
            r.call()
            r.times.append(time.perf_counter() - t0)
            time.sleep(settle)
        log(f"[bench] step {i + 1}/{opts.steps}: " + ", ".join(f"{r.row['impl']}@{r.row['mesh']} {r.times[-1]:.3f}s"
                                                           for r in runners))
    if opts.profile and runners and runners[0].call is not ref:
        _profile(runners[0], opts.profile, log)
    ref_runner = runners[-1] if ref is not None else None
    for r in runners:
        row = r.row
        s = summarize_times(r.times)
        row["step_times_s"] = [round(x, 6) for x in r.times]
        row.update({f"step_{k}_s": v for k, v in s.items() if k != "n"})
        row["steps_timed"] = s.get("n", 0)
        r.timer.stages["timed_steps"] = sum(r.times)
        row["stages_s"] = {k: round(v, 4) for k, v in r.timer.stages.items()}
        med = s.get("median")
        row["tflops_achieved"] = flops["total"] / med / 1e12 if med else None
        on_cpu_torch = row["impl"] == "diffusers" and ref.device == "cpu"
        devices = 1 if host_peak else row.get("mesh_devices", 1)
        row["fraction_of_peak"] = None if on_cpu_torch and not host_peak else fraction_of_peak(
            flops["total"], med, peak, devices)
        if ref_runner is not None and r is not ref_runner and med:
            row["ratio_vs_diffusers"] = med / statistics.median(ref_runner.times)
            pairs = [a / b for a, b in zip(r.times, ref_runner.times) if b > 0]
            row["ratio_vs_diffusers_paired_median"] = statistics.median(pairs) if pairs else None
        rows.append(row)
    peak_dev = device_peak_bytes()
    for row in rows:
        if row["impl"] != "diffusers" and "error" not in row:
            row["peak_device_bytes"] = peak_dev
            xla_peak = (row.get("xla_memory") or {}).get("peak_estimate_bytes")
            row["peak_memory_bytes"] = peak_dev if peak_dev is not None else xla_peak
            row["peak_memory_source"] = "device_memory_stats" if peak_dev is not None else "xla_memory_analysis"
        row["host_peak_rss_bytes"] = host_peak_rss_bytes()
        row["total_run_s"] = time.perf_counter() - t_start
    return rows


def _profile(runner, folder: str, log, calls: int = 2) -> None:
    """Trace ``calls`` more calls of ``runner`` into ``folder``; put the device-time summary in its row."""
    import jax

    from xdit_jax import trace_summary

    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(calls):
            runner.call()
    summary = trace_summary.summarize(trace_summary.load_events(trace_summary.find_trace(folder)), calls)
    runner.row["profile"] = {"folder": folder, "calls": calls, **{k: summary[k] for k in
                             ("device_s_per_step", "categories")}, "top": summary["top"][:30]}
    log("[bench] profile of " + f"{runner.row['impl']}@{runner.row['mesh']}:\n" + trace_summary.format_summary(summary))


def _stage_shardings(tcfg, dtype, stage, repl):
    """Shardings for a transformer state under PipeFusion: ``stage`` for the stacked blocks, ``repl`` else."""
    import jax
    from flax import nnx

    from xdit_jax.parallel.pipefusion import stack_names, starts_with

    fam = family_of_model(tcfg)
    _, state = nnx.split(nnx.eval_shape(lambda: fam.model_class(tcfg, dtype=dtype, rngs=nnx.Rngs(0))))
    names = stack_names(fam.stacks(tcfg))
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: stage if any(starts_with(kp, name) for name in names) else repl, state)


def _prepare_ours(row: dict, tcfg, dtype, ms, var: Variant, inputs: dict, params, opts: StepOptions, *,
                  family: Family | None = None, attention_tokens: int | None = None,
                  text_tokens: int | None = None, weights: dict | None = None) -> _Runner:
    """Weights and inputs on the mesh, the step lowered and compiled; the row filled with what that tells.
    ``attention_tokens``: the self-attention's sequence length (PipeFusion's K/V buffers); ``text_tokens``:
    a two-stream model's text (sliced with PipeFusion's patches where the family says); ``weights``: the
    states placed so far by mesh, shared by the variants of one mesh (filled here)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from xdit_jax.mesh import build_mesh

    family = family or family_of_model(tcfg)
    weights = {} if weights is None else weights
    names = tuple(k for k in inputs if k not in family.host_inputs)
    host = {k: inputs[k] for k in family.host_inputs if k in inputs}

    b = inputs["latents"].shape[0]
    if b % (ms.data * ms.cfg):  # before the inputs are placed (which would fail with a sharding error)
        raise ValueError(f"A step batch of {b} cannot be split over data x cfg = {ms.data * ms.cfg} devices (--batch; "
                         f"--cfg for both CFG halves where the family runs one sample per prompt by default).")

    timer = _Timer()
    mesh = build_mesh(ms) if ms.size > 1 else None
    repl = NamedSharding(mesh, P()) if mesh is not None else None
    patches = stage_tree = None
    layers, slots_of = tcfg.num_layers, {}
    if ms.pipefusion > 1 and family.pipefusion_refused:
        raise ValueError(f"{family.title} does not run with PipeFusion ({family.pipefusion_refused}).")
    if ms.pipefusion > 1:  # the stacked blocks split over the stages; a patched step (as many patches as stages)
        from xdit_jax.parallel import pipefusion

        pipefusion.check_mesh(ms, family.stacked_layers(tcfg))
        patches = ms.pipefusion
        layers = pipefusion.stack_slots(family.stacked_layers(tcfg), ms.pipefusion)  # padded to equal stages
        row["pipefusion_patches"], row["pipefusion_layer_slots"] = patches, layers[0] if len(layers) == 1 \
            else list(layers)
        slots_of = dict(zip(pipefusion.stack_names(family.stacks(tcfg)), layers))
        stage_tree = _stage_shardings(tcfg, dtype, NamedSharding(mesh, P(pipefusion.AXIS)), repl)
    if opts.compile_only:  # shapes only: nothing allocated, nothing run (full-size models on a small host)
        from flax import nnx

        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: family.model_class(tcfg, dtype=dtype, rngs=nnx.Rngs(0))))
        shardings = stage_tree if patches else jax.tree.map(lambda _: repl, state)

        def abstract(kp, a, sh):
            name = next((n for n in slots_of if pipefusion.starts_with(kp, n)), None) if patches else None
            return jax.ShapeDtypeStruct(((slots_of[name],) + a.shape[1:]) if name else a.shape, a.dtype,
                                        sharding=sh)

        state = jax.tree_util.tree_map_with_path(abstract, state, shardings)
        args = tuple(jax.ShapeDtypeStruct(inputs[k].shape, inputs[k].dtype,
                                          sharding=batch_sharding(mesh, inputs[k].ndim) if mesh is not None else None)
                     for k in names)
    else:
        with timer.stage("init_weights"):
            if str(ms) in weights:  # another variant on this mesh: the same weights, one copy on the devices
                graphdef, state = weights[str(ms)]
            elif params is not None:  # the diffusers model's weights
                graphdef, state = state_from_params(tcfg, params, dtype, repl)
            else:
                graphdef, state = init_random_state(tcfg, dtype, opts.seed, repl)
            if patches and str(ms) not in weights:  # split (and, for uneven stages, pad) the stacked blocks
                state = pipefusion.pad_stack(state, family.stacks(tcfg), ms.pipefusion, stage_tree)
            jax.block_until_ready(state)
            weights[str(ms)] = graphdef, state
        with timer.stage("to_device"):
            if mesh is not None:
                args = tuple(jax.device_put(inputs[k], batch_sharding(mesh, inputs[k].ndim)) for k in names)
            else:
                args = tuple(jax.device_put(inputs[k]) for k in names)
            jax.block_until_ready(args)
    from xdit_jax.parallel import pipefusion

    step, row["step_path"] = build_step(graphdef, mesh, dtype, row["attention_backend"], patches,
                                        family.stacked_layers(tcfg), family=family, stacked=family.stacks(tcfg),
                                        input_names=names, text=family.text_keys(tcfg),
                                        pf_text=family.text_keys(tcfg) if pipefusion.slices_text(mesh) else (),
                                        host_inputs=host)
    if patches:  # PipeFusion's K/V buffers: an argument (donated, given back by each step)
        lat = inputs["latents"].shape
        seq = attention_tokens
        if seq is None:  # CogVideoX: joint attention over text + video tokens
            pt = tcfg.patch_size_t or 1
            seq = inputs["embeds"].shape[1] + lat[1] // pt * (lat[3] // tcfg.patch_size) * (lat[4] // tcfg.patch_size)
        kv = family.pipefusion_cache(tcfg, mesh, layers, lat, seq, dtype, patches, opts.compile_only)
        if kv is None:
            kv = pipefusion.init_cache(mesh, layers, lat[0], seq, tcfg.num_attention_heads,
                                       tcfg.attention_head_dim, dtype, patches,
                                       tail=family.final_block, abstract=opts.compile_only,
                                       **family.stack_attentions(tcfg), text_len=text_tokens
                                       if family.text_keys(tcfg) and pipefusion.slices_text(mesh) else None)
        args = args + (kv,)
    misses0, hits0 = _CACHE_EVENTS["misses"], _CACHE_EVENTS["hits"]
    if var.scan == "unstacked":  # the stacks' weights as separate per-layer arrays (a copy for this variant)
        if patches:
            raise ValueError(f"variant {var.label}: scan=unstacked runs without PipeFusion (its stages split stacks).")
        from xdit_jax.models.layers import unstack_layers

        state = unstack_layers(state, family.stacks(tcfg))
    with timer.stage("lower"), attention_override(var.attention), linear_override(var.linear), \
            scan_override(var.scan):
        lowered = step.lower(state, *args)
    with timer.stage("compile"):
        compiled = lowered.compile(compiler_options=var.compiler_options) if var.compiler_options \
            else lowered.compile()
    if opts.compile_cache:
        seen = _CACHE_EVENTS["hits"] + _CACHE_EVENTS["misses"] > hits0 + misses0
        row["compile_cache_hit"] = (_CACHE_EVENTS["hits"] > hits0) if seen else None
    row["lower_s"], row["compile_s"] = timer.stages["lower"], timer.stages["compile"]
    try:
        hlo = compiled.as_text()
    except Exception:
        hlo = ""
    row["flops_hlo"] = hlo_matmul_flops(hlo) if hlo else None
    row["flops_xla_cost_analysis"] = xla_cost_flops(compiled)
    row["xla_memory"] = memory_analysis_bytes(compiled)
    row["collective_bytes"], row["collectives"] = collective_summary(hlo) if hlo else (None, None)
    opts.log(f"[bench] {row['mesh']} {row['impl']}: lower {row['lower_s']:.2f}s, compile {row['compile_s']:.2f}s"
             f"{' (persistent cache hit)' if row.get('compile_cache_hit') else ''}")

    live = list(args)

    def call():
        out = compiled(state, *live)
        if patches:  # PipeFusion: the K/V buffers were donated; the next step takes the returned ones
            out, live[-1] = out
        jax.block_until_ready(out)
        return out

    return _Runner(row=row, call=call, timer=timer)


# --------------------------------------------------------------------------------------------
# End to end: the pipeline's own stage timings (text encoding, denoising, decoding)
# --------------------------------------------------------------------------------------------

def pipeline_configs(w: Workload, folder: str | os.PathLike, text_layers: int | None = None) -> Path:
    """Write into ``folder`` the configs of the workload's whole pipeline, for ``Pipeline.from_config``: its
    configs folder's JSON files (xdit_jax.tiny's for the tiny presets) with the workload's transformer config
    (its layers, its sizes) and, with ``text_layers``, every T5 encoder cut to that many layers."""
    import shutil

    from xdit_jax import tiny
    from xdit_jax.conversion import model_components

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if w.folder is None and w.family == "wan_vace":  # xdit_jax.tiny's Wan VACE folder (WanVACEPipeline)
        tiny.write_wan_vace_configs(folder)
        (folder / "transformer" / "config.json").write_text(json.dumps(w.transformer, indent=2))
    elif w.folder is None:
        tiny.write_configs(folder, w.defaults.get("tiny_family", w.family), w.transformer)
    else:
        src = Path(w.folder)
        if not (src / "model_index.json").exists():
            raise FileNotFoundError(f"{src}: end to end needs the whole pipeline's configs (model_index.json, "
                                    f"each component's config.json, the scheduler's); it has no model_index.json.")
        for f in src.rglob("*.json"):
            (folder / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, folder / f.relative_to(src))
        (folder / "transformer" / "config.json").write_text(json.dumps(w.transformer, indent=2))
    if text_layers:
        for name, cls in model_components(folder).items():
            if cls in ("T5EncoderModel", "UMT5EncoderModel"):
                path = folder / name / "config.json"
                path.write_text(json.dumps(dict(read_json(path), num_layers=int(text_layers)), indent=2))
    return folder


def build_random_pipeline(w: Workload, dtype_name: str, mesh=None, seed: int = 0, text_layers: int | None = None,
                          attention_backend: str = "xla"):
    """The workload's pipeline (its family's) with random weights (``Pipeline.from_config`` of
    :func:`pipeline_configs`; small stand-in tokenizers)."""
    import tempfile

    from xdit_jax.pipelines import pipeline_class
    from xdit_jax.pipelines.denoise import pipeline_class_name

    with tempfile.TemporaryDirectory(prefix="xdit_jax_e2e_") as tmp:
        folder = pipeline_configs(w, tmp, text_layers)
        cls = pipeline_class(pipeline_class_name(folder))
        return cls.from_config(folder, seed=seed, mesh=mesh, dtype=dtype_name, attention_backend=attention_backend)


def run_e2e_benchmark(opts: StepOptions, steps: int, text_layers: int | None = None) -> list[dict]:
    """The pipeline called twice (cold: compiles; warm) with ``steps`` denoising steps; its stage times."""
    import jax

    log = opts.log
    env = environment_info()
    dtype_name = select_dtype(opts.dtype, env["backend"])
    w = load_workload(opts.model, height=opts.height, width=opts.width, num_frames=opts.num_frames,
                      layers=opts.layers, batch=opts.batch, cfg=opts.cfg)
    spec = opts.meshes[0] if opts.meshes else None
    ms = _mesh_spec(spec)
    attention_backend = select_attention_backend(opts.attention_backend, env["backend"], dtype_name)
    call = w.fam.pipeline_call(w)
    row = {"kind": "e2e", "model": w.name, "family": w.family, "impl": "xdit_jax pipeline", "mesh": str(ms),
           "dtype": dtype_name, "height": w.height, "width": w.width, "num_frames": w.num_frames,
           "num_inference_steps": steps, "text_layers": text_layers,
           "call": {k: f"array{tuple(v.shape)} {v.dtype}" if isinstance(v, np.ndarray) else v for k, v in call.items()},
           "attention_backend": attention_backend, **env}
    try:
        t0 = time.perf_counter()
        pipe = build_random_pipeline(w, dtype_name, mesh=None if ms.size == 1 else str(ms), seed=opts.seed,
                                     text_layers=text_layers, attention_backend=attention_backend)
        w.fam.prepare_pipeline(pipe, w)
        row["build_s"] = time.perf_counter() - t0
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            out = pipe(prompt=["A small dog running on a beach at sunset."] * w.batch, num_inference_steps=steps,
                       seed=opts.seed, progress=False, **call)
            row[f"{label}_total_s"] = time.perf_counter() - t0
            row[f"{label}_stages_s"] = {k: round(v, 4) for k, v in out.timings.items()}
            row[f"{label}_stages_s"]["other"] = round(row[f"{label}_total_s"] - sum(out.timings.values()), 4)
            log(f"[bench] e2e {label}: {row[f'{label}_total_s']:.2f}s " +
                ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items()))
        result = out.frames if hasattr(out, "frames") else out.images
        row["output_shape"] = list(result.shape)
        row["peak_memory_bytes"] = getattr(out, "peak_memory_bytes", None) or device_peak_bytes()
        row["host_peak_rss_bytes"] = host_peak_rss_bytes()
        warm = row["warm_stages_s"]
        if warm.get("denoising") and steps:
            row["warm_denoising_per_step_s"] = warm["denoising"] / steps
        jax.block_until_ready(result)
    except Exception as e:  # the pipeline is evolving; report and go on
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"[bench] e2e: failed ({row['error'].splitlines()[0][:200]})")
    return [row]


def format_e2e(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"end to end ({r['model']}, {r['mesh']}): failed: {r['error'].splitlines()[0][:150]}")
            continue
        size = f"{r['height']}x{r['width']}" if r.get("num_frames", 1) == 1 else \
            f"{r['num_frames']}x{r['height']}x{r['width']}"
        out.append(f"end to end ({r['model']}, {size}, "
                   f"{r['num_inference_steps']} steps, {r['dtype']}, {r['mesh']}; build {r['build_s']:.2f}s):")
        for label in ("cold", "warm"):
            st = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{label}_stages_s"].items())
            out.append(f"  {label}: total {r[f'{label}_total_s']:.2f}s ({st})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_flops(x) -> str:
    if not x:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    """A readable table of the rows (the JSON lines hold everything)."""
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    if "bert_tokens" in r0:  # HunyuanDiT: image tokens self-attend, the two texts are cross-attended
        tokens = (f"{r0['image_tokens']} image + {r0['bert_tokens']} BERT + {r0['t5_tokens']} mT5 tokens "
                  f"({r0['bert_valid_tokens']} / {r0['t5_valid_tokens']} in the prompt's masks)")
    elif r0.get("family") in ("flux", "flux2"):  # FLUX: [text; image] in every attention of both block phases
        text = "T5" if r0["family"] == "flux" else "Qwen3"
        tokens = (f"{r0['image_tokens']} image + {r0['text_tokens']} {text} tokens "
                  f"({r0['double_layers']} double- + {r0['single_layers']} single-stream blocks, "
                  f"{'true CFG' if r0.get('true_cfg') else 'one sample per prompt'})")
    elif r0.get("family") == "qwenimage":  # Qwen-Image: [text; image] in every attention, the text a masked context
        cond = r0.get("condition_tokens")
        tokens = (f"{r0['image_tokens']} image{f' (of them {cond} condition-image)' if cond else ''} + "
                  f"{r0['text_tokens']} Qwen2.5-VL tokens "
                  f"({'true CFG: the negative half masked to 1' if r0.get('true_cfg') else 'one sample per prompt'})")
    elif r0.get("family") == "sd3":  # SD3: the image tokens and the whole text (no mask) in one joint attention
        tokens = (f"{r0['image_tokens']} image + {r0['text_tokens']} text tokens "
                  f"({r0['text_tokens'] - r0['t5_tokens']} CLIP + {r0['t5_tokens']} T5, no mask)")
    elif r0.get("family") == "mochi":  # Mochi: the video tokens and the (masked) caption in one joint attention
        tokens = (f"{r0['video_tokens']} video + {r0['text_tokens']} caption tokens "
                  f"({r0['text_valid_tokens']} in the prompt's mask)")
    elif r0.get("family") in ("wan", "skyreels_v2", "wan_vace"):  # the video tokens self-attend, the caption is
        # cross-attended
        tokens = (f"{r0['video_tokens']} video + {r0['text_tokens']} caption tokens "
                  f"({r0['text_valid_tokens']} of the prompt's, the rest zeros, cross-attended)")
        if r0.get("diffusion_forcing"):  # SkyReels-V2 DF
            tokens += (f", a timestep per latent frame, causal blocks of {r0['causal_block']} frames"
                       if r0.get("causal_block", 1) > 1 else ", a timestep per latent frame")
        if r0.get("image_tokens"):  # Wan 2.1 I2V / FLF2V
            tokens += f" + {r0['image_tokens']} CLIP image states (cross-attended)"
        if r0.get("vace_layers"):  # Wan VACE: the control tokens through their own blocks
            tokens += (f"; {len(r0['vace_layers'])} VACE blocks on as many {r0['control_channels']}-channel control "
                       f"tokens")
    elif r0.get("family") == "hidream":  # HiDream-I1: [T5; Llama] text stream, a Llama layer per block
        tokens = (f"{r0['image_tokens']} image + {r0['t5_tokens']} T5 + {r0['llama_tokens']} Llama tokens "
                  f"({r0['double_layers']} double- + {r0['single_layers']} single-stream blocks, each with a Llama "
                  f"layer's {r0['llama_tokens']} more; MoE {r0['routed_experts']} experts run densely, "
                  f"{r0['active_experts']} active)")
    elif r0.get("family") == "cosmos":  # the video tokens self-attend, the caption is cross-attended
        tokens = (f"{r0['video_tokens']} video + {r0['text_tokens']} T5 tokens ({r0['text_valid_tokens']} of the "
                  f"prompt's, the rest zeros, cross-attended"
                  f"{'; a timestep per latent frame, the first conditioned' if r0.get('video_to_world') else ''})")
    elif r0.get("family") == "longcat_image":  # FLUX's two block phases, the Qwen2.5-VL text
        tokens = (f"{r0['image_tokens']} image + {r0['text_tokens']} Qwen2.5-VL tokens ({r0['double_layers']} "
                  f"double- + {r0['single_layers']} single-stream blocks, {'CFG' if r0.get('cfg') else 'no CFG'})")
    elif r0.get("family") == "sana_video":  # linear self-attention over the video tokens, the caption cross-attended
        tokens = (f"{r0['video_tokens']} video + {r0['text_tokens']} caption tokens "
                  f"({r0['text_valid_tokens']} in the prompt's mask)")
    elif "image_tokens" in r0:  # PixArt: image tokens self-attend, the caption is cross-attended
        tokens = (f"{r0['image_tokens']} image + {r0['text_tokens']} caption tokens "
                  f"({r0['text_valid_tokens']} in the prompt's mask)")
    else:
        tokens = f"{r0['video_tokens']}+{r0['text_tokens']} tokens"
    head = (f"model {r0['model']} ({r0.get('source', '')}): latents {tuple(r0['latent_shape'])}, "
            f"{tokens}, {r0['layers']} layers, {r0['dtype']}, "
            f"{r0['backend']} {r0['device_kind']} x{r0['n_devices']}, attention {r0.get('attention_backend')}\n"
            f"FLOP/step analytic {_fmt_flops(r0['flops_analytic'])} "
            f"(attention {r0['flops_attention'] / r0['flops_analytic']:.0%}); "
            f"peak: {_fmt(r0['peak_tflops'], '.3g')} TFLOP/s ({r0['peak_source']})")
    cols = ["mesh", "impl", "compile s", "step med s", "[min, max]", "IQR s", "vs diffusers", "TFLOP/s", "%peak",
            "HLO FLOP", "peak mem", "coll/step"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["mesh"], r["impl"], "skipped: " + r["error"].splitlines()[0][:70]] + [""] * 9)
            continue
        ratio = r.get("ratio_vs_diffusers")
        lines.append([
            r["mesh"], r["impl"], _fmt(r.get("compile_s"), ".2f"), _fmt(r.get("step_median_s")),
            f"[{_fmt(r.get('step_min_s'))}, {_fmt(r.get('step_max_s'))}]", _fmt(r.get("step_iqr_s")),
            f"{ratio:.2f}x" if ratio else "-", _fmt(r.get("tflops_achieved"), ".3f"),
            f"{r['fraction_of_peak']:.1%}" if r.get("fraction_of_peak") else "-",
            _fmt_flops(r.get("flops_hlo")),
            _fmt_bytes(r.get("peak_memory_bytes")) + (" (xla)" if r.get("peak_memory_source") == "xla_memory_analysis"
                                                     and r.get("peak_memory_bytes") else ""),
            _fmt_bytes(r.get("collective_bytes")) if r.get("collective_bytes") is not None else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines)]
    out = [head, "  ".join(c.ljust(wd) for c, wd in zip(cols, widths)),
           "  ".join("-" * wd for wd in widths)]
    out += ["  ".join(str(x).ljust(wd) for x, wd in zip(line, widths)).rstrip() for line in lines]
    notes = []
    for r in rows:
        bits = []
        if r.get("stages_s"):
            bits.append("stages " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items()))
        if r.get("max_abs_diff_vs_diffusers") is not None:
            bits.append(f"max |ours - diffusers| {r['max_abs_diff_vs_diffusers']:.2e}")
        if r.get("ratio_vs_diffusers_paired_median") is not None:
            bits.append(f"median per-step ratio {r['ratio_vs_diffusers_paired_median']:.3f}")
        if r.get("compile_cache_hit") is not None:
            bits.append(f"persistent cache {'hit' if r['compile_cache_hit'] else 'miss'}")
        if r.get("flops_xla_cost_analysis"):
            bits.append(f"XLA cost_analysis {_fmt_flops(r['flops_xla_cost_analysis'])} (loop bodies once)")
        if bits:
            notes.append(f"  {r['mesh']} / {r['impl']}: " + "; ".join(bits))
    if notes:
        out += ["per row (seconds):"] + notes
    return "\n".join(out)


def json_lines(rows: list[dict]) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    return "\n".join(json.dumps(r, default=default, sort_keys=False) for r in rows)
