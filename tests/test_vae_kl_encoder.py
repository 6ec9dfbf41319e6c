"""AutoencoderKL encoder == diffusers AutoencoderKL.encode(x).latent_dist (mode and logvar); SD-style (quant_conv,
4 channels) and FLUX-style (no quant_conv, 16 channels, shift); the image plane split over a mesh; conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_kl
from xdit_jax.models import vae_kl_encoder as enc_mod
from xdit_jax.parallel.vae import sharded_encode

# Three levels (4x), two resnets a level; SD-like (quant_conv, 4 latent channels) and FLUX-like (16, shift, none).
BASE = {"block_out_channels": (8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3, "layers_per_block": 2, "norm_num_groups": 4}
CONFIGS = {"sd": dict(BASE, latent_channels=4),
           "flux": dict(BASE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)}
X = (2, 3, 38, 26)  # odd latent sizes after the floor-halving downsamplers: 38 -> 19 -> 9, 26 -> 13 -> 6


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request):
    torch.manual_seed(0)
    tv = randomize_(AutoencoderKL(**CONFIGS[request.param]), seed=5, std=0.1)
    cfg = vae_kl.AutoencoderKLConfig.from_dict(dict(tv.config))
    flat = state_dict_np(tv)
    model = enc_mod.build(cfg, vae_kl.extra_params_from_torch(flat, cfg)["encoder_params"])
    x = np.random.default_rng(1).uniform(-1, 1, X).astype(np.float32)
    with torch.no_grad():
        dist = tv.encode(torch.from_numpy(x)).latent_dist
    return request.param, tv, cfg, model, x, (dist.mode().numpy(), dist.logvar.numpy())


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",))
def _jax_encode(graphdef, state, x, mesh=None):
    return sharded_encode(lambda m, y: enc_mod.encode(m, y), nnx.merge(graphdef, state), x, mesh)


def _encode(model, x, mesh=None):
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _jax_encode(graphdef, state, jnp.asarray(x), mesh=mesh))


def test_matches_diffusers(tiny):
    name, _, cfg, model, x, (mode, logvar) = tiny
    mean, lv = _encode(model, x)
    assert mean.shape == mode.shape == (2, cfg.latent_channels, 9, 6)
    # fp32, the same math in another order through ~20 convolutions, 9 group norms and one attention: measured max
    # abs diff / max|ref| 0.9e-6 .. 1.6e-6 (both configs, mean and logvar); 2e-5 leaves >= 12x headroom, a wrong
    # stride, padding side or missing quant_conv is O(max|ref|).
    for out, ref, what in ((mean, mode, "mean"), (lv, logvar, "logvar")):
        err = np.abs(out - ref).max()
        assert err < 2e-5 * np.abs(ref).max(), f"{name} {what}: max abs diff {err} (|ref| max {np.abs(ref).max()})"
    # diffusers' pipelines (FLUX Kontext's _encode_vae_image) write (mode - shift) * scaling; unscale inverts it
    scaled = np.asarray(enc_mod.scale_latents(cfg, jnp.asarray(mean)))
    shift = cfg.shift_factor or 0.0
    np.testing.assert_allclose(scaled, (mode - shift) * cfg.scaling_factor, rtol=0, atol=1e-5 * np.abs(scaled).max())
    np.testing.assert_allclose(np.asarray(vae_kl.unscale_latents(cfg, jnp.asarray(scaled))), mean, rtol=0,
                               atol=1e-5 * np.abs(mean).max())


def test_mesh_equals_one_device(tiny):
    name, _, _, model, x, _ = tiny
    if name != "flux":
        pytest.skip("one config is enough for the mesh split (the same partitioned ops)")
    one = _encode(model, x)[0]
    out = _encode(model, x, mesh=build_mesh("ulysses=3"))[0]
    # XLA's partitioner splits the (strided) convolutions over 3 devices (9 latent rows: uneven at the pixel level)
    # and reduces the norm statistics across them: the same ops, sums associated differently. Measured 1.4e-6 of
    # max|out|.
    assert out.shape == one.shape
    assert np.abs(out - one).max() < 2e-5 * np.abs(one).max()


def test_conversion_keeps_encoder(tiny):
    name, tv, cfg, _, _, _ = tiny
    flat = state_dict_np(tv)
    params = vae_kl.extra_params_from_torch(flat, cfg)["encoder_params"]
    assert len(jax.tree.leaves(params)) == sum(1 for k in flat if k.startswith(("encoder.", "quant_conv.")))
    assert vae_kl.extra_params_from_torch({k: v for k, v in flat.items() if not k.startswith("encoder.")}, cfg) == {}
    if name == "sd":  # pre-0.14 attention names (query/key/value/proj_attn) load as diffusers renames them
        old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
               .replace(".to_out.0.", ".proj_attn."): v for k, v in flat.items()}
        renamed = vae_kl.extra_params_from_torch(old, cfg)["encoder_params"]
        assert jax.tree.all(jax.tree.map(np.array_equal, renamed, params))
