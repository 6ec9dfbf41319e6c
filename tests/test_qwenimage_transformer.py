"""Qwen-Image transformer == diffusers QwenImageTransformer2DModel (text padding masked as diffusers' joint mask,
its centred 3-D RoPE); its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel as TorchModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from tests.fixtures import torch_and_our_model
from tests.jax_util import sequence_parallel_forward
from tests.torch_util import state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import qwenimage as qi
from xdit_jax.safetensors_io import CheckpointError

TEXT = 7  # Qwen2.5-VL states (the prompt's tokens after the template's 34)
# 2 heads of 16 (RoPE axes 4 + 6 + 6), 2 blocks, packed latents of 4 x 4 channels
CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6))
GRID = (3, 5)  # packed grid (odd both ways: the centring's rounding), 15 image tokens: padded by 4 and by 3
# Qwen/Qwen-Image transformer/config.json (diffusers' defaults)
HUB = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
           num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56])


def _fwd(m, x, c, mask, t, rope):
    return m(x, c, mask, t, rope=rope)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, qi, qi.QwenImageConfig)


def _inputs(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    x = rng.standard_normal((b, GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((b, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    mask = (np.arange(TEXT)[None] < np.array(lengths)[:, None]).astype(np.int64)
    t = np.array([0.5, 0.9375][:b], np.float32)  # the pipeline's t / 1000
    return x, text, mask, t


def _torch(tm, x, text, mask, t):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(hidden_states=tt(x), encoder_hidden_states=tt(text),
                  encoder_hidden_states_mask=None if mask is None else tt(mask), timestep=tt(t),
                  img_shapes=[[(1, *GRID)]] * x.shape[0], return_dict=False)[0].numpy()


def _rope(cfg):
    return qi.rope_tables(*GRID, TEXT, cfg.axes_dims_rope)


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    args = _inputs(cfg, [TEXT, 3])
    return args, np.asarray(FWD(model, *args, _rope(cfg))), _torch(tm, *args)


def test_rope_tables_match_diffusers():
    for axes, grid, text in [((4, 6, 6), (3, 5), 7), ((16, 56, 56), (83, 64), 300), ((16, 56, 56), (40, 41), 5)]:
        emb = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
        vid, txt = emb([(1, *grid)], max_txt_seq_len=text, device=torch.device("cpu"))
        (ic, is_), (tc, ts) = qi.rope_tables(*grid, text, axes)
        # diffusers: complex (N, hd/2); ours interleaved (N, hd). The same float32 angles; our sin/cos correctly
        # rounded, torch's float32 ones within an ulp (|values| <= 1: an ulp <= 2^-24)
        for ours_c, ours_s, ref in ((ic, is_, vid), (tc, ts, txt)):
            np.testing.assert_allclose(ours_c[:, ::2], ref.real.numpy(), rtol=0, atol=2 ** -23)
            np.testing.assert_allclose(ours_s[:, ::2], ref.imag.numpy(), rtol=0, atol=2 ** -23)
            np.testing.assert_array_equal(ours_c[:, ::2], ours_c[:, 1::2])


def test_matches_diffusers_batch_of_two_text_lengths(batch2):
    _, out, ref = batch2
    assert out.shape == ref.shape == (2, 15, 16)
    # fp32 both sides, outputs O(4): measured 1.9e-5 (5e-6 of the output scale: the float32 floor through 2
    # blocks). A text mask that lets one padded key in moves diffusers' own output by 0.40.
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=0)


def test_matches_diffusers_one_prompt_and_no_mask(pair, batch2):
    """Each prompt alone through diffusers == its row of our batch; the full-length one also without a mask (the
    pipeline passes None when every token is valid)."""
    tm, cfg, model = pair
    args, out, _ = batch2
    for i in range(2):
        ref = _torch(tm, *(a[i:i + 1] for a in args))
        np.testing.assert_allclose(out[i:i + 1], ref, atol=5e-5, rtol=0, err_msg=str(i))  # as above
    x, text, _, t = (a[:1] for a in args)
    np.testing.assert_allclose(np.asarray(FWD(model, x, text, None, t, _rope(cfg))), _torch(tm, x, text, None, t),
                               atol=5e-5, rtol=0)


def test_mask_with_holes_and_padding_values(pair, batch2):
    """A mask that is not a prefix (holes, left padding) masks those keys as diffusers; new values at masked
    positions change no image token."""
    tm, cfg, model = pair
    (x, text, _, t), _, _ = batch2
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0, 1]], np.int64)
    out = np.asarray(FWD(model, x, text, mask, t, _rope(cfg)))
    np.testing.assert_allclose(out, _torch(tm, x, text, mask, t), atol=5e-5, rtol=0)
    text2 = text.copy()
    text2[1, 4:6] = 100.0
    np.testing.assert_array_equal(np.asarray(FWD(model, x, text2, mask, t, _rope(cfg))), out)


def test_img_shape_path(pair, batch2):
    """The grid given instead of the RoPE tables: the same tables made inside (the edit bench rows run this path
    against diffusers: tests/test_bench_newer_families.py); a grid that is not the tokens' refused."""
    tm, cfg, model = pair
    args, ref, _ = batch2
    x, text, mask, t = args
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda m, *a: m(*a, (1, *GRID)))(model, *args)),
                                  np.asarray(FWD(model, *args, _rope(cfg))))
    with pytest.raises(ValueError, match="image tokens"):
        model(x, text, mask, t, (1, 4, 4))


@pytest.mark.slow  # bf16 numerics run in the default set on CogVideoX 5b and FLUX schnell (the same layers' casts)
def test_bf16_close_to_fp32(pair, batch2):
    tm, cfg, model = pair
    args, ref, _ = batch2
    m16 = qi.build(cfg, qi.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    out = np.asarray(FWD(m16, *args, _rope(cfg)).astype(jnp.float32))
    # bf16 weights and activations (0.4% steps), norms, softmax and RoPE in float32, through 2 blocks: measured
    # 1.5% of the output scale
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


def test_config_and_checkpoint_errors(pair):
    tm, cfg, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(use_layer3d_rope=True), "use_layer3d_rope"),
                        (dict(use_additional_t_cond=True), "use_additional_t_cond"),
                        (dict(guidance_embeds=True), "guidance"),
                        (dict(axes_dims_rope=[4, 4, 4]), "summing to attention_head_dim")]:
        with pytest.raises(ValueError, match=needle):
            qi.QwenImageConfig.from_dict({**d, **bad})
    sd = state_dict_np(tm)
    gone = ["transformer_blocks.1.img_mod.1.weight", "transformer_blocks.0.attn.norm_added_k.weight"]
    for k in gone:
        sd.pop(k)
    with pytest.raises(CheckpointError) as e:
        qi.params_from_torch(sd, cfg)
    for k in gone:
        assert k in str(e.value), k


def test_diffusers_folder_converts(pair, batch2, tmp_path):
    """A diffusers save_pretrained folder of the transformer converts (MODEL_CLASSES) into the same model."""
    from xdit_jax.conversion import convert_component

    tm, cfg, _ = pair
    args, out, _ = batch2
    tm.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    cfg_dict, params = convert_component(tmp_path / "transformer", "QwenImageTransformer2DModel")
    model = qi.build(qi.QwenImageConfig.from_dict(cfg_dict), params)
    np.testing.assert_array_equal(np.asarray(FWD(model, *args, _rope(cfg))), out)


def test_full_size_parameter_count_matches_diffusers():
    with torch.device("meta"):
        tm = TorchModel(**HUB)
    want = sum(p.numel() for p in tm.parameters())
    cfg = qi.QwenImageConfig.from_dict(HUB)
    shapes = qi.expected_shapes(lambda: qi.QwenImageTransformer2DModel(cfg))
    got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert got == want  # 20.4B


MESHES = ["ring=2,ulysses=2", "ulysses=3"]
SLOW_MESHES = ["ring=2", "cfg=2,ring=3"]


@pytest.mark.parametrize("mesh", MESHES + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MESHES])
def test_sequence_parallel_equals_one_device(pair, batch2, mesh):
    _, cfg, model = pair
    (x, text, mask, t), ref, _ = batch2
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh), text=qi.TEXT_KEYS)(
        x, text, mask, t, None, rope=_rope(cfg)))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the text partial, padded tokens); outputs
    # O(4): measured 1.0e-6 to 1.2e-6 on the four meshes
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)
