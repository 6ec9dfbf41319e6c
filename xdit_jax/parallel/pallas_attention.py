"""A flash-attention kernel written in Pallas (Triton on GPUs), with the log-sum-exp and a key prefix.

The ``"pallas"`` attention backend: one kernel for one (query block, key block) pair of
:func:`xdit_jax.parallel.attention.block_attention`, so the ring can merge its partial results
(it needs the LSE) and padded keys can be masked (the sequence is padded to the mesh degree).

FlashAttention-2's forward pass: a program per (query tile, batch, head); it walks the key tiles
with an online softmax in float32 (running max ``m``, running sum ``l``, output accumulator),
in base 2 (``exp2``, the scale multiplied by log2(e)), and skips the key tiles past the last
valid key. Keys with index ``>= n_valid`` get a large negative logit. A row with no valid key
(``n_valid == 0``: a ring block that is only padding) returns output 0 and LSE ``-inf``.

Off a GPU it runs in Pallas' interpreter, which is how the tests check it against the XLA kernel
on the CPU (slow: test sizes only). Shapes are padded here to what Triton takes: sequence lengths
to a multiple of the tile, the head dimension to a power of two (at least 16).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: masked - max stays finite


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _kernel(n_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, block_k: int, precision):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    q = q_ref[...]  # (block_q, D), stays in registers / shared memory
    block_q = q.shape[0]
    n_valid = n_ref[()]
    c = scale * LOG2E

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        s = plgpu.dot(q, k_ref[keys, :], trans_b=True, precision=precision) * c  # (block_q, block_k) f32
        valid = (j * block_k + jnp.arange(block_k)) < n_valid
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)  # rescales what was summed under the old max (0 on the first tile)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_q, q.shape[1]), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(0, pl.cdiv(n_valid, block_k), body, init)
    any_key = l > 0
    l_safe = jnp.where(any_key, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(any_key, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def flash_attention(q, k, v, n_valid=None, *, scale: float, out_dtype=None, block_q: int = 128,
                    block_k: int = 64, num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None):
    """Softmax attention of q (B, Sq, H, D) on k, v (B, Sk, H, D); the keys ``>= n_valid`` masked.

    Default tiles: the fastest of those timed on an H100 (CogVideoX-5B's layer, bf16, head_dim 64,
    ``scripts/bench_attention.py``): 128 x 64, 4 warps, 3 stages 22.5 ms; 64 x 64 x 4 x 2 24.0 ms;
    128 x 128 x 4 x 2 29.4 ms; 128 x 128 x 8 x 2 32.5 ms (cuDNN: 18.2 ms).

    ``n_valid``: None (all keys) or an int32 scalar (traced or not). Returns ``(out, lse)``:
    out (B, Sq, H, D) in ``out_dtype`` (default q's), lse (B, H, Sq) float32, natural log.
    ``interpret``: None runs the compiled kernel on a GPU and the interpreter elsewhere.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, sq, h, d = q.shape
    sk = k.shape[1]
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block_q = min(block_q, _pow2_at_least(sq))
    block_k = min(block_k, _pow2_at_least(sk))
    sq_p, sk_p, d_p = -(-sq // block_q) * block_q, -(-sk // block_k) * block_k, _pow2_at_least(d)
    pad = lambda x, s: jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0), (0, d_p - d)))
    n = jnp.asarray(sk if n_valid is None else n_valid, jnp.int32)
    n = jnp.clip(n, 0, sk)  # padded tail keys (beyond sk) are never valid
    # float32 inputs: full-precision products (Triton would use TF32); bf16/fp16 accumulate in f32.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, scale=float(scale), block_k=block_k, precision=precision)
    tile = pl.BlockSpec((None, block_q, None, d_p), lambda i, bi, hi: (bi, i, hi, 0))
    whole = pl.BlockSpec((None, sk_p, None, d_p), lambda i, bi, hi: (bi, 0, hi, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(sq_p // block_q, b, h),
        in_specs=[pl.BlockSpec((), lambda i, bi, hi: ()), tile, whole, whole],
        out_specs=[tile, pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct((b, sq_p, h, d_p), out_dtype),
                   jax.ShapeDtypeStruct((b, h, sq_p), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="xdit_flash_attention",
    )(n, pad(q, sq_p), pad(k, sk_p), pad(v, sk_p))
    return out[:, :sq, :, :d], lse[:, :, :sq]
