"""Parity of xdit_jax.models.t5 (UMT5 variant) with transformers' UMT5EncoderModel on a tiny random checkpoint."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xdit_jax import conversion
from xdit_jax.models import t5
from xdit_jax.safetensors_io import CheckpointError, load_component_weights, write_safetensors

LENGTHS = (13, 9, 4)  # batch of 3, two rows padded
L = max(LENGTHS)
N_LAYERS = 3
BIAS_KEY = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers text_encoder/config.json (shapes as shipped; only read, never built)
WAN_CONFIG = {
    "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "scalable_attention": True, "tie_word_embeddings": False,
    "use_cache": True, "vocab_size": 256384}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, reference output, input_ids, attention_mask) of a tiny random UMT5 encoder."""
    torch.manual_seed(0)
    tcfg = transformers.UMT5Config(
        vocab_size=120, d_model=32, d_kv=8, d_ff=37, num_layers=N_LAYERS, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.UMT5EncoderModel(tcfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2 and "embed" not in name and "shared" not in name and "relative" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)  # Linear: unit-scale outputs
            else:
                p.copy_(torch.randn(p.shape, generator=g))  # embeddings, each block's relative attention bias
    folder = tmp_path_factory.mktemp("umt5") / "text_encoder"
    model.save_pretrained(folder, safe_serialization=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 120, size=(len(LENGTHS), L))
    mask = np.zeros((len(LENGTHS), L), np.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad token
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    return folder, ref, ids, mask


@pytest.fixture(scope="module")
def cfg(ckpt):
    return t5.UMT5Config.from_dict(json.loads((ckpt[0] / "config.json").read_text()))


@pytest.fixture(scope="module")
def flat(ckpt):
    return load_component_weights(ckpt[0])


def _run(model, ids, mask):
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def test_config_variant():
    wan = t5.UMT5Config.from_dict(WAN_CONFIG)
    assert wan.per_layer_relative_bias and wan.is_gated_act and wan.dense_act_fn == "gelu_new"
    assert (wan.vocab_size, wan.d_model, wan.d_kv, wan.d_ff, wan.num_layers, wan.num_heads) == (
        256384, 4096, 64, 10240, 24, 64)
    assert wan == t5.UMT5Config()  # the defaults are umt5-xxl as Wan ships it
    # model_type picks the variant also through the T5 class; a T5 config stays T5.
    assert t5.T5Config.from_dict(WAN_CONFIG).per_layer_relative_bias
    assert not t5.T5Config.from_dict({"model_type": "t5"}).per_layer_relative_bias
    mod, cfg_cls = conversion.model_class("UMT5EncoderModel")
    assert mod is t5 and cfg_cls is t5.UMT5Config


def test_conversion_uses_every_tensor(ckpt, cfg, flat):
    assert "shared.weight" in flat and "encoder.relative_attention_bias.weight" not in flat
    assert all(BIAS_KEY.format(i) in flat for i in range(N_LAYERS))
    # map_state_dict refuses a missing, unexpected or misshaped tensor, so this covers every key.
    cfg_dict, params = conversion.convert_component(ckpt[0], "UMT5EncoderModel", dtype=np.float32)
    assert cfg_dict["model_type"] == "umt5"
    enc = params["encoder"]
    assert "relative_attention_bias" not in enc  # no shared table: each block's is in the stack
    tables = enc["block"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
    assert tables.shape == (N_LAYERS, cfg.relative_attention_num_buckets, cfg.num_heads)
    for i in range(N_LAYERS):
        np.testing.assert_array_equal(tables[i], flat[BIAS_KEY.format(i)])
    wq = enc["block"]["layer"]["0"]["SelfAttention"]["q"]["kernel"]
    np.testing.assert_array_equal(wq[2], flat["encoder.block.2.layer.0.SelfAttention.q.weight"].T)
    n = sum(int(np.prod(a.shape)) for a in conversion._leaves(params))
    assert n == sum(int(np.prod(a.shape)) for a in flat.values())


def test_fp32_matches_transformers(ckpt, cfg, flat):
    _, ref, ids, mask = ckpt
    model = t5.build(cfg, t5.params_from_torch(flat, cfg), jnp.float32)
    out = _run(model, ids, mask)
    assert out.shape == ref.shape == (len(LENGTHS), L, cfg.d_model)
    # Padded rows are compared too (they attend to the valid keys, transformers defines them). The
    # output (after the final RMS norm) is O(1); two fp32 implementations of a 3-layer net differ by
    # accumulated rounding (~1e-6), so 1e-5 of the output scale catches any real mistake: a wrong bias
    # table, bucket or mask moves it by O(0.1) (see test_per_layer_tables_matter).
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5 * scale, (diff, scale)


def test_per_layer_tables_matter(ckpt, cfg, flat):
    """The test above can tell the tables apart: block 0's table for every block (T5's rule) fails it."""
    _, ref, ids, mask = ckpt
    shared = dict(flat)
    for i in range(1, N_LAYERS):
        shared[BIAS_KEY.format(i)] = flat[BIAS_KEY.format(0)]
    out = _run(t5.build(cfg, t5.params_from_torch(shared, cfg), jnp.float32), ids, mask)
    assert np.abs(out - ref).max() > 1e-2 * np.abs(ref).max()


def test_bf16_close_to_transformers(ckpt, cfg, flat):
    _, ref, ids, mask = ckpt
    model = t5.build(cfg, t5.params_from_torch(flat, cfg, jnp.bfloat16), jnp.bfloat16)
    out_bf16 = nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    assert out_bf16.dtype == jnp.bfloat16
    out = np.asarray(out_bf16, np.float32)
    # bf16 rounds at 2^-9 ~ 2e-3 relative per op; weights, activations and ~20 matmuls give several
    # times that relative to the output scale. Measured: max 2.2e-2 of the scale, mean 1.5e-2 of the
    # mean; transformers' own bf16 run of this checkpoint is as far (max 1.8e-2, mean 1.4e-2).
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    assert diff <= 4e-2 * scale, (diff, scale)
    assert np.abs(out - ref).mean() <= 2.5e-2 * np.abs(ref).mean()


def test_embedding_under_either_tied_name(ckpt, cfg, flat):
    _, ref, ids, mask = ckpt
    both = dict(flat, **{"encoder.embed_tokens.weight": flat["shared.weight"]})
    t5.params_from_torch(both, cfg)  # the tied copy is ignored
    only_encoder = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in flat.items()}
    params = t5.params_from_torch(only_encoder, cfg)  # a checkpoint that kept the encoder's name
    np.testing.assert_array_equal(params["shared"]["embedding"], flat["shared.weight"])


def test_t5_checkpoint_refused_by_umt5_config(ckpt, cfg, flat, tmp_path):
    """A T5 state dict (one table, block 0's) under a UMT5 config names the missing per-block tables."""
    t5_like = {k: v for k, v in flat.items() if "relative_attention_bias" not in k or ".block.0." in k}
    write_safetensors(tmp_path / "model.safetensors", t5_like)
    with pytest.raises(CheckpointError, match=r"missing tensors: " + BIAS_KEY.format(1).replace(".", r"\.")):
        t5.params_from_torch(load_component_weights(tmp_path), cfg)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: " + BIAS_KEY.format(1).replace(".", r"\.")):
        t5.params_from_torch(flat, t5.T5Config.from_dict(dict(json.loads((ckpt[0] / "config.json").read_text()),
                                                              model_type="t5")))
