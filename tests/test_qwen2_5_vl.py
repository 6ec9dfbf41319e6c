"""Qwen2.5-VL's language model (text path) == transformers Qwen2_5_VLForConditionalGeneration's hidden_states[-1];
the prompt embeddings == diffusers' QwenImagePipeline._get_qwen_prompt_embeds; both checkpoint key layouts load."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import conversion, tiny
from xdit_jax.models import llama
from xdit_jax.models import qwen2_5_vl as qv
from xdit_jax.safetensors_io import CheckpointError

TEXT = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
              window_size=4, fullatt_block_indexes=[0])


@pytest.fixture(scope="module")
def pair():
    cfg = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, attn_implementation="eager")
    torch.manual_seed(0)
    tm = randomize_(transformers.Qwen2_5_VLForConditionalGeneration(cfg), seed=1)
    ours = qv.Qwen25VLTextConfig.from_dict(cfg.to_dict())
    return tm, ours, llama.build(ours, qv.params_from_torch(state_dict_np(tm), ours))


def _last(model, ids, mask):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m).last_hidden_state)
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def _torch_last(tm, ids, mask):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  output_hidden_states=True).hidden_states[-1].numpy()


def test_config_reads_both_layouts(pair):
    tm, ours, _ = pair
    assert ours.qkv_bias and not ours.attention_bias and ours.head_dim == 8 and ours.rope_theta == 10000.0
    flat = {**{k: v for k, v in TEXT.items() if k != "rope_parameters"}, "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "vision_config": VISION}
    assert qv.Qwen25VLTextConfig.from_dict(flat) == ours  # the older flat config.json (Qwen/Qwen-Image's)
    for bad, needle in [(dict(use_sliding_window=True), "sliding"),
                        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
                        (dict(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 1]}), "mrope_section")]:
        with pytest.raises(ValueError, match=needle):
            qv.Qwen25VLTextConfig.from_dict({"text_config": {**TEXT, **bad}})


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_transformers_hidden_states_last(pair, side):
    """hidden_states[-1] of the full model (text only: mrope with the same position on its 3 axes; transformers
    5.23 gives positions 0..L-1 to every row whatever the mask) on the valid tokens, right and left padding."""
    tm, _, model = pair
    rng = np.random.default_rng(0)
    lengths, n = (13, 7), 13
    ids = rng.integers(3, 512, size=(2, n))
    mask = np.zeros((2, n), np.int64)
    for i, k in enumerate(lengths):
        sl = slice(0, k) if side == "right" else slice(n - k, n)
        mask[i, sl] = 1
    ids[mask == 0] = 0
    out, ref = _last(model, ids, mask), _torch_last(tm, ids, mask)
    valid = mask.astype(bool)
    # fp32, values O(4): measured 1.6e-6 (right) and 2.9e-6 (left)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def _tokenizer():
    return qv.train_tokenizer(tiny.CORPUS * 4 + [qv.PROMPT_TEMPLATE.format(p) for p in tiny.CORPUS])


def test_stand_in_tokenizer_template_and_round_trip(tmp_path):
    tok = _tokenizer()
    prefix = qv.PROMPT_TEMPLATE.split("{}")[0]
    assert len(tok(prefix)["input_ids"]) == qv.TEMPLATE_START  # as the real Qwen2 tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    tok.save_pretrained(tmp_path)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = qv.PROMPT_TEMPLATE.format(tiny.CORPUS[1])
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert type(back).__name__.startswith("Qwen2Tokenizer")


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_embeds_match_diffusers(pair, side):
    """Our qwen_prompt_embeds == diffusers' _get_qwen_prompt_embeds (the template, padding to the longest, hidden
    states[-1], the 34-token crop, zero padding and the mask) on a batch of two lengths; a tokenizer padding on the
    left too (both read the valid tokens by the mask)."""
    from diffusers import QwenImagePipeline

    tm, _, model = pair
    tok = _tokenizer()
    tok.padding_side = side
    prompts = [tiny.CORPUS[1], "A cat."]
    fake = types.SimpleNamespace(tokenizer=tok, text_encoder=tm, prompt_template_encode=qv.PROMPT_TEMPLATE,
                                 prompt_template_encode_start_idx=qv.TEMPLATE_START, tokenizer_max_length=1024,
                                 _execution_device=torch.device("cpu"))
    fake._extract_masked_hidden = types.MethodType(QwenImagePipeline._extract_masked_hidden, fake)
    with torch.no_grad():
        ref, ref_mask = QwenImagePipeline._get_qwen_prompt_embeds(fake, prompts, torch.device("cpu"), torch.float32)
    emb, mask = qv.qwen_prompt_embeds(tok, model, prompts)
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    assert mask[1].sum() < mask[0].sum()
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5, rtol=0)  # as above (the same states, cropped)


def test_key_layouts_and_conversion(pair, tmp_path):
    """transformers 5's keys (model.language_model.*), the older ones (model.layers.*, visual.*) and a
    save_pretrained folder (MODEL_CLASSES) load the same parameters; a missing tensor is named."""
    tm, ours, model = pair
    sd = state_dict_np(tm)
    new = qv.params_from_torch(sd, ours)
    old = {("visual." + k[len("model.visual."):] if k.startswith("model.visual.") else
            "model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
           for k, v in sd.items()}
    assert any(k.startswith("model.layers.") for k in old) and any(k.startswith("visual.") for k in old)
    jax.tree.map(np.testing.assert_array_equal, qv.params_from_torch(old, ours), new)
    tm.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    with open(tmp_path / "text_encoder" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    cfg_dict, params = conversion.convert_component(tmp_path / "text_encoder", "Qwen2_5_VLForConditionalGeneration")
    jax.tree.map(np.testing.assert_array_equal, params, new)
    sd.pop("model.language_model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(CheckpointError, match="layers.1.self_attn.k_proj.bias"):
        qv.params_from_torch(sd, ours)
