"""PipeFusion: the block stack split into stages over the ``pipefusion`` axis, the sequence into patches.

PipeFusion (xDiT; "PipeFusion: Patch-level Pipeline Parallelism for Diffusion Transformers") runs
a diffusion step as a pipeline: each device of the ``pipefusion`` axis holds one stage, a
contiguous run of the stacked blocks; the joint sequence is cut into ``M`` patches that flow
through the stages one tick apart (stage ``s`` works on patch ``tick - s``; the activations move
on with a ``ppermute``). Attention inside a stage sees the *whole* sequence: every layer keeps
K/V buffers of the full (padded) sequence. A patch's fresh K/V go into them before its attention,
so the patches before it in this step are fresh and those after it one diffusion step old
("displaced patch parallelism": neighbouring steps' activations differ little). The first warm-up
steps run the whole sequence at once: exact, and they fill the buffers.

So a patched step is NOT the one-device output; it equals the same rule run sequentially on one
device (:func:`run_pipefusion` without a mesh, same patches). The tests check that, and the
exactness of warm-up steps, on every mesh. Padding: patches have equal lengths, multiples of
``lcm(8, ring * ulysses)`` (:func:`padded_length`); padded keys are masked, padded rows dropped.

Models take no part: the block stack's scan (:func:`layer_scan`) carries the buffers, and the
attention op stores the patch and reads the buffers while
:func:`xdit_jax.parallel.attention.kv_cache` is installed. What passes from stage to stage is the
scan's carry: the patch's tokens, and for a two-stream model (Mochi, SD3, FLUX) the text stream too.
The text is cut into as many slices as patches, slice ``m`` riding with patch ``m`` (``text=``; its K/V
buffered like the image's, so each text token is computed once a step and attends, as the image's do,
to this step's slices before it and the last step's after it); without ``text`` each patch carries a copy
of the whole text (computed once per patch; also what runs on CPU ring > 1 meshes: :func:`slices_text`). A
block that ends the stack after the scan (their
``context_pre_only`` last block) goes through :func:`final_block`: its result counts on the last stage,
and it has K/V buffers of its own.

Several stacks (FLUX's double- then single-stream blocks, SD3.5 Medium's runs of dual-attention and plain
blocks, HunyuanDiT's down, mid and skip blocks) run *looped*: each stack is split over all the stages and a
patch goes round them once per stack, the last stage handing the carry to the first
(:func:`run_pipefusion`); the carry must then be alike for all stacks (FLUX: (patch, its text slice);
HunyuanDiT: (patch, its long skips)). A block that attends more than once (SD3.5 Medium's dual attention) keeps a
buffer row per attention (:func:`init_cache`'s ``attentions``). SANA's blocks mix tokens without softmax
self-attention (linear attention, a 3x3 conv on the token grid): their cache is the ops' own buffers
(:func:`init_mixing`, :class:`xdit_jax.parallel.token_mixing.MixingBuffers`: the linear attention's per-patch sums,
the conv's input), which ride in the scan's carry as K/V do and follow the same rule (fresh before the patch, a step
old after it; filled by the warm-up steps).

Other axes: ``data`` and ``cfg`` split the batch as everywhere. ``ulysses`` and ``ring`` (PipeFusion
x USP, as xDiT's hybrid) split each patch over the sequence group; the buffers are split over
heads for Ulysses and by patch part for the ring (ring position ``r`` keeps part ``r`` of every
patch, so a patch is stored where it was computed, and the ring visits every position's buffer
with its count of real keys). Any ``pipefusion`` degree up to the number of layers: where it does
not divide them, stages differ by one layer (:func:`stage_layout`; the stack is padded to equal
stages and the padding layers are skipped).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from xdit_jax.parallel.attention import AttentionConfig, attention_context, kv_cache
from xdit_jax.parallel.token_mixing import MixingBuffers, mixing_state

AXIS = "pipefusion"
BATCH_AXES = ("data", "cfg")


@dataclasses.dataclass
class StackCache:
    """The K/V buffers of a whole block stack, (layers, B, S, H, D) each, and where this call's
    patch sits (``start``, traced) and whether its K/V are stored (``write``: False on idle ticks)."""

    k: jax.Array
    v: jax.Array
    start: jax.Array
    write: jax.Array
    real: jax.Array | None = None  # (layers,) bool: False for the padding of an uneven stage
    ring_counts: np.ndarray | None = None  # ring > 1: real keys in each ring position's buffer
    first: jax.Array | bool = True  # this is the first stage: the scan starts from the model's own carry
    recv: object = None  # the scan's carry as the previous stage left it (None: take the model's)
    tail: tuple | None = None  # (k, v) buffers (1, B, S, H, D) of the final block, or None
    stream: object = None  # set by layer_scan: its output carry, what goes on to the next stage
    stack: int = 0  # which of the model's stacked scans runs in this call (the others pass their carry on)
    last: bool = True  # that scan is the model's last one (a final block after it counts)
    scans: int = 0  # the stacked scans seen so far in this call
    final_used: bool = False
    # the text sliced with the patches (run_pipefusion's ``text``): its K/V buffers (layers, B, L_pad, H, D), where
    # this call's slice starts, its real rows (the tail's text buffers follow the tail's K/V in ``tail``)
    ck: jax.Array | None = None
    cv: jax.Array | None = None
    c_start: object = 0
    c_valid: int | None = None
    # SANA's token mixers (linear attention, grid conv): their buffers (token_mixing.MixingBuffers), and
    # (patch, patches, patch length, warm-up token table or None) for token_mixing.mixing_state
    mix: MixingBuffers | None = None
    mix_info: tuple | None = None
    # a block-causal mask (run_pipefusion's ``segments``): the segment ids of this device's buffer keys, or None
    kv_segments: jax.Array | None = None

    def text(self, ck, cv):
        return None if ck is None else (ck, cv, self.c_start, self.c_valid)


_STACK: contextvars.ContextVar[StackCache | None] = contextvars.ContextVar("xdit_jax_stack_cache", default=None)


@contextlib.contextmanager
def stack_cache(cache: StackCache):
    token = _STACK.set(cache)
    try:
        yield cache
    finally:
        _STACK.reset(token)


def layer_scan(layer_fn, carry, stacked_state):
    """``carry = layer_fn(carry, layer_state)`` over the leading (layer) axis with ``lax.scan``.

    While a PipeFusion stage is traced (:func:`stack_cache` installed) the stage's K/V buffers ride
    in the scan's carry and each layer's attention updates its layer of them in place (installed
    with :func:`xdit_jax.parallel.attention.kv_cache`); otherwise a plain scan. A model with several
    stacks (FLUX: double-, then single-stream blocks) calls this once per stack; a PipeFusion call
    runs one of them (``cache.stack``) and passes the carry through the others untouched.
    """
    cache = _STACK.get()
    if cache is None:
        carry, _ = lax.scan(lambda c, s: (layer_fn(c, s), None), carry, stacked_state)
        return carry
    index, cache.scans = cache.scans, cache.scans + 1
    if index != cache.stack:  # another stack's turn (the code between stacks must pass the carry on unchanged)
        return carry
    if cache.recv is not None:  # a later stage continues from where the previous one left the carry
        carry = jax.tree.map(lambda own, got: jnp.where(cache.first, own, got.astype(own.dtype)), carry, cache.recv)

    layers_here = jax.tree.leaves(stacked_state)[0].shape[0]
    per = cache.k.shape[0] // layers_here  # buffer rows per layer: one per attention the block makes
    if per * layers_here != cache.k.shape[0]:
        raise ValueError(f"K/V buffers of {cache.k.shape[0]} rows for {layers_here} stacked layers on this stage: "
                         "init_cache takes the layer slots and the attentions per layer of each stack.")

    def body(c, xs):  # the buffers ride in the carry: updated in place, one copy alive
        c, k, v, ck, cv, mx = c
        s, layer, real = xs
        with contextlib.ExitStack() as installed:
            cell = installed.enter_context(kv_cache(k, v, layer * per, cache.start, cache.write, cache.ring_counts,
                                                    per, text=cache.text(ck, cv), segments=cache.kv_segments))
            mcell = None
            if mx is not None:  # the token mixers' buffers (SANA)
                patch, patches, plen, warm = cache.mix_info
                mcell = installed.enter_context(mixing_state(mx, layer, patch, cache.write, patches=patches,
                                                             plen=plen, warm=warm))
            out = layer_fn(c, s)
        if not cell.consumed:
            raise RuntimeError(f"A PipeFusion block made {cell.calls} attentions; its stack's K/V buffers hold "
                               f"{per} per layer (init_cache's attentions).")
        if mcell is not None:
            if not mcell.consumed:
                raise RuntimeError(f"A PipeFusion block made {mcell.la_calls} linear attentions and "
                                   f"{mcell.conv_calls} grid convolutions; its token-mixing buffers hold one of each "
                                   "per layer.")
            mx = MixingBuffers(mcell.la, mcell.conv, mx.halo)
        if cache.real is not None:  # a padding layer of an uneven stage passes its input on
            out = jax.tree.map(lambda a, b: jnp.where(real, a, b), out, c)
        return (out, cell.k, cell.v, cell.ck, cell.cv, mx), None

    layers = jnp.arange(layers_here, dtype=jnp.int32)
    real = cache.real if cache.real is not None else jnp.ones(layers.shape, bool)
    (carry, cache.k, cache.v, cache.ck, cache.cv, cache.mix), _ = lax.scan(
        body, (carry, cache.k, cache.v, cache.ck, cache.cv, cache.mix), (stacked_state, layers, real))
    cache.stream = carry
    return carry


def final_block(fn, carry):
    """``fn(carry)``: a block that runs once after the stacked scan and ends the stack (a two-stream
    model's ``context_pre_only`` last block, which drops the text stream); its result is what
    ``blocks()`` returns.

    Under PipeFusion (:func:`stack_cache` installed) its result counts on the last stage only (the
    other stages pass the scan's carry on), attending to the whole sequence through its own K/V
    buffer (``cache.tail``); elsewhere a plain call. Every stage computes it (one block more per
    stage): under a ``lax.cond`` the stages that skip it would miss the collectives inside it (the
    ring's ``ppermute`` spans the stages on some backends) and the others would wait for them.
    """
    cache = _STACK.get()
    if cache is None:
        return fn(carry)
    if not cache.last:  # a call for an earlier stack: its result is not used
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, carry))
    if cache.tail is None:
        raise RuntimeError("This model ends its stack with a final block: PipeFusion needs K/V buffers for it "
                           "(init_cache(..., tail=True)).")
    if cache.final_used:
        raise NotImplementedError("PipeFusion supports one final block after the stacked scan.")
    cache.final_used = True
    tk, tv, *text = cache.tail  # (k, v), then the text's (ck, cv) where the text is sliced
    with kv_cache(tk, tv, 0, cache.start, cache.write, cache.ring_counts, tk.shape[0],
                  text=cache.text(*text) if text else None, segments=cache.kv_segments) as cell:
        y = fn(carry)
    if not cell.consumed:
        raise RuntimeError(f"The final block made {cell.calls} attentions; its K/V buffers hold "
                           f"{cell.slots} (init_cache's tail_attentions).")
    cache.tail = (cell.k, cell.v) + ((cell.ck, cell.cv) if text else ())
    return y


def stage_layout(num_layers: int, stages: int) -> np.ndarray:
    """Which layer sits at each slot of the stack padded to equal stages: ``stages * ceil(L / stages)``
    slots, stage ``s`` owning slots ``[s * per, (s + 1) * per)``; -1 marks padding. Stage sizes
    differ by at most one layer (the first ``L % stages`` stages hold one more); the identity where
    ``stages`` divides ``L``."""
    per = -(-num_layers // stages)
    order, first = [], 0
    for st in range(stages):
        size = num_layers // stages + (st < num_layers % stages)
        order += list(range(first, first + size)) + [-1] * (per - size)
        first += size
    return np.asarray(order, np.int32)


def stack_names(stacked) -> tuple[str, ...]:
    """The model's stacked block subtrees, in the order its scans run: a name, or a tuple of them."""
    return (stacked,) if isinstance(stacked, str) else tuple(stacked)


def stack_sizes(num_layers) -> tuple[int, ...]:
    """Layers per stack: an int (one stack) or a tuple of them."""
    return (int(num_layers),) if np.ndim(num_layers) == 0 else tuple(int(n) for n in num_layers)


def stack_slots(num_layers, stages: int) -> tuple[int, ...]:
    """Each stack's slots padded to equal stages (:func:`stage_layout`)."""
    return tuple(len(stage_layout(n, stages)) for n in stack_sizes(num_layers))


def pad_stack(tree, stacked, stages: int, shardings=None):
    """``tree`` (a model state or params dict) with the leaves under each of the ``stacked`` names laid
    out by :func:`stage_layout` (padding slots hold a copy of the stack's layer 0; they are skipped),
    placed with ``shardings`` (a pytree like ``tree``, or None). Unchanged where ``stages`` divides the
    layers of every stack."""
    takes = {}
    for name in stack_names(stacked):
        leaves = [leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(tree) if starts_with(kp, name)]
        order = stage_layout(leaves[0].shape[0], stages)
        if not (order >= 0).all():
            takes[name] = np.maximum(order, 0)
    if not takes:
        return tree if shardings is None else jax.device_put(tree, shardings)

    def pad(kp, x):
        name = next((n for n in takes if starts_with(kp, n)), None)
        return x if name is None else jnp.take(x, takes[name], axis=0)

    return jax.jit(lambda t: jax.tree_util.tree_map_with_path(pad, t), out_shardings=shardings)(tree)


PATCH_GRANULE = 8


def padded_length(seq_len: int, patches: int, ulysses: int = 1) -> int:
    """The sequence padded to ``patches`` equal patches whose length is a multiple of
    ``lcm(PATCH_GRANULE, ulysses)`` (each patch splits evenly over the Ulysses group). The patch
    boundaries, and so the result of a patched step, are then the same for every Ulysses degree
    that divides 8 (1, 2, 4, 8) as on one device."""
    granule = math.lcm(PATCH_GRANULE, ulysses)
    return patches * (-(-seq_len // (patches * granule)) * granule)


# (layer slots, B, S_pad, H_pad, D). With ring > 1 the sequence axis is in ring-position-major order
# (position r's part of every patch), not token order: only PipeFusion reads it.
KV_SPEC = P(AXIS, BATCH_AXES, "ring", "ulysses")
# The sliced text's buffers (layer slots, B, L_pad, H, D): whole on every device of a stage.
TEXT_KV_SPEC = P(AXIS, BATCH_AXES)
# The token mixers' buffers (token_mixing.MixingBuffers, layer slots first): whole on every device of a stage.
MIX_SPEC = P(AXIS, BATCH_AXES)


# XLA:CPU's concurrency-optimized HLO scheduler (on by default in jax 0.10): with it, the looped FLUX pipeline with
# the text sliced on pipefusion=2,ring=2 (2 patches) ran nondeterministically on the CPU: the same compiled program
# on the same inputs gave the exact patched step, an O(1) error, or a collective rendezvous that never completed
# (9 processes of 11 failed, with 8 simulated devices; with 4 the same step was exact), while every other mesh and
# patch count was exact, and with this flag set 7 processes of 7 (19 patched steps) were exact. Nothing in the
# program varies between runs (no RNG, static loop bounds, no conditionals), so the fault is XLA:CPU's concurrent
# thunk execution, not the math (which the flag lets the tests check: tests/conftest.py sets it, as generate.py and
# benchmark.py do for simulated devices). GPUs issue a program's collectives in one stream order.
CPU_RING_TEXT_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def slices_text(mesh, platform: str | None = None) -> bool:
    """Whether PipeFusion slices a two-stream model's text with the patches on ``mesh`` (``run_pipefusion``'s
    ``text``). Everywhere except on the CPU with ring > 1, unless ``XLA_FLAGS`` holds :data:`CPU_RING_TEXT_FLAG`
    (an XLA:CPU fault, above); there each patch carries the whole text instead. ``platform``: the mesh's
    devices' (default: theirs, or jax's default backend for an abstract mesh)."""
    if mesh is None or mesh.shape.get("ring", 1) == 1:
        return True
    if platform is None:  # an AbstractMesh has no devices (its .devices raises)
        platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else jax.default_backend()
    return platform != "cpu" or CPU_RING_TEXT_FLAG in os.environ.get("XLA_FLAGS", "")


def text_length(text_len: int, patches: int) -> int:
    """The text padded to ``patches`` equal slices (PipeFusion's ``text``: one slice rides with each patch)."""
    return patches * -(-int(text_len) // patches)


def cache_shape(layer_slots: int, batch: int, seq_len: int, heads: int, head_dim: int, patches: int,
                ulysses: int = 1, ring: int = 1) -> tuple:
    """The K/V buffer shape: the sequence padded by :func:`padded_length`, heads to the Ulysses degree."""
    return (layer_slots, batch, padded_length(seq_len, patches, ulysses * ring), -(-heads // ulysses) * ulysses,
            head_dim)


def init_cache(mesh, layers, batch: int, seq_len: int, heads: int, head_dim: int, dtype, patches: int,
               tail: bool = False, abstract: bool = False, attentions=None, tail_attentions: int = 1,
               text_len: int | None = None):
    """Zero K/V buffers :func:`cache_shape`, layers over ``pipefusion``, batch over (data, cfg), heads
    over ``ulysses``: ``(k, v)`` for a stack of ``layers`` slots; ``layers`` a tuple (a model with several
    stacks): ``(k0, v0, k1, v1, ...)``, one pair per stack; with ``tail`` (a model with a
    :func:`final_block`) then ``tail_k, tail_v``, one final-block slot per stage (the last stage's is
    used). ``attentions``: per stack, the attentions each of its blocks makes (default 1; SD3.5 Medium's
    dual-attention blocks 2), each with a buffer row of its own (``tail_attentions``: the final block's).
    ``text_len``: a two-stream model whose text is sliced with the patches (:func:`run_pipefusion`'s
    ``text``): each stack's and the tail's pair is followed by the text's ``(ck, cv)`` (slots, B,
    :func:`text_length`, H, D), whole on every device of a stage (:data:`TEXT_KV_SPEC`).
    ``abstract``: ShapeDtypeStructs instead (to compile without allocating)."""
    from jax.sharding import NamedSharding

    u, r, n = (mesh.shape.get(a, 1) for a in ("ulysses", "ring", AXIS))

    def make(shp, spec=KV_SPEC):
        sharding = NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct(shp, dtype, sharding=sharding) if abstract else \
            jnp.zeros(shp, dtype, device=sharding)

    def group(slots):  # one stack's (or the tail's) buffers
        shape = cache_shape(slots, batch, seq_len, heads, head_dim, patches, u, r)
        bufs = [make(shape), make(shape)]
        if text_len is not None:
            tshape = (slots, batch, text_length(text_len, patches), heads, head_dim)
            bufs += [make(tshape, TEXT_KV_SPEC), make(tshape, TEXT_KV_SPEC)]
        return bufs

    bufs = []
    slots_per = stack_sizes(layers)
    pers = stack_sizes(attentions) if attentions is not None else (1,) * len(slots_per)
    if len(pers) != len(slots_per):
        raise ValueError(f"attentions {attentions} for {len(slots_per)} stacks.")
    for slots, per in zip(slots_per, pers):
        bufs += group(slots * per)
    if tail:
        bufs += group(n * tail_attentions)
    return tuple(bufs)


def init_mixing(mesh, layers: int, batch: int, seq_len: int, grid_width: int, heads: int, head_dim: int,
                channels: int, dtype, patches: int, abstract: bool = False, halo: int | None = None) -> MixingBuffers:
    """Zero buffers of a stack of token mixers (SANA's linear attention and GLUMBConv grid conv; module docstring
    of :mod:`xdit_jax.parallel.token_mixing`), layers over ``pipefusion``, batch over (data, cfg), whole over the
    sequence group (:data:`MIX_SPEC`): ``la`` (layers, B, patches, heads, head_dim, head_dim + 1) float32 and
    ``conv`` (layers, B, S_pad + 2 (grid_width + 1), channels) ``dtype``, S_pad as the K/V buffers'
    (:func:`padded_length`). :func:`run_pipefusion`'s cache is ``(MixingBuffers,)`` for a model without softmax
    self-attention (SANA), else they go after the stack's (k, v). ``halo`` (default ``grid_width + 1``): more zero
    rows at each end (SANA-Video: one frame, ``H W``, for its frame conv, whose input takes the last channels)."""
    from jax.sharding import NamedSharding

    u, r = (mesh.shape.get(a, 1) for a in ("ulysses", "ring"))
    sharding = NamedSharding(mesh, MIX_SPEC)
    sp = padded_length(seq_len, patches, u * r)

    def make(shp, dt):
        return jax.ShapeDtypeStruct(shp, dt, sharding=sharding) if abstract else jnp.zeros(shp, dt, device=sharding)

    halo = int(grid_width) + 1 if halo is None else int(halo)
    return MixingBuffers(make((layers, batch, patches, heads, head_dim, head_dim + 1), jnp.float32),
                         make((layers, batch, sp + 2 * halo, channels), dtype), halo)


def check_mesh(mesh_spec, num_layers) -> None:
    """Refuse what this PipeFusion cannot run, saying what to use instead. ``num_layers``: the stacked
    layers, or a tuple of them per stack (each stack is split over all the stages; a stack with fewer
    layers than stages, e.g. HunyuanDiT's 2 middle blocks, leaves the others a padding slot)."""
    n = mesh_spec.pipefusion
    most = max(stack_sizes(num_layers))
    if n > most:
        what = f"the model's {most} layers" if len(stack_sizes(num_layers)) == 1 else \
            f"the {most} layers of the model's largest block stack (each stack is split over every stage)"
        raise ValueError(f"pipefusion={n} is more stages than {what}; use at most {most}.")


def _buffer_tokens(patches: int, plen: int, ring: int, ulysses: int) -> np.ndarray:
    """(ring * ulysses, S_pad / (ring * ulysses)): the tokens device ``r * ulysses + u`` takes in a
    warm-up step. Its Ulysses group's tokens, concatenated in ``u`` order, are then exactly ring
    position ``r``'s buffer (part ``r`` of every patch, patch-major), so a warm-up step stores its
    K/V in the layout the patched steps read."""
    part = plen // ring
    rows = []
    for r in range(ring):
        buffer = np.concatenate([m * plen + r * part + np.arange(part) for m in range(patches)])
        rows += list(buffer.reshape(ulysses, -1))
    return np.asarray(rows, np.int32)


def run_pipefusion(blocks, params, joint, tokens, cond, cache, mesh, *, patches: int, stacked,
                   warmup: bool = False, backend: str = "xla", num_layers=None, text=None, segments=None):
    """One step of ``blocks(params, joint, tokens, cond)`` as a PipeFusion pipeline over ``mesh``.

    joint: (B, S, D) global; tokens: per-token tables (sequence on axis 0); cond: per-sample
    arrays (batch on axis 0); cache: from :func:`init_cache` (or the previous step): (k, v) per stack,
    then, for a model with a :func:`final_block`, (tail_k, tail_v); a model with other token mixers (SANA) ends it
    with their :class:`~xdit_jax.parallel.token_mixing.MixingBuffers` (:func:`init_mixing`; alone where its blocks
    make no softmax self-attention: one stack, no final block, no sliced text); params: the model state whose
    subtree ``stacked`` (a name, or a tuple of names, one per stack in the order ``blocks`` scans them)
    holds the stacked blocks (split over the stages; padded by :func:`pad_stack` where the degree does
    not divide a stack's layers, ``num_layers``: an int or a tuple per stack). ``patches``: the patches
    of the patched steps (they fix the buffers' layout); ``warmup``: this step runs the whole sequence
    at once (exact) and fills the buffers. Returns (out (B, S, D), cache).

    What passes from stage to stage is the stacked scan's carry (:func:`layer_scan`): the patch's
    tokens, and for a two-stream model the text stream that rides with them. ``text``: the keys of
    ``cond`` that hold the text (B, L, ...) — the text is then cut into ``patches`` slices (padded to
    :func:`text_length`; the padding masked as keys), patch ``m`` carrying slice ``m``, and its K/V are
    kept in buffers as the image's (``init_cache(..., text_len=L)``): each text token is computed once
    a step, and attends to the whole text (this step's slices before it, the last step's after). A
    ``cond`` entry the model passes as its context's key mask stays whole (the attention pads it).
    Without ``text`` each patch carries its own copy of the whole text (computed once per patch).

    ``segments``: the key of ``tokens`` holding the tokens' block-causal segment ids, for a model that passes them to
    :func:`~xdit_jax.parallel.attention.attention` (SkyReels-V2's diffusion forcing; ignored where ``tokens`` has no
    such key): the buffered keys are masked by their ids as in the full sequence, so a patch's queries see the keys
    of their own causal block and the blocks before it — this step's where they lie in the patches up to its own, the
    last step's where they lie in later patches (a block cut by a patch boundary). Where the boundaries fall between
    blocks no stale key is visible at all.

    Several stacks (FLUX: 19 double-stream, then 38 single-stream blocks) run *looped*: every stack is
    split over all the stages, and a patch goes round the stages once per stack (stack ``q`` on stage
    ``s`` is virtual stage ``q * n + s``; the last stage hands the carry to the first for the next
    stack, so every stack's carry must have the same shapes, and the code between the stacks must pass
    it on unchanged). Each tick runs only the stacks that have a patch on some stage then (segments of
    the tick loop with a fixed set of stacks), so a device computes what a one-stack pipeline of the
    same layers would, and the pipeline is ``q * n`` ticks longer (the fill of each round).
    """
    n = mesh.shape[AXIS] if mesh is not None else 1
    u = mesh.shape.get("ulysses", 1) if mesh is not None else 1
    rr = mesh.shape.get("ring", 1) if mesh is not None else 1
    names = stack_names(stacked)
    nstack = len(names)
    sizes = stack_sizes(num_layers) if num_layers is not None else None
    if sizes is not None and len(sizes) != nstack:
        raise ValueError(f"num_layers {num_layers} gives {len(sizes)} stacks; stacked names {nstack}.")
    g = 4 if text else 2  # buffers per stack: (k, v), and the text's (ck, cv) where it is sliced
    cache = tuple(cache)
    mix = cache[-1] if cache and isinstance(cache[-1], MixingBuffers) else None
    own_kv = False  # a model without softmax self-attention (SANA): its cache is the token mixers' buffers alone
    if mix is not None:  # the token mixers' buffers: ride with the one stack's K/V
        cache = cache[:-1]
        own_kv = not cache
        if nstack != 1 or text or len(cache) not in (0, g):
            raise NotImplementedError("PipeFusion's token-mixing buffers (MixingBuffers) take one block stack, "
                                      "without a final block or sliced text.")
    tail_n = 0 if own_kv else len(cache) - g * nstack
    if tail_n not in (0, g):
        what = "(k, v, ck, cv)" if text else "(k, v)"
        raise ValueError(f"{len(cache)} K/V buffers for {nstack} stacks: expected {what} per stack, then a final "
                         f"block's {what} or nothing (init_cache{'(..., text_len=)' if text else ''}).")
    s = joint.shape[1]
    sp = mix.conv.shape[2] - 2 * mix.halo if own_kv else cache[0].shape[2]
    if sp % (patches * u * rr) or sp < s:
        raise ValueError(f"The K/V buffers hold {sp} tokens: not {patches} equal patches over ring x ulysses = "
                         f"{rr * u} devices of a {s}-token sequence.")
    plen = sp // patches
    part = plen // rr  # a ring position's part of a patch (its buffer keeps that part of every patch)
    piece = part // u  # each sequence-parallel device's share of a patch
    # Real keys in each ring position's buffer: its parts are in token order, so they form a prefix.
    counts = np.array([sum(min(max(s - (m * plen + j * part), 0), part) for m in range(patches))
                       for j in range(rr)]) if rr > 1 else None
    warm_tokens = _buffer_tokens(patches, plen, rr, u) if warmup else None
    seg_key = segments if segments is not None and segments in tokens else None
    ring_buffers = _buffer_tokens(patches, plen, rr, 1) if seg_key else None  # each ring position's buffer tokens
    text_keys, text_valid, tlen = tuple(text or ()), None, 0
    if text_keys and not slices_text(mesh):
        raise NotImplementedError("PipeFusion's text slices with ring > 1 on the CPU need "
                                  f"XLA_FLAGS={CPU_RING_TEXT_FLAG} (set before jax starts: XLA:CPU's concurrent "
                                  "runtime ran such a step nondeterministically); or pass text=None (each patch "
                                  "then carries the whole text).")
    if text_keys:
        missing = [key for key in text_keys if key not in cond]
        if missing:
            raise ValueError(f"text={text_keys}: cond has no {missing} (it has {sorted(cond)}).")
        text_valid, lpad = int(jax.tree.leaves(cond[text_keys[0]])[0].shape[1]), int(cache[2].shape[2])
        if lpad != text_length(text_valid, patches):
            raise ValueError(f"The text's K/V buffers hold {lpad} tokens, not {patches} equal slices of "
                             f"{text_valid} (init_cache(..., text_len={text_valid})).")
        tlen = lpad // patches
        pad_text = lambda a: jnp.pad(a, [(0, 0), (0, lpad - a.shape[1])] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        cond = {key: jax.tree.map(pad_text, a) if key in text_keys else a for key, a in cond.items()}
    pad = lambda x, axis: jnp.pad(x, [(0, 0)] * axis + [(0, sp - s)] + [(0, 0)] * (x.ndim - axis - 1))
    joint_p = pad(joint, 1)
    tokens_p = jax.tree.map(lambda t: pad(t, 0), tokens)
    valid_len = s if sp != s else None
    steps_through = 1 if warmup else patches  # what flows through the pipeline: the whole sequence, or patches
    ticks = steps_through + nstack * n - 1
    real_all = [None if sizes is None or size % n == 0 else stage_layout(size, n) >= 0 for size in
                (sizes or (0,) * nstack)]
    # Stack q has a patch on some stage during ticks [q n, q n + steps_through + n - 1): the tick loop runs in
    # segments with a fixed set of live stacks (each computed only while live).
    windows = [(q * n, q * n + steps_through + n - 1) for q in range(nstack)]
    edges = sorted({0, ticks, *(e for w in windows for e in w)})
    segments = [(a, b, tuple(q for q, (lo, hi) in enumerate(windows) if lo <= a and b <= hi))
                for a, b in zip(edges[:-1], edges[1:]) if a < b]

    def local(p, j, t, c, *bufs):
        stage = lax.axis_index(AXIS) if n > 1 else 0
        seq_rank = (lax.axis_index("ring") * u if rr > 1 else 0) + (lax.axis_index("ulysses") if u > 1 else 0)
        mine = seq_rank * piece  # offset of this device's piece in a patch (chunk order ring-major, as run_blocks)
        if mix is not None:
            bufs, mx = bufs[:-1], bufs[-1]
            if own_kv:  # no softmax attention: empty K/V buffers for layer_scan (they never leave this function)
                bufs = (jnp.zeros((0,), mx.conv.dtype),) * 2
        kv_seg = None
        if seg_key:  # the buffer keys' segment ids, in this ring position's buffer order (padding: masked anyway)
            kv_seg = jnp.take(jnp.asarray(t[seg_key], jnp.int32),
                              jnp.asarray(ring_buffers)[lax.axis_index("ring") if rr > 1 else 0], axis=0)
        kv = tuple(bufs[g * q:g * q + g] for q in range(nstack))
        if mix is not None:
            kv = (kv[0] + (mx,),)  # the one stack's (k, v, mixing buffers)
        tail = tuple(bufs[g * nstack:])
        if warmup:
            idx = jnp.asarray(warm_tokens)[seq_rank]
            take = lambda a, axis: jnp.take(a, idx, axis=axis)  # noqa: E731
            put = lambda out, y: out.at[:, idx].set(y)  # noqa: E731

        def stage_call(q, patch, recv, bufs, tail):
            """This stage's blocks of stack ``q`` on ``patch`` (its tokens' rows), continuing from ``recv``
            (the carry handed on; None: the model's own); ``bufs``: the stack's (k, v[, ck, cv]).
            -> (output, carry to hand on, bufs, tail)."""
            active = (patch >= 0) & (patch < steps_through)
            mx = bufs[g] if len(bufs) > g else None
            k, v, ck, cv = (tuple(bufs[:g]) + (None, None))[:4]
            cp, c_start = c, 0
            if warmup:
                x, tp, local_start = take(j, 1), jax.tree.map(lambda a: take(a, 0), t), 0
            else:
                start = jnp.clip(patch, 0, patches - 1) * plen + mine
                x = lax.dynamic_slice_in_dim(j, start, piece, axis=1)
                tp = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, piece, axis=0), t)
                local_start = jnp.clip(patch, 0, patches - 1) * part  # this patch's part in the buffer
                if text_keys:  # the patch's slice of the text
                    c_start = jnp.clip(patch, 0, patches - 1) * tlen
                    cut = lambda a: lax.dynamic_slice_in_dim(a, c_start, tlen, axis=1)  # noqa: E731
                    cp = {key: jax.tree.map(cut, a) if key in text_keys else a for key, a in c.items()}
            real = None
            if real_all[q] is not None:  # this stage's slots of the padded stack
                per_stage = len(real_all[q]) // n
                real = lax.dynamic_slice_in_dim(jnp.asarray(real_all[q]), stage * per_stage, per_stage)
            last = q == nstack - 1
            cache = StackCache(k=k, v=v, start=local_start, write=active, real=real, ring_counts=counts,
                               first=(stage == 0 if n > 1 else True) if q == 0 else False,
                               recv=recv, tail=(tail or None) if last else None, stack=q, last=last,
                               ck=ck, cv=cv, c_start=c_start, c_valid=text_valid, mix=mx,
                               mix_info=(jnp.clip(patch, 0, patches - 1), patches, plen,
                                         warm_tokens if warmup else None), kv_segments=kv_seg)
            with stack_cache(cache), attention_context(AttentionConfig(mesh=mesh if u * rr > 1 else None,
                                                                       backend=backend, valid_len=valid_len)):
                y = blocks(p, x, tp, cp)
            if cache.scans != nstack:
                raise RuntimeError(f"blocks() ran {cache.scans} stacked scans (layer_scan); PipeFusion was given "
                                   f"{nstack} stacks ({', '.join(names)}).")
            if last and tail and not cache.final_used:
                raise RuntimeError("K/V buffers for a final block were given, but blocks() ran no final_block.")
            out_bufs = (cache.k, cache.v) + ((cache.ck, cache.cv) if text_keys else ()) + \
                ((cache.mix,) if mx is not None else ())
            return y, cache.stream, out_bufs, (tuple(cache.tail or ()) if last else tail)

        # The carry that flows between stages, as the model's scans shape it (zeros before the first arrives).
        shapes = [jax.eval_shape(lambda q=q: stage_call(q, 0, None, kv[q], tail)[1]) for q in range(nstack)]
        if any(jax.tree.structure(a) != jax.tree.structure(shapes[0]) or jax.tree.leaves(a) != jax.tree.leaves(
                shapes[0]) for a in shapes[1:]):
            raise ValueError(f"PipeFusion hands each stack's carry to the next one; these stacks' carries differ: "
                             f"{shapes}.")
        stream0 = tuple(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sh) for sh in shapes)

        def tick_fn(live):
            def tick(i, carry):
                recv, out, kv, tail = carry
                streams, kv = list(recv), list(kv)
                for q in live:
                    patch = i - q * n - stage
                    if q == 0:
                        got = recv[0] if n > 1 else None
                    elif n > 1:  # the first stage continues the previous stack, from the last stage
                        got = jax.tree.map(lambda a, b: jnp.where(stage == 0, a, b), recv[q - 1], recv[q])
                    else:
                        got = recv[q - 1]
                    y, streams[q], kv[q], tail = stage_call(q, patch, got, kv[q], tail)
                    if q == nstack - 1:
                        done = (patch >= 0) & (patch < steps_through) & (stage == n - 1)
                        if warmup:
                            new = put(out, y)
                        else:
                            start = jnp.clip(patch, 0, patches - 1) * plen + mine
                            new = lax.dynamic_update_slice_in_dim(out, y, start, axis=1)
                        out = jnp.where(done, new, out)
                    if n > 1:  # stage r -> r + 1; the last stage -> the first where another stack follows
                        perm = [(r, (r + 1) % n) for r in range(n if q < nstack - 1 else n - 1)]
                        streams[q] = jax.tree.map(lambda a: lax.ppermute(a, AXIS, perm), streams[q])
                return tuple(streams), out, tuple(kv), tail
            return tick

        # The output's rows as the last stack returns them (its features may differ from the input's: Wan VACE's
        # blocks take the video and control tokens side by side and return the video's).
        y_aval = jax.eval_shape(lambda: stage_call(nstack - 1, 0, None, kv[-1], tail)[0])
        carry = (stream0, jnp.zeros(j.shape[:2] + y_aval.shape[2:], y_aval.dtype), kv, tail)
        for a, b, live in segments:
            carry = lax.fori_loop(a, b, tick_fn(live), carry)
        _, out, kv, tail = carry
        if own_kv:
            kv = (kv[0][2:],)
        # The last stage holds the output, each sequence device its pieces (zeros elsewhere): sum them.
        axes = tuple(a for a, size in ((AXIS, n), ("ring", rr), ("ulysses", u)) if size > 1)
        if axes:
            out = lax.psum(jnp.where(stage == n - 1, out, 0), axes)
        return (out, *(b for group in kv for b in group), *tail)

    if mix is not None:
        cache = cache + (mix,)
    if mesh is None or mesh.size == 1:
        out, *cache = local(params, joint_p, tokens_p, cond, *cache)
        return out[:, :s], tuple(cache)
    from xdit_jax.parallel.sequence import _shard_map

    stacked_spec = lambda path, _: P(AXIS) if any(starts_with(path, name) for name in names) else P()
    par_specs = jax.tree_util.tree_map_with_path(stacked_spec, params)
    batch = lambda x: P(BATCH_AXES, *([None] * (x.ndim - 1)))
    kv_specs = ((KV_SPEC, KV_SPEC, TEXT_KV_SPEC, TEXT_KV_SPEC)[:g] * (len(cache) // g))
    if mix is not None:
        kv_specs += (MixingBuffers(MIX_SPEC, MIX_SPEC, mix.halo),)
    out, *cache = _shard_map(local, mesh,
                             (par_specs, batch(joint_p), jax.tree.map(lambda _: P(), tokens_p),
                              jax.tree.map(batch, cond), *kv_specs),
                             (batch(joint_p), *kv_specs))(params, joint_p, tokens_p, cond, *cache)
    return out[:, :s], tuple(cache)


def starts_with(path, name: str) -> bool:
    """Whether a pytree key path (jax's, or orbax's) starts at the entry ``name``."""
    first = path[0] if path else None
    key = getattr(first, "key", getattr(first, "name", None))
    return key == name


def stacked_placement(mesh, num_layers, stacked):
    """(sharding, prepare) to load a transformer whose blocks are stacked under ``stacked`` (a name, or a
    tuple of names with ``num_layers`` a tuple: one per stack): on a pipefusion mesh each stage holds
    only its own layers — placed straight from the checkpoint where the degree divides every stack's
    layers, else read replicated and ``prepare`` pads the stacks to equal stages (:func:`pad_stack`)
    and splits them; elsewhere everything is replicated. The sharding is a callable ``(key path,
    shape) -> sharding`` (:func:`xdit_jax.checkpoint.restore_params`)."""
    from jax.sharding import NamedSharding

    from xdit_jax.mesh import MeshSpec

    replicated = NamedSharding(mesh, P())
    stages = mesh.shape.get(AXIS, 1)
    if stages == 1:
        return replicated, None
    check_mesh(MeshSpec.parse(dict(mesh.shape)), num_layers)  # before any weight is read
    stage = NamedSharding(mesh, P(AXIS))
    names = stack_names(stacked)

    def place(kp, *_):
        return stage if any(starts_with(kp, name) for name in names) else replicated

    if all(size % stages == 0 for size in stack_sizes(num_layers)):
        return place, None
    return replicated, lambda params: pad_stack(params, stacked, stages,
                                                jax.tree_util.tree_map_with_path(place, params))
