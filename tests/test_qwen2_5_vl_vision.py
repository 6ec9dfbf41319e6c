"""Qwen2.5-VL's vision tower == transformers' Qwen2_5_VisionTransformerPretrainedModel (tiny random weights, fp32,
window attention with edge windows and full-attention blocks, two images of different grids in one call); the
numpy preprocessing == transformers' Qwen2VLImageProcessor (its PIL backend)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import qwen2_5_vl_vision as vv

# head_dim 8 (2-D rotary over 4 + 4), windows of 2 x 2 merge units (window_size 8 / patch 2 / merge 2), blocks 1 and
# 3 full attention, the others windowed
VISION = dict(depth=4, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=12, patch_size=2,
              temporal_patch_size=2, spatial_merge_size=2, window_size=8, fullatt_block_indexes=[1, 3])


@pytest.fixture(scope="module")
def pair():
    cfg = transformers.Qwen2_5_VLVisionConfig(**VISION)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = randomize_(Qwen2_5_VisionTransformerPretrainedModel(cfg), seed=2).eval()
    ours = vv.VisionConfig.from_dict(cfg.to_dict())
    flat = {f"model.visual.{k}": v for k, v in state_dict_np(tm).items()}
    return tm, ours, vv.build(ours, vv.params_from_torch(flat, ours))


def _ours(model, pixels, grids):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x, lay: nnx.merge(graphdef, s)(x, lay))
    return np.asarray(fn(state, pixels, vv.vision_layout(grids, model.cfg)))


def test_matches_transformers(pair):
    """Two images, grids 10 x 14 (5 x 7 merge units: windows of 2 x 2, the last row and column of windows cut) and
    4 x 6, in one call: the window permutation, the window and full-attention segments, the merger's inverse
    permutation."""
    tm, ours, model = pair
    grids = [(1, 10, 14), (1, 4, 6)]
    n = sum(t * h * w for t, h, w in grids)
    x = np.random.default_rng(0).standard_normal((n, ours.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    out = _ours(model, x, grids)
    assert out.shape == ref.shape == (n // 4, VISION["out_hidden_size"])
    # fp32, outputs O(5): measured 2.9e-6; every block at full attention instead of the windows: 2.0
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_config_and_keys(pair):
    _, ours, _ = pair
    assert ours.fullatt_block_indexes == (1, 3) and ours.head_dim == 8 and ours.rope_theta == 10000.0
    old = dict(VISION, in_chans=3, spatial_patch_size=2)
    del old["patch_size"]
    assert vv.VisionConfig.from_dict({"vision_config": old}) == ours  # the older key names (Qwen-Image's config)
    flat = {f"model.visual.{k}": v for k, v in state_dict_np(pair[0]).items()}
    old_layout = {f"visual.{k}": v for k, v in state_dict_np(pair[0]).items()}  # Qwen/Qwen-Image's text encoder
    a, b = vv.params_from_torch(flat, ours), vv.params_from_torch(old_layout, ours)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    with pytest.raises(ValueError, match="no Qwen2.5-VL vision tower"):
        vv.params_from_torch({"model.language_model.norm.weight": np.ones(4)}, ours)


@pytest.mark.parametrize("size", [(37, 53), (300, 90)])
def test_preprocess_matches_processor(size):
    """pixel_values and grid == Qwen2VLImageProcessor's (PIL backend: what transformers runs without torchvision)
    on a random RGB image: a resize up (min_pixels) and a resize down (max_pixels), aspect ratio kept."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    h, w = size
    img = Image.fromarray(np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 20)
    ref = proc(images=img, return_tensors="np")
    pcfg = vv.ProcessorConfig.from_dict(proc.to_dict())
    out, grid = vv.preprocess(img, pcfg)
    assert tuple(ref["image_grid_thw"][0]) == grid
    # values O(2); float32 rounding of (x / 255 - mean) / std
    np.testing.assert_allclose(out, ref["pixel_values"], atol=1e-6, rtol=0)


def test_segment_attention_query_chunks():
    """Long segments (a whole image in the full-attention blocks) run over query chunks: the same rows as at once,
    with uneven segments (a padded last chunk, masked padded keys)."""
    rng = np.random.default_rng(0)
    q, k, v = (jax.numpy.asarray(rng.standard_normal((23, 2, 4)), jax.numpy.float32) for _ in range(3))
    idx, valid, inv = vv._segments(np.array([0, 9, 23]))  # segments of 9 and 14 tokens: padded to 14
    whole = np.asarray(vv.segment_attention(q, k, v, idx, valid, inv))
    chunked = np.asarray(vv.segment_attention(q, k, v, idx, valid, inv, query_chunk=4))  # 4 chunks, the last padded
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)  # fp32: measured equal up to the dot's blocking
    assert whole.shape == (23, 2, 4)
