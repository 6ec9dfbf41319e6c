"""PipeFusion for the two-stream models whose text rides with the patches (Mochi 1, SD3), on 8 simulated
CPU devices.

The mechanics (xdit_jax/parallel/pipefusion.py): the text is cut into slices, one riding with each patch
through the stages (``text=``; its K/V kept in buffers as the image's, the slices padded to equal lengths
and the padding masked), or each patch carries a copy of the whole text (without ``text``); the context
joins the cached attention, and the final (``context_pre_only``) block runs on the last stage with its own
K/V buffers. Buffers filled by a warm-up step on the same input hold exactly the K/V each patch recomputes,
and every text row then sees exactly the keys of the whole pass; so a patched pass over them must equal the
full pass, on every mesh (and the warm-up pass too). A wrong stream hand-over, a stale text, a text slice
stored at the wrong place, a missed final-block write or a wrong stage order gives errors of order 0.1-1.

Tolerance: fp32, only summation order differs (stage splits, patches, the ring's and the context's
LSE merges, padded heads); outputs O(1); 2e-5 (measured <= 3e-6).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.jax_util import random_state as _random_state
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import mochi, sd3
from xdit_jax.parallel import pipefusion
from xdit_jax.parallel.sequence import run_blocks


@functools.cache
def _mochi():
    # 4 blocks (3 stacked: uneven on 2 stages) of 3 heads (padded to 4 on ulysses=2); a caption with
    # padding in one sample: 2 x 2 x 3 latents = 6 ... 2 frames x 2 x 3 = 12 video tokens.
    cfg = mochi.MochiConfig.from_dict({**tiny.MOCHI_TRANSFORMER, "num_layers": 4, "num_attention_heads": 3})
    graphdef, state = _random_state(mochi.MochiTransformer3DModel, cfg, 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 2, 4, 6)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 5, cfg.text_embed_dim)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.int32)
    embed = (x, text, jnp.array([250.0, 800.0]), mask)
    return cfg, graphdef, state, embed, cfg.num_layers - 1


@functools.cache
def _sd3():
    cfg = sd3.SD3Config.from_dict({**tiny.SD3_TRANSFORMER, "num_layers": 4, "num_attention_heads": 3,
                                   "caption_projection_dim": 48, "qk_norm": "rms_norm"})
    graphdef, state = _random_state(sd3.SD3Transformer2DModel, cfg, 2)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 6, 8)), jnp.float32)  # 3 x 4 = 12 image tokens
    text = jnp.asarray(rng.standard_normal((2, 5, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((2, cfg.pooled_projection_dim)), jnp.float32)
    embed = (x, text, pooled, jnp.array([250.0, 800.0]))
    return cfg, graphdef, state, embed, cfg.num_layers - 1


FAMILIES = {"mochi": _mochi, "sd3": _sd3}
TEXT = {"mochi": mochi.TEXT_KEYS, "sd3": sd3.pipefusion_stacks(_sd3()[0])["text_keys"]}


@functools.cache
def _embedded(family):
    _, graphdef, state, embed, _ = FAMILIES[family]()
    return jax.jit(lambda st, e: nnx.merge(graphdef, st).embed(*e))(state, embed)


SLOW = pytest.mark.slow  # cases another case covers (the default run stays under 20 minutes); `-m slow` runs them


# sliced: the text cut with the patches (5 tokens: 3 slices of 2, the last padded; Mochi's mask pads one sample);
# False: a whole copy per patch
@pytest.mark.parametrize("family,mesh,patches,sliced", [
    pytest.param("mochi", "cfg=2,pipefusion=2,ulysses=2", 3, True, marks=SLOW),  # SD3.5 Medium's stacks case covers it
    pytest.param("mochi", "pipefusion=2,ring=2", 2, True, marks=SLOW),  # ring x PipeFusion: flux stacks, test_pipefusion
    pytest.param("mochi", "pipefusion=2,ring=2", 2, False, marks=SLOW),
    ("sd3", "pipefusion=3", 3, True), ("sd3", "pipefusion=3", 2, False),
    pytest.param("mochi", None, 3, True, marks=SLOW), pytest.param("mochi", "pipefusion=2", 3, False, marks=SLOW),
    pytest.param("sd3", "pipefusion=2,ring=2", 2, False, marks=SLOW),  # SD3.5 Medium's test_pipefusion_stacks case
    pytest.param("mochi", "pipefusion=2", 2, True, marks=SLOW), pytest.param("mochi", "pipefusion=3", 2, True, marks=SLOW),
    pytest.param("sd3", None, 3, True, marks=SLOW), pytest.param("sd3", "pipefusion=2", 2, True, marks=SLOW),
    pytest.param("sd3", "cfg=2,pipefusion=2,ulysses=2", 3, True, marks=SLOW)])
def test_patches_with_buffers_of_the_same_input_are_exact(family, mesh, patches, sliced):
    cfg, graphdef, state, embed, stacked = FAMILIES[family]()
    x, tokens, cond = _embedded(family)

    def blocks(p, y, t, c):
        return nnx.merge(graphdef, p).blocks(y, t, c)

    ref = jax.jit(lambda st: run_blocks(blocks, st, x, tokens, cond, None))(state)
    m = build_mesh(mesh)
    stages = m.shape["pipefusion"]
    state = pipefusion.pad_stack(state, "transformer_blocks", stages)
    slots = len(pipefusion.stage_layout(stacked, stages))
    text = TEXT[family] if sliced else None
    cache = pipefusion.init_cache(m, slots, 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, patches, tail=True, text_len=5 if sliced else None)

    def run(warmup):
        return jax.jit(lambda st, c: pipefusion.run_pipefusion(
            blocks, st, x, tokens, cond, c, m if mesh else None, patches=patches, warmup=warmup,
            stacked="transformer_blocks", num_layers=stacked, text=text))

    warm, cache1 = run(True)(state, cache)
    patched, cache2 = run(False)(state, cache1)
    assert float(jnp.abs(ref).max()) > 0.5
    assert float(jnp.abs(warm - ref).max()) <= 2e-5
    assert float(jnp.abs(patched - ref).max()) <= 2e-5
    for a, b in zip(cache1, cache2):  # the same K/V written back, the final block's and the text's included
        assert float(jnp.abs(b - a).max()) <= 2e-5
    g = 4 if sliced else 2  # buffers per stack: (k, v[, ck, cv])
    assert len(cache1) == 2 * g
    assert float(jnp.abs(cache1[g][stages - 1]).max()) > 0  # the last stage's final-block buffer was filled
    if sliced:  # every real text row was written: the stack's (every layer) and the final block's text K
        assert bool((jnp.abs(cache1[2][:, :, :5]).max(axis=(-1, -2)) > 0).all())
        assert bool((jnp.abs(cache1[g + 2][stages - 1][:, :5]).max(axis=(-1, -2)) > 0).all())


def test_stale_buffers_change_the_patched_pass():
    """The converse: buffers from another input (a previous step) change the patched result, so the
    test above can tell a pass that reads its buffers from one that does not."""
    cfg, graphdef, state, embed, stacked = _sd3()
    x, tokens, cond = _embedded("sd3")

    def blocks(p, y, t, c):
        return nnx.merge(graphdef, p).blocks(y, t, c)

    m = build_mesh("pipefusion=3")
    cache = pipefusion.init_cache(m, stacked, 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, 2, tail=True)
    run = jax.jit(lambda j, c, warmup: pipefusion.run_pipefusion(
        blocks, state, j, tokens, cond, c, m, patches=2, warmup=warmup, stacked="transformer_blocks"),
        static_argnums=2)
    _, stale = run(x + jax.random.normal(jax.random.key(3), x.shape), cache, True)  # (a shift would be normed away)
    patched, _ = run(x, stale, False)
    ref = jax.jit(lambda st: run_blocks(blocks, st, x, tokens, cond, None))(state)
    assert float(jnp.abs(patched - ref).max()) > 1e-2


def test_buffers_without_a_final_block_slot_are_refused():
    cfg, graphdef, state, embed, stacked = _mochi()
    x, tokens, cond = _embedded("mochi")
    cache = pipefusion.init_cache(build_mesh(None), stacked, 2, x.shape[1], cfg.num_attention_heads,
                                  cfg.attention_head_dim, jnp.float32, 2)
    with pytest.raises(RuntimeError, match="final block"):
        pipefusion.run_pipefusion(lambda p, y, t, c: nnx.merge(graphdef, p).blocks(y, t, c), state, x, tokens, cond,
                                  cache, None, patches=2, warmup=True, stacked="transformer_blocks")


# ----- the pipelines on pipefusion meshes: Mochi (4 blocks: 3 stacked + the last), SD3.5 Medium shaped, FLUX
# and HunyuanDiT (several stacks: test_pipefusion_stacks.py) -----

PIPES = {
    "mochi": dict(transformer={"num_layers": 4, "num_attention_heads": 3},
                  call=dict(num_frames=7, height=32, width=48, max_sequence_length=16)),  # 2 x 2 x 3 = 12 tokens
    # SD3.5 Medium shaped: runs of 3 dual-attention and 2 plain blocks (two stacks, looped), then the last
    "sd3": dict(transformer={"num_layers": 6, "num_attention_heads": 3, "caption_projection_dim": 48,
                             "dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm"},
                call=dict(height=48, width=80, max_sequence_length=16)),  # 3 x 5 = 15 image tokens
    # two stacks (3 double-, 4 single-stream blocks) in the looped pipeline (test_pipefusion_stacks.py)
    "flux": dict(transformer={"num_layers": 3, "num_single_layers": 4, "num_attention_heads": 3},
                 call=dict(height=48, width=80, max_sequence_length=16)),
    # 8 layers: down, mid and skip stacks of 3, 2 and 3 (the long skips ride in each patch's carry)
    "hunyuandit": dict(transformer={"num_layers": 8}, call=dict(height=48, width=64, use_resolution_binning=False)),
}


# HunyuanDiT's and SD3's patched pipelines are slow-marked: their stacks' patched rule is checked at the model level
# (tests/test_pipefusion_stacks.py) and Mochi / FLUX run the pipeline-level path here.
@pytest.fixture(scope="module", params=[pytest.param(f, marks=SLOW) if f in ("hunyuandit", "sd3") else f
                                        for f in PIPES])
def pipes(request, tmp_path_factory):
    """(family, pipeline class, folder, kwargs, one device's latents, the sequential 2-patch rule's)."""
    from xdit_jax import FluxPipeline, HunyuanDiTPipeline, MochiPipeline, StableDiffusion3Pipeline

    family = request.param
    cls = {"mochi": MochiPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline,
           "hunyuandit": HunyuanDiTPipeline}[family]
    folder = tiny.make_tiny_model(tmp_path_factory.mktemp(family) / "m", transformer=PIPES[family]["transformer"],
                                  family=family)
    kw = dict(PIPES[family]["call"], num_inference_steps=3, output_type="latent", progress=False, seed=5)
    prompts = ["A small dog running on a beach.", "A cat."]
    out = "frames" if family == "mochi" else "images"
    run = lambda pipe: getattr(pipe(prompts, **kw), out)  # noqa: E731
    one = run(cls.from_pretrained(folder))
    sequential = run(cls.from_pretrained(folder, pipefusion_patches=2))
    return cls, folder, run, one, sequential


@pytest.mark.slow  # the model-level tests check warm-up == one device on these meshes; kept for `-m slow`
def test_pipeline_warmup_steps_equal_one_device(pipes):
    cls, folder, run, one, _ = pipes
    mesh = "pipefusion=2,ulysses=2" if cls.__name__ == "FluxPipeline" else "cfg=2,pipefusion=2,ulysses=2"  # no CFG
    out = run(cls.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=3))
    assert np.abs(out - one).max() <= 2e-5 * np.abs(one).max()


# one mesh per family (the model-level tests above run the others); no ring for the two-stream families: their
# text is sliced with the patches, as in the one-device reference, except on the CPU's ring meshes
# (pipefusion.slices_text)
PATCHED_MESH = {"MochiPipeline": "pipefusion=2,ulysses=2", "StableDiffusion3Pipeline": "data=2,pipefusion=2",
                "FluxPipeline": "pipefusion=2,ulysses=2", "HunyuanDiTPipeline": "cfg=2,pipefusion=3"}


def test_pipeline_patched_steps_equal_sequential_reference(pipes):
    cls, folder, run, one, sequential = pipes
    out = run(cls.from_pretrained(folder, mesh=PATCHED_MESH[cls.__name__], pipefusion_patches=2))
    scale = np.abs(one).max()
    assert np.abs(out - sequential).max() <= 2e-5 * scale
    assert np.abs(sequential - one).max() > 1e-3 * scale  # the displaced-patch rule is not the exact one
