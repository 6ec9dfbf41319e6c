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


def _embeds(batch, seed):
    """Random (T5 states, pooled CLIP) prompt embeddings for both sides: the text encoders are test_flux_pipeline's
    (their compiles kept out of these tests)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, MSL, 32)).astype(np.float32),
            rng.standard_normal((batch, 32)).astype(np.float32))


def _compare(tp, ours, kw, torch_seed, image: bool = True):
    """diffusers' call (its final latents from its step-end callback) == ours: the packed latents (1e-4 of their scale)
    and with ``image`` the decoded pixels (2e-4: 1/20 of an 8-bit level); fp32 both sides, test_flux_pipeline's
    bounds. Returns the (latent, pixel) max abs diffs and the latents' scale."""
    seen = {}

    def grab(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"].numpy().copy()
        return kwargs
    torch_kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with torch.no_grad():
        ref = np.asarray(tp(generator=torch.Generator().manual_seed(torch_seed), output_type="np",
                            callback_on_step_end=grab, **torch_kw).images)
    out_lat = ours(output_type="latent", progress=False, **kw).images
    scale = np.abs(seen["latents"]).max()
    np.testing.assert_allclose(out_lat, seen["latents"], atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    diffs = [np.abs(out_lat - seen["latents"]).max(), None, scale]
    if image:
        out = ours(progress=False, **kw).images
        np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)
        diffs[1] = np.abs(out - ref).max()
    return diffs


def _fill_kw(tp, ours, monkeypatch, copies):
    """strength 0.75 of 2 steps (int(2 - 1.5) = 0: both run) from the image noised to the first sigma; the mask's
    region repainted; the same torch draws both sides (the image's posterior sample, the noise, the masked image's
    sample) for ``copies`` calls of ours."""
    shape = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 11, [shape] * 3)
    draws += [d.copy() for d in draws * (copies - 1)]
    emb, pooled = _embeds(1, 0)
    return draws, dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, image=picture(3), mask_image=_mask(), height=H,
                       width=W, strength=0.75, num_inference_steps=2, guidance_scale=30.0)


def test_fill_matches_diffusers(tmp_path_factory, monkeypatch):
    """The latents (the decode is FluxPipeline's, compared in test_images_match_diffusers, slow). Measured: 7.7e-5 of
    2.7 (pixels 5.3e-5); the mask folded transposed (each 8 x 8 block's rows and columns swapped) moves the latents by
    1.7."""
    tp, ours, _ = build("fill", tmp_path_factory)
    draws, kw = _fill_kw(tp, ours, monkeypatch, 1)
    _compare(tp, ours, kw, 11, image=False)
    assert not draws
    with pytest.raises(ValueError, match="needs mask_image="):
        ours(PROMPT, image=picture(3), height=H, width=W)
    with pytest.raises(ValueError, match="needs image="):
        ours(PROMPT, mask_image=_mask(), height=H, width=W)
    with pytest.raises(ValueError, match="mask_image array"):
        ours(PROMPT, image=picture(3), mask_image=np.zeros((8, 8), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, image=picture(3), mask_image=_mask(), height=40, width=W)


def _control_kw(tp, ours, monkeypatch, copies):
    """Two prompts' embeddings, one control image (resized to the output size; repeated to both samples, each encoded
    with its own posterior sample: diffusers' only draw with given latents), 2 steps from given packed latents."""
    c = tp.vae.config.latent_channels
    draws = _torch_draws(monkeypatch, ours, 12, [(2, c, H // 8, W // 8)])
    draws += [d.copy() for d in draws * (copies - 1)]
    emb, pooled = _embeds(2, 1)
    lat = np.random.default_rng(13).standard_normal((2, (H // 16) * (W // 16), 4 * c)).astype(np.float32)
    return draws, dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, control_image=picture(4), height=H, width=W,
                       num_inference_steps=2, guidance_scale=3.5, latents=lat)


def control_on_fill_parts(tmp_path_factory):
    """(diffusers' FluxControlPipeline, ours) on the Fill pipelines' parts (both sides: the same VAE and text encoders;
    ours shares their compiled encoders) with a Control transformer converted directly: the default test's budget
    (no second folder written, converted and loaded; :func:`build`'s "control" pipeline is the slow tests')."""
    from xdit_jax.models import flux
    from xdit_jax.pipelines.flux_fill import FluxControlPipeline

    if "control-on-fill" not in _BUILT:
        from tests.torch_util import state_dict_np
        from xdit_jax import tiny

        tp_fill, fill, _ = build("fill", tmp_path_factory)
        tp = make_torch_flux_conditioned("control", base=tp_fill)
        cfg = flux.FluxConfig.from_dict(dict(tiny.FLUX_CONTROL_TRANSFORMER))
        transformer = flux.build(cfg, flux.params_from_torch(state_dict_np(tp.transformer), cfg))
        ours = FluxControlPipeline(transformer=transformer, transformer_config=cfg, vae=fill.vae,
                                   vae_config=fill.vae_config, vae_encoder=fill.vae_encoder,
                                   text_encoder=fill.text_encoder, tokenizer=fill.tokenizer,
                                   text_encoder_2=fill.text_encoder_2, tokenizer_2=fill.tokenizer_2,
                                   scheduler_config=fill.scheduler_config, mesh=fill.mesh)
        ours._text_fns = fill.__dict__.setdefault("_text_fns", {})
        _BUILT["control-on-fill"] = (tp, ours)
    return _BUILT["control-on-fill"]


def test_control_condition_matches_diffusers(tmp_path_factory, monkeypatch):
    """What Control adds to FLUX.1's step, its conditioning tokens, == diffusers' (prepare_image, the VAE posterior's
    sample, shift and scale, packing): one control image for 2 prompts x 2 samples, each encoded with its own draw
    (the same torch draw both sides). The 2-step latents and image == diffusers in test_images_match_diffusers (slow;
    measured 6.0e-6 of 4.3, pixels 4.3e-6; another control image moves the latents by 0.82)."""
    import jax

    tp, ours = control_on_fill_parts(tmp_path_factory)
    c, vc = tp.vae.config.latent_channels, tp.vae.config
    draws = _torch_draws(monkeypatch, ours, 12, [(4, c, H // 8, W // 8)])
    image = picture(4)
    with torch.no_grad():
        pixels = tp.prepare_image(image=image, width=W, height=H, batch_size=4, num_images_per_prompt=2,
                                  device="cpu", dtype=torch.float32)
        z = tp.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(12))
        ref = tp._pack_latents((z - vc.shift_factor) * vc.scaling_factor, 4, c, H // 8, W // 8).numpy()
    out = np.asarray(ours.control_condition(image, H, W, 2, 2, jax.random.key(0)).tokens)
    assert not draws and out.shape == ref.shape == (4, (H // 16) * (W // 16), 4 * c)
    # fp32: the VAE encoder (test_vae_kl_encoder's tolerance) at the latents' scale
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    kw = dict(prompt_embeds=np.zeros((2, MSL, 32), np.float32), pooled_prompt_embeds=np.zeros((2, 32), np.float32),
              height=H, width=W)
    with pytest.raises(ValueError, match="needs control_image="):
        ours(PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match="image array"):  # (embeddings given: no text encoder compiled)
        ours(control_image=np.zeros((8, 8, 3), np.uint8), **kw)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        ours(control_image=[picture(1)] * 3, **kw)


@pytest.mark.slow  # (the decode's compile; the rule is test_fill_matches_diffusers')
@pytest.mark.parametrize("kind", ["fill", "control"])
def test_images_match_diffusers(kind, tmp_path_factory, monkeypatch):
    """The latents and the decoded images (Control: test_control_condition_matches_diffusers' rule, from its own
    folder)."""
    tp, ours, _ = build(kind, tmp_path_factory)
    draws, kw = (_fill_kw if kind == "fill" else _control_kw)(tp, ours, monkeypatch, 2)
    _compare(tp, ours, kw, 11 if kind == "fill" else 12)
    assert not draws


@pytest.mark.slow  # (the steps' compiles on meshes; the concatenation is per token, local to every shard)
@pytest.mark.parametrize("kind", ["fill", "control"])
def test_meshes_match_one_device(kind, tmp_path_factory):
    """Two prompts with true CFG (our extension: both halves see the conditioning): cfg=2,ring=2,ulysses=2,
    ulysses=3 (the 15 image tokens padded) and pipefusion=2 (its warm-up steps only, so exact) == one device; the
    other pipeline refuses the folder (its model_index class)."""
    from xdit_jax.pipelines.flux_fill import FluxControlPipeline, FluxFillPipeline

    _, ours, folder = build(kind, tmp_path_factory)
    cls = type(ours)
    kw = dict(height=H, width=W, num_inference_steps=2, guidance_scale=3.5, negative_prompt="blurry",
              true_cfg_scale=2.0, max_sequence_length=MSL, output_type="latent", progress=False, seed=5)
    kw.update(dict(image=picture(6), mask_image=_mask(), strength=0.9) if kind == "fill" else
              dict(control_image=picture(7)))
    prompts = [PROMPT, "A cat."]
    one = ours(prompts, **kw).images
    for mesh, extra in (("cfg=2,ring=2,ulysses=2", {}), ("ulysses=3", {}),
                        ("pipefusion=2", {"pipefusion_warmup_steps": 2})):
        out = cls.from_pretrained(folder, mesh=mesh, **extra)(prompts, **kw).images
        np.testing.assert_allclose(out, one, atol=2e-5 * np.abs(one).max(), rtol=0, err_msg=mesh)
    other = FluxControlPipeline if kind == "fill" else FluxFillPipeline
    with pytest.raises(ValueError, match=f"pipeline, not {other.__name__}"):
        other.from_pretrained(folder)


def _files(tmp_path):
    """(an image, a mask) as PNG files."""
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    picture(8).save(image)
    _mask().save(mask)
    return str(image), str(mask)


def test_cli_refuses(tmp_path_factory, tmp_path, capsys):
    """A Fill folder needs --image and --mask, and takes no --control-image (before any weight is loaded)."""
    from xdit_jax import cli

    _, _, folder = build("fill", tmp_path_factory)
    image, mask = _files(tmp_path)
    base = ["--model", str(folder), "--output", str(tmp_path / "o.png"), "--no-progress"]
    assert cli.main(base + ["--image", image]) == 2
    assert "is a FLUX.1 Fill model: give the image with --image PATH" in capsys.readouterr().err
    assert cli.main(base + ["--image", image, "--mask", mask, "--control-image", image]) == 2
    assert "--control-image: FLUX.1 Control (Canny / Depth) models only" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow  # (two CLI runs: the text encoders' compiles)
def test_cli_fill_and_control(tmp_path_factory, tmp_path, capsys):
    """The CLI picks FluxFillPipeline / FluxControlPipeline by the folder's model_index class: --image + --mask, and
    --control-image (required) on a mesh; with --image --mask too, FluxControlInpaintPipeline."""
    import imageio.v3 as iio

    from xdit_jax import cli

    image, mask = _files(tmp_path)
    size = ["--height", str(H), "--width", str(W), "--steps", "2", "--max-sequence-length", str(MSL), "--no-progress"]
    _, _, fill = build("fill", tmp_path_factory)
    out = tmp_path / "fill.png"
    assert cli.main(["--model", str(fill), "--image", image, "--mask", mask, "--output", str(out)] + size) == 0
    assert iio.imread(out).shape == (H, W, 3)
    _, _, control = build("control", tmp_path_factory)
    out = tmp_path / "control.png"
    assert cli.main(["--model", str(control), "--output", str(out)] + size) == 2
    assert "give the edge or depth map with --control-image PATH" in capsys.readouterr().err
    assert cli.main(["--model", str(control), "--control-image", image, "--output", str(out), "--mesh", "ulysses=2"]
                    + size) == 0
    assert iio.imread(out).shape == (H, W, 3)
    out = tmp_path / "control-inpaint.png"  # --image (and --mask) on a Control folder: its image-to-image (inpainting)
    assert cli.main(["--model", str(control), "--control-image", image, "--image", image, "--mask", mask, "--output",
                     str(out), "--json"] + size) == 0
    assert iio.imread(out).shape == (H, W, 3) and '"image_encoding"' in capsys.readouterr().out


@pytest.mark.slow  # (the rule is test_fill_matches_diffusers')
def test_fill_given_latents_match_diffusers(tmp_path_factory, monkeypatch):
    """Given packed latents (diffusers' Fill takes them packed) start the steps as they are: no image noised, the
    masked image's posterior sample the only draw; strength 1 (diffusers' default), two samples of one prompt."""
    tp, ours, _ = build("fill", tmp_path_factory)
    c = tp.vae.config.latent_channels
    draws = _torch_draws(monkeypatch, ours, 14, [(1, c, H // 8, W // 8)])
    emb, pooled = _embeds(1, 2)
    lat = np.random.default_rng(15).standard_normal((2, (H // 16) * (W // 16), 4 * c)).astype(np.float32)
    kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, image=picture(5), mask_image=_mask(), height=H,
              width=W, num_inference_steps=2, guidance_scale=30.0, num_images_per_prompt=2, latents=lat)
    _compare(tp, ours, kw, 14, image=False)
    assert not draws


@pytest.mark.slow  # (two more steps' compiles; the control condition's rule is test_control_condition_matches_diffusers')
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_control_img2img_and_inpaint_match_diffusers(kind, tmp_path_factory, monkeypatch):
    """diffusers' FluxControlImg2ImgPipeline / FluxControlInpaintPipeline on the Control folder's parts == ours loaded
    from it: strength 0.6 of 4 steps (3 run, from the second sigma), one prompt x 2 samples, a control image and an image (and a mask);
    the same torch draws in diffusers' order (Inpaint: the masked image's sample first, which its step does not use
    and ours does not draw; then the control images', the image's, the noise)."""
    import diffusers

    from xdit_jax.pipelines import flux_fill

    tp, _, folder = build("control", tmp_path_factory)
    name = {"img2img": "FluxControlImg2ImgPipeline", "inpaint": "FluxControlInpaintPipeline"}[kind]
    tp = getattr(diffusers, name)(**tp.components)
    ours = getattr(flux_fill, name).from_pretrained(folder)
    one = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    two = (2,) + one[1:]
    shapes = ([one] if kind == "inpaint" else []) + [two, one, two]
    draws = _torch_draws(monkeypatch, ours, 16, shapes)
    if kind == "inpaint":
        draws.pop(0)
    emb, pooled = _embeds(1, 3)
    kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, image=picture(9), control_image=picture(4), height=H,
              width=W, strength=0.6, num_inference_steps=4, guidance_scale=3.5, num_images_per_prompt=2)
    if kind == "inpaint":
        kw["mask_image"] = _mask()
    # fp32, _compare's bound (1e-4 of the latents' scale)
    diffs = _compare(tp, ours, kw, 16, image=False)
    assert not draws  # measured: img2img 5.2e-6 of 2.8, inpaint 5.8e-6 of 3.1
    # the image matters (another image moves the latents far beyond the bound)
    monkeypatch.undo()
    other = ours(output_type="latent", progress=False, **{**kw, "image": picture(10)}).images
    assert np.abs(other - ours(output_type="latent", progress=False, **kw).images).max() > 1e-2 * diffs[2]


@pytest.mark.slow  # (two CLI runs on tiny random folders)
def test_cli_tiny_names(tmp_path, monkeypatch):
    """tiny-flux-fill (--image --mask) and tiny-flux-control (--control-image; with --image: image-to-image) run."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    image, mask = _files(tmp_path)
    for name, extra in (("tiny-flux-fill", ["--image", image, "--mask", mask]),
                        ("tiny-flux-control", ["--control-image", image, "--image", image, "--strength", "0.7"])):
        out = tmp_path / f"{name}.png"
        assert cli.main(["--model", name, "--steps", "2", "--output", str(out), "--no-progress"] + extra) == 0
        assert iio.imread(out).shape == (48, 64, 3)  # the tiny FLUX default size
