"""CogVideoX VAE decoder == diffusers AutoencoderKLCogVideoX.decode, chunked decode included."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from tests.torch_util import randomize_
from xdit_jax.models import vae_cogvideox as vae_mod
from xdit_jax.safetensors_io import CheckpointError, load_component_weights, write_safetensors

# Smallest config shaped like the release: 4 blocks (two time-compressing upsamplers, one
# spatial-only, a channel change 16 -> 8 that needs conv_shortcut), groups dividing all widths.
TINY = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4)
# (batch, latent frames): T=1 (one 1-frame chunk), T=3 (one odd 3-frame chunk -> 9 frames),
# T=4 with batch 2 (two even chunks: carried conv cache), T=7 (3 + 2 + 2: odd first chunk, then a
# scan over two chunks). Latents 4x6 -> frames 32x48.
CASES = [(1, 1), (1, 3), (2, 4), (1, 7)]
LATENT_HW = (4, 6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # std 0.1: every weight random (norm scales around 1, non-zero biases) while activations stay
    # O(1..10) through the ~30 layers.
    tv = randomize_(AutoencoderKLCogVideoX(**TINY), seed=3, std=0.1)
    folder = tmp_path_factory.mktemp("vae")
    tv.save_pretrained(folder)
    cfg = vae_mod.CogVideoXVAEConfig.from_json(folder / "config.json")
    return tv, cfg, folder


@pytest.fixture(scope="module")
def model_fp32(ckpt):
    _, cfg, folder = ckpt
    return vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg), jnp.float32)


def _reference(tv, z):
    with torch.no_grad():
        return tv.decode(torch.from_numpy(z)).sample.numpy()


def _latents(b, t, seed):
    return np.random.default_rng(seed).standard_normal((b, TINY["latent_channels"], t) + LATENT_HW
                                                       ).astype(np.float32)


@pytest.mark.parametrize("b,t", CASES)
def test_fp32_matches_diffusers(ckpt, model_fp32, b, t):
    tv, cfg, _ = ckpt
    z = _latents(b, t, seed=t)
    ref = _reference(tv, z)
    out = np.asarray(vae_mod.jit_decode(model_fp32, jnp.asarray(z)))
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape)
    # Same fp32 ops in a different order (conv algorithms, GroupNorm reductions) through ~30
    # layers; outputs reach |x| ~ 10, measured max diff ~1e-5, so 1e-4 leaves 10x headroom while
    # any wrong padding/cache/resize shows up as O(0.1..1).
    err = np.abs(out - ref).max()
    assert err < 1e-4, f"max abs diff {err} (|ref| max {np.abs(ref).max()})"


def test_bf16_smoke(ckpt):
    tv, cfg, folder = ckpt
    model = vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg, jnp.bfloat16),
                          jnp.bfloat16)
    z = _latents(1, 3, seed=11)
    ref = _reference(tv, z)
    out = vae_mod.jit_decode(model, jnp.asarray(z))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op) on weights, inputs and every
    # activation of ~30 layers; errors grow roughly with sqrt(depth) times the activation scale.
    # Measured ~2% of max|ref|; 8% still rejects any structural error (those are O(max|ref|)).
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    assert err < 0.08 * scale, f"max abs diff {err} vs |ref| max {scale}"
    assert np.abs(out - ref).mean() < 0.01 * scale


def test_misshaped_tensor_raises(ckpt, tmp_path):
    _, cfg, folder = ckpt
    flat = load_component_weights(folder)
    key = "decoder.up_blocks.0.resnets.1.conv1.conv.weight"
    flat[key] = flat[key][:, :-1]
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", flat)
    with pytest.raises(CheckpointError, match="conv1.conv.weight"):
        vae_mod.params_from_torch(load_component_weights(tmp_path), cfg)


def test_config_and_keymap(ckpt):
    _, cfg, _ = ckpt
    assert cfg.block_out_channels == (8, 8, 16, 16) and cfg.latent_channels == 4
    assert cfg.num_frames(13) == 49 and cfg.num_frames(1) == 1 and cfg.num_frames(3) == 9
    assert vae_mod.CogVideoXVAEConfig.from_dict({"latent_channels": 16, "_class_name": "x"}).latent_channels == 16
    shapes = vae_mod.expected_shapes(vae_mod.module_fn(cfg))
    assert shapes["decoder"]["up_blocks"][0]["resnets"][1]["conv1"]["conv"]["kernel"].shape == (3, 3, 3, 16, 16)
    assert "post_quant_conv" not in shapes
