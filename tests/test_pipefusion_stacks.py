"""PipeFusion over several block stacks (FLUX: double-stream, then single-stream blocks; SD3.5 Medium: its runs of
dual-attention and plain blocks; HunyuanDiT: down, mid and skip blocks with long skips), on 8 simulated CPU
devices.

The looped pipeline (xdit_jax/parallel/pipefusion.py): every stack is split over all the stages and a patch
goes round the stages once per stack, the last stage handing the carry (image patch, its slice of the text)
to the first. FLUX runs both stacks with the text apart from the image (``FluxTransformer2DModel.blocks``: the
single-stream blocks take the text as their attention's context instead of sharding [text; image] as one);
under PipeFusion the text is cut into slices that ride with the patches, its K/V kept in buffers.

Checks: that form equals the two phases of the model (the path the diffusers parity tests cover); buffers
filled by a warm-up pass on the same input make a patched pass equal the full pass on every mesh (a wrong
hand-over between rounds, a stale text or a stack run on the wrong tick gives errors of order 0.1-1); the
looped schedule computes per device what a one-stack pipeline would (only the live stacks each tick).

Tolerance: fp32, only summation order differs (stage splits, patches, the LSE merges of the ring and the
context, padded heads); outputs O(10); 2e-5 of the largest output (measured <= 4e-7 of it).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.jax_util import random_state as _random_state
from xdit_jax import tiny
from xdit_jax.bench import hlo_matmul_flops
from xdit_jax.mesh import build_mesh
from xdit_jax.models import flux, hunyuandit, sd3
from xdit_jax.parallel import pipefusion

SLOW = pytest.mark.slow


@functools.cache
def _flux():
    """3 double- (uneven on 2 stages) and 4 single-stream blocks (uneven on 3) of 3 heads (padded to 4 on
    ulysses=2); 3 x 4 = 12 image tokens (padded to the patches), 5 text tokens with RoPE ids of their own
    (FluxPipeline's are zeros: a rotated text would hide nothing)."""
    cfg = flux.FluxConfig.from_dict({**tiny.FLUX_TRANSFORMER, "num_layers": 3, "num_single_layers": 4,
                                     "num_attention_heads": 3})
    graphdef, state = _random_state(flux.FluxTransformer2DModel, cfg, 3)
    rng = np.random.default_rng(0)
    hs = jnp.asarray(rng.standard_normal((2, 12, cfg.in_channels)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((2, 5, cfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((2, cfg.pooled_projection_dim)), jnp.float32)
    txt_ids = np.zeros((5, 3), np.float32)
    txt_ids[:, 1] = np.arange(5)
    model = nnx.merge(graphdef, state)
    x, tokens, cond, txt_rope = model.embed(hs, enc, pooled, jnp.array([0.25, 0.8]), flux.image_ids(3, 4), txt_ids,
                                            jnp.array([3.5, 3.5]))

    @jax.jit
    def two_phases(st):  # as the model's forward runs them: the single-stream blocks over [text; image]
        m = nnx.merge(graphdef, st)
        y, c = m.double_blocks(x, tokens, cond)
        joint = m.single_blocks(jnp.concatenate([c, y], 1), m.joint_tokens(tokens, txt_rope), {"temb": cond["temb"]})
        return joint[:, c.shape[1]:]

    return cfg, graphdef, state, (x, tokens, cond), two_phases(state)


def _blocks(graphdef, method="blocks"):
    return lambda p, y, t, c: getattr(nnx.merge(graphdef, p), method)(y, t, c)


def _warm_then_patched(model, module, mesh, patches, method="blocks", tail=False, sliced=True):
    """``model`` = (cfg, graphdef, state, (x, tokens, cond), ref): a warm-up pass of ``run_pipefusion`` over
    the stacks ``module.pipefusion_stacks(cfg)`` gives (the text sliced with the patches where it names the
    text and ``sliced``), then a patched pass over the buffers it filled; -> (warm output, patched output,
    buffers after each, stages)."""
    cfg, graphdef, state, (x, tokens, cond), _ = model
    stacks = module.pipefusion_stacks(cfg)
    m = build_mesh(mesh)
    text = stacks.get("text_keys") if sliced and pipefusion.slices_text(m) else None
    text_len = jax.tree.leaves(cond[text[0]])[0].shape[1] if text else None
    stages = m.shape["pipefusion"]
    st = pipefusion.pad_stack(state, stacks["stacked"], stages)
    cache = pipefusion.init_cache(m, pipefusion.stack_slots(stacks["stacked_layers"], stages), 2, x.shape[1],
                                  cfg.num_attention_heads, cfg.attention_head_dim, jnp.float32, patches, tail=tail,
                                  attentions=stacks.get("stack_attentions"),
                                  tail_attentions=stacks.get("tail_attentions", 1), text_len=text_len)

    def run(warmup):
        return jax.jit(lambda s, c: pipefusion.run_pipefusion(
            _blocks(graphdef, method), s, x, tokens, cond, c,
            m if mesh else None, patches=patches, warmup=warmup, stacked=stacks["stacked"],
            num_layers=stacks["stacked_layers"], text=text))

    warm, cache1 = run(True)(st, cache)
    patched, cache2 = run(False)(st, cache1)
    return warm, patched, cache1, cache2, stages


def _check_exact(ref, warm, patched, cache1, cache2):
    scale = float(jnp.abs(ref).max())
    assert scale > 0.5
    assert float(jnp.abs(warm - ref).max()) <= 2e-5 * scale
    assert float(jnp.abs(patched - ref).max()) <= 2e-5 * scale
    for a, b in zip(cache1, cache2):  # the same K/V written back
        assert float(jnp.abs(b - a).max()) <= 2e-5 * float(jnp.abs(a).max())


@pytest.mark.parametrize("family", ["flux", "hunyuandit"])
def test_the_form_pipefusion_runs_equals_the_models_blocks(family):
    """FLUX's blocks() with the text held whole == its two phases (the single-stream blocks over [text; image]);
    HunyuanDiT's pipefusion_blocks (the long skips in a register) == its blocks (a list of skips)."""
    make, method = {"flux": (_flux, "blocks"), "hunyuandit": (_hunyuandit, "pipefusion_blocks")}[family]
    _, graphdef, state, (x, tokens, cond), ref = make()
    out = jax.jit(lambda st: getattr(nnx.merge(graphdef, st), method)(x, tokens, cond))(state)
    scale = float(jnp.abs(ref).max())
    assert scale > 1
    assert float(jnp.abs(out - ref).max()) <= 2e-5 * scale


@pytest.mark.parametrize("mesh,patches,sliced", [
    # (uneven stages x ulysses in the default run: HunyuanDiT's pipefusion=3,ulysses=2 case below)
    pytest.param("pipefusion=3,ulysses=2", 3, True, marks=SLOW), pytest.param(None, 3, True, marks=SLOW),
    ("pipefusion=2,ring=2", 2, True),
    pytest.param("pipefusion=2,ring=2", 3, True, marks=SLOW), pytest.param("pipefusion=2,ring=2", 2, False, marks=SLOW),
    pytest.param("pipefusion=2", 2, True, marks=SLOW), pytest.param("pipefusion=3", 2, True, marks=SLOW),
    pytest.param("cfg=2,pipefusion=2,ulysses=2", 3, True, marks=SLOW),
    pytest.param("pipefusion=3,ulysses=2", 3, False, marks=SLOW)])
def test_flux_patches_with_buffers_of_the_same_input_are_exact(mesh, patches, sliced):
    """The text (5 tokens with RoPE of their own: the slices' tables must be theirs) sliced with the patches,
    or a whole copy per patch."""
    model = _flux()
    warm, patched, cache1, cache2, _ = _warm_then_patched(model, flux, mesh, patches, sliced=sliced)
    _check_exact(model[-1], warm, patched, cache1, cache2)
    assert len(cache1) == (8 if sliced else 4)  # (k, v[, text k, text v]) per stack, no final block
    for a in cache1:  # every layer slot of both stacks filled
        assert float(jnp.abs(a).max(axis=(1, 2, 3, 4)).min()) > 0.1


def test_text_slices_with_a_ring_on_the_cpu_need_the_scheduler_flag(monkeypatch):
    """On the CPU with ring > 1 the text is sliced only with pipefusion.CPU_RING_TEXT_FLAG in XLA_FLAGS (XLA:CPU ran
    the looped FLUX step on pipefusion=2,ring=2 nondeterministically without it; the test session sets it, as the
    scripts do): without it the pipelines carry the whole text there and run_pipefusion refuses slices, saying what
    to set. Other platforms and ring-free meshes slice."""
    cfg, graphdef, state, (x, tokens, cond), _ = _flux()
    m = build_mesh("pipefusion=2,ring=2")
    assert pipefusion.CPU_RING_TEXT_FLAG in os.environ["XLA_FLAGS"] and pipefusion.slices_text(m)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert not pipefusion.slices_text(m) and pipefusion.slices_text(build_mesh("pipefusion=2,ulysses=2"))
    assert pipefusion.slices_text(m, platform="gpu") and pipefusion.slices_text(None)
    assert not pipefusion.slices_text(m.abstract_mesh)  # no devices: jax's default backend (here the CPU)
    cache = pipefusion.init_cache(m, (2, 2), 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, 2, abstract=True, text_len=5)
    with pytest.raises(NotImplementedError, match=pipefusion.CPU_RING_TEXT_FLAG):
        pipefusion.run_pipefusion(_blocks(graphdef), state, x, tokens, cond, cache, m, patches=2,
                                  stacked=flux.STACKS, num_layers=(3, 4), text=flux.TEXT_KEYS)


def test_looped_pipeline_runs_only_the_live_stacks():
    """Per device, the patched step's matrix products are at most what a one-stack pipeline of the same
    layers computes: (M + n - 1) ticks of 1/n of every stack, against M ticks of all of it on one device:
    0.75 at M = n = 2 (XLA hoists each layer's conditioning out of the tick loop: a little less). Running
    every stack on every one of the M + 2n - 1 ticks would give 1.25."""
    cfg, graphdef, state, (x, tokens, cond), _ = _flux()
    cfg = flux.FluxConfig.from_dict({**tiny.FLUX_TRANSFORMER, "num_layers": 2, "num_single_layers": 4,
                                     "num_attention_heads": 3})  # both stacks split evenly over 2 stages
    graphdef, state = _random_state(flux.FluxTransformer2DModel, cfg, 3)

    def flops(mesh, text=None):
        m = build_mesh(mesh)
        cache = pipefusion.init_cache(m, (2, 4), 2, x.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                      jnp.float32, 2, abstract=True, text_len=5 if text else None)
        fn = jax.jit(lambda s, c: pipefusion.run_pipefusion(_blocks(graphdef), s, x, tokens, cond, c,
                                                            m if mesh else None, patches=2, stacked=flux.STACKS,
                                                            num_layers=(2, 4), text=text))
        return hlo_matmul_flops(fn.lower(state, cache).compile().as_text())

    ratio = flops("pipefusion=2") / flops(None)
    assert 0.6 < ratio <= 0.75
    # The text sliced with the patches: each text token computed once a step, not once a patch. A patch's rows
    # go from 6 image + 5 text = 11 to 6 + 3 (the text padded to 6) = 9: the linear layers' 9/11 = 0.82, the
    # attention's 9 x 18 / (11 x 17) = 0.87 (measured 0.852)
    text = flux.pipefusion_stacks(cfg)["text_keys"]
    sliced, whole = flops("pipefusion=2", text), flops("pipefusion=2")
    assert 0.8 < sliced / whole <= 0.87


@functools.cache
def _sd35_medium():
    """SD3.5 Medium shaped: blocks 0-2 dual attention (a run of 3, uneven on 2 stages), 3-4 plain (a run of
    2), the last (5) dual as well (its K/V buffers two rows a stage); rms q/k norms, 3 heads; 3 x 4 = 12 image
    tokens and 5 text tokens."""
    cfg = sd3.SD3Config.from_dict({**tiny.SD3_TRANSFORMER, "num_layers": 6, "num_attention_heads": 3,
                                   "caption_projection_dim": 48, "qk_norm": "rms_norm",
                                   "dual_attention_layers": (0, 1, 2, 5)})
    graphdef, state = _random_state(sd3.SD3Transformer2DModel, cfg, 4)
    rng = np.random.default_rng(2)
    args = (jnp.asarray(rng.standard_normal((2, cfg.in_channels, 6, 8)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, 5, cfg.joint_attention_dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, cfg.pooled_projection_dim)), jnp.float32), jnp.array([250.0, 800.0]))
    x, tokens, cond = nnx.merge(graphdef, state).embed(*args)
    ref = jax.jit(lambda st: nnx.merge(graphdef, st).blocks(x, tokens, cond))(state)
    return cfg, graphdef, state, (x, tokens, cond), ref


def test_stacks_of_the_configs():
    assert hunyuandit.pipefusion_stacks(_hunyuandit()[0]) == dict(stacked=("blocks_down", "blocks_mid", "blocks_skip"),
                                                                  stacked_layers=(3, 2, 3))
    assert flux.pipefusion_stacks(_flux()[0]) == dict(stacked=flux.STACKS, stacked_layers=(3, 4),
                                                      text_keys=("context", "context_rope"))
    cfg = _sd35_medium()[0]
    assert sd3.pipefusion_stacks(cfg) == dict(stacked=("transformer_blocks", "transformer_blocks_part1"),
                                              stacked_layers=(3, 2), stack_attentions=(2, 1), tail_attentions=2,
                                              text_keys=("context",))
    plain = sd3.SD3Config.from_dict({**tiny.SD3_TRANSFORMER, "num_layers": 24})  # SD3 Medium, SD3.5 Large: one run
    assert sd3.pipefusion_stacks(plain) == dict(stacked="transformer_blocks", stacked_layers=23,
                                                stack_attentions=(1,), tail_attentions=1, text_keys=("context",))


@pytest.mark.parametrize("mesh,patches", [
    ("cfg=2,pipefusion=2,ulysses=2", 3), pytest.param("pipefusion=2,ring=2", 2, marks=SLOW),
    pytest.param(None, 3, marks=SLOW), pytest.param("pipefusion=2", 2, marks=SLOW)])
def test_sd35_medium_patches_with_buffers_of_the_same_input_are_exact(mesh, patches):
    """Two runs (dual-attention blocks, then plain ones) looped over the stages, two K/V buffers per dual
    block and for the dual last block: a warm-up pass fills them and a patched pass equals the full one."""
    model = _sd35_medium()
    warm, patched, cache1, cache2, stages = _warm_then_patched(model, sd3, mesh, patches, tail=True)
    _check_exact(model[-1], warm, patched, cache1, cache2)
    dual_rows = 2 * len(pipefusion.stage_layout(3, stages))  # rows: slots (3 layers padded to the stages) x 2
    g = 4 if pipefusion.slices_text(build_mesh(mesh)) else 2  # (k, v[, text k, text v]) per run, then the last's
    assert [a.shape[0] for a in cache1] == [dual_rows] * g + [2] * g + [stages * 2] * g
    for i, a in enumerate(cache1[:2 * g]):  # every row of both runs filled (both attentions of the dual blocks)
        rows = jnp.abs(a).max(axis=(1, 2, 3, 4))
        if g == 4 and i in (2, 3):  # the dual run's text buffers: a dual block's second attention is the image's
            rows = rows[::2]
        assert float(rows.min()) > 0.1
    for a in cache1[2 * g:]:  # the last stage's final rows
        assert float(jnp.abs(a[-2:]).max(axis=(1, 2, 3, 4)).max()) > 0.1


@functools.cache
def _hunyuandit():
    """8 layers: down 0-2 (3: uneven on 2 stages), mid 3-4 (2: a padding slot on 3 stages), skip 5-7; 3 heads
    (padded to 4 on ulysses=2); 3 x 4 = 12 image tokens; both texts with padding in one sample."""
    cfg = hunyuandit.HunyuanDiTConfig.from_dict({**tiny.HUNYUAN_TRANSFORMER, "num_layers": 8, "num_attention_heads": 3,
                                                 "hidden_size": 24, "pooled_projection_dim": 24})
    graphdef, state = _random_state(hunyuandit.HunyuanDiT2DModel, cfg, 5)
    rng = np.random.default_rng(3)
    mask, mask_t5 = np.ones((2, 77), np.int32), np.ones((2, 256), np.int32)
    mask[1, 9:], mask_t5[1, 20:] = 0, 0
    args = (jnp.asarray(rng.standard_normal((2, 4, 6, 8)), jnp.float32), jnp.array([250.0, 800.0]),
            jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32), jnp.asarray(mask),
            jnp.asarray(rng.standard_normal((2, 256, 32)), jnp.float32), jnp.asarray(mask_t5))
    x, tokens, cond = jax.jit(lambda st: nnx.merge(graphdef, st).embed(*args))(state)
    ref = jax.jit(lambda st: nnx.merge(graphdef, st).blocks(x, tokens, cond))(state)
    return cfg, graphdef, state, (x, tokens, cond), ref


@pytest.mark.parametrize("mesh,patches", [
    ("pipefusion=3,ulysses=2", 3), pytest.param("pipefusion=2,ring=2", 2, marks=SLOW),
    pytest.param(None, 3, marks=SLOW), pytest.param("pipefusion=2", 2, marks=SLOW),
    pytest.param("cfg=2,pipefusion=2,ulysses=2", 2, marks=SLOW)])
def test_hunyuandit_patches_with_buffers_of_the_same_input_are_exact(mesh, patches):
    """Down, mid and skip stacks looped over the stages, each patch's long skips riding in its carry: a
    warm-up pass fills the buffers and a patched pass equals the full one (a skip popped in the wrong order,
    lost at a stage boundary or taken from another patch moves the output by O(1))."""
    model = _hunyuandit()
    _check_exact(model[-1], *_warm_then_patched(model, hunyuandit, mesh, patches, "pipefusion_blocks")[:4])


def test_a_blocks_function_with_fewer_scans_than_stacks_is_refused():
    cfg = sd3.SD3Config.from_dict({**tiny.SD3_TRANSFORMER, "num_layers": 3})
    graphdef, state = _random_state(sd3.SD3Transformer2DModel, cfg, 0)
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, state)
    x, tokens, cond = model.embed(jnp.asarray(rng.standard_normal((1, cfg.in_channels, 4, 4)), jnp.float32),
                                  jnp.asarray(rng.standard_normal((1, 3, cfg.joint_attention_dim)), jnp.float32),
                                  jnp.asarray(rng.standard_normal((1, cfg.pooled_projection_dim)), jnp.float32),
                                  jnp.array([500.0]))
    kv = pipefusion.init_cache(build_mesh(None), (2, 2), 1, x.shape[1], cfg.num_attention_heads,
                               cfg.attention_head_dim, jnp.float32, 2, tail=True)
    with pytest.raises(RuntimeError, match="ran 1 stacked scans"):
        pipefusion.run_pipefusion(_blocks(graphdef), state, x, tokens, cond, kv, None, patches=2, warmup=True,
                                  stacked=("transformer_blocks", "transformer_blocks"), num_layers=(2, 2))
