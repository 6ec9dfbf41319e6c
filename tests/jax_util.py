"""Helpers for tests that need no torch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_state(model_class, cfg, seed):
    """(graphdef, state) of a model of ``cfg`` whose every parameter is drawn on the host: N(0, 1/fan_in)
    for matrices, N(0, 0.1) for the rest (no zero-initialised gate or output hides a wrong path; no
    compiled init: a few ms, where an eager nnx init of a tiny model takes 6-15 s)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(a):
        std = a.shape[-2] ** -0.5 if a.ndim >= 2 else 0.1
        return jnp.asarray(std * rng.standard_normal(a.shape), a.dtype)

    return graphdef, jax.tree.map(draw, abstract)


def sequence_parallel_forward(model, mesh, text=None):
    """A jitted ``f(x, *embed_args, **embed_kwargs)`` = ``model(x, ...)`` with its blocks run over ``mesh`` by
    :func:`xdit_jax.parallel.sequence.run_blocks` (``text``: a two-stream model's text keys): the forward of the
    transformers whose pieces are ``embed(x, ...) -> (x, tokens, cond)``, ``blocks(x, tokens, cond)`` and
    ``head(x, cond, x's shape)`` (CogVideoX, Wan, Mochi, SD3)."""
    from xdit_jax.parallel.sequence import run_blocks

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, *args, **kwargs):
        mdl = nnx.merge(graphdef, state)
        y, tokens, cond = mdl.embed(x, *args, **kwargs)
        blocks = lambda p, h, tk, c: nnx.merge(graphdef, p).blocks(h, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, y, tokens, cond, mesh, text=text), cond, x.shape)

    return lambda x, *args, **kwargs: forward(state, x, *args, **kwargs)
