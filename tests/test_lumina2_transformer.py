"""Lumina 2 transformer == diffusers Lumina2Transformer2DModel (a batch of captions of different lengths: diffusers'
padded features with encoder_attention_mask, ours with the kept-token counts); its sequence-parallel run == one
device; conversion of a saved folder."""

import jax
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel as TorchModel

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.jax_util import sequence_parallel_forward
from tests.torch_util import state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import lumina2

# 4 query heads of 16 over 2 K/V heads (GQA; RoPE axes 4 + 6 + 6), 2 main layers, 1 refiner layer of each kind,
# LuminaFeedForward 4 x 64 rounded up to 48 -> 288
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
              num_attention_heads=4, num_kv_heads=2, multiple_of=48, ffn_dim_multiplier=None, norm_eps=1e-5,
              axes_dim_rope=[4, 6, 6], axes_lens=[64, 16, 16], cap_feat_dim=24)
# latents 10 x 12: a 5 x 6 patch grid = 30 image tokens; captions of 37 and 10 kept tokens in a 40-token array
LATENT = (10, 12)
LENS = (37, 10)
CAP_LEN = 40


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, lumina2, lumina2.Lumina2Config)


def _inputs(cfg, lens, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(lens), cfg.in_channels, *LATENT)).astype(np.float32)
    caps = rng.standard_normal((len(lens), CAP_LEN, cfg.cap_feat_dim)).astype(np.float32)
    mask = (np.arange(CAP_LEN)[None] < np.asarray(lens)[:, None]).astype(np.int64)
    t = np.array([0.25, 0.875][:len(lens)], np.float32)  # the pipeline's 1 - t / 1000
    return x, t, caps, mask


def _torch(tm, x, t, caps, mask):
    with torch.no_grad():
        return tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(caps), torch.from_numpy(mask),
                  return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    x, t, caps, mask = _inputs(cfg, LENS)
    lens = lumina2.lens_from_mask(mask)
    return (x, t, caps, lens), np.asarray(FWD(model, x, t, caps, lens)), _torch(tm, x, t, caps, mask)


def test_matches_diffusers_with_captions_of_different_lengths(batch2):
    _, ours, ref = batch2
    assert ours.shape == ref.shape == (2, 4, *LATENT)
    # fp32, outputs up to 8.0: measured max |diff| 1.4e-5 (float32 reorderings over 4 blocks; diffusers rotates
    # in float64)
    np.testing.assert_allclose(ours, ref, atol=5e-5, rtol=1e-5)


@pytest.mark.slow  # (the unmasked path: tests/test_lumina2_pipeline.py's one-prompt run against diffusers)
def test_each_prompt_alone_equals_the_batch(pair, batch2):
    """A prompt's output does not depend on the other prompts' caption lengths (the padded keys are masked), and
    diffusers' run of it alone (no mask: one length) is the same."""
    tm, cfg, model = pair
    (x, t, caps, lens), ours, _ = batch2
    alone = np.asarray(FWD(model, x[1:], t[1:], caps[1:, :lens[1]], lens[1:]))
    ref = _torch(tm, x[1:], t[1:], caps[1:, :lens[1]], np.ones((1, lens[1]), np.int64))
    # the same math on other array lengths, outputs up to 8: measured max |diff| 9.7e-6 (to the batch), 9.3e-6
    # (to diffusers alone)
    np.testing.assert_allclose(alone[0], ours[1], atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(alone, ref, atol=5e-5, rtol=1e-5)


@pytest.mark.slow  # (meshes in the default run: the pipeline's cfg=2,ring=2,ulysses=2, the bench's cfg=2,ulysses=3)
def test_sequence_parallel_equals_one_device(pair, batch2):
    _, cfg, model = pair
    (x, t, caps, lens), ours, _ = batch2
    # ring 2 x ulysses 2 with the batch over data (4 heads: one per ulysses device after the K/V repeat; 30 image
    # tokens padded to 32, the 40 caption tokens split 4 ways); ulysses 3 pads the 4 heads to 6 and the tokens to 30
    for spec in ("data=2,ring=2,ulysses=2", "ulysses=3"):
        out = np.asarray(sequence_parallel_forward(model, build_mesh(spec), text=lumina2.TEXT_KEYS)(x, t, caps, lens))
        # float reordering only (outputs up to 8): measured max |diff| 9.3e-6 (data=2,ring=2,ulysses=2), 6.2e-6
        np.testing.assert_allclose(out, ours, atol=5e-5, rtol=1e-5, err_msg=spec)


def test_saved_folder_converts(pair, tmp_path):
    tm, cfg, model = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "Lumina2Transformer2DModel", lumina2, lumina2.Lumina2Config)


def test_refused_configs_masks_and_shapes(pair):
    _, cfg, model = pair
    with pytest.raises(ValueError, match="head dim"):
        lumina2.Lumina2Config.from_dict(dict(CONFIG, axes_dim_rope=[4, 4, 4]))
    with pytest.raises(ValueError, match="num_kv_heads"):
        lumina2.Lumina2Config.from_dict(dict(CONFIG, num_kv_heads=3))
    with pytest.raises(ValueError, match="right padding"):
        lumina2.lens_from_mask(np.array([[0, 1, 1]]))
    with pytest.raises(ValueError, match="axes_lens"):
        lumina2.check_caption_length(64, cfg)
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model(np.zeros((1, 4, 9, 12), np.float32), np.zeros(1, np.float32), np.zeros((1, 3, 24), np.float32))


@pytest.mark.slow
def test_bf16_close_to_fp32(pair, batch2):
    """bf16 weights and activations (norm statistics, RoPE, softmax in fp32) against our fp32 forward."""
    import jax.numpy as jnp

    tm, cfg, _ = pair
    (x, t, caps, lens), ours, _ = batch2
    m16 = lumina2.build(cfg, lumina2.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    out = np.asarray(FWD(m16, x, t, caps, lens)).astype(np.float32)
    # measured 3.0% of the output scale (8.0); diffusers' own bf16 forward is 2.0% off its fp32 one here
    assert np.abs(out - ours).max() < 0.06 * np.abs(ours).max()
