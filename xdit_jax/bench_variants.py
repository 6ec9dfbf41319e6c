"""The benchmark's experiments: other builds of our step, timed beside the default in the same run.

``--variant LABEL:key=value;...`` (:func:`parse_variant`): XLA compiler options per compile,
the attention op's backend, and trace-time experiments that leave the model files alone — another
single-device attention kernel (:data:`ATTENTION_VARIANTS`) or another matmul for every
``nnx.Linear`` (:data:`LINEAR_VARIANTS`). Used by :mod:`xdit_jax.bench`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

FUSION_ENUM_OPTIONS = ("xla_cpu_experimental_ynn_fusion_type", "xla_cpu_experimental_xnn_fusion_type",
                       "xla_cpu_experimental_onednn_fusion_type")


def parse_compiler_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> XLA compiler options for ``Lowered.compile(compiler_options=...)``.

    Values true/false become bools, integers ints; the CPU library-fusion lists take the short names
    of ``XLA_FLAGS`` ("dot,eltwise"; "" disables) and are spelled as the DebugOptions enum.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"XLA option {item!r}: write key=value, e.g. xla_cpu_enable_fast_math=true.")
        val = val.strip()
        if key in FUSION_ENUM_OPTIONS:
            parts = [v.strip() for v in val.split(",") if v.strip()]
            out[key] = ",".join(v if v.startswith("LIBRARY_FUSION_TYPE_") else f"LIBRARY_FUSION_TYPE_{v.upper()}"
                                for v in parts)
        elif val.lower() in ("true", "false"):
            out[key] = val.lower() == "true"
        else:
            try:
                out[key] = int(val)
            except ValueError:
                out[key] = val
    return out


@dataclasses.dataclass
class Variant:
    """One way of building our step, measured side by side with the others in the same run."""

    label: str = "xdit_jax"
    compiler_options: dict = dataclasses.field(default_factory=dict)
    attention: str | None = None  # an entry of ATTENTION_VARIANTS (experiment), None = the model's own
    attention_backend: str | None = None  # AttentionConfig.backend ("xla", "cudnn"); None = the run's
    linear: str | None = None  # an entry of LINEAR_VARIANTS (experiment), None = the model's own
    scan: str | None = None  # an entry of SCAN_VARIANTS (experiment), None = a rolled lax.scan over the layers


def parse_variant(spec: str) -> Variant:
    """``LABEL[:key=value;key=value...]``: XLA options, plus ``attention=`` (an :data:`ATTENTION_VARIANTS`
    entry), ``linear=`` (a :data:`LINEAR_VARIANTS` entry) — experiments that leave the model files
    alone — and ``backend=`` (the attention op's backend, "xla" or "cudnn")."""
    label, _, rest = spec.partition(":")
    items = [s for s in rest.split(";") if s.strip()]
    attn = backend = linear = scan = None
    opts = []
    for it in items:
        k, _, v = it.partition("=")
        k, v = k.strip(), v.strip()
        if k == "attention":
            if v not in ATTENTION_VARIANTS:
                raise ValueError(f"Unknown attention variant {v!r}; known: {', '.join(ATTENTION_VARIANTS)}.")
            attn = v
        elif k == "backend":
            backend = v
        elif k == "linear":
            if v not in LINEAR_VARIANTS:
                raise ValueError(f"Unknown linear variant {v!r}; known: {', '.join(LINEAR_VARIANTS)}.")
            linear = v
        elif k == "scan":
            if v not in SCAN_VARIANTS:
                raise ValueError(f"Unknown scan variant {v!r}; known: {', '.join(SCAN_VARIANTS)}.")
            scan = v
        else:
            opts.append(it)
    return Variant(label=label.strip() or "variant", compiler_options=parse_compiler_options(opts), attention=attn,
                   attention_backend=backend, linear=linear, scan=scan)


# --------------------------------------------------------------------------------------------
# Attention kernels to try (experiments; the model's own op is left untouched)
# --------------------------------------------------------------------------------------------
# Each takes (q, k, v, scale) on (B, S, H, D) and returns (out (B, S, H, D), lse (B, H, S) f32),
# the contract of the single-device kernel in xdit_jax.parallel.attention.

def _attn_heads_major(q, k, v, scale):
    """The reference math laid out (B, H, S, D), the scale folded into q and the softmax normalised
    after PV: two passes fewer over the (S, S) scores."""
    import jax.numpy as jnp

    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    m = logits.max(-1, keepdims=True)
    p = jnp.exp(logits - m)
    denom = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32) / denom
    return o.transpose(0, 2, 1, 3).astype(q.dtype), (jnp.log(denom) + m)[..., 0]


def _attn_per_head_map(q, k, v, scale, batch_size: int | None = None):
    """One (S, S) score matrix at a time: ``lax.map`` over batch x heads (a cache-sized working set),
    plain 2-D GEMMs, scale folded into q, normalised after PV."""
    import jax
    import jax.numpy as jnp

    b, s, h, d = q.shape
    q = q * jnp.asarray(scale, q.dtype)
    qh, kh, vh = (x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d) for x in (q, k, v))

    def one(args):
        qi, ki, vi = args
        logits = jnp.dot(qi, ki.T, preferred_element_type=jnp.float32)
        m = logits.max(-1, keepdims=True)
        p = jnp.exp(logits - m)
        denom = p.sum(-1, keepdims=True)
        o = jnp.dot(p.astype(vi.dtype), vi, preferred_element_type=jnp.float32) / denom
        return o.astype(qi.dtype), (jnp.log(denom) + m)[:, 0]

    o, lse = jax.lax.map(one, (qh, kh, vh), batch_size=batch_size)
    return o.reshape(b, h, s, d).transpose(0, 2, 1, 3), lse.reshape(b, h, s)


def _attn_query_chunks(q, k, v, scale, chunk: int = 128):
    """Queries in chunks (``lax.map``), all heads at once: a (B, H, chunk, S) score block."""
    import jax
    import jax.numpy as jnp

    b, s, h, d = q.shape
    n = -(-s // chunk)
    q = q * jnp.asarray(scale, q.dtype)
    qh = jnp.pad(q, ((0, 0), (0, n * chunk - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qc = qh.reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)
    kh, vh = (x.transpose(0, 2, 1, 3) for x in (k, v))

    def one(qb):
        logits = jnp.einsum("bhqd,bhkd->bhqk", qb, kh, preferred_element_type=jnp.float32)
        m = logits.max(-1, keepdims=True)
        p = jnp.exp(logits - m)
        denom = p.sum(-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vh.dtype), vh, preferred_element_type=jnp.float32) / denom
        return o.astype(q.dtype), (jnp.log(denom) + m)[..., 0]

    o, lse = jax.lax.map(one, qc)
    o = o.transpose(1, 2, 0, 3, 4).reshape(b, h, n * chunk, d)[:, :, :s].transpose(0, 2, 1, 3)
    return o, lse.transpose(1, 2, 0, 3).reshape(b, h, n * chunk)[:, :, :s]


def _attn_jax_dpa(q, k, v, scale):
    """``jax.nn.dot_product_attention`` (implementation chosen by JAX: cuDNN on GPU, XLA elsewhere)."""
    import jax
    import jax.numpy as jnp

    out = jax.nn.dot_product_attention(q, k, v, scale=scale)
    return out, jnp.zeros(q.shape[:1] + q.shape[2:3] + q.shape[1:2], jnp.float32)  # lse unused on one device


ATTENTION_VARIANTS: dict[str, Callable] = {
    "heads_major": _attn_heads_major,
    "per_head_map": _attn_per_head_map,
    "per_head_map4": lambda q, k, v, scale: _attn_per_head_map(q, k, v, scale, batch_size=4),
    "query_chunks": _attn_query_chunks,
    "jax_dpa": _attn_jax_dpa,
}


@contextlib.contextmanager
def attention_override(name: str | None):
    """While tracing, route the model's single-device attention kernel through ``ATTENTION_VARIANTS[name]``.

    Patches ``xdit_jax.parallel.attention._xla_attention`` (q, k, v, mask, scale, out_dtype[, qk_mask]) ->
    (out, lse), or, in older trees, ``local_attention``. Masked calls (a key mask or a per-pair ``qk_mask``) go to
    the original kernel.
    """
    if name in (None, "unstacked"):  # unstacked: the weights' layout (bench.py), nothing to patch here
        yield
        return
    from xdit_jax.parallel import attention as attn_mod

    fn = ATTENTION_VARIANTS[name]
    if hasattr(attn_mod, "_xla_attention"):
        target, original = "_xla_attention", attn_mod._xla_attention

        def patched(q, k, v, mask, scale, out_dtype, *args, **kw):
            if mask is not None or any(a is not None for a in (*args, *kw.values())):
                return original(q, k, v, mask, scale, out_dtype, *args, **kw)
            out, lse = fn(q, k, v, scale)
            return out.astype(out_dtype), lse
    else:
        target, original = "local_attention", attn_mod.local_attention

        def patched(q, k, v, *, kv_valid=None, scale=None, return_lse=False, **kw):
            if kv_valid is not None or kw:
                return original(q, k, v, kv_valid=kv_valid, scale=scale, return_lse=return_lse, **kw)
            out, lse = fn(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
            return (out, lse) if return_lse else out
    setattr(attn_mod, target, patched)
    try:
        yield
    finally:
        setattr(attn_mod, target, original)


LINEAR_VARIANTS = ("f32acc",)


@contextlib.contextmanager
def linear_override(name: str | None):
    """While tracing, make every ``nnx.Linear`` multiply with float32 accumulation and output
    (``preferred_element_type=float32``), then cast to its compute dtype (experiment ``f32acc``).

    A no-op in float32. In bfloat16 on XLA:CPU it moves the GEMMs from the bf16-output path
    (no faster than fp32) to the bf16-input / f32-accumulate path (AMX / AVX512-BF16).
    """
    if name in (None, "unstacked"):  # unstacked: the weights' layout (bench.py), nothing to patch here
        yield
        return
    if name not in LINEAR_VARIANTS:
        raise ValueError(f"Unknown linear variant {name!r}; known: {', '.join(LINEAR_VARIANTS)}.")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    original = nnx.Linear.__call__

    def patched(self, inputs, *a, **kw):
        dtype = self.dtype or inputs.dtype
        kernel = self.kernel[...].astype(dtype)
        y = jax.lax.dot_general(inputs.astype(dtype), kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)

    nnx.Linear.__call__ = patched
    try:
        yield
    finally:
        nnx.Linear.__call__ = original


SCAN_VARIANTS = ("unroll", "unstacked")


@contextlib.contextmanager
def scan_override(name: str | None):
    """While tracing, unroll the layer stacks' ``lax.scan`` (experiment ``unroll``): each layer reads its
    weights through a static slice of the stacked arrays instead of a dynamic slice in a loop body (on a
    GPU the loop copies every layer's weights out of the stack each step). Compile time grows with depth.
    ``unstacked``: the stacks' weights held layer by layer (``layers.unstack_layers``: separate arrays, so not
    even a static slice of a stack is left in the program), run unrolled."""
    if name in (None, "unstacked"):  # unstacked: the weights' layout (bench.py), nothing to patch here
        yield
        return
    if name not in SCAN_VARIANTS:
        raise ValueError(f"Unknown scan variant {name!r}; known: {', '.join(SCAN_VARIANTS)}.")
    import functools
    import types

    import jax

    from xdit_jax.parallel import pipefusion

    original = pipefusion.lax
    pipefusion.lax = types.SimpleNamespace(**{k: getattr(jax.lax, k) for k in dir(jax.lax) if not k.startswith("__")})
    pipefusion.lax.scan = functools.partial(jax.lax.scan, unroll=True)
    try:
        yield
    finally:
        pipefusion.lax = original
