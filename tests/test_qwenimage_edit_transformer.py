"""The Qwen-Image transformer with condition images appended (Qwen-Image-Edit's sequence: the noisy latents' tokens,
then each condition image's, img_shapes with several shapes, RoPE per image) and zero_cond_t (2511: timestep 0's
modulation on the condition tokens) == diffusers QwenImageTransformer2DModel; its sequence-parallel run == one
device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel as TorchModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import qwenimage as qi

TEXT = 7
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6))
# the noisy latents' packed grid, then two condition images of other sizes (Plus): 15 + 8 + 12 = 35 tokens
SHAPES = [(1, 3, 5), (1, 2, 4), (1, 4, 3)]
N = sum(f * h * w for f, h, w in SHAPES)


# without zero_cond_t (Qwen-Image-Edit, 2509): slow, its path in the default run is the Edit pipeline's parity with
# diffusers and its cfg x ring x ulysses mesh (tests/test_qwenimage_edit_pipeline.py)
@pytest.fixture(scope="module", params=[pytest.param(False, marks=pytest.mark.slow), True],
                ids=["edit", "zero_cond_t"])
def pair(request):
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG, zero_cond_t=request.param), seed=1, std=0.15)
    cfg = qi.QwenImageConfig.from_dict(dict(tm.config))
    assert cfg.zero_cond_t == request.param
    model = qi.build(cfg, qi.params_from_torch(state_dict_np(tm), cfg))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, N, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    mask = (np.arange(TEXT)[None] < np.array([TEXT, 4])[:, None]).astype(np.int64)
    t = np.array([0.5, 0.9375], np.float32)
    args = (x, text, mask, t)
    with torch.no_grad():
        ref = tm(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                 encoder_hidden_states_mask=torch.from_numpy(mask), timestep=torch.from_numpy(t),
                 img_shapes=[SHAPES] * 2, return_dict=False)[0].numpy()
    return cfg, model, args, ref


def _rope(cfg):
    return qi.rope_tables_multi(SHAPES, TEXT, cfg.axes_dims_rope)


def _flags(cfg):
    return qi.condition_flags(SHAPES) if cfg.zero_cond_t else None


FWD = jax.jit(lambda m, x, c, mask, t, rope, flags: m(x, c, mask, t, rope=rope, cond_flags=flags))


def test_rope_tables_match_diffusers():
    for axes, shapes, text in [((4, 6, 6), SHAPES, 7), ((16, 56, 56), [(1, 64, 40), (1, 37, 52), (1, 64, 64)], 30)]:
        emb = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
        vid, txt = emb([shapes], max_txt_seq_len=text, device=torch.device("cpu"))
        (ic, is_), (tc, ts) = qi.rope_tables_multi(shapes, text, axes)
        for ours_c, ours_s, ref in ((ic, is_, vid), (tc, ts, txt)):  # within an ulp, as test_qwenimage_transformer
            np.testing.assert_allclose(ours_c[:, ::2], ref.real.numpy(), rtol=0, atol=2 ** -23)
            np.testing.assert_allclose(ours_s[:, ::2], ref.imag.numpy(), rtol=0, atol=2 ** -23)


def test_matches_diffusers(pair):
    cfg, model, args, ref = pair
    out = np.asarray(FWD(model, *args, _rope(cfg), _flags(cfg)))
    assert out.shape == ref.shape == (2, N, 16)
    # fp32 both sides, outputs O(4.2), as test_qwenimage_transformer (5e-5 there): measured 2.0e-5 / 1.7e-5
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=0)
    if cfg.zero_cond_t:  # the condition tokens' modulation matters: the step's timestep for all moves the output
        other = np.asarray(FWD(model, *args, _rope(cfg), np.zeros(N, np.float32)))
        assert np.abs(other - ref).max() > 1e-2


@pytest.mark.parametrize("mesh", ["ring=2,ulysses=2"])
def test_sequence_parallel_equals_one_device(pair, mesh):
    """35 tokens over 4 devices (padded by 1): the condition flags and RoPE tables shard with the tokens."""
    cfg, model, args, _ = pair
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh), text=qi.TEXT_KEYS)(
        *args, None, rope=_rope(cfg), cond_flags=_flags(cfg)))
    one = np.asarray(FWD(model, *args, _rope(cfg), _flags(cfg)))
    # fp32: the order of float32 sums only; measured 1.7e-6 / 1.3e-6 of 4.2 (as test_qwenimage_transformer's meshes)
    np.testing.assert_allclose(out, one, atol=1e-5, rtol=0)
