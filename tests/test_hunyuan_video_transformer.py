"""HunyuanVideo transformer == diffusers HunyuanVideoTransformer3DModel (text padding masked as diffusers' mask);
its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel as TorchModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
from flax import nnx

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import hunyuan_video as hv
from xdit_jax.safetensors_io import CheckpointError

TEXT = 6  # Llama tokens (256 in the pipeline)
# 2 heads of 8 (RoPE axes 2 + 2 + 4), 1 double-, 1 single-stream and 1 refiner block, guidance embedded.
CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
              qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=12, pooled_projection_dim=10, rope_theta=256.0,
              rope_axes_dim=(2, 2, 4))
# (frames, latent h, latent w): 5 frames (odd) of a 2 x 7 patch grid (the odd latent height 5 rounded down to the
# patch, as diffusers' strided conv does) = 70 video tokens, padded by ring x ulysses = 4 and by 3
SHAPE = (5, 5, 14)
# The hub's transformer config (hunyuanvideo-community/HunyuanVideo, transformer/config.json)
HUB = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
           num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
           qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
           rope_axes_dim=[16, 56, 56])


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = hv.HunyuanVideoConfig.from_dict(dict(tm.config))
    return tm, cfg, hv.build(cfg, hv.params_from_torch(state_dict_np(tm), cfg))


def _inputs(cfg, b, shape, lengths, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, *shape)).astype(np.float32)
    text = rng.standard_normal((b, TEXT, cfg.text_embed_dim)).astype(np.float32)
    mask = (np.arange(TEXT)[None] < np.array(lengths)[:, None]).astype(np.int64)
    pooled = rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)
    t = np.array([500.0, 937.5][:b], np.float32)
    g = np.full((b,), 6000.0, np.float32)  # the pipeline's guidance_scale x 1000
    return x, t, text, mask, pooled, g


def _torch(tm, x, t, text, mask, pooled, g):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(t), tt(text), tt(mask), tt(pooled), tt(g), return_dict=False)[0].numpy()


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    args = _inputs(cfg, 2, SHAPE, [TEXT, 3])
    return args, np.asarray(FWD(model, *args)), _torch(tm, *args)


def test_rope_tables_match_diffusers():
    for axes, grid in [((2, 2, 4), (5, 2, 7)), ((16, 56, 56), (9, 30, 53))]:
        f, h, w = grid
        ref = HunyuanVideoRotaryPosEmbed(2, 1, list(axes), 256.0)(torch.zeros(1, 1, f, 2 * h, 2 * w))
        cos, sin = hv.rope_tables(f, h, w, axes, 256.0)
        # the same float32 angles; our sin/cos correctly rounded (float64 then float32), torch's float32 ones
        # within an ulp of that (|values| <= 1: an ulp <= 2^-24)
        np.testing.assert_allclose(cos, ref[0].numpy(), rtol=0, atol=2 ** -23)
        np.testing.assert_allclose(sin, ref[1].numpy(), rtol=0, atol=2 ** -23)


def test_matches_diffusers_batch_of_two_text_lengths(batch2):
    _, out, ref = batch2
    assert out.shape == ref.shape == (2, 4, 5, 4, 14)
    # fp32 both sides, outputs O(2): measured 2.6e-5 (1.4e-5 of the output scale). The float32 floor: the
    # sinusoids of t and of the guidance (6,000 rad, whose float32 ulp is 5e-4: XLA's exp vs torch's moves them
    # by a few ulps of their frequencies) through 3 blocks. A text mask that lets one padded key in (or hides a
    # valid one), RoPE on the text, or a wrong axis order gives errors of O(0.03) and more.
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_matches_diffusers_one_prompt(pair, batch2):
    """Each prompt alone through diffusers (no other sample's padding in its batch) == its row of our batch."""
    tm, _, _ = pair
    args, out, _ = batch2
    for i in range(2):
        ref = _torch(tm, *(a[i:i + 1] for a in args))
        np.testing.assert_allclose(out[i:i + 1], ref, atol=1e-4, rtol=0, err_msg=str(i))  # as above


def test_mask_with_holes_as_diffusers(pair, batch2):
    """A mask that is not a prefix (left padding, holes): diffusers' refiner masks by the mask itself, its blocks by
    the valid count (the first mask.sum() text keys); ours the same (a prefix mask of the same counts moves
    diffusers' output by 0.014)."""
    tm, _, model = pair
    (x, t, text, _, pooled, g), _, _ = batch2
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]], np.int64)
    ref = _torch(tm, x, t, text, mask, pooled, g)
    np.testing.assert_allclose(np.asarray(FWD(model, x, t, text, mask, pooled, g)), ref, atol=1e-4, rtol=0)


def test_padded_text_changes_nothing(pair, batch2):
    """The text tokens past each prompt's valid length (its mask) reach neither the pooled mean, nor the refiner's
    valid rows, nor any key of the blocks: new values there leave the output as it was."""
    _, _, model = pair
    (x, t, text, mask, pooled, g), out, _ = batch2
    text2 = text.copy()
    text2[1, 3:] = 100.0 * np.random.default_rng(5).standard_normal(text2[1, 3:].shape)
    np.testing.assert_array_equal(np.asarray(FWD(model, x, t, text2, mask, pooled, g)), out)


def test_bf16_close_to_fp32(pair, batch2):
    tm, cfg, _ = pair
    args, ref, _ = batch2
    m16 = hv.build(cfg, hv.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16 weights and activations (0.4% steps), norms, softmax and RoPE in float32, through 3 blocks and the
    # refiner: measured 1.1% of the output scale
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


def test_config_checkpoint_and_input_errors(pair, batch2):
    tm, cfg, model = pair
    (x, t, text, mask, pooled, _), _, _ = batch2
    with pytest.raises(ValueError, match="pass guidance"):
        jax.eval_shape(lambda: model(x, t, text, mask, pooled, None))
    d = dict(tm.config)
    for bad, needle in [(dict(image_condition_type="token_concat"), "latent_concat"),
                        (dict(rope_axes_dim=[2, 2, 2]), "summing to attention_head_dim"),
                        (dict(qk_norm="layer_norm"), "rms_norm")]:
        with pytest.raises(ValueError, match=needle):
            hv.HunyuanVideoConfig.from_dict({**d, **bad})
    sd = state_dict_np(tm)
    gone = ["context_embedder.token_refiner.refiner_blocks.0.attn.to_k.weight",
            "single_transformer_blocks.0.attn.norm_k.weight"]
    for k in gone:
        sd.pop(k)
    with pytest.raises(CheckpointError) as e:
        hv.params_from_torch(sd, cfg)
    for k in gone:
        assert k in str(e.value), k


def test_diffusers_folder_converts(pair, batch2, tmp_path):
    """A diffusers save_pretrained folder of the transformer converts (MODEL_CLASSES) into the same model."""
    from xdit_jax.conversion import convert_component

    tm, _, _ = pair
    args, out, _ = batch2
    tm.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    cfg_dict, params = convert_component(tmp_path / "transformer", "HunyuanVideoTransformer3DModel")
    model = hv.build(hv.HunyuanVideoConfig.from_dict(cfg_dict), params)
    np.testing.assert_array_equal(np.asarray(FWD(model, *args)), out)


def test_full_size_parameter_count_matches_diffusers():
    with torch.device("meta"):
        tm = TorchModel(**HUB)
    want = sum(p.numel() for p in tm.parameters())
    cfg = hv.HunyuanVideoConfig.from_dict(HUB)
    shapes = hv.expected_shapes(lambda: hv.HunyuanVideoTransformer3DModel(cfg))
    got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert got == want  # 12.8B


MESHES = ["ring=2,ulysses=2", "ulysses=3"]
SLOW_MESHES = ["ring=2", "ulysses=2", "cfg=2,ring=2"]


@pytest.mark.parametrize("mesh", MESHES + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW_MESHES])
def test_sequence_parallel_equals_one_device(pair, batch2, mesh):
    _, _, model = pair
    args, ref, _ = batch2
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh), text=hv.TEXT_KEYS)(*args))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the text partial, padded zero heads);
    # outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


@pytest.mark.slow  # ~12 s each here (FLUX's PipeFusion tests cover the mechanics in the fast run)
@pytest.mark.parametrize("mesh,patches", [("pipefusion=2,ulysses=2", 2), ("pipefusion=2,ring=2", 3)])
def test_pipefusion_patches_with_buffers_of_the_same_input_are_exact(pair, batch2, mesh, patches):
    """PipeFusion drives the two stacks (pipefusion_stacks; the text sliced with the patches, its key mask whole):
    a warm-up pass, then a patched pass over the buffers it filled, both == the blocks on one device."""
    from tests.test_pipefusion_stacks import _check_exact, _warm_then_patched

    _, cfg, model = pair
    args, _, _ = batch2
    x, tokens, cond = jax.jit(lambda m, *a: m.embed(*a))(model, *args)
    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda st: nnx.merge(graphdef, st).blocks(x, tokens, cond))(state)
    warm, patched, cache1, cache2, _ = _warm_then_patched((cfg, graphdef, state, (x, tokens, cond), ref), hv, mesh,
                                                          patches)
    _check_exact(ref, warm, patched, cache1, cache2)


def test_analytic_flops_equal_the_compiled_programs(batch2):
    """bench_families.hunyuan_video_analytic_flops == the compiled forward's dots and convolutions (one device), on
    abstract weights (no values) of 2 + 2 blocks: with one single-stream block XLA drops the last block's text
    MLP and output (dead: only its keys and values are read), which a scan over the blocks keeps."""
    from xdit_jax.bench_families import hunyuan_video_analytic_flops
    from xdit_jax.hlo import matmul_flops

    config = dict(CONFIG, num_layers=2, num_single_layers=2, num_refiner_layers=2)
    cfg = hv.HunyuanVideoConfig.from_dict(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: hv.HunyuanVideoTransformer3DModel(cfg)))
    args, _, _ = batch2
    hlo = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(abstract, *args).compile().as_text()
    want = hunyuan_video_analytic_flops(config, args[0].shape, TEXT)
    assert want["tokens"] == 5 * 2 * 7 and want["linear"] + want["attention"] == want["total"]
    assert matmul_flops(hlo) == pytest.approx(want["total"], rel=1e-9)
