"""Wan transformer == diffusers WanTransformer3DModel; its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel as TorchModel

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import wan
from xdit_jax.safetensors_io import CheckpointError

# 2 heads x 12: the RoPE splits the head dim 4 (frames) + 4 (rows) + 4 (columns); ffn_dim not a multiple of
# the width (as the releases: 8960 at 1536, 13824 at 5120).
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=16, ffn_dim=40, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
L = 6  # caption tokens
# (batch, latent frames, h, w): 3 x 3 x 5 = 45 video tokens, which no sequence degree below divides (padding),
# not square (row / column order).
SHAPE = (2, 3, 6, 10)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = wan.WanConfig.from_dict(dict(tm.config))
    model = wan.build(cfg, wan.params_from_torch(state_dict_np(tm), cfg))
    fwd = jax.jit(lambda m, x, t, e: m(x, t, e))
    return tm, cfg, model, fwd


def _inputs(cfg, b, f, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, f, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, L, cfg.text_dim)).astype(np.float32)
    enc[1, 4:] = 0  # WanPipeline zero-pads each caption's states after its tokens
    t = np.array([999, 37][:b], dtype=np.int64)
    return x, t, enc


def _torch(tm, x, t, enc):
    with torch.no_grad():
        return tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc), return_dict=False)[0].numpy()


def test_rope_table_matches_diffusers(pair):
    tm, cfg, _, _ = pair
    f, h, w = 3, 3, 5
    cos, sin = tm.rope(torch.zeros(1, cfg.in_channels, f, 2 * h, 2 * w))
    ours = wan.rope_table(cfg, f, h, w)
    np.testing.assert_allclose(ours[0], cos[0, :, 0].numpy(), atol=1e-7, rtol=0)
    np.testing.assert_allclose(ours[1], sin[0, :, 0].numpy(), atol=1e-7, rtol=0)


def test_matches_diffusers(pair):
    tm, cfg, model, fwd = pair
    x, t, enc = _inputs(cfg, *SHAPE)
    ref = _torch(tm, x, t, enc)
    out = np.asarray(fwd(model, x, t, enc))
    assert out.shape == ref.shape == x.shape
    # fp32 on both sides, outputs O(1-5): 2e-5 allows reordered float32 sums over 2 blocks of width 24 (a layout,
    # RoPE or modulation bug moves outputs by 1e-2 or more).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_bf16_close_to_fp32(pair):
    tm, cfg, model, fwd = pair
    m16 = wan.build(cfg, wan.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    x, t, enc = _inputs(cfg, *SHAPE, seed=1)
    ref = np.asarray(fwd(model, x, t, enc))
    out = np.asarray(fwd(m16, x, t, enc).astype(jnp.float32))
    # bf16: 8-bit mantissa (0.4% steps); through 2 blocks the error stays a few % of the output scale.
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_config_and_input_errors(pair):
    tm, cfg, model, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(image_dim=16), "image-to-video"), (dict(added_kv_proj_dim=24), "image-to-video"),
                        (dict(image_dim=16, added_kv_proj_dim=16), "model width"),
                        (dict(pos_embed_seq_len=10), "needs image_dim"),
                        (dict(qk_norm="rms_norm"), "rms_norm_across_heads")]:
        with pytest.raises(ValueError, match=needle):
            wan.WanConfig.from_dict({**d, **bad})
    with pytest.raises(ValueError, match="multiples of the patch size"):
        wan.check_input_shape(cfg, 3, 7, 8)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        wan.rope_table(cfg, 3, 65, 4)


def test_checkpoint_mismatch_is_reported(pair):
    tm, cfg, _, _ = pair
    sd = state_dict_np(tm)
    sd.pop("blocks.1.attn2.norm_k.weight")
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        wan.params_from_torch(sd, cfg)
    msg = str(e.value)
    assert "blocks.1.attn2.norm_k.weight" in msg and "proj_out.weight" in msg and "extra.weight" in msg


MESHES = ["ulysses=3", "ring=2,ulysses=2", "cfg=2,ring=2"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sequence_parallel_equals_one_device(pair, mesh):
    tm, cfg, model, fwd = pair
    x, t, enc = _inputs(cfg, *SHAPE, seed=2)
    ref = np.asarray(fwd(model, x, t, enc))
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh))(x, t, enc))
    # fp32; only the order of float32 sums differs (ring's LSE merge, zero-padded heads on ulysses=3): outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


def test_first_frame_timestep_matches_diffusers_per_token_timesteps(pair):
    """TI2V-5B image-to-video: diffusers' (B, S) timestep with the first latent frame's tokens at 0, the rest at t ==
    ours with ``first_frame_timestep``; on one device and with the tokens split over ring=2,ulysses=2 (45 tokens:
    the first frame's 15 cut across shards)."""
    tm, cfg, model, _ = pair
    x, t, enc = _inputs(cfg, *SHAPE, seed=4)
    f, h, w = SHAPE[1], SHAPE[2] // 2, SHAPE[3] // 2
    per_token = np.repeat(t[:, None], f * h * w, axis=1)
    per_token[:, : h * w] = 0
    ref = _torch(tm, x, per_token, enc)
    fwd = jax.jit(lambda m, x, t, e, t0: m(x, t, e, first_frame_timestep=t0))
    t0 = np.zeros_like(t)
    out = np.asarray(fwd(model, x, t, enc, t0))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert np.abs(out - np.asarray(fwd(model, x, t, enc, t))).max() > 1e-2  # the first frame's timestep matters
    parallel = sequence_parallel_forward(model, build_mesh("ring=2,ulysses=2"))
    np.testing.assert_allclose(np.asarray(parallel(x, t, enc, first_frame_timestep=t0)), out, atol=1e-5, rtol=0)


# Wan 2.1 image-to-video: CLIP image states (width 16 here; 1280 in the releases) through the image embedder, and
# attn2's own K/V for them (added_kv_proj_dim = the width). FLF2V adds a position table over two images' states.
I2V = dict(CONFIG, image_dim=16, added_kv_proj_dim=24)
IMG = 5  # image tokens per image (257 in the releases)
TEXT = 512  # diffusers' WanAttnProcessor assumes 512 caption tokens (it splits image from text states by it)


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def i2v_pair(request):
    config = I2V if request.param == "i2v" else dict(I2V, pos_embed_seq_len=2 * IMG)
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**config), seed=3, std=0.15)
    cfg = wan.WanConfig.from_dict(dict(tm.config))
    model = wan.build(cfg, wan.params_from_torch(state_dict_np(tm), cfg))
    return tm, cfg, model


def _i2v_inputs(cfg, seed=0):
    x, t, _ = _inputs(cfg, *SHAPE, seed=seed)
    rng = np.random.default_rng(seed + 100)
    b = SHAPE[0]
    enc = rng.standard_normal((b, TEXT, cfg.text_dim)).astype(np.float32)
    enc[:, 7:] = 0
    per_row = 1 if cfg.pos_embed_seq_len is None else 2  # FLF2V: diffusers takes (2B, 257, .): each row's two images
    img = rng.standard_normal((b * per_row, IMG, cfg.image_dim)).astype(np.float32)
    return x, t, enc, img


def test_image_to_video_matches_diffusers(i2v_pair):
    """Ours takes one row of image states per sample: diffusers' FLF2V input (2B, 257, d) is (B, 2 x 257, d) here (the
    view diffusers' image embedder makes)."""
    tm, cfg, model = i2v_pair
    x, t, enc, img = _i2v_inputs(cfg)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc), torch.from_numpy(img),
                 return_dict=False)[0].numpy()
    fwd = jax.jit(lambda m, x, t, e, i: m(x, t, e, i))
    ours_img = img.reshape(SHAPE[0], -1, cfg.image_dim)
    out = np.asarray(fwd(model, x, t, enc, ours_img))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)  # as test_matches_diffusers
    # the image states matter (a dropped image attention or embedder would not move the output)
    assert np.abs(out - np.asarray(fwd(model, x, t, enc, ours_img[::-1]))).max() > 1e-2
    parallel = sequence_parallel_forward(model, build_mesh("ring=2,ulysses=2"))
    np.testing.assert_allclose(np.asarray(parallel(x, t, enc, ours_img)), out, atol=1e-5, rtol=0)


def test_image_to_video_inputs_and_checkpoint(i2v_pair):
    tm, cfg, model = i2v_pair
    x, t, enc, img = _i2v_inputs(cfg, seed=1)
    img = img.reshape(SHAPE[0], -1, cfg.image_dim)
    with pytest.raises(ValueError, match="required"):
        model(x, t, enc)
    with pytest.raises(ValueError, match="expected"):
        model(x, t, enc, img[..., :-1])
    if cfg.pos_embed_seq_len is not None:
        with pytest.raises(ValueError, match="pos_embed_seq_len"):
            model(x, t, enc, img[:, :IMG])
    sd = state_dict_np(tm)
    sd["blocks.0.attn2.norm_added_q.weight"] = np.ones(24, np.float32)  # in some I2V files; diffusers ignores it
    wan.params_from_torch(sd, cfg)
    sd.pop("blocks.1.attn2.add_v_proj.weight")
    with pytest.raises(CheckpointError, match="add_v_proj"):
        wan.params_from_torch(sd, cfg)
