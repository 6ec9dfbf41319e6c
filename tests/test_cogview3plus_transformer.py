"""CogView3-Plus transformer == diffusers CogView3PlusTransformer2DModel (tiny random weights, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogView3PlusTransformer2DModel as TorchModel

from tests.fixtures import assert_saved_folder_converts, torch_and_our_model
from tests.torch_util import state_dict_np
from xdit_jax import tiny
from xdit_jax.models import cogview3plus
from xdit_jax.safetensors_io import CheckpointError

# (batch, latent h, latent w, text tokens): a square grid, and a non-square one (the table's corner, not its centre)
SHAPES = [(2, 8, 8, 7), (1, 6, 10, 5)]


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, tiny.COGVIEW3_TRANSFORMER, cogview3plus, cogview3plus.CogView3PlusConfig)


def test_matches_diffusers(pair):
    tm, cfg, model = pair
    fwd = jax.jit(lambda m, *a: m(*a))
    rng = np.random.default_rng(0)
    for b, h, w, text in SHAPES:
        x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
        enc = rng.standard_normal((b, text, cfg.text_embed_dim)).astype(np.float32)
        t = np.array([999, 37][:b], dtype=np.int64)
        sizes = [np.array([[8 * h, 8 * w], [512, 384]][:b], np.float32), np.array([[8 * h, 8 * w]] * b, np.float32),
                 np.array([[0, 0], [16, 8]][:b], np.float32)]  # original, target, crop
        with torch.no_grad():
            ref = tm(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(enc),
                     timestep=torch.from_numpy(t), original_size=torch.from_numpy(sizes[0]),
                     target_size=torch.from_numpy(sizes[1]), crop_coords=torch.from_numpy(sizes[2]),
                     return_dict=False)[0].numpy()
        out = np.asarray(fwd(model, jnp.asarray(x), jnp.asarray(enc), jnp.asarray(t), *map(jnp.asarray, sizes)))
        assert out.shape == ref.shape == (b, cfg.out_ch, h, w)
        # fp32 on both sides, outputs O(1): measured below; a position, modulation-order or patch-layout bug moves
        # them by 1e-1+
        scale = np.abs(ref).max()
        err = np.abs(out - ref).max()
        print(f"{(b, h, w, text)}: max |diff| {err:.2e} of max |ref| {scale:.2f}")
        np.testing.assert_allclose(out, ref, atol=1e-5 * max(scale, 1.0), rtol=0, err_msg=str((b, h, w, text)))


def test_saved_folder_converts(pair, tmp_path):
    """save_pretrained's folder converts (MODEL_CLASSES) to the same params; a broken checkpoint is reported."""
    tm, cfg, _ = pair
    assert_saved_folder_converts(tm, cfg, tmp_path, "CogView3PlusTransformer2DModel", cogview3plus,
                                 cogview3plus.CogView3PlusConfig)
    sd = state_dict_np(tm)
    sd.pop("transformer_blocks.1.attn1.to_q.weight")
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1]
    with pytest.raises(CheckpointError) as e:
        cogview3plus.params_from_torch(sd, cfg)
    assert "transformer_blocks.1.attn1.to_q.weight" in str(e.value) and "proj_out.weight" in str(e.value)


def test_bad_sizes_are_refused(pair):
    _, cfg, _ = pair
    with pytest.raises(ValueError, match="position table"):
        cogview3plus.check_input_shape(cfg, 18, 8)  # 9 x 4 patches > 8
    with pytest.raises(ValueError, match="multiples of the patch size"):
        cogview3plus.check_input_shape(cfg, 7, 8)


@pytest.mark.slow
def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of cogview3-tiny (15 image + 16 T5 tokens, both CFG halves) against diffusers'
    transformer on one device and cfg=2 x ulysses=3; the compiled program's FLOPs == the analytic count; a diffusers
    config is read as CogView3-Plus."""
    from xdit_jax import bench
    from xdit_jax.bench_families import family_of_config

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="cogview3-tiny", meshes=[None, "cfg=2,ulysses=3"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    assert sorted(by_mesh) == ["cfg=2,ulysses=3", "single device", "torch cpu"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "cogview3" and r["image_tokens"] == 15 and r["text_tokens"] == 16
    for m in ("single device", "cfg=2,ulysses=3"):  # fp32, outputs O(1)
        print(m, by_mesh[m]["max_abs_diff_vs_diffusers"])
        assert by_mesh[m]["max_abs_diff_vs_diffusers"] < 1e-5, m
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert family_of_config(dict(TorchModel(**tiny.COGVIEW3_TRANSFORMER).config)) == "cogview3"


def test_full_size_configs():
    """configs/cogview3-plus-3b reads as CogView3-Plus: 4096 image + 224 T5 tokens at 1024 x 1024, both CFG halves;
    2048 x 2048 fits the position table, more does not (nothing built)."""
    from xdit_jax import bench
    from xdit_jax.pipelines import cogview3

    w = bench.load_workload("cogview3-plus-3b")
    assert w.family == "cogview3" and w.cfg and w.fam.latent_shape(w) == (2, 16, 128, 128)
    assert w.fam.tokens(w) == (4096, 224)
    tc, vc = cogview3.read_configs(bench.CONFIG_DIR / "cogview3-plus-3b")
    assert tc.inner_dim == 2560 and cogview3.default_size(tc, vc) == {"height": 1024, "width": 1024}
    cogview3.check_request(tc, vc, 2048, 2048, 1, "cfg=2,ulysses=4", 7.0)
    with pytest.raises(ValueError, match="position table"):
        cogview3.check_request(tc, vc, 2064, 1024, 1, None, 7.0)


@pytest.mark.slow
def test_bf16_close_to_fp32(pair):
    """bf16 weights and activations (norm statistics in fp32): within a few % of the fp32 output's scale."""
    tm, cfg, model = pair
    m16 = cogview3plus.build(cfg, cogview3plus.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16),
                             dtype=jnp.bfloat16)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 8, 8)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((2, 7, cfg.text_embed_dim)), jnp.float32)
    args = (x, enc, jnp.array([500, 20]), jnp.array([64.0, 64.0]), jnp.array([64.0, 64.0]), jnp.zeros(2))
    ref = np.asarray(model(*args))
    out = np.asarray(m16(*args).astype(jnp.float32))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
