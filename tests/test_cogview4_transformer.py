"""CogView4 transformer == diffusers CogView4Transformer2DModel; a text mask == the shorter prompt alone (CFG's halves
of different lengths); its sequence-parallel run == one device; conversion of a saved folder."""

import jax
import numpy as np
import pytest
import torch
from diffusers import CogView4Transformer2DModel as TorchModel

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.jax_util import sequence_parallel_forward
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import cogview4

# the tiny config (2 heads of 16, 2 blocks); latents 10 x 12: a 5 x 6 patch grid (rows read at 0, 3, 6, 9, 12 of the
# 16-row RoPE table), 30 image tokens; 32 text tokens
CONFIG = tiny.COGVIEW4_TRANSFORMER
LATENT = (10, 12)
TEXT = 32


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, cogview4, cogview4.CogView4Config)


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, *LATENT)).astype(np.float32)
    text = rng.standard_normal((2, TEXT, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999.0, 375.0], np.float32)
    orig = np.array([[80.0, 96.0], [1024.0, 768.0]], np.float32)
    target = np.array([[80.0, 96.0], [80.0, 96.0]], np.float32)
    crop = np.array([[0.0, 0.0], [16.0, 32.0]], np.float32)
    return x, text, t, orig, target, crop


@pytest.fixture(scope="module")
def batch(pair):
    tm, cfg, model = pair
    args = _inputs(cfg)
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(a) for a in args), return_dict=False)[0].numpy()
    return args, np.asarray(FWD(model, *args)), ref


def test_matches_diffusers(batch):
    _, ours, ref = batch
    assert ours.shape == ref.shape == (2, 4, *LATENT)
    diff = np.abs(ours - ref).max()
    print(f"CogView4 transformer: max |diff| {diff:.2e} at scale {np.abs(ref).max():.2f}")
    # fp32: measured max |diff| 1.2e-6 at outputs up to 3.1
    assert diff < 2e-5 * np.abs(ref).max()


@pytest.mark.slow  # (the default run covers the mask end to end: tests/test_cogview4_pipeline.py's CFG halves)
def test_text_mask_equals_the_shorter_prompt_alone(pair, batch):
    """Sample 1 with its text cut to 16 tokens, alone == in the batch with 16 masked tokens after them."""
    tm, cfg, model = pair
    (x, text, t, orig, target, crop), _, _ = batch
    alone = np.asarray(FWD(model, x[1:], text[1:, :16], t[1:], orig[1:], target[1:], crop[1:]))
    mask = np.ones((2, TEXT), bool)
    mask[1, 16:] = False
    masked = np.asarray(FWD(model, x, text, t, orig, target, crop, mask))
    # the same math on other array lengths: float order only
    np.testing.assert_allclose(masked[1], alone[0], atol=2e-5, rtol=1e-5)


def test_sequence_parallel_equals_one_device(pair, batch):
    _, cfg, model = pair
    args, ours, _ = batch
    # cfg 2 (the batch) x ring 2 x ulysses 2: 30 image tokens padded to 32, the 32 text tokens split 4 ways
    out = np.asarray(sequence_parallel_forward(model, build_mesh("cfg=2,ring=2,ulysses=2"),
                                               text=cogview4.TEXT_KEYS)(*args))
    np.testing.assert_allclose(out, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_sequence_parallel_ulysses3(pair, batch):
    _, cfg, model = pair
    args, ours, _ = batch
    # ulysses 3: the 2 heads padded to 3, the 30 image tokens split 3 ways, the 32 text tokens padded to 33
    out = np.asarray(sequence_parallel_forward(model, build_mesh("ulysses=3"), text=cogview4.TEXT_KEYS)(*args))
    np.testing.assert_allclose(out, ours, atol=2e-5, rtol=1e-5)


def test_saved_folder_converts(pair, tmp_path):
    tm, cfg, model = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "CogView4Transformer2DModel", cogview4, cogview4.CogView4Config)


def test_refused_shapes(pair):
    _, cfg, model = pair
    with pytest.raises(ValueError, match="multiple of 4"):
        cogview4.CogView4Config.from_dict(dict(CONFIG, attention_head_dim=18))
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model(np.zeros((1, 4, 9, 12), np.float32), np.zeros((1, 3, 32), np.float32), np.zeros(1, np.float32),
              np.zeros(2), np.zeros(2), np.zeros(2))


@pytest.mark.slow
def test_full_size_shapes_match_diffusers_and_transformers():
    """CogView4-6B's transformer and glm-4-9b's GlmModel at full size, built abstractly (nothing allocated): our
    parameter counts == diffusers' / transformers' modules on the meta device (6.37B and 8.78B)."""
    from flax import nnx
    from transformers import GlmConfig, GlmModel

    from xdit_jax.models import glm, llama

    tc = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=28, attention_head_dim=128,
              num_attention_heads=32, text_embed_dim=4096, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128,
              sample_size=128, rope_axes_dim=[256, 256])
    gc = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
              partial_rotary_factor=0.5, rope_theta=10000.0, attention_bias=True, num_hidden_layers=40,
              vocab_size=151552)
    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    with torch.device("meta"):
        tm, gm = TorchModel(**tc), GlmModel(GlmConfig(**gc))
    ours = count(nnx.eval_shape(lambda: cogview4.CogView4Transformer2DModel(cogview4.CogView4Config.from_dict(tc))))
    assert ours == sum(p.numel() for p in tm.parameters()) == 6_369_118_272
    ours = count(nnx.eval_shape(lambda: llama.LlamaModel(glm.GlmConfig.from_dict(dict(gc, model_type="glm")))))
    assert ours == sum(p.numel() for p in gm.parameters()) == 8_779_194_368


@pytest.mark.slow
def test_bf16_close_to_fp32(pair, batch):
    """bf16 weights and activations (norm statistics, RoPE, softmax in fp32) against our fp32 forward."""
    import jax.numpy as jnp

    from tests.torch_util import state_dict_np

    tm, cfg, _ = pair
    args, ours, _ = batch
    m16 = cogview4.build(cfg, cogview4.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16),
                         dtype=jnp.bfloat16)
    out = np.asarray(FWD(m16, *args)).astype(np.float32)
    # measured 0.6% of the output scale (3.1)
    assert np.abs(out - ours).max() < 0.03 * np.abs(ours).max()
