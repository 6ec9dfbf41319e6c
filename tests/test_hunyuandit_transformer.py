"""HunyuanDiT transformer == diffusers HunyuanDiT2DModel; its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HunyuanDiT2DModel as TorchModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import hunyuandit as hy
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.safetensors_io import CheckpointError

TEXT, TEXT_T5 = 5, 7  # BERT / mT5 tokens (77 / 256 in the releases)
BASE = dict(in_channels=4, patch_size=2, sample_size=8, cross_attention_dim=24, cross_attention_dim_t5=16,
            pooled_projection_dim=12, text_len=TEXT, text_len_t5=TEXT_T5)
VARIANTS = {
    # v1.0/1.1-like: image-meta sizes + style in the conditioning, learned sigma (out = 2 x in),
    # 6 layers: 2 push a skip, 2 in the middle, 2 pop one; a non-integer mlp_ratio (4.3637 in the
    # releases) -> ff inner int(16 x 2.5) = 40.
    "v11": dict(BASE, num_attention_heads=2, attention_head_dim=8, hidden_size=16, num_layers=6, mlp_ratio=2.5,
                learn_sigma=True, use_style_cond_and_image_meta_size=True),
    # v1.2-like: pooled text only, no sigma; 4 layers (1 push, 2 middle, 1 pop); 3 heads of 4 (the
    # smallest 2D-RoPE head), padded to 4 heads on ulysses=2.
    "v12": dict(BASE, num_attention_heads=3, attention_head_dim=4, hidden_size=12, num_layers=4, mlp_ratio=4.0,
                learn_sigma=False, use_style_cond_and_image_meta_size=False),
}
# (batch, latent h, latent w): grids 5 x 7 (wide: the RoPE crop region is 23 x 32 rows/cols of the
# 32-grid, top offset round(4.5) = 4) and 6 x 4 (tall: the other branch). 35 tokens: no sequence
# degree below divides it, so every mesh pads.
SHAPES = [(2, 10, 14), (2, 12, 8)]
# Sample 0 keeps every token; sample 1 has padding in both texts (replaced by text_embedding_padding).
MASK = np.array([[1] * TEXT, [1] * 3 + [0] * (TEXT - 3)])
MASK_T5 = np.array([[1] * TEXT_T5, [1] * 4 + [0] * (TEXT_T5 - 4)])


def _torch_model(d):
    torch.manual_seed(0)
    return randomize_(TorchModel(**d), seed=1, std=0.15)


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    tm = _torch_model(VARIANTS[request.param])
    cfg = hy.HunyuanDiTConfig.from_dict(dict(tm.config))
    model = hy.build(cfg, hy.params_from_torch(state_dict_np(tm), cfg))
    return request.param, tm, cfg, model


def _inputs(cfg, b, h, w, seed=0):
    """As the pipeline makes them: float timesteps, meta sizes [orig h, w, target h, w, crop top, left]
    in pixels, style 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    bert = rng.standard_normal((b, TEXT, cfg.cross_attention_dim)).astype(np.float32)
    t5 = rng.standard_normal((b, TEXT_T5, cfg.cross_attention_dim_t5)).astype(np.float32)
    t = np.array([999.0, 37.0][:b], np.float32)
    meta = np.tile(np.array([[h * 8, w * 8, h * 8, w * 8, 0, 0]], np.float32), (b, 1))
    style = np.zeros((b,), np.int64)
    return x, t, bert, MASK[:b], t5, MASK_T5[:b], meta, style


def _pipeline_rope(cfg, h, w):
    """The pipeline's image_rotary_emb for latents (h, w)."""
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    base = 512 // 8 // cfg.patch_size
    return get_2d_rotary_pos_embed(cfg.attention_head_dim, get_resize_crop_region_for_grid((gh, gw), base),
                                   (gh, gw), output_type="pt")


def _torch(tm, cfg, x, t, bert, mask, t5, mask_t5, meta, style):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(t), encoder_hidden_states=tt(bert), text_embedding_mask=tt(mask),
                  encoder_hidden_states_t5=tt(t5), text_embedding_mask_t5=tt(mask_t5), image_meta_size=tt(meta),
                  style=tt(style), image_rotary_emb=_pipeline_rope(cfg, *x.shape[-2:]), return_dict=False)[0].numpy()


def test_rope_tables_match_the_pipeline():
    for gh, gw in [(5, 7), (6, 4), (1, 3), (32, 32), (64, 64), (48, 80), (96, 54)]:
        assert hy.resize_crop_region(gh, gw, 32) == get_resize_crop_region_for_grid((gh, gw), 32)
    for hd, gh, gw in [(8, 5, 7), (4, 6, 4), (8, 1, 3), (88, 64, 64), (88, 48, 80)]:
        ref_cos, ref_sin = get_2d_rotary_pos_embed(hd, get_resize_crop_region_for_grid((gh, gw), 32), (gh, gw),
                                                   output_type="pt")
        cos, sin = hy.rope_2d(hd, gh, gw, 32)
        # float32 both sides: positions reproduce torch's linspace bit for bit; angles up to 32 rad
        # carry float32 rounding of 2e-6 (ulp of 32) from the libm cos/sin and products.
        np.testing.assert_allclose(cos, ref_cos.numpy(), atol=4e-6, rtol=0)
        np.testing.assert_allclose(sin, ref_sin.numpy(), atol=4e-6, rtol=0)


def test_matches_diffusers(pair):
    name, tm, cfg, model = pair
    assert cfg.out_ch == (8 if name == "v11" else 4)
    # one grid per variant (one compile each: the default run's time); both grids are padded under the meshes below
    for b, h, w in SHAPES[:1] if name == "v11" else SHAPES[1:]:
        args = _inputs(cfg, b, h, w)
        ref = _torch(tm, cfg, *args)
        out = np.asarray(FWD(model, *args))
        assert out.shape == ref.shape == (b, cfg.out_ch, h, w)
        # fp32 on both sides, outputs O(1-4): measured 3e-6. 2e-5 allows reordered float32 sums over
        # 4-6 blocks; the bugs tried give 0.4 and more (the text padding ignored: 0.4; the skips popped
        # in push order: 2.5; rotated text keys: 0.4; the RoPE halves (w, h) swapped: 0.7-1).
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=f"{name} {(b, h, w)}")


def test_rotary_override_and_two_layers():
    # num_layers=2: only the middle pair (no skips); the explicit image_rotary_emb (the pipeline's
    # torch tables) gives the same as the tables computed inside embed.
    tm = _torch_model(dict(VARIANTS["v11"], num_layers=2))
    cfg = hy.HunyuanDiTConfig.from_dict(dict(tm.config))
    model = hy.build(cfg, hy.params_from_torch(state_dict_np(tm), cfg))
    assert model.blocks_down is None and model.blocks_skip is None
    b, h, w = SHAPES[0]
    args = _inputs(cfg, b, h, w, seed=3)
    ref = _torch(tm, cfg, *args)
    rope = tuple(a.numpy() for a in _pipeline_rope(cfg, h, w))
    out = np.asarray(FWD(model, *args, rope))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # bf16 numerics run in the default set on CogVideoX 5b and FLUX schnell (the same layers' casts)
def test_bf16_close_to_fp32():
    tm = _torch_model(VARIANTS["v11"])
    cfg = hy.HunyuanDiTConfig.from_dict(dict(tm.config))
    sd = state_dict_np(tm)
    m32 = hy.build(cfg, hy.params_from_torch(sd, cfg))
    m16 = hy.build(cfg, hy.params_from_torch(sd, cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    args = _inputs(cfg, *SHAPES[0], seed=1)
    ref = np.asarray(FWD(m32, *args))
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16: 8-bit mantissa (0.4% steps); through 6 blocks the error stays a few % of the output scale.
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_config_and_input_errors(pair):
    name, tm, cfg, model = pair
    d = dict(tm.config)
    for bad, needle in [(dict(num_layers=5), "even"), (dict(hidden_size=cfg.inner_dim + 4), "hidden_size"),
                        (dict(attention_head_dim=6, hidden_size=6 * cfg.num_attention_heads), "multiple of 4"),
                        (dict(cross_attention_dim_t5=12), "8 heads"), (dict(activation_fn="geglu"), "activation_fn")]:
        with pytest.raises(ValueError, match=needle):
            hy.HunyuanDiTConfig.from_dict({**d, **bad})
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        hy.check_input_shape(cfg, 9, 8)
    x, t, bert, mask, t5, mask_t5, meta, style = _inputs(cfg, 2, 8, 8)
    shapes_only = lambda *a: jax.eval_shape(lambda: model(*a))  # traces, computes nothing
    with pytest.raises(ValueError, match=r"encoder_hidden_states_t5 \(mT5\)"):
        shapes_only(x, t, bert, mask, t5[:, :-1], mask_t5[:, :-1], meta, style)
    with pytest.raises(ValueError, match="text_embedding_mask "):
        shapes_only(x, t, bert, mask[:, :-1], t5, mask_t5, meta, style)
    if cfg.use_style_cond_and_image_meta_size:
        with pytest.raises(ValueError, match="image_meta_size"):
            shapes_only(x, t, bert, mask, t5, mask_t5)
    else:  # v1.2 ignores them
        assert shapes_only(x, t, bert, mask, t5, mask_t5).shape == (2, cfg.out_ch, 8, 8)


def test_checkpoint_mismatch_is_reported(pair):
    name, tm, cfg, _ = pair
    n = cfg.num_layers
    sd = state_dict_np(tm)
    sd.pop(f"blocks.{n - 1}.skip_linear.weight")  # the last layer of the skip stack (torch offset n/2+1)
    sd.pop(f"blocks.{n // 2 - 1}.attn2.norm_k.weight")  # the first middle layer
    sd[f"blocks.{n}.norm3.weight"] = np.ones(cfg.inner_dim, np.float32)  # one layer too many
    sd["text_embedding_padding"] = sd["text_embedding_padding"][:-1]
    with pytest.raises(CheckpointError) as e:
        hy.params_from_torch(sd, cfg)
    msg = str(e.value)
    for key in (f"blocks.{n - 1}.skip_linear.weight", f"blocks.{n // 2 - 1}.attn2.norm_k.weight",
                f"blocks.{n}.norm3.weight", "text_embedding_padding"):
        assert key in msg, key


def test_stacks_cover_every_layer_once(pair):
    name, tm, cfg, model = pair
    assert hasattr(model, hy.STACKED)
    # PipeFusion's stacks: those the config has, in the order the blocks run
    assert hy.pipefusion_stacks(cfg)["stacked"] == tuple(n for n in hy.STACKS if getattr(model, n) is not None)
    layers = [first + i for _, first, count in hy.stacked_layout(cfg).values() for i in range(count)]
    assert layers == list(range(cfg.num_layers))
    skip = {i for i, blk in enumerate(tm.blocks) if blk.skip_linear is not None}
    _, first, count = hy.stacked_layout(cfg)["blocks_skip"]
    assert skip == set(range(first, first + count))


# v11: every mesh (2 heads, zero-padded to 3 on ulysses=3); v12: its 3 heads padded to 4 on ulysses=2,
# and the batch split over cfg.
# Slow-marked (the default run's time): v11's ulysses=2 and ring=2 (ring=2,ulysses=2 runs both axes, ulysses=3 pure
# ulysses, v12's cfg=2,ring=2 ring without ulysses); `pytest -m slow` runs them.
MESH_CASES = [("v11", m) for m in ["ulysses=2", "ring=2", "ring=2,ulysses=2", "ulysses=3", "cfg=2,ulysses=2"]] \
    + [("v12", m) for m in ["ulysses=2", "cfg=2,ring=2"]]
_SLOW_MESHES = {("v11", "ulysses=2"), ("v11", "ring=2")}


@pytest.mark.parametrize("pair,mesh", [pytest.param(v, m, marks=pytest.mark.slow) if (v, m) in _SLOW_MESHES
                                       else (v, m) for v, m in MESH_CASES], indirect=["pair"],
                         ids=[f"{v}-{m}" for v, m in MESH_CASES])
def test_sequence_parallel_equals_one_device(pair, mesh):
    name, tm, cfg, model = pair
    b, h, w = SHAPES[0]  # 35 image tokens: padded for every degree here
    args = _inputs(cfg, b, h, w, seed=2)
    ref = np.asarray(FWD(model, *args))
    graphdef, state = nnx.split(model)
    m = build_mesh(mesh)

    @jax.jit
    def parallel(state, args):
        mdl = nnx.merge(graphdef, state)
        x, tokens, cond = mdl.embed(*args)
        blocks = lambda p, y, tk, c: nnx.merge(graphdef, p).blocks(y, tk, c)
        y = run_blocks(blocks, state, x, tokens, cond, m)
        return mdl.head(y, cond, args[0].shape)

    out = np.asarray(parallel(state, args))
    # fp32; only the order of float32 sums differs (ring's LSE merge, padded zero heads): outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)
