"""Z-Image transformer == diffusers ZImageTransformer2DModel (a batch of captions of different lengths: diffusers'
list, our padded array with lengths); its sequence-parallel run == one device; conversion of a saved folder."""

import jax
import numpy as np
import pytest
import torch
from diffusers import ZImageTransformer2DModel as TorchModel

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.jax_util import sequence_parallel_forward
from tests.torch_util import state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import zimage

# 2 heads of 16 (RoPE axes 4 + 6 + 6), 2 main layers, 1 refiner layer of each kind
CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, rope_theta=256.0, t_scale=1000.0,
              axes_dims=[4, 6, 6], axes_lens=[128, 16, 16])
# latents 10 x 12: a 5 x 6 patch grid = 30 image tokens, padded to 32 with x_pad_token; captions of 37 and 10 tokens
# (padded to 64 and 32 with cap_pad_token: diffusers' unified sequences of 96 and 64 tokens, the shorter masked)
LATENT = (10, 12)
LENS = (37, 10)


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, zimage, zimage.ZImageConfig)


def _inputs(cfg, lens, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(lens), cfg.in_channels, *LATENT)).astype(np.float32)
    caps = [rng.standard_normal((n, cfg.cap_feat_dim)).astype(np.float32) for n in lens]
    t = np.array([0.25, 0.875][:len(lens)], np.float32)  # the pipeline's (1000 - t) / 1000
    return x, t, caps


def _torch(tm, x, t, caps):
    with torch.no_grad():
        out = tm([torch.from_numpy(xi)[:, None] for xi in x], torch.from_numpy(t),
                 [torch.from_numpy(c) for c in caps], return_dict=False)[0]
    return np.stack([o[:, 0].numpy() for o in out])


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    x, t, caps = _inputs(cfg, LENS)
    feats, lens = zimage.pad_caption_list(caps)
    return (x, t, feats, lens), np.asarray(FWD(model, x, t, feats, lens)), _torch(tm, x, t, caps)


def test_matches_diffusers_with_captions_of_different_lengths(batch2):
    _, ours, ref = batch2
    assert ours.shape == ref.shape == (2, 4, *LATENT)
    # fp32, outputs up to 9.5: measured max |diff| 1.2e-4. Most of it is the timestep sinusoid: torch's float32 exp
    # rounds 3 of the 128 frequencies otherwise than ours (correctly rounded), and at t x 1000 = 875 that moves the
    # angles by ~5e-5 (2.4e-5 on the features); with the same frequencies in diffusers the difference is 4.2e-5,
    # while diffusers fp32 itself is 2.8e-5 off its fp64 run.
    np.testing.assert_allclose(ours, ref, atol=3e-4, rtol=1e-5)


def test_each_prompt_alone_equals_the_batch(pair, batch2):
    """A prompt's output does not depend on the other prompts' caption lengths (the padded keys are masked)."""
    tm, cfg, model = pair
    (x, t, feats, lens), ours, _ = batch2
    alone = np.asarray(FWD(model, x[1:], t[1:], feats[1:, :lens[1]], lens[1:]))
    # the same math on other array lengths (other float orders in XLA's kernels), outputs up to ~6: measured max
    # |diff| 4.0e-5
    np.testing.assert_allclose(alone[0], ours[1], atol=1e-4, rtol=1e-5)


def test_sequence_parallel_equals_one_device(pair, batch2):
    _, cfg, model = pair
    (x, t, feats, lens), ours, _ = batch2
    # ring 2 x ulysses 2 (2 heads: no padding of heads; 32 image tokens and the 64 caption tokens split 4 ways)
    # with the batch over data; ulysses 3 pads the 2 heads to 3 and the 32 image tokens to 33
    for spec in ("data=2,ring=2,ulysses=2", "ulysses=3"):
        out = np.asarray(sequence_parallel_forward(model, build_mesh(spec), text=zimage.TEXT_KEYS)(x, t, feats, lens))
        # float reordering only (outputs up to 9.5): measured max |diff| 4.0e-5
        np.testing.assert_allclose(out, ours, atol=1e-4, rtol=1e-5, err_msg=spec)


def test_saved_folder_converts(pair, tmp_path):
    tm, cfg, model = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "ZImageTransformer2DModel", zimage, zimage.ZImageConfig)


def test_refused_variants_and_shapes(pair):
    _, cfg, model = pair
    with pytest.raises(ValueError, match="Omni"):
        zimage.ZImageConfig.from_dict(dict(CONFIG, siglip_feat_dim=16))
    with pytest.raises(ValueError, match="patching"):
        zimage.ZImageConfig.from_dict(dict(CONFIG, all_patch_size=(2, 1), all_f_patch_size=(1, 1)))
    x = np.zeros((1, 4, 9, 12), np.float32)
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model(x, np.zeros(1, np.float32), np.zeros((1, 3, 24), np.float32))


def test_bf16_close_to_fp32(pair, batch2):
    """bf16 weights and activations (norm statistics, RoPE, softmax in fp32) against our fp32 forward."""
    import jax.numpy as jnp

    tm, cfg, _ = pair
    (x, t, feats, lens), ours, _ = batch2
    m16 = zimage.build(cfg, zimage.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    out = np.asarray(FWD(m16, x, t, feats, lens)).astype(np.float32)
    # measured 3.5% of the output scale (9.5); diffusers' own bf16 forward is 3.0% off its fp32 one here
    assert np.abs(out - ours).max() < 0.06 * np.abs(ours).max()
