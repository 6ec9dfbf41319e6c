"""CogView4 Control == diffusers' CogView4ControlPipeline on the same tiny random weights and the same torch draws
(fp32, 2 steps: the latents), a mesh == one device (slow: a folder written, converted and loaded, and the steps'
compiles); the refusals (default: no weights, no compile)."""

import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, gaussian_latents, make_torch_cogview4_control, torch_and_our_pipeline
from tests.test_flux_pipeline import _torch_draws, picture

PROMPT = "A small dog running on a beach at sunset."
H, W = 64, 64  # 4 x 8 x 8 latents (the transformer takes 8 channels), 16 image tokens
CALL = dict(height=H, width=W, num_inference_steps=2, guidance_scale=5.0)
_BUILT = {}


def _pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    from xdit_jax.pipelines.cogview4_control import CogView4ControlPipeline

    if "pipes" not in _BUILT:
        _BUILT["pipes"] = torch_and_our_pipeline(make_torch_cogview4_control, CogView4ControlPipeline,
                                                 tmp_path_factory, "cogview4-control")
    return _BUILT["pipes"]


def _run_ours(pipe, monkeypatch, lat, draw_seed, image, prompts, per=1):
    """Ours with the control image's posterior samples = torch's draws from ``draw_seed`` (diffusers draws them from
    torch's global generator)."""
    c = lat.shape[1]
    rows = len(prompts) * per
    draws = _torch_draws(monkeypatch, pipe, draw_seed, [(rows, c, H // 8, W // 8)])
    out = pipe(prompts, control_image=image, latents=lat, num_images_per_prompt=per, output_type="latent",
               progress=False, **CALL).images
    assert not draws
    return out


@pytest.mark.slow  # (the tiny folder written, converted and loaded; the step's, the GLM's and the encoder's compiles)
def test_latents_and_mesh_match_diffusers(tmp_path_factory, monkeypatch):
    """Two prompts x 2 samples with CFG 5 (the negative prompt ""), one control image (resized 70 x 50 -> 64 x 64,
    repeated to the 4 samples, each its own posterior sample): the latents after 2 steps == diffusers'; on
    cfg=2,ring=2,ulysses=2 == one device. Another control image moves the latents (it is used)."""
    import jax

    from xdit_jax.pipelines.cogview4_control import CogView4ControlPipeline

    tp, ours, folder = _pipes(tmp_path_factory)
    prompts = [PROMPT, "A cat."]
    lat = gaussian_latents((4, H // 8, W // 8), 4, seed=3)
    torch.manual_seed(12)  # diffusers' posterior sample: torch's global generator
    with torch.no_grad():
        ref = tp(list(prompts), control_image=picture(4), latents=torch.from_numpy(lat), num_images_per_prompt=2,
                 output_type="latent", **CALL).images.numpy()
    out = _run_ours(ours, monkeypatch, lat, 12, picture(4), prompts, per=2)
    assert out.shape == ref.shape == (4, 4, H // 8, W // 8)
    assert_close_latents(out, ref)
    other = _run_ours(ours, monkeypatch, lat, 12, picture(5), prompts, per=2)
    assert np.abs(other - ref).max() > 1e-2 * np.abs(ref).max()
    mesh = CogView4ControlPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2")
    on_mesh = _run_ours(mesh, monkeypatch, lat, 12, picture(4), prompts, per=2)
    np.testing.assert_allclose(on_mesh, out, atol=1e-5 * np.abs(out).max(), rtol=0)
    compiled = mesh.compile_step(2, height=H, width=W, num_inference_steps=2, text_tokens=32)  # (the control too)
    shapes = [a.shape for a in jax.tree.leaves(compiled.args_info) if hasattr(a, "shape")]
    assert shapes.count((2, 4, H // 8, W // 8)) == 2  # the latents and the control latents


def test_refusals():
    """A transformer without the doubled channels, a missing control image, a bad number of them: refused before any
    weight is touched."""
    from xdit_jax import tiny
    from xdit_jax.models.cogview4 import CogView4Config
    from xdit_jax.models.vae_kl import AutoencoderKLConfig
    from xdit_jax.pipelines.cogview4_control import CogView4ControlPipeline

    def pipe(**tc):
        cfg = CogView4Config.from_dict({**tiny.COGVIEW4_TRANSFORMER, **tc})
        return CogView4ControlPipeline(transformer=None, transformer_config=cfg, vae=None,
                                       vae_config=AutoencoderKLConfig.from_dict(dict(tiny.FLUX_VAE)),
                                       text_encoder=None, tokenizer=None, scheduler_config=None)

    with pytest.raises(ValueError, match="takes 4 input channels, not twice its 4 output channels"):
        pipe()(PROMPT, control_image=picture(1), height=H, width=W)
    with pytest.raises(ValueError, match="not twice its 4 output channels"):
        pipe().compile_step(1, height=H, width=W)
    control = pipe(in_channels=8)
    assert control.latent_shape(2, H, W) == (2, 4, H // 8, W // 8)
    with pytest.raises(ValueError, match="needs control_image="):
        control(PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match="3 control images for 2 prompts"):
        control.control_condition([picture(1)] * 3, H, W, 2, 1, None)


def test_cli_requires_control_image(tmp_path, capsys):
    """A CogView4 Control folder (its model_index.json read, no weight loaded) needs --control-image."""
    import json

    from xdit_jax import cli

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": "CogView4ControlPipeline"}))
    out = tmp_path / "o.png"
    assert cli.main(["--model", str(tmp_path / "m"), "--output", str(out), "--no-progress"]) == 2
    assert "is a CogView4 Control model: give the control image" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # (a CLI run: the GLM's, the encoder's, the steps' and the decode's compiles)
def test_cli_cogview4_control(tmp_path_factory, tmp_path, capsys):
    """--control-image on a CogView4 Control folder with CFG on cfg=2,ulysses=2: a .png."""
    import imageio.v3 as iio

    from xdit_jax import cli

    _, _, folder = _pipes(tmp_path_factory)
    image, out = tmp_path / "control.png", tmp_path / "o.png"
    picture(8).save(image)
    rc = cli.main(["--model", str(folder), "--control-image", str(image), "--output", str(out), "--height", "64",
                   "--width", "64", "--steps", "2", "--mesh", "cfg=2,ulysses=2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert iio.imread(out).shape == (64, 64, 3)
