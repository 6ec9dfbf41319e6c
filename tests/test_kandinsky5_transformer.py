"""Kandinsky 5.0 transformer == diffusers Kandinsky5Transformer3DModel (fp32, random weights); a text mask == the
shorter text alone; its sequence-parallel run == one device; the nabla attention refused."""

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel as TorchModel

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import kandinsky5 as k5
from xdit_jax.safetensors_io import CheckpointError

# 2 heads x 16 (axes 4 / 6 / 6), 2 text + 2 visual blocks
CONFIG = dict(in_visual_dim=4, in_text_dim=12, in_text_dim2=10, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
              model_dim=32, ff_dim=48, num_text_blocks=2, num_visual_blocks=2, axes_dims=(4, 6, 6))
SHAPE = (1, 3, 6, 8)  # (B, T, H, W): 3 x 3 x 4 = 36 visual tokens
L = 7
SCALE = (1.0, 1.0, 1.0)  # the default (the pipeline test runs diffusers' (1, 3.16, 3.16))


@pytest.fixture(scope="module")
def pair():
    import jax

    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = k5.Kandinsky5Config.from_dict(dict(tm.config))
    model = k5.build(cfg, k5.params_from_torch(state_dict_np(tm), cfg))
    fwd = jax.jit(lambda m, x, e, t, p, mask: m(x, e, t, p, SCALE, mask))
    return tm, cfg, model, fwd


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*SHAPE, CONFIG["in_visual_dim"])).astype(np.float32)
    enc = rng.standard_normal((SHAPE[0], L, CONFIG["in_text_dim"])).astype(np.float32)
    pooled = rng.standard_normal((SHAPE[0], CONFIG["in_text_dim2"])).astype(np.float32)
    return x, enc, np.array([734.0], np.float32), pooled


def _torch(tm, x, enc, t, pooled):
    b, f, h, w = SHAPE
    with torch.no_grad():
        return tm(torch.from_numpy(x), torch.from_numpy(enc), torch.from_numpy(t), torch.from_numpy(pooled),
                  visual_rope_pos=[torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
                  text_rope_pos=torch.arange(enc.shape[1]), scale_factor=SCALE, return_dict=False).numpy()


def test_matches_diffusers_and_text_mask(pair):
    tm, cfg, model, fwd = pair
    x, enc, t, pooled = _inputs()
    ref = _torch(tm, x, enc, t, pooled)
    out = np.asarray(fwd(model, x, enc, t, pooled, np.ones((1, L), bool)))  # (one compile with the masked call)
    # fp32 both sides, outputs O(1) (measured 6.9e-6 of 3.7): float32 reorderings through 4 blocks of width 32, and
    # q / k rounded to bfloat16 after the RoPE on both sides (a flipped rounding would move the output by ~1e-4)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    # the text padded with masked tokens (CFG's batch) == the text alone (diffusers' separate call)
    ref5 = _torch(tm, x, enc[:, :5], t, pooled)
    mask = np.arange(L)[None] < 5
    out5 = np.asarray(fwd(model, x, np.where(mask[..., None], enc, 9.0).astype(np.float32), t, pooled, mask))
    np.testing.assert_allclose(out5, ref5, atol=2e-5 * np.abs(ref5).max(), rtol=0)
    assert np.abs(ref5 - ref).max() > 1e-2


def test_sequence_parallel_equals_one_device(pair):
    """36 visual tokens over ring=2,ulysses=4 (padded to 40), the text whole on every device."""

    tm, cfg, model, fwd = pair
    x, enc, t, pooled = _inputs(seed=3)
    ref = np.asarray(fwd(model, x, enc, t, pooled, np.ones((1, L), bool)))
    out = np.asarray(sequence_parallel_forward(model, build_mesh("ring=2,ulysses=4"))(x, enc, t, pooled))
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_refusals(pair):
    tm, cfg, model, fwd = pair
    with pytest.raises(NotImplementedError, match="nabla"):
        k5.Kandinsky5Config.from_dict({**CONFIG, "attention_type": "nabla"})
    sd = state_dict_np(tm)
    sd.pop("visual_transformer_blocks.1.cross_attention.key_norm.weight")
    with pytest.raises(CheckpointError, match="cross_attention.key_norm"):
        k5.params_from_torch(sd, cfg)
    x, enc, t, pooled = _inputs()
    with pytest.raises(ValueError, match="patches"):
        model(x[:, :, :5], enc, t, pooled)
