"""Parity of xdit_jax.models.clip's vision tower with transformers' CLIPVisionModel /
CLIPVisionModelWithProjection on tiny random checkpoints (both activations): every output, every
hidden state, the penultimate-layer shortcut; its checkpoint tables (hub / transformers 4 prefixed
keys, transformers 5's unprefixed ones, a WithProjection file read as CLIPVisionModel), the conversion
registration, random-weight loading, bad input, and a bf16 smoke test."""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import conversion
from xdit_jax.keymap import to_pure_dict
from xdit_jax.models import clip
from xdit_jax.safetensors_io import CheckpointError, load_component_weights, write_safetensors

N_LAYERS = 3
IMAGE, PATCH = 28, 14  # 2 x 2 patches + the class token: 5 tokens
BATCH = 2
ACTS = ["gelu", "quick_gelu"]  # laion (Wan 2.1's ViT-H/14) and openai CLIP


def _torch_config(act: str) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_channels=3, image_size=IMAGE, patch_size=PATCH, hidden_act=act, layer_norm_eps=1e-5)


@dataclasses.dataclass
class Variant:
    cfg: clip.CLIPVisionWithProjectionConfig
    tm: transformers.CLIPVisionModelWithProjection
    flat: dict  # its state dict: vision_model.* keys and visual_projection.weight (the hub's layout)
    pixels: np.ndarray  # (B, 3, IMAGE, IMAGE)
    ref: object  # tm(pixels, output_hidden_states=True)
    ref_pooled: torch.Tensor  # the CLIPVisionModel inside: its pooler_output
    model: clip.CLIPVisionModelWithProjection  # ours, fp32, from `flat`


@pytest.fixture(scope="module", params=ACTS)
def variant(request) -> Variant:
    tc = _torch_config(request.param)
    torch.manual_seed(0)
    tm = randomize_(transformers.CLIPVisionModelWithProjection(tc), seed=1)
    flat = state_dict_np(tm)
    pixels = np.random.default_rng(2).standard_normal((BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.tensor(pixels), output_hidden_states=True)
        ref_pooled = tm.vision_model(torch.tensor(pixels)).pooler_output
    cfg = clip.CLIPVisionWithProjectionConfig.from_dict(tc.to_dict())
    model = clip.build(cfg, clip.params_from_torch(flat, cfg), jnp.float32)
    return Variant(cfg, tm, flat, pixels, ref, ref_pooled, model)


@partial(jax.jit, static_argnames=("graphdef", "how"))
def _run(graphdef, state, pixels, how):
    model = nnx.merge(graphdef, state)
    if how == "penultimate":
        return model.penultimate(pixels)
    if isinstance(how, int):  # one entry of hidden_states
        return model.hidden_state(pixels, how)
    return model(pixels, output_hidden_states=how == "all")


def _encode(model, pixels, how="all"):
    """The pipelines' pattern: split once, jit over the state (one compile per model structure)."""
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, jnp.asarray(pixels), how)


def _assert_fp32_close(out, ref):
    # Scales here: LayerNorm'd states and the projection are O(1) (max |value| 2-3); the raw residual
    # stream in hidden_states grows to ~12 by layer 3. Two fp32 implementations of this 3-layer net differ
    # by accumulated rounding, measured <= 4e-6 absolute (<= 4e-7 of the scale, both activations); 1e-5 of
    # the scale (at least 1e-5 absolute) leaves a 25x margin and still catches a real mistake (the other
    # activation moves image_embeds by 3e-2; a wrong eps, a causal mask or a transposed patch kernel by more).
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    diff, scale = np.abs(out - ref).max(), np.abs(ref).max()
    assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)


def test_config_from_dict():
    defaults = transformers.CLIPVisionConfig().to_dict()
    cfg = clip.CLIPVisionConfig.from_dict(defaults)
    assert cfg == clip.CLIPVisionConfig()  # our defaults are transformers'
    for f in dataclasses.fields(cfg):
        assert getattr(cfg, f.name) == defaults[f.name], f.name
    assert (cfg.num_patches, cfg.num_positions, cfg.head_dim) == (49, 50, 64)
    assert not cfg.with_projection and clip.CLIPVisionWithProjectionConfig.from_dict({}).with_projection
    # The dimensions of Wan 2.1 image-to-video's image_encoder (laion CLIP ViT-H/14; written here, not copied
    # from the hub file), with keys transformers writes that we ignore.
    wan = clip.CLIPVisionConfig.from_dict({
        "architectures": ["CLIPVisionModelWithProjection"], "attention_dropout": 0.0, "dropout": 0.0,
        "hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 32,
        "patch_size": 14, "projection_dim": 1024, "torch_dtype": "float32", "transformers_version": "4.48.0.dev0"})
    assert (wan.num_positions, wan.head_dim, wan.num_hidden_layers, wan.hidden_act) == (257, 80, 32, "gelu")
    full = transformers.CLIPConfig().to_dict()  # a full CLIPModel: text and vision towers
    with pytest.raises(ValueError, match="vision_config"):
        clip.CLIPVisionConfig.from_dict(full)
    for bad, match in (({"model_type": "clip_text_model"}, "model_type"), ({"hidden_act": "gelu_new"}, "hidden_act"),
                       ({"hidden_size": 30, "num_attention_heads": 4}, "multiple"),
                       ({"image_size": 14, "patch_size": 16}, "patch_size"), ({"patch_size": 0}, "patch_size")):
        with pytest.raises(ValueError, match=match):
            clip.CLIPVisionConfig.from_dict(bad)
    with pytest.raises(ValueError, match="model_type"):  # and the text config refuses a vision one
        clip.CLIPTextConfig.from_dict(_torch_config("gelu").to_dict())


def test_fp32_matches_transformers(variant):
    v = variant
    assert isinstance(v.model, clip.CLIPVisionModelWithProjection)
    out = _encode(v.model, v.pixels)
    assert out.image_embeds.shape == (BATCH, v.cfg.projection_dim) and out.image_embeds.dtype == jnp.float32
    assert out.last_hidden_state.shape == (BATCH, v.cfg.num_positions, v.cfg.hidden_size) == (BATCH, 5, 32)
    _assert_fp32_close(out.image_embeds, v.ref.image_embeds)
    _assert_fp32_close(out.pooler_output, v.ref_pooled)
    _assert_fp32_close(out.last_hidden_state, v.ref.last_hidden_state)
    # transformers' hidden_states: pre_layrnorm(embeddings), then each layer's output; the last one is
    # last_hidden_state (post_layernorm only touches the pooled class token).
    assert len(out.hidden_states) == len(v.ref.hidden_states) == N_LAYERS + 1
    for ours, theirs in zip(out.hidden_states, v.ref.hidden_states):
        _assert_fp32_close(ours, theirs)
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state))

    # The penultimate shortcut (N - 1 layers): what Wan 2.1's image conditioning takes.
    pen = _encode(v.model, v.pixels, "penultimate")
    assert pen.shape == out.hidden_states[-2].shape and pen.dtype == jnp.float32
    _assert_fp32_close(pen, v.ref.hidden_states[-2])
    np.testing.assert_allclose(np.asarray(pen), np.asarray(out.hidden_states[-2]), rtol=0, atol=1e-6)
    for i in (0, 1):  # no layer run; one of three
        np.testing.assert_allclose(np.asarray(_encode(v.model, v.pixels, i)), np.asarray(out.hidden_states[i]),
                                   rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        v.model.hidden_state(v.pixels, N_LAYERS + 1)


def test_with_projection_checkpoint_loads_as_vision_model(variant):
    """Wan's model_index.json names CLIPVisionModel; its weights may hold visual_projection.weight (ignored)."""
    v = variant
    cfg = clip.CLIPVisionConfig.from_dict(v.tm.config.to_dict())
    assert "visual_projection.weight" in v.flat
    model = clip.build(cfg, clip.params_from_torch(v.flat, cfg), jnp.float32)
    assert isinstance(model, clip.CLIPVisionModel) and not hasattr(model, "visual_projection")
    out = _encode(model, v.pixels, "pooled")
    assert out.hidden_states is None and out[0] is out.last_hidden_state
    _assert_fp32_close(out.pooler_output, v.ref_pooled)
    _assert_fp32_close(out.last_hidden_state, v.ref.last_hidden_state)
    _assert_fp32_close(_encode(model, v.pixels, "penultimate"), v.ref.hidden_states[-2])


def test_transformers5_saved_vision_model_loads(variant, tmp_path):
    """transformers 5's CLIPVisionModel.save_pretrained writes keys without ``vision_model.``; with the old
    ``position_ids`` buffer added, through the conversion code. Its WithProjection keeps the prefix."""
    v = variant
    folder = tmp_path / "image_encoder"
    v.tm.vision_model.save_pretrained(folder, safe_serialization=True)
    flat = load_component_weights(folder)
    assert clip.is_unprefixed(flat, "vision_model") and "pre_layrnorm.weight" in flat
    flat["embeddings.position_ids"] = np.arange(v.cfg.num_positions, dtype=np.int64)[None]
    write_safetensors(folder / "model.safetensors", flat)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
    cfg_dict, params = conversion.convert_component(folder, "CLIPVisionModel", dtype=np.float32)
    mod, cfg_cls = conversion.model_class("CLIPVisionModel")
    assert mod is clip and cfg_cls is clip.CLIPVisionConfig
    model = mod.build(cfg_cls.from_dict(cfg_dict), params, jnp.float32)
    _assert_fp32_close(_encode(model, v.pixels, "pooled").pooler_output, v.ref_pooled)
    # Unprefixed weights hold no projection: read as WithProjection, it is missing.
    with pytest.raises(CheckpointError, match=r"missing tensors: visual_projection\.weight"):
        clip.params_from_torch(flat, v.cfg)

    folder = tmp_path / "image_encoder_proj"
    v.tm.save_pretrained(folder, safe_serialization=True)
    sd = load_component_weights(folder)
    assert "visual_projection.weight" in sd and not clip.is_unprefixed(sd, "vision_model")
    sd["vision_model.embeddings.position_ids"] = np.arange(v.cfg.num_positions, dtype=np.int64)[None]
    write_safetensors(folder / "model.safetensors", sd)
    for name in ("CLIPVisionModelWithProjection", "CLIPVisionModel"):
        cfg_dict, params = conversion.convert_component(folder, name, dtype=np.float32)
        mod, cfg_cls = conversion.model_class(name)
        model = mod.build(cfg_cls.from_dict(cfg_dict), params, jnp.float32)
        assert type(model).__name__ == name
        _assert_fp32_close(_encode(model, v.pixels, "pooled").pooler_output, v.ref_pooled)


@pytest.mark.parametrize("name", ["vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight",
                                  "vision_model.embeddings.patch_embedding.weight",
                                  "vision_model.encoder.layers.2.mlp.fc1.bias", "visual_projection.weight"])
def test_missing_tensor_is_named(variant, name):
    sd = dict(variant.flat)
    del sd[name]
    with pytest.raises(CheckpointError, match="missing tensors: " + name.replace(".", r"\.")):
        clip.params_from_torch(sd, variant.cfg)


def test_unexpected_and_misshaped_tensors_are_named(variant):
    cfg, flat = variant.cfg, variant.flat
    extra = "vision_model.encoder.layers.3.self_attn.q_proj.weight"  # a 4th layer for a 3-layer config
    sd = dict(flat, **{extra: flat["vision_model.encoder.layers.0.self_attn.q_proj.weight"]})
    with pytest.raises(CheckpointError, match="unexpected tensors: " + extra.replace(".", r"\.")):
        clip.params_from_torch(sd, cfg)
    big = dataclasses.replace(cfg, image_size=2 * IMAGE)  # 17 positions, not 5
    with pytest.raises(CheckpointError, match=r"wrong shape: vision_model\.embeddings\.position_embedding\.weight"):
        clip.params_from_torch(flat, big)


def test_bad_pixel_values_raise(variant):
    model = variant.model
    with pytest.raises(ValueError, match="image size"):
        model(np.zeros((1, 3, IMAGE + 4, IMAGE + 4), np.float32))
    with pytest.raises(ValueError, match="image size"):
        model.penultimate(np.zeros((1, 3, IMAGE, IMAGE - 14), np.float32))
    with pytest.raises(ValueError, match="channels first"):
        model(np.zeros((1, IMAGE, IMAGE, 3), np.float32))


def test_random_weights_from_config(variant, tmp_path):
    """Random-weight loading (PipelineBase.from_config): build(cfg, {}) gives the abstract shapes."""
    from xdit_jax.pipelines.denoise import random_component

    cfg = variant.cfg
    abstract = to_pure_dict(nnx.state(clip.build(cfg, {}, jnp.bfloat16), nnx.Param))
    tower = abstract["vision_model"]
    assert tower["embeddings"]["patch_embedding"]["kernel"].shape == (PATCH, PATCH, 3, 32)
    assert tower["embeddings"]["class_embedding"].shape == (32,)
    assert tower["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (N_LAYERS, 32, 64)
    assert abstract["visual_projection"]["kernel"].shape == (32, 24)
    assert all(isinstance(a, jax.ShapeDtypeStruct) and a.dtype == jnp.bfloat16 for a in jax.tree.leaves(abstract))

    (tmp_path / "model_index.json").write_text(json.dumps({"image_encoder": ["transformers", "CLIPVisionModel"]}))
    (tmp_path / "image_encoder").mkdir()
    (tmp_path / "image_encoder" / "config.json").write_text(variant.tm.config.to_json_string())
    got_cfg, model = random_component(tmp_path, "image_encoder", jnp.float32, None)
    assert isinstance(model, clip.CLIPVisionModel) and got_cfg.num_positions == 5
    assert np.isfinite(np.asarray(_encode(model, variant.pixels, "penultimate"))).all()


def test_bf16_close_to_fp32(variant):
    v = variant
    model = clip.build(v.cfg, clip.params_from_torch(v.flat, v.cfg, jnp.bfloat16), jnp.bfloat16)
    out = _encode(model, v.pixels)
    pen = _encode(model, v.pixels, "penultimate")
    assert out.image_embeds.dtype == out.last_hidden_state.dtype == pen.dtype == jnp.bfloat16
    # bf16 keeps an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3); the weights, the pixels, every matmul
    # input and every layer's output are rounded and the errors add up over 3 layers: measured max errors
    # are at most 1.0% of each output's scale and mean errors at most 1.3% of its mean |value| (both
    # activations). The 3% bounds leave > 2x room and still fail on a gross mistake (a wrong layer or token
    # moves outputs by O(1)); fine-grained parity is the fp32 test's job.
    for ours, theirs in ((out.last_hidden_state, v.ref.last_hidden_state), (out.image_embeds, v.ref.image_embeds),
                         (pen, v.ref.hidden_states[-2]), (out.hidden_states[0], v.ref.hidden_states[0])):
        ours, theirs = np.asarray(ours, np.float32), theirs.numpy()
        assert np.isfinite(ours).all()
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 3e-2 * scale, (np.abs(ours - theirs).max(), scale)
        assert np.abs(ours - theirs).mean() <= 3e-2 * np.abs(theirs).mean()
