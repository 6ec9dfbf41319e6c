"""Wan VAE encoder == diffusers AutoencoderKLWan.encode(x).latent_dist.mode() (Wan 2.1, and the Wan 2.2 residual
variant with its patchify), one pass over all frames against diffusers' chunked loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from flax import nnx

from tests.test_vae_wan import TINY, TINY_22
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import vae_wan
from xdit_jax.models import vae_wan_encoder as enc
from xdit_jax.safetensors_io import CheckpointError

# (the encoder's residual down blocks need a resnet to change the width: num_res_blocks 1, the release's 2)
TINY_22_ENC = dict(TINY_22, num_res_blocks=1)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run(graphdef, state, x, frame_chunk):
    return enc.encode(nnx.merge(graphdef, state), x, frame_chunk=frame_chunk)


def _ours(model, x, frame_chunk=None):
    graphdef, state = nnx.split(model)
    return np.asarray(_run(graphdef, state, jnp.asarray(x), frame_chunk))


def _pair(kw, seed):
    tv = randomize_(AutoencoderKLWan(**kw), seed=seed, std=0.1)
    cfg = vae_wan.WanVAEConfig.from_dict(dict(tv.config))
    return tv, cfg, enc.build(cfg, enc.params_from_torch(state_dict_np(tv), cfg), jnp.float32)


@pytest.mark.parametrize("kw,frames,size", [(TINY, 9, (32, 48)), (TINY, 1, (16, 24)), (TINY, 7, (16, 16)),
                                            (TINY_22_ENC, 5, (32, 32))],
                         ids=["wan2.1-9-frames", "wan2.1-one-image", "wan2.1-7-frames", "wan2.2-5-frames"])
def test_matches_diffusers(kw, frames, size):
    tv, cfg, model = _pair(kw, seed=7)
    x = np.random.default_rng(frames).uniform(-1, 1, (1, 3, frames) + size).astype(np.float32)
    with torch.no_grad():
        ref = tv.encode(torch.from_numpy(x)).latent_dist.mode().numpy()
    out = _ours(model, x)
    # diffusers' own loop (frame 0, then chunks of 4 in a scan carrying the causal caches): the same latents
    np.testing.assert_allclose(_ours(model, x, frame_chunk=4), ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)
    s, st = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    used = (frames - 1) // 4 * 4  # frames after the first: diffusers' chunks of 4 (of 7 frames the last 2 dropped)
    assert out.shape == ref.shape == (1, cfg.z_dim, used // st + 1, size[0] // s, size[1] // s)
    # fp32 both sides, another summation order through ~20 convolutions: latents of O(1) agree to ~1e-6
    np.testing.assert_allclose(out, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_patchify_inverts_unpatchify():
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 8, 12)).astype(np.float32)
    p = enc.patchify(jnp.asarray(x), 2)
    assert p.shape == (2, 12, 2, 4, 6)
    np.testing.assert_array_equal(np.asarray(vae_wan.unpatchify(p, 2)), x)
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as reference

    np.testing.assert_array_equal(np.asarray(p), reference(torch.from_numpy(x), 2).numpy())


def test_scale_latents_inverts_unscale():
    cfg = vae_wan.WanVAEConfig.from_dict(TINY)
    z = np.random.default_rng(1).standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    scaled = enc.scale_latents(cfg, jnp.asarray(z))
    mean = np.asarray(TINY["latents_mean"], np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(TINY["latents_std"], np.float32).reshape(1, -1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(scaled), (z - mean) * (1 / std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(vae_wan.unscale_latents(cfg, scaled)), z, rtol=1e-5, atol=1e-6)


def test_bad_input():
    tv, cfg, model = _pair(TINY, seed=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        enc.encode(model, jnp.zeros((1, 3, 1, 12, 16)))
    sd = state_dict_np(tv)
    del sd["encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="encoder"):
        enc.params_from_torch(sd, cfg)


@pytest.mark.parametrize("mesh,size", [("cfg=2,ring=3", (32, 48)), ("ring=3", (40, 56))])
def test_sharded_encode_equals_one_device(mesh, size):
    """The encode split over the mesh by XLA's partitioner (image-to-video's, xdit_jax.parallel.vae.sharded_encode):
    the same latents as one device, and the compiled program exchanges halos (collective-permutes) instead of running
    replicated. 6 devices over 4 x 6 latents (a 2 x 3 grid); 3 over 5 x 7 latents: rows the grid does not divide at
    any level."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from xdit_jax.mesh import build_mesh
    from xdit_jax.parallel.vae import sharded_encode

    _, _, model = _pair(TINY, seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 9) + size).astype(np.float32)
    ref = _ours(model, x, frame_chunk=4)
    m = build_mesh(mesh)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, out_shardings=NamedSharding(m, P()))
    def run(state, x):
        return sharded_encode(lambda mdl, v: enc.encode(mdl, v, frame_chunk=4), nnx.merge(graphdef, state), x, m)

    np.testing.assert_allclose(np.asarray(run(state, jnp.asarray(x))), ref, atol=2e-5 * max(1.0, np.abs(ref).max()),
                               rtol=0)
    assert "collective-permute" in run.lower(state, jnp.asarray(x)).compile().as_text()
