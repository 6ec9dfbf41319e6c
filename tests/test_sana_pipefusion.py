"""PipeFusion for SANA: the token mixers' buffers (xdit_jax.parallel.token_mixing: the linear attention's per-patch
sums, the grid conv's input) == the full-sequence ops when they hold the same step's values; the pipeline's patched
steps == the same rule run sequentially on one device, on pipefusion and combined meshes; warm-up steps == the plain
run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdit_jax import tiny
from xdit_jax.parallel import pipefusion, token_mixing
from xdit_jax.parallel.attention import AttentionConfig, attention_context
from xdit_jax.pipelines.sana import SanaPipeline

PROMPT = "A small dog running on a beach at sunset."
MSL = tiny.SANA_MAX_SEQUENCE_LENGTH


def _patched(fn, patches, plen, bufs, *args):
    """``fn(*args_patch)`` patch by patch through the buffers (one-device sequential rule), the outputs joined."""
    outs = []
    for m in range(patches):
        sl = [a[:, m * plen:(m + 1) * plen] if a.ndim >= 3 and a.shape[1] == patches * plen else a for a in args]
        with token_mixing.mixing_state(bufs, jnp.int32(0), jnp.int32(m), jnp.bool_(True), patches=patches,
                                       plen=plen) as cell:
            outs.append(fn(*sl))
        bufs = token_mixing.MixingBuffers(cell.la, cell.conv)
    return jnp.concatenate(outs, axis=1), bufs


def _warm(fn, patches, plen, bufs, *args):
    with token_mixing.mixing_state(bufs, jnp.int32(0), jnp.int32(0), jnp.bool_(True), patches=patches, plen=plen,
                                   warm=np.arange(patches * plen)[None]) as cell:
        out = fn(*args)
    return out, token_mixing.MixingBuffers(cell.la, cell.conv)


@pytest.mark.parametrize("grid,patches", [((5, 6), 3), ((3, 4), 4)])  # patches of 10 / 3 tokens: halo 7 / 5
def test_ops_with_buffers_of_this_step_equal_full_sequence(grid, patches):
    """A warm-up call fills the buffers from the whole sequence; the patched calls on the same inputs then see
    this step's values everywhere, so each equals the full-sequence op (halos longer than a patch included)."""
    h, w = grid
    s = h * w
    plen = -(-s // patches)
    sp = plen * patches
    rng = np.random.default_rng(0)
    b, heads, d, c = 2, 3, 4, 5
    q, k = (jnp.asarray(np.abs(rng.standard_normal((b, sp, heads, d))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, sp, heads, d)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, sp, c)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((3, 3, c)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((c,)), jnp.float32)
    bufs = token_mixing.MixingBuffers(jnp.zeros((1, b, patches, heads, d, d + 1)),
                                      jnp.zeros((1, b, sp + 2 * (w + 1), c)))

    def both(q, k, v, x):
        return (token_mixing.linear_attention(q, k, v), token_mixing.grid_conv3x3(x, wt, bias, grid=grid))

    with attention_context(AttentionConfig(valid_len=s if sp != s else None)):
        ref = both(q, k, v, x)
        warm, bufs = _warm(lambda *a: both(*a), patches, plen, bufs, q, k, v, x)
        outs = []
        for m in range(patches):
            sl = lambda a: a[:, m * plen:(m + 1) * plen]  # noqa: E731
            with token_mixing.mixing_state(bufs, jnp.int32(0), jnp.int32(m), jnp.bool_(True), patches=patches,
                                           plen=plen) as cell:
                outs.append(both(sl(q), sl(k), sl(v), sl(x)))
            bufs = token_mixing.MixingBuffers(cell.la, cell.conv)
    for i in range(2):
        # the warm-up call is the plain op (the per-patch sums are extra): bitwise; the patched calls sum the
        # patches' partial sums instead of all tokens at once: float32 rounding, measured <= 4.8e-7 (outputs O(1))
        np.testing.assert_array_equal(np.asarray(warm[i])[:, :s], np.asarray(ref[i])[:, :s])
        got = np.concatenate([np.asarray(o[i]) for o in outs], axis=1)
        np.testing.assert_allclose(got[:, :s], np.asarray(ref[i])[:, :s], atol=2e-6, rtol=0)


def test_ops_refuse_pipefusion_without_their_buffers():
    from xdit_jax.parallel.attention import kv_cache

    x = jnp.zeros((1, 4, 2, 3))
    with kv_cache(jnp.zeros((0, 1, 4, 1, 1)), jnp.zeros((0, 1, 4, 1, 1)), 0, 0, True, slots=0):
        with pytest.raises(NotImplementedError, match="init_mixing"):
            token_mixing.linear_attention(x, x, x)
