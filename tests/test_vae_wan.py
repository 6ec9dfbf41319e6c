"""Wan VAE decoder == diffusers AutoencoderKLWan.decode (Wan 2.1, and the Wan 2.2 residual variant);
frame-chunked, sharded and tiled decodes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_wan as vae_mod
from xdit_jax.safetensors_io import CheckpointError

# The Wan 2.1 checkpoint's vae/config.json.
RELEASE = {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
           "dropout": 0.0, "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
           "latents_std": [2.8184, 1.4541, 1.6599, 1.4722, 3.7765, 4.1556, 1.6539, 1.0961, 1.5104, 1.1014, 1.6513,
                           1.6289, 1.3929, 1.6766, 1.5003, 1.8734],
           "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16}
# Release-shaped and tiny: 4 up blocks (two temporal upsamplings, so both frame-0 special cases
# run, then one spatial-only), widths 16, 16, 16, 16, 8 with the Wan 2.1 halving (8 -> 16
# conv_shortcuts in blocks 1 and 2), one resnet per block (+1), the mid-block attention.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
# Wan 2.2's variant, smaller still (3 up blocks, one temporal): residual up blocks (DupUp3D
# shortcuts, the first dropping frame 0's first copy), decoder_base_dim, patch_size 2 (8x in all).
TINY_22 = dict(tiny.WAN22_VAE, latents_mean=TINY["latents_mean"], latents_std=TINY["latents_std"])
# 3 latent frames -> 9 frames; an odd 5x7 plane that none of 2, 4, 8 devices or a 2x2 grid divides.
Z_MAIN = (1, 4, 3, 5, 7)
Z_22 = (1, 4, 3, 2, 6)  # -> 5 frames of 16x48 (patched 8x24)


def _torch_vae(kw, seed):
    tv = randomize_(AutoencoderKLWan(**kw), seed=seed, std=0.1)
    with torch.no_grad():  # outputs of O(1), some (1.5% in the main case) clamped to [-1, 1] by the decode
        tv.decoder.conv_out.weight.mul_(5.0)
    return tv


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_decode(tv, z, tiling=None):
    tv.use_tiling = False
    if tiling is not None:
        tv.enable_tiling(tiling.tile_sample_min_height, tiling.tile_sample_min_width,
                         tiling.tile_sample_stride_height, tiling.tile_sample_stride_width)
    try:
        with torch.no_grad():
            return tv.decode(torch.from_numpy(z)).sample.float().numpy()
    finally:
        tv.use_tiling = False


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("frame_chunk", "tiling", "slicing", "mesh", "grid", "strategy"))
def _jax_decode(graphdef, state, z, **kw):
    return vae_mod.decode(nnx.merge(graphdef, state), z, **kw)


def _decode(model, z, **kw):
    graphdef, state = nnx.split(model)
    if kw.get("mesh") is not None:  # as in the pipeline: weights replicated on the pipeline's mesh
        state = jax.device_put(state, NamedSharding(kw["mesh"], PartitionSpec()))
    return np.asarray(_jax_decode(graphdef, state, jnp.asarray(z), **kw).astype(jnp.float32))


@pytest.fixture(scope="session")
def wan21():
    tv = _torch_vae(TINY, seed=3)
    cfg = vae_mod.WanVAEConfig.from_dict(dict(tv.config))
    sd = state_dict_np(tv)
    return tv, cfg, sd, vae_mod.build(cfg, vae_mod.params_from_torch(sd, cfg), jnp.float32)


@pytest.fixture(scope="session")
def main_case(wan21):
    """(z, diffusers' output, our fp32 one-device one-pass output) for Z_MAIN."""
    tv, _, _, model = wan21
    z = _latents(Z_MAIN, seed=1)
    return z, _torch_decode(tv, z), _decode(model, z)


# Same fp32 math in another order (XLA vs oneDNN conv algorithms, another summation order in the
# norms and the attention) through 29 convolutions: measured max abs diff 1.0e-6 on outputs in
# [-1, 1] (1.5% of them clamped). 2e-5 leaves 20x headroom, while any wrong causal padding, frame order, first-frame
# handling or halo shows up at O(0.1..1) (the tiled decode, for one, differs from the plain by 0.2).
TOL = 2e-5


def test_fp32_matches_diffusers(wan21, main_case):
    _, cfg, _, _ = wan21
    z, ref, out = main_case
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 9, 40, 56)
    assert 0.005 < np.mean(np.abs(ref) == 1.0) < 0.3  # the clamp is exercised, most pixels are not clamped
    err = np.abs(out - ref).max()
    assert err < TOL, f"max abs diff {err}"


def test_bf16_matches_diffusers_fp32(wan21, main_case):
    tv, cfg, sd, _ = wan21
    z, ref, _ = main_case
    tb = AutoencoderKLWan(**TINY).to(torch.bfloat16).eval()  # diffusers itself in bf16, same weights
    tb.load_state_dict(tv.state_dict())
    with torch.no_grad():
        ref_bf16 = tb.decode(torch.from_numpy(z).to(torch.bfloat16)).sample.float().numpy()
    model = vae_mod.build(cfg, vae_mod.params_from_torch(sd, cfg, jnp.bfloat16), jnp.bfloat16)
    out = vae_mod.jit_decode(model, jnp.asarray(z))  # the public jitted entry point
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op) on weights, inputs and every
    # activation of 29 convolutions (the RMS normalisation and attention softmax in float32). Measured
    # against the fp32 reference on outputs in [-1, 1]: ours max 0.010, mean 0.0016; diffusers' own
    # bf16 decode max 0.012, mean 0.0019. The bounds (0.05 max, 0.005 mean, and a mean error within 2x
    # of diffusers' bf16 one) still reject any structural error (those are O(0.1..1)).
    err = np.abs(out - ref)
    assert err.max() < 0.05 and err.mean() < 0.005, (err.max(), err.mean())
    assert err.mean() < 2 * np.abs(ref_bf16 - ref).mean()


def test_frame_chunks_equal_one_pass(wan21, main_case):
    """frame_chunk=1 is diffusers' own loop: a 1-frame first chunk (both "Rep" first calls of the
    temporal upsamplers), then two scanned 1-frame chunks carrying every causal conv's last 2 frames."""
    _, _, _, model = wan21
    z, ref, one = main_case
    out = _decode(model, z, frame_chunk=1)
    assert out.shape == one.shape
    # Measured 1.1e-6 against diffusers, 7.2e-7 against the one-pass decode (conv shapes differ).
    assert np.abs(out - ref).max() < TOL and np.abs(out - one).max() < TOL


# 8 devices cannot all get a latent row, so the default grid splits the width 7 over 8 (the last
# block all padding, halos of a 1-column block); a 2x2 grid splits the height 5 as 3 + 2 and the
# width as 4 + 3 (padded both ways, halo corners; the attention gathers its keys over both axes).
SHARD_CASES = [
    ("cfg=2,ulysses=4", None),
    ("ring=2,ulysses=2", (2, 2)),
]


@pytest.mark.parametrize("spec,grid", SHARD_CASES)
def test_sharded_equals_one_device(wan21, main_case, spec, grid):
    _, _, _, model = wan21
    z, ref, one = main_case
    out = _decode(model, z, mesh=build_mesh(spec), grid=grid)
    assert out.shape == one.shape
    # The same fp32 ops on blocks (halo rows are exact copies; the attention's keys are all-gathered);
    # XLA picks conv algorithms per shape. Measured 7.2e-7 (2x2) and 8.3e-7 (8-way); a wrong halo or
    # border gives O(0.1..1).
    err = np.abs(out - one).max()
    assert err < TOL, f"{spec} grid={grid}: max abs diff {err}"
    assert np.abs(out - ref).max() < TOL


@pytest.fixture(scope="session")
def wan22():
    tv = _torch_vae(TINY_22, seed=4)
    cfg = vae_mod.WanVAEConfig.from_dict(dict(tv.config))
    return tv, cfg, vae_mod.build(cfg, vae_mod.params_from_torch(state_dict_np(tv), cfg), jnp.float32)


# Tiles of 24x32 pixels every 16 (Wan 2.2: latent tiles of 3x4 every 2x2 at 8x; blends and kept sizes
# in the patched pixels: 12 - 8 = 4 / 16 - 8 = 8 and 8): the 2x6 latent gives 1 x 3 tiles of two
# shapes (2x4, 2x2), every column overlap blended.
TILES_22 = vae_mod.WanTilingConfig(tile_sample_min_height=24, tile_sample_min_width=32,
                                   tile_sample_stride_height=16, tile_sample_stride_width=16)


def test_wan22_tiled_matches_diffusers_tiled(wan22):
    """Every tile runs the whole decoder (then the blend, crop, unpatchify and clamp), so this is
    also the parity test of the Wan 2.2 decoder."""
    tv, cfg, model = wan22
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio, cfg.patch) == (8, 2, 2)
    z = _latents(Z_22, seed=2)
    plan = TILES_22.plan(8, 2)
    assert plan.tile_latent == (3, 4) and plan.stride == (2, 2)
    assert plan.blend_extent == (4, 8) and plan.row_limit == (8, 8)
    ref = _torch_decode(tv, z, tiling=TILES_22)
    out = _decode(model, z, tiling=TILES_22)
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 5, 16, 48)
    assert np.abs(out - ref).max() < TOL, np.abs(out - ref).max()
    # Measured 3.9e-7. Tiling changes the numbers (each tile attends on its own; 0.099 here): a tiling
    # that did nothing would show.
    assert np.abs(_torch_decode(tv, z) - ref).max() > 1e-2


def test_default_tiling_is_diffusers_default(wan21):
    tv, cfg, _, _ = wan21
    d = vae_mod.default_tiling(cfg)
    assert (d.tile_sample_min_height, d.tile_sample_min_width, d.tile_sample_stride_height,
            d.tile_sample_stride_width) == (tv.tile_sample_min_height, tv.tile_sample_min_width,
                                            tv.tile_sample_stride_height, tv.tile_sample_stride_width)
    plan = d.plan(8)  # Wan 2.1: the integers of diffusers' tiled_decode
    assert plan.tile_latent == (32, 32) and plan.stride == (24, 24)
    assert plan.blend_extent == (64, 64) and plan.row_limit == (192, 192)
    assert not plan.applies(32, 32) and plan.applies(33, 32)


def test_release_config_and_key_map():
    cfg = vae_mod.WanVAEConfig.from_dict(RELEASE)
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio) == (8, 4)
    assert cfg.num_frames(21) == 81 and cfg.num_frames(1) == 1  # 81 frames <- 21 latent frames
    assert vae_mod.decoded_shape(cfg, (1, 16, 21, 60, 104)) == (1, 3, 81, 480, 832)
    assert cfg.latents_std == tuple(RELEASE["latents_std"])
    # Every tensor of the release decoder maps onto ours with its shape: the torch model built on the
    # meta device, its tensors stood in for by zero-stride int8 views (no memory; the key map casts
    # floating arrays only).
    with torch.device("meta"):
        tv = AutoencoderKLWan(**{k: v for k, v in RELEASE.items() if not k.startswith("_")})
    flat = {k: np.broadcast_to(np.zeros((), np.int8), tuple(v.shape)) for k, v in tv.state_dict().items()}
    params = vae_mod.params_from_torch(flat, cfg)  # raises on any missing, unexpected or misshaped tensor
    assert len(jax.tree.leaves(params)) == sum(1 for k in flat if not k.startswith(("encoder.", "quant_conv.")))
    assert params["decoder"]["up_blocks"]["0"]["upsamplers"]["0"]["time_conv"]["kernel"].shape == (3, 1, 1, 384, 768)


def test_conversion_and_unscale(wan21, tmp_path):
    tv, cfg, sd, _ = wan21
    params = vae_mod.params_from_torch(sd, cfg)
    n_ours = len(jax.tree.leaves(params))
    assert n_ours == sum(1 for k in sd if not k.startswith(("encoder.", "quant_conv.")))  # every decoder key
    bad = dict(sd)
    key = "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
    bad[key] = bad[key][:-1]
    with pytest.raises(CheckpointError, match="time_conv.weight"):
        vae_mod.params_from_torch(bad, cfg)
    gone = "decoder.up_blocks.0.upsamplers.0.resample.1.bias"
    with pytest.raises(CheckpointError, match="resample.1.bias"):
        vae_mod.params_from_torch({k: v for k, v in sd.items() if k != gone}, cfg)
    with pytest.raises(CheckpointError, match="unexpected"):
        vae_mod.params_from_torch({**sd, "decoder.extra.weight": np.zeros(1, np.float32)}, cfg)
    # diffusers' Wan pipeline: latents / (1 / latents_std) + latents_mean
    lat = _latents((1, 4, 2, 3, 3), seed=4)
    mean = torch.tensor(tv.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(tv.config.latents_std).view(1, 4, 1, 1, 1)
    ref = (torch.from_numpy(lat) / inv_std + mean).numpy()
    # (XLA's float32 division may round the last bit differently from torch's)
    np.testing.assert_allclose(np.asarray(vae_mod.unscale_latents(cfg, jnp.asarray(lat))), ref, rtol=3e-7, atol=0)
    with pytest.raises(ValueError, match="temperal_downsample"):
        vae_mod.WanVAEConfig.from_dict({"dim_mult": [1, 2], "temperal_downsample": [True, True]})
    with pytest.raises(ValueError, match="scale_factor_temporal"):
        vae_mod.WanVAEConfig.from_dict({**RELEASE, "temperal_downsample": [False, False, True]})
    with pytest.raises(ValueError, match="latents_mean"):
        vae_mod.WanVAEConfig.from_dict({"z_dim": 4})  # diffusers' 16 default statistics
