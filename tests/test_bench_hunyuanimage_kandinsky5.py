"""scripts/benchmark.py's step for HunyuanImage-2.1 and Kandinsky 5.0 T2V: each tiny preset against diffusers'
transformer on the same weights and inputs, the compiled program's FLOPs == the analytic formula, the full-size
folders read with their pipelines' shapes (nothing compiled); slow: a sequence mesh, the full-size parameter counts ==
diffusers' on the meta device."""

import pytest
from diffusers import HunyuanImageTransformer2DModel, Kandinsky5Transformer3DModel  # noqa: F401 (the references)

from tests.jax_util import bench_rows_vs_diffusers, full_size_parameter_counts
from xdit_jax import bench
from xdit_jax.bench_families import family_of_config

_rows = bench_rows_vs_diffusers


@pytest.mark.slow  # (the default set's budget: 4-10 s on this shared host; the workloads below stay in it)
def test_hunyuanimage_rows_vs_diffusers(monkeypatch):
    """hunyuanimage-tiny: [ByT5; Qwen] as the masked context (the negative half without glyph tokens), the guider's
    CFG batch."""
    one = _rows(monkeypatch, "hunyuanimage-tiny", [None])["single device"]
    assert one["family"] == "hunyuanimage" and one["latent_shape"] == [2, 8, 4, 6]
    assert (one["image_tokens"], one["text_tokens"]) == (24, 16 + 128)


def test_hunyuanimage_workloads():
    """The tiny preset's and the release folder's shapes (2048 x 2048 through the 32x VAE) and inputs, the family of
    a config without a class name; nothing compiled."""
    assert {"hunyuanimage-tiny", "hunyuanimage-cpu-small", *bench.HUNYUAN_IMAGE_MODELS, "kandinsky5-tiny",
            "kandinsky5-cpu-small", *bench.KANDINSKY5_MODELS} <= set(bench.PRESET_HELP)
    w = bench.load_workload("hunyuanimage-tiny")
    assert w.latent_shape() == (2, 8, 4, 6) and w.fam.tokens(w) == (24, 16 + 128)
    assert [a.shape for a in w.fam.make_inputs(w).values()] == [(2, 8, 4, 6), (2,), (2, 16, 32), (2, 16),
                                                                (2, 128, 16), (2, 128)]
    assert w.fam.analytic_flops(w)["total"] == 2 * w.fam.analytic_flops(bench.load_workload("hunyuanimage-tiny",
                                                                                            cfg=False))["total"]

    w = bench.load_workload("hunyuanimage-2.1")
    assert w.family == "hunyuanimage" and w.cfg and w.vae_scale_spatial == 32
    assert w.latent_shape() == (2, 64, 64, 64) and w.fam.tokens(w) == (4096, 1000 + 128)
    inputs = w.fam.make_inputs(w)
    assert inputs["mask_2"][:1].sum() == 0 and inputs["mask_2"][1:].sum() == 16  # glyphs in the prompt's half only
    # diffusers' default config (no class name, no ByT5) is HunyuanImage's too: 2-D RoPE; HunyuanVideo's is 3-D
    assert family_of_config({"num_single_layers": 40, "num_refiner_layers": 2, "rope_axes_dim": [64, 64]}) \
        == "hunyuanimage"
    assert family_of_config({"num_single_layers": 40, "num_refiner_layers": 2, "rope_axes_dim": [16, 56, 56]}) \
        == "hunyuanvideo"
    with pytest.raises(ValueError, match="no frames"):
        bench.load_workload("hunyuanimage-2.1", num_frames=5)


def test_kandinsky5_rows_vs_diffusers(monkeypatch):
    """kandinsky5-tiny with the release's visual_cond (zero condition channels): the text stack, the negative prompt
    padded in the CFG batch (diffusers called per half at its own length), the RoPE scale factor of the size; the
    release folder at 5 s of 512 x 768."""
    one = _rows(monkeypatch, "kandinsky5-tiny", [None])["single device"]
    assert one["family"] == "kandinsky5" and one["latent_shape"] == [2, 2, 4, 6, 9]
    assert (one["video_tokens"], one["text_tokens"], one["negative_text_tokens"]) == (12, 16, 6)

    w = bench.load_workload("kandinsky5-t2v-lite-5s")
    assert w.family == "kandinsky5" and w.cfg and w.latent_shape() == (2, 31, 64, 96, 33)
    assert w.fam.tokens(w) == (31 * 32 * 48, 64)
    inputs = w.fam.make_inputs(w)
    assert inputs["rope_scale"].tolist() == [1, 2, 2] and not inputs["latents"][..., 16:].any()
    assert w.fam.with_layers(w.transformer, 4)["num_visual_blocks"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("model,mesh", [("hunyuanimage-tiny", "cfg=2,ulysses=3"),
                                        ("kandinsky5-tiny", "cfg=2,ring=2,ulysses=2")])
def test_sequence_mesh_rows_vs_diffusers(monkeypatch, model, mesh):
    """The tiny presets on a sequence mesh (the tokens padded to the degree) against diffusers."""
    _rows(monkeypatch, model, [mesh])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hunyuanimage-2.1", "kandinsky5-t2v-lite-5s"])
def test_full_size_parameter_count(name):
    """The full-size folders: our module's parameters (shapes only) count diffusers' on the meta device."""
    ours, theirs = full_size_parameter_counts(name)
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("hunyuanimage-2.1", dict(height=256, width=256)),
                                     ("kandinsky5-t2v-lite-5s", dict(height=128, width=128, num_frames=17))])
def test_full_width_flops_compile_only(name, kw):
    """The full-size folders at full width with 2 blocks a stack, small sizes, compiled on abstract shapes (no
    weights): the compiled program's dots are the analytic count; PipeFusion over 2 stages compiles (the text K/V
    buffers of HunyuanImage's [ByT5; Qwen] context)."""
    rows = bench.run_step_benchmark(bench.StepOptions(model=name, layers=2, meshes=[None, "cfg=2,pipefusion=2"],
                                                      compile_only=True, log=lambda s: None, **kw))
    by_mesh = {r["mesh"]: r for r in rows}
    for r in rows:
        assert "error" not in r, r.get("error")
    row = by_mesh["single device"]
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("model,mesh,shape", [("hunyuanimage-tiny", "cfg=2", [1, 32, 48, 3]),
                                              ("kandinsky5-tiny", None, [1, 5, 32, 48, 3])])
def test_e2e(model, mesh, shape):
    """--e2e builds the family's pipeline from xdit_jax.tiny's configs with random weights and times its stages."""
    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model=model, meshes=[mesh], log=lambda s: None), steps=2)
    assert row["kind"] == "e2e" and "error" not in row, row.get("error")
    assert row["output_shape"] == shape and row["mesh"] == (mesh or "single device")
    assert row["warm_stages_s"]["denoising"] > 0
