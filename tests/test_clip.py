"""Parity of xdit_jax.models.clip with transformers' CLIPTextModel / CLIPTextModelWithProjection on
tiny random checkpoints (both activations, both pooling rules, with and without a padding mask),
its checkpoint tables, the conversion registration, and the on-the-fly CLIP tokenizer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import conversion
from xdit_jax.models import clip
from xdit_jax.safetensors_io import (
    CheckpointError,
    load_component_weights,
    write_safetensors,
)

CORPUS = [
    "A small dog running on a beach at sunset.",
    "A panda playing guitar in a bamboo forest, cinematic lighting.",
    "A red fox in the snow, photo, 35mm, high detail.",
]
PROMPTS = ["a small dog on a beach", "A panda playing jazz guitar in a forest, cinematic!", ""]
MAX_LEN = 77
N_LAYERS = 3
# Two variants: CLIP-L-like (quick_gelu; a legacy config, eos_token_id == 2: pooled at argmax(ids)) and
# CLIP-G-like (gelu; a modern config, eos_token_id = the real EOS id: pooled at its first occurrence).
VARIANTS = {"quick_gelu-legacy": ("quick_gelu", "legacy"), "gelu-modern": ("gelu", "modern")}


@pytest.fixture(scope="module")
def tok():
    return clip.train_tokenizer(CORPUS * 4)


def _torch_config(tok, act: str, rule: str, **kw) -> transformers.CLIPTextConfig:
    eos = 2 if rule == "legacy" else tok.eos_token_id
    return transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=0 if rule == "legacy" else tok.bos_token_id, eos_token_id=eos,
        pad_token_id=1 if rule == "legacy" else tok.pad_token_id, **kw)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tok):
    """(our config, torch CLIPTextModelWithProjection, its hub-style state dict) with random weights."""
    act, rule = VARIANTS[request.param]
    tc = _torch_config(tok, act, rule)
    torch.manual_seed(0)
    tm = randomize_(transformers.CLIPTextModelWithProjection(tc), seed=1)
    return clip.CLIPTextWithProjectionConfig.from_dict(tc.to_dict()), tm, state_dict_np(tm)


def _inputs(tok):
    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def _encode(model, ids, mask=None, output_hidden_states=False):
    """The pipelines' pattern (PipelineBase._text_encoder_fn): split once, jit over the state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def enc(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, output_hidden_states=output_hidden_states)

    return enc(state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


def _torch(m, ids, mask=None):
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 output_hidden_states=True)


def _assert_fp32_close(out, ref):
    # Every compared output is O(1) (LayerNorm'd states and projections of them; max |value| 3-7
    # here). Two fp32 implementations of a 3-layer net differ by accumulated
    # rounding, under 1e-6 of the output scale here; 1e-5 of it catches any real mistake (a wrong
    # mask, activation, eps or pooled position moves an output by >= 1e-2).
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    diff, scale = np.abs(out - ref).max(), np.abs(ref).max()
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


def test_config_from_dict(tok):
    cfg = clip.CLIPTextConfig.from_dict(_torch_config(tok, "quick_gelu", "legacy").to_dict())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.eos_token_id) == (
        len(tok), 32, N_LAYERS, 8, 2)
    assert not cfg.with_projection and clip.CLIPTextWithProjectionConfig.from_dict({}).with_projection
    # Flux's text_encoder (openai/clip-vit-large-patch14), as on the hub.
    flux = clip.CLIPTextConfig.from_dict({
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "vocab_size": 49408})
    assert (flux.hidden_size, flux.num_hidden_layers, flux.head_dim, flux.eos_token_id) == (768, 12, 64, 2)
    # SD3's text_encoder_2 (laion CLIP-ViT-bigG-14).
    big_g = clip.CLIPTextWithProjectionConfig.from_dict({
        "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
        "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
        "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
    assert (big_g.head_dim, big_g.projection_dim, big_g.hidden_act) == (64, 1280, "gelu")
    for bad, match in (({"hidden_act": "gelu_new"}, "hidden_act"), ({"hidden_act": "relu"}, "hidden_act"),
                       ({"hidden_size": 30, "num_attention_heads": 4}, "multiple"),
                       ({"eos_token_id": None}, "eos_token_id"),
                       ({"model_type": "clip", "text_config": {}}, "model_type")):
        with pytest.raises(ValueError, match=match):
            clip.CLIPTextConfig.from_dict(bad)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "padding_mask"])
def test_fp32_matches_transformers(tok, variant, with_mask):
    cfg, tm, flat = variant
    ids, mask = _inputs(tok)
    mask = mask if with_mask else None
    ref = _torch(tm, ids, mask)
    ref_text = _torch(tm.text_model, ids, mask)  # the CLIPTextModel inside: pooler_output

    proj = clip.build(cfg, clip.params_from_torch(flat, cfg), jnp.float32)
    assert isinstance(proj, clip.CLIPTextModelWithProjection)
    out = _encode(proj, ids, mask, output_hidden_states=True)
    assert out.text_embeds.shape == (len(PROMPTS), cfg.projection_dim) and out.text_embeds.dtype == jnp.float32
    _assert_fp32_close(out.text_embeds, ref.text_embeds)
    _assert_fp32_close(out.pooler_output, ref_text.pooler_output)
    # Padded positions are compared too (with the mask they still attend to the valid keys before them).
    _assert_fp32_close(out.last_hidden_state, ref.last_hidden_state)
    assert len(out.hidden_states) == len(ref.hidden_states) == N_LAYERS + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        _assert_fp32_close(ours, theirs)

    # CLIPTextModel from the hub-style checkpoint (text_model.* without the projection).
    tcfg = clip.CLIPTextConfig.from_dict(tm.config.to_dict())
    text = clip.build(tcfg, clip.params_from_torch(
        {k: v for k, v in flat.items() if k.startswith("text_model.")}, tcfg), jnp.float32)
    assert isinstance(text, clip.CLIPTextModel)
    out_t = _encode(text, ids, mask)
    assert out_t.hidden_states is None and out_t[0] is out_t.last_hidden_state
    _assert_fp32_close(out_t.pooler_output, ref_text.pooler_output)
    _assert_fp32_close(out_t.last_hidden_state, ref_text.last_hidden_state)


def test_pooled_position_rules(tok, variant):
    """Both of transformers' rules, on ids where they disagree; a row without the EOS pools position 0."""
    cfg, tm, flat = variant
    v = cfg.vocab_size
    mid = 300  # a "modern" EOS id that is not the largest id present
    ids = np.array([[v - 2, 5, v - 3, mid, 7, mid, v - 1, v - 1],
                    [v - 2, 9, 11, v - 1, 4, v - 1, 6, 8],
                    [v - 2, 9, 11, 12, 4, 13, 6, 8]])
    # (eos_token_id, expected pooled positions): legacy argmax; the first `mid`; the first v - 1.
    for eos, want in ((2, [6, 3, 0]), (mid, [3, 0, 0]), (v - 1, [6, 3, 0])):
        np.testing.assert_array_equal(clip.eos_positions(jnp.asarray(ids), eos), want)
        tc = transformers.CLIPTextConfig(**{**tm.config.to_dict(), "eos_token_id": eos})
        ref_model = transformers.CLIPTextModel(tc).eval()
        ref_model.load_state_dict(tm.text_model.state_dict())
        ours_cfg = clip.CLIPTextConfig.from_dict(tc.to_dict())
        flat_text = {k: v_ for k, v_ in flat.items() if k.startswith("text_model.")}
        model = clip.build(ours_cfg, clip.params_from_torch(flat_text, ours_cfg), jnp.float32)
        out = _encode(model, ids)
        ref = _torch(ref_model, ids)
        _assert_fp32_close(out.pooler_output, ref.pooler_output)
        np.testing.assert_array_equal(np.asarray(out.pooler_output),
                                      np.asarray(out.last_hidden_state)[np.arange(3), want])


def test_bf16_close_to_fp32(tok, variant):
    cfg, tm, flat = variant
    ids, _ = _inputs(tok)
    ref = _torch(tm, ids)
    model = clip.build(cfg, clip.params_from_torch(flat, cfg, jnp.bfloat16), jnp.bfloat16)
    out = _encode(model, ids, output_hidden_states=True)
    assert out.text_embeds.dtype == out.last_hidden_state.dtype == out.hidden_states[-2].dtype == jnp.bfloat16
    # bf16 keeps an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per rounding); the weights, the
    # embeddings, every matmul input and every layer's output are rounded, and the errors add up over
    # 3 layers: measured max errors are 0.8-1.4% of each output's scale and mean errors 0.8-1.0% of
    # its mean |value| (last_hidden_state, text_embeds, hidden_states[-2]; both variants). The bounds
    # leave 2x room for that and still fail on a gross mistake (a dropped causal mask or a wrong
    # pooled row moves outputs by O(1)); fine-grained parity is the fp32 tests' job.
    for ours, theirs in ((out.last_hidden_state, ref.last_hidden_state), (out.text_embeds, ref.text_embeds),
                         (out.hidden_states[-2], ref.hidden_states[-2])):
        ours, theirs = np.asarray(ours, np.float32), theirs.numpy()
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 3e-2 * scale, (np.abs(ours - theirs).max(), scale)
        assert np.abs(ours - theirs).mean() <= 2e-2 * np.abs(theirs).mean()


def test_transformers5_saved_text_model_loads(tok, variant, tmp_path):
    """transformers 5's CLIPTextModel.save_pretrained (keys without ``text_model.``), through the
    conversion code, with the old ``position_ids`` buffer added."""
    _, tm, _ = variant
    tm.text_model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    folder = tmp_path / "text_encoder"
    flat = load_component_weights(folder)
    assert clip.is_unprefixed(flat)
    flat["embeddings.position_ids"] = np.arange(MAX_LEN, dtype=np.int64)[None]
    write_safetensors(folder / "model.safetensors", flat)
    cfg_dict, params = conversion.convert_component(folder, "CLIPTextModel", dtype=np.float32)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["CLIPTextModel"]
    mod, cfg_cls = conversion.model_class("CLIPTextModel")
    model = mod.build(cfg_cls.from_dict(cfg_dict), params, jnp.float32)
    ids, mask = _inputs(tok)
    ref = _torch(tm.text_model, ids, mask)
    _assert_fp32_close(_encode(model, ids, mask).pooler_output, ref.pooler_output)


def test_with_projection_saved_folder_converts(tok, variant, tmp_path):
    _, tm, _ = variant
    folder = tmp_path / "text_encoder_2"
    tm.save_pretrained(folder, safe_serialization=True)
    sd = load_component_weights(folder)
    assert "text_projection.weight" in sd and not clip.is_unprefixed(sd)
    sd["text_model.embeddings.position_ids"] = np.arange(MAX_LEN, dtype=np.int64)[None]  # hub files may hold it
    write_safetensors(folder / "model.safetensors", sd)
    cfg_dict, params = conversion.convert_component(folder, "CLIPTextModelWithProjection", dtype=np.float32)
    mod, cfg_cls = conversion.model_class("CLIPTextModelWithProjection")
    assert mod is clip and cfg_cls is clip.CLIPTextWithProjectionConfig
    model = mod.build(cfg_cls.from_dict(cfg_dict), params, jnp.float32)
    assert isinstance(model, clip.CLIPTextModelWithProjection)
    ids, _ = _inputs(tok)
    _assert_fp32_close(_encode(model, ids).text_embeds, _torch(tm, ids).text_embeds)


@pytest.mark.parametrize("name", ["text_model.encoder.layers.2.mlp.fc1.bias", "text_projection.weight",
                                  "text_model.final_layer_norm.weight"])
def test_missing_tensor_is_named(variant, name):
    cfg, _, flat = variant
    sd = dict(flat)
    del sd[name]
    with pytest.raises(CheckpointError, match="missing tensors: " + name.replace(".", r"\.")):
        clip.params_from_torch(sd, cfg)


def test_unexpected_and_misshaped_tensors_are_named(variant):
    cfg, _, flat = variant
    extra = "text_model.encoder.layers.3.self_attn.q_proj.weight"  # a 4th layer for a 3-layer config
    sd = dict(flat, **{extra: flat["text_model.encoder.layers.0.self_attn.q_proj.weight"]})
    with pytest.raises(CheckpointError, match="unexpected tensors: " + extra.replace(".", r"\.")):
        clip.params_from_torch(sd, cfg)
    # A WithProjection checkpoint read as a CLIPTextModel: the projection is unexpected.
    with pytest.raises(CheckpointError, match=r"unexpected tensors: text_projection\.weight"):
        clip.params_from_torch(flat, clip.CLIPTextConfig.from_dict(dataclasses.asdict(cfg)))
    sd = dict(flat, **{"text_projection.weight": np.zeros((cfg.projection_dim + 1, cfg.hidden_size), np.float32)})
    with pytest.raises(CheckpointError, match=r"wrong shape: text_projection\.weight"):
        clip.params_from_torch(sd, cfg)


def test_too_long_sequence_raises(variant):
    cfg, _, flat = variant
    model = clip.build(cfg, clip.params_from_torch(flat, cfg), jnp.float32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, MAX_LEN + 1), np.int32))


def test_tokenizer(tok, tmp_path):
    assert isinstance(tok, transformers.CLIPTokenizer)
    v = len(tok)
    assert v <= 600 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (v - 2, v - 1, v - 1)
    assert tok.model_max_length == MAX_LEN
    kw = {"padding": "max_length", "max_length": MAX_LEN, "truncation": True, "return_tensors": "np"}
    enc = tok(PROMPTS, **kw)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (len(PROMPTS), MAX_LEN) and ids.max() < v
    n = mask.sum(1)
    for row, k in zip(ids, n):  # <|startoftext|> ... <|endoftext|>, then the pad (= EOS) to 77
        assert row[0] == v - 2 and row[k - 1] == v - 1 and (row[k:] == v - 1).all() and (row[1:k - 1] < v - 2).all()
    assert n[2] == 2  # the empty prompt: BOS, EOS
    toks = tok.convert_ids_to_tokens(ids[0][:n[0]])
    assert toks[1:4] == ["a</w>", "small</w>", "dog</w>"]  # lower-cased words with the </w> suffix
    assert tok.decode(ids[1], skip_special_tokens=True) == "a panda playing jazz guitar in a forest , cinematic !"
    long = tok(["dog " * 200], **kw)["input_ids"][0]  # truncated, and the EOS kept last
    assert long.shape == (MAX_LEN,) and long[-1] == v - 1 and (long[1:-1] < v - 2).all()

    tok.save_pretrained(tmp_path / "tokenizer")
    for cls in (transformers.CLIPTokenizer, transformers.AutoTokenizer):
        again = cls.from_pretrained(tmp_path / "tokenizer")
        enc2 = again(PROMPTS + ["dog " * 200], **kw)
        np.testing.assert_array_equal(enc2["input_ids"][:len(PROMPTS)], ids)
        np.testing.assert_array_equal(enc2["attention_mask"][:len(PROMPTS)], mask)
        np.testing.assert_array_equal(enc2["input_ids"][-1], long)

    g = clip.train_tokenizer(CORPUS, vocab_size=530, pad_token="!")  # CLIP-G's tokenizer_2 pads with "!" (id 0)
    assert len(g) <= 530 and g.pad_token_id == 0 and g.eos_token_id == len(g) - 1
    enc_g = g(["a dog"], **kw)
    k = enc_g["attention_mask"][0].sum()
    row = enc_g["input_ids"][0]
    assert row[0] == len(g) - 2 and row[k - 1] == len(g) - 1 and (row[k:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        clip.train_tokenizer(CORPUS, vocab_size=514)
