"""FLUX.1 Kontext from a diffusers save_pretrained folder == diffusers' FluxKontextPipeline (the reference image
VAE-encoded and appended to the latents' tokens), on one device and on a mesh (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import make_torch_flux, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.flux import FluxKontextPipeline, kontext_image_size, kontext_output_size

PROMPT = "Make the sky purple."
NEG = "blurry, low quality"
H, W, STEPS, MSL = 48, 80, 3, 16  # 15 packed latent tokens (+ 16 text)
MAX_AREA = H * W  # the requested size kept (diffusers rescales to max_area at the requested aspect ratio)

_BUILT = {}


def build(tmp_path_factory):
    if not _BUILT:
        tp = make_torch_flux(kontext=True)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("flux-kontext"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["x"] = (tp, FluxKontextPipeline.from_pretrained(converted), converted)
    return _BUILT["x"]


def picture(seed, size=(70, 50)):
    """A PIL image (width x height): 50 x 70 -> 48 x 64 pixels (floored to 16), 12 packed image tokens."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, image, prompt, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(image=image, prompt=prompt, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type=output_type, max_area=MAX_AREA,
                 _auto_resize=False, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, prompt, lat, output_type="np", **kw):
    return pipe(image, prompt, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
                output_type=output_type, max_area=MAX_AREA, _auto_resize=False, progress=False, **kw).images


def test_image_matches_diffusers(tmp_path_factory):
    """Kontext-dev-like: embedded guidance 3.5, dynamic shifting (mu from the 15 noisy tokens only)."""
    tp, ours, _ = build(tmp_path_factory)
    lat, image = initial_latents(), picture(1)
    ref = _diffusers(tp, image, PROMPT, lat, "np", guidance_scale=3.5)
    out = _ours(ours, image, PROMPT, lat, guidance_scale=3.5)
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides, as test_flux_pipeline's (2e-4 = 1/20 of an 8-bit level); a wrong image scale/shift, RoPE id
    # or token order moves pixels by 1e-2 or more. Measured 3.6e-6.
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)
    # the reference image matters: another image, another result
    other = _ours(ours, picture(2), PROMPT, lat, guidance_scale=3.5)
    assert np.abs(other - out).max() > 1e-3


def test_latents_match_diffusers_true_cfg_two_images(tmp_path_factory):
    """Two prompts, an image each, diffusers' true CFG (negative prompt, true_cfg_scale 2)."""
    tp, ours, _ = build(tmp_path_factory)
    images, prompts = [picture(3), picture(4)], [PROMPT, "Add a hat."]
    lat = initial_latents(batch=2, seed=1)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0, guidance_scale=3.5)
    ref = _diffusers(tp, images, prompts, lat, "latent", **kw)
    out = _ours(ours, images, prompts, lat, "latent", **kw)
    scale = np.abs(ref).max()
    # measured 1.9e-6 of the latents' scale (the sinusoids' float32 floor of test_flux_transformer)
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_mesh_matches_one_device(tmp_path_factory):
    """True CFG over cfg=2, the joint [text; latents; image] sequence (31 + 12 tokens) over ring x ulysses."""
    _, ours, folder = build(tmp_path_factory)
    lat, image = initial_latents(seed=2), picture(5)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0)
    ref = _ours(ours, image, PROMPT, lat, **kw)
    out = _ours(FluxKontextPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2"), image, PROMPT, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding (measured 1.7e-6)


@pytest.mark.slow  # FLUX's PipeFusion tests run the mechanism; this one the image tokens' buffers (19 s)
def test_pipefusion_patches_the_image_tokens_with_the_latents(tmp_path_factory):
    """pipefusion=2 (2 patches over [latents; image] tokens, one exact warm-up step) == the same patch rule run
    sequentially on one device (test_pipefusion_two_stream's reference): the reference image's tokens are patched and
    buffered as the latents' are."""
    _, ours, folder = build(tmp_path_factory)
    lat, image = initial_latents(seed=3), picture(7)
    sequential = _ours(FluxKontextPipeline.from_pretrained(folder, pipefusion_patches=2), image, PROMPT, lat, "latent")
    out = _ours(FluxKontextPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_patches=2), image, PROMPT,
                lat, "latent")
    # fp32, only the summation order differs (stage splits); measured 1.3e-7 of the latents' scale (the patch rule
    # itself is 8e-3 of it away from the exact pass: a stale-K/V run differs)
    assert np.abs(out - sequential).max() <= 2e-5 * np.abs(sequential).max()


def test_sizes_as_diffusers():
    """The reference image's size (floored to 16, then the trained resolution of the nearest aspect ratio) and the
    output size (the requested aspect ratio at max_area) as diffusers computes them."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    processor = VaeImageProcessor(vae_scale_factor=16)
    for w, h in ((70, 50), (1000, 1000), (1920, 1080), (600, 1400), (333, 777), (1200, 900)):
        ih, iw = processor.get_default_height_width(Image.new("RGB", (w, h)))
        assert kontext_image_size(h, w, auto_resize=False) == (ih, iw)
        _, rw, rh = min((abs(iw / ih - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        assert kontext_image_size(h, w) == (rh, rw)
    assert kontext_output_size(1024, 1024, 1024 ** 2) == (1024, 1024)
    assert kontext_output_size(720, 1280, 1024 ** 2) == (768, 1360)  # diffusers: round(sqrt(A r)) floored to 16


def test_bad_input(tmp_path_factory):
    _, ours, _ = build(tmp_path_factory)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        _ours(ours, [picture(1), picture(2)], [PROMPT] * 3, initial_latents(batch=3))
    with pytest.raises(ValueError, match="at least 16 x 16"):
        _ours(ours, picture(1, size=(12, 40)), PROMPT, initial_latents())
    with pytest.raises(ValueError, match="is not 48 x 64"):
        _ours(ours, np.zeros((50, 70, 3), np.uint8), PROMPT, initial_latents())
    with pytest.raises(ValueError, match="empty list"):
        _ours(ours, [], PROMPT, initial_latents())


def test_generate_cli(tmp_path, capsys):
    """generate.py on the tiny Kontext model: the --image edited (48 x 64: the tiny default kept as the output area;
    the mesh: test_mesh_matches_one_device); Kontext-only flags refused elsewhere, --last-image refused, nothing
    written."""
    import imageio.v3 as iio

    from xdit_jax import cli

    src = tmp_path / "in.png"
    picture(6, size=(64, 48)).save(src)
    out = tmp_path / "k.png"
    rc = cli.main(["--model", "tiny-flux-kontext", "--image", str(src), "--output", str(out), "--steps", "2",
                   "--no-auto-resize", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 64, 3) and image.std() > 1
    assert '"model_family": "flux"' in capsys.readouterr().out
    for argv, needle in ((["--model", "tiny-flux", "--max-area", "4096"], "FLUX.1 Kontext only"),
                         (["--model", "tiny-flux", "--image", str(src), "--last-image", str(src)],
                          "image-to-image take one image"),  # (FLUX.1 image-to-image: tests/test_cli.py)
                         (["--model", "tiny-flux-kontext", "--image", str(src), "--last-image", str(src)],
                          "take one image")):
        bad = tmp_path / "bad.png"
        assert cli.main(argv + ["--output", str(bad), "--no-progress"]) == 2
        assert needle in capsys.readouterr().err and not bad.exists()


def test_benchmark_rows_and_workload(tmp_path, monkeypatch):
    """benchmark.py on a Kontext folder (defaults.json's reference_image): the step takes the reference image's tokens
    after the latents' (ids (1, row, col)), against diffusers' transformer on the same inputs; FLOPs == the compiled
    program's; the full-size workload at 1024 x 1024 (4096 + 4096 image tokens) and its e2e call."""
    import json

    from xdit_jax import bench, tiny

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)
    folder = tmp_path / "kontext"
    tiny.write_configs(folder, "flux-kontext")
    (folder / "defaults.json").write_text(json.dumps({"height": 48, "width": 64, "max_sequence_length": MSL,
                                                      "reference_image": True}))
    rows = bench.run_step_benchmark(bench.StepOptions(model=str(folder), steps=1, compare="diffusers", settle=0,
                                                      log=lambda s: None))
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    one = next(r for r in rows if r["impl"] == "xdit_jax")
    assert one["image_tokens"] == 2 * 12 and one["text_tokens"] == MSL
    assert one["max_abs_diff_vs_diffusers"] < 1e-4  # fp32, outputs of order 1 (the ids' first coordinate matters)
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("flux.1-kontext-dev")
    assert w.family == "flux" and w.tokens() == (8192, 512) and w.latent_shape() == (1, 8192, 64)
    ids = w.fam.make_inputs(w)["img_ids"]
    assert ids.shape == (8192, 3) and (ids[:4096, 0] == 0).all() and (ids[4096:, 0] == 1).all()
    call = w.fam.pipeline_call(w)
    assert call["image"].shape == (1024, 1024, 3) and call["max_area"] == 1024 ** 2 and not call["_auto_resize"]
    dev = bench.load_workload("flux.1-dev")
    assert bench.workload_flops(w)["total"] > 2 * bench.workload_flops(dev)["total"]  # attention grows as tokens^2


@pytest.mark.slow  # (another step's compile and torch run; inpainting's rule is test_flux_pipeline's, by default)
@pytest.mark.parametrize("reference", [False, True])
def test_inpaint_matches_diffusers(tmp_path_factory, monkeypatch, reference):
    """diffusers' FluxKontextInpaintPipeline on the Kontext folder's parts: an 80 x 48 picture (the output's size) with
    a mask, strength 0.6 of 4 steps (3 run), true CFG; Kontext's reference tokens the picture's, or a 70 x 50
    image_reference's (48 x 64, its own tokens); the image's latents the posterior's mode, the noise the one draw (the
    same torch draw both sides)."""
    from diffusers import FluxKontextInpaintPipeline as TorchInpaint

    from tests.test_flux_pipeline import _torch_draws
    from xdit_jax.pipelines.flux import FluxKontextInpaintPipeline

    tp, _, folder = build(tmp_path_factory)
    tp = TorchInpaint(**tp.components)
    ours = FluxKontextInpaintPipeline.from_pretrained(folder)
    mask = np.zeros((H, W), np.uint8)
    mask[8:40, 24:64] = 255
    kw = dict(image=picture(3, size=(W, H)), mask_image=Image.fromarray(mask), strength=0.6, num_inference_steps=4,
              guidance_scale=3.5, negative_prompt=NEG, true_cfg_scale=2.0, max_sequence_length=MSL,
              _auto_resize=False)
    if reference:
        kw["image_reference"] = picture(4)
    draws = _torch_draws(monkeypatch, ours, 5, [(1, 16 // 4, H // 8, W // 8)])
    with torch.no_grad():
        ref = tp(prompt=PROMPT, generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images.numpy()
    out = ours(prompt=PROMPT, output_type="latent", progress=False, **kw).images
    assert not draws and out.shape == ref.shape
    # fp32, test_latents_match_diffusers_true_cfg_two_images' bound; measured below 1e-5 of the latents' scale
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    with pytest.raises(NotImplementedError, match="padding_mask_crop"):
        ours(prompt=PROMPT, padding_mask_crop=4, **kw)


@pytest.mark.slow  # (a CLI run: the text encoders' and the step's compiles)
def test_cli_inpaint(tmp_path, monkeypatch):
    """--image --mask on tiny-flux-kontext: FluxKontextInpaintPipeline, the output at the image's (Kontext) size."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    src, msk, dst = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "k.png"
    picture(1, size=(W, H)).save(src)
    mask = np.zeros((H, W), np.uint8)
    mask[:, 40:] = 255
    Image.fromarray(mask).save(msk)
    assert cli.main(["--model", "tiny-flux-kontext", "--image", str(src), "--mask", str(msk), "--steps", "2",
                     "--strength", "0.9", "--no-auto-resize", "--output", str(dst), "--no-progress"]) == 0
    out = iio.imread(dst)
    assert out.shape == (H, W, 3) and out.std() > 1
