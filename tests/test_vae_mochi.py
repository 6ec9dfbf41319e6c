"""Mochi VAE decoder == diffusers AutoencoderKLMochi.decode; sharded, tiled and sliced decodes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLMochi
from flax import nnx

from tests.torch_util import randomize_
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_mochi as vae_mod
from xdit_jax.parallel import vae as pvae
from xdit_jax.safetensors_io import (
    CheckpointError,
    load_component_weights,
    write_safetensors,
)

# Smallest config shaped like the release: 3 up blocks expanding time 3x, 2x, 1x and space 2x
# each (6x frames, 8x pixels), widths that are multiples of GroupNorm's 32 groups with one
# change (64 -> 32) across a projection, one block with 2 resnets so that a wrong
# layers_per_block index fails the key map. The encoder (ignored) is the smallest diffusers builds.
TINY = {"encoder_block_out_channels": (32, 32, 32, 32), "decoder_block_out_channels": (32, 32, 64, 64),
        "layers_per_block": (1, 1, 2, 1, 1), "latent_channels": 12}
# Odd, non-square latent planes: 5x7 (none of 2, 4, 2x2 devices divide it) and 4x6.
Z_MAIN = (1, 12, 3, 5, 7)   # 3 latent frames -> 18 decoded, 13 kept, 40x56 pixels
Z_BATCH = (2, 12, 2, 4, 6)  # 2 latent frames -> 7 frames of 32x48; batch 2 for slicing
# Tiles of 3x4 latents (24x32 pixels) every 2x2 latents (16 pixels, 20 pixels: not a multiple of
# the 8x ratio, so the row limit of 20 overshoots the stride and diffusers' final crop matters);
# a 4x6 latent gives 2 x 3 tiles of four shapes, every overlap blended (8 and 12 pixels).
SMALL_TILES = vae_mod.MochiTilingConfig(tile_sample_min_height=24, tile_sample_min_width=32,
                                        tile_sample_stride_height=16, tile_sample_stride_width=20)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # std 0.1: every weight random (norm scales around 1, non-zero biases), activations O(1).
    tv = randomize_(AutoencoderKLMochi(**TINY), seed=3, std=0.1)
    folder = tmp_path_factory.mktemp("mochi_vae")
    tv.save_pretrained(folder)
    cfg = vae_mod.MochiVAEConfig.from_json(folder / "config.json")
    return tv, cfg, folder


@pytest.fixture(scope="session")
def model_fp32(ckpt):
    _, cfg, folder = ckpt
    return vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg), jnp.float32)


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_TILE_ARGS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
              "tile_sample_stride_width")


def _tile_kwargs(tiling):
    return {a: getattr(tiling, a) for a in _TILE_ARGS}


def _torch_decode(tv, z, tiling=None, slicing=False):
    """diffusers' decode with enable_tiling(**tiling) / enable_slicing; ``tv`` is left as it was."""
    saved = _tile_kwargs(tv)
    tv.use_slicing = slicing
    if tiling is not None:
        tv.enable_tiling(**_tile_kwargs(tiling))
    try:
        with torch.no_grad():
            return tv.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        tv.use_tiling, tv.use_slicing = False, False
        for a, v in saved.items():
            setattr(tv, a, v)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))
def _jax_decode(graphdef, state, z, **kw):
    return vae_mod.decode(nnx.merge(graphdef, state), z, **kw)


def _decode(model, z, **kw):
    graphdef, state = nnx.split(model)
    if kw.get("mesh") is not None:  # as in the pipeline: weights replicated on the pipeline's mesh
        state = jax.device_put(state, jax.sharding.NamedSharding(kw["mesh"], jax.sharding.PartitionSpec()))
    return np.asarray(_jax_decode(graphdef, state, jnp.asarray(z), **kw).astype(jnp.float32))


@pytest.fixture(scope="session")
def main_case(ckpt, model_fp32):
    """(z, diffusers' output, our fp32 one-device output) for Z_MAIN."""
    tv, _, _ = ckpt
    z = _latents(Z_MAIN, seed=1)
    return z, _torch_decode(tv, z), _decode(model_fp32, z)


def test_fp32_matches_diffusers(ckpt, main_case):
    _, cfg, _ = ckpt
    z, ref, out = main_case
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 13, 40, 56)
    # Same fp32 math in another order (XLA vs oneDNN conv algorithms, GroupNorm reductions in a
    # different association) through 14 convolutions and 2 projections. Measured max abs diff
    # 1.1e-5 at |ref| max 5.7 (2e-6 relative); 5e-5 of max|ref| leaves 25x headroom while any wrong
    # padding, channel order or norm axis shows up at O(max|ref|) (a zero instead of an edge pad
    # in the sharded decode: 4.6).
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    assert err < 5e-5 * scale, f"max abs diff {err} (|ref| max {scale})"


def test_bf16_matches_diffusers_fp32(ckpt, main_case):
    tv, cfg, folder = ckpt
    z, ref, _ = main_case
    tb = AutoencoderKLMochi(**TINY).to(torch.bfloat16).eval()  # diffusers itself in bf16, same weights
    tb.load_state_dict(tv.state_dict())
    with torch.no_grad():
        ref_bf16 = tb.decode(torch.from_numpy(z).to(torch.bfloat16)).sample.float().numpy()
    model = vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg, jnp.bfloat16),
                          jnp.bfloat16)
    out = vae_mod.jit_decode(model, jnp.asarray(z))  # the public jitted entry point
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op) on weights, inputs and every
    # activation of 16 layers (GroupNorm statistics stay float32); errors grow roughly with
    # sqrt(depth) times the activation scale. Measured against the fp32 reference: ours 3.1% of
    # max|ref| (max) and 0.30% (mean), diffusers' own bf16 decode 2.0% and 0.24%. The bounds, 8% and
    # 1% (as for the CogVideoX VAE), and a mean error within 2x of diffusers' bf16 one, still reject
    # any structural error (those are O(max|ref|)).
    scale = np.abs(ref).max()
    err = np.abs(out - ref)
    assert err.max() < 0.08 * scale, f"max abs diff {err.max()} vs |ref| max {scale}"
    assert err.mean() < 0.01 * scale, f"mean abs diff {err.mean()} vs |ref| max {scale}"
    assert err.mean() < 2 * np.abs(ref_bf16 - ref).mean()


# 2 devices split the height 5 as 3 + 2 (padded); 4 devices as 2+2+1+0 (the last block is all
# padding: its halo to the third device must still be the edge row); 2x2 splits both ways, padded
# both ways, halo corners; GSPMD as the other strategy (on 3 devices: uneven).
SHARD_CASES = [
    ("data=2", None, "shard_map"),
    ("ring=2,ulysses=2", (4, 1), "shard_map"),
    ("ring=2,ulysses=2", (2, 2), "shard_map"),
    ("ulysses=3", None, "gspmd"),
]


@pytest.mark.parametrize("spec,grid,strategy", SHARD_CASES)
def test_sharded_equals_one_device(model_fp32, main_case, spec, grid, strategy):
    z, _, one = main_case
    out = _decode(model_fp32, z, mesh=build_mesh(spec), grid=grid, strategy=strategy)
    assert out.shape == one.shape
    # The same fp32 ops on blocks (halo rows are exact copies); GroupNorm sums are associated
    # differently (psum of partial sums) and XLA picks conv algorithms per shape. Measured
    # 7.6e-6 .. 9.3e-6 at |out| max 5.7; a wrong halo or border row gives O(1) (4.5 .. 6.1).
    err = np.abs(out - one).max()
    assert err < 5e-5, f"{spec} grid={grid} {strategy}: max abs diff {err}"


@pytest.fixture(scope="session")
def batch_case(ckpt, model_fp32):
    tv, _, _ = ckpt
    z = _latents(Z_BATCH, seed=2)
    return z, _torch_decode(tv, z), _decode(model_fp32, z)


def test_batch_and_slicing(ckpt, model_fp32, batch_case):
    _, cfg, _ = ckpt
    z, ref, plain = batch_case
    assert plain.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (2, 3, 7, 32, 48)
    assert np.abs(plain - ref).max() < 5e-5 * np.abs(ref).max()
    sliced = _decode(model_fp32, z, slicing=True)
    # Same math per element; XLA compiles the lax.map body with other conv/fusion choices: 9.5e-6.
    np.testing.assert_allclose(sliced, plain, atol=5e-5, rtol=0)


def test_tiled_matches_diffusers_tiled(ckpt, model_fp32, batch_case):
    tv, cfg, _ = ckpt
    z, _, plain = batch_case
    plan = SMALL_TILES.plan(cfg.spatial_compression_ratio)
    assert plan.tile_latent == (3, 4) and plan.stride == (2, 2)
    assert plan.blend_extent == (8, 12) and plan.row_limit == (16, 20)
    ref = _torch_decode(tv, z, tiling=SMALL_TILES, slicing=True)
    out = _decode(model_fp32, z, tiling=SMALL_TILES, slicing=True)
    assert out.shape == ref.shape == plain.shape
    err = np.abs(out - ref).max()
    assert err < 5e-5 * np.abs(ref).max(), f"max abs diff {err}"
    # Tiling changes the numbers (each tile normalises on its own): the test would see a no-op.
    assert np.abs(plain - ref).max() > 1e-2


def test_default_tiling_is_diffusers_default(ckpt):
    tv, cfg, _ = ckpt
    d = vae_mod.default_tiling(cfg)
    assert (d.tile_sample_min_height, d.tile_sample_min_width, d.tile_sample_stride_height,
            d.tile_sample_stride_width) == (tv.tile_sample_min_height, tv.tile_sample_min_width,
                                            tv.tile_sample_stride_height, tv.tile_sample_stride_width)
    assert not d.plan(8).applies(32, 32) and d.plan(8).applies(33, 32)


def test_config_and_unscale(ckpt):
    tv, cfg, _ = ckpt
    assert cfg.decoder_block_out_channels == (32, 32, 64, 64) and cfg.layers_per_block == (1, 1, 2, 1, 1)
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio) == (8, 6)
    assert (tv.spatial_compression_ratio, tv.temporal_compression_ratio) == (8, 6)
    assert cfg.num_frames(28) == 163 and cfg.num_frames(1) == 1  # the release: 28 latent frames
    assert cfg.latents_mean == tuple(tv.config.latents_mean) and cfg.scaling_factor == 1.0
    lat = _latents((1, 12, 2, 3, 3), seed=4)
    mean = torch.tensor(tv.config.latents_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(tv.config.latents_std).view(1, 12, 1, 1, 1)
    ref = (torch.from_numpy(lat) * std / 2.0 + mean).numpy()  # diffusers' pipeline rule
    c2 = vae_mod.MochiVAEConfig.from_dict({**tv.config, "scaling_factor": 2.0, "_class_name": "x"})
    np.testing.assert_allclose(np.asarray(vae_mod.unscale_latents(c2, jnp.asarray(lat))), ref, rtol=1e-6)
    c3 = vae_mod.MochiVAEConfig.from_dict({"latents_mean": None, "latents_std": None, "scaling_factor": 2.0})
    np.testing.assert_allclose(np.asarray(vae_mod.unscale_latents(c3, jnp.asarray(lat))), lat / 2.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        vae_mod.MochiVAEConfig.from_dict({"decoder_block_out_channels": [16, 32, 64, 64]})


def test_checkpoint_errors(ckpt, tmp_path):
    _, cfg, folder = ckpt
    flat = load_component_weights(folder)
    assert any(k.startswith("encoder.") for k in flat)  # present in the file, ignored
    key = "decoder.up_blocks.1.resnets.1.conv2.conv.weight"
    bad = dict(flat)
    bad[key] = bad[key][:, :-1]
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", bad)
    with pytest.raises(CheckpointError, match="conv2.conv.weight"):
        vae_mod.params_from_torch(load_component_weights(tmp_path), cfg)
    missing = {k: v for k, v in flat.items() if k != "decoder.up_blocks.0.proj.bias"}
    with pytest.raises(CheckpointError, match="up_blocks.0.proj.bias"):
        vae_mod.params_from_torch(missing, cfg)


def test_edge_halo_is_edge_pad_on_one_device():
    x = jnp.arange(2 * 3 * 4 * 5 * 2, dtype=jnp.float32).reshape(2, 3, 4, 5, 2)
    pad = ((2, 0), (1, 1), (1, 1))
    y, p = pvae.conv_halo(x, pad, mode="edge")
    assert p == ((0, 0),) * 3
    np.testing.assert_array_equal(np.asarray(y), np.pad(np.asarray(x), ((0, 0),) + pad + ((0, 0),), mode="edge"))
    with pytest.raises(ValueError, match="mode"):
        pvae.conv_halo(x, pad, mode="reflect")
