"""scripts/benchmark.py's step for the families added on top of others' blocks: SkyReels-V2 (Wan's blocks, diffusion
forcing), Qwen-Image-Edit (condition-image tokens, zero_cond_t) and Sana Sprint (the guidance embedded) — each tiny
preset against diffusers' transformer on one device and one sequence mesh, HLO FLOPs == the analytic formula, and the
full-size folder read with its pipeline's shapes (nothing compiled)."""

import numpy as np
import pytest

from tests.jax_util import bench_rows_vs_diffusers
from xdit_jax import bench

_rows = bench_rows_vs_diffusers


def test_skyreels_rows_vs_diffusers(monkeypatch):
    """skyreels-tiny: a timestep per latent frame, the fps embedding, causal blocks of 2 latent frames; the ring cuts
    the blocks across its shards."""
    by_mesh = _rows(monkeypatch, "skyreels-tiny", [None, "cfg=2,ring=2"])
    one = by_mesh["single device"]
    assert one["family"] == "skyreels_v2" and one["diffusion_forcing"] and one["causal_block"] == 2
    assert one["latent_shape"] == [2, 4, 4, 4, 6] and one["video_tokens"] == 24
    w = bench.load_workload("skyreels-tiny")
    inputs = w.fam.make_inputs(w)
    assert inputs["t"].shape == (2, 4) and len(set(inputs["t"][0])) == 4 and list(inputs["fps"]) == [1, 1]

    w = bench.load_workload("skyreels-v2-df-1.3b-540p")  # the DF pipeline sets num_frame_per_block to defaults.json's 5
    assert w.family == "skyreels_v2" and w.fam.forcing(w) and w.transformer["num_frame_per_block"] == 5
    assert w.latent_shape() == (2, 16, 25, 68, 120) and w.fam.tokens(w) == (51000, 512)
    assert w.fam.pipeline_call(w)["causal_block_size"] == 5 and w.fam.pipeline_call(w)["fps"] == 24
    with pytest.raises(ValueError, match="causal block size"):
        w.fam.check(w.fam.config(w.transformer), (2, 16, 24, 68, 120))  # 24 latent frames: not whole blocks of 5


def test_qwen_image_edit_rows_vs_diffusers(monkeypatch):
    """qwenimage-edit-tiny (Edit-2511): the condition image's 4 x 4 packed grid after the noisy 3 x 5 one, its tokens
    modulated by timestep 0 (zero_cond_t), across cfg, ring and ulysses."""
    by_mesh = _rows(monkeypatch, "qwenimage-edit-tiny", [None, "cfg=2,ring=2,ulysses=2"])
    one = by_mesh["single device"]
    assert one["edit"] == "QwenImageEditPlusPipeline" and one["zero_cond_t"]
    assert one["latent_shape"] == [2, 31, 16] and one["condition_tokens"] == 16
    w = bench.load_workload("qwenimage-edit-tiny")
    assert np.array_equal(w.fam.make_inputs(w)["img_shape"], [[1, 3, 5], [1, 4, 4]])

    # the full-size folders at 1024 x 1024: 64 x 64 noisy + 64 x 64 condition tokens; Edit's Qwen2.5-VL sees the
    # image at the VAE's size (37 x 37 tokens after its processor), Plus at 384^2 (14 x 14)
    w = bench.load_workload("qwen-image-edit")
    assert w.fam.edit(w) == "QwenImageEditPipeline" and w.fam.tokens(w) == (8192, 64 + 37 * 37)
    w = bench.load_workload("qwen-image-edit-2511")
    assert w.fam.edit(w) == "QwenImageEditPlusPipeline" and w.fam.tokens(w) == (8192, 64 + 14 * 14)
    assert w.transformer["zero_cond_t"]
    w = bench.load_workload("qwen-image")
    assert w.fam.edit(w) is None and w.fam.image_grids(w) == [(1, 83, 83)]


def test_sana_sprint_rows_vs_diffusers(monkeypatch):
    """sana-sprint-tiny: the guidance embedded (no CFG batch), a float SCM timestep, q/k RMS norms across heads."""
    by_mesh = _rows(monkeypatch, "sana-sprint-tiny", [None, "ring=2,ulysses=2"])
    one = by_mesh["single device"]
    assert one["sprint"] and one["step_batch"] == 1 and one["latent_shape"] == [1, 4, 8, 12]

    w = bench.load_workload("sana-sprint-1.6b-1024px")
    assert w.family == "sana" and not w.cfg and w.latent_shape() == (1, 32, 32, 32)
    inputs = w.fam.make_inputs(w)
    assert inputs["guidance"].tolist() == pytest.approx([0.45]) and inputs["t"].dtype == np.float32
    assert "guidance_scale" not in w.fam.pipeline_call(w)
    with pytest.raises(ValueError, match="drop --cfg"):
        bench.load_workload("sana-sprint-1.6b-1024px", cfg=True)
    w = bench.load_workload("sana1.5-1.6b-1024px")
    assert w.cfg and "guidance" not in w.fam.make_inputs(w)
