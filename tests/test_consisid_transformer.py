"""ConsisID transformer == diffusers ConsisIDTransformer3DModel (CogVideoX-5B-I2V's blocks, the local facial
extractor and the face cross-attentions after every ``cross_attn_interval``-th block)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ConsisIDTransformer3DModel as TorchModel
from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline as TorchPipeline  # (no cv2 needed)

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.torch_util import state_dict_np
from xdit_jax import tiny
from xdit_jax.models import consisid
from xdit_jax.safetensors_io import CheckpointError

# the tiny config (4 blocks, cross-attentions after blocks 0 and 2), with a face scale that is not 1
CONFIG = dict(tiny.CONSISID_TRANSFORMER, local_face_scale=0.7)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, consisid, consisid.ConsisIDConfig)


def face_inputs(cfg, batch=1, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    id_cond = rng.standard_normal((batch, cfg.LFE_id_dim)).astype(np.float32)
    vit = [rng.standard_normal((batch, tokens, cfg.LFE_vit_dim)).astype(np.float32) for _ in range(cfg.LFE_num_scale)]
    return id_cond, vit


def torch_forward(tm, x, enc, t, id_cond, vit):
    fake = types.SimpleNamespace(transformer=tm, vae_scale_factor_spatial=8)
    rope = TorchPipeline._prepare_rotary_positional_embeddings(fake, x.shape[3] * 8, x.shape[4] * 8, x.shape[1], "cpu")
    with torch.no_grad():
        return tm(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(enc),
                  timestep=torch.from_numpy(t), image_rotary_emb=rope, id_cond=torch.from_numpy(id_cond),
                  id_vit_hidden=[torch.from_numpy(v) for v in vit], return_dict=False)[0].numpy()


def test_matches_diffusers(pair):
    """A batch of 2 with one face (diffusers' pipeline passes one face for both CFG halves: broadcast) at the sample
    size and frames (the learned positional table; CogVideoX's other position paths: test_cogvideox_transformer)."""
    tm, cfg, model = pair
    fwd = jax.jit(lambda m, x, e, t, c, v: m(x, e, t, id_cond=c, id_vit_hidden=v))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, cfg.in_channels, cfg.sample_height, cfg.sample_width)).astype(np.float32)
    enc = rng.standard_normal((2, cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999, 37], dtype=np.int64)
    id_cond, vit = face_inputs(cfg)
    ref = torch_forward(tm, x, enc, t, id_cond, vit)
    out = np.asarray(fwd(model, x, enc, t, id_cond, vit))
    assert out.shape == ref.shape
    # fp32 both sides, max |ref| 4.5: measured max error 1.7e-5 (3.8e-6 of the scale); 1e-5 of the scale allows
    # reordered float32 sums over 4 blocks and the extractor (a missing cross-attention or a wrong block moves the
    # output by O(0.1))
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    # the face matters
    other = np.asarray(fwd(model, x, enc, t, *face_inputs(cfg, seed=9)))
    assert np.abs(other - out).max() > 1e-2


def test_saved_folder_converts(pair, tmp_path):
    tm, cfg, _ = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "ConsisIDTransformer3DModel", consisid, consisid.ConsisIDConfig)


def test_bad_input(pair):
    tm, cfg, model = pair
    sd = state_dict_np(tm)
    sd.pop("perceiver_cross_attention.1.to_q.weight")
    sd.pop("local_facial_extractor.layers.3.1.3.weight")
    with pytest.raises(CheckpointError) as e:
        consisid.params_from_torch(sd, cfg)
    assert "perceiver_cross_attention.1.to_q.weight" in str(e.value)
    assert "local_facial_extractor.layers.3.1.3.weight" in str(e.value)
    with pytest.raises(ValueError, match="not a multiple of cross_attn_interval=2"):
        consisid.ConsisIDConfig.from_dict(dict(CONFIG, num_layers=3))
    with pytest.raises(ValueError, match="LFE_output_dim"):
        consisid.ConsisIDConfig.from_dict(dict(CONFIG, LFE_output_dim=16))
    x = jnp.zeros((1, 3, cfg.in_channels, cfg.sample_height, cfg.sample_width))
    enc = jnp.zeros((1, cfg.max_text_seq_length, cfg.text_embed_dim))
    with pytest.raises(ValueError, match="needs id_cond and id_vit_hidden"):
        model(x, enc, jnp.array([1]))
    id_cond, vit = face_inputs(cfg)
    with pytest.raises(ValueError, match="expected 2 arrays"):
        model(x, enc, jnp.array([1]), id_cond=id_cond, id_vit_hidden=vit[:1])


def test_full_size_config():
    """configs/consisid-preview builds abstractly (nothing allocated) with as many parameters as diffusers' model of
    the same config (on torch's meta device; its learned positional table, 17776 x 3072, is a persistent buffer there,
    a parameter here), 6.22B (CogVideoX-5b-I2V's 5.63B + the face branch's 0.59B); the bench reads it as the consisid
    family."""
    from flax import nnx

    from xdit_jax import bench
    from xdit_jax.pipelines.consisid import read_configs

    folder = bench.CONFIG_DIR / "consisid-preview"
    tc, _ = read_configs(folder)
    _, state = nnx.split(nnx.eval_shape(lambda: consisid.ConsisIDTransformer3DModel(tc, rngs=nnx.Rngs(0))))
    ours = sum(x.size for x in jax.tree.leaves(state))
    with torch.device("meta"):
        tm = TorchModel.from_config(TorchModel.load_config(folder / "transformer"))
    assert ours == sum(p.numel() for p in tm.state_dict().values()) == 6_217_102_912
    assert bench.family_of_config(bench.load_model_dir(folder)[0]) == "consisid"
    assert bench.load_workload("consisid-preview").tokens() == (13 * 30 * 45, 226)


@pytest.mark.parametrize("mesh,patches", [("pipefusion=2", 2),  # block 2's cross-attention on the second stage
                                          pytest.param("pipefusion=3", 2, marks=pytest.mark.slow),  # 2, 1, 1 blocks
                                          pytest.param(None, 3, marks=pytest.mark.slow),
                                          pytest.param("pipefusion=4", 2, marks=pytest.mark.slow),
                                          pytest.param("cfg=2,pipefusion=2,ulysses=2", 3, marks=pytest.mark.slow),
                                          pytest.param("pipefusion=2,ring=2,ulysses=2", 3, marks=pytest.mark.slow)])
def test_pipefusion_blocks(pair, mesh, patches):
    """PipeFusion's form of the blocks (pipefusion_blocks: the next block's index in the scan's carry, the face
    cross-attention picked by it) == blocks; and PipeFusion's patched pass with K/V buffers filled by a warm-up step
    on the same input == the full pass: every stage applied the cross-attentions of its own blocks (block 2's on the
    second stage, whose first holds blocks 0 and 1: the index came with the carry; pipefusion=3's uneven stages too). Measured <= 2.4e-7 of max |x| ~2.5 on
    every mesh; 1e-5 of the scale as above (the cross-attentions move it by more than 1e-3 of it: asserted once)."""
    from flax import nnx

    from xdit_jax.mesh import build_mesh
    from xdit_jax.models import cogvideox
    from xdit_jax.parallel import pipefusion
    from xdit_jax.parallel.sequence import run_blocks

    _, cfg, model = pair
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, cfg.in_channels, cfg.sample_height, cfg.sample_width)).astype(np.float32)
    enc = rng.standard_normal((2, cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
    graphdef, state = nnx.split(model)
    joint, tokens, cond = jax.jit(lambda m: m.embed(x, enc, jnp.array([500, 500]), None, *face_inputs(cfg)))(model)
    blocks = lambda p, j, t, c: nnx.merge(graphdef, p).blocks(j, t, c)  # noqa: E731
    staged = lambda p, j, t, c: nnx.merge(graphdef, p).pipefusion_blocks(j, t, c)  # noqa: E731
    ref = np.asarray(run_blocks(blocks, state, joint, tokens, cond, None))
    scale = np.abs(ref).max()
    if mesh is None:  # (once, slow) the cross-attentions matter here
        no_face = np.asarray(jax.jit(lambda p: cogvideox.CogVideoXTransformer3DModel.blocks(
            nnx.merge(graphdef, p), joint, tokens, cond["temb"]))(state))
        assert np.abs(no_face - ref).max() > 1e-3 * scale
    m = build_mesh(mesh)
    stages = m.shape["pipefusion"]
    padded = pipefusion.pad_stack(state, consisid.STACKED, stages)
    slots = len(pipefusion.stage_layout(cfg.num_layers, stages))
    cache = pipefusion.init_cache(m, slots, 2, joint.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, patches)

    def run(warmup):
        return jax.jit(lambda p, j, c: pipefusion.run_pipefusion(
            staged, p, j, tokens, cond, c, m if mesh else None, patches=patches, warmup=warmup,
            stacked=consisid.STACKED, num_layers=cfg.num_layers))

    warm, cache1 = run(True)(padded, joint, cache)
    patched, _ = run(False)(padded, joint, cache1)
    np.testing.assert_allclose(np.asarray(warm), ref, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(patched), ref, atol=1e-5 * scale, rtol=0)
