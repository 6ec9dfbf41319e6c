"""Qwen2.5-VL's vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel``) and its image preprocessing
(transformers ``Qwen2VLImageProcessorPil``), in Flax NNX and numpy: Qwen-Image-Edit's text encoder sees the input
image through it.

The model, as transformers 5.23:

* the patch embedding: a Conv3d over (temporal_patch_size, patch, patch) with stride = kernel and no bias, on
  pixels the processor already cut into patches, so it is one matmul (the Conv3d weight read as a kernel of
  (T, P, P, C, E) and flattened);
* the 2-D rotary embedding: each patch's (row, column) in its image's patch grid, laid out block-major over the
  ``spatial_merge_size`` x ``spatial_merge_size`` merge blocks; ``head_dim / 4`` frequencies of ``theta`` (10000)
  per axis, [rows; columns] concatenated, then repeated twice (rotate-half over the whole head);
* the window permutation: the merge units (``merge^2`` patches each) reordered window by window (windows of
  ``window_size / patch / merge`` units per side, edge windows smaller) — transformers'
  ``get_vision_window_index``; the rotary tables follow the same permutation;
* the blocks: pre-norm (RMSNorm, eps 1e-6) attention with one fused qkv (bias), and a SwiGLU MLP with biases; the
  blocks in ``fullatt_block_indexes`` attend over each image (each frame of it), the others within their window
  only. Here both are one op, :func:`segment_attention`: the sequence gathered into padded segments (windows or
  images), softmax attention inside each with the padded keys masked, scattered back;
* the merger: RMSNorm, ``merge^2`` neighbouring patches (consecutive in the sequence) concatenated, Linear - GELU
  (exact) - Linear to ``out_hidden_size``; then the inverse window permutation: the output is one row per merge
  unit in the processor's (image, block-row, block-column) order.

The layout (positions, permutation, segments) depends only on the images' grids and is computed in numpy
(:func:`vision_layout`); the jitted forward takes it as arrays.

The preprocessing (:func:`preprocess`), as ``Qwen2VLImageProcessorPil`` (transformers' default without torchvision,
and what diffusers' pipelines run here): ``smart_resize`` to multiples of ``patch * merge`` within
[min_pixels, max_pixels], a PIL bicubic resize of the RGB uint8 image, ``x / 255``, normalized with the CLIP mean /
std, the frame repeated ``temporal_patch_size`` times and cut into (C, T, P, P) patches in the merge-block order.
No torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import RMSNorm, linear, stack_modules

STACKED = "blocks"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """A ``Qwen2_5_VLConfig`` dict (its ``vision_config``) or a vision config dict; the older key names
        (``in_chans``, ``spatial_patch_size``) too."""
        v = d.get("vision_config", d)
        v = dict(v)
        if "in_chans" in v and "in_channels" not in v:
            v["in_channels"] = v["in_chans"]
        if "spatial_patch_size" in v and "patch_size" not in v:
            v["patch_size"] = v["spatial_patch_size"]
        if "num_attention_heads" in v and "num_heads" not in v:
            v["num_heads"] = v["num_attention_heads"]
        if "num_hidden_layers" in v and "depth" not in v:
            v["depth"] = v["num_hidden_layers"]
        rp = v.get("rope_parameters") or {}
        if rp.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"Qwen2.5-VL vision rope type {rp.get('rope_type')!r} is not supported (axial only).")
        kw = {f.name: v[f.name] for f in dataclasses.fields(cls) if f.name in v}
        kw["fullatt_block_indexes"] = tuple(int(i) for i in v.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        kw["rope_theta"] = float(rp.get("rope_theta", v.get("rope_theta", cls.rope_theta)))
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kw.get(key), (list, tuple)):
                raise ValueError(f"{key}={kw[key]}: only a square / scalar patch size is supported.")
        cfg = cls(**kw)
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r}: Qwen2.5-VL's vision MLP is SiLU-gated; only 'silu'.")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads}: the head size must be a "
                             "multiple of 4 (2-D rotary over half-heads).")
        if cfg.window_size % (cfg.patch_size * cfg.spatial_merge_size):
            raise ValueError(f"window_size {cfg.window_size} must be a multiple of patch_size x spatial_merge_size.")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


# ----- the image preprocessing (numpy + PIL) -----

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """transformers' ``smart_resize``: (height, width) multiples of ``factor`` with the aspect ratio kept as closely as
    possible and the area in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """The image processor's settings (``processor/preprocessor_config.json``; transformers' defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessorConfig:
        d = dict(d.get("image_processor", d))
        size = d.get("size") or {}
        kw = {}
        mn = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        mx = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if mn is not None:
            kw["min_pixels"] = int(mn)
        if mx is not None:
            kw["max_pixels"] = int(mx)
        for k in ("patch_size", "temporal_patch_size", "merge_size"):
            if k in d:
                kw[k] = int(d[k])
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(float(x) for x in d[k])
        if d.get("do_resize") is False or d.get("do_rescale") is False or d.get("do_normalize") is False:
            raise ValueError("An image processor with do_resize / do_rescale / do_normalize off is not supported.")
        return cls(**kw)


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"An image must be a PIL image or an (H, W, 3) array; got shape {a.shape}.")
    if a.dtype != np.uint8:  # floats in [0, 1], as the pipelines' arrays
        a = np.clip(np.round(a.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(a[..., :3])


def preprocess(image, cfg: ProcessorConfig = ProcessorConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values (grid_h * grid_w, C * T * P * P) float32, grid (1, grid_h, grid_w)), as
    ``Qwen2VLImageProcessorPil``."""
    from PIL import Image

    img = _to_pil(image)
    factor = cfg.patch_size * cfg.merge_size
    h, w = smart_resize(img.height, img.width, factor, cfg.min_pixels, cfg.max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(img).astype(np.float64) * (1 / 255)  # transformers' rescale (float64), then float32
    x = x.astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # (C, H, W)
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * t * p * p), np.float32), (1, gh, gw)


# ----- the layout (numpy) -----

def _segments(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous segments [bounds[i], bounds[i+1]) of a sequence -> (gather index (S, Wmax) int32, valid (S, Wmax)
    bool, scatter index (N,) int32: token -> its slot in the flattened (S * Wmax))."""
    starts, ends = bounds[:-1], bounds[1:]
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    wmax = int((ends - starts).max())
    off = np.arange(wmax)[None]
    idx = starts[:, None] + off
    valid = idx < ends[:, None]
    inv = np.concatenate([s * wmax + np.arange(e - b) for s, (b, e) in enumerate(zip(starts, ends))])
    return np.where(valid, idx, 0).astype(np.int32), valid, inv.astype(np.int32)


def vision_layout(grids, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """The arrays the forward needs for images of patch grids ``grids`` ((t, h, w) each), as transformers'
    ``get_vision_position_ids`` / ``get_vision_window_index`` / ``get_vision_cu_seqlens``: ``cos``, ``sin``
    (N, head_dim) in the window order; ``perm`` (N,) the window order of the patches; ``unperm`` (N / merge^2,)
    the inverse of the merge units' permutation; ``full_*`` / ``win_*``: :func:`_segments` of the images' frames
    and of the windows."""
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size
    pos, window_index, cu_win, offset = [], [], [0], 0
    frame_lens = []
    for t, h, w in (tuple(int(v) for v in g) for g in grids):
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: height and width must be multiples of spatial_merge_size {m}.")
        hp, wp = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hp = hp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        wp = wp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
        frame_lens += [h * w] * t
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = win - lh % win, win - lw % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = np.full((t, lh + ph, lw + pw), -100, np.int64)
        padded[:, :lh, :lw] = index
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu_win += list(np.cumsum(seqlens) * unit + cu_win[-1])
        offset += t * lh * lw
    pos = np.concatenate(pos)
    window_index = np.concatenate(window_index)
    cu_win = np.asarray(cu_win)
    cu_full = np.concatenate([[0], np.cumsum(frame_lens)])
    perm = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    # rotary: transformers' float32 inverse frequencies of head_dim / 2, (h, w) concatenated, repeated twice
    half = cfg.head_dim // 2
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, half, 2, dtype=np.float32)
                                                             / np.float32(half)))).astype(np.float32)
    freqs = pos[:, :, None].astype(np.float32) * inv[None, None]  # (N, 2, half / 2)
    freqs = np.concatenate([freqs[:, 0], freqs[:, 1]], -1)
    freqs = np.concatenate([freqs, freqs], -1)[perm]
    out = {"cos": np.cos(freqs.astype(np.float64)).astype(np.float32),
           "sin": np.sin(freqs.astype(np.float64)).astype(np.float32),
           "perm": perm.astype(np.int32), "unperm": np.argsort(window_index).astype(np.int32)}
    for name, bounds in (("full", cu_full), ("win", cu_win)):
        idx, valid, inv_idx = _segments(bounds)
        out[f"{name}_idx"], out[f"{name}_valid"], out[f"{name}_inv"] = idx, valid, inv_idx
    return out


# ----- the model -----

def _rotate(x, cos, sin):
    """transformers' ``apply_rotary_pos_emb_vision`` in float32: x (N, H, D), cos/sin (N, D)."""
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


# Queries per step of a segment's attention where segments are longer: the full-attention blocks' segment is a whole
# image (Qwen-Image-Edit's at 1024^2: 5,476 patches, 16 heads: 1.9 GB of float32 scores at once; 0.36 GB a chunk).
SEGMENT_QUERY_CHUNK = 1024


def _attend(qs, ks, vs, valid):
    """(S, Q, H, D) queries on (S, W, H, D) keys / values of their segments, keys masked by ``valid`` (S, W)."""
    scores = jnp.einsum("sqhd,skhd->shqk", qs, ks, preferred_element_type=jnp.float32) * (qs.shape[-1] ** -0.5)
    scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(vs.dtype)
    return jnp.einsum("shqk,skhd->sqhd", probs, vs)


def segment_attention(q, k, v, idx, valid, inv, query_chunk: int = SEGMENT_QUERY_CHUNK):
    """Softmax attention of (N, H, D) q/k/v within contiguous segments (:func:`_segments`' arrays); fp32 scores,
    over chunks of ``query_chunk`` queries where segments are longer (each query's row is the same computation)."""
    qs, ks, vs = q[idx], k[idx], v[idx]  # (S, W, H, D)
    s, w = idx.shape
    if w <= query_chunk:
        out = _attend(qs, ks, vs, valid)
    else:
        n = -(-w // query_chunk)
        qs = jnp.pad(qs, ((0, 0), (0, n * query_chunk - w), (0, 0), (0, 0)))
        chunks = jnp.moveaxis(qs.reshape((s, n, query_chunk) + qs.shape[2:]), 1, 0)
        out = jax.lax.map(lambda qc: _attend(qc, ks, vs, valid), chunks)  # (n, S, chunk, H, D)
        out = jnp.moveaxis(out, 0, 1).reshape((s, n * query_chunk) + out.shape[3:])[:, :w]
    return out.reshape(-1, *out.shape[2:])[inv]


class _ConvKernel(nnx.Module):
    """The Conv3d's weight as a kernel (T, P, P, C, E) (the key map's layout of a 5-D torch weight)."""

    def __init__(self, shape, *, dtype, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * 0.02)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.cfg = cfg
        t, p, c, e = cfg.temporal_patch_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size
        self.proj = _ConvKernel((t, p, p, c, e), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        cfg = self.cfg
        t, p, c = cfg.temporal_patch_size, cfg.patch_size, cfg.in_channels
        x = x.reshape(-1, c, t, p, p).transpose(0, 2, 3, 4, 1).reshape(x.shape[0], -1)  # (N, T*P*P*C)
        k = self.proj.kernel[...]
        return x.astype(k.dtype) @ k.reshape(-1, cfg.hidden_size)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.heads = cfg.num_heads
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segments):
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.heads, -1), 1, 0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self.proj(segment_attention(q, k, v, *segments).reshape(n, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(h, i, dtype=dtype, rngs=rngs)
        self.up_proj = linear(h, i, dtype=dtype, rngs=rngs)
        self.down_proj = linear(i, h, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = linear(self.width, self.width, dtype=dtype, rngs=rngs)
        self.mlp_2 = linear(self.width, cfg.out_hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.ln_q(x).reshape(-1, self.width)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(h), approximate=False))


class Qwen25VisionTransformer(nnx.Module):
    """``model(pixel_values, layout) -> (N / merge^2, out_hidden_size)``: ``pixel_values`` (N, patch_dim) as the
    processor makes them (several images concatenated), ``layout``: :func:`vision_layout` of their grids (numpy or
    arrays; jit with it as an argument). The output rows are the images' merge units in order (transformers'
    ``pooler_output``, concatenated)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = stack_modules(lambda r: VisionBlock(cfg, dtype=dtype, rngs=r), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)
        self.full = tuple(i in cfg.fullatt_block_indexes for i in range(cfg.depth))

    def __call__(self, pixel_values, layout):
        cfg = self.cfg
        lay = {k: jnp.asarray(v) for k, v in layout.items()}
        x = jnp.asarray(pixel_values)
        if x.ndim != 2 or x.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values {tuple(x.shape)}: this vision tower takes (patches, {cfg.patch_dim}).")
        if x.shape[0] != lay["perm"].shape[0]:
            raise ValueError(f"{x.shape[0]} patches, but the layout describes {lay['perm'].shape[0]}.")
        x = self.patch_embed(x)[lay["perm"]]
        cos, sin = lay["cos"], lay["sin"]
        full = (lay["full_idx"], lay["full_valid"], lay["full_inv"])
        win = (lay["win_idx"], lay["win_valid"], lay["win_inv"])
        graphdef, state = nnx.split(self.blocks)

        def body(h, xs):
            s, is_full = xs
            blk = nnx.merge(graphdef, s)
            h = jax.lax.cond(is_full, lambda h: blk(h, cos, sin, full), lambda h: blk(h, cos, sin, win), h)
            return h, None

        x, _ = jax.lax.scan(body, x, (state, jnp.asarray(self.full, bool)))
        return self.merger(x)[lay["unperm"]]


# ----- conversion -----

TORCH_RENAMES = [
    (r"^merger\.mlp_0\.", "merger.mlp.0."),
    (r"^merger\.mlp_2\.", "merger.mlp.2."),
]


def vision_keys(flat: dict) -> dict:
    """The vision tower's keys of a ``Qwen2_5_VLForConditionalGeneration`` state dict (``model.visual.*`` of
    transformers 5 or ``visual.*`` of older saves), without the prefix; a bare vision model's keys as they are."""
    out = {}
    for k, v in flat.items():
        for pre in ("model.visual.", "visual."):
            if k.startswith(pre):
                out[k[len(pre):]] = v
                break
    if not out and any(k.startswith(("patch_embed.", "blocks.", "merger.")) for k in flat):
        out = {k: v for k, v in flat.items() if k.startswith(("patch_embed.", "blocks.", "merger."))}
    return out


def params_from_torch(flat: dict, cfg: VisionConfig, dtype=None) -> dict:
    vis = vision_keys(flat)
    if not vis:
        raise ValueError("The checkpoint holds no Qwen2.5-VL vision tower (no visual.* / model.visual.* keys).")
    return map_state_dict(vis, expected_shapes(lambda: Qwen25VisionTransformer(cfg)), stacked={STACKED: cfg.depth},
                          renames=TORCH_RENAMES, dtype=dtype, what="Qwen2.5-VL vision tower")


def build(cfg: VisionConfig, params: dict, dtype=jnp.float32) -> Qwen25VisionTransformer:
    return build_module(lambda: Qwen25VisionTransformer(cfg, dtype=dtype), params)
