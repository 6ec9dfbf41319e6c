"""Qwen-Image VAE (AutoencoderKLQwenImage = the Wan 2.1 decoder): one-frame decode == diffusers, the pipeline's
latent unscaling, a vae/ folder converts by its class name, the split over a mesh == one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_qwenimage as vq

# 4 up blocks (two temporal upsamplings: with one frame, both frame-0 special cases), widths 16/16/16/16/8, one
# resnet per block (+1), the mid-block attention; z_dim 4 with its own statistics
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
Z = (2, 4, 1, 5, 7)  # two images, one frame, an odd 5 x 7 plane


@pytest.fixture(scope="module")
def vae():
    tv = randomize_(AutoencoderKLQwenImage(**TINY), seed=3, std=0.1)
    with torch.no_grad():  # outputs of O(1)
        tv.decoder.conv_out.weight.mul_(5.0)
    cfg = vq.QwenImageVAEConfig.from_dict(dict(tv.config))
    return tv, cfg, vq.build(cfg, vq.params_from_torch(state_dict_np(tv), cfg))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",))
def _jdecode(graphdef, state, z, mesh=None):
    return vq.decode(nnx.merge(graphdef, state), z, mesh=mesh)


def _decode(model, z, mesh=None):
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return np.asarray(_jdecode(graphdef, state, jnp.asarray(z), mesh=mesh))


@pytest.fixture(scope="module")
def case(vae):
    tv, _, model = vae
    z = np.random.default_rng(1).standard_normal(Z).astype(np.float32)
    with torch.no_grad():
        ref = tv.decode(torch.from_numpy(z)).sample.numpy()
    return z, ref, _decode(model, z)


def test_config():
    cfg = vq.QwenImageVAEConfig.from_dict({"_class_name": "AutoencoderKLQwenImage", **TINY, "input_channels": 3})
    assert (cfg.in_channels, cfg.out_channels, cfg.spatial_compression_ratio, cfg.z_dim) == (3, 3, 8, 4)
    full = vq.QwenImageVAEConfig.from_dict({})  # diffusers' defaults: Qwen/Qwen-Image's VAE
    assert full.z_dim == 16 and full.base_dim == 96 and len(full.latents_std) == 16
    assert full.latents_mean[:2] == (-0.7571, -0.7089) and full.latents_std[:2] == (2.8184, 1.4541)
    with pytest.raises(ValueError, match="latents_std"):
        vq.QwenImageVAEConfig.from_dict({**TINY, "latents_std": [1.0]})


def test_one_frame_decode_matches_diffusers(case):
    _, ref, out = case
    assert out.shape == ref.shape == (2, 3, 1, 40, 56)
    # fp32 both sides through 29 convolutions, outputs in [-1, 1]: measured 1.9e-7 (Wan's own test: 1.0e-6)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_unscale_as_the_pipeline(vae):
    """QwenImagePipeline: latents / (1 / latents_std) + latents_mean per channel."""
    _, cfg, _ = vae
    z = np.random.default_rng(2).standard_normal(Z).astype(np.float32)
    std, mean = np.array(TINY["latents_std"]).reshape(1, 4, 1, 1, 1), np.array(TINY["latents_mean"]).reshape(
        1, 4, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(vq.unscale_latents(cfg, jnp.asarray(z))), z / (1.0 / std) + mean,
                               rtol=1e-6, atol=1e-6)


def test_vae_folder_converts(vae, case, tmp_path):
    from xdit_jax.conversion import convert_component

    tv, _, _ = vae
    z, _, out = case
    tv.save_pretrained(tmp_path / "vae", safe_serialization=True)
    extras = {}
    cfg_dict, params = convert_component(tmp_path / "vae", "AutoencoderKLQwenImage", extras=extras)
    assert cfg_dict["_class_name"] == "AutoencoderKLQwenImage" and "encoder_params" in extras
    model = vq.build(vq.QwenImageVAEConfig.from_dict(cfg_dict), params)
    np.testing.assert_array_equal(_decode(model, z), out)


@pytest.mark.parametrize("spec", ["ring=2,ulysses=2", pytest.param("ulysses=3", marks=pytest.mark.slow)])
def test_split_over_mesh_equals_one_device(vae, case, spec):
    _, _, model = vae
    z, _, out = case
    # fp32; the halo exchange reproduces the zero padding exactly, only summation order differs: measured 1.6e-7
    np.testing.assert_allclose(_decode(model, z, build_mesh(spec)), out, atol=1e-5, rtol=0)
