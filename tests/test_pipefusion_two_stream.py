"""PipeFusion for the two-stream models whose text rides with each patch (Mochi 1, SD3), on 8 simulated
CPU devices.

The mechanics (xdit_jax/parallel/pipefusion.py): every patch carries its own copy of the text stream
through the stages, the context joins the cached attention, and the final (``context_pre_only``)
block runs on the last stage with its own K/V buffers. Buffers filled by a warm-up step on the same
input hold exactly the K/V each patch recomputes, and the text stream of every patch then sees
exactly the keys of the whole pass; so a patched pass over them must equal the full pass, on every
mesh (and the warm-up pass too). A wrong stream hand-over, a stale text, a missed final-block write
or a wrong stage order gives errors of order 0.1-1.

Tolerance: fp32, only summation order differs (stage splits, patches, the ring's and the context's
LSE merges, padded heads); outputs O(1); 2e-5 (measured <= 3e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import mochi, sd3
from xdit_jax.parallel import pipefusion
from xdit_jax.parallel.sequence import run_blocks


def _perturbed(model, seed):
    """The model's state with every parameter moved by N(0, 0.1): no zero-initialised gate or output
    hides a wrong path."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(tree, leaves)


def _mochi():
    # 4 blocks (3 stacked: uneven on 2 stages) of 3 heads (padded to 4 on ulysses=2); a caption with
    # padding in one sample: 2 x 2 x 3 latents = 6 ... 2 frames x 2 x 3 = 12 video tokens.
    cfg = mochi.MochiConfig.from_dict({**tiny.MOCHI_TRANSFORMER, "num_layers": 4, "num_attention_heads": 3})
    graphdef, state = _perturbed(mochi.MochiTransformer3DModel(cfg, rngs=nnx.Rngs(0)), 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 2, 4, 6)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 5, cfg.text_embed_dim)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.int32)
    embed = (x, text, jnp.array([250.0, 800.0]), mask)
    return cfg, graphdef, state, embed, cfg.num_layers - 1


def _sd3():
    cfg = sd3.SD3Config.from_dict({**tiny.SD3_TRANSFORMER, "num_layers": 4, "num_attention_heads": 3,
                                   "caption_projection_dim": 48, "qk_norm": "rms_norm"})
    graphdef, state = _perturbed(sd3.SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0)), 2)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 6, 8)), jnp.float32)  # 3 x 4 = 12 image tokens
    text = jnp.asarray(rng.standard_normal((2, 5, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((2, cfg.pooled_projection_dim)), jnp.float32)
    embed = (x, text, pooled, jnp.array([250.0, 800.0]))
    return cfg, graphdef, state, embed, cfg.num_layers - 1


FAMILIES = {"mochi": _mochi, "sd3": _sd3}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mesh,patches", [(None, 3), ("pipefusion=2", 2), ("pipefusion=3", 2),
                                          ("cfg=2,pipefusion=2,ulysses=2", 3), ("pipefusion=2,ring=2", 2)])
def test_patches_with_buffers_of_the_same_input_are_exact(family, mesh, patches):
    cfg, graphdef, state, embed, stacked = FAMILIES[family]()
    model = nnx.merge(graphdef, state)
    x, tokens, cond = model.embed(*embed)

    def blocks(p, y, t, c):
        return nnx.merge(graphdef, p).blocks(y, t, c)

    ref = run_blocks(blocks, state, x, tokens, cond, None)
    m = build_mesh(mesh)
    stages = m.shape["pipefusion"]
    state = pipefusion.pad_stack(state, "transformer_blocks", stages)
    slots = len(pipefusion.stage_layout(stacked, stages))
    cache = pipefusion.init_cache(m, slots, 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, patches, tail=True)

    def run(warmup):
        return jax.jit(lambda st, c: pipefusion.run_pipefusion(
            blocks, st, x, tokens, cond, c, m if mesh else None, patches=patches, warmup=warmup,
            stacked="transformer_blocks", num_layers=stacked))

    warm, cache1 = run(True)(state, cache)
    patched, cache2 = run(False)(state, cache1)
    assert float(jnp.abs(ref).max()) > 0.5
    assert float(jnp.abs(warm - ref).max()) <= 2e-5
    assert float(jnp.abs(patched - ref).max()) <= 2e-5
    for a, b in zip(cache1, cache2):  # the same K/V written back, the final block's included
        assert float(jnp.abs(b - a).max()) <= 2e-5
    n = stages
    assert float(jnp.abs(cache1[2][n - 1]).max()) > 0  # the last stage's final-block buffer was filled


def test_stale_buffers_change_the_patched_pass():
    """The converse: buffers from another input (a previous step) change the patched result, so the
    test above can tell a pass that reads its buffers from one that does not."""
    cfg, graphdef, state, embed, stacked = _sd3()
    model = nnx.merge(graphdef, state)
    x, tokens, cond = model.embed(*embed)

    def blocks(p, y, t, c):
        return nnx.merge(graphdef, p).blocks(y, t, c)

    m = build_mesh("pipefusion=3")
    cache = pipefusion.init_cache(m, stacked, 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, 2, tail=True)
    run = lambda warmup, j: pipefusion.run_pipefusion(blocks, state, j, tokens, cond, cache if warmup else c1, m,
                                                      patches=2, warmup=warmup, stacked="transformer_blocks")
    _, c1 = run(True, x + jax.random.normal(jax.random.key(3), x.shape))  # (a shift would be normed away)
    patched, _ = run(False, x)
    ref = run_blocks(blocks, state, x, tokens, cond, None)
    assert float(jnp.abs(patched - ref).max()) > 1e-2


def test_buffers_without_a_final_block_slot_are_refused():
    cfg, graphdef, state, embed, stacked = _mochi()
    x, tokens, cond = nnx.merge(graphdef, state).embed(*embed)
    cache = pipefusion.init_cache(build_mesh(None), stacked, 2, x.shape[1], cfg.num_attention_heads,
                                  cfg.attention_head_dim, jnp.float32, 2)
    with pytest.raises(RuntimeError, match="final block"):
        pipefusion.run_pipefusion(lambda p, y, t, c: nnx.merge(graphdef, p).blocks(y, t, c), state, x, tokens, cond,
                                  cache, None, patches=2, warmup=True, stacked="transformer_blocks")
