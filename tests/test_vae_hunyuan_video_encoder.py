"""HunyuanVideo VAE encoder == diffusers AutoencoderKLHunyuanVideo.encode(x).latent_dist.mode(); framewise, mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_hunyuan_video as dec_mod
from xdit_jax.models import vae_hunyuan_video_encoder as enc_mod

# The decoder tests' tiny config (4 blocks: 8x in space, 4x in time).
TINY = {"latent_channels": 4, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
X_MAIN = (1, 3, 9, 40, 24)   # 9 frames -> 3 latent frames of 5 x 3 (non-square, uneven over 2 devices)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tv = randomize_(AutoencoderKLHunyuanVideo(**TINY), seed=3, std=0.1)
    cfg = dec_mod.HunyuanVideoVAEConfig.from_dict(dict(tv.config))
    flat = state_dict_np(tv)
    model = enc_mod.build(cfg, dec_mod.extra_params_from_torch(flat, cfg)["encoder_params"])
    return tv, cfg, model


def _video(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _torch_encode(tv, x):
    with torch.no_grad():
        return tv.encode(torch.from_numpy(x)).latent_dist.mode().numpy()


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",))
def _jax_encode(graphdef, state, x, **kw):
    return enc_mod.encode(nnx.merge(graphdef, state), x, **kw)


def _encode(model, x, **kw):
    graphdef, state = nnx.split(model)
    return np.asarray(_jax_encode(graphdef, state, jnp.asarray(x), **kw))


def _close(out, ref, what):
    # fp32, the same math in another order through ~15 convolutions and one attention: measured max abs diff
    # / max|ref| 1.4e-6 (9 frames), 2.4e-6 (1 frame), 7.5e-7 (21 frames, framewise); 5e-5 leaves >= 20x headroom,
    # a wrong stride, padding or mask is O(max|ref|).
    err = np.abs(out - ref).max()
    assert err < 5e-5 * np.abs(ref).max(), f"{what}: max abs diff {err} (|ref| max {np.abs(ref).max()})"


@pytest.fixture(scope="module")
def main_case(tiny):
    tv, _, model = tiny
    x = _video(X_MAIN, 1)
    return x, _torch_encode(tv, x), _encode(model, x)


def test_matches_diffusers(tiny, main_case):
    _, cfg, _ = tiny
    x, ref, out = main_case
    assert out.shape == ref.shape == (1, 4, 3, 5, 3)
    assert enc_mod.downsample_factors(cfg) == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))
    _close(out, ref, "9 frames")


def test_mesh_equals_one_device(main_case, tiny):
    _, _, model = tiny
    x, _, one = main_case
    out = _encode(model, x, mesh=build_mesh("data=2"))
    # XLA's partitioner splits the (strided) convolutions and reduces the norm statistics across devices: the same
    # ops, sums associated differently. Measured 1.3e-6 of max|out| (1.5e-6 on 3 devices).
    assert out.shape == one.shape
    assert np.abs(out - one).max() < 5e-5 * np.abs(one).max()


@pytest.mark.slow
def test_one_frame_and_framewise_match_diffusers(tiny):
    """One frame (an image: image-to-video's conditioning); 21 > 16 frames: diffusers' default temporal tiles
    (17 frames at 0, 9 at 12), blended over one latent frame."""
    tv, _, model = tiny
    for shape, latent_frames in (((1, 3, 1, 16, 24), 1), ((1, 3, 21, 16, 8), 6)):
        x = _video(shape, 2)
        ref = _torch_encode(tv, x)
        out = _encode(model, x)
        assert out.shape == ref.shape and out.shape[2] == latent_frames
        _close(out, ref, f"{shape[2]} frames")


def test_conversion_keeps_encoder(tiny):
    tv, cfg, _ = tiny
    flat = state_dict_np(tv)
    params = dec_mod.extra_params_from_torch(flat, cfg)["encoder_params"]
    assert len(jax.tree.leaves(params)) == sum(1 for k in flat if k.startswith(("encoder.", "quant_conv.")))
    assert dec_mod.extra_params_from_torch({k: v for k, v in flat.items() if not k.startswith("encoder.")}, cfg) == {}
