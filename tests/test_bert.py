"""Parity of xdit_jax.models.bert with transformers' BertModel on a tiny random checkpoint, its
checkpoint tables (pooler, buffers, ``bert.`` prefix), and the on-the-fly WordPiece tokenizer."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import bert
from xdit_jax.safetensors_io import CheckpointError, load_component_weights, write_safetensors

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=80, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LENGTHS = (13, 5)  # batch 2: the second row is padded beyond its 5 tokens
L = max(LENGTHS)
CORPUS = [
    "A small dog running on a beach at sunset.",
    "A panda playing guitar in a bamboo forest, cinematic lighting.",
    "一只小狗在夕阳下的海滩上奔跑。",
    "熊猫在竹林里弹吉他，电影感光线。",
]


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, TINY["vocab_size"], size=(len(LENGTHS), L))
    mask = np.zeros((len(LENGTHS), L), np.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0  # [PAD]
    types = np.zeros_like(ids)
    types[:, 7:] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def torch_model():
    """transformers BertModel (default attention, pooler included) with random weights."""
    torch.manual_seed(0)
    return randomize_(transformers.BertModel(transformers.BertConfig(**TINY)), seed=1)


@pytest.fixture(scope="module")
def cfg(torch_model):
    return bert.BertConfig.from_dict(torch_model.config.to_dict())


@pytest.fixture(scope="module")
def flat(torch_model):
    return state_dict_np(torch_model)


@pytest.fixture(scope="module")
def model(cfg, flat):
    return bert.build(cfg, bert.params_from_torch(flat, cfg), jnp.float32)


def _torch(m, ids, mask=None, types=None):
    t = (lambda a: None if a is None else torch.tensor(a))
    with torch.no_grad():
        return m(t(ids), attention_mask=t(mask), token_type_ids=t(types))[0].numpy()


_fwd = nnx.jit(lambda m, i, a, t: m(i, a, t))


def _jax(m, ids, mask=None, types=None):
    wrap = (lambda a: None if a is None else jnp.asarray(a))
    return _fwd(m, wrap(ids), wrap(mask), wrap(types))


def _assert_fp32_close(out, ref):
    # The outputs (after a LayerNorm with weights ~1 +- 0.2) are O(1). Two fp32 implementations of a
    # 2-layer net differ by accumulated rounding, ~1e-6 here; 1e-5 of the output scale catches any
    # real mistake (a dropped mask, a wrong GELU or LayerNorm eps moves it by >= 1e-3).
    out = np.asarray(out, np.float32)
    assert out.shape == ref.shape
    diff, scale = np.abs(out - ref).max(), np.abs(ref).max()
    assert diff <= 1e-5 * scale, (diff, scale)


def test_config_from_dict(cfg):
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, cfg.head_dim) == (128, 32, 2, 4, 64, 80, 8)
    # A config.json shaped like HunyuanDiT's text_encoder (chinese-roberta-wwm-ext-large, vocab 47020).
    big = bert.BertConfig.from_dict({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "directionality": "bidi",
        "hidden_act": "gelu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
        "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 0, "pooler_fc_size": 768,
        "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 47020, "use_cache": True})
    assert (big.hidden_size, big.num_hidden_layers, big.head_dim, big.vocab_size) == (1024, 24, 64, 47020)
    for bad, match in (({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                       ({"hidden_act": "silu"}, "hidden_act"),
                       ({"is_decoder": True}, "is_decoder"),
                       ({"hidden_size": 30, "num_attention_heads": 4}, "multiple")):
        with pytest.raises(ValueError, match=match):
            bert.BertConfig.from_dict(bad)


@pytest.mark.parametrize("case", ["padding_mask", "no_mask", "token_types"])
def test_fp32_matches_transformers(torch_model, model, case):
    ids, mask, types = _inputs()
    if case == "no_mask":
        ids = np.where(ids == 0, 7, ids)
        mask = None
    if case != "token_types":
        types = None  # transformers' default: all zeros
    ref = _torch(torch_model, ids, mask, types)
    out = _jax(model, ids, mask, types)
    assert out.dtype == jnp.float32 and out.shape == (len(LENGTHS), L, TINY["hidden_size"])
    # The padded positions are compared too: they still attend to the valid keys, and transformers
    # defines their outputs.
    _assert_fp32_close(out, ref)


def test_fully_masked_row_matches_eager_transformers(torch_model, model):
    """A row whose mask is all zeros: every key gets the same finfo.min bias, attention is uniform
    (transformers' eager attention; its 5.x default SDPA path gives such a row zeros instead)."""
    eager = transformers.BertModel(transformers.BertConfig(**TINY, attn_implementation="eager")).eval()
    assert eager.config._attn_implementation == "eager" and torch_model.config._attn_implementation == "sdpa"
    eager.load_state_dict(torch_model.state_dict())
    ids, mask, _ = _inputs()
    mask[1] = 0
    ref = _torch(eager, ids, mask)
    out = _jax(model, ids, mask)
    assert np.isfinite(np.asarray(out)).all()
    _assert_fp32_close(out, ref)


def test_checkpoint_with_pooler_and_buffers_loads(torch_model, cfg, flat, tmp_path):
    """A saved BertModel as found in the wild: no ``bert.`` prefix, the pooler, the old buffers."""
    assert any(k.startswith("pooler.") for k in flat)
    sd = dict(flat)
    sd["embeddings.position_ids"] = np.arange(cfg.max_position_embeddings, dtype=np.int64)[None]
    sd["embeddings.token_type_ids"] = np.zeros((1, cfg.max_position_embeddings), np.int64)
    write_safetensors(tmp_path / "model.safetensors", sd)
    params = bert.params_from_torch(load_component_weights(tmp_path), cfg)
    ids, mask, _ = _inputs()
    _assert_fp32_close(_jax(bert.build(cfg, params, jnp.float32), ids, mask), _torch(torch_model, ids, mask))


def test_prefixed_head_model_checkpoint_loads(cfg):
    """A BertFor* model's state dict: the encoder under ``bert.``, heads (``cls.*``) ignored."""
    mlm = randomize_(transformers.BertForMaskedLM(transformers.BertConfig(**TINY)), seed=2)
    sd = state_dict_np(mlm)
    assert bert.is_prefixed(sd) and any(k.startswith("cls.") for k in sd)
    ids, mask, _ = _inputs()
    model = bert.build(cfg, bert.params_from_torch(sd, cfg), jnp.float32)
    _assert_fp32_close(_jax(model, ids, mask), _torch(mlm.bert, ids, mask))
    del sd["bert.encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensors: bert\.encoder\.layer\.0\.attention\.self\.key\.bias"):
        bert.params_from_torch(sd, cfg)


@pytest.mark.parametrize("name", ["encoder.layer.1.output.LayerNorm.bias", "embeddings.token_type_embeddings.weight"])
def test_missing_tensor_is_named(cfg, flat, tmp_path, name):
    sd = dict(flat)
    del sd[name]
    write_safetensors(tmp_path / "model.safetensors", sd)
    with pytest.raises(CheckpointError, match="missing tensors: " + name.replace(".", r"\.")):
        bert.params_from_torch(load_component_weights(tmp_path), cfg)


def test_unexpected_tensor_is_named(cfg, flat):
    sd = dict(flat, **{"encoder.layer.2.output.dense.bias": flat["encoder.layer.1.output.dense.bias"]})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: encoder\.layer\.2\.output\.dense\.bias"):
        bert.params_from_torch(sd, cfg)


def test_bf16_close_to_fp32(torch_model, cfg, flat):
    ids, mask, _ = _inputs()
    ref = _torch(torch_model, ids, mask)
    model = bert.build(cfg, bert.params_from_torch(flat, cfg, jnp.bfloat16), jnp.bfloat16)
    out_bf16 = _jax(model, ids, mask)
    assert out_bf16.dtype == jnp.bfloat16
    out = np.asarray(out_bf16, np.float32)
    # bf16 keeps an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per op); after rounding the
    # weights, the activations and a dozen matmuls and norms the error is a few times that: here the
    # max error is ~1.1% of the output scale and the mean ~0.85% of the mean |output|. The bounds
    # leave room for that and still fail on a gross mistake (a dropped mask moves the output by O(1));
    # fine-grained parity is the fp32 tests' job.
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 3e-2 * scale, (np.abs(out - ref).max(), scale)
    assert np.abs(out - ref).mean() <= 2e-2 * np.abs(ref).mean()


def test_too_long_sequence_raises(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, TINY["max_position_embeddings"] + 1), np.int32))


def test_tokenizer_round_trip(tmp_path, model):
    tok = bert.train_tokenizer(CORPUS, vocab_size=TINY["vocab_size"])
    assert isinstance(tok, transformers.BertTokenizerFast)
    special = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert special == [0, 1, 2, 3, 4]
    assert len(tok) <= TINY["vocab_size"]
    prompts = ["A small dog on a beach", "熊猫弹吉他 zebra!", "一只小狗"]
    kw = dict(padding="max_length", max_length=16, truncation=True, return_attention_mask=True, return_tensors="np")
    enc = tok(prompts, **kw)
    toks = tok.convert_ids_to_tokens(enc["input_ids"][1])
    assert toks[:4] == ["[CLS]", "熊", "猫", "弹"] and "[UNK]" in toks  # CJK split per char; 'z' unseen
    n = enc["attention_mask"].sum(1)
    for row, k in zip(enc["input_ids"], n):
        assert row[0] == 2 and row[k - 1] == 3 and (row[k:] == 0).all()
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == "a small dog on a beach"

    tok.save_pretrained(tmp_path / "tokenizer")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    enc2 = again(prompts, **kw)
    assert set(enc) == set(enc2)
    for k in enc:
        np.testing.assert_array_equal(enc[k], enc2[k])
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())  # readable

    out = _jax(model, enc["input_ids"], enc["attention_mask"])  # ids fit the tiny model's vocabulary
    assert out.shape == (3, 16, TINY["hidden_size"]) and np.isfinite(np.asarray(out)).all()

    with pytest.raises(ValueError, match="vocab_size"):
        bert.train_tokenizer(CORPUS, vocab_size=20)
