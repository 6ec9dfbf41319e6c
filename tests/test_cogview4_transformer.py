"""CogView4 transformer == diffusers CogView4Transformer2DModel; a text mask == the shorter prompt alone (CFG's halves
of different lengths); its sequence-parallel run == one device; conversion of a saved folder."""

import jax
import numpy as np
import pytest
import torch
from diffusers import CogView4Transformer2DModel as TorchModel

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.jax_util import sequence_parallel_forward
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import cogview4

# the tiny config (2 heads of 16, 2 blocks); latents 10 x 12: a 5 x 6 patch grid (rows read at 0, 3, 6, 9, 12 of the
# 16-row RoPE table), 30 image tokens; 32 text tokens
CONFIG = tiny.COGVIEW4_TRANSFORMER
LATENT = (10, 12)
TEXT = 32


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, cogview4, cogview4.CogView4Config)


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, *LATENT)).astype(np.float32)
    text = rng.standard_normal((2, TEXT, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999.0, 375.0], np.float32)
    orig = np.array([[80.0, 96.0], [1024.0, 768.0]], np.float32)
    target = np.array([[80.0, 96.0], [80.0, 96.0]], np.float32)
    crop = np.array([[0.0, 0.0], [16.0, 32.0]], np.float32)
    return x, text, t, orig, target, crop


@pytest.fixture(scope="module")
def batch(pair):
    tm, cfg, model = pair
    args = _inputs(cfg)
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(a) for a in args), return_dict=False)[0].numpy()
    return args, np.asarray(FWD(model, *args)), ref


def test_matches_diffusers(batch):
    _, ours, ref = batch
    assert ours.shape == ref.shape == (2, 4, *LATENT)
    diff = np.abs(ours - ref).max()
    # fp32: measured max |diff| 1.2e-6 at outputs up to 3.1
    assert diff < 2e-5 * np.abs(ref).max()


@pytest.mark.slow  # (the default run covers the mask end to end: tests/test_cogview4_pipeline.py's CFG halves)
def test_text_mask_equals_the_shorter_prompt_alone(pair, batch):
    """Sample 1 with its text cut to 16 tokens, alone == in the batch with 16 masked tokens after them."""
    tm, cfg, model = pair
    (x, text, t, orig, target, crop), _, _ = batch
    alone = np.asarray(FWD(model, x[1:], text[1:, :16], t[1:], orig[1:], target[1:], crop[1:]))
    mask = np.ones((2, TEXT), bool)
    mask[1, 16:] = False
    masked = np.asarray(FWD(model, x, text, t, orig, target, crop, mask))
    # the same math on other array lengths: float order only
    np.testing.assert_allclose(masked[1], alone[0], atol=2e-5, rtol=1e-5)


def test_sequence_parallel_equals_one_device(pair, batch):
    _, cfg, model = pair
    args, ours, _ = batch
    # cfg 2 (the batch) x ring 2 x ulysses 2: 30 image tokens padded to 32, the 32 text tokens split 4 ways
    out = np.asarray(sequence_parallel_forward(model, build_mesh("cfg=2,ring=2,ulysses=2"),
                                               text=cogview4.TEXT_KEYS)(*args))
    np.testing.assert_allclose(out, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_sequence_parallel_ulysses3(pair, batch):
    _, cfg, model = pair
    args, ours, _ = batch
    # ulysses 3: the 2 heads padded to 3, the 30 image tokens split 3 ways, the 32 text tokens padded to 33
    out = np.asarray(sequence_parallel_forward(model, build_mesh("ulysses=3"), text=cogview4.TEXT_KEYS)(*args))
    np.testing.assert_allclose(out, ours, atol=2e-5, rtol=1e-5)


def test_saved_folder_converts(pair, tmp_path):
    tm, cfg, model = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "CogView4Transformer2DModel", cogview4, cogview4.CogView4Config)


def test_refused_shapes(pair):
    _, cfg, model = pair
    with pytest.raises(ValueError, match="multiple of 4"):
        cogview4.CogView4Config.from_dict(dict(CONFIG, attention_head_dim=18))
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        model(np.zeros((1, 4, 9, 12), np.float32), np.zeros((1, 3, 32), np.float32), np.zeros(1, np.float32),
              np.zeros(2), np.zeros(2), np.zeros(2))


def test_full_size_configs_folder():
    """configs/cogview4-6b (diffusers' layout of THUDM/CogView4-6B) reads into our configs; the transformer and
    glm-4-9b built abstractly (nothing allocated) count the parameters of diffusers' / transformers' modules of the
    same configs on the meta device (6.37B and 8.78B); its defaults are the CLI's; the release's size passes."""
    import json
    from pathlib import Path

    from flax import nnx
    from transformers import GlmConfig, GlmModel

    from xdit_jax import cli
    from xdit_jax.models import glm, llama
    from xdit_jax.pipelines import cogview4 as cp

    root = Path(__file__).resolve().parents[1] / "configs" / "cogview4-6b"
    tc, vc = cp.read_configs(root)
    gd = json.loads((root / "text_encoder" / "config.json").read_text())
    gc = glm.GlmConfig.from_dict(gd)
    assert (tc.inner_dim, tc.num_layers, tc.text_embed_dim, gc.hidden_size, gc.rotary_dim) == (4096, 28, 4096, 4096, 64)
    assert vc.latent_channels == tc.in_channels == 16 and cp.default_size(tc, vc) == {"height": 1024, "width": 1024}
    defaults = json.loads((root / "defaults.json").read_text())
    assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["max_sequence_length"]) == (
        cli.DEFAULTS["cogview4"]["steps"], cli.DEFAULTS["cogview4"]["guidance_scale"],
        cli.DEFAULTS["cogview4"]["max_sequence_length"]) == (50, 5.0, 1024)
    cp.check_request(tc, vc, 1024, 1024, 1, "cfg=2,ulysses=4", 5.0)
    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    td = json.loads((root / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        tm = TorchModel(**{k: v for k, v in td.items() if not k.startswith("_")})
        gm = GlmModel(GlmConfig(**{k: v for k, v in gd.items() if k not in ("architectures", "model_type")}))
    assert count(nnx.eval_shape(lambda: cogview4.CogView4Transformer2DModel(tc))) == \
        sum(p.numel() for p in tm.parameters()) == 6_369_118_272
    assert count(nnx.eval_shape(lambda: llama.LlamaModel(gc))) == sum(p.numel() for p in gm.parameters()) \
        == 8_779_194_368


@pytest.mark.slow
def test_bf16_close_to_fp32(pair, batch):
    """bf16 weights and activations (norm statistics, RoPE, softmax in fp32) against our fp32 forward."""
    import jax.numpy as jnp

    from tests.torch_util import state_dict_np

    tm, cfg, _ = pair
    args, ours, _ = batch
    m16 = cogview4.build(cfg, cogview4.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16),
                         dtype=jnp.bfloat16)
    out = np.asarray(FWD(m16, *args)).astype(np.float32)
    # measured 0.6% of the output scale (3.1)
    assert np.abs(out - ours).max() < 0.03 * np.abs(ours).max()


@pytest.mark.slow
def test_full_width_flops_compile_only():
    """configs/cogview4-6b at full width, 2 blocks, 256 x 256, compiled on abstract shapes (no weights) on one device,
    cfg=2,ulysses=2 and pipefusion=2: the one-device program's FLOPs == the analytic count."""
    from xdit_jax import bench

    rows = bench.run_step_benchmark(bench.StepOptions(model="cogview4-6b", layers=2, height=256, width=256,
                                                      meshes=[None, "cfg=2,ulysses=2", "pipefusion=2"],
                                                      compile_only=True, log=lambda s: None))
    for r in rows:
        assert "error" not in r or r["error"] is None, r.get("error")
        assert r["image_tokens"] == 256 and r["text_tokens"] == 128
    one = rows[0]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
