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

PipeFusion (:mod:`xdit_jax.parallel.pipefusion`; SANA): the ops keep buffers of their own, the analogue of the
attention's K/V buffers, installed per layer by :func:`mixing_state` (PipeFusion's ``layer_scan`` does it; the
buffers, a :class:`MixingBuffers`, ride in the scan's carry). A call is then given one patch of the sequence (this
device's piece of it, with ring / ulysses), or in a warm-up step the whole sequence laid out as PipeFusion's warm-up
lays it (:func:`xdit_jax.parallel.pipefusion._buffer_tokens`):

* linear attention: ``la`` (layers, B, M, H, D, Dv + 1) float32, each patch's partial sum ``sum_m k_m^T [v_m; 1]``
  (psum'ed over the sequence group, so every device of it holds the same). A patch's fresh partial sum replaces
  its slot (when ``write``), the total is the sum over the slots (this step's for the patches before, the last
  step's for those after) and the patch's queries are local. A warm-up step computes the total as the plain op
  does and stores every patch's partial sum. SANA 1600M: 70 x 32 x 33 x 4 B = 296 KB per sample, patch and layer.
* grid conv: ``conv`` (layers, B, W + 1 + S_pad + W + 1, C), the conv's INPUT for the whole padded sequence, with
  ``W + 1`` zero rows at each end (so a patch's halo is one slice): every device of the sequence group holds it
  whole. A patch is gathered over the sequence group (``all_gather``, ``plen C`` values per device), stored (when
  ``write``), and each device convolves its piece with halos read from the buffer: the patches before fresh, those
  after one step old; a halo longer than a patch simply reads more patches (no minimum patch length). Memory (the
  whole sequence rather than the patch boundaries, for simplicity): SANA 1600M at 1024 px (S = 1024, C = 2 x 5600,
  bf16) 1024 x 11200 x 2 B = 23 MB per sample and layer: 20 layers x 2 (CFG) = 0.92 GB per model, divided over the
  ``pipefusion`` stages (compiled on cfg=2,pipefusion=2: 250 MB of buffers per device, the linear attention's 6 MB
  of it). A warm-up step stores the whole sequence and convolves it as the one-device op does. The price of the
  gather with ulysses / ring: on cfg=2,pipefusion=2,ulysses=2 the compiled step all-gathers 344 MB per device,
  where cfg=2,ulysses=2 exchanges 59 MB of halos (a buffer split over the sequence group, with halos by
  ``ppermute`` as without PipeFusion, would cut both; not done).
* frame conv (SANA-Video, :func:`frame_conv3`): its input in the same ``conv`` buffer's LAST channels (the grid
  conv's in the first), read and written as the grid conv's; the buffer's halo is then one frame (``H W`` tokens,
  ``MixingBuffers.halo``, ``pipefusion.init_mixing(halo=)``).

Sequence axis: a video is one flat (frames x rows x columns) token sequence, split in contiguous chunks; the grid conv
takes ``grid=(F, H, W)`` (per frame: nothing reaches across a frame's top or bottom edge), the frame conv's halo is
one frame of that flat sequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["la", "conv"], meta_fields=["halo"])
@dataclasses.dataclass
class MixingBuffers:
    """PipeFusion's buffers of the token mixers of a block stack (module docstring): ``la`` (layer slots, B, M, H,
    D, Dv + 1) float32, the linear attention's per-patch partial sums; ``conv`` (layer slots, B, S_pad + 2 halo,
    C), the grid convolution's input; ``halo`` (static): W + 1 for a grid W tokens wide. A pytree: PipeFusion's
    cache (alone for a model without softmax self-attention, else after the K/V buffers)."""

    la: jax.Array
    conv: jax.Array
    halo: int


@dataclasses.dataclass
class MixCell:
    """One layer's view of :class:`MixingBuffers` while a PipeFusion stage is traced: the buffers (updated in
    place), the layer's row, the patch this call sees (traced; a patched step) or the warm-up's token table
    (``warm``: (ring * ulysses, S_pad / (ring * ulysses)) global token indices, row = this device's sequence rank),
    whether to store (False on idle ticks), the patches and their length."""

    la: jax.Array
    conv: jax.Array
    layer: jax.Array
    patch: jax.Array
    write: jax.Array
    patches: int
    plen: int
    warm: np.ndarray | None = None
    la_calls: int = 0
    conv_calls: int = 0
    halo: int = 0  # the conv buffer's zero rows at each end (MixingBuffers.halo)
    frame_calls: int = 0  # SANA-Video's frame convolutions (their input: the conv buffer's last channels)
    conv_channels: int = 0  # the conv buffer's channels the calls used

    @property
    def consumed(self) -> bool:
        """The layer ran one linear attention and one grid convolution (SANA's block)."""
        return (self.la_calls == 1 and self.conv_calls == 1 and self.frame_calls <= 1
                and self.conv_channels == self.conv.shape[-1])

    def positions(self, cfg, n: int):
        """Global token indices of this call's ``n`` local tokens."""
        rank = _chunk_index(cfg)
        if self.warm is not None:
            if self.warm.shape[1] != n:
                raise ValueError(f"A PipeFusion warm-up gave this device {n} tokens; its table holds "
                                 f"{self.warm.shape[1]}.")
            return jnp.asarray(self.warm)[rank]
        return self.patch * self.plen + rank * n + jnp.arange(n)


_MIX_CELL: contextvars.ContextVar[MixCell | None] = contextvars.ContextVar("xdit_jax_mix_cell", default=None)


@contextlib.contextmanager
def mixing_state(buffers: MixingBuffers, layer, patch, write, *, patches: int, plen: int, warm=None):
    """While installed (PipeFusion's ``layer_scan``, per layer), :func:`linear_attention` and
    :func:`grid_conv3x3` read and update layer ``layer`` of ``buffers`` (module docstring)."""
    token = _MIX_CELL.set(MixCell(buffers.la, buffers.conv, layer, patch, write, int(patches), int(plen),
                                  None if warm is None else np.asarray(warm), halo=int(buffers.halo)))
    try:
        yield _MIX_CELL.get()
    finally:
        _MIX_CELL.reset(token)


def _mix_cell(what: str):
    """The installed :class:`MixCell`, None outside PipeFusion; refuses PipeFusion without buffers for the op."""
    cell = _MIX_CELL.get()
    if cell is None and _KV_CELL.get() is not None:
        raise NotImplementedError(f"{what} under PipeFusion needs buffers of its own: pass "
                                  "pipefusion.init_mixing(...)'s MixingBuffers as the last entry of the cache.")
    return cell


def _row_update(buf, row, new, at, write):
    """``buf`` with ``new`` (one layer's slice, without the layer axis) stored in layer ``row`` at offsets ``at``
    where ``write``; and that layer's whole buffer."""
    where = (row,) + tuple(at)
    old = lax.dynamic_slice(buf, where, (1,) + new.shape)
    buf = lax.dynamic_update_slice(buf, jnp.where(write, new.astype(buf.dtype)[None], old), where)
    return buf, lax.dynamic_index_in_dim(buf, row, 0, keepdims=False)


def _unbound(axes, e):
    return RuntimeError(f"this op with sequence axes {axes} must run inside a shard_map over the installed mesh "
                        f"(xdit_jax.parallel.sequence.run_blocks): {e}")


def linear_attention(q, k, v, *, eps: float = 1e-15, q_rot=None, k_rot=None):
    """Linear attention of the LOCAL (B, S, H, D) queries on the keys/values of the whole sequence.

    q, k: already through the kernel feature map (non-negative, e.g. ReLU); v: (B, S, H, Dv). The math is
    float32 throughout, in diffusers' SanaLinearAttnProcessor2_0 order: ``(V K^T)`` summed over the
    tokens first, then applied to the queries; the denominator is the same product with a row of ones
    appended to V. Returns (B, S, H, Dv) in q's dtype. Padded keys (global index >= ``valid_len``) are
    left out of the sums.

    ``q_rot`` / ``k_rot`` (SANA-Video's SanaLinearAttnProcessor3_0): the numerator ``sum_m (q_rot_n . k_rot_m) v_m``
    from the rotated (RoPE) queries and keys, the denominator ``sum_m q_n . k_m`` from the plain ones. The two sums
    over the tokens, ``K_rot^T V`` and ``sum K``, are packed as the plain op's into one (B, H, D, Dv + 1) array (one
    psum; the same PipeFusion buffer).
    """
    if not (q.ndim == k.ndim == v.ndim == 4) or q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"linear_attention wants q, k (B,S,H,D) and v (B,S,H,Dv) of one sequence; "
                         f"got {q.shape}, {k.shape}, {v.shape}.")
    cell = _mix_cell("linear attention")
    cfg = current_config()
    axes, _ = _sequence_axes(cfg)
    rot = q_rot is not None or k_rot is not None
    if rot and (q_rot is None or k_rot is None or q_rot.shape != q.shape or k_rot.shape != k.shape):
        raise ValueError("linear_attention wants both q_rot and k_rot, shaped as q and k.")
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    krf = k_rot.astype(jnp.float32) if rot else None
    n = k.shape[1]
    pos = cell.positions(cfg, n) if cell is not None else None
    if cfg.valid_len is not None:
        if pos is None:
            pos = (_chunk_index(cfg) * n if axes else 0) + jnp.arange(n)
        keep = (pos < cfg.valid_len)[None, :, None, None]
        kf = jnp.where(keep, kf, 0.0)
        krf = jnp.where(keep, krf, 0.0) if rot else None
    if rot:  # numerator keys rotated, denominator keys plain: [K_rot^T V | sum K], the plain op's packing
        def token_sums(onehot=None):
            if onehot is None:
                return jnp.concatenate([jnp.einsum("bshd,bshe->bhde", krf, vf),
                                        jnp.sum(kf, axis=1)[..., None]], axis=-1)
            return jnp.concatenate([jnp.einsum("bshd,sm,bshe->bmhde", krf, onehot, vf),
                                    jnp.einsum("bshd,sm->bmhd", kf, onehot)[..., None]], axis=-1)
    else:
        # V padded with a row of ones (diffusers' trick): one product gives K^T V and the key sums, one psum adds them
        vf = jnp.concatenate([vf, jnp.ones(vf.shape[:-1] + (1,), vf.dtype)], axis=-1)

        def token_sums(onehot=None):
            if onehot is None:
                return jnp.einsum("bshd,bshe->bhde", kf, vf)
            return jnp.einsum("bshd,sm,bshe->bmhde", kf, onehot, vf)

    def psum(x):
        if not axes:
            return x
        try:
            return lax.psum(x, axes)
        except NameError as e:
            raise _unbound(axes, e) from e

    kv = psum(token_sums())  # (B, H, D, Dv + 1): sums over the tokens
    if cell is not None:  # PipeFusion: per-patch partial sums in the layer's buffer
        if cell.la_calls:
            raise RuntimeError("A PipeFusion block called linear_attention twice; its buffers hold one per layer.")
        cell.la_calls += 1
        want = (cell.la.shape[1], cell.patches) + kv.shape[1:]
        if cell.la.shape[1:] != want:
            raise ValueError(f"The linear attention's PipeFusion buffer is {cell.la.shape[1:]} per layer; this call "
                             f"needs {want} (pipefusion.init_mixing).")
        if cell.warm is not None:  # the whole sequence: the total as the plain op, every patch's sum stored
            onehot = (pos[:, None] // cell.plen == jnp.arange(cell.patches)[None]).astype(jnp.float32)
            parts = psum(token_sums(onehot))
            cell.la, _ = _row_update(cell.la, cell.layer, parts, (0, 0, 0, 0, 0), cell.write)
        else:  # this patch's fresh sum replaces its slot; the total sums the slots
            cell.la, row = _row_update(cell.la, cell.layer, kv[:, None], (0, cell.patch, 0, 0, 0), cell.write)
            kv = jnp.sum(row, axis=1)
    if rot:
        num = jnp.einsum("bshd,bhde->bshe", q_rot.astype(jnp.float32), kv[..., :-1])
        den = jnp.einsum("bshd,bhd->bsh", qf, kv[..., -1])[..., None]
        return (num / (den + eps)).astype(q.dtype)
    out = jnp.einsum("bshd,bhde->bshe", qf, kv)
    return (out[..., :-1] / (out[..., -1:] + eps)).astype(q.dtype)


def _frames_grid(grid):
    """(F, H, W) of a 2-D ``(H, W)`` grid (one frame) or of a 3-D ``(F, H, W)`` one (frames of H x W tokens)."""
    if len(grid) not in (2, 3):
        raise ValueError(f"A token grid is (H, W) or (F, H, W); got {tuple(grid)}.")
    return tuple(int(g) for g in ((1,) * (3 - len(grid)) + tuple(grid)))


def _conv_flat(ext, weight, start, n: int, grid):
    """Depthwise 3x3 conv of the ``n`` tokens at global flat indices ``start ..`` from ``ext`` (B, n + 2(W+1), C),
    which holds the global tokens ``start - W - 1 .. start + n + W`` (anything outside the grid masked; with
    frames, ``grid = (F, H, W)``, each frame's own grid: nothing reaches across a frame's top or bottom edge)."""
    f, h, w = _frames_grid(grid)
    g = start + jnp.arange(n)
    row, col = g // w, g % w
    row = row if f == 1 else row % h  # the row within its frame
    out = None
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            off = w + 1 + di * w + dj
            src = lax.slice_in_dim(ext, off, off + n, axis=1)
            ok = (row + di >= 0) & (row + di < h) & (col + dj >= 0) & (col + dj < w)
            term = jnp.where(ok[None, :, None], src * weight[di + 1, dj + 1], 0.0)
            out = term if out is None else out + term
    return out


def _conv_whole(xf, wf, grid):
    """The depthwise 3x3 conv of the whole (B, n >= F H W, C) float32 sequence on one device, frame by frame (rows
    past the grid: zeros out)."""
    f, h, w = _frames_grid(grid)
    b, n, c = xf.shape
    if n < f * h * w:
        raise ValueError(f"grid_conv3x3 on one device wants the whole grid of {f}x{h}x{w} tokens, got {n}.")
    xi = xf[:, :f * h * w].reshape(b * f, h, w, c)
    y = lax.conv_general_dilated(xi, wf[:, :, None, :], (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    y = y.reshape(b, f * h * w, c)
    return jnp.pad(y, ((0, 0), (0, n - f * h * w), (0, 0))) if n > f * h * w else y


def _cached_stencil(cell: MixCell, cfg, axes, x, channel: int, need: int, flat, whole, what: str):
    """PipeFusion's convolutions (module docstring): the call's tokens (gathered over the sequence group) stored in
    the layer's buffer of the whole sequence's input at channels ``channel ..``, then this device's tokens convolved
    with halos of ``need`` tokens read from it (``flat(ext, start, n)``; a warm-up step: ``whole(sequence)``)."""
    b, n, c = x.shape
    halo = cell.halo
    sp = cell.patches * cell.plen
    if cell.conv.shape[1:2] != (b,) or cell.conv.shape[2] != sp + 2 * halo or channel + c > cell.conv.shape[-1] \
            or need > halo:
        raise ValueError(f"The convolutions' PipeFusion buffer is {cell.conv.shape[1:]} per layer with a halo of "
                         f"{halo}; {what} over {cell.patches} patches of {cell.plen} tokens needs ({b}, {sp} + 2 x "
                         f">= {need}, >= {channel + c}) (pipefusion.init_mixing).")
    cell.conv_channels += c
    try:
        got = lax.all_gather(x, axes, axis=1, tiled=True) if axes else x  # the group's tokens, rank order
    except NameError as e:
        raise _unbound(axes, e) from e
    if cell.warm is not None:  # the whole sequence, in the warm-up's layout: back to token order
        order = cell.warm.reshape(-1)
        if not (order == np.arange(sp)).all():
            got = jnp.take(got, jnp.asarray(np.argsort(order)), axis=1)
        cell.conv, _ = _row_update(cell.conv, cell.layer, got, (0, halo, channel), cell.write)
        y = whole(got.astype(jnp.float32))
        return jnp.take(y, cell.positions(cfg, n), axis=1) if axes else y
    start = cell.patch * cell.plen
    cell.conv, row = _row_update(cell.conv, cell.layer, got, (0, halo + start, channel), cell.write)
    mine = start + _chunk_index(cfg) * n  # this device's first token; the buffer holds token t at t + halo
    ext = lax.dynamic_slice(row, (0, mine + halo - need, channel), (b, n + 2 * need, c)).astype(jnp.float32)
    return flat(ext, mine, n)


def _cached_conv(cell: MixCell, cfg, axes, x, wf, grid):
    """PipeFusion's grid conv: its input in the conv buffer's first channels (halo ``W + 1``)."""
    if cell.conv_calls:
        raise RuntimeError("A PipeFusion block called grid_conv3x3 twice; its buffers hold one per layer.")
    cell.conv_calls += 1
    return _cached_stencil(cell, cfg, axes, x, 0, grid[-1] + 1, lambda ext, s, n: _conv_flat(ext, wf, s, n, grid),
                           lambda xs: _conv_whole(xs, wf, grid), f"a grid conv of grid width {grid[-1]}")


def grid_conv3x3(x, weight, bias=None, *, grid: tuple[int, ...]):
    """Depthwise 3x3 convolution, stride 1, zero padding 1, of the tokens of a row-major ``grid = (H, W)``; or of
    each frame of a ``grid = (F, H, W)`` of frames (SANA-Video's GLUMBTempConv: its spatial conv is per frame; the
    halo is still ``W + 1`` tokens, what would cross a frame's edge is masked).

    x: the LOCAL (B, S_local, C) shard of the (padded) flat sequence of ``H * W`` tokens; weight: (3, 3, C)
    (kernel rows, columns); bias: (C,) or None. Returns (B, S_local, C) in x's dtype (products summed in
    float32). On one device without padding this is one ``conv_general_dilated`` with ``C`` groups.
    """
    grid = _frames_grid(grid)
    if x.ndim != 3 or weight.shape != (3, 3, x.shape[-1]):
        raise ValueError(f"grid_conv3x3 wants x (B, S, C) and weight (3, 3, C); got {x.shape}, {weight.shape}.")
    cell = _mix_cell("the grid convolution")
    cfg = current_config()
    axes, degree = _sequence_axes(cfg)
    b, n, c = x.shape
    wf = weight.astype(jnp.float32)
    if cell is not None:
        y = _cached_conv(cell, cfg, axes, x, wf, grid)
    elif not axes:
        y = _conv_whole(x.astype(jnp.float32), wf, grid)
    else:
        ext, start = _with_halos(x.astype(jnp.float32), grid[2] + 1, cfg, axes, degree)
        y = _conv_flat(ext, wf, start, n, grid)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _with_halos(xf, halo: int, cfg, axes, degree: int):
    """(ext, start): this device's (B, n, C) chunk with the ``halo`` tokens before and after it of the global flat
    sequence (zeros past its ends), and its first token's global index. When every chunk holds at least ``halo``
    tokens the halos are the neighbouring chunks' edges (two ``ppermute``s), else the sequence is gathered."""
    n = xf.shape[1]
    start = _chunk_index(cfg) * n
    try:
        if n >= halo:  # the halos are the neighbouring chunks' edges
            prev = lax.ppermute(xf[:, n - halo:], axes, [(i, i + 1) for i in range(degree - 1)])
            nxt = lax.ppermute(xf[:, :halo], axes, [(i + 1, i) for i in range(degree - 1)])
            ext = jnp.concatenate([prev, xf, nxt], axis=1)
        else:  # chunks shorter than the halo: gather the sequence
            whole = lax.all_gather(xf, axes, axis=1, tiled=True)
            whole = jnp.pad(whole, ((0, 0), (halo, halo), (0, 0)))
            ext = lax.dynamic_slice_in_dim(whole, start, n + 2 * halo, axis=1)
    except NameError as e:
        raise _unbound(axes, e) from e
    return ext, start


def frame_conv3(x, weight, *, grid: tuple[int, int, int]):
    """A kernel-3 convolution over the frames of a row-major ``grid = (F, H, W)`` with full channel mixing, zero
    padding 1, no bias: ``out[f, i, j] = sum_dt x[f + dt, i, j] @ weight[dt + 1]`` over the frames ``f + dt`` in
    ``[0, F)`` (SANA-Video's ``conv_temp``, an ``nn.Conv2d(C, C, (3, 1))`` over (frames, tokens of a frame)).

    x: the LOCAL (B, S_local, C) shard of the (padded) flat sequence of ``F H W`` tokens; weight: (3, C, C_out).
    Token ``g`` needs ``g - H W`` and ``g + H W``: a halo of one frame (``H W`` tokens) on each side, from the
    neighbouring chunks by two ``ppermute``s where each chunk holds at least a frame (``2 B H W C`` values per device
    and call), else the sequence gathered (exact either way). Returns (B, S_local, C_out) in x's dtype (float32
    products). PipeFusion: its input is kept in the LAST ``C`` channels of the conv buffer (whose halo must then be
    at least ``H W``; the grid conv's input in the first channels), read and written as the grid conv's.
    """
    f, h, w = _frames_grid(grid)
    if x.ndim != 3 or weight.ndim != 3 or weight.shape[:2] != (3, x.shape[-1]):
        raise ValueError(f"frame_conv3 wants x (B, S, C) and weight (3, C, C_out); got {x.shape}, {weight.shape}.")
    cell = _mix_cell("the frame convolution")
    cfg = current_config()
    axes, degree = _sequence_axes(cfg)
    wf = weight.astype(jnp.float32)
    hw = h * w
    n = x.shape[1]
    flat = lambda ext, start, m: _frame_flat(ext, wf, start, m, (f, h, w))  # noqa: E731
    if cell is not None:  # PipeFusion: its input in the conv buffer's last channels (halo H W)
        if cell.frame_calls:
            raise RuntimeError("A PipeFusion block called frame_conv3 twice; its buffers hold one per layer.")
        cell.frame_calls += 1
        out = _cached_stencil(cell, cfg, axes, x, cell.conv.shape[-1] - x.shape[-1], hw, flat,
                              lambda xs: flat(jnp.pad(xs, ((0, 0), (hw, hw), (0, 0))), 0, xs.shape[1]),
                              f"a frame conv of {f} frames x {h}x{w}")
    elif axes:
        ext, start = _with_halos(x.astype(jnp.float32), hw, cfg, axes, degree)
        out = flat(ext, start, n)
    else:
        out = flat(jnp.pad(x.astype(jnp.float32), ((0, 0), (hw, hw), (0, 0))), 0, n)
    return out.astype(x.dtype)


def _frame_flat(ext, wf, start, n: int, grid):
    """The frame conv of the ``n`` tokens at global flat indices ``start ..`` from ``ext`` (B, n + 2 H W, C), which
    holds the global tokens ``start - H W .. start + n + H W - 1`` (frames outside ``[0, F)`` masked)."""
    f, h, w = grid
    hw = h * w
    frame = (start + jnp.arange(n)) // hw
    out = None
    for dt in (-1, 0, 1):
        src = lax.slice_in_dim(ext, hw + dt * hw, hw + dt * hw + n, axis=1)
        ok = ((frame + dt >= 0) & (frame + dt < f))[None, :, None]
        term = jnp.where(ok, jnp.einsum("bsc,cd->bsd", src, wf[dt + 1]), 0.0)
        out = term if out is None else out + term
    return out
