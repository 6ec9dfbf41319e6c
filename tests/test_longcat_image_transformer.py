"""LongCat-Image transformer == diffusers LongCatImageTransformer2DModel (fp32, tiny, LongCatImagePipeline's
rotated text ids and offset image ids); its RoPE ids == the pipeline's ``prepare_pos_ids``."""

import jax
import numpy as np
import pytest
import torch
from diffusers import LongCatImageTransformer2DModel as TorchModel
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import longcat_image as lc

TEXT, START = 5, 7  # Qwen tokens (512 in LongCat-Image, also the image ids' start)
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=3, joint_attention_dim=24, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
GRID = (3, 5)
IDS = (lc.image_ids(*GRID, START), lc.text_ids(TEXT))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = lc.LongCatImageConfig.from_dict(dict(tm.config))
    return tm, cfg, lc.build(cfg, lc.params_from_torch(state_dict_np(tm), cfg))


def test_ids_match_pipeline():
    np.testing.assert_array_equal(IDS[1], prepare_pos_ids(modality_id=0, type="text", num_token=TEXT).numpy())
    ref = prepare_pos_ids(modality_id=1, type="image", start=(START, START), height=GRID[0], width=GRID[1])
    np.testing.assert_array_equal(IDS[0], ref.numpy())


def test_matches_diffusers(pair):
    tm, cfg, model = pair
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((2, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    tt = torch.from_numpy
    with torch.no_grad():
        ref = tm(tt(x), tt(enc), tt(t), tt(IDS[0]), tt(IDS[1]), return_dict=False)[0].numpy()
    out = np.asarray(jax.jit(lambda m, x, e, t: m(x, e, t, *IDS))(model, x, enc, t))
    assert out.shape == ref.shape == (2, GRID[0] * GRID[1], cfg.out_ch)
    scale = np.abs(ref).max()
    # fp32 both sides; outputs O(3.6); measured max |diff| 3.3e-5 (0.9e-5 of the scale; the bound 2e-5 of it)
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |out| {scale}")
