"""FLUX.2 transformer == diffusers Flux2Transformer2DModel; its two-phase run over meshes == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel as TorchModel
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as TP
from flax import nnx

from tests.fixtures import torch_and_our_model
from tests.torch_util import state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import flux2
from xdit_jax.pipelines.flux2 import pack, patchify, transformer_over_mesh, unpack, unpatchify
from xdit_jax.safetensors_io import CheckpointError

TEXT = 5
# 3 heads of 16 (RoPE axes 4 x 4), 2 double- and 2 single-stream blocks; "guided": FLUX.2-dev's guidance embedding
BASE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
VARIANTS = {"klein": dict(BASE, guidance_embeds=False), "guided": dict(BASE, guidance_embeds=True)}
GRID = (3, 5)  # 15 image tokens (padded in phase 1 by degrees 3 and 4) + 5 text = 20 joint
IDS = (flux2.image_ids(*GRID), flux2.text_ids(TEXT))


def _fwd(m, x, e, t, g):
    return m(x, e, t, *IDS, g)


FWD = jax.jit(_fwd)


# the guidance-embedded variant (FLUX.2-dev's path, klein has none) runs in the slow set
@pytest.fixture(scope="module", params=["klein", pytest.param("guided", marks=pytest.mark.slow)])
def pair(request):
    return (request.param, *torch_and_our_model(TorchModel, VARIANTS[request.param], flux2, flux2.Flux2Config))


def _inputs(cfg, b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((b, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    t = np.array([0.3, 0.9][:b], np.float32)
    g = np.full((b,), 3.5, np.float32) if cfg.guidance_embeds else None
    return x, enc, t, g


def _torch(tm, x, enc, t, g):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(enc), tt(t), tt(IDS[0][None]), tt(IDS[1][None]), None if g is None else tt(g),
                  return_dict=False)[0].numpy()


def test_rope_ids_and_latent_layout_match_diffusers():
    ids = np.concatenate([flux2.text_ids(7), flux2.image_ids(6, 9)])
    for axes, theta in [((4, 4, 4, 4), 2000), ((32, 32, 32, 32), 2000)]:
        ref = Flux2PosEmbed(theta, list(axes))(torch.from_numpy(ids))
        cos, sin = flux2.rope_tables(ids, axes, theta)
        # both float64 then rounded once to float32 (one float32 ulp apart at most; |values| <= 1)
        np.testing.assert_allclose(cos, ref[0].numpy(), rtol=0, atol=2 ** -23)
        np.testing.assert_allclose(sin, ref[1].numpy(), rtol=0, atol=2 ** -23)
    lat = torch.randn(2, 4, 6, 8)
    np.testing.assert_array_equal(flux2.image_ids(3, 4), TP._prepare_latent_ids(torch.zeros(2, 16, 3, 4))[0].numpy())
    np.testing.assert_array_equal(flux2.text_ids(5), TP._prepare_text_ids(torch.zeros(2, 5, 8))[0].numpy())
    p = TP._patchify_latents(lat)
    np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(lat.numpy()))), p.numpy())
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(p.numpy()))), lat.numpy())
    packed = TP._pack_latents(p)
    np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(p.numpy()))), packed.numpy())
    ids = TP._prepare_latent_ids(p)
    np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(packed.numpy()), 3, 4)),
                                  TP._unpack_latents_with_ids(packed, ids, 3, 4).numpy())


def test_matches_diffusers(pair):
    name, tm, cfg, model = pair
    args = _inputs(cfg)
    ref = _torch(tm, *args)
    out = np.asarray(FWD(model, *args))
    assert out.shape == ref.shape == (2, GRID[0] * GRID[1], cfg.out_ch)
    # fp32 both sides, outputs O(6): measured 4.2e-5 (klein). As FLUX.1's: the float32 floor is the sinusoids of
    # t x 1000 (XLA's exp vs torch's: 2e-4 rad) through 4 blocks. A wrong RoPE axis, modulation set, SwiGLU half or
    # q/k/v/mlp split gives O(1).
    np.testing.assert_allclose(out, ref, atol=4e-4, rtol=1e-4, err_msg=name)


def test_config_checkpoint_and_unsupported_errors(pair):
    name, tm, cfg, model = pair
    d = dict(tm.config)
    for bad, needle in [(dict(axes_dims_rope=(4, 4, 4, 6)), "sum to attention_head_dim"),
                        (dict(patch_size=2), "patch_size=2")]:
        with pytest.raises(ValueError, match=needle):
            flux2.Flux2Config.from_dict({**d, **bad})
    sd = state_dict_np(tm)
    sd.pop("single_transformer_blocks.1.attn.to_out.weight")
    sd["transformer_blocks.0.attn.to_out.0.bias"] = np.zeros(cfg.inner_dim, np.float32)
    with pytest.raises(CheckpointError) as e:
        flux2.params_from_torch(sd, cfg)
    for key in ("single_transformer_blocks.1.attn.to_out.weight", "transformer_blocks.0.attn.to_out.0.bias"):
        assert key in str(e.value), key
    x, enc, t, g = _inputs(cfg)
    with pytest.raises(NotImplementedError, match="KV-cache"):
        jax.eval_shape(lambda: model(x, enc, t, *IDS, g, kv_cache_mode="extract"))


# slow: the pipeline test runs cfg=2,ring=2,ulysses=2 and the CLI test cfg=2,ulysses=3 (uneven: 15 image / 5 text /
# 20 joint tokens padded, 3 heads here)
@pytest.mark.slow
@pytest.mark.parametrize("pair,mesh", [("klein", "ring=2,ulysses=2"), ("klein", "ulysses=3"),
                                       ("guided", "cfg=2,ring=2")], indirect=["pair"])
def test_sequence_parallel_equals_one_device(pair, mesh):
    name, _, cfg, model = pair
    args = _inputs(cfg, seed=2)
    graphdef, state = nnx.split(model)
    ref = np.asarray(FWD(model, *args))
    m = build_mesh(mesh)
    x, enc, t, g = args

    @jax.jit
    def parallel(state, x, enc, t, g):
        return transformer_over_mesh(graphdef, state, (x, enc, t, *IDS, g), m)

    out = np.asarray(parallel(state, x, enc, t, g))
    # fp32; only the order of float32 sums differs (ring's merge, padded keys masked); outputs O(6)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0, err_msg=f"{name} {mesh}")


@pytest.mark.slow
def test_blocks_with_text_held_whole_equal_the_two_phases(pair):
    """PipeFusion's form (:meth:`blocks`, the single-stream blocks with the text as the attention's context) ==
    the joint sequence's."""
    name, _, cfg, model = pair
    x, enc, t, g = _inputs(cfg, seed=3)
    ref = np.asarray(FWD(model, x, enc, t, g))

    @jax.jit
    def whole(model, x, enc, t, g):
        h, tokens, cond, _ = model.embed(x, enc, t, *IDS, g)
        return model.head(model.blocks(h, tokens, cond), cond)

    np.testing.assert_allclose(np.asarray(whole(model, x, enc, t, g)), ref, atol=2e-5, rtol=0)  # float order only
