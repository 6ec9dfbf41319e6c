"""Tiled and sliced VAE decode == diffusers' ``enable_tiling`` / ``enable_slicing`` decode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_cogvideox as vae_mod
from xdit_jax.parallel import vae as pvae

# The tiny release-shaped VAE of test_vae_cogvideox (4 blocks, 8x spatial, 4x temporal).
TINY = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, sample_height=64, sample_width=96)
# Tiles of 4x5 latents (32x40 pixels), strides 3 and 4, blends of 8 pixels, kept 24x32: a 7x9
# latent gives 3 x 3 tiles of four shapes (4x5, 4x1, 1x5, 1x1), every overlap blended.
SMALL_TILES = vae_mod.TilingConfig(tile_sample_min_height=32, tile_sample_min_width=40,
                                   tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 5)


@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    sd = state_dict_np(randomize_(AutoencoderKLCogVideoX(**TINY), seed=5, std=0.1))
    cfg = vae_mod.CogVideoXVAEConfig.from_dict(TINY)
    model = vae_mod.build(cfg, vae_mod.params_from_torch(sd, cfg))
    return sd, model


def _fresh_torch(sd):
    """A new diffusers VAE: enable_tiling() keeps values set before, so never reuse one."""
    tv = AutoencoderKLCogVideoX(**TINY)
    tv.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return tv.eval()


def _torch_decode(sd, z, tiling=None, slicing=False):
    tv = _fresh_torch(sd)
    if tiling is not None:
        tv.enable_tiling(**({} if tiling is True else dict(
            tile_sample_min_height=tiling.tile_sample_min_height, tile_sample_min_width=tiling.tile_sample_min_width,
            tile_overlap_factor_height=tiling.tile_overlap_factor_height,
            tile_overlap_factor_width=tiling.tile_overlap_factor_width)))
    if slicing:
        tv.enable_slicing()
    with torch.no_grad():
        return tv.decode(torch.from_numpy(z)).sample.numpy()


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("tiling", "slicing", "mesh"))
def _jax_decode(graphdef, state, z, tiling=None, slicing=False, mesh=None):
    return vae_mod.decode(nnx.merge(graphdef, state), z, tiling=tiling, slicing=slicing, mesh=mesh)


def _decode(model, z, **kw):
    graphdef, state = nnx.split(model)
    return np.asarray(_jax_decode(graphdef, state, jnp.asarray(z), **kw))


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_plan_matches_diffusers_integers(vaes):
    tv = _fresh_torch(vaes[0])
    tv.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=40, tile_overlap_factor_height=1 / 4,
                     tile_overlap_factor_width=1 / 5)
    plan = SMALL_TILES.plan(8)
    assert plan.tile_latent == (tv.tile_latent_min_height, tv.tile_latent_min_width) == (4, 5)
    assert plan.stride == (3, 4) and plan.blend_extent == (8, 8) and plan.row_limit == (24, 32)
    d = vae_mod.default_tiling(vae_mod.CogVideoXVAEConfig.from_dict(TINY))
    tv = _fresh_torch(vaes[0])
    assert (d.tile_sample_min_height, d.tile_sample_min_width) == (tv.tile_sample_min_height,
                                                                   tv.tile_sample_min_width) == (32, 48)
    assert (d.tile_overlap_factor_height, d.tile_overlap_factor_width) == (tv.tile_overlap_factor_height,
                                                                           tv.tile_overlap_factor_width)


def test_tiled_matches_diffusers_tiled(vaes):
    sd, model = vaes
    z = _latents((1, 4, 3, 7, 9), seed=1)  # one odd 3-frame chunk per tile -> 9 frames of 56x72
    ref = _torch_decode(sd, z, tiling=SMALL_TILES)
    out = _decode(model, z, tiling=SMALL_TILES)
    assert out.shape == ref.shape == (1, 3, 9, 56, 72)
    err = np.abs(out - ref).max()
    assert err < 1e-4, f"max abs diff {err}"
    # Tiling changes the numbers (each tile normalises on its own): the test would see it.
    plain = _torch_decode(sd, z)
    assert np.abs(plain - ref).max() > 1e-2


def test_default_tiling_with_slicing_and_time_chunks(vaes):
    """enable_tiling() defaults + enable_slicing on a batch of 2 with carried time chunks (T=5)."""
    sd, model = vaes
    z = _latents((2, 4, 5, 7, 4), seed=2)  # taller than the default 4x6 latent tile: 3 x 1 tiles
    ref = _torch_decode(sd, z, tiling=True, slicing=True)
    out = _decode(model, z, tiling=True, slicing=True)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err < 1e-4, f"max abs diff {err}"


def test_small_latent_is_not_tiled(vaes):
    """As in diffusers, a latent no larger than a tile decodes plainly."""
    sd, model = vaes
    z = _latents((1, 4, 1, 4, 5), seed=3)
    ref = _torch_decode(sd, z)
    np.testing.assert_allclose(_decode(model, z, tiling=SMALL_TILES), ref, atol=1e-4, rtol=0)


@pytest.mark.slow  # tiling (vs diffusers) and the mesh split (test_vae_parallel) are each in the default run
def test_tiled_on_mesh_equals_tiled_on_one_device(vaes):
    """Tiles decoded spatially sharded over 4 devices (3 does not divide their heights)."""
    _, model = vaes
    z = _latents((1, 4, 3, 7, 9), seed=1)
    one = _decode(model, z, tiling=SMALL_TILES)
    out = _decode(model, z, tiling=SMALL_TILES, mesh=build_mesh("ring=2,ulysses=2"))
    assert np.abs(out - one).max() < 1e-4


def test_blend_is_diffusers_blend():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 5, 6)).astype(np.float32), rng.standard_normal((2, 3, 4, 7)).astype(np.float32)
    tv = AutoencoderKLCogVideoX.__new__(AutoencoderKLCogVideoX)
    for extent in (0, 3, 9):
        ref_v = tv.blend_v(torch.from_numpy(a[:, :, None, :, :6].copy()),
                           torch.from_numpy(b[:, :, None, :, :6].copy()), extent).numpy()[:, :, 0]
        np.testing.assert_allclose(np.asarray(pvae._blend(jnp.asarray(a[..., :6]), jnp.asarray(b[..., :6]), extent, -2)),
                                   ref_v, atol=1e-6)
        ref_h = tv.blend_h(torch.from_numpy(a[:, :, None, :4].copy()), torch.from_numpy(b[:, :, None].copy()),
                           extent).numpy()[:, :, 0]
        np.testing.assert_allclose(np.asarray(pvae._blend(jnp.asarray(a[:, :, :4]), jnp.asarray(b), extent, -1)),
                                   ref_h, atol=1e-6)
