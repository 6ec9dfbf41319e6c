"""Qwen2.5-VL's language model with image tokens == transformers (the vision tower's features in place of the
<|image_pad|> embeddings, the multimodal RoPE of get_rope_index); Qwen-Image-Edit's prompt embeddings == diffusers'
QwenImageEditPipeline / QwenImageEditPlusPipeline ``_get_qwen_prompt_embeds`` (tiny random weights, fp32)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import make_torch_qwenimage_edit
from tests.torch_util import state_dict_np
from xdit_jax import tiny
from xdit_jax.models import llama
from xdit_jax.models import qwen2_5_vl as qv
from xdit_jax.models import qwen2_5_vl_vision as vv

PROMPT = "A small dog running on a beach at sunset."


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def parts():
    """(diffusers edit pipeline, diffusers edit-plus pipeline (the same text encoder), our language model, vision
    tower, processor config, mrope_section)."""
    tp = make_torch_qwenimage_edit()
    plus = make_torch_qwenimage_edit(plus=True)
    plus.text_encoder = tp.text_encoder
    flat = state_dict_np(tp.text_encoder)
    cfg_d = tp.text_encoder.config.to_dict()
    lcfg = qv.Qwen25VLTextConfig.from_dict(cfg_d)
    vcfg = vv.VisionConfig.from_dict(cfg_d)
    lm = llama.build(lcfg, qv.params_from_torch(flat, lcfg))
    vision = vv.build(vcfg, vv.params_from_torch(flat, vcfg))
    pcfg = vv.ProcessorConfig.from_dict(tiny.QWEN_EDIT_PROCESSOR)
    return tp, plus, lm, vision, pcfg, qv.mrope_section(cfg_d)


def _with_mm_token_types(text_encoder, image_token_id):
    """The text encoder's forward given ``mm_token_type_ids`` (1 on the image tokens): transformers 5.23 then
    computes get_rope_index's 3-D positions (diffusers 0.42.1 does not pass them: positions 0..L-1)."""
    forward = text_encoder.forward

    def fwd(*a, input_ids=None, **kw):
        return forward(*a, input_ids=input_ids, mm_token_type_ids=(input_ids == image_token_id).int(), **kw)

    return fwd


@pytest.mark.parametrize("mrope", [False, True])
def test_edit_prompt_embeds_match_diffusers(parts, mrope, monkeypatch):
    """One image (the 40 x 56 image resized by the processor to 28 x 36: 7 x 9 merge units of 2 x 2 patches, windows
    of 2 x 2 units with cut edges); ``mrope=False`` vs diffusers as it runs (1-D positions), ``mrope=True`` vs
    diffusers with the model given ``mm_token_type_ids`` (the 3-D positions)."""
    tp, _, lm, vision, pcfg, section = parts
    img = _image(40, 56)
    if mrope:
        monkeypatch.setattr(tp.text_encoder, "forward", _with_mm_token_types(tp.text_encoder, 4))
    with torch.no_grad():
        ref, ref_mask = tp._get_qwen_prompt_embeds(PROMPT, img)
    emb, mask = qv.qwen_edit_prompt_embeds(tp.tokenizer, lm, vision, PROMPT, [img], pcfg, section=section,
                                           mrope=mrope)
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    ref = ref.numpy()
    assert emb.shape == ref.shape and ref.shape[1] > 63 + 10  # the image's tokens and the prompt's are kept
    # fp32, states O(3.4) after the final norm: measured 3.7e-6 / 4.3e-6 (Plus: 2.5e-6 of 4.0); the other position
    # rule moves them by 2.6
    np.testing.assert_allclose(emb, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    other, _ = qv.qwen_edit_prompt_embeds(tp.tokenizer, lm, vision, PROMPT, [img], pcfg, section=section,
                                          mrope=not mrope)
    assert np.abs(other - ref).max() > 1e-2


def test_edit_plus_prompt_embeds_match_diffusers(parts, monkeypatch):
    """Two images of different sizes ("Picture 1: ... Picture 2: ..."), 3-D positions."""
    _, plus, lm, vision, pcfg, section = parts
    imgs = [_image(40, 56, 1), _image(24, 20, 2)]
    monkeypatch.setattr(plus.text_encoder, "forward", _with_mm_token_types(plus.text_encoder, 4))
    with torch.no_grad():
        ref, ref_mask = plus._get_qwen_prompt_embeds(PROMPT, imgs)
    emb, mask = qv.qwen_edit_prompt_embeds(plus.tokenizer, lm, vision, PROMPT, imgs, pcfg, plus=True,
                                           section=section)
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5 * np.abs(ref.numpy()).max(), rtol=0)


def test_batch_rows_equal_one_prompt_each(parts):
    """Several prompts with the same image (our extension: diffusers' processor takes one prompt per image): each
    row == that prompt alone (the image tokens' features and 3-D positions per row, the shorter row padded)."""
    tp, _, lm, vision, pcfg, section = parts
    img, prompts = _image(40, 56), [PROMPT, "A cat."]
    emb, mask = qv.qwen_edit_prompt_embeds(tp.tokenizer, lm, vision, prompts, [img], pcfg, section=section)
    for i, p in enumerate(prompts):
        one, one_mask = qv.qwen_edit_prompt_embeds(tp.tokenizer, lm, vision, p, [img], pcfg, section=section)
        n = one.shape[1]
        assert mask[i].sum() == n
        np.testing.assert_allclose(emb[i, :n], one[0], atol=1e-5 * np.abs(one).max(), rtol=0)  # another batch shape


def test_rope_index_matches_transformers(parts):
    """get_rope_index's positions for two rows of different lengths (padding on the right and on the left), each
    with two images."""
    tp, *_ = parts
    grids = [(1, 4, 6), (1, 6, 2)]
    rows = [[7, 8, 3] + [4] * 6 + [5, 9, 3] + [4] * 3 + [5, 10, 11], [7, 3] + [4] * 6 + [5, 3] + [4] * 3 + [5, 9]]
    n = max(map(len, rows))
    for side in ("right", "left"):
        ids = np.zeros((2, n), np.int64)
        mask = np.zeros((2, n), np.int64)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(n - len(r), n)
            ids[b, sl], mask[b, sl] = r, 1
        ref, _ = tp.text_encoder.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == 4).astype(np.int32)),
                                                      image_grid_thw=torch.tensor(grids * 2),
                                                      attention_mask=torch.tensor(mask))
        out = qv.rope_index(ids, mask, 4, grids * 2, 2)
        np.testing.assert_array_equal(out[:, mask != 0], ref.numpy()[:, mask != 0])


def test_one_image_only_for_edit():
    with pytest.raises(ValueError, match="one image"):
        qv.edit_texts([PROMPT], 2, plus=False)
