"""Latte transformer == diffusers LatteTransformer3DModel; its sequence-parallel run == one device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import LatteTransformer3DModel as TorchModel
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import latte
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.safetensors_io import CheckpointError

FRAMES = 3
# Latte-1's kind of config at 2 heads x 8: learned sigma (out = 2 x in), non-affine block norms.
CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
              cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
              norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=12, video_length=FRAMES)
L = 5  # caption tokens


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = latte.LatteConfig.from_dict(dict(tm.config))
    model = latte.build(cfg, latte.params_from_torch(state_dict_np(tm), cfg))
    fwd = jax.jit(lambda m, x, e, t, temporal: m(x, e, t, None, temporal), static_argnums=4)
    return tm, cfg, model, fwd


def _inputs(cfg, b, f, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, f, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, L, cfg.caption_channels)).astype(np.float32)
    t = np.array([999, 37][:b], dtype=np.int64)
    return x, enc, t


def _torch(tm, x, enc, t, temporal=True):
    with torch.no_grad():
        return tm(torch.from_numpy(x), timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(enc),
                  enable_temporal_attentions=temporal, return_dict=False)[0].numpy()


def test_frame_table_matches_diffusers():
    ref = TorchModel(**dict(CONFIG, video_length=16)).temp_pos_embed[0].numpy()
    np.testing.assert_allclose(latte.temporal_table(16, 16), ref, atol=1e-7, rtol=0)
    np.testing.assert_array_equal(latte.temporal_table(16, 5), latte.temporal_table(16, 16)[:5])


# (batch, frames, latent h, latent w, temporal): the sample size; a non-square size whose 5 x 7 = 35 patch
# positions need the interpolated position table (and padding on every sequence degree below); one frame
# (no frame table, temporal attention over itself); the temporal blocks off.
CASES = [(2, FRAMES, 8, 8, True), (1, FRAMES, 10, 14, True), (2, 1, 8, 8, True), (2, FRAMES, 8, 8, False)]


@pytest.mark.parametrize("b,f,h,w,temporal", CASES)
def test_matches_diffusers(pair, b, f, h, w, temporal):
    tm, cfg, model, fwd = pair
    x, enc, t = _inputs(cfg, b, f, h, w)
    ref = _torch(tm, x, enc, t, temporal)
    out = np.asarray(fwd(model, x, enc, t, temporal))
    assert out.shape == ref.shape == (b, cfg.out_ch, f, h, w)
    # fp32 on both sides, outputs O(1): 2e-5 allows reordered float32 sums over 2 layer pairs of width 16
    # (a layout, frame-order or position bug is off by 1e-2 or more).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=str((b, f, h, w, temporal)))


def test_config_and_checkpoint_errors(pair):
    tm, cfg, _, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(norm_type="layer_norm"), "ada_norm_single"), (dict(activation_fn="geglu"), "gelu"),
                        (dict(cross_attention_dim=24), "cross_attention_dim"), (dict(patch_size=None), "patch_size")]:
        with pytest.raises(ValueError, match=needle):
            latte.LatteConfig.from_dict({**d, **bad})
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        latte.check_input_shape(cfg, 9, 8)
    sd = state_dict_np(tm)
    sd.pop("temporal_transformer_blocks.1.attn1.to_k.weight")
    sd["temp_pos_embed"] = np.zeros((1, FRAMES, 16), np.float32)  # a buffer some exports keep: ignored
    with pytest.raises(CheckpointError, match="temporal_transformer_blocks.1.attn1.to_k.weight") as e:
        latte.params_from_torch(sd, cfg)
    assert "temp_pos_embed" not in str(e.value)


def _parallel_forward(model, mesh):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, enc, t):
        mdl = nnx.merge(graphdef, state)
        y, tokens, cond = mdl.embed(x, enc, t)
        blocks = lambda p, h, tk, c: nnx.merge(graphdef, p).blocks(h, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, y, tokens, cond, mesh), cond, x.shape)

    return lambda *a: forward(state, *a)


# The patch axis over the sequence axes: 35 positions padded for each degree (ulysses=3 also pads the 2 heads
# to 3); cfg=2 splits the batch. ring=3 runs the ring's uneven path too (slow: the default meshes cover the ring).
MESHES = ["ulysses=3", "cfg=2,ring=2,ulysses=2", pytest.param("ring=3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh", MESHES)
def test_sequence_parallel_equals_one_device(pair, mesh):
    tm, cfg, model, fwd = pair
    x, enc, t = _inputs(cfg, 2, FRAMES, 10, 14, seed=2)
    ref = np.asarray(fwd(model, x, enc, t, True))
    out = np.asarray(_parallel_forward(model, build_mesh(mesh))(x, enc, t))
    # fp32; only the order of float32 sums differs (ring's LSE merge, zero-padded heads): outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


def test_hlo_flops_equal_analytic(pair):
    """The compiled forward's matmul FLOPs (xdit_jax.hlo, loops counted) == bench_families' analytic count."""
    from xdit_jax.bench_families import FAMILIES, family_of_config, latte_analytic_flops
    from xdit_jax.hlo import matmul_flops

    tm, cfg, model, fwd = pair
    assert family_of_config(dict(tm.config)) == "latte" and FAMILIES["latte"].config(dict(tm.config)) == cfg
    x, enc, t = _inputs(cfg, 2, FRAMES, 10, 14)
    compiled = fwd.lower(model, x, enc, t, True).compile()
    want = latte_analytic_flops(dict(tm.config), x.shape, L)["total"]
    assert matmul_flops(compiled.as_text()) == pytest.approx(want, rel=1e-9)


def test_full_size_config():
    """configs/latte-1 loads in diffusers and here; the full-size model builds abstractly (nothing allocated) with
    diffusers' parameter count (its model built on the meta device)."""
    import json
    from pathlib import Path

    from diffusers import DDIMScheduler

    from xdit_jax.pipelines import latte as latte_pipeline

    folder = Path(__file__).resolve().parents[1] / "configs" / "latte-1"
    t = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = latte.LatteConfig.from_dict(t)
    assert (cfg.inner_dim, cfg.num_layers, cfg.learned_sigma, cfg.video_length) == (1152, 28, True, 16)
    _, state = nnx.split(nnx.eval_shape(lambda: latte.LatteTransformer3DModel(cfg, rngs=nnx.Rngs(0))))
    ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))
    with torch.device("meta"):
        tm = TorchModel.from_config(TorchModel.load_config(folder / "transformer"))
    assert ours == sum(p.numel() for p in tm.parameters())
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert not sched.config.clip_sample and sched.config.prediction_type == "epsilon"
    tc, vc = latte_pipeline.read_configs(folder)
    assert latte_pipeline.default_video(tc, vc) == {"height": 512, "width": 512, "num_frames": 16, "fps": 8}
    assert vc.scaling_factor == 0.18215
