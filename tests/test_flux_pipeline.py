"""The FLUX pipeline from a diffusers save_pretrained folder == diffusers' FluxPipeline, on one device and on
meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_flux, save_torch_pipeline
from tests.jax_util import assert_inpainting_refusals
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.flux import FluxPipeline

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, STEPS, MSL = 48, 80, 3, 16  # 6 x 10 latents: 3 x 5 = 15 packed image tokens (+ 16 text = 31 joint)

_BUILT = {}


def build(tmp_path_factory, guided: bool = True):
    """(torch pipeline, our pipeline, our converted folder), made once per variant."""
    if guided not in _BUILT:
        tp = make_torch_flux(guidance_embeds=guided)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"flux-{guided}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT[guided] = (tp, FluxPipeline.from_pretrained(converted), converted)
    return _BUILT[guided]


def initial_latents(batch=1, seed=0):
    """Packed latents (B, 15, 16), diffusers' ``latents`` argument."""
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, prompt, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 max_sequence_length=MSL, output_type=output_type, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def test_image_matches_diffusers(tmp_path_factory):
    """FLUX.1-dev-like: embedded guidance 3.5, dynamic shifting (mu from the 12 image tokens)."""
    tp, ours, _ = build(tmp_path_factory)
    lat = initial_latents()
    ref = _diffusers(tp, PROMPT, lat, "np", guidance_scale=3.5)
    out = ours(PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
               guidance_scale=3.5, progress=False).images
    assert out.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides: 3 steps, then the VAE (shift and scale); pixels in [0, 1]. The float32 floor is the
    # timestep/guidance sinusoids (see test_flux_transformer); 2e-4 is 1/20 of an 8-bit level, while a
    # wrong packing, RoPE grid, schedule or VAE shift moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("guided", [True, False])
def test_latents_match_diffusers_true_cfg_batch(guided, tmp_path_factory):
    """Two prompts with diffusers' true CFG (negative prompt, true_cfg_scale 2), two images each where guided
    (num_images_per_prompt, as diffusers' run of each prompt twice: its own num_images_per_prompt fails with
    true CFG); schnell-like too (no guidance embedding, a static shift of 1)."""
    tp, ours, _ = build(tmp_path_factory, guided)
    prompts = [PROMPT, "A cat."]
    per = 2 if guided else 1
    lat = initial_latents(batch=2 * per, seed=1)
    kw = dict(negative_prompt=NEG, true_cfg_scale=2.0, guidance_scale=3.5)
    ref = _diffusers(tp, [p for p in prompts for _ in range(per)], lat, "latent", **kw)
    out = ours(prompts, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
               output_type="latent", progress=False, num_images_per_prompt=per, **kw).images
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")


# The single-axis meshes are slow-marked: the combined mesh covers their axes here, and the transformer's
# tests run every mesh; `pytest -m slow` runs them.
SLOW = pytest.mark.slow
# data, cfg and ring in one mesh (three prompts with true CFG: data=2 pads the batch to 4, each half on its cfg
# group) and ulysses=3 run by default; the pairs they replace are slow-marked too.
MESHES = ["ulysses=3", "data=2,cfg=2,ring=2", pytest.param("data=2,ring=2", marks=SLOW),
          pytest.param("cfg=2,ulysses=2", marks=SLOW), pytest.param("ulysses=2,ring=2", marks=SLOW),
          pytest.param("ulysses=2", marks=SLOW), pytest.param("ring=2", marks=SLOW)]


@pytest.mark.parametrize("mesh", MESHES)
def test_meshes_match_one_device(mesh, tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    batch = 3 if "data=2" in mesh else 1  # 3 prompts: data=2 pads the transformer's batch to 4
    prompts = [PROMPT, "A cat.", "A red car."][:batch]
    kw = dict(height=H, width=W, num_inference_steps=2, latents=initial_latents(batch=batch, seed=2),
              max_sequence_length=MSL, progress=False)
    if "cfg=2" in mesh:
        kw.update(negative_prompt=NEG, true_cfg_scale=2.0)
    ref = ours(prompts, **kw).images
    out = FluxPipeline.from_pretrained(folder, mesh=mesh)(prompts, **kw).images
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # one device up to float rounding


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the 2 layers of the model's largest block"):
        FluxPipeline.from_pretrained(folder, mesh="pipefusion=3")  # before any weight is read
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=W)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="come together"):
        ours(PROMPT, negative_prompt_embeds=np.zeros((1, MSL, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="Give either negative_prompt"):
        ours(PROMPT, negative_prompt=NEG, negative_prompt_embeds=np.zeros((1, MSL, 32), np.float32),
             negative_pooled_prompt_embeds=np.zeros((1, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="true CFG"):
        FluxPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, negative_prompt=NEG, height=H, width=W)
    with pytest.raises(ValueError, match="greater than 512"):
        ours(PROMPT, height=H, width=W, max_sequence_length=600)
    with pytest.raises(ValueError, match="cfg=2 splits"):
        FluxPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W)  # no negative prompt


# ---------------------------------------------------------------------------------------------- image-to-image

def _img2img(tmp_path_factory):
    """(diffusers' FluxImg2ImgPipeline of the FLUX parts, ours loaded from the text-to-image folder)."""
    from diffusers import FluxImg2ImgPipeline as TorchImg2Img

    from xdit_jax.pipelines.flux import FluxImg2ImgPipeline

    if "img2img" not in _BUILT:
        tp, _, folder = build(tmp_path_factory)
        _BUILT["img2img"] = (TorchImg2Img(**tp.components), FluxImg2ImgPipeline.from_pretrained(folder))
    return _BUILT["img2img"]


def picture(seed, size=(70, 50)):
    """A PIL image (width x height), resized to W x H by both pipelines (Lanczos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _torch_draws(monkeypatch, ours, seed, shapes):
    """Our pipeline's normal draws replaced by torch's from ``generator`` ``seed`` in diffusers' order (the VAE
    posterior's sample, then the noise), so both runs start from the same noised latents."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(s, generator=g).numpy() for s in shapes]

    def normal(key, shape):
        d = draws.pop(0)
        assert d.shape == tuple(shape)
        return d
    monkeypatch.setattr(ours, "_normal", normal)
    return draws


def test_img2img_matches_diffusers(tmp_path_factory, monkeypatch):
    """strength 0.6 of 4 steps: 3 steps run from the image noised to the second sigma (diffusers' get_timesteps:
    t_start = int(4 - 2.4) = 1), the posterior sampled; the same draws both sides."""
    tp, ours = _img2img(tmp_path_factory)
    image, lat_shape = picture(1), (1, tp.vae.config.latent_channels, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 3, [lat_shape, lat_shape])
    kw = dict(image=image, height=H, width=W, strength=0.6, num_inference_steps=4, guidance_scale=3.5,
              max_sequence_length=MSL)
    with torch.no_grad():
        ref = np.asarray(tp(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images)
    out = ours(PROMPT, progress=False, **kw)
    assert not draws and out.timings["denoising"] > 0 and "image_encoding" in out.timings
    assert out.images.shape == ref.shape == (1, H, W, 3)
    # fp32 both sides, test_image_matches_diffusers' bound (2e-4 = 1/20 of an 8-bit level). Measured 3.1e-6; starting
    # one sigma later moved pixels by 0.51, the posterior's mode instead of its sample by 0.16.
    np.testing.assert_allclose(out.images, ref, atol=2e-4, rtol=0)


@pytest.mark.slow  # (another batch shape to compile; the rule is test_img2img_matches_diffusers')
def test_img2img_latents_batch_and_mesh(tmp_path_factory, monkeypatch):
    """Two prompts x 2 images each from one picture, true CFG, strength 1 (all steps, pure noise at the first
    sigma): == diffusers; the same on cfg=2,ring=2,ulysses=2 (the image's encode split over the mesh) == one device;
    given latents are used as they are (no image encoded)."""
    from xdit_jax.pipelines.flux import FluxImg2ImgPipeline

    tp, ours = _img2img(tmp_path_factory)
    image, lat_shape = picture(2), (1, tp.vae.config.latent_channels, H // 8, W // 8)
    kw = dict(image=image, height=H, width=W, strength=1.0, num_inference_steps=3, guidance_scale=3.5,
              num_images_per_prompt=2, negative_prompt=[NEG, NEG], true_cfg_scale=2.0, max_sequence_length=MSL)
    prompts = [PROMPT, "A cat."]  # (a negative per prompt: diffusers' img2img repeats a single one only once)
    _torch_draws(monkeypatch, ours, 4, [lat_shape, (4,) + lat_shape[1:]])
    with torch.no_grad():
        ref = tp(prompts, generator=torch.Generator().manual_seed(4), output_type="latent", **kw).images.numpy()
    out = ours(prompts, output_type="latent", progress=False, **kw).images
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")

    _, _, folder = build(tmp_path_factory)
    monkeypatch.undo()  # JAX draws from here on
    one = ours(prompts, output_type="latent", progress=False, seed=5, **kw).images
    mesh = FluxImg2ImgPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2")
    np.testing.assert_allclose(mesh(prompts, output_type="latent", progress=False, seed=5, **kw).images, one,
                               atol=2e-5 * np.abs(one).max(), rtol=0)
    given = initial_latents(batch=4, seed=6)
    with torch.no_grad():
        ref = tp(prompts, latents=torch.from_numpy(given), output_type="latent", **kw).images.numpy()
    out = ours(prompts, latents=given, output_type="latent", progress=False, **kw).images
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_img2img_bad_input(tmp_path_factory):
    _, ours = _img2img(tmp_path_factory)
    with pytest.raises(ValueError, match="needs image="):
        ours(PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ours(PROMPT, image=picture(1), height=H, width=W, strength=1.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        ours(PROMPT, image=picture(1), height=H, width=W, strength=0.0, num_inference_steps=4)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        ours(PROMPT, image=[picture(1), picture(2)], height=H, width=W, num_inference_steps=2)


def test_inpaint_matches_diffusers(tmp_path_factory, monkeypatch):
    """diffusers' FluxInpaintPipeline of the same parts, ours loaded from the text-to-image folder: strength 0.8 of 4
    steps (3 run), a mask resized and binarized as diffusers' (the left 5 latent columns kept, the rest repainted),
    true CFG; the same torch draws both sides (the posterior's sample, the noise; diffusers' third, the masked image's
    encode, feeds nothing FLUX.1's inpainting step uses)."""
    from diffusers import FluxInpaintPipeline as TorchInpaint
    from PIL import Image

    from xdit_jax.pipelines.flux import FluxInpaintPipeline

    tp, _, folder = build(tmp_path_factory)
    tp = TorchInpaint(**tp.components)
    ours = FluxInpaintPipeline.from_pretrained(folder)
    c = tp.vae.config.latent_channels
    mask = np.zeros((50, 70), np.uint8)
    mask[:, 30:] = 255  # resized to 48 x 80: columns from ~34 on repainted
    image, mask = picture(5), Image.fromarray(mask)
    _torch_draws(monkeypatch, ours, 7, [(1, c, H // 8, W // 8)] * 2)
    kw = dict(image=image, mask_image=mask, height=H, width=W, strength=0.8, num_inference_steps=4,
              guidance_scale=3.5, negative_prompt=NEG, true_cfg_scale=2.0, max_sequence_length=MSL)
    with torch.no_grad():
        ref = tp(PROMPT, generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images.numpy()
    out = ours(PROMPT, output_type="latent", progress=False, **kw).images
    scale = np.abs(ref).max()
    # fp32, test_latents_match_diffusers_true_cfg_batch's bound. Measured 5.4e-6 of 3.6; without the kept region
    # (an all-repaint mask on our side) 3.4.
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    assert_inpainting_refusals(ours, PROMPT, image, mask, H, W)


@pytest.mark.slow  # (two more torch runs; the crop's steps are tests/test_mask_crop.py's, by default)
def test_inpaint_padding_mask_crop_matches_diffusers(tmp_path_factory, monkeypatch):
    """padding_mask_crop: a 120 x 90 picture inpainted only around its mask (the box grown by 6 px, widened to 80:48,
    cropped and resized to 80 x 48, the result pasted back): the last latents == diffusers' (the same torch draws;
    ours also returns them as output_type="latent", which diffusers refuses with the crop), the
    pasted picture == diffusers' PIL output up to a level of 8 bits, the original outside the mask exactly."""
    from diffusers import FluxInpaintPipeline as TorchInpaint
    from PIL import Image

    from xdit_jax.pipelines.flux import FluxInpaintPipeline

    tp, _, folder = build(tmp_path_factory)
    tp = TorchInpaint(**tp.components)
    ours = FluxInpaintPipeline.from_pretrained(folder)
    mask = np.zeros((90, 120), np.uint8)
    mask[30:52, 20:60] = 255
    image, mask = picture(11, size=(120, 90)), Image.fromarray(mask)
    kw = dict(image=image, mask_image=mask, height=H, width=W, strength=0.8, num_inference_steps=4,
              guidance_scale=3.5, max_sequence_length=MSL, padding_mask_crop=6)
    shapes = [(1, tp.vae.config.latent_channels, H // 8, W // 8)] * 2
    last = {}

    def keep_latents(pipe, i, t, tensors):  # diffusers takes only PIL output with the crop: its last latents
        last["latents"] = tensors["latents"].numpy()
        return tensors

    with torch.no_grad():
        want = tp(PROMPT, generator=torch.Generator().manual_seed(7), callback_on_step_end=keep_latents, **kw).images
    _torch_draws(monkeypatch, ours, 7, shapes)
    out = ours(PROMPT, output_type="latent", progress=False, **kw).images  # (packed, as diffusers')
    ref = last["latents"]
    # the inpaint test's bound; measured 5.2e-6 of 4.0, and 3 of the 32,400 pixel values one level off
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    _torch_draws(monkeypatch, ours, 7, shapes)
    pixels = (ours(PROMPT, progress=False, **kw).images[0] * 255).round().astype(int)
    want = np.asarray(want[0]).astype(int)
    assert pixels.shape == want.shape == (90, 120, 3)
    assert np.abs(pixels - want).max() <= 1  # fp32 pixels rounding to neighbouring levels at most
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(pixels[keep], np.asarray(image).astype(int)[keep])


@pytest.mark.slow  # (the step's compile on a mesh; the blend is per token, local to every shard)
def test_inpaint_mesh_matches_one_device(tmp_path_factory):
    """Two prompts, a mask array, true CFG: cfg=2,ring=2,ulysses=2 and pipefusion=2 (its warm-up step only, so exact)
    == one device."""
    from xdit_jax.pipelines.flux import FluxInpaintPipeline

    _, _, folder = build(tmp_path_factory)
    mask = np.zeros((H, W), np.float32)
    mask[8:40, 16:72] = 1.0
    kw = dict(image=picture(6), mask_image=mask, height=H, width=W, strength=0.9, num_inference_steps=3,
              guidance_scale=3.5, negative_prompt=NEG, true_cfg_scale=2.0, max_sequence_length=MSL,
              output_type="latent", progress=False, seed=8)
    prompts = [PROMPT, "A cat."]
    one = FluxInpaintPipeline.from_pretrained(folder)(prompts, **kw).images
    for mesh, extra in (("cfg=2,ring=2,ulysses=2", {}), ("pipefusion=2", {"pipefusion_warmup_steps": 3})):
        out = FluxInpaintPipeline.from_pretrained(folder, mesh=mesh, **extra)(prompts, **kw).images
        np.testing.assert_allclose(out, one, atol=2e-5 * np.abs(one).max(), rtol=0, err_msg=mesh)



@pytest.mark.slow  # (the torch run; the rule is test_inpaint_matches_diffusers')
def test_inpaint_given_latents_match_diffusers(tmp_path_factory, monkeypatch):
    """Given latents, (B, C, h, w) as diffusers' inpainting takes them (it packs them): the start and the kept
    region's noise, no noise drawn (only the posterior's sample, the first torch draw) == diffusers; the same latents
    packed give the same."""
    from diffusers import FluxInpaintPipeline as TorchInpaint
    from PIL import Image

    from xdit_jax.pipelines.flux import FluxInpaintPipeline, pack_latents

    tp, _, folder = build(tmp_path_factory)
    tp = TorchInpaint(**tp.components)
    ours = FluxInpaintPipeline.from_pretrained(folder)
    lat = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    given = np.random.default_rng(9).standard_normal(lat).astype(np.float32)
    mask = np.zeros((H, W), np.uint8)
    mask[:, 40:] = 255
    kw = dict(image=picture(5), mask_image=Image.fromarray(mask), height=H, width=W, strength=0.7,
              num_inference_steps=4, guidance_scale=3.5, max_sequence_length=MSL)
    draws = _torch_draws(monkeypatch, ours, 7, [lat])
    with torch.no_grad():
        ref = tp(PROMPT, latents=torch.from_numpy(given), generator=torch.Generator().manual_seed(7),
                 output_type="latent", **kw).images.numpy()
    out = ours(PROMPT, latents=given, output_type="latent", progress=False, **kw).images
    assert not draws
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    _torch_draws(monkeypatch, ours, 7, [lat])
    packed = ours(PROMPT, latents=pack_latents(given), output_type="latent", progress=False, **kw).images
    np.testing.assert_allclose(packed, out, atol=1e-6 * np.abs(out).max(), rtol=0)
