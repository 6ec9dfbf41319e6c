"""Parity of xdit_jax.models.t5 with transformers' T5EncoderModel on a tiny random checkpoint."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xdit_jax.models import t5
from xdit_jax.safetensors_io import CheckpointError, load_component_weights, write_safetensors

LENGTHS = (13, 9, 4)  # batch of 3, two rows padded
L = max(LENGTHS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, torch model, input_ids, attention_mask) of a tiny random T5 v1.1 encoder."""
    torch.manual_seed(0)
    tcfg = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.T5EncoderModel(tcfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2 and "embed" not in name and "shared" not in name and "relative" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)  # Linear: unit-scale outputs
            else:
                p.copy_(torch.randn(p.shape, generator=g))  # embeddings, relative attention bias
    folder = tmp_path_factory.mktemp("t5") / "text_encoder"
    model.save_pretrained(folder, safe_serialization=True)

    rng = np.random.default_rng(0)
    ids = rng.integers(2, 100, size=(len(LENGTHS), L))
    mask = np.zeros((len(LENGTHS), L), np.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad token
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    return folder, ref, ids, mask


@pytest.fixture(scope="module")
def cfg(ckpt):
    return t5.T5Config.from_dict(json.loads((ckpt[0] / "config.json").read_text()))


def _run(model, ids, mask):
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def test_config_from_dict(cfg):
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (32, 8, 37, 2, 4)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert not t5.T5Config.from_dict({"feed_forward_proj": "relu"}).is_gated_act
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config.from_dict({"feed_forward_proj": "gated-nonsense"})


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rp = np.arange(-3000, 3001)
    for nb, md in ((32, 128), (8, 20)):
        want = T5Attention._relative_position_bucket(torch.tensor(rp), True, nb, md).numpy()
        np.testing.assert_array_equal(t5.relative_position_bucket(rp, nb, md), want)


def test_fp32_matches_transformers(ckpt, cfg):
    folder, ref, ids, mask = ckpt
    model = t5.build(cfg, t5.params_from_torch(load_component_weights(folder), cfg), jnp.float32)
    out = _run(model, ids, mask)
    assert out.shape == ref.shape == (len(LENGTHS), L, cfg.d_model)
    # Padded rows are compared too: in an encoder they still attend to the valid keys, so
    # transformers defines them and so do we. The output (after the final RMS norm) is O(1); two
    # fp32 implementations of a 2-layer net differ by accumulated rounding, ~1e-6 here, so 1e-5
    # times the output scale catches any real mistake (a wrong bucket or mask moves it by O(0.1)).
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    assert diff <= 1e-5 * scale, (diff, scale)


def test_bf16_close_to_transformers(ckpt, cfg):
    folder, ref, ids, mask = ckpt
    model = t5.build(cfg, t5.params_from_torch(load_component_weights(folder), cfg, jnp.bfloat16), jnp.bfloat16)
    out_bf16 = nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    assert out_bf16.dtype == jnp.bfloat16
    out = np.asarray(out_bf16, np.float32)
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per op); after rounding weights,
    # activations and a dozen matmuls the error is a few times that, relative to the output scale.
    scale = np.abs(ref).max()
    diff = np.abs(out - ref).max()
    assert diff <= 3e-2 * scale, (diff, scale)
    assert np.abs(out - ref).mean() <= 1e-2 * np.abs(ref).mean()


def test_tied_embed_tokens_ignored(ckpt, cfg):
    flat = load_component_weights(ckpt[0])
    assert "encoder.embed_tokens.weight" not in flat  # save_pretrained drops the tied copy
    flat["encoder.embed_tokens.weight"] = flat["shared.weight"]
    t5.params_from_torch(flat, cfg)  # an older checkpoint holding it still loads


@pytest.mark.parametrize("name", ["encoder.block.1.layer.1.DenseReluDense.wo.weight",
                                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
def test_missing_tensor_is_named(ckpt, cfg, tmp_path, name):
    flat = load_component_weights(ckpt[0])
    del flat[name]
    write_safetensors(tmp_path / "model.safetensors", flat)
    with pytest.raises(CheckpointError, match="missing tensors: " + name.replace(".", r"\.")):
        t5.params_from_torch(load_component_weights(tmp_path), cfg)
