"""Token mixing other than softmax attention, over the sequence-parallel mesh: linear attention and a
depthwise 3x3 convolution on the 2-D token grid (SANA's self-attention and GLUMBConv feed-forward).

Models call these on their LOCAL shard, as they call :func:`xdit_jax.parallel.attention.attention`; the
mesh reaches them through the installed :class:`~xdit_jax.parallel.attention.AttentionConfig` (DESIGN.md
principle 1: no model file calls a collective). The layout is the attention op's: the joint sequence,
padded to a multiple of ``ring * ulysses``, split into contiguous chunks, the device at (r, u) holding chunk
``r * ulysses + u``; ``valid_len`` real tokens, the rest padding (finite garbage that the caller drops).

* :func:`linear_attention`: ``out_n = sum_m (q_n . k_m) v_m / (sum_m q_n . k_m + eps)`` over the GLOBAL
  sequence. The sums over m are reductions: each device sums its own tokens (padding masked out) into
  ``K^T V`` (B, H, D, Dv) and ``sum K`` (B, H, D), one ``psum`` over (ring, ulysses) adds them up, and every
  query row is then local. Traffic: ``B H D (Dv + 1)`` floats per device and call, independent of the
  sequence length (SANA 1600M: 70 heads x 32 x 33 x 4 B = 296 KB per sample and block). As diffusers, V is padded
  with a row of ones, so that one product gives both sums (and the queries' denominators).
* :func:`grid_conv3x3`: a depthwise 3x3 convolution (zero padding 1) over the row-major ``(H, W)`` token grid.
  Output token ``g`` needs the inputs ``g - W - 1 .. g + W + 1`` of the flat sequence: a halo of ``W + 1``
  tokens on each side. When every chunk holds at least ``W + 1`` tokens the halos come from the two
  neighbouring chunks by two ``ppermute``s (``2 B (W + 1) C`` values per device and call: SANA 1600M at
  1024px, W = 32, C = 2 x 5600: 1.5 MB per sample and block in float32); else the whole grid is gathered
  (``all_gather``, ``B S C`` values: only for tiny grids over many devices). Both exact.

PipeFusion (patches with stale K/V buffers) is not supported by either op: they refuse it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from xdit_jax.parallel.attention import _KV_CELL, RING_AXIS, ULYSSES_AXIS, current_config


def _sequence_axes(cfg):
    """The mesh axes the sequence is split over (degree > 1), ring-major, and the degree."""
    axes = tuple(a for a in (RING_AXIS, ULYSSES_AXIS) if cfg.degree(a) > 1)
    degree = 1
    for a in axes:
        degree *= cfg.degree(a)
    return axes, degree


def _chunk_index(cfg):
    """This device's chunk of the sequence (traced inside the shard_map)."""
    idx = jnp.int32(0)
    if cfg.degree(RING_AXIS) > 1:
        idx = lax.axis_index(RING_AXIS) * cfg.degree(ULYSSES_AXIS)
    if cfg.degree(ULYSSES_AXIS) > 1:
        idx = idx + lax.axis_index(ULYSSES_AXIS)
    return idx


def _refuse_pipefusion(what: str):
    if _KV_CELL.get() is not None:
        raise NotImplementedError(f"{what} under PipeFusion is not supported (its sums / halos would need stale "
                                  "buffers of their own); use sequence parallelism (ring / ulysses) instead.")


def _unbound(axes, e):
    return RuntimeError(f"this op with sequence axes {axes} must run inside a shard_map over the installed mesh "
                        f"(xdit_jax.parallel.sequence.run_blocks): {e}")


def linear_attention(q, k, v, *, eps: float = 1e-15):
    """Linear attention of the LOCAL (B, S, H, D) queries on the keys/values of the whole sequence.

    q, k: already through the kernel feature map (non-negative, e.g. ReLU); v: (B, S, H, Dv). The math is
    float32 throughout, in diffusers' SanaLinearAttnProcessor2_0 order: ``(V K^T)`` summed over the
    tokens first, then applied to the queries; the denominator is the same product with a row of ones
    appended to V. Returns (B, S, H, Dv) in q's dtype. Padded keys (global index >= ``valid_len``) are
    left out of the sums.
    """
    if not (q.ndim == k.ndim == v.ndim == 4) or q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"linear_attention wants q, k (B,S,H,D) and v (B,S,H,Dv) of one sequence; "
                         f"got {q.shape}, {k.shape}, {v.shape}.")
    _refuse_pipefusion("linear attention")
    cfg = current_config()
    axes, _ = _sequence_axes(cfg)
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    if cfg.valid_len is not None:
        n = k.shape[1]
        start = _chunk_index(cfg) * n if axes else 0
        keep = (start + jnp.arange(n)) < cfg.valid_len
        kf = jnp.where(keep[None, :, None, None], kf, 0.0)
    # V padded with a row of ones (diffusers' trick): one product gives K^T V and the key sums, and one psum adds them
    vf = jnp.concatenate([vf, jnp.ones(vf.shape[:-1] + (1,), vf.dtype)], axis=-1)
    kv = jnp.einsum("bshd,bshe->bhde", kf, vf)  # (B, H, D, Dv + 1): sums over the local tokens
    if axes:
        try:
            kv = lax.psum(kv, axes)
        except NameError as e:
            raise _unbound(axes, e) from e
    out = jnp.einsum("bshd,bhde->bshe", qf, kv)
    return (out[..., :-1] / (out[..., -1:] + eps)).astype(q.dtype)


def _conv_flat(ext, weight, start, n: int, grid):
    """Depthwise 3x3 conv of the ``n`` tokens at global flat indices ``start ..`` from ``ext`` (B, n + 2(W+1), C),
    which holds the global tokens ``start - W - 1 .. start + n + W`` (anything outside the grid masked)."""
    h, w = grid
    g = start + jnp.arange(n)
    row, col = g // w, g % w
    out = None
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            off = w + 1 + di * w + dj
            src = lax.slice_in_dim(ext, off, off + n, axis=1)
            ok = (row + di >= 0) & (row + di < h) & (col + dj >= 0) & (col + dj < w)
            term = jnp.where(ok[None, :, None], src * weight[di + 1, dj + 1], 0.0)
            out = term if out is None else out + term
    return out


def grid_conv3x3(x, weight, bias=None, *, grid: tuple[int, int]):
    """Depthwise 3x3 convolution, stride 1, zero padding 1, of the tokens of a row-major ``grid = (H, W)``.

    x: the LOCAL (B, S_local, C) shard of the (padded) flat sequence of ``H * W`` tokens; weight: (3, 3, C)
    (kernel rows, columns); bias: (C,) or None. Returns (B, S_local, C) in x's dtype (products summed in
    float32). On one device without padding this is one ``conv_general_dilated`` with ``C`` groups.
    """
    h, w = int(grid[0]), int(grid[1])
    if x.ndim != 3 or weight.shape != (3, 3, x.shape[-1]):
        raise ValueError(f"grid_conv3x3 wants x (B, S, C) and weight (3, 3, C); got {x.shape}, {weight.shape}.")
    _refuse_pipefusion("the grid convolution")
    cfg = current_config()
    axes, degree = _sequence_axes(cfg)
    b, n, c = x.shape
    wf = weight.astype(jnp.float32)
    if not axes:
        if n < h * w:
            raise ValueError(f"grid_conv3x3 on one device wants the whole grid of {h}x{w} tokens, got {n}.")
        xi = x[:, :h * w].astype(jnp.float32).reshape(b, h, w, c)
        y = lax.conv_general_dilated(xi, wf[:, :, None, :], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        y = y.reshape(b, h * w, c)
        if n > h * w:
            y = jnp.pad(y, ((0, 0), (0, n - h * w), (0, 0)))
    else:
        halo = w + 1
        xf = x.astype(jnp.float32)
        start = _chunk_index(cfg) * n
        try:
            if n >= halo:  # the halos are the neighbouring chunks' edges
                prev = lax.ppermute(xf[:, n - halo:], axes, [(i, i + 1) for i in range(degree - 1)])
                nxt = lax.ppermute(xf[:, :halo], axes, [(i + 1, i) for i in range(degree - 1)])
                ext = jnp.concatenate([prev, xf, nxt], axis=1)
            else:  # chunks shorter than a row: gather the grid
                whole = lax.all_gather(xf, axes, axis=1, tiled=True)
                whole = jnp.pad(whole, ((0, 0), (halo, halo), (0, 0)))
                ext = lax.dynamic_slice_in_dim(whole, start, n + 2 * halo, axis=1)
        except NameError as e:
            raise _unbound(axes, e) from e
        y = _conv_flat(ext, wf, start, n, (h, w))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
