"""SANA transformer == diffusers SanaTransformer2DModel; the linear-attention and grid-conv ops over a mesh ==
one device; the transformer's sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel as TorchModel
from jax.sharding import PartitionSpec as P

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import sana
from xdit_jax.parallel.attention import AttentionConfig, attention_context
from xdit_jax.parallel.sequence import _shard_map, padded_length

# 2 layers, 2 linear heads x 8, cross 2 x 8 (D = 16), mlp 2.5 -> GLUMBConv hidden 40; patch 1 as SANA; sin-cos
# positions (interpolation_scale set: the branch the 4K model takes) in one variant.
BASE = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
            sample_size=8, patch_size=1)
# SANA 1.5's q/k RMSNorms (both attentions); Sana Sprint's: those and the guidance embedding.
QK = dict(qk_norm="rms_norm_across_heads")
VARIANTS = {"plain": BASE, "pos": dict(BASE, interpolation_scale=1.0, patch_size=2, out_channels=None),
            "qk": dict(BASE, **QK), "sprint": dict(BASE, **QK, guidance_embeds=True)}
L = 6
SHAPES = [(2, 8, 8), (2, 6, 10)]  # the second: not square, 60 / 30 tokens (padding under ulysses=3 / ring x ulysses)


# "qk" is slow-marked (the default run's time): "sprint" runs the q/k norms too, and SanaPipeline with them ==
# diffusers in tests/test_sana_pipeline.py.
@pytest.fixture(scope="module", params=[pytest.param(v, marks=pytest.mark.slow) if v == "qk" else v for v in VARIANTS])
def pair(request):
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**VARIANTS[request.param]), seed=1, std=0.2)
    cfg = sana.SanaConfig.from_dict(dict(tm.config))
    model = sana.build(cfg, sana.params_from_torch(state_dict_np(tm), cfg))
    if cfg.guidance_embeds:  # the guidance as Sprint's pipeline passes it: scale x guidance_embeds_scale
        fwd = jax.jit(lambda m, x, e, t, msk: m(x, e, t, msk, guidance=GUIDANCE[: x.shape[0]]))
    else:
        fwd = jax.jit(lambda m, x, e, t, msk: m(x, e, t, msk))
    return request.param, tm, cfg, model, fwd


GUIDANCE = np.array([0.45, 0.7], np.float32)


def _inputs(cfg, b, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, L, cfg.caption_channels)).astype(np.float32)
    # Sprint's timesteps are the trig-flow's sin / (sin + cos) in [0, 1]
    t = np.array([0.93, 0.41][:b], np.float32) if cfg.guidance_embeds else np.array([999, 37][:b], dtype=np.int64)
    return x, enc, t


def _torch(tm, x, enc, t, mask):
    tt = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    g = tt(GUIDANCE[: x.shape[0]]) if tm.config.guidance_embeds else None
    with torch.no_grad():
        return tm(tt(x), encoder_hidden_states=tt(enc), timestep=tt(t), encoder_attention_mask=tt(mask),
                  guidance=g, return_dict=False)[0].numpy()


# fp32 both sides, outputs O(1-10): 1e-4 allows reordered float32 sums (linear attention's K^T V over 64 tokens,
# the 3x3 conv's 9 products) over 2 blocks; measured <= 2.1e-5 on outputs of scale 2-5 ("qk" / "sprint", with the
# q/k RMSNorms and the guidance embedder: <= 7.5e-6; a layout / mask / conv-edge bug gives >1e-2). A fully masked
# caption (second row of the last mask): diffusers' -10000 bias (ulp
# 1e-3 at that size) carries rounding into the softmax weights: measured 1.2e-4 - 3.3e-4.
MASKS = [(None, 1e-4), (np.array([[1] * L, [1] * 3 + [0] * (L - 3)]), 1e-4), (np.array([[1] * 2 + [0] * 4, [0] * L]), 1e-3)]


def test_matches_diffusers(pair):
    name, tm, cfg, model, fwd = pair
    for b, h, w in SHAPES:
        x, enc, t = _inputs(cfg, b, h, w)
        for mask, atol in MASKS:
            ref = _torch(tm, x, enc, t, mask)
            out = np.asarray(fwd(model, x, enc, t, mask))
            assert out.shape == ref.shape == (b, cfg.out_ch, h, w)
            np.testing.assert_allclose(out, ref, atol=atol, rtol=1e-4, err_msg=f"{name} {(b, h, w)} {mask}")


@pytest.mark.parametrize("pair,mesh_spec", [("plain", "ulysses=3"), ("plain", "cfg=2,ring=2,ulysses=2"),
                                            ("sprint", "cfg=2,ring=2,ulysses=2")], indirect=["pair"])
def test_sequence_parallel_equals_one_device(pair, mesh_spec):
    """("sprint": the q/k norms are per token, so they hold on every shard; the guidance rides with the batch.)"""
    name, tm, cfg, model, fwd = pair
    mesh = build_mesh(mesh_spec)
    par = sequence_parallel_forward(model, mesh)
    for b, h, w in SHAPES:
        x, enc, t = _inputs(cfg, b, h, w, seed=2)
        mask = MASKS[1][0]
        ref = np.asarray(fwd(model, x, enc, t, mask))
        extra = (GUIDANCE[:b],) if cfg.guidance_embeds else ()
        out = np.asarray(par(x, enc, t, mask, *extra))
        # Float reordering only (the psum's partial sums, the conv's flat form): measured 4.8e-7 (ulysses=3),
        # 1.4e-6 (cfg=2,ring=2,ulysses=2).
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5, err_msg=f"{mesh_spec} {(b, h, w)}")


def _sharded(op, mesh, n, *arrays):
    """Run ``op`` on arrays (B, S, ...) padded and split over (ring, ulysses) as run_blocks does."""
    sp = padded_length(n, mesh)
    padded = [jnp.pad(a, [(0, 0), (0, sp - n)] + [(0, 0)] * (a.ndim - 2), constant_values=7.0) for a in arrays]
    spec = P(None, ("ring", "ulysses"))
    cfg = AttentionConfig(mesh=mesh, valid_len=n if sp != n else None)

    def local(*a):
        with attention_context(cfg):
            return op(*a)

    return np.asarray(jax.jit(_shard_map(local, mesh, tuple(spec for _ in padded), spec))(*padded))[:, :n]


@pytest.mark.parametrize("mesh_spec", ["ulysses=3", "ring=2,ulysses=2", "ring=2,ulysses=4"])
def test_ops_over_mesh_equal_one_device(mesh_spec):
    """Linear attention (psum of K^T V, padding out of the sums) and the grid conv (halo ppermute; ring=2 x
    ulysses=4 on a 5 x 7 grid: chunks of 5 tokens < a row + 1 = 8, the all-gather path) == one device."""
    from xdit_jax.parallel.token_mixing import grid_conv3x3, linear_attention

    mesh = build_mesh(mesh_spec)
    rng = np.random.default_rng(0)
    grid = (5, 7) if "ulysses=4" in mesh_spec else (6, 5)
    n = grid[0] * grid[1]
    q, k = (jnp.asarray(np.abs(rng.standard_normal((2, n, 3, 4))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, n, 3, 5)), jnp.float32)
    ref = np.asarray(jax.jit(linear_attention)(q, k, v))
    # Measured ~1e-7 (reordered float32 sums of 35 tokens).
    np.testing.assert_allclose(_sharded(linear_attention, mesh, n, q, k, v), ref, atol=1e-6, rtol=1e-5)

    x = jnp.asarray(rng.standard_normal((2, n, 6)), jnp.float32)
    wgt = jnp.asarray(rng.standard_normal((3, 3, 6)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((6,)), jnp.float32)
    conv = lambda a: grid_conv3x3(a, wgt, bias, grid=grid)  # noqa: E731
    ref = np.asarray(jax.jit(conv)(x))
    # torch's depthwise conv as the truth of the one-device op (measured ~5e-7)
    tconv = torch.nn.functional.conv2d(torch.from_numpy(np.asarray(x)).reshape(2, *grid, 6).permute(0, 3, 1, 2),
                                       torch.from_numpy(np.asarray(wgt)).permute(2, 0, 1)[:, None],
                                       torch.from_numpy(np.asarray(bias)), padding=1, groups=6)
    np.testing.assert_allclose(ref, tconv.permute(0, 2, 3, 1).reshape(2, n, 6).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_sharded(conv, mesh, n, x), ref, atol=1e-5, rtol=1e-5)


def test_config_and_input_errors(pair):
    name, tm, cfg, model, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(qk_norm="rms_norm"), "qk_norm"), (dict(qk_norm="layer_norm"), "qk_norm"),
                        (dict(cross_attention_dim=cfg.inner_dim + 1), "cross_attention_dim")]:
        with pytest.raises(ValueError, match=needle):
            sana.SanaConfig.from_dict({**d, **bad})
    x, enc, t = _inputs(cfg, 1, 4, 4)
    with pytest.raises(ValueError, match="guidance"):  # Sprint's model without guidance, or guidance to another
        model(x, enc, t, None, guidance=None if cfg.guidance_embeds else GUIDANCE[:1])
    with pytest.raises(ValueError, match="channels"):
        sana.check_input_shape(cfg, cfg.in_channels + 1, 8, 8)
    if cfg.patch_size == 2:
        with pytest.raises(ValueError, match="multiples of the patch size 2"):
            sana.check_input_shape(cfg, cfg.in_channels, 9, 8)


@pytest.mark.parametrize("pair", ["plain"], indirect=True)
def test_bf16_close_to_fp32(pair):
    name, tm, cfg, model, fwd = pair
    m16 = sana.build(cfg, sana.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    x, enc, t = _inputs(cfg, *SHAPES[0], seed=1)
    ref = np.asarray(fwd(model, x, enc, t, None))
    out = np.asarray(fwd(m16, x, enc, t, None).astype(jnp.float32))
    # bf16 (8-bit mantissa) through 2 blocks, linear attention in float32 as diffusers: measured 2.7% of the output
    # scale; bound 5%.
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
