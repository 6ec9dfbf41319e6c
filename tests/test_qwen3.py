"""Qwen3 text encoder (llama.py with qk_norm) == transformers Qwen3Model; Z-Image's prompt embeds == diffusers'
``ZImagePipeline._encode_prompt``; the stand-in tokenizer's chat template; Qwen3ForCausalLM keys load."""

import numpy as np
import pytest
import torch
from transformers import Qwen3Config as TorchConfig
from transformers import Qwen3ForCausalLM, Qwen3Model

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny
from xdit_jax.models import qwen3

PROMPTS = ["A small dog running on a beach at sunset.", "A cat."]


@pytest.fixture(scope="module")
def tok():
    return tiny.train_qwen3_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    cfg = TorchConfig(**dict(tiny.ZIMAGE_QWEN3, vocab_size=len(tok)))
    tm = randomize_(Qwen3Model(cfg), seed=3, std=0.2)
    ours = qwen3.Qwen3Config.from_dict(cfg.to_dict())
    return tm, ours, qwen3.build(ours, qwen3.params_from_torch(state_dict_np(tm), ours))


def test_chat_template_string(tok):
    assert len(tok) == tiny.QWEN3_VOCAB
    # the real Qwen3 template's output for one user message, add_generation_prompt=True, enable_thinking=True
    assert qwen3.format_prompts(tok, ["hello"]) == ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"]
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_hidden_states_match_transformers(tok, pair):
    tm, cfg, model = pair
    assert cfg.qk_norm and cfg.head_dim == 16 and cfg.num_key_value_heads == 2
    ids, mask = qwen3.tokenize(tok, PROMPTS, 40)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 output_hidden_states=True)
    out = model(ids, mask, output_hidden_states=True)
    m = mask.astype(bool)
    for i in (-2, -1):
        # fp32: measured max |diff| 7.6e-6 ([-2], values up to 9.6) and 3.9e-6 ([-1]) on the kept tokens
        np.testing.assert_allclose(np.asarray(out.hidden_states[i])[m], ref.hidden_states[i].numpy()[m],
                                   atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.hidden_state(ids, mask, -2))[m], ref.hidden_states[-2].numpy()[m],
                               atol=2e-5, rtol=1e-5)


def test_prompt_embeds_match_diffusers_encode_prompt(tok, pair):
    """diffusers' list of per-prompt kept tokens == our padded array with counts."""
    from diffusers import ZImagePipeline

    tm, cfg, model = pair
    pipe = ZImagePipeline.__new__(ZImagePipeline)
    pipe.tokenizer, pipe.text_encoder = tok, tm
    with torch.no_grad():
        ref = pipe._encode_prompt(list(PROMPTS), device=torch.device("cpu"), max_sequence_length=40)
    feats, lens = qwen3.prompt_embeds(tok, model, PROMPTS, 40)
    assert list(lens) == [len(r) for r in ref]
    for i, r in enumerate(ref):
        # fp32: as hidden_states[-2] above (measured 7.6e-6 at values up to 9.6)
        np.testing.assert_allclose(feats[i, :lens[i]], r.numpy(), atol=2e-5, rtol=1e-5)
        assert not feats[i, lens[i]:].any()


def test_causal_lm_keys_load(tok, pair):
    tm, cfg, model = pair
    lm = Qwen3ForCausalLM(TorchConfig(**dict(tiny.ZIMAGE_QWEN3, vocab_size=len(tok))))
    lm.model.load_state_dict(tm.state_dict())
    params = qwen3.params_from_torch(state_dict_np(lm), cfg)
    ref = qwen3.params_from_torch(state_dict_np(tm), cfg)
    import jax

    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_refusals():
    with pytest.raises(ValueError, match="model_type 'qwen3'"):
        qwen3.Qwen3Config.from_dict(dict(tiny.ZIMAGE_QWEN3, model_type="llama"))
    with pytest.raises(ValueError, match="sliding"):
        qwen3.Qwen3Config.from_dict(dict(tiny.ZIMAGE_QWEN3, use_sliding_window=True))
