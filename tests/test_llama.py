"""Parity of xdit_jax.models.llama with transformers' LlamaModel (tiny random weights) and of its HunyuanVideo
prompt-template helper with diffusers' HunyuanVideoPipeline._get_llama_prompt_embeds."""

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
from xdit_jax import conversion
from xdit_jax.models import llama
from xdit_jax.safetensors_io import CheckpointError

N_LAYERS = 3
LENGTHS = (11, 6)  # a batch of 2 right-padded prompts of different lengths
L = max(LENGTHS)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# GQA (4 query heads, 2 key/value heads); "llama3": Llama 3.1's rope scaling; rope_theta 100 and an original
# context of 32 put head_dim 8's four frequencies in all three bands (wavelengths 6.3 < 32/4: kept; 19.9:
# smoothed; 63 and 199 > 32: divided by the factor); with attention biases.
VARIANTS = {"gqa": {}, "llama3": dict(rope_scaling=LLAMA3_SCALING, rope_theta=100.0, attention_bias=True)}


def _torch_config(**kw):
    return transformers.LlamaConfig(**{**dict(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512, pad_token_id=0,
        attn_implementation="eager"), **kw})


def _variant(name):
    """(our config, torch LlamaModel, its state dict) with random weights."""
    tc = _torch_config(**VARIANTS[name])
    torch.manual_seed(0)
    tm = randomize_(transformers.LlamaModel(tc), seed=1)
    return llama.LlamaConfig.from_dict(tc.to_dict()), tm, state_dict_np(tm)


@pytest.fixture(scope="module")
def gqa():
    return _variant("gqa")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, gqa):
    return gqa if request.param == "gqa" else _variant(request.param)


def _inputs(vocab=300):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(len(LENGTHS), L))
    mask = np.zeros((len(LENGTHS), L), np.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad token
    return ids, mask


def _encode(model, ids, mask, output_hidden_states=False):
    """The pipelines' pattern (PipelineBase._text_encoder_fn): split once, jit over the state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def enc(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, output_hidden_states=output_hidden_states)

    return enc(state, jnp.asarray(ids), jnp.asarray(mask))


def _torch(m, ids, mask):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)


def _assert_fp32_close(out, ref):
    # Every compared state is O(1) (max |value| 3-7 here). Two fp32 implementations of a 3-layer net differ by
    # accumulated rounding (summation order of the matmuls, exp/rsqrt/cos implementations): measured <= 1.1e-6
    # of the scale (3.5e-6 absolute) on last_hidden_state and hidden_states[-3], both variants. 1e-5 of the
    # scale leaves ~10x room and still catches any real mistake (a wrong mask, rotary layout, head grouping,
    # inv_freq band or eps moves outputs by >= 1e-3).
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    diff, scale = np.abs(out - ref).max(), np.abs(ref).max()
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


def test_config_from_dict():
    # HunyuanVideo's text_encoder/config.json (transformers 4 layout: rope_theta + rope_scaling null).
    hub = {"architectures": ["LlamaModel"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
           "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
           "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
           "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 128320}
    cfg = llama.LlamaConfig.from_dict(hub)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.rope_type) == (128, 8, 500000.0, "default")
    hash(cfg)  # static module data
    # transformers 5 writes rope_parameters (rope_theta inside); head_dim and num_key_value_heads default.
    c5 = llama.LlamaConfig.from_dict(_torch_config(rope_theta=123.0, num_key_value_heads=None).to_dict())
    assert (c5.rope_theta, c5.rope_scaling, c5.head_dim, c5.num_key_value_heads) == (123.0, None, 8, 4)
    c3 = llama.LlamaConfig.from_dict(dict(hub, rope_scaling=LLAMA3_SCALING))
    assert c3.rope_type == "llama3" and c3.rope_params == LLAMA3_SCALING
    assert llama.LlamaConfig.from_dict(dict(hub, rope_scaling={"type": "llama3", **{
        k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}})).rope_type == "llama3"  # the older key
    for bad, match in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "Unsupported Llama rope type 'yarn'"),
                       ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "Unsupported Llama rope type 'linear'"),
                       ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
                       ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
                       ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"num_key_value_heads": 3}, "multiple"),
                       ({"model_type": "mistral"}, "model_type")):
        with pytest.raises(ValueError, match=match):
            llama.LlamaConfig.from_dict({**hub, **bad})


def test_inv_freq_matches_transformers(variant):
    cfg, tm, _ = variant
    np.testing.assert_allclose(llama.rope_inv_freq(cfg), tm.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    if cfg.rope_type == "llama3":  # the three bands are all present
        ratio = llama.rope_inv_freq(cfg) / llama.rope_inv_freq(llama.LlamaConfig(**{
            **{f: getattr(cfg, f) for f in ("hidden_size", "num_attention_heads", "rope_theta")}}))
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any() and ((ratio > 0.13) & (ratio < 0.99)).any()


def test_fp32_matches_transformers(variant):
    cfg, tm, flat = variant
    ids, mask = _inputs()
    ref = _torch(tm, ids, mask)
    model = llama.build(cfg, llama.params_from_torch(flat, cfg), jnp.float32)
    out = _encode(model, ids, mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, L, 32) and out.last_hidden_state.dtype == jnp.float32
    # Padded positions are compared too: with right padding they attend to the valid keys before them
    # (causal & key mask), so transformers' values there are well defined.
    _assert_fp32_close(out.last_hidden_state, ref.last_hidden_state)
    assert len(out.hidden_states) == len(ref.hidden_states) == N_LAYERS + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        _assert_fp32_close(ours, theirs)
    # hidden_states[-3] (HunyuanVideo) running only the first layer; 0: no layer.
    for index in (-3, 0):
        fn = jax.jit(lambda s, i, m, index=index: nnx.merge(*s).hidden_state(i, m, index))
        _assert_fp32_close(fn(nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)), ref.hidden_states[index])
    with pytest.raises(IndexError):
        model.hidden_state(ids, mask, N_LAYERS + 1)


def test_bf16_close_to_fp32(gqa):
    cfg, tm, flat = gqa
    ids, mask = _inputs()
    ref = _torch(tm, ids, mask)
    model = llama.build(cfg, llama.params_from_torch(flat, cfg, jnp.bfloat16), jnp.bfloat16)
    out = _encode(model, ids, mask, output_hidden_states=True)
    assert out.last_hidden_state.dtype == out.hidden_states[-3].dtype == jnp.bfloat16
    # bf16 keeps an 8-bit mantissa (relative rounding ~2e-3 per rounding); weights, embeddings, every matmul
    # input and each layer's output are rounded and the errors add up over 3 layers. Measured against fp32
    # transformers: max error 1.1-2.3% of each output's scale, mean error 0.9-1.6% of its mean |value|
    # (last_hidden_state, hidden_states[-3]; both variants). Bounds 5% / 3% leave ~2x room; a gross mistake
    # (no causal mask, a wrong rotary or head grouping) moves outputs by O(1): fine parity is the fp32 test's job.
    for ours, theirs in ((out.last_hidden_state, ref.last_hidden_state), (out.hidden_states[-3], ref.hidden_states[-3])):
        ours, theirs = np.asarray(ours, np.float32), theirs.numpy()
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 5e-2 * scale, (np.abs(ours - theirs).max(), scale)
        assert np.abs(ours - theirs).mean() <= 3e-2 * np.abs(theirs).mean()


def test_saved_folder_converts(gqa, tmp_path):
    """A LlamaModel.save_pretrained folder (diffusers' text_encoder/) through the conversion code."""
    cfg, tm, _ = gqa
    folder = tmp_path / "text_encoder"
    tm.save_pretrained(folder, safe_serialization=True)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaModel"]
    cfg_dict, params = conversion.convert_component(folder, "LlamaModel", dtype=np.float32)
    mod, cfg_cls = conversion.model_class("LlamaModel")
    assert mod is llama and cfg_cls is llama.LlamaConfig and cfg_cls.from_dict(cfg_dict) == cfg
    model = mod.build(cfg_cls.from_dict(cfg_dict), params, jnp.float32)
    ids, mask = _inputs()
    _assert_fp32_close(_encode(model, ids, mask).last_hidden_state, _torch(tm, ids, mask).last_hidden_state)


def test_causal_lm_state_dict_converts(gqa):
    """LlamaForCausalLM's keys (model.*, lm_head.weight ignored) and the old rotary_emb.inv_freq buffers."""
    cfg, tm, flat = gqa
    lm = transformers.LlamaForCausalLM(tm.config)
    lm.model.load_state_dict(tm.state_dict())
    sd = state_dict_np(lm)
    assert "lm_head.weight" in sd and all(k.startswith(("model.", "lm_head.")) for k in sd)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = tm.rotary_emb.inv_freq.numpy()
    params = llama.params_from_torch(sd, cfg)
    ref = llama.params_from_torch(flat, cfg)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_bad_checkpoints_are_named(gqa):
    cfg, _, flat = gqa
    sd = dict(flat)
    del sd["layers.2.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.2\.mlp\.up_proj\.weight"):
        llama.params_from_torch(sd, cfg)
    extra = "layers.3.input_layernorm.weight"  # a 4th layer for a 3-layer config
    with pytest.raises(CheckpointError, match=r"unexpected tensors: layers\.3\.input_layernorm\.weight"):
        llama.params_from_torch(dict(flat, **{extra: flat["norm.weight"]}), cfg)
    # Without GQA the checkpoint's k_proj (2 kv heads) has the wrong shape.
    no_gqa = llama.LlamaConfig(**{**cfg.__dict__, "num_key_value_heads": 4})
    with pytest.raises(CheckpointError, match=r"wrong shape: layers\.0\.self_attn\.k_proj\.weight"):
        llama.params_from_torch(flat, no_gqa)


def test_param_count_full_size():
    """HunyuanVideo's text encoder (llava-llama-3-8b's LlamaModel) == transformers' on the meta device."""
    kw = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
              max_position_embeddings=8192)
    with torch.device("meta"):
        tm = transformers.LlamaModel(transformers.LlamaConfig(**kw))
    want = sum(p.numel() for p in tm.parameters())
    cfg = llama.LlamaConfig.from_dict(kw)
    shapes = jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: llama.LlamaModel(cfg, dtype=jnp.bfloat16)), nnx.Param))
    assert sum(int(np.prod(s.shape)) for s in shapes) == want == 7_505_186_816


# --- HunyuanVideo's prompt template ---------------------------------------------------------------

PROMPTS = ["A cat walks on the grass, realistic", "a dog"]


@pytest.fixture(scope="module")
def tok():
    """A Llama-3-like tokenizer trained here on the templated prompts (llama.train_tokenizer)."""
    t = llama.train_tokenizer([llama.HUNYUAN_VIDEO_TEMPLATE["template"].format(p) for p in PROMPTS] * 4)
    assert t.padding_side == "right" and t.convert_ids_to_tokens(t("a dog").input_ids) == [
        "<|begin_of_text|>", "▁a", "▁d", "o", "g"]
    pieces = t.tokenize("<|start_header_id|>user<|end_header_id|>")  # the specials are kept whole
    assert pieces[0] == "<|start_header_id|>" and pieces[-1] == "<|end_header_id|>" and len(pieces) <= 4
    return t


@pytest.fixture(scope="module")
def template_models(tok):
    # transformers' default attention (SDPA, what the pipeline runs); the parity tests above use eager
    tc = _torch_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    tm = randomize_(transformers.LlamaModel(tc), seed=2)
    cfg = llama.LlamaConfig.from_dict(tc.to_dict())
    return tm, llama.build(cfg, llama.params_from_torch(state_dict_np(tm), cfg), jnp.float32)


def _diffusers_embeds(tok, tm, prompts, template, max_sequence_length):
    from diffusers import HunyuanVideoPipeline

    pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=tm)  # all _get_llama_prompt_embeds reads
    with torch.no_grad():
        return HunyuanVideoPipeline._get_llama_prompt_embeds(
            pipe, prompts, template, device=torch.device("cpu"), dtype=torch.float32,
            max_sequence_length=max_sequence_length)


def test_template_is_diffusers():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert llama.HUNYUAN_VIDEO_TEMPLATE == DEFAULT_PROMPT_TEMPLATE


@pytest.mark.parametrize("crop", ["computed", "given"])
def test_prompt_embeds_match_diffusers(tok, template_models, crop):
    """Embeds and mask == diffusers' on the same tokenizer and weights. With this tokenizer the template is 76
    tokens and the templated prompts 89 and 78. "computed": crop_start None (diffusers counts the template's
    tokens: 74), neither prompt truncated; "given": crop_start 70 and a shorter max_sequence_length that
    truncates the longer prompt."""
    tm, model = template_models
    template = dict(llama.HUNYUAN_VIDEO_TEMPLATE)
    if crop == "computed":
        template["crop_start"], msl = None, 20
    else:
        template["crop_start"], msl = 70, 12
    ids, mask, crop_start = llama.tokenize_with_template(tok, PROMPTS, msl, template)
    assert ids.shape == mask.shape == (2, msl + crop_start) and ids[0, 0] == tok.bos_token_id
    if crop == "computed":
        # the template's own tokens (no padding: model_max_length unset) less "{}" and <|eot_id|>
        assert tok.model_max_length > 10 ** 20
        assert crop_start == llama.template_crop_start(tok, template) == len(tok(template["template"]).input_ids) - 2
        assert crop_start != 95
    ref_embeds, ref_mask = _diffusers_embeds(tok, tm, PROMPTS, template, msl)
    embeds, out_mask = llama.llama_prompt_embeds(tok, model, PROMPTS, msl, template)
    assert embeds.shape == (2, msl, 32) and embeds.dtype == jnp.float32
    np.testing.assert_array_equal(out_mask, ref_mask.numpy())
    assert out_mask.sum(1).tolist() == ([15, 4] if crop == "computed" else [12, 8])  # right-padded, truncated
    _assert_fp32_close(embeds, ref_embeds)
    if crop == "given":  # a caller's own encoder function (a pipeline's jitted one) is used as given
        zeros, m = llama.llama_prompt_embeds(tok, model, PROMPTS, msl, template,
                                             encode=lambda i, m: jnp.zeros(i.shape + (3,)) + m[..., None])
        assert zeros.shape == (2, msl, 3) and (np.asarray(zeros)[..., 0] == m).all()


def test_tokenizer_save_load(tok, tmp_path):
    """The stand-in tokenizer round-trips through save_pretrained / AutoTokenizer (a pipeline's tokenizer/)."""
    tok.save_pretrained(tmp_path / "tokenizer")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    texts = [llama.HUNYUAN_VIDEO_TEMPLATE["template"].format(p) for p in PROMPTS]
    a, b = (t(texts, padding="max_length", max_length=100, truncation=True, return_tensors="np") for t in (tok, again))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
    assert again.pad_token_id == tok.pad_token_id and again.padding_side == "right"
