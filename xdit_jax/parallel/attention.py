"""The attention op: the one place where a model's computation may cross devices.

Models call :func:`attention` on their local (B, S, H, D) query/key/value. Today it is the
single-device kernel; the sequence-parallel strategies (Ulysses, Ring, USP) plug in here, driven
by the mesh the pipeline installs with :func:`attention_context`, so that no model file ever
calls a collective (DESIGN.md, principle 1).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How attention runs inside the traced step: the mesh (None: one device) and the backend."""

    mesh: object | None = None
    backend: str = "xla"


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


def local_attention(q, k, v, *, kv_valid=None, scale=None, return_lse=False):
    """Softmax attention on one device. q: (B, Sq, H, D); k, v: (B, Sk, H, D).

    Logits and softmax in float32 whatever the input dtype; the output has q's dtype.
    ``kv_valid``: optional bool (Sk,) or (B, Sk) mask of keys that may be attended.
    ``return_lse``: also return the log-sum-exp of the logits, (B, H, Sq) float32, which the ring
    strategy needs to merge partial results.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_valid is not None:
        mask = kv_valid if kv_valid.ndim == 2 else kv_valid[None]
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", (p / denom).astype(v.dtype), v,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    if return_lse:
        return out, (jnp.log(denom) + m)[..., 0]
    return out


def attention(q, k, v, *, kv_valid=None, scale=None):
    """Attention over the (possibly sharded) joint sequence. q, k, v: (B, S, H, D)."""
    cfg = current_config()
    if cfg.mesh is None:
        return local_attention(q, k, v, kv_valid=kv_valid, scale=scale)
    raise NotImplementedError("sequence-parallel attention is not built yet")
