"""GLM text encoder (llama.py with GLM's partial interleaved RoPE, q/k/v biases, fused gate_up_proj) == transformers
GlmModel; CogView4's prompt embeds == diffusers' ``CogView4Pipeline._get_glm_embeds``; GlmForCausalLM keys load."""

import numpy as np
import pytest
import torch
from transformers import GlmConfig as TorchConfig
from transformers import GlmForCausalLM, GlmModel

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny
from xdit_jax.models import glm

PROMPTS = ["A small dog running on a beach at sunset, cinematic lighting, in the rain.", "A cat."]


@pytest.fixture(scope="module")
def tok():
    return tiny.train_glm_tokenizer()


@pytest.fixture(scope="module")
def pair(tok):
    cfg = TorchConfig(**tiny.COGVIEW4_GLM)
    tm = randomize_(GlmModel(cfg), seed=3, std=0.2).eval()
    ours = glm.GlmConfig.from_dict(cfg.to_dict())
    return tm, ours, glm.build(ours, glm.params_from_torch(state_dict_np(tm), ours))


def test_config_reading():
    # transformers 4's layout (CogView4-6B's text_encoder/config.json): top-level rope_theta / partial_rotary_factor
    c = glm.GlmConfig.from_dict({"model_type": "glm", "hidden_size": 4096, "num_attention_heads": 32,
                                 "num_key_value_heads": 2, "head_dim": 128, "partial_rotary_factor": 0.5,
                                 "rope_theta": 10000.0, "attention_bias": True, "num_hidden_layers": 40})
    assert (c.rotary_dim, c.qkv_bias, c.attention_bias, c.rope_interleaved, c.fused_gate_up) == (64, True, False,
                                                                                                  True, True)
    with pytest.raises(ValueError, match="model_type 'glm'"):
        glm.GlmConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="rope type"):
        glm.GlmConfig.from_dict({"model_type": "glm", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_hidden_states_match_transformers(tok, pair):
    tm, cfg, model = pair
    assert cfg.rotary_dim == 8 and cfg.qkv_bias and not cfg.attention_bias
    ids = glm.tokenize(tok, PROMPTS, 1024)
    assert ids.shape[1] % 16 == 0 and (ids[1, :3] == tok.pad_token_id).all()  # left-padded
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    out = model(ids, None, output_hidden_states=True)
    scale = np.abs(ref.hidden_states[-2].numpy()).max()
    for i in (-2, -1):
        diff = np.abs(np.asarray(out.hidden_states[i]) - ref.hidden_states[i].numpy()).max()
        assert diff < 1e-5 * max(scale, 1.0), (i, diff, scale)
    # CogView4's embeds: hidden_states[-2] of the left-padded ids, no mask
    from diffusers import CogView4Pipeline

    pipe = CogView4Pipeline.__new__(CogView4Pipeline)
    pipe.tokenizer, pipe.text_encoder = tok, tm
    with torch.no_grad():
        want = pipe._get_glm_embeds(PROMPTS, 1024, torch.device("cpu"), torch.float32).numpy()
    got = np.asarray(glm.prompt_embeds(tok, model, PROMPTS, 1024))
    assert got.shape == want.shape
    diff = np.abs(got - want).max()
    # fp32: measured max |diff| 5.8e-6 at values up to 8.0 (7e-7 of the scale)
    assert diff < 1e-5 * max(np.abs(want).max(), 1.0)


def test_causal_lm_keys_load(pair):
    import jax

    tm, cfg, model = pair
    lm = GlmForCausalLM(TorchConfig(**tiny.COGVIEW4_GLM))
    lm.model.load_state_dict(tm.state_dict())
    params = glm.params_from_torch(state_dict_np(lm), cfg)
    ref = glm.params_from_torch(state_dict_np(tm), cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
