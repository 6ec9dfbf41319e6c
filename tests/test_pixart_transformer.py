"""PixArt transformer == diffusers PixArtTransformer2DModel; its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel as TorchModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import pixart
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.safetensors_io import CheckpointError

BASE = dict(in_channels=4, num_layers=2, sample_size=8, caption_channels=12)
VARIANTS = {
    # PixArt-alpha-like: resolution / aspect-ratio conditions (set explicitly: the default needs
    # sample_size 128), learned sigma (out = 2 x in). 3 heads x 8: the size embeddings need D % 3 == 0,
    # and ulysses=2 then pads the heads.
    "alpha": dict(BASE, num_attention_heads=3, attention_head_dim=8, cross_attention_dim=24, out_channels=8,
                  use_additional_conditions=True),
    # PixArt-Sigma-like: no extra conditions, interpolation_scale 2 (as Sigma 1024), out_channels None
    # (= in_channels); affine block norms (no release has them) to exercise that path too.
    # (diffusers' PixArtTransformer2DModel takes no pos_embed_max_size: its PatchEmbed never crops.)
    "sigma": dict(BASE, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, out_channels=None,
                  use_additional_conditions=False, interpolation_scale=2, norm_elementwise_affine=True),
}
L = 7  # caption tokens
# (batch, latent h, latent w): the second differs from sample_size (positions rebuilt, diffusers'
# other branch) and is not square (h/w order); its 5 x 7 = 35 image tokens no sequence degree
# below divides, so padding is exercised.
SHAPES = [(2, 8, 8), (2, 10, 14)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**VARIANTS[request.param]), seed=1, std=0.15)
    cfg = pixart.PixArtConfig.from_dict(dict(tm.config))
    model = pixart.build(cfg, pixart.params_from_torch(state_dict_np(tm), cfg))
    fwd = jax.jit(lambda m, x, e, t, c, msk: m(x, e, t, c, msk))
    return request.param, tm, cfg, model, fwd


def _inputs(cfg, b, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, L, cfg.caption_channels)).astype(np.float32)
    t = np.array([999, 37][:b], dtype=np.int64)
    added = None
    if cfg.additional_conditions:  # as the pipeline builds them: pixels [h, w], h / w
        added = {"resolution": np.tile(np.array([[h * 8, w * 8]], np.float32), (b, 1)),
                 "aspect_ratio": np.full((b, 1), h / w, np.float32)}
    return x, enc, t, added


def _torch(tm, x, enc, t, added, mask):
    tt = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        return tm(tt(x), encoder_hidden_states=tt(enc), timestep=tt(t),
                  added_cond_kwargs=None if added is None else {k: tt(v) for k, v in added.items()},
                  encoder_attention_mask=tt(mask), return_dict=False)[0].numpy()


def test_position_table_matches_diffusers():
    for gh, gw, base, interp in [(4, 4, 4, 1), (5, 7, 4, 2), (8, 3, 64, 2), (64, 64, 64, 1)]:
        ref = get_2d_sincos_pos_embed(24, (gh, gw), base_size=base, interpolation_scale=interp,
                                      output_type="pt").float().numpy()
        np.testing.assert_allclose(pixart.sincos_2d_table(24, gh, gw, base, interp), ref, atol=1e-6, rtol=0)


# (mask, atol): no mask; padding in one sample; one sample with every caption token masked. fp32 on
# both sides, outputs O(1-5): 2e-5 allows reordered float32 sums over 2 blocks of width 16-24 (a
# layout, position or mask bug gives errors of order 1e-2 to 1e-1; the padding mask alone moves its
# sample by 3e-2). A fully masked row: diffusers adds -10000 to every logit, whose float32 ulp there
# is 1e-3, so its softmax weights carry rounding of ~5e-4 (measured 1e-4 on the outputs); a zero row
# (a -inf mask) instead of its uniform average would be off by 0.3.
MASKS = [(None, 2e-5), (np.array([[1] * L, [1] * 4 + [0] * (L - 4)]), 2e-5),
         (np.array([[1] * 3 + [0] * (L - 3), [0] * L]), 5e-4)]


def test_matches_diffusers(pair):
    name, tm, cfg, model, fwd = pair
    assert cfg.out_ch == (8 if name == "alpha" else 4) and cfg.learned_sigma == (name == "alpha")
    for b, h, w in SHAPES:
        x, enc, t, added = _inputs(cfg, b, h, w)
        for mask, atol in MASKS:
            ref = _torch(tm, x, enc, t, added, mask)
            out = np.asarray(fwd(model, x, enc, t, added, mask))
            assert out.shape == ref.shape == (b, cfg.out_ch, h, w)
            np.testing.assert_allclose(out, ref, atol=atol, rtol=2e-5, err_msg=f"{name} {(b, h, w)} {mask}")


@pytest.mark.parametrize("pair", ["alpha"], indirect=True)  # one variant: the bf16 paths are the same code
def test_bf16_close_to_fp32(pair):
    name, tm, cfg, model, fwd = pair
    m16 = pixart.build(cfg, pixart.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    x, enc, t, added = _inputs(cfg, *SHAPES[0], seed=1)
    ref = np.asarray(fwd(model, x, enc, t, added, None))
    out = np.asarray(fwd(m16, x, enc, t, added, None).astype(jnp.float32))
    # bf16: 8-bit mantissa (0.4% steps); through 2 blocks the error stays a few % of the output scale.
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_config_and_input_errors(pair):
    name, tm, cfg, model, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(norm_type="ada_norm_zero"), "ada_norm_single"),
                        (dict(attention_type="gated"), "GLIGEN"),
                        (dict(cross_attention_dim=cfg.inner_dim + 1), "cross_attention_dim")]:
        with pytest.raises(ValueError, match=needle):
            pixart.PixArtConfig.from_dict({**d, **bad})
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        pixart.check_input_shape(cfg, 9, 8)
    x, enc, t, added = _inputs(cfg, 1, 8, 8)
    shapes_only = lambda *a: jax.eval_shape(lambda: model(*a))  # traces, computes nothing
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        shapes_only(x, enc, t, added, np.ones((1, L + 1)))
    if cfg.additional_conditions:
        with pytest.raises(ValueError, match="additional conditions"):
            shapes_only(x, enc, t)


def test_checkpoint_mismatch_is_reported(pair):
    name, tm, cfg, _, _ = pair
    sd = state_dict_np(tm)
    sd.pop("transformer_blocks.1.attn2.to_k.weight")
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["pos_embed.pos_embed"] = np.zeros((1, 16, cfg.inner_dim), np.float32)  # a buffer some exports keep
    with pytest.raises(CheckpointError) as e:
        pixart.params_from_torch(sd, cfg)
    msg = str(e.value)
    assert "transformer_blocks.1.attn2.to_k.weight" in msg and "proj_out.weight" in msg and "extra.weight" in msg
    assert "pos_embed.pos_embed" not in msg


# sigma: every mesh (2 heads, zero-padded to 3 on ulysses=3); alpha: the meshes its own paths need
# (3 heads padded to 4 on ulysses=2; the size conditions split over cfg).
MESH_CASES = [("sigma", m) for m in ["ulysses=2", "ring=2", "ring=2,ulysses=2", "ulysses=3", "cfg=2,ulysses=2"]] \
    + [("alpha", m) for m in ["ulysses=2", "cfg=2,ulysses=2"]]


@pytest.mark.parametrize("pair,mesh", MESH_CASES, indirect=["pair"], ids=[f"{v}-{m}" for v, m in MESH_CASES])
def test_sequence_parallel_equals_one_device(pair, mesh):
    name, tm, cfg, model, fwd = pair
    b, h, w = SHAPES[1]  # 35 image tokens: padded for every degree here
    x, enc, t, added = _inputs(cfg, b, h, w, seed=2)
    mask = MASKS[1][0]
    ref = np.asarray(fwd(model, x, enc, t, added, mask))
    graphdef, state = nnx.split(model)
    m = build_mesh(mesh)

    @jax.jit
    def parallel(state, x, enc, t, mask):
        mdl = nnx.merge(graphdef, state)
        tokens_x, tokens, cond = mdl.embed(x, enc, t, added, mask)
        blocks = lambda p, y, tk, c: nnx.merge(graphdef, p).blocks(y, tk, c)
        y = run_blocks(blocks, state, tokens_x, tokens, cond, m)
        return mdl.head(y, cond, x.shape)

    out = np.asarray(parallel(state, x, enc, t, mask))
    # fp32; only the order of float32 sums differs (ring's LSE merge, padded zero heads): outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)
