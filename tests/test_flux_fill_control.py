"""FLUX.1 Fill and FLUX.1 Control (Canny / Depth) == diffusers' FluxFillPipeline / FluxControlPipeline on the same tiny
random weights and the same torch draws (fp32, 2 steps: the latents and the decoded image), and on a mesh == one
device (slow)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_flux_conditioned, save_torch_pipeline
from tests.test_flux_pipeline import MSL, PROMPT, _torch_draws, picture
from xdit_jax.pipelines.denoise import converted_folder

H, W = 48, 80  # 6 x 10 latents: 15 packed tokens (test_flux_pipeline's sizes)
_BUILT = {}


def build(kind, tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder) for "fill" / "control", made once each."""
    from xdit_jax.pipelines.flux_fill import FluxControlPipeline, FluxFillPipeline

    if kind not in _BUILT:
        tp = make_torch_flux_conditioned(kind)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"flux-{kind}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        cls = FluxFillPipeline if kind == "fill" else FluxControlPipeline
        _BUILT[kind] = (tp, cls.from_pretrained(converted), converted)
    return _BUILT[kind]


def _mask():
    from PIL import Image

    mask = np.zeros((50, 70), np.uint8)
    mask[10:40, 30:] = 255  # resized to 48 x 80 (Lanczos) and binarized, as diffusers' mask processor
    return Image.fromarray(mask)


def _both(tp, ours, kw, torch_seed):
    """(diffusers' final latents and image, ours) for one call; diffusers' latents from its step-end callback."""
    seen = {}

    def grab(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"].numpy().copy()
        return kwargs
    with torch.no_grad():
        ref = np.asarray(tp(PROMPT, generator=torch.Generator().manual_seed(torch_seed), output_type="np",
                            callback_on_step_end=grab, **kw).images)
    out_lat = ours(PROMPT, output_type="latent", progress=False, **kw).images
    out = ours(PROMPT, progress=False, **kw).images
    return seen["latents"], ref, out_lat, out


def test_fill_matches_diffusers(tmp_path_factory, monkeypatch):
    """strength 0.75 of 2 steps... (int(2 - 1.5) = 0: both run) with the image noised to the first sigma; the mask's
    region repainted; the same torch draws both sides (the image's posterior sample, the noise, the masked image's
    sample), twice (our latent and image outputs)."""
    tp, ours, _ = build("fill", tmp_path_factory)
    c = tp.vae.config.latent_channels
    shape = (1, c, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 11, [shape] * 3)
    draws += [d.copy() for d in draws]  # the second call takes the same draws
    kw = dict(image=picture(3), mask_image=_mask(), height=H, width=W, strength=0.75, num_inference_steps=2,
              guidance_scale=30.0, max_sequence_length=MSL)
    ref_lat, ref, out_lat, out = _both(tp, ours, kw, 11)
    assert not draws
    scale = np.abs(ref_lat).max()
    # fp32 both sides (test_flux_pipeline's bounds): latents 1e-4 of their scale, pixels 2e-4 (1/20 of an 8-bit
    # level). A mask folded in the wrong order moved the latents by ~0.3 of their scale.
    np.testing.assert_allclose(out_lat, ref_lat, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="needs mask_image="):
        ours(PROMPT, image=picture(3), height=H, width=W)
    with pytest.raises(ValueError, match="needs image="):
        ours(PROMPT, mask_image=_mask(), height=H, width=W)
    with pytest.raises(ValueError, match="mask_image array"):
        ours(PROMPT, image=picture(3), mask_image=np.zeros((8, 8), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, image=picture(3), mask_image=_mask(), height=40, width=W)
