"""CogVideoX transformer == diffusers CogVideoXTransformer3DModel, in each released variant."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline as TorchPipeline
from diffusers import CogVideoXTransformer3DModel as TorchModel

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import cogvideox
from xdit_jax.safetensors_io import CheckpointError

# Tiny configs shaped like the three releases. 4 heads x 16 (RoPE needs head_dim % 16 == 0).
BASE = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=24, num_layers=2, sample_width=8, sample_height=6, sample_frames=9,
            max_text_seq_length=7)
VARIANTS = {
    "2b": dict(BASE),  # 3D sin-cos positions, Conv2d patch embed
    "5b": dict(BASE, use_rotary_positional_embeddings=True),
    "1.5": dict(BASE, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                sample_width=12, sample_height=8),
    # image-to-video: the noise and the image's latents (8 channels in); 5B-I2V's learned table over [text; video],
    # 1.5-I2V's ofs embedding
    "5b-i2v": dict(BASE, in_channels=8, use_rotary_positional_embeddings=True,
                   use_learned_positional_embeddings=True),
    "1.5-i2v": dict(BASE, in_channels=8, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                    sample_width=12, sample_height=8, ofs_embed_dim=32),
}
# (batch, latent frames, latent h, latent w): the last case differs from the config's sample size,
# so the position tables are rebuilt (diffusers' other branch) and RoPE gets a crop region.
# 5B-I2V: its learned table only at the sample size (60 x 90 latents in the release); 3 latent frames (9 video frames
# = sample_frames) use it, 2 the sin-cos table diffusers builds instead.
SHAPES = {"2b": [(2, 3, 6, 8), (1, 2, 4, 10)], "5b": [(2, 3, 6, 8), (1, 2, 4, 10)], "1.5": [(2, 4, 8, 12), (1, 2, 6, 4)],
          "5b-i2v": [(2, 3, 6, 8), (1, 2, 6, 8)], "1.5-i2v": [(2, 4, 8, 12), (1, 2, 6, 4)]}
OFS = 2.0  # CogVideoXImageToVideoPipeline's


def ofs_of(cfg):
    return OFS if cfg.ofs_embed_dim else None


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**VARIANTS[request.param]), seed=1, std=0.15)
    cfg = cogvideox.CogVideoXConfig.from_dict(dict(tm.config))
    params = cogvideox.params_from_torch(state_dict_np(tm), cfg)
    return request.param, tm, cfg, cogvideox.build(cfg, params)


def torch_forward(tm, x, enc, t):
    rope = None
    if tm.config.use_rotary_positional_embeddings:
        fake = types.SimpleNamespace(transformer=tm, vae_scale_factor_spatial=8)
        rope = TorchPipeline._prepare_rotary_positional_embeddings(fake, x.shape[3] * 8, x.shape[4] * 8,
                                                                   x.shape[1], "cpu")
    ofs = torch.full((1,), OFS) if tm.config.ofs_embed_dim else None
    with torch.no_grad():
        return tm(hidden_states=x, encoder_hidden_states=enc, timestep=t, image_rotary_emb=rope, ofs=ofs,
                  return_dict=False)[0].numpy()


def test_matches_diffusers(pair):
    name, tm, cfg, model = pair
    fwd = jax.jit(lambda m, x, e, t: m(x, e, t, ofs_of(cfg)))
    rng = np.random.default_rng(0)
    for b, f, h, w in SHAPES[name]:
        x = rng.standard_normal((b, f, cfg.in_channels, h, w)).astype(np.float32)
        enc = rng.standard_normal((b, cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
        t = np.array([999, 37][:b], dtype=np.int64)
        ref = torch_forward(tm, torch.from_numpy(x), torch.from_numpy(enc), torch.from_numpy(t))
        out = np.asarray(fwd(model, jnp.asarray(x), jnp.asarray(enc), jnp.asarray(t)))
        assert out.shape == ref.shape
        # fp32 on both sides; outputs are O(1). 2e-5 allows reordered float32 sums over
        # 2 blocks of width 64 (a layout or position bug gives errors of order 1e-1).
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=f"{name} {(b, f, h, w)}")


# 5b's RoPE path in the default run; 2b (its sin-cos table) and 1.5 (patch_size_t) are slow-marked for the default
# run's time (`pytest -m slow`); the image-to-video variants add no bf16 path of their own
@pytest.mark.parametrize("pair", [pytest.param("2b", marks=pytest.mark.slow), "5b",
                                  pytest.param("1.5", marks=pytest.mark.slow)], indirect=True)
def test_bf16_close_to_fp32(pair):
    name, tm, cfg, model = pair
    params = cogvideox.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16)
    m16 = cogvideox.build(cfg, params, dtype=jnp.bfloat16)
    b, f, h, w = SHAPES[name][0]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((b, f, cfg.in_channels, h, w)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((b, cfg.max_text_seq_length, cfg.text_embed_dim)), jnp.float32)
    t = jnp.array([500, 20][:b])
    ref = np.asarray(model(x, enc, t, ofs_of(cfg)))
    out = np.asarray(m16(x, enc, t, ofs_of(cfg)).astype(jnp.float32))
    # bf16 has an 8-bit mantissa (rel. step 2^-8 = 0.4%); through 2 blocks the error stays a few %
    # of the output scale.
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() < 0.05 * scale


def test_checkpoint_mismatch_is_reported(pair):
    name, tm, cfg, _ = pair
    sd = state_dict_np(tm)
    sd.pop("transformer_blocks.1.attn1.to_q.weight")
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        cogvideox.params_from_torch(sd, cfg)
    msg = str(e.value)
    assert "transformer_blocks.1.attn1.to_q.weight" in msg and "proj_out.weight" in msg and "extra.weight" in msg


def test_image_to_video_inputs(pair):
    """5B-I2V: the learned table only at the sample size and, at the sample frames, with the full caption; it matters
    (zeroed, the output moves) and a sequence-parallel run equals one device. 1.5-I2V: ofs required, and it matters."""
    name, tm, cfg, model = pair
    if name not in ("5b-i2v", "1.5-i2v"):
        with pytest.raises(ValueError, match="no ofs embedding"):
            model(jnp.zeros((1, 2, cfg.in_channels, 6, 8)), jnp.zeros((1, 7, cfg.text_embed_dim)), jnp.ones(1), 2.0)
        return
    b, f, h, w = SHAPES[name][0]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((b, f, cfg.in_channels, h, w)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((b, cfg.max_text_seq_length, cfg.text_embed_dim)), jnp.float32)
    t = jnp.array([500, 20][:b])
    out = np.asarray(model(x, enc, t, ofs_of(cfg)))
    if name == "1.5-i2v":
        with pytest.raises(ValueError, match="ofs is required"):
            model(x, enc, t)
        assert np.abs(np.asarray(model(x, enc, t, 0.0)) - out).max() > 1e-3
        return
    with pytest.raises(ValueError, match="learned positional table"):
        model(x[..., :4], enc, t)
    with pytest.raises(ValueError, match="text tokens"):
        model(x, enc[:, :5], t)
    from flax import nnx

    from tests.jax_util import sequence_parallel_forward
    from xdit_jax.mesh import build_mesh

    zeroed = nnx.clone(model)
    zeroed.patch_embed.pos_embedding[...] = jnp.zeros_like(zeroed.patch_embed.pos_embedding[...])
    assert np.abs(np.asarray(zeroed(x, enc, t)) - out).max() > 1e-3
    parallel = sequence_parallel_forward(model, build_mesh("ring=2,ulysses=2"))
    np.testing.assert_allclose(np.asarray(parallel(x, enc, t)), out, atol=1e-5, rtol=0)
