"""Run a model's block stack over the mesh: batch over (data, cfg), the joint sequence over (ring, ulysses).

DESIGN.md principle 2: the whole joint [text; video] sequence is sharded as one; it is padded
up to a multiple of ``ring x ulysses`` (padded keys are masked by the attention op, padded rows
dropped here), so any degree works. Per-token work inside the blocks is local and exact; the only
cross-device traffic is the attention op's (:mod:`xdit_jax.parallel.attention`).

The model supplies ``blocks(params, joint, tokens, cond) -> joint`` for a local shard, where
``tokens`` is a pytree of per-token tables with the sequence on axis 0 (sharded with it) and
``cond`` a pytree of per-sample arrays with the batch on axis 0 (sharded with the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xdit_jax.parallel.attention import AttentionConfig, attention_context

BATCH_AXES = ("data", "cfg")
SEQ_AXES = ("ring", "ulysses")


def _shard_map(f, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def sequence_degree(mesh) -> int:
    return int(mesh.shape.get("ring", 1) * mesh.shape.get("ulysses", 1)) if mesh is not None else 1


def batch_degree(mesh) -> int:
    return int(mesh.shape.get("data", 1) * mesh.shape.get("cfg", 1)) if mesh is not None else 1


def padded_length(n: int, mesh) -> int:
    d = sequence_degree(mesh)
    return -(-n // d) * d


def _pad_axis(x, axis: int, to: int):
    if x.shape[axis] == to:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, pad)


def run_blocks(blocks, params, joint, tokens, cond, mesh=None, *, backend: str = "xla", with_context: bool = False,
               text=None):
    """``blocks(params, joint, tokens, cond)`` over ``mesh`` (None or one device: called directly).

    joint: (B, S, D) global; returns (B, S, D). B must be divisible by data x cfg.
    ``with_context``: ``blocks`` returns ``(joint, context)``, ``context`` a pytree of per-sample arrays
    (batch first): a two-stream model's text stream, updated next to the sharded sequence; then returns
    ``(joint, context)``.
    ``text``: the keys of ``cond`` holding a two-stream model's text (B, L, ...), which is then sharded over
    (ring, ulysses) like the sequence (padded to a multiple of the degree; the attention gathers the whole
    text's keys, :class:`~xdit_jax.parallel.attention.AttentionConfig`'s ``context_valid``), so that each
    device computes its slice of the text's per-token work; a context key mask in ``cond`` stays whole.
    Without it every device of a sequence group holds the text whole (and computes all of it).
    """
    if mesh is None or mesh.size == 1:
        with attention_context(AttentionConfig(mesh=None, backend=backend, valid_len=None)):
            return blocks(params, joint, tokens, cond)
    b, s = joint.shape[:2]
    if b % batch_degree(mesh):
        raise ValueError(f"A batch of {b} cannot be split over data x cfg = {batch_degree(mesh)} devices.")
    sp = padded_length(s, mesh)
    # Entering replicated over the sequence axes makes the shard_map's split a local slice (no
    # traffic); GSPMD would otherwise shard the embedding on its own and reshuffle at the padding.
    rep = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    joint_p = rep(_pad_axis(joint, 1, sp), P(BATCH_AXES))
    tokens_p = jax.tree.map(lambda t: rep(_pad_axis(t, 0, sp), P()), tokens)
    seq = P(BATCH_AXES, SEQ_AXES, *([None] * (joint.ndim - 2)))
    tok_specs = jax.tree.map(lambda t: P(SEQ_AXES, *([None] * (t.ndim - 1))), tokens_p)
    cond_specs = jax.tree.map(lambda c: P(BATCH_AXES, *([None] * (c.ndim - 1))), cond)
    par_specs = jax.tree.map(lambda _: P(), params)
    text_keys, text_len = tuple(text or ()) if sequence_degree(mesh) > 1 else (), None
    if text_keys:
        text_len = int(jax.tree.leaves(cond[text_keys[0]])[0].shape[1])
        lp = padded_length(text_len, mesh)
        cond = {key: jax.tree.map(lambda a: _pad_axis(a, 1, lp), a) if key in text_keys else a
                for key, a in cond.items()}
        text_spec = lambda c: P(BATCH_AXES, SEQ_AXES, *([None] * (c.ndim - 2)))  # noqa: E731
        cond_specs = {key: jax.tree.map(text_spec, a) if key in text_keys else cond_specs[key]
                      for key, a in cond.items()}
    cfg = AttentionConfig(mesh=mesh if sequence_degree(mesh) > 1 else None, backend=backend,
                          valid_len=s if sp != s else None, context_valid=text_len)

    def local(p, j, t, c):
        with attention_context(cfg):
            return blocks(p, j, t, c)

    if not with_context:
        out = _shard_map(local, mesh, (par_specs, seq, tok_specs, cond_specs), seq)(params, joint_p, tokens_p, cond)
        return out[:, :s]
    # A text held whole is replicated over the sequence axes: each device keeps its own copy (the copies of a
    # ring group differ by the float order of its merges, a few ulps), as the global array's; a sharded text
    # comes back in its slices.
    spec = (lambda c: P(BATCH_AXES, SEQ_AXES, *([None] * (c.ndim - 2)))) if text_keys else \
        (lambda c: P(BATCH_AXES, *([None] * (c.ndim - 1))))
    ctx_specs = jax.tree.map(spec, jax.eval_shape(lambda: blocks(params, joint, tokens, cond)[1]))
    out, ctx = _shard_map(local, mesh, (par_specs, seq, tok_specs, cond_specs), (seq, ctx_specs))(
        params, joint_p, tokens_p, cond)
    if text_keys:
        ctx = jax.tree.map(lambda a: a[:, :text_len], ctx)
    return out[:, :s], ctx
