"""The attention op: the one place where a model's computation may cross devices.

Models call :func:`attention` on their local (B, S, H, D) query/key/value. The pipeline runs the
transformer blocks inside one ``shard_map`` over the mesh and installs the mesh with
:func:`attention_context`; this op then picks the sequence-parallel strategy from the mesh shape,
so no model file ever calls a collective (DESIGN.md, principle 1).

Layout inside the ``shard_map`` (the contract with the pipeline): the joint sequence, padded to a
multiple of ``ring * ulysses``, is split into ``ring * ulysses`` contiguous chunks; the device at
mesh coordinates (r, u) holds chunk ``r * ulysses + u`` (sequence sharded over the axis tuple
``("ring", "ulysses")``, ring-major). Batch (``data``, ``cfg``) and ``pipefusion`` are ignored here.

PipeFusion (:mod:`xdit_jax.parallel.pipefusion`) installs a per-layer K/V buffer with
:func:`kv_cache`: the op is then given one patch of the sequence, stores the patch's K/V in the
buffer and attends to the whole buffer (:func:`_cached_attention`, with the Ulysses swap and the
ring over the buffers where the mesh has them).

Strategies (all exact up to float rounding; softmax statistics in float32):

* local (no mesh, or ``ring == ulysses == 1``): one kernel call.
* Ulysses (``ulysses > 1``): ``all_to_all`` over ``"ulysses"`` from sequence-sharded to
  head-sharded (heads zero-padded to a multiple of the degree), local attention over the ring
  group's chunk, ``all_to_all`` back, padded heads dropped.
* Ring (``ring > 1``): K/V blocks travel the ring with ``ppermute`` over ``"ring"``; partial
  results are merged with the log-sum-exp rule, the ring loop is a ``lax.fori_loop``.
* USP (both): Ulysses inside each ring group first — every device then holds the contiguous chunk
  ``r`` of ``S / ring`` tokens for ``H_pad / ulysses`` heads — then the ring on those chunks, then
  the ``all_to_all`` back.

Padding: ``valid_len`` (static) is the number of real tokens of the GLOBAL sequence; keys at a
global index ``>= valid_len`` are masked. Queries at padded positions give finite garbage (the
pipeline drops them). A key block made only of padding contributes nothing (its LSE is ``-inf``
and every merge guards it), so it never makes NaNs.

Joint attention with a context (``attention(..., context=(cq, ck, cv, mask))``): two-stream models
(Mochi) keep their caption whole on every device; it joins the self-attention as extra keys (one
partial over the caption's keys, merged by the log-sum-exp rule) and extra query rows (which ride
along with the sequence's through the strategy above). Exact on every mesh (:func:`_over_heads`).
Under PipeFusion the context joins the patch's attention over the buffers the same way.

The kernel lives in one function, :func:`block_attention`: it returns the output *and* the LSE of
one (query block, key block) pair with the keys' global offset, which is all the ring needs, so a
cuDNN, Pallas or Mosaic GPU flash kernel replaces it (``AttentionConfig.backend``).
"""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xdit_jax.parallel.mosaic_attention import default_tiles, fa3_attention
from xdit_jax.parallel.pallas_attention import flash_attention

RING_AXIS = "ring"
ULYSSES_AXIS = "ulysses"
BACKENDS = ("xla", "cudnn", "pallas", "mosaic")


def resolve_backend(requested: str | None, dtype, platform: str | None = None) -> str:
    """The per-device kernel for ``requested`` ("auto"/None or one of ``BACKENDS``): auto picks cuDNN flash
    attention on a GPU in bf16/fp16 — the XLA kernel materialises the (B, H, S, S) float32 scores,
    76 GB for CogVideoX-2B at 49x480x720 with CFG — and the XLA kernel elsewhere."""
    if requested not in (None, "", "auto"):
        if requested not in BACKENDS:
            raise ValueError(f"Unknown attention backend {requested!r}; use auto, {', '.join(BACKENDS)}.")
        return requested
    platform = (platform or jax.default_backend()).lower()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform in ("gpu", "cuda", "rocm") and half else "xla"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How attention runs inside the traced step.

    ``mesh``: the jax Mesh (or a :class:`xdit_jax.mesh.MeshSpec`) whose ``ring`` / ``ulysses``
    degrees pick the strategy; None: one device. ``backend``: the per-device kernel, ``"xla"``
    (einsum + float32 softmax, any shape and dtype), ``"cudnn"`` (``jax.nn.dot_product_attention``
    with ``implementation="cudnn"``: GPU only, fp16/bf16, head dims cuDNN supports) or ``"pallas"``
    (:mod:`xdit_jax.parallel.pallas_attention`: a Pallas flash kernel, Triton on GPUs, the Pallas
    interpreter elsewhere — slow, for tests) or ``"mosaic"`` (:mod:`xdit_jax.parallel.mosaic_attention`:
    jax's FlashAttention-3 Mosaic GPU kernel, Hopper only; its reference stands in elsewhere — tests).
    """

    mesh: object | None = None
    backend: str = "xla"
    valid_len: int | None = None  # real tokens of the global sequence, when the caller padded it
    # A joint attention's context sharded over (ring, ulysses) like the sequence (each device holds its slice,
    # the slices padded to equal lengths): the real tokens of the whole context. None: every device holds it
    # whole.
    context_valid: int | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown attention backend {self.backend!r}; choose one of {', '.join(BACKENDS)}.")

    def degree(self, axis: str) -> int:
        return _degree(self.mesh, axis)


_CONTEXT: contextvars.ContextVar[AttentionConfig] = contextvars.ContextVar("xdit_jax_attention",
                                                                         default=AttentionConfig())


@contextlib.contextmanager
def attention_context(config: AttentionConfig):
    """Install ``config`` for the attention calls traced inside the block."""
    token = _CONTEXT.set(config)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_config() -> AttentionConfig:
    return _CONTEXT.get()


@dataclasses.dataclass
class KVCell:
    """PipeFusion (:mod:`xdit_jax.parallel.pipefusion`): the stage's K/V buffers of the whole padded
    sequence, (layers, B, S, H, D), updated in place; the layer being traced (its first buffer row:
    a block that attends ``slots`` times uses rows ``layer .. layer + slots - 1`` in call order), where
    the patch this call sees starts, and whether to store its K/V (False on a pipeline's idle ticks)."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    start: jax.Array
    write: jax.Array
    ring_counts: object = None  # with ring > 1: valid keys of each ring position's buffer (static)
    slots: int = 1  # the attentions the layer makes (SD3.5 Medium's dual-attention blocks: 2)
    calls: int = 0
    # A two-stream model's text split into slices that ride with the patches (PipeFusion's ``text``): the
    # buffers of the whole padded text's K/V (layers, B, L_pad, H, D), every head on every device; where this
    # call's slice starts in them; how many of their rows are real text (static)
    ck: jax.Array | None = None
    cv: jax.Array | None = None
    c_start: object = 0
    c_valid: int | None = None
    # A block-causal mask (attention's ``segments``): the segment ids of this device's buffer keys (S_buf,) int32, in
    # the buffer's order (with ring > 1 its ring position's part of every patch); None: the model passes no segments
    kv_segments: jax.Array | None = None

    @property
    def consumed(self) -> bool:
        """Every attention of the layer ran (each stored its patch and read its buffer)."""
        return self.calls == self.slots


_KV_CELL: contextvars.ContextVar[KVCell | None] = contextvars.ContextVar("xdit_jax_kv_cell", default=None)


@contextlib.contextmanager
def kv_cache(k, v, layer, start, write, ring_counts=None, slots: int = 1, text=None, segments=None):
    """While installed, :func:`attention` is given one patch of the sequence: it stores the patch's
    K/V in layer ``layer`` of the buffers at ``start`` (when ``write``; an offset into the local
    buffer) and attends to that layer's whole buffer — with ring > 1, to every ring position's.
    ``slots``: the attentions the layer makes, each with its own buffer row (``layer + i``).
    ``text = (ck, cv, c_start, c_valid)``: the context a call passes is the patch's slice of the text,
    stored at ``c_start`` in these buffers of the whole text, whose first ``c_valid`` rows are real; the
    call's context keys are then the whole text's (its ``c_mask`` is the whole text's too). ``segments``: the
    block-causal segment ids of the buffer's keys (:attr:`KVCell.kv_segments`), for a model that passes
    :func:`attention` its tokens' ``segments``."""
    cell = KVCell(k, v, layer, start, write, ring_counts, slots, kv_segments=segments)
    if text is not None:
        cell.ck, cell.cv, cell.c_start, cell.c_valid = text
    token = _KV_CELL.set(cell)
    try:
        yield _KV_CELL.get()
    finally:
        _KV_CELL.reset(token)


def _store(cell: KVCell, row, k, v, names=("k", "v"), start=None):
    """Store the patch's K/V in buffer row ``row`` at ``cell.start`` (when ``cell.write``); return that
    row's whole buffers (B, S, H, D). ``names`` / ``start``: the text's buffers and where its slice goes."""
    b, n, h, d = k.shape
    at = (row, 0, cell.start if start is None else start, 0, 0)
    whole = []
    for name, new in zip(names, (k, v)):
        buf = getattr(cell, name)
        old = lax.dynamic_slice(buf, at, (1, b, n, h, d))
        buf = lax.dynamic_update_slice(buf, jnp.where(cell.write, new.astype(buf.dtype)[None], old), at)
        setattr(cell, name, buf)
        whole.append(lax.dynamic_index_in_dim(buf, row, 0, keepdims=False))
    return whole


def _cached_attention(cell: KVCell, q, k, v, *, valid_len, scale, backend, ulysses: int = 1, ring: int = 1,
                      context=None, segments=None):
    """With ``ulysses > 1`` (PipeFusion x Ulysses) q, k, v hold this device's piece of the patch for
    all heads; an ``all_to_all`` makes them the ring group's part of the patch for this device's heads
    (the buffers hold the sequence for those heads), and another one brings the output back. With
    ``ring > 1`` each ring position's buffer holds its part of every patch (so the patch is stored
    locally) and the keys of all of them are visited by the ring, ``cell.ring_counts`` saying how
    many of each are real. ``context``: as :func:`_over_heads`', joined to the buffers' keys. ``segments``: the
    patch's block-causal segment ids (this device's piece, all-gathered over ``ulysses`` as the queries are), masked
    against the buffer keys' ids (``cell.kv_segments``): a query sees the keys of its block and the blocks before it,
    fresh or a step old as the buffers hold them."""
    if cell.consumed:
        raise RuntimeError(f"A PipeFusion layer called attention {cell.calls + 1} times; it has K/V buffers for "
                           f"{cell.slots} (init_cache's attentions).")
    row, cell.calls = cell.layer + cell.calls, cell.calls + 1
    if context is not None and cell.ck is not None:  # the text's slice: stored, then the whole text attended
        cq, ck, cv, c_mask = context
        ck, cv = _store(cell, row, ck, cv, ("ck", "cv"), cell.c_start)
        lp = ck.shape[1]
        if c_mask is not None:
            c_mask = jnp.pad(c_mask.astype(bool), ((0, 0), (0, lp - c_mask.shape[1])))
        if cell.c_valid is not None and cell.c_valid < lp:
            real = jnp.arange(lp) < cell.c_valid
            c_mask = jnp.broadcast_to(real, (q.shape[0], lp)) if c_mask is None else c_mask & real
        context = (cq, ck, cv, c_mask)

    if segments is not None and ulysses > 1:  # the rows the swap gives this device: the ring group's part
        segments = lax.all_gather(segments, ULYSSES_AXIS, axis=0, tiled=True)

    def partial(rows, k, v, need_lse):
        whole = _store(cell, row, k, v)
        if ring > 1:
            return _ring_attention(rows, *whole, ring=ring, valid_len=None, scale=scale, backend=backend,
                                   counts=cell.ring_counts, return_lse=need_lse, segments=segments,
                                   kv_segments=cell.kv_segments)
        out = block_attention(rows, *whole, valid_len=valid_len, scale=scale, backend=backend, need_lse=need_lse,
                              out_dtype=jnp.float32 if need_lse else None,
                              segments=None if segments is None else (segments, cell.kv_segments))
        return out if need_lse else out[0]

    return _over_heads(q, k, v, partial, ulysses=ulysses, context=context, scale=scale, backend=backend)


def _degree(mesh, axis: str) -> int:
    if mesh is None:
        return 1
    shape = getattr(mesh, "shape", None)
    if isinstance(shape, collections.abc.Mapping):  # jax Mesh / AbstractMesh
        return int(shape.get(axis, 1))
    return int(getattr(mesh, axis, 1))  # MeshSpec


# --------------------------------------------------------------------------------------------
# The kernel: one (query block, key block) pair.
# --------------------------------------------------------------------------------------------

def _xla_attention(q, k, v, mask, scale, out_dtype, qk_mask=None):
    """Reference kernel. mask: None or bool broadcastable to (B, Sk); qk_mask: None or bool (Sq, Sk), a mask per
    (query, key) pair (the block-causal mask of :func:`attention`'s ``segments``). Returns (out, lse (B,H,Sq) f32).

    One (batch, head) pair at a time on the CPU (``lax.map``: the (Sq, Sk) scores stay in cache and
    the memory is one head's, not the whole (B, H, Sq, Sk) tensor), all at once elsewhere. The
    scale is folded into q (Sq x D multiplies instead of Sq x Sk) and the softmax is normalised
    after the second product (Sq x D divides instead of Sq x Sk).
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * h, x.shape[1], d)  # (B*H, S, D)
    valid = None
    if mask is not None:
        mask = jnp.broadcast_to(mask if mask.ndim == 2 else mask[None], (b, sk))
        valid = jnp.repeat(mask, h, axis=0)  # (B*H, Sk), batch-major like heads_first

    def one(qh, kh, vh, vm):
        logits = jnp.einsum("...qd,...kd->...qk", qh, kh, preferred_element_type=jnp.float32)
        if vm is not None:
            logits = jnp.where(vm[..., None, :], logits, -jnp.inf)
        if qk_mask is not None:
            logits = jnp.where(qk_mask, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with every key masked: keep exp() finite
        p = jnp.exp(logits - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("...qk,...kd->...qd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
        # A fully masked row has denom 0: output 0 and LSE -inf (log 0), never 0/0.
        return o / jnp.where(denom > 0, denom, 1.0), (jnp.log(denom) + m)[..., 0]

    args = (heads_first(qs), heads_first(k), heads_first(v))
    if jax.default_backend() == "cpu":
        if valid is None:
            out, lse = jax.lax.map(lambda a: one(*a, None), args)
        else:
            out, lse = jax.lax.map(lambda a: one(*a), args + (valid,))
    else:
        out, lse = one(*args, valid)
    out = jnp.swapaxes(out.reshape(b, h, sq, d), 1, 2).astype(out_dtype)
    return out, lse.reshape(b, h, sq)


def _cudnn_f32_lse(q, k, v, kv_len, scale):
    """cuDNN flash attention returning its softmax statistics in float32: (out, lse (B, H, Sq)), or None
    where this jax has no such entry point. ``jax.nn.dot_product_attention(return_residual=True)``
    rounds the statistics to the output dtype: in bf16 an LSE of 10-27 is then off by up to 0.06,
    and every log-sum-exp merge (the ring's, the joint attention's) weighs its partials 3-6% wrong.
    The kernel itself produces float32 statistics; jax's cuDNN module returns them as they are."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        return None
    b, sq = q.shape[:2]
    padded = kv_len is not None
    try:
        out, stats = fa.dot_product_attention(
            q, k, v, q_seqlen=jnp.full((b,), sq, jnp.int32) if padded else None, kv_seqlen=kv_len,
            scale=float(scale), mask_type=fa.MaskType.PADDING if padded else fa.MaskType.NO_MASK,
            return_residual=True)
    except (AttributeError, TypeError):  # another jax's private signature: the public entry point then
        return None
    return out, stats.astype(jnp.float32)  # (B, H, Sq): the kernel's own layout


def _cudnn_attention(q, k, v, kv_len, scale, out_dtype, need_lse, implementation="cudnn"):
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU); kv_len: None or int32 (B,)
    count of valid leading keys. Only prefix masks, which is what sequence padding needs. The LSE
    (``need_lse``) comes in float32 from jax's cuDNN module where it can (:func:`_cudnn_f32_lse`).
    ``implementation="xla"`` runs the same plumbing on any device (used by the tests)."""
    res = _cudnn_f32_lse(q, k, v, kv_len, scale) if need_lse and implementation == "cudnn" else None
    if res is not None:
        out, lse = res
    else:
        res = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=kv_len,
                                           implementation=implementation, return_residual=need_lse)
        if not need_lse:
            return res.astype(out_dtype), None
        out, lse = res
        lse = jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)  # (B, Sq, H) -> (B, H, Sq)
    if kv_len is not None:  # a block with no valid key: whatever the kernel gave, it counts for nothing
        empty = (kv_len <= 0)
        lse = jnp.where(empty[:, None, None], -jnp.inf, lse)
        out = jnp.where(empty[:, None, None, None], 0, out)
    return out.astype(out_dtype), lse


def block_attention(q, k, v, *, kv_start=0, valid_len=None, kv_valid=None, scale=None,
                    backend="xla", need_lse=True, out_dtype=None, kv_start_choices=None, segments=None):
    """Attention of a query block on a key block whose first key has global index ``kv_start``.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D). ``kv_start``: int or traced int32 scalar.
    ``valid_len``: static int or None; keys with global index ``>= valid_len`` are masked.
    ``kv_valid``: an extra bool (Sk,) or (B, Sk) key mask (xla backend only).
    ``kv_start_choices``: the static values a traced ``kv_start`` can take (the ring's block offsets),
    for kernels that need the count of valid keys static (``"mosaic"``: one branch per count).
    ``segments``: None or ``(q_segments (Sq,), kv_segments (Sk,))`` int32: key j is visible to query i only where
    ``kv_segments[j] <= q_segments[i]`` (a block-causal mask, :func:`attention`); it runs on the XLA kernel
    whatever ``backend`` says (no flash kernel here takes a mask per query), over chunks of
    :data:`SEGMENT_KEY_CHUNK` keys where there are more.
    Returns ``(out, lse)``: out (B, Sq, H, D) in ``out_dtype`` (default q's dtype), lse (B, H, Sq)
    float32 (``-inf`` for rows with no valid key, whose out is 0) or None when ``need_lse`` is
    false and the backend can skip it. This is the one place a flash kernel plugs in.
    """
    d = q.shape[-1]
    sk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out_dtype = q.dtype if out_dtype is None else out_dtype
    # Statically known: the whole block is valid (no mask to build).
    all_valid = valid_len is None or (isinstance(kv_start, int) and kv_start + sk <= valid_len)
    qk_mask = None
    if segments is not None:
        q_seg, kv_seg = segments
        if sk > SEGMENT_KEY_CHUNK:
            return _segment_attention_chunked(q, k, v, jnp.asarray(q_seg), jnp.asarray(kv_seg), kv_start,
                                              None if all_valid else valid_len, scale, out_dtype)
        qk_mask = jnp.asarray(kv_seg)[None, :] <= jnp.asarray(q_seg)[:, None]
        backend = "xla"
    if backend in ("cudnn", "pallas", "mosaic"):
        if kv_valid is not None:
            raise ValueError(f"backend={backend!r} takes only padding masks (valid_len), not kv_valid.")
        if backend == "mosaic":
            return _mosaic_block(q, k, v, kv_start, None if all_valid else valid_len, kv_start_choices,
                                 float(scale), jnp.dtype(out_dtype))
        n = None  # valid leading keys of this block
        if not all_valid:
            n = jnp.clip(valid_len - jnp.asarray(kv_start, jnp.int32), 0, sk).astype(jnp.int32)
        if backend == "pallas":
            return flash_attention(q, k, v, n, scale=float(scale), out_dtype=jnp.dtype(out_dtype))
        kv_len = None if n is None else jnp.broadcast_to(n, (q.shape[0],))
        return _cudnn_attention(q, k, v, kv_len, scale, out_dtype, need_lse)
    mask = None
    if not all_valid:
        mask = (jnp.asarray(kv_start, jnp.int32) + jnp.arange(sk, dtype=jnp.int32)) < valid_len
    if kv_valid is not None:
        mask = kv_valid if mask is None else jnp.logical_and(kv_valid, mask)
    return _xla_attention(q, k, v, mask, scale, out_dtype, qk_mask)


# Keys per step of the block-causal (segments) attention's loop: its scores are (B, H, Sq, this) float32 at a time,
# not (B, H, Sq, Sk) (SkyReels-V2-DF-1.3B at 97 x 544 x 960 with CFG, one device: 10 GB a step, not 250 GB).
SEGMENT_KEY_CHUNK = 2048


def _segment_attention_chunked(q, k, v, q_seg, kv_seg, kv_start, valid_len, scale, out_dtype):
    """:func:`block_attention` with ``segments`` over key chunks of :data:`SEGMENT_KEY_CHUNK` (a ``lax.scan``, the
    partials merged by the log-sum-exp rule): the same result, the memory of one chunk's scores."""
    b, sk, h, d = k.shape
    c = SEGMENT_KEY_CHUNK
    n = -(-sk // c)
    pad = n * c - sk
    if pad:  # padded keys: a segment id above every query's, so masked
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        kv_seg = jnp.pad(kv_seg, (0, pad), constant_values=jnp.iinfo(jnp.int32).max)
    chunks = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)  # noqa: E731
    starts = jnp.arange(n, dtype=jnp.int32) * c

    def body(carry, xs):
        kc, vc, segc, j0 = xs
        mask = None if valid_len is None else \
            (jnp.asarray(kv_start, jnp.int32) + j0 + jnp.arange(c, dtype=jnp.int32)) < valid_len
        o, lse = _xla_attention(q, kc, vc, mask, scale, jnp.float32, segc[None, :] <= q_seg[:, None])
        return merge_partials(*carry, o, lse), None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, q.shape[1]), -jnp.inf, jnp.float32))
    (out, lse), _ = lax.scan(body, init, (chunks(k), chunks(v), kv_seg.reshape(n, c), starts))
    return out.astype(out_dtype), lse


def _mosaic_block(q, k, v, kv_start, valid_len, kv_start_choices, scale, out_dtype):
    """The ``"mosaic"`` kernel (:mod:`xdit_jax.parallel.mosaic_attention`) takes a static count of valid
    leading keys: with a traced ``kv_start`` (the ring's blocks) one branch per count its choices give."""
    sk = k.shape[1]
    tiles = default_tiles()  # a static argument: a change of tiles retraces
    run = lambda n: fa3_attention(q, k, v, n, scale=scale, out_dtype=out_dtype, tiles=tiles)  # noqa: E731
    if valid_len is None:
        return run(None)
    if isinstance(kv_start, int):
        return run(valid_len - kv_start)
    if kv_start_choices is None:
        raise ValueError("backend='mosaic' needs the values a traced kv_start can take (kv_start_choices).")
    counts = sorted({min(max(valid_len - int(s), 0), sk) for s in kv_start_choices})
    if len(counts) == 1:
        return run(counts[0])
    n = jnp.clip(valid_len - jnp.asarray(kv_start, jnp.int32), 0, sk)
    index = jnp.searchsorted(jnp.asarray(counts, jnp.int32), n)
    return lax.switch(index, [functools.partial(run, c) for c in counts])


def local_attention(q, k, v, *, kv_valid=None, scale=None, return_lse=False, valid_len=None):
    """Softmax attention on one device. q: (B, Sq, H, D); k, v: (B, Sk, H, D).

    Logits and softmax in float32 whatever the input dtype; the output has q's dtype.
    ``kv_valid``: optional bool (Sk,) or (B, Sk) mask of keys that may be attended.
    ``valid_len``: optional int, keys at index >= valid_len are masked.
    ``return_lse``: also return the log-sum-exp of the logits, (B, H, Sq) float32.
    """
    out, lse = block_attention(q, k, v, valid_len=valid_len, kv_valid=kv_valid, scale=scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Sequence parallelism (inside shard_map).
# --------------------------------------------------------------------------------------------

def merge_partials(out, lse, out_b, lse_b):
    """Merge two normalized partial attentions over disjoint key sets (log-sum-exp rule).

    out*: (B, Sq, H, D) float32, lse*: (B, H, Sq) float32. Rows where both LSEs are -inf stay
    (0, -inf); no NaN is created.
    """
    mx = jnp.maximum(lse, lse_b)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    wa, wb = jnp.exp(lse - mx), jnp.exp(lse_b - mx)  # each <= 1, at least one == 1 unless both -inf
    tot = wa + wb
    new_lse = mx + jnp.log(tot)
    inv = 1.0 / jnp.where(tot > 0, tot, 1.0)
    to_out = lambda w: jnp.transpose(w * inv, (0, 2, 1))[..., None]  # (B,H,Sq) -> (B,Sq,H,1)
    return out * to_out(wa) + out_b * to_out(wb), new_lse


def _ring_attention(q, k, v, *, ring, valid_len, scale, backend, counts=None, return_lse=False, segments=None,
                    kv_segments=None):
    """q, k, v: the local contiguous chunk ``r`` (of ``ring``) of the sequence, (B, Sc, H, D).

    ``counts`` (PipeFusion's buffers, whose blocks are no contiguous chunks): a static array of the
    number of valid leading keys of each ring position's block, instead of ``valid_len``.

    Step i (0..ring-1) uses the K/V block that came from ring position ``(r - i) % ring`` (blocks
    move r -> r+1). Each step's block is sent on *before* it is used, so the transfer of block
    i+1 and the compute of block i are independent and XLA may overlap them. ``ring - 1`` sends of
    K and V in all: step 0 outside the loop, steps 1..ring-2 in a ``fori_loop``, the last outside
    (it sends nothing). Partial results are kept in float32. ``return_lse``: return the float32
    ``(out, lse)`` (for a further merge) instead of ``out`` in q's dtype. ``segments``: the queries' block-causal
    ids; ``kv_segments``: the local keys' (travelling the ring with them; default ``segments``: self-attention).
    """
    sc = k.shape[1]
    r = lax.axis_index(RING_AXIS)
    perm = [(i, (i + 1) % ring) for i in range(ring)]

    def compute(kv, i):
        j = (r - i) % ring
        if counts is not None and not (np.asarray(counts) == sc).all():  # n valid keys: start n before the end
            start, limit = sc - jnp.asarray(counts, jnp.int32)[j], sc
            choices = tuple(sc - int(c) for c in counts)
        else:
            start, limit = j * sc, (None if counts is not None else valid_len)
            choices = tuple(x * sc for x in range(ring))
        return block_attention(q, kv[0], kv[1], kv_start=start, valid_len=limit, scale=scale,
                               backend=backend, need_lse=True, out_dtype=jnp.float32, kv_start_choices=choices,
                               segments=None if segments is None else (segments, kv[2]))

    kv = (k, v) if segments is None else (k, v, segments if kv_segments is None else kv_segments)
    nxt = lax.ppermute(kv, RING_AXIS, perm)
    out, lse = compute(kv, 0)

    def body(i, carry):
        kv, out, lse = carry
        nxt = lax.ppermute(kv, RING_AXIS, perm)
        o, l = compute(kv, i)
        out, lse = merge_partials(out, lse, o, l)
        return nxt, out, lse

    if ring > 2:
        nxt, out, lse = lax.fori_loop(1, ring - 1, body, (nxt, out, lse))
    o, l = compute(nxt, ring - 1)
    out, lse = merge_partials(out, lse, o, l)
    return (out, lse) if return_lse else out.astype(q.dtype)


def _pad_heads(x, hp):
    h = x.shape[2]
    return x if h == hp else jnp.pad(x, ((0, 0), (0, 0), (0, hp - h), (0, 0)))


def _over_heads(q, k, v, partial, *, ulysses, context=None, scale=None, backend="xla", ring: int = 1,
                context_valid: int | None = None):
    """The Ulysses frame around a sequence partial: with ``ulysses > 1``, ``all_to_all`` from
    sequence-sharded (B, S/(R*U), H, D) to head-sharded (B, S/R, Hp/U, D) (heads zero-padded to a
    multiple of the degree: the ring group's contiguous chunk, in ulysses order, for this device's
    heads), ``partial(rows, k, v, need_lse)`` there, and back (padded heads dropped).

    ``context = (cq, ck, cv, c_mask)`` (bool (B, Sc) key mask, or None: all kept): tokens every device
    holds whole; each device takes its heads of them (a local slice, no traffic), the context queries ride along
    as extra rows of the sequence's partial, one more partial over the context keys is merged by the
    log-sum-exp rule, and the context's output heads are all-gathered at the end. Then returns
    ``(out, out_context or None)``.

    ``context_valid`` (an int): the context is sharded over (ring, ulysses) like the sequence instead, each
    device holding its slice (the slices padded to equal lengths, ``context_valid`` real tokens in all, the
    mask ``c_mask`` the whole context's): the slices' heads are swapped as the sequence's (the ring group's
    part of the context for this device's heads), the keys and values all-gathered over the ring (the whole
    context), the slice's queries ride along, and their output goes back by the reverse swap."""
    h = q.shape[2]
    hp = -(-h // ulysses) * ulysses
    if ulysses > 1:
        q, k, v = (lax.all_to_all(_pad_heads(x, hp), ULYSSES_AXIS, 2, 1, tiled=True) for x in (q, k, v))
    if context is None:
        out = partial(q, k, v, False)
        return lax.all_to_all(out, ULYSSES_AXIS, 1, 2, tiled=True)[:, :, :h] if ulysses > 1 else out
    cq, ck, cv, c_mask = context
    if context_valid is not None:  # slices of the context: this device's heads of the whole of it
        if ulysses > 1:
            swap = lambda x: lax.all_to_all(_pad_heads(x, hp), ULYSSES_AXIS, 2, 1, tiled=True)  # noqa: E731
            ck, cv = swap(ck), swap(cv)
            cq = None if cq is None else swap(cq)
        if ring > 1:
            ck, cv = (lax.all_gather(x, RING_AXIS, axis=1, tiled=True) for x in (ck, cv))
        lp = ck.shape[1]
        if c_mask is not None:
            c_mask = jnp.pad(c_mask.astype(bool), ((0, 0), (0, lp - c_mask.shape[1])))
        if context_valid < lp:
            real = jnp.arange(lp) < context_valid
            c_mask = jnp.broadcast_to(real, (q.shape[0], lp)) if c_mask is None else c_mask & real
    elif ulysses > 1:
        per = hp // ulysses
        mine = lambda x: lax.dynamic_slice_in_dim(_pad_heads(x, hp), lax.axis_index(ULYSSES_AXIS) * per, per,
                                                  axis=2)
        ck, cv = mine(ck), mine(cv)
        cq = None if cq is None else mine(cq)
    n = q.shape[1]
    rows = q if cq is None else jnp.concatenate([q, cq.astype(q.dtype)], axis=1)
    out, lse = partial(rows, k, v, True)
    out_c, lse_c = _context_partial(rows, ck.astype(k.dtype), cv.astype(v.dtype), c_mask, scale, backend)
    out, _ = merge_partials(out, lse, out_c, lse_c)
    out = out.astype(q.dtype)
    seq_out, ctx_out = out[:, :n], (None if cq is None else out[:, n:])
    if ulysses > 1:
        seq_out = lax.all_to_all(seq_out, ULYSSES_AXIS, 1, 2, tiled=True)[:, :, :h]
        if ctx_out is not None and context_valid is not None:  # back to this device's slice, every head
            ctx_out = lax.all_to_all(ctx_out, ULYSSES_AXIS, 1, 2, tiled=True)[:, :, :h]
        elif ctx_out is not None:
            ctx_out = lax.all_gather(ctx_out, ULYSSES_AXIS, axis=2, tiled=True)[:, :, :h]
    return seq_out, ctx_out


def _sequence_parallel_attention(q, k, v, *, ring, ulysses, valid_len, scale, backend, context=None,
                                 context_valid=None, segments=None):
    """Ulysses (:func:`_over_heads`) around the ring (or one kernel call) over the ring group's chunk.

    With a ``context`` (joint two-stream attention): every query — the local sequence rows and the
    context rows — attends to the keys of the whole sequence and of the context; with ``ring > 1``
    every ring device computes the context rows in full (each sees every key block), a few extra rows
    next to the sequence's. Returns ``out`` (B, S_local, H, D), or ``(out, out_context (B, Sc, H, D) or
    None)`` with a context. ``segments`` (S_local,) int32: block-causal segment ids of the local tokens
    (:func:`attention`), all-gathered over ``ulysses`` to the ring group's chunk the swap gives each device."""
    if segments is not None and ulysses > 1:
        segments = lax.all_gather(segments, ULYSSES_AXIS, axis=0, tiled=True)

    def partial(rows, k, v, need_lse):
        if ring > 1:
            return _ring_attention(rows, k, v, ring=ring, valid_len=valid_len, scale=scale, backend=backend,
                                   return_lse=need_lse, segments=segments)
        out = block_attention(rows, k, v, valid_len=valid_len, scale=scale, backend=backend, need_lse=need_lse,
                              out_dtype=jnp.float32 if need_lse else None,
                              segments=None if segments is None else (segments, segments))
        return out if need_lse else out[0]

    return _over_heads(q, k, v, partial, ulysses=ulysses, context=context, scale=scale, backend=backend, ring=ring,
                       context_valid=context_valid)


def _context_partial(rows, ck, cv, c_mask, scale, backend):
    """The partial attention (float32 out, LSE) of ``rows`` on the context keys that ``c_mask`` (B, Sc) keeps.

    The XLA kernel takes any mask. With ``backend="cudnn"`` the keys are first reordered per sample so
    the kept ones lead (a stable sort; the order of keys does not change attention), and cuDNN's
    flash kernel takes the per-sample count of kept keys: no (rows x Sc) float32 scores in memory
    (2.2 GB per layer for Mochi's 44k video rows x 256 caption tokens x 24 heads x 2). The Pallas
    kernel takes one count for the whole batch, so it uses the XLA kernel here; the Mosaic kernel takes no
    mask, so cuDNN's path on a GPU (:func:`_masks_on_cudnn`), the XLA kernel elsewhere. ``c_mask`` None: every
    context key is kept (SD3, FLUX): the backend's kernel as it is, no mask, no reordering.
    """
    if c_mask is None:
        return block_attention(rows, ck, cv, scale=scale, backend=backend, need_lse=True, out_dtype=jnp.float32)
    if _masks_on_cudnn(backend, rows.dtype):
        order = jnp.argsort(jnp.logical_not(c_mask), axis=1, stable=True)[:, :, None, None]
        ck, cv = jnp.take_along_axis(ck, order, axis=1), jnp.take_along_axis(cv, order, axis=1)
        n = jnp.sum(c_mask, axis=1, dtype=jnp.int32)
        d = rows.shape[-1]
        return _cudnn_attention(rows, ck, cv, n, d ** -0.5 if scale is None else scale, jnp.float32, True)
    return block_attention(rows, ck, cv, kv_valid=c_mask, scale=scale, backend="xla", need_lse=True,
                           out_dtype=jnp.float32)


def _masks_on_cudnn(backend: str, dtype) -> bool:
    """Whether attentions with an arbitrary key mask (a caption's) go to cuDNN: under the cuDNN backend, and
    under the Mosaic one on a GPU in bf16/fp16 (its kernel takes no mask; cuDNN is there and faster than the
    XLA kernel's explicit scores)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return backend == "cudnn" or (backend == "mosaic" and half and jax.default_backend() == "gpu")


def _check_context(context, q, mask_len=None):
    """``context`` checked; ``mask_len``: the mask's length where it is not the context's (PipeFusion's text
    slice: the mask is the whole text's)."""
    if len(context) != 4:
        raise ValueError("context must be (cq or None, ck, cv, c_mask).")
    cq, ck, cv, c_mask = context
    b, _, h, d = q.shape
    if ck.ndim != 4 or ck.shape != cv.shape or ck.shape[0] != b or ck.shape[2:] != (h, d) \
            or (cq is not None and cq.shape != ck.shape):
        raise ValueError(f"context q/k/v must be (B, Sc, H, D) with q's B, H, D {(b, h, d)}; got "
                         f"{None if cq is None else cq.shape}, {ck.shape}, {cv.shape}.")
    if c_mask is None:  # every context key kept
        return cq, ck, cv, None
    c_mask = jnp.asarray(c_mask)
    want = (b, ck.shape[1] if mask_len is None else mask_len)
    if c_mask.dtype != jnp.bool_ or c_mask.shape != want:
        raise ValueError(f"context mask must be bool (B, Sc) = {want}; got {c_mask.dtype} "
                         f"{c_mask.shape}.")
    return cq, ck, cv, c_mask


def attention(q, k, v, *, valid_len: int | None = None, scale=None, kv_valid=None, context=None, segments=None):
    """Attention over the joint sequence, sharded as the installed :class:`AttentionConfig` says.

    q, k, v: the LOCAL (B, S_local, H, D) shard (see the module docstring for the layout).
    ``valid_len``: static number of real tokens of the GLOBAL sequence (keys beyond are padding).
    ``scale``: logit scale, default ``D ** -0.5``. ``kv_valid``: a local key mask, only without
    sequence parallelism. Returns (B, S_local, H, D) in q's dtype.

    ``context``: ``(cq, ck, cv, c_mask)``, tokens that every device holds whole (B, Sc, H, D) — a
    text caption of a two-stream model such as Mochi — which join the attention: the sequence's
    queries also attend to the context keys (``c_mask``: bool (B, Sc), True = may be attended; None: all), and
    the context queries ``cq`` (None: not wanted) attend to the whole sequence and the context: one
    softmax over ``[sequence; kept context tokens]`` per sample. Then returns ``(out, out_context)``
    (``out_context`` None when ``cq`` is). Under PipeFusion the context joins the buffers' keys.

    ``segments``: int32 (S_local,), one id per local token (sharded with them, global ids): a block-causal mask,
    key j visible to query i only where ``segments[j] <= segments[i]`` (SkyReels-V2's diffusion forcing: a
    token's causal block of frames). Exact on every ``ulysses`` / ``ring`` mesh (the ids all-gathered over
    ``ulysses``, travelling the ring with their K/V); under PipeFusion against the buffered keys' ids
    (:func:`kv_cache`'s ``segments``); not with a context. The XLA kernel computes it whatever the backend
    (:func:`block_attention`).

    With ``ring`` or ``ulysses`` > 1 this must be traced inside a ``shard_map`` over the installed
    mesh (it uses the collectives of the ``ring`` / ``ulysses`` axes).
    """
    if not (q.ndim == k.ndim == v.ndim == 4) or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention wants q (B,Sq,H,D) and k, v (B,Sk,H,D); got {q.shape}, {k.shape}, {v.shape}.")
    cfg = current_config()
    if valid_len is None:
        valid_len = cfg.valid_len
    if valid_len is not None and not isinstance(valid_len, int):
        raise TypeError(f"valid_len must be a static Python int, got {type(valid_len).__name__}.")
    ring, ulysses = cfg.degree(RING_AXIS), cfg.degree(ULYSSES_AXIS)
    cell = _KV_CELL.get()
    if segments is not None:
        if context is not None or kv_valid is not None:
            raise ValueError("attention's block-causal segments take neither a context nor kv_valid.")
        if cell is not None and cell.kv_segments is None:
            raise NotImplementedError("This PipeFusion stage has no segment ids for its buffered keys "
                                      "(run_pipefusion's segments=): a block-causal mask needs them.")
        segments = jnp.asarray(segments, jnp.int32)
        if segments.shape != (q.shape[1],) or q.shape[1] != k.shape[1]:
            raise ValueError(f"segments must be (S_local,) = ({q.shape[1]},) for self-attention; got "
                             f"{segments.shape}, k of length {k.shape[1]}.")
    if context is not None:
        if kv_valid is not None:
            raise ValueError("attention with a context takes the sequence's padding as valid_len, not kv_valid.")
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"joint attention wants q and k of one length; got {q.shape[1]} and {k.shape[1]}.")
        if cell is not None:
            mask_len = cell.c_valid if cell.ck is not None else None
        else:
            mask_len = cfg.context_valid if ring * ulysses > 1 else None
        context = _check_context(context, q, mask_len)
    if cell is not None:  # a PipeFusion stage: q, k, v are one patch; keys are the whole sequence
        if kv_valid is not None:
            raise NotImplementedError("PipeFusion takes padding masks only.")
        return _cached_attention(cell, q, k, v, valid_len=valid_len, scale=scale, backend=cfg.backend,
                                 ulysses=ulysses, ring=ring, context=context, segments=segments)
    if context is not None:
        try:
            return _sequence_parallel_attention(q, k, v, ring=ring, ulysses=ulysses, valid_len=valid_len,
                                                scale=scale, backend=cfg.backend, context=context,
                                                context_valid=cfg.context_valid if ring * ulysses > 1 else None)
        except NameError as e:
            raise RuntimeError(f"attention with ring={ring}, ulysses={ulysses} must run inside a shard_map "
                               f"over the installed mesh (axes 'ring', 'ulysses' bound): {e}") from e
    if ring == 1 and ulysses == 1:
        out, _ = block_attention(q, k, v, valid_len=valid_len, kv_valid=kv_valid, scale=scale,
                                 backend=cfg.backend, need_lse=False,
                                 segments=None if segments is None else (segments, segments))
        return out
    if kv_valid is not None:
        raise ValueError("kv_valid is a local key mask; with sequence parallelism pass valid_len.")
    if q.shape[1] != k.shape[1]:
        raise ValueError("sequence-parallel attention is self-attention over one joint sequence: "
                         f"q and k must have the same local length, got {q.shape[1]} and {k.shape[1]}.")
    try:
        return _sequence_parallel_attention(q, k, v, ring=ring, ulysses=ulysses, valid_len=valid_len,
                                            scale=scale, backend=cfg.backend, segments=segments)
    except NameError as e:  # unbound axis name: traced outside shard_map
        raise RuntimeError(f"attention with ring={ring}, ulysses={ulysses} must run inside a shard_map "
                           f"over the installed mesh (axes 'ring', 'ulysses' bound): {e}") from e


# --------------------------------------------------------------------------------------------
# Cross-attention to a context every device holds whole (a text caption).
# --------------------------------------------------------------------------------------------

def cross_attention(q, k, v, *, kv_mask=None, scale=None):
    """Attention of the LOCAL queries on keys/values that every device holds whole (e.g. the text
    caption of PixArt's cross-attention). Each query row needs only its own row and the context, so
    this is local under every mesh: no collective whatever the ring / ulysses degrees, and neither
    the installed ``valid_len`` (padding of the *query* sequence: padded rows give finite garbage that
    the caller drops) nor PipeFusion's K/V buffers (the context is the same at every step) apply.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D). ``kv_mask``: optional bool (B, Sk) or (Sk,), True = may be
    attended; a row whose keys are all masked gives 0 (callers that want diffusers' additive -10000
    bias semantics — a uniform average then — unmask such rows first). ``scale``: default D ** -0.5.
    Returns (B, Sq, H, D) in q's dtype; logits and softmax in float32.

    Kernel: cuDNN flash attention where the installed backend is ``cudnn`` (a GPU in bf16/fp16), the
    text mask as an additive bias of (B, 1, Sq, Sk) (an arbitrary per-sample mask, not only a prefix:
    :func:`_cudnn_masked`), also under the ``mosaic`` backend on a GPU; the XLA kernel otherwise (Pallas
    too: it takes prefix masks only). On an
    H100 the XLA kernel's explicit float32 scores took a quarter of PixArt-Sigma's 1024px step.
    """
    if not (q.ndim == k.ndim == v.ndim == 4) or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"cross_attention wants q (B,Sq,H,D) and k, v (B,Sk,H,D); got {q.shape}, {k.shape}, "
                         f"{v.shape}.")
    if kv_mask is not None:
        kv_mask = jnp.asarray(kv_mask)
        if kv_mask.dtype != jnp.bool_ or kv_mask.shape not in ((k.shape[1],), (k.shape[0], k.shape[1])):
            raise ValueError(f"kv_mask must be bool (Sk,) or (B, Sk) = {(k.shape[0], k.shape[1])}; "
                             f"got {kv_mask.dtype} {kv_mask.shape}.")
    backend = current_config().backend
    if _masks_on_cudnn(backend, q.dtype) and q.dtype in (jnp.bfloat16, jnp.float16):
        return _cudnn_masked(q, k, v, kv_mask, scale)
    out, _ = block_attention(q, k, v, kv_valid=kv_mask, scale=scale, backend="xla", need_lse=False)
    return out


def _cudnn_masked(q, k, v, kv_mask, scale, implementation="cudnn"):
    """``jax.nn.dot_product_attention`` with a per-sample key mask (B, Sk) or (Sk,): cuDNN takes it as a
    large negative bias of (B, 1, Sq, Sk) (its bias wants the full Sq x Sk; a few MB for a caption). A
    row whose keys are all masked gives 0, as the XLA path's. ``implementation="xla"`` runs the same
    plumbing on any device (the tests)."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kv_mask is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation).astype(q.dtype)
    keep = jnp.broadcast_to(kv_mask, (b, sk))
    out = jax.nn.dot_product_attention(q, k, v, mask=jnp.broadcast_to(keep[:, None, None, :], (b, 1, sq, sk)),
                                       scale=scale, implementation=implementation)
    return jnp.where(jnp.any(keep, axis=-1)[:, None, None, None], out, 0).astype(q.dtype)
