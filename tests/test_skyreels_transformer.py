"""SkyReels-V2 transformer == diffusers SkyReelsV2Transformer3DModel: scalar and per-frame timesteps, the fps
embedding, the block-causal mask of diffusion forcing; its sequence-parallel runs (the mask split over shards) == one
device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel as TorchModel

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import skyreels_v2 as sk
from xdit_jax.models import wan
from xdit_jax.safetensors_io import CheckpointError

# Wan's tiny test config (2 heads x 12, ffn not a multiple of the width) with the fps embedding of the DF checkpoints.
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=16, ffn_dim=40, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64, inject_sample_info=True)
L = 6  # caption tokens
# (batch, latent frames, h, w): 4 frames of 3 x 5 tokens = 60 tokens; two causal blocks of 2 frames.
SHAPE = (1, 4, 6, 10)
BLOCK = 2


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = sk.SkyReelsV2Config.from_dict(dict(tm.config))
    params = sk.params_from_torch(state_dict_np(tm), cfg)
    model = sk.build(cfg, params)
    causal = sk.build(sk.with_causal_block_size(cfg, BLOCK), params)
    fwd = jax.jit(lambda m, x, t, e, fps: m(x, t, e, fps=fps))
    return tm, cfg, model, causal, fwd


def _inputs(seed=0, per_frame=True):
    rng = np.random.default_rng(seed)
    b, f, h, w = SHAPE
    x = rng.standard_normal((b, CONFIG["in_channels"], f, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, L, CONFIG["text_dim"])).astype(np.float32)
    enc[:, 4:] = 0
    # diffusion forcing's rows: not-started frames at the dummy 999, others at their own step (int64 as diffusers')
    t = np.array([[999, 999, 604, 37]], np.int64) if per_frame else np.array([751], np.int64)
    return x, t, enc


def _torch(tm, x, t, enc, fps, block=1):
    tm._set_ar_attention(block)
    with torch.no_grad():
        return tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc),
                  enable_diffusion_forcing=t.ndim == 2, fps=[fps], return_dict=False)[0].numpy()


def test_sincos_timestep_embedding_is_float64s():
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    t = np.array([0, 1, 37, 500.5, 604, 998.25, 999, 1000], np.float64)
    ref = get_1d_sincos_pos_embed_from_grid(256, torch.from_numpy(t), flip_sin_to_cos=True).numpy()
    ours = np.asarray(wan.sincos_timestep_embedding(t.astype(np.float32), 256))
    # float64's result rounded to float32 is within 6e-8; a float32 product t * omega is off by up to 6e-5 at 999
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("per_frame,block,fps", [(False, 1, 1), (True, 1, 0), (True, BLOCK, 1)])
def test_matches_diffusers(pair, per_frame, block, fps):
    tm, cfg, model, causal, fwd = pair
    x, t, enc = _inputs(per_frame=per_frame)
    ref = _torch(tm, x, t, enc, fps, block)
    out = np.asarray(fwd(causal if block > 1 else model, x, t, enc, fps))
    # fp32 both sides, outputs O(1-3): reordered float32 sums over 2 blocks of width 24 (measured 5.4e-7); a wrong
    # frame's modulation, a missing mask or the fps row moves outputs by 1e-2 or more (checked below)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    if block > 1:  # the mask matters, and so do the fps row and the per-frame timesteps
        assert np.abs(out - np.asarray(fwd(model, x, t, enc, fps))).max() > 1e-2
        assert np.abs(out - np.asarray(fwd(causal, x, t, enc, 1 - fps))).max() > 1e-2
        assert np.abs(out - np.asarray(fwd(causal, x, t[:, ::-1].copy(), enc, fps))).max() > 1e-2


@pytest.mark.parametrize("mesh", ["ring=2,ulysses=4",
                                  # (slow: the mask over a ring is also covered by the DF pipeline's cfg=2,ring=2,
                                  # ulysses=2 in test_skyreels_v2_pipeline)
                                  pytest.param("ring=3", marks=pytest.mark.slow)])
def test_causal_sequence_parallel_equals_one_device(pair, mesh):
    """60 tokens: ring=2,ulysses=4 pads them to 64 and ring=3 cuts the causal blocks (30 tokens) across shards."""
    tm, cfg, model, causal, fwd = pair
    x, t, enc = _inputs(seed=2)
    ref = np.asarray(fwd(causal, x, t, enc, 1))
    out = np.asarray(sequence_parallel_forward(causal, build_mesh(mesh))(x, t, enc, fps=1))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


def test_input_errors_and_checkpoint(pair):
    tm, cfg, model, causal, _ = pair
    x, t, enc = _inputs()
    shapes = lambda m, *a, **k: jax.eval_shape(lambda: m(*a, **k))  # noqa: E731  (the checks run while tracing)
    with pytest.raises(ValueError, match="takes fps"):
        shapes(model, x, t, enc)
    with pytest.raises(ValueError, match="per latent frame"):
        shapes(model, x, t[:, :3], enc, fps=1)
    with pytest.raises(ValueError, match="multiple of the causal block size"):
        shapes(sk.build(sk.with_causal_block_size(cfg, 3), nnx_params(model)), x, t, enc, fps=1)
    with pytest.raises(ValueError, match="causal_block_size"):
        sk.with_causal_block_size(cfg, 0)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        sk.SkyReelsV2Config.from_dict({**dict(tm.config), "num_frame_per_block": 0})
    sd = state_dict_np(tm)
    sd.pop("fps_projection.net.2.bias")
    with pytest.raises(CheckpointError, match="fps_projection.net.2.bias"):
        sk.params_from_torch(sd, cfg)


def nnx_params(model):
    from flax import nnx

    from xdit_jax.keymap import to_pure_dict

    return to_pure_dict(nnx.state(model, nnx.Param))


def test_released_config_reads_and_counts():
    """configs/skyreels-v2-df-1.3b-540p (from memory: the Wan 2.1 1.3B shape with the fps embedding): read as the
    DF pipeline's, and our module of it has diffusers' parameter count (both built abstract: no weights)."""
    import json
    from pathlib import Path

    from flax import nnx

    from xdit_jax.pipelines.skyreels_v2 import read_configs

    folder = Path(__file__).resolve().parents[1] / "configs" / "skyreels-v2-df-1.3b-540p"
    tc, vc = read_configs(folder)
    assert tc.inject_sample_info and tc.num_layers == 30 and vc.z_dim == 16
    raw = {k: v for k, v in json.loads((folder / "transformer" / "config.json").read_text()).items()
           if not k.startswith("_")}
    with torch.device("meta"):
        ref = sum(p.numel() for p in TorchModel(**raw).parameters())
    abstract = nnx.eval_shape(lambda: sk.SkyReelsV2Transformer3DModel(tc))
    ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == ref, (ours, ref)


def test_image_states_match_diffusers():
    """An image-to-video transformer (Wan 2.1 I2V's image embedder and attn2's added K/V; SkyReels-V2-I2V): == diffusers
    (512 caption tokens: diffusers splits the image states from the text assuming 512)."""
    config = dict(CONFIG, inject_sample_info=False, image_dim=16, added_kv_proj_dim=24)
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**config), seed=5, std=0.15)
    cfg = sk.SkyReelsV2Config.from_dict(dict(tm.config))
    model = sk.build(cfg, sk.params_from_torch(state_dict_np(tm), cfg))
    rng = np.random.default_rng(7)
    x, t, _ = _inputs(seed=7, per_frame=False)
    enc = rng.standard_normal((1, 512, CONFIG["text_dim"])).astype(np.float32)
    enc[:, 9:] = 0
    img = rng.standard_normal((1, 5, 16)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc), torch.from_numpy(img),
                 return_dict=False)[0].numpy()
    out = np.asarray(jax.jit(lambda m, *a: m(*a))(model, x, t, enc, img))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)  # as test_matches_diffusers


def test_segment_attention_key_chunks(monkeypatch):
    """The block-causal attention over key chunks (long sequences) == in one piece: 45 keys in chunks of 8 (the last
    padded), the keys starting at global index 16 with those >= 50 padding (valid_len), rows whose keys are all
    masked (out 0, LSE -inf)."""
    import jax.numpy as jnp

    from xdit_jax.parallel import attention as att

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (30, 45, 45))
    q_seg = jnp.asarray(np.repeat([0, 1, 2, 3, 4], 6), jnp.int32)
    kv_seg = jnp.asarray(np.repeat([1, 2, 3], 15), jnp.int32)
    kw = dict(kv_start=16, valid_len=50, segments=(q_seg, kv_seg), need_lse=True)
    ref = att.block_attention(q, k, v, **kw)
    monkeypatch.setattr(att, "SEGMENT_KEY_CHUNK", 8)
    out = att.block_attention(q, k, v, **kw)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.isfinite(out[1]), np.isfinite(ref[1]))  # segment 0's rows see no key
    fin = np.isfinite(ref[1])
    assert not fin[:, :, :6].any() and fin[:, :, 6:].all()
    np.testing.assert_allclose(np.asarray(out[1])[fin], np.asarray(ref[1])[fin], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,patches", [(None, 3), ("pipefusion=2", 2), ("pipefusion=2,ulysses=2", 3),
                                          ("pipefusion=2,ring=2", 2), ("pipefusion=2,ring=2,ulysses=2", 2)])
def test_causal_pipefusion_with_buffers_of_the_same_input_is_exact(pair, mesh, patches):
    """PipeFusion with the block-causal mask (run_pipefusion's segments: the buffered keys masked by their blocks' ids,
    in each ring position's buffer order): a warm-up pass, then a patched pass reading the buffers the warm-up filled
    from the same input == the full pass (60 tokens, blocks of 30, cut by the patches of 24 or 32). Measured <= 4.8e-7
    of 3.2 on these meshes with this config at 3 layers; 1e-5 of the scale as the sequence-parallel test."""
    import jax.numpy as jnp
    from flax import nnx

    from xdit_jax.parallel import pipefusion
    from xdit_jax.parallel.sequence import run_blocks

    _, cfg, model, causal, _ = pair
    x, t, enc = _inputs(3)
    x, t, enc = (np.concatenate([a, a * 0.5]) for a in (x, t.astype(np.float32), enc))
    xt, tokens, cond = jax.jit(lambda m: m.embed(x, t, enc, None, np.array([1, 1])))(causal)
    graphdef, state = nnx.split(causal)
    blocks = lambda p, j, tt, c: nnx.merge(graphdef, p).blocks(j, tt, c)  # noqa: E731
    ref = np.asarray(run_blocks(blocks, state, xt, tokens, cond, None))
    m = build_mesh(mesh)
    cache = pipefusion.init_cache(m, cfg.num_layers, 2, xt.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, patches)

    def run(warmup):
        return jax.jit(lambda p, j, c: pipefusion.run_pipefusion(
            blocks, p, j, tokens, cond, c, m if mesh else None, patches=patches, warmup=warmup, stacked=sk.STACKED,
            num_layers=cfg.num_layers, segments="segment"))

    warm, cache1 = run(True)(state, xt, cache)
    patched, _ = run(False)(state, xt, cache1)
    np.testing.assert_allclose(np.asarray(warm), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    np.testing.assert_allclose(np.asarray(patched), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)

