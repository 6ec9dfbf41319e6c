"""FlashAttention-3 on Hopper through jax's own Mosaic GPU kernel, with the log-sum-exp and a key prefix.

The ``"mosaic"`` attention backend. ``jax.experimental.pallas.ops.gpu.attention_mgpu.attention`` is the
FlashAttention-3 forward pass written in Pallas for Mosaic GPU (sm90a: H100 / H200): two compute warpgroups
take turns on the tensor cores (one runs its softmax while the other runs its products) and a third feeds
them K/V by TMA. That overlap is what cuDNN's kernel lacks at head_dim 64, where each query-key pair costs
as much exp time on the SFUs as product time on the tensor cores (docs/benchmarks.md, the 5B profile).

The kernel takes what FlashAttention's benchmarks feed it and nothing else; this module makes our calls
fit it, exactly:

* no mask: the block's valid keys ``[0, n)`` go in two parts, ``[0, a)`` with ``a`` the largest multiple of
  the key tile (the kernel) and ``[a, n)`` (fewer than a tile: the XLA kernel, or cuDNN on a GPU), the two
  merged by the log-sum-exp rule. ``n`` must be static here (:func:`xdit_jax.parallel.attention.block_attention`
  switches over the values a traced one can take);
* no scale: the scale is folded into q (exact for head_dim 64's 1/8 and every power of two);
* float16 only (its shared-memory buffers are float16): bf16 inputs are converted, which is exact for
  magnitudes in [6.1e-5, 65504] (float16 has 3 more mantissa bits than bf16; inputs beyond 65504 overflow),
  and the output comes back in float16 (more precise than bf16);
* head_dim a multiple of 64 (zero-padded: exact), query rows a multiple of two query tiles (padded; the
  extra rows dropped), the LSE in base 2 (converted to natural log).

Off a GPU the kernel cannot run; jax's reference for it (``attention_reference``: the same contract,
unscaled float32 logits, a base-2 LSE) stands in, checked against the shapes the kernel accepts, so the
tests exercise everything above on the CPU. Slow and memory-hungry: test sizes only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernel's tiles: ``block_q`` query rows per compute warpgroup (two per program), ``block_kv`` keys
    per pipeline stage, ``stages`` K/V stages in flight (jax's ``max_concurrent_steps``). Multiples of 64."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64 or self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(f"Mosaic attention tiles must be positive multiples of 64; got {self}.")
        if self.stages < 2:
            raise ValueError(f"Mosaic attention needs at least 2 K/V stages; got {self.stages}.")

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """``"BQxBKV[xSTAGES]"``, e.g. ``"64x128x2"``."""
        try:
            parts = [int(x) for x in text.lower().split("x")]
        except ValueError:
            parts = []
        if not 2 <= len(parts) <= 3:
            raise ValueError(f"Mosaic tiles {text!r}: use BQxBKV[xSTAGES], e.g. 64x128x2.")
        return cls(*parts)


DEFAULT_TILES = Tiles()
TILES_ENV = "XDIT_JAX_MOSAIC_TILES"


def default_tiles() -> Tiles:
    """The tiles the ``"mosaic"`` backend uses: ``$XDIT_JAX_MOSAIC_TILES`` (``BQxBKV[xSTAGES]``, for tuning
    runs of the whole step) or :data:`DEFAULT_TILES`."""
    text = os.environ.get(TILES_ENV, "").strip()
    return Tiles.parse(text) if text else DEFAULT_TILES


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _kernel(q, k, v, tiles: Tiles):
    """The kernel's own contract: float16 (B, Sq, H, D) q (already scaled), k, v (B, Sk, H, D); returns
    out (B, Sq, H, D) float16 and the base-2 LSE (B, H, Sq) float32."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if q.dtype != jnp.float16 or d % 64 or sk % tiles.block_kv or sq % (2 * tiles.block_q) or sk == 0:
        raise ValueError(f"Mosaic attention kernel got q {q.shape} {q.dtype}, k {k.shape}: it takes float16, "
                         f"head_dim % 64 == 0, keys a multiple of {tiles.block_kv}, queries of {2 * tiles.block_q}.")
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    if _on_gpu():
        config = mgpu.TuningConfig(block_q=tiles.block_q, block_kv=tiles.block_kv,
                                   max_concurrent_steps=tiles.stages)
        out, (lse,) = mgpu.attention(q, k, v, config, save_residuals=True)
    else:
        out, (lse,) = mgpu.attention_reference(q, k, v, save_residuals=True)
    return out.astype(jnp.float16), lse.astype(jnp.float32)


def _rest(q, k, v, scale, need_lse=True):
    """The keys after the last whole tile (fewer than one): cuDNN on a GPU, the XLA kernel elsewhere."""
    from xdit_jax.parallel import attention as attn

    if _on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16):
        return attn._cudnn_attention(q, k, v, None, scale, jnp.float32, need_lse)
    return attn._xla_attention(q, k, v, None, scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("n_valid", "scale", "out_dtype", "tiles"))
def fa3_attention(q, k, v, n_valid: int | None = None, *, scale: float, out_dtype=None, tiles: Tiles | None = None):
    """Softmax attention of q (B, Sq, H, D) on the first ``n_valid`` keys of k, v (B, Sk, H, D) (None: all).

    Returns ``(out, lse)``: out (B, Sq, H, D) in ``out_dtype`` (default q's), lse (B, H, Sq) float32, natural
    log, ``-inf`` (and out 0) where no key is valid. ``n_valid`` is static. ``tiles``: None is
    :func:`default_tiles` (read when traced)."""
    tiles = default_tiles() if tiles is None else tiles
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out_dtype = jnp.dtype(q.dtype if out_dtype is None else out_dtype)
    n = sk if n_valid is None else max(0, min(int(n_valid), sk))
    if n == 0:
        return jnp.zeros(q.shape, out_dtype), jnp.full((b, h, sq), -jnp.inf, jnp.float32)
    a = n // tiles.block_kv * tiles.block_kv
    parts = []
    if a:
        dp = -(-d // 64) * 64
        rows = 2 * tiles.block_q
        sq_p = -(-sq // rows) * rows
        fit = lambda x, s: jnp.pad(x.astype(jnp.float16), ((0, 0), (0, s - x.shape[1]), (0, 0), (0, dp - d)))
        qs = (q.astype(jnp.float32) * scale)
        out, lse2 = _kernel(fit(qs, sq_p), fit(k[:, :a], a), fit(v[:, :a], a), tiles)
        parts.append((out[:, :sq, :, :d].astype(jnp.float32), lse2[:, :, :sq] * LN2))
    if a < n:
        parts.append(_rest(q, k[:, a:n], v[:, a:n], scale))
    out, lse = parts[0]
    if len(parts) == 2:
        from xdit_jax.parallel.attention import merge_partials

        out, lse = merge_partials(out, lse, *parts[1])
    return out.astype(out_dtype), lse
