"""DC-AE decoder == diffusers AutoencoderDC.decode; its decode split over a mesh (gspmd) == one device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_dc

# 3 blocks (8, 16, 16): ResBlock, ResBlock, EfficientViT (LiteMLA with a 3x3 multiscale branch, 4 groups of
# head_dim 4 at width 16); 4x spatial compression. "shuffle": pixel-shuffle upsampling, RMS norms, SiLU (SANA
# 1.0's DC-AE kind); "interp": nearest upsampling, BatchNorm2d (eval) in the first blocks, ReLU, no in-shortcut.
BASE = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 2),
            encoder_qkv_multiscales=((), (), (3,)), decoder_qkv_multiscales=((), (), (3,)), scaling_factor=0.41407)
VARIANTS = {
    "shuffle": dict(BASE, upsample_block_type="pixel_shuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu"),
    "interp": dict(BASE, upsample_block_type="interpolate", decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
                   decoder_act_fns="relu", decoder_in_shortcut=False),
}


def _torch_vae(name):
    tm = randomize_(AutoencoderDC(**VARIANTS[name]), seed=5, std=0.2)
    with torch.no_grad():  # running variances must stay positive
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 1.5)
                mod.running_mean.normal_(0, 0.2)
    return tm


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    tm = _torch_vae(request.param)
    cfg = vae_dc.AutoencoderDCConfig.from_dict(dict(tm.config))
    return request.param, tm, cfg, vae_dc.build(cfg, vae_dc.params_from_torch(state_dict_np(tm), cfg))


def test_matches_diffusers(pair):
    name, tm, cfg, model = pair
    assert cfg.spatial_compression_ratio == 4
    # (2, 4, 3, 5): linear attention at the deepest level (15 pixels > head_dim 4); (1, 4, 2, 2): 4 pixels, the
    # quadratic branch diffusers takes for planes of <= head_dim pixels.
    for shape in [(2, 4, 3, 5), (1, 4, 2, 2)]:
        z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = tm.decode(torch.from_numpy(z)).sample.numpy()
        out = np.asarray(jax.jit(vae_dc.decode)(model, z))
        assert out.shape == ref.shape == vae_dc.decoded_shape(cfg, shape)
        # fp32 both sides, outputs of scale 3-5: measured 1.7e-6 - 6.9e-6 (float32 reorderings).
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5, err_msg=f"{name} {shape}")


@pytest.mark.parametrize("pair", ["shuffle"], indirect=True)
def test_decode_over_mesh_equals_one_device(pair):
    name, tm, cfg, model = pair
    z = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    ref = np.asarray(jax.jit(vae_dc.decode)(model, z))
    mesh = build_mesh("ring=2,ulysses=2")
    out = np.asarray(jax.jit(lambda m, z: vae_dc.decode(m, z, mesh=mesh))(model, z))
    # XLA's spatial partitioning reorders float32 sums only: measured 2.1e-6.
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="block type"):
        vae_dc.AutoencoderDCConfig.from_dict(dict(BASE, decoder_block_types="Foo"))
    with pytest.raises(ValueError, match="upsample_block_type"):
        vae_dc.AutoencoderDCConfig.from_dict(dict(BASE, upsample_block_type="bicubic"))
    with pytest.raises(ValueError, match="norm type"):
        vae_dc.AutoencoderDCConfig.from_dict(dict(BASE, decoder_norm_types="layer_norm"))
