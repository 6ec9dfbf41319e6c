"""AutoencoderKL decoder (SD / SDXL VAE, PixArt's) == diffusers ``AutoencoderKL.decode``: plain,
spatially sharded over 2 and 4 devices, tiled + sliced, bf16; checkpoint conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import vae_kl
from xdit_jax.parallel import vae as pvae
from xdit_jax.safetensors_io import CheckpointError

# Two blocks (x2), no mid-block attention, no post_quant_conv; 16 -> 8 channels in the second
# up block needs conv_shortcut.
SMALL = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
             mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
# Shaped like the SD/SDXL VAE: three blocks (x4), mid-block attention, post_quant_conv, and a
# sample_size of 32 so enable_tiling() uses 8x8 latent tiles (stride 6, blend 8 pixels, keep 24).
ATTN = dict(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4, latent_channels=4,
            sample_size=32)


def _torch_vae(kw, seed):
    torch.manual_seed(0)
    # std 0.1: every weight random (norm scales around 1, non-zero biases), activations O(1).
    return randomize_(AutoencoderKL(**kw), seed=seed, std=0.1)


@pytest.fixture(scope="module")
def small():
    tv = _torch_vae(SMALL, seed=1)
    cfg = vae_kl.AutoencoderKLConfig.from_dict(dict(tv.config))
    return tv, cfg, vae_kl.build(cfg, vae_kl.params_from_torch(state_dict_np(tv), cfg))


@pytest.fixture(scope="module")
def attn():
    tv = _torch_vae(ATTN, seed=2)
    cfg = vae_kl.AutoencoderKLConfig.from_dict(dict(tv.config))
    return tv, cfg, vae_kl.build(cfg, vae_kl.params_from_torch(state_dict_np(tv), cfg))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("tiling", "slicing", "mesh", "grid", "strategy"))
def _jit(graphdef, state, z, **kw):
    return vae_kl.decode(nnx.merge(graphdef, state), z, **kw)


def _decode(model, z, **kw):
    graphdef, state = nnx.split(model)
    return _jit(graphdef, state, jnp.asarray(z), **kw)


def _torch_decode(tv, z, tiling=False, slicing=False):
    tv.use_tiling, tv.use_slicing = tiling, slicing  # what enable_tiling()/enable_slicing() set
    try:
        with torch.no_grad():
            return tv.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        tv.use_tiling = tv.use_slicing = False


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# 5x7 latents: odd sizes, which neither 2 nor 4 devices divide.
Z_SHAPE = (2, 4, 5, 7)


@pytest.fixture(scope="module")
def attn_reference(attn):
    """(latents, diffusers' decode, our one-device decode) for the ATTN model."""
    tv, _, model = attn
    z = _latents(Z_SHAPE, seed=3)
    return z, _torch_decode(tv, z), np.asarray(_decode(model, z))


def _check_fp32(out, ref):
    # The same fp32 ops in another order (conv algorithms, GroupNorm and softmax reductions)
    # through ~15 layers: measured max diff <= 5e-6 at max|ref| 2.3..2.7. 2e-5 relative to the
    # output's magnitude leaves ~10x headroom, while a wrong padding, norm or attention is O(0.1..1).
    scale = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max())
    assert err < 2e-5 * max(scale, 1.0), f"max abs diff {err} (max|ref| {scale})"


def test_fp32_matches_diffusers_small(small):
    tv, cfg, model = small
    z = _latents(Z_SHAPE, seed=4)
    ref = _torch_decode(tv, z)
    out = np.asarray(_decode(model, z))
    assert out.shape == ref.shape == vae_kl.decoded_shape(cfg, z.shape) == (2, 3, 10, 14)
    _check_fp32(out, ref)


def test_fp32_matches_diffusers_with_attention(attn, attn_reference):
    _, cfg, _ = attn
    z, ref, out = attn_reference
    assert out.shape == ref.shape == vae_kl.decoded_shape(cfg, z.shape) == (2, 3, 20, 28)
    _check_fp32(out, ref)


# (devices, grid, strategy): 2 devices split the 5 latent rows 3+2 (one padded row); 4 split
# them 2+2+1+0 (the last block is all padding); (2, 2) splits both height and width, padded
# both ways, with halo corners; GSPMD as the alternative strategy (no hooks).
SHARD_CASES = [(2, None, "shard_map"), (4, None, "shard_map"), (4, (2, 2), "shard_map"), (2, None, "gspmd")]


@pytest.mark.parametrize("n,grid,strategy", SHARD_CASES)
def test_sharded_equals_one_device(attn, attn_reference, n, grid, strategy):
    _, _, model = attn
    z, _, one = attn_reference
    mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(n // 2, 2), ("a", "b"))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    out = np.asarray(_jit(graphdef, state, jnp.asarray(z), mesh=mesh, grid=grid, strategy=strategy))
    assert out.shape == one.shape
    # The same numbers but for the summation order of the all-reduced GroupNorm statistics and
    # of the attention over gathered keys: measured <= 4e-6 (max|out| ~2.3). Attending to the local
    # keys only (no gather_plane) gives 0.4.
    err = np.abs(out - one).max()
    assert err < 2e-5, f"{n} devices grid={grid} {strategy}: max abs diff {err}"


def test_tiled_and_sliced_match_diffusers(attn):
    """enable_tiling() + enable_slicing(): a batch of 2 of 10x10 latents -> 2 x 2 tiles of four
    shapes (8x8, 8x4, 4x8, 4x4), every overlap blended, each tile with its own attention."""
    tv, cfg, model = attn
    plan = vae_kl.default_tiling(cfg).plan(cfg.spatial_compression_ratio)
    stride = int(tv.tile_latent_min_size * (1 - tv.tile_overlap_factor))
    blend = int(tv.tile_sample_min_size * tv.tile_overlap_factor)
    assert plan.tile_latent == (tv.tile_latent_min_size,) * 2 == (8, 8)
    assert plan.stride == (stride, stride) and plan.blend_extent == (blend, blend)
    assert plan.row_limit == (tv.tile_sample_min_size - blend,) * 2
    z = _latents((2, 4, 10, 10), seed=5)
    ref = _torch_decode(tv, z, tiling=True, slicing=True)
    out = np.asarray(_decode(model, z, tiling=True, slicing=True))
    assert out.shape == ref.shape == (2, 3, 40, 40)
    _check_fp32(out, ref)
    # Tiling changes the numbers (each tile normalises and attends on its own): the test sees it.
    assert np.abs(_torch_decode(tv, z) - ref).max() > 1e-2


def test_bf16_close_to_fp32(attn, attn_reference):
    tv, cfg, _ = attn
    z, ref, _ = attn_reference
    model = vae_kl.build(cfg, vae_kl.params_from_torch(state_dict_np(tv), cfg, jnp.bfloat16), jnp.bfloat16)
    out = _decode(model, z)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    # bf16 rounds weights, inputs and every activation to 8 mantissa bits (2^-9 relative per op)
    # through ~15 layers (GroupNorm statistics and softmax stay fp32). Measured 2.6% of max|ref|;
    # 8% still rejects any structural error (those are O(max|ref|)).
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    assert err < 0.08 * scale, f"max abs diff {err} vs max|ref| {scale}"


def test_checkpoint_errors(attn):
    tv, cfg, _ = attn
    sd = state_dict_np(tv)
    name = "decoder.mid_block.attentions.0.to_k.weight"
    broken = {k: v for k, v in sd.items() if k != name}
    broken["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        vae_kl.params_from_torch(broken, cfg)
    assert name in str(e.value) and "decoder.extra.weight" in str(e.value)
    # The encoder's and quant_conv's tensors are ignored: the decoder alone converts.
    dec = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}
    assert len(dec) < len(sd)
    vae_kl.params_from_torch(dec, cfg)


def test_deprecated_attention_names(attn):
    """Old checkpoints call the attention's linears query/key/value/proj_attn (diffusers renames)."""
    tv, cfg, _ = attn
    sd = state_dict_np(tv)
    old = {}
    for k, v in sd.items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    a, b = vae_kl.params_from_torch(sd, cfg), vae_kl.params_from_torch(old, cfg)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_config_validation():
    base = dict(block_out_channels=(8, 16), up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    cfg = vae_kl.AutoencoderKLConfig.from_dict({**base, "_class_name": "AutoencoderKL", "sample_size": [32, 32]})
    assert cfg.tile_sample_size == 32 and cfg.spatial_compression_ratio == 2
    for bad, match in [({"up_block_types": ("AttnUpDecoderBlock2D",) * 2}, "up_block_types"),
                       ({"up_block_types": ("UpDecoderBlock2D",)}, "must match"),
                       ({"act_fn": "tanh"}, "act_fn"),
                       ({"norm_num_groups": 3}, "norm_num_groups")]:
        with pytest.raises(ValueError, match=match):
            vae_kl.AutoencoderKLConfig.from_dict({**base, **bad})


def test_attention_chunks_and_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((2, 7, 5), (2, 9, 5), (2, 9, 5)))
    s = np.einsum("nqc,nkc->nqk", np.asarray(q), np.asarray(k)) * 5 ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("nqk,nkc->nqc", p / p.sum(-1, keepdims=True), np.asarray(v))
    full = np.asarray(vae_kl.attention(q, k, v, 5 ** -0.5))
    chunked = np.asarray(vae_kl.attention(q, k, v, 5 ** -0.5, max_scores=2 * 9 * 3))  # 3 queries a chunk
    np.testing.assert_allclose(full, ref, atol=1e-5)
    np.testing.assert_allclose(chunked, full, atol=1e-6)


def test_gather_plane_is_identity_on_one_device():
    x = jnp.ones((1, 3, 4, 2))
    assert pvae.gather_plane(x) is x


def test_unscale_latents():
    x = jnp.full((1, 2, 1, 1), 2.0)
    cfg = vae_kl.AutoencoderKLConfig(scaling_factor=0.5)
    np.testing.assert_allclose(np.asarray(vae_kl.unscale_latents(cfg, x)), 4.0)
    cfg = vae_kl.AutoencoderKLConfig(scaling_factor=0.5, shift_factor=1.0)
    np.testing.assert_allclose(np.asarray(vae_kl.unscale_latents(cfg, x)), 5.0)
    cfg = vae_kl.AutoencoderKLConfig(scaling_factor=0.5, latents_mean=(1.0, 2.0), latents_std=(3.0, 4.0))
    np.testing.assert_allclose(np.asarray(vae_kl.unscale_latents(cfg, x))[0, :, 0, 0], [13.0, 18.0])
