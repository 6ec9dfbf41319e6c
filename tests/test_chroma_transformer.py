"""Chroma transformer == diffusers ChromaTransformer2DModel (with the pipeline's additive text mask, and without);
its run over a mesh == one device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import ChromaTransformer2DModel as TorchModel
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import chroma, flux
from xdit_jax.parallel.sequence import run_blocks

TEXT = 6  # T5 tokens (512 in Chroma1-HD)
# 3 heads of 16 (RoPE axes 4 + 6 + 6), 2 double- and 2 single-stream blocks, a 2-layer approximator of width 32
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
              approximator_hidden_dim=32, approximator_layers=2)
GRID = (3, 5)  # 15 image tokens (padded by the degrees 2 and 3) + 6 text (padded by 4)
IDS = (flux.image_ids(*GRID), np.zeros((TEXT, 3), np.float32))
# the tokenizer's masks: prompt lengths 2 and 6 (no padding: the extra token falls off the end)
TOKENIZER_MASK = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = chroma.ChromaConfig.from_dict(dict(tm.config))
    return tm, cfg, chroma.build(cfg, chroma.params_from_torch(state_dict_np(tm), cfg))


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((2, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    # ChromaPipeline's mask: the prompt and one padding token, then ones over the image tokens
    mask = np.concatenate([np.asarray(chroma.text_mask(TOKENIZER_MASK)), np.ones((2, x.shape[1]), np.float32)], 1)
    return x, enc, t, mask


FWD = jax.jit(lambda m, x, e, t, mask: m(x, e, t, *IDS, mask))


def _torch(tm, x, enc, t, mask):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(enc), tt(t), tt(IDS[0]), tt(IDS[1]), attention_mask=None if mask is None else tt(mask),
                  return_dict=False)[0].numpy()


def test_text_mask_matches_pipeline():
    got = np.asarray(chroma.text_mask(TOKENIZER_MASK))
    np.testing.assert_array_equal(got, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])


# without a mask (FLUX's plain attention path, which the pipeline never takes): slow, for the time budget
@pytest.mark.parametrize("masked", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["mask", "nomask"])
def test_matches_diffusers(pair, masked):
    tm, cfg, model = pair
    x, enc, t, mask = _inputs(cfg)
    mask = mask if masked else None
    ref = _torch(tm, x, enc, t, mask)
    out = np.asarray(FWD(model, x, enc, t, mask) if masked else jax.jit(lambda m: m(x, enc, t, *IDS))(model))
    # fp32 both sides; outputs O(4); measured max |diff| 2.4e-6 (mask), 2.9e-6 (no mask)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    if masked:  # the mask changes the output (the additive bias is not a no-op)
        assert np.abs(ref - _torch(tm, x, enc, t, None)).max() > 1e-3


def test_config_and_checkpoint_errors(pair):
    tm, cfg, model = pair
    with pytest.raises(ValueError, match="multiple of 4"):
        chroma.ChromaConfig.from_dict(dict(CONFIG, approximator_num_channels=18))
    x, enc, t, mask = _inputs(cfg)
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(lambda: model(x, enc, t, *IDS, mask[:, :4]))
    sd = state_dict_np(tm)
    sd.pop("distilled_guidance_layer.in_proj.weight")
    with pytest.raises(Exception, match="in_proj"):
        chroma.params_from_torch(sd, cfg)


# slow-marked for the time budget: in CI the pipeline test runs cfg=2,ring=2,ulysses=2 == one device and the
# benchmark row cfg=2,ulysses=3 == diffusers (tests/test_chroma_pipeline.py)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "ulysses=3"])
def test_sequence_parallel_equals_one_device(pair, mesh):
    _, cfg, model = pair
    x, enc, t, mask = _inputs(cfg, seed=2)
    ref = np.asarray(FWD(model, x, enc, t, mask))
    graphdef, state = nnx.split(model)
    m = build_mesh(mesh)

    @jax.jit
    def parallel(state, x, enc, t, mask):
        mdl = nnx.merge(graphdef, state)
        h, tokens, cond = mdl.embed(x, enc, t, *IDS, mask)
        blocks = lambda p, y, tk, c: nnx.merge(graphdef, p).blocks(y, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, h, tokens, cond, m, text=chroma.TEXT_KEYS), cond)

    out = np.asarray(parallel(state, x, enc, t, mask))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the text partial); outputs O(5);
    # measured max |diff| ~1e-6
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0, err_msg=mesh)


def test_full_size_config_parameter_count_matches_diffusers():
    """configs/chroma1-hd's transformer: our parameter tree holds as many weights as diffusers' model (meta device),
    and the conversion's key map covers every one of its keys (shapes only, no weights made)."""
    import json
    from pathlib import Path

    from xdit_jax.keymap import expected_shapes

    hub = json.loads((Path(__file__).resolve().parents[1] / "configs/chroma1-hd/transformer/config.json").read_text())
    hub = {k: v for k, v in hub.items() if not k.startswith("_")}
    with torch.device("meta"):
        tm = TorchModel(**hub)
    want = sum(p.numel() for p in tm.parameters())
    cfg = chroma.ChromaConfig.from_dict(hub)
    shapes = expected_shapes(lambda: chroma.ChromaTransformer2DModel(cfg))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == want  # 8.90B
