"""HunyuanVideo VAE decoder == diffusers AutoencoderKLHunyuanVideo.decode; sharded, tiled, framewise decodes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from flax import nnx

from tests.torch_util import randomize_
from xdit_jax import conversion
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_hunyuan_video as vae_mod
from xdit_jax.safetensors_io import CheckpointError, load_component_weights

# Smallest config shaped like the release: 4 up blocks (8x in space for the first three, 2x in time
# for the middle two: T latent frames -> 4 (T - 1) + 1), a width change (16 -> 8) across blocks so
# the resnet shortcut and the up blocks' input widths are exercised, 2 resnets per up block,
# 4 GroupNorm groups, the mid-block attention on.
TINY = {"latent_channels": 4, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
RELEASE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
           "down_block_types": ["HunyuanVideoDownBlock3D"] * 4, "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
           "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
           "norm_num_groups": 32, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
           "temporal_compression_ratio": 4, "mid_block_add_attention": True}
# 3 latent frames -> 9 frames of 40 x 24 (non-square; the latent height 5 splits unevenly over 2 and 3).
Z_MAIN = (1, 4, 3, 5, 3)
Z_ONE = (1, 4, 1, 3, 4)     # one latent frame -> one frame (no temporal upsampling of the first frame)
Z_LONG = (1, 4, 6, 2, 3)    # 6 > 4 latent frames: diffusers' default framewise decode, tiles of 5 and 3
# Tiles of 3x2 latents (24x16 pixels) every 2x1 latents: on a 5x3 latent 3 x 3 tiles of four shapes.
SMALL_TILES = vae_mod.HunyuanVideoTilingConfig(tile_sample_min_height=24, tile_sample_min_width=16,
                                               tile_sample_stride_height=16, tile_sample_stride_width=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # std 0.1: every weight random (norm scales around 1, non-zero biases), activations O(1).
    tv = randomize_(AutoencoderKLHunyuanVideo(**TINY), seed=3, std=0.1)
    folder = tmp_path_factory.mktemp("hunyuan_video_vae")
    tv.save_pretrained(folder)
    cfg = vae_mod.HunyuanVideoVAEConfig.from_json(folder / "config.json")
    return tv, cfg, folder


@pytest.fixture(scope="module")
def model(ckpt):
    _, cfg, folder = ckpt
    return vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg), jnp.float32)


def _latents(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_TILE_ARGS = tuple(f.name for f in vae_mod.HunyuanVideoTilingConfig.__dataclass_fields__.values())


def _torch_decode(tv, z, tiling=None, slicing=False):
    """diffusers' decode (framewise decoding on, its default) with enable_tiling(**tiling) / enable_slicing;
    ``tv`` is left as it was."""
    saved = {a: getattr(tv, a) for a in _TILE_ARGS}
    tv.use_slicing = slicing
    if tiling is not None:
        tv.enable_tiling(**{a: getattr(tiling, a) for a in _TILE_ARGS})
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
    if kw.get("mesh") is not None:  # as in a pipeline: weights replicated on the mesh
        state = jax.device_put(state, jax.sharding.NamedSharding(kw["mesh"], jax.sharding.PartitionSpec()))
    return np.asarray(_jax_decode(graphdef, state, jnp.asarray(z), **kw))


def _close(out, ref, what="", rel=5e-5):
    # Same fp32 math in another order (XLA vs oneDNN conv algorithms, GroupNorm and softmax
    # reductions associated differently) through ~20 convolutions and one attention. Measured max abs
    # diff / max|ref|: 2.0e-6 (3 latent frames, 8.1e-6 at |ref| 4.1), 2.0e-6 (1 frame), 3.4e-6
    # (framewise). 5e-5 of max|ref| (~400 float32 ulps of the output scale) leaves >= 15x headroom,
    # while any wrong padding, mask, frame order, upsampling or norm axis is O(max|ref|).
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    assert err < rel * scale, f"{what}: max abs diff {err} (|ref| max {scale})"
    return err


@pytest.fixture(scope="module")
def main_case(ckpt, model):
    """(z, diffusers' output, our fp32 one-device output) for Z_MAIN."""
    tv, _, _ = ckpt
    z = _latents(Z_MAIN, seed=1)
    return z, _torch_decode(tv, z), _decode(model, z)


def test_matches_diffusers(ckpt, main_case):
    _, cfg, _ = ckpt
    z, ref, out = main_case
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 9, 40, 24)
    _close(out, ref, "3 latent frames")


def test_one_frame_matches_diffusers(ckpt, model):
    tv, cfg, _ = ckpt
    z = _latents(Z_ONE, seed=2)
    ref = _torch_decode(tv, z)
    out = _decode(model, z)
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 1, 24, 32)
    _close(out, ref, "1 latent frame")


def test_causal_attention_mask_is_diffusers():
    """The mid-block attention's frame-causal mask == diffusers' prepare_causal_attention_mask (additive
    -inf), also with the queries in chunks (lax.map) and on a query block with its own frame ids."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

    from xdit_jax.models.vae_kl import attention

    t, hw, c = 3, 4, 5
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, t * hw, c)).astype(np.float32) for _ in range(3))
    mask = prepare_causal_attention_mask(t, hw, torch.float32, "cpu")
    ref = torch.softmax(torch.from_numpy(q) @ torch.from_numpy(k).transpose(1, 2) * c ** -0.5 + mask, -1)
    ref = (ref @ torch.from_numpy(v)).numpy()
    frames = np.repeat(np.arange(t), hw)
    for max_scores in (1 << 20, 2 * t * hw * 5):  # whole, and chunks of 5 queries (one padded)
        out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), c ** -0.5, max_scores=max_scores,
                        q_frames=frames, k_frames=frames)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)
    # the mask matters: without it the first frame's rows differ
    free = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), c ** -0.5)
    assert np.abs(np.asarray(free)[:, :hw] - ref[:, :hw]).max() > 1e-2


# 2 devices split the latent height 5 as 3 + 2 (padded), 3 devices as 2 + 2 + 1; both strategies.
SHARD_CASES = [
    ("data=2", "shard_map"),
    ("ulysses=3", "gspmd"),
    pytest.param("ulysses=3", "shard_map", marks=pytest.mark.slow),
    pytest.param("data=2", "gspmd", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("spec,strategy", SHARD_CASES)
def test_sharded_equals_one_device(model, main_case, spec, strategy):
    z, _, one = main_case
    out = _decode(model, z, mesh=build_mesh(spec), strategy=strategy)
    assert out.shape == one.shape
    # The same fp32 ops on blocks (halo rows are exact copies, the attention's keys the whole plane);
    # GroupNorm sums are associated differently (psum of partial sums) and XLA picks conv algorithms
    # per shape. Measured 1.6e-6 .. 2.0e-6 of max|out| (6.6e-6 .. 8.2e-6 at 4.1) for all four cases;
    # a wrong halo, border row or attention key set gives O(max|out|).
    err = np.abs(out - one).max()
    assert err < 5e-5 * np.abs(one).max(), f"{spec} {strategy}: max abs diff {err}"


@pytest.mark.slow
def test_tiled_matches_diffusers_tiled(ckpt, model, main_case):
    tv, cfg, _ = ckpt
    z, plain_ref, _ = main_case
    plan = SMALL_TILES.plan(cfg.spatial_compression_ratio)
    assert plan.tile_latent == (3, 2) and plan.stride == (2, 1)
    assert plan.blend_extent == (8, 8) and plan.row_limit == (16, 8)
    ref = _torch_decode(tv, z, tiling=SMALL_TILES)
    out = _decode(model, z, tiling=SMALL_TILES)
    assert out.shape == ref.shape == plain_ref.shape
    # Tiles down to 1x1 latents: GroupNorm over few pixels amplifies the rounding of the small
    # statistics. Measured 1.35e-5 of max|ref| (3.4e-5 at 2.5); 1.5e-4 is 10x that, a seam or a wrong
    # blend order is O(max|ref|).
    _close(out, ref, "tiled", rel=1.5e-4)
    # Tiling changes the numbers (each tile normalises on its own): the test would see a no-op.
    assert np.abs(plain_ref - ref).max() > 1e-2


def test_framewise_matches_diffusers(ckpt, model):
    """diffusers' default decode of more than 4 latent frames: temporal tiles, blended."""
    tv, cfg, _ = ckpt
    z = _latents(Z_LONG, seed=5)
    ref = _torch_decode(tv, z)
    out = _decode(model, z)
    assert out.shape == ref.shape == vae_mod.decoded_shape(cfg, z.shape) == (1, 3, 21, 16, 24)
    _close(out, ref, "framewise")


@pytest.mark.slow
def test_framewise_sliced_on_mesh_matches_diffusers(ckpt, model):
    """All options composed: batch 2 in slices, each in temporal tiles, each tile split over 2 devices."""
    tv, _, _ = ckpt
    z = _latents((2,) + Z_LONG[1:], seed=6)
    ref = _torch_decode(tv, z, slicing=True)
    out = _decode(model, z, slicing=True, mesh=build_mesh("data=2"))
    assert out.shape == ref.shape == (2, 3, 21, 16, 24)
    _close(out, ref, "framewise, sliced, 2 devices")


@pytest.mark.slow
def test_bf16_matches_diffusers_fp32(ckpt, main_case):
    tv, cfg, folder = ckpt
    z, ref, _ = main_case
    tb = AutoencoderKLHunyuanVideo(**TINY).to(torch.bfloat16).eval()  # diffusers itself in bf16, same weights
    tb.load_state_dict(tv.state_dict())
    with torch.no_grad():
        ref_bf16 = tb.decode(torch.from_numpy(z).to(torch.bfloat16)).sample.float().numpy()
    model = vae_mod.build(cfg, vae_mod.params_from_torch(load_component_weights(folder), cfg, jnp.bfloat16),
                          jnp.bfloat16)
    out = vae_mod.jit_decode(model, jnp.asarray(z))  # the public jitted entry point
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    # bf16 (8 mantissa bits) on weights and every activation of ~20 layers, GroupNorm statistics and softmax in
    # float32. Measured vs the fp32 reference: ours 2.4% of max|ref| (max) and 0.35% (mean), diffusers' own bf16
    # decode 2.2% and 0.32%. Bounds as for the other VAEs (8% max, 1% mean, mean within 2x of diffusers' bf16);
    # structural errors are O(max|ref|).
    scale = np.abs(ref).max()
    err = np.abs(out - ref)
    assert err.max() < 0.08 * scale, f"max abs diff {err.max()} vs |ref| max {scale}"
    assert err.mean() < 0.01 * scale, f"mean abs diff {err.mean()} vs |ref| max {scale}"
    assert err.mean() < 2 * np.abs(ref_bf16 - ref).mean()


def test_default_tiling_is_diffusers_default(ckpt):
    tv, cfg, _ = ckpt
    d = vae_mod.default_tiling(cfg)
    assert all(getattr(d, a) == getattr(tv, a) for a in _TILE_ARGS)
    assert d.temporal(4) == (4, 3, 4)
    plan = d.plan(8)
    assert plan.tile_latent == (32, 32) and plan.stride == (24, 24) and plan.blend_extent == (64, 64)
    assert not plan.applies(32, 32) and plan.applies(33, 32)


def test_conversion_and_config(ckpt, tmp_path):
    tv, cfg, folder = ckpt
    assert cfg.block_out_channels == (8, 8, 16, 16) and cfg.norm_num_groups == 4
    assert cfg.upsample_factors() == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1))
    # the registered conversion (MODEL_CLASSES) reads the saved folder: every decoder tensor, encoder ignored
    extras = {}
    cfg_dict, params = conversion.convert_component(folder, "AutoencoderKLHunyuanVideo", extras=extras)
    assert set(extras) == {"encoder_params"}  # the encoder's params, saved aside (vae/encoder_params)
    flat = load_component_weights(folder)
    assert any(k.startswith("encoder.") for k in flat)
    assert len(jax.tree.leaves(params)) == sum(1 for k in flat if not k.startswith(("encoder.", "quant_conv.")))
    ours = params["decoder"]["mid_block"]["attentions"]["0"]["to_q"]["kernel"]
    np.testing.assert_array_equal(ours, flat["decoder.mid_block.attentions.0.to_q.weight"].T)
    bad = dict(flat)
    key = "decoder.up_blocks.1.upsamplers.0.conv.conv.weight"
    bad[key] = bad[key][:, :-1]
    with pytest.raises(CheckpointError, match="upsamplers.0.conv.conv.weight"):
        vae_mod.params_from_torch(bad, cfg)
    with pytest.raises(CheckpointError, match="post_quant_conv.bias"):
        vae_mod.params_from_torch({k: v for k, v in flat.items() if k != "post_quant_conv.bias"}, cfg)
    lat = _latents((1, 4, 2, 2, 2), seed=4)
    ref = (torch.from_numpy(lat) / tv.config.scaling_factor).numpy()  # diffusers' pipeline rule
    np.testing.assert_allclose(np.asarray(vae_mod.unscale_latents(cfg, jnp.asarray(lat))), ref, rtol=3e-7)
    with pytest.raises(ValueError, match="temporal_compression_ratio"):
        vae_mod.HunyuanVideoVAEConfig.from_dict({"temporal_compression_ratio": 8})
    with pytest.raises(ValueError, match="norm_num_groups"):
        vae_mod.HunyuanVideoVAEConfig.from_dict({"block_out_channels": [8, 12, 16, 16], "norm_num_groups": 8})


def test_release_parameter_count_and_key_map():
    cfg = vae_mod.HunyuanVideoVAEConfig.from_dict(RELEASE)
    assert cfg.num_frames(33) == 129 and cfg.num_frames(1) == 1 and cfg.spatial_upsampling == 8
    assert vae_mod.decoded_shape(cfg, (1, 16, 33, 90, 160)) == (1, 3, 129, 720, 1280)
    # diffusers' model on the meta device (no memory), its tensors stood in for by zero-stride views
    with torch.device("meta"):
        tv = AutoencoderKLHunyuanVideo(**RELEASE)
    flat = {k: np.broadcast_to(np.zeros((), np.int8), tuple(v.shape)) for k, v in tv.state_dict().items()}
    params = vae_mod.params_from_torch(flat, cfg)  # raises on any missing, unexpected or misshaped tensor
    n_torch = sum(p.numel() for p in tv.decoder.parameters()) + sum(p.numel() for p in tv.post_quant_conv.parameters())
    n_ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    shapes = jax.tree.leaves(nnx.state(nnx.eval_shape(vae_mod.module_fn(cfg)), nnx.Param))
    assert n_ours == n_torch == sum(int(np.prod(a.shape)) for a in shapes)
