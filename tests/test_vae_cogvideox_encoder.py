"""CogVideoX VAE encoder == diffusers AutoencoderKLCogVideoX.encode(x).latent_dist (mean, clamped logvar), for an
image (one frame, the image-to-video use) and for videos (diffusers' chunked loop); sample(); the conversion hook."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx

from tests.test_vae_cogvideox import TINY
from tests.torch_util import randomize_, state_dict_np
from xdit_jax import conversion
from xdit_jax.models import vae_cogvideox as vae_mod
from xdit_jax.models import vae_cogvideox_encoder as enc
from xdit_jax.safetensors_io import CheckpointError

# diffusers declares quant_conv with 2 * out_channels channels (not 2 * latent_channels): it only runs where the
# two agree, so the quant_conv variant has out_channels == latent_channels (the decoder's output width only).
QUANT = dict(TINY, use_quant_conv=True, out_channels=TINY["latent_channels"])
IMAGE = (2, 1, (24, 40))  # two batch rows, one frame, non-square -> latents 3 x 5


def _make(kw, push_logvar):
    tv = randomize_(AutoencoderKLCogVideoX(**kw), seed=5, std=0.1)
    if push_logvar:
        # Push two log-variance channels far out of [-30, 20] (conv_out's bias), so the clamp is exercised.
        c = kw["latent_channels"]
        with torch.no_grad():
            tv.encoder.conv_out.conv.bias[c:c + 2] = torch.tensor([100.0, -100.0])
    cfg = vae_mod.CogVideoXVAEConfig.from_dict(dict(tv.config))
    flat = state_dict_np(tv)
    return tv, cfg, flat, enc.build(cfg, enc.params_from_torch(flat, cfg), jnp.float32)


@pytest.fixture(scope="module")
def plain():
    return _make(TINY, push_logvar=True)


@pytest.fixture(scope="module")
def quant():
    return _make(QUANT, push_logvar=False)


def _scale(ref):
    """The output scale for tolerances: max |ref| over entries inside the clamp range (at least 1)."""
    lo, hi = enc.LOGVAR_RANGE
    inside = ref[(ref > lo) & (ref < hi)]
    return max(1.0, float(np.abs(inside).max()))


def _video(b, f, hw, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (b, 3, f) + hw).astype(np.float32)


def _reference(tv, x):
    with torch.no_grad():
        d = tv.encode(torch.from_numpy(x)).latent_dist
    return d.mean.numpy(), d.logvar.numpy()


def _check(model, cfg, tv, x):
    ref_mean, ref_logvar = _reference(tv, x)
    mean, logvar = enc.jit_encode(model, jnp.asarray(x))
    assert mean.dtype == logvar.dtype == jnp.float32
    mean, logvar = np.asarray(mean), np.asarray(logvar)
    b, _, f, h, w = x.shape
    s = cfg.spatial_compression_ratio
    assert mean.shape == logvar.shape == ref_mean.shape == (b, cfg.latent_channels, enc.latent_frames(cfg, f),
                                                            h // s, w // s)
    # fp32 both sides, another summation order through ~20 convolutions and GroupNorms: measured max diffs
    # 0.8-1.3e-6 of the output scale (moments of O(1..3)); 1e-5 of the scale leaves ~8x headroom, while a wrong padding,
    # chunk split, cache or time average moves the moments by O(scale).
    for ours, ref in ((mean, ref_mean), (logvar, ref_logvar)):
        scale, err = _scale(ref), np.abs(ours - ref).max()
        assert err < 1e-5 * scale, f"max abs diff {err} (scale {scale})"
    return mean, logvar


@pytest.mark.parametrize("vae", ["plain", "quant"])
def test_image_matches_diffusers(request, vae):
    tv, cfg, _, model = request.getfixturevalue(vae)
    b, f, hw = IMAGE
    _, logvar = _check(model, cfg, tv, _video(b, f, hw, seed=1))
    if not cfg.use_quant_conv:  # the pushed channels sit on the clamp bounds, as in diffusers
        c = 0
        assert (logvar[:, c] == 20.0).all() and (logvar[:, c + 1] == -30.0).all()


# 17 frames: diffusers' chunks of 9 then 8 (the second under the scan, conv caches carried; per-chunk GroupNorm
# and time averaging) -> 5 + ... latent frames; 5 frames at odd sizes 19 x 13: one odd chunk, floored downsampling.
@pytest.mark.parametrize("f,hw", [(17, (16, 24)), (5, (19, 13))], ids=["17-frames", "5-frames-odd-size"])
def test_video_matches_diffusers(plain, f, hw):
    tv, cfg, _, model = plain
    _check(model, cfg, tv, _video(1, f, hw, seed=f))


def test_latent_frames(plain):
    _, cfg, _, _ = plain
    # the release's 49 frames (9 + 5 * 8) -> 13 latent frames; 1 -> 1; 12 (one even chunk) -> 3
    assert [enc.latent_frames(cfg, f) for f in (1, 5, 12, 17, 49)] == [1, 2, 3, 5, 13]


def test_bf16_smoke(plain):
    tv, cfg, flat, _ = plain
    model = enc.build(cfg, enc.params_from_torch(flat, cfg, jnp.bfloat16), jnp.bfloat16)
    x = _video(*IMAGE, seed=1)
    ref_mean, ref_logvar = _reference(tv, x)
    mean, logvar = enc.jit_encode(model, jnp.asarray(x))
    assert mean.dtype == logvar.dtype == jnp.float32
    mean, logvar = np.asarray(mean), np.asarray(logvar)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op) on weights, input and every activation of ~20
    # layers; measured max ~2%, mean ~0.6% of the scale. 6% / 2% still reject structural errors (O(scale)).
    for ours, ref in ((mean, ref_mean), (logvar, ref_logvar)):
        assert np.isfinite(ours).all()
        scale = _scale(ref)
        assert np.abs(ours - ref).max() < 0.06 * scale
        assert np.abs(ours - ref).mean() < 0.02 * scale


def test_sample_matches_diffusers():
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((2, 8, 1, 3, 5)).astype(np.float32) * 3
    moments[:, 4, ..., 0] = 80.0  # clamped to 20 by the distribution
    dist = DiagonalGaussianDistribution(torch.from_numpy(moments))
    ref = dist.sample(torch.Generator().manual_seed(3)).numpy()
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3)).numpy()
    out = np.asarray(enc.sample(jnp.asarray(dist.mean.numpy()), jnp.asarray(dist.logvar.numpy()), jnp.asarray(noise)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def _leaves(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("vae", ["plain", "quant"])
def test_conversion_hook(request, vae):
    _, cfg, flat, model = request.getfixturevalue(vae)
    extras = vae_mod.extra_params_from_torch(flat, cfg)
    assert set(extras) == {"encoder_params"}
    ours, ref = _leaves(enc.build(cfg, extras["encoder_params"])), _leaves(model)
    assert ours.keys() == ref.keys() and any(k.startswith("encoder/down_blocks/") for k in ours)
    assert any(k.startswith("quant_conv/") for k in ours) == cfg.use_quant_conv
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    # a decode-only export: no encoder params, and the decoder still converts
    decoder_only = {k: v for k, v in flat.items() if not k.startswith(("encoder.", "quant_conv."))}
    assert vae_mod.extra_params_from_torch(decoder_only, cfg) == {}
    vae_mod.params_from_torch(decoder_only, cfg)
    # a checkpoint missing one encoder tensor
    key = "encoder.down_blocks.1.resnets.0.conv1.conv.weight"
    broken = {k: v for k, v in flat.items() if k != key}
    with pytest.raises(CheckpointError, match="down_blocks.1.resnets.0.conv1.conv"):
        vae_mod.extra_params_from_torch(broken, cfg)
    # the dtype reaches the encoder's tree
    bf16 = vae_mod.extra_params_from_torch(flat, cfg, np.dtype(jnp.bfloat16))["encoder_params"]
    assert bf16["encoder"]["conv_in"]["conv"]["kernel"].dtype == jnp.bfloat16


def test_convert_component_saves_encoder(plain, tmp_path):
    tv, _, _, _ = plain
    tv.save_pretrained(tmp_path)
    extras = {}
    conversion.convert_component(tmp_path, "AutoencoderKLCogVideoX", extras=extras)
    assert set(extras) == {"encoder_params"}
    assert "conv_out" in extras["encoder_params"]["encoder"]


def test_bad_input(plain):
    _, _, _, model = plain
    with pytest.raises(ValueError, match="frames, height, width"):
        enc.encode(model, jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="frames, height, width"):
        enc.encode(model, jnp.zeros((1, 4, 1, 8, 8)))
    # use_quant_conv with out_channels != latent_channels: diffusers' quant_conv cannot take the moments
    bad = vae_mod.CogVideoXVAEConfig.from_dict(dict(TINY, use_quant_conv=True))
    with pytest.raises(ValueError, match="quant_conv"):
        enc.encode(enc.CogVideoXEncoder(bad), jnp.zeros((1, 3, 1, 8, 8)))
