"""Gemma 2 text encoder == transformers Gemma2Model (eager attention: soft-capping); SANA's prompt tokenization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma2Config as TorchConfig
from transformers import Gemma2Model as TorchModel

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import gemma2

# 3 layers (sliding, full, sliding), GQA 4 query / 2 kv heads of 8, query_pre_attn_scalar 16 (not head_dim),
# soft cap 2.0 (small so that it bites on these logits), sliding window 3 (< the 9 tokens).
TINY = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=3,
            attn_logit_softcapping=2.0, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tcfg = TorchConfig(**TINY)
    tcfg._attn_implementation = "eager"
    tm = randomize_(TorchModel(tcfg), seed=3, std=0.3)
    cfg = gemma2.Gemma2Config.from_dict(tcfg.to_dict())
    model = gemma2.build(cfg, gemma2.params_from_torch(state_dict_np(tm), cfg))
    return tm, cfg, model


def test_config_reads_transformers_json(pair):
    tm, cfg, _ = pair
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window) == (8, 16, 3)
    with pytest.raises(ValueError, match="rope type"):
        gemma2.Gemma2Config.from_dict({**tm.config.to_dict(), "rope_parameters": {"rope_type": "linear",
                                                                                  "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        gemma2.Gemma2Config.from_dict({"model_type": "llama"})


def test_matches_transformers(pair):
    tm, cfg, model = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 64, (2, 9))
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4])  # right padding, as the SANA pipeline's tokenizer pads
    ids[1, 5:] = 0
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out = np.asarray(jax.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
    # fp32 both sides, outputs of scale 6.2: measured 9.3e-6 (float32 reorderings over 3 layers; without the soft
    # cap the error is 5.0, without the sliding window 7.3). Padded rows included (they attend to the
    # valid keys, as transformers').
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_tokenizer_stand_in_and_prompt_selection():
    tok = gemma2.train_tokenizer(["a small cat", "red blue green sky", "User Prompt: a dog"] * 4, vocab_size=90)
    ids, mask = gemma2.tokenize_prompts(tok, ["a cat", "red sky"], max_sequence_length=6)
    assert ids.shape == (2, 6) and ids[0, 0] == 2 and mask[0].sum() >= 2 and ids[0, -1] == 0  # <bos>, right pad
    chi = ["User Prompt: "]
    ids2, _ = gemma2.tokenize_prompts(tok, ["a cat"], max_sequence_length=6, complex_human_instruction=chi)
    assert ids2.shape[1] == len(tok.encode(chi[0])) + 6 - 2
    # encode_prompt's selection: the first token and the last max_sequence_length - 1
    fake = lambda i, m: jnp.asarray(i)[..., None].astype(jnp.float32)  # noqa: E731
    emb, m = gemma2.gemma_prompt_embeds(tok, fake, ["a cat"], 6, chi)
    sel = [0] + list(range(-5, 0))
    assert emb.shape == (1, 6, 1) and np.array_equal(np.asarray(emb)[0, :, 0], ids2[0, sel])


def test_hidden_state_matches_transformers(pair):
    """``hidden_state(index)`` == transformers' ``hidden_states[index]`` (Lumina 2 reads ``[-2]``: the input of the
    last layer, not normed), on a right-padded batch."""
    tm, cfg, model = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 64, (2, 7))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True).hidden_states
    assert len(ref) == cfg.num_hidden_layers + 1
    fn = jax.jit(lambda m, i, k: m.hidden_state(i, k, -2))
    out = np.asarray(fn(model, jnp.asarray(ids), jnp.asarray(mask)))
    # fp32, states of scale 14.7: measured 5.2e-6 (2 of the 3 layers)
    np.testing.assert_allclose(out, ref[-2].numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.hidden_state(ids[:, :3], None, 0)), ref[0].numpy()[:, :3], rtol=1e-6)
    with pytest.raises(IndexError, match="4 entries"):
        model.hidden_state(ids, mask, 5)
