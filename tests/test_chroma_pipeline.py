"""The Chroma pipeline from a diffusers save_pretrained folder == diffusers' ChromaPipeline (text encoding with its
mask, latents with CFG, the decoded image), on one device and on a mesh (8 simulated CPU devices).

Our text mask is a real key mask (the reference implementation's; diffusers 0.42.1 adds its float mask to the
logits, huggingface/diffusers#12116: xdit_jax/models/chroma.py). So: prompts that fill ``max_sequence_length``
(masks all ones: diffusers' float mask is inert) == diffusers as it is; padded prompts == diffusers with its
transformer run on each sample's text cropped to the kept tokens, no mask (:func:`_crop_text`)."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_chroma, save_torch_pipeline
from tests.jax_util import assert_inpainting_refusals
from xdit_jax.pipelines.chroma import ChromaPipeline
from xdit_jax.pipelines.denoise import converted_folder

PROMPT = "A small dog running on a beach at sunset."
FOX = "A red fox in the snowy forest at dawn."
NEG = "blurry, low quality"
SHORT = "A cat."  # 6 tokens: padded (7 kept of 16), as is the default negative prompt "" (2 kept)
H, W, STEPS, MSL = 48, 80, 2, 16  # 6 x 10 latents: 3 x 5 = 15 packed image tokens, 16 T5 tokens


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder)."""
    tp = make_torch_chroma()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("chroma"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, ChromaPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0):
    """Packed latents (B, 15, 16), diffusers' ``latents`` argument."""
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, prompt, lat, output_type, **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 max_sequence_length=MSL, output_type=output_type, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _crop_text(forward):
    """diffusers' transformer ``forward`` run per sample on the text cropped to the tokens its mask keeps, with no
    mask (the text ids are zeros: cropping moves no position): what the real key mask computes."""

    def cropped(*, hidden_states, encoder_hidden_states, timestep, txt_ids, attention_mask, **kw):
        outs = []
        for i in range(hidden_states.shape[0]):
            kept = int(attention_mask[i, :encoder_hidden_states.shape[1]].count_nonzero())
            outs.append(forward(hidden_states=hidden_states[i:i + 1], timestep=timestep[i:i + 1],
                                encoder_hidden_states=encoder_hidden_states[i:i + 1, :kept], txt_ids=txt_ids[:kept],
                                attention_mask=None, **kw)[0])
        return (torch.cat(outs),)

    return cropped


def test_text_encoding_matches_diffusers(built):
    """T5 with the tokenizer's mask; the transformer's mask: the prompt and one padding token."""
    tp, ours, _ = built
    prompts = [PROMPT, "A cat."]
    with torch.no_grad():
        ref, ref_mask = tp._get_t5_prompt_embeds(prompts, max_sequence_length=MSL)
    emb, mask = ours.encode_prompt(prompts, MSL)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask.numpy())
    assert 0 < ref_mask.numpy()[1].sum() < MSL  # the short prompt is padded: the mask matters
    # fp32; states O(4); measured max |diff| 2.9e-6
    np.testing.assert_allclose(np.asarray(emb), ref.numpy(), atol=1e-5, rtol=0)


def test_unpadded_image_and_latents_match_diffusers(built):
    """Prompts and a negative prompt that fill the 16 tokens (every mask all ones: diffusers as it is), default real
    CFG (guidance 5), dynamic shifting, FLUX's VAE shift and scale: the final latents and the image."""
    tp, ours, _ = built
    prompts = [PROMPT, FOX]
    with torch.no_grad():
        masks = [tp._get_t5_prompt_embeds(p, max_sequence_length=MSL)[1] for p in (prompts, NEG)]
    assert all(bool((m == 1).all()) for m in masks)  # no padding: diffusers' float mask adds a per-row constant
    lat = initial_latents(batch=2)
    seen = {}

    def last_latents(pipe, i, t, kw):
        seen["latents"] = kw["latents"].numpy().copy()
        return kw

    ref = _diffusers(tp, prompts, lat, "np", negative_prompt=NEG, callback_on_step_end=last_latents)
    kw = dict(negative_prompt=NEG, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
              progress=False)
    out = ours(prompts, **kw).images
    assert out.shape == ref.shape == (2, H, W, 3)
    # fp32 both sides, pixels in [0, 1]; measured max |diff| 2.8e-6. 2e-4 is 1/20 of an 8-bit level, while a wrong
    # mask, schedule or VAE shift moves pixels by 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)
    out = ours(prompts, output_type="latent", **kw).images
    scale = np.abs(seen["latents"]).max()
    # fp32; latents O(5); measured max |diff| 3.8e-6 (the bound: 4.8e-4)
    np.testing.assert_allclose(out, seen["latents"], atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_padded_latents_match_diffusers_on_cropped_text(built, monkeypatch):
    """A padded prompt next to a full one, the default negative prompt "" (padded), guidance 3, two images per
    prompt: == diffusers with its transformer on each sample's cropped text (:func:`_crop_text`); diffusers as it
    is (its float mask added to the logits) differs."""
    tp, ours, _ = built
    prompts = [PROMPT, SHORT]
    lat = initial_latents(batch=4, seed=1)
    kw = dict(guidance_scale=3.0, num_images_per_prompt=2)
    out = ours(prompts, height=H, width=W, num_inference_steps=STEPS, latents=lat, max_sequence_length=MSL,
               output_type="latent", progress=False, **kw).images
    bugged = _diffusers(tp, prompts, lat, "latent", **kw)
    monkeypatch.setattr(tp.transformer, "forward", _crop_text(tp.transformer.forward))
    ref = _diffusers(tp, prompts, lat, "latent", **kw)
    scale = np.abs(ref).max()
    # fp32; latents O(5); measured max |diff| 2.1e-6 (the bound: 4.7e-4)
    np.testing.assert_allclose(out, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    # diffusers' float mask (padded keys lowered by 1, not removed): measured max |diff| 0.64 of latents O(5) (each
    # sample's 0.29 to 0.64: the negative prompt "" is padded for all four)
    assert np.abs(out - bugged).max() > 1e-2 * scale


@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2"])
def test_mesh_matches_one_device(mesh, built):
    _, ours, folder = built
    # padded prompt and negative prompt: the key mask (whole) with the text sharded over ring x ulysses
    kw = dict(height=H, width=W, num_inference_steps=STEPS, latents=initial_latents(seed=2),
              max_sequence_length=MSL, progress=False)
    ref = ours(SHORT, **kw).images
    out = ChromaPipeline.from_pretrained(folder, mesh=mesh)(SHORT, **kw).images
    # one device up to float rounding; measured max |diff| 1.5e-6
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_bad_input(built):
    _, ours, folder = built
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=W)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="mask"):
        ours(prompt_embeds=np.zeros((1, MSL, 32), np.float32), prompt_attention_mask=np.ones((1, 4)), height=H,
             width=W)
    with pytest.raises(ValueError, match="Give either negative_prompt"):
        ours(PROMPT, negative_prompt=NEG, negative_prompt_embeds=np.zeros((1, MSL, 32), np.float32),
             negative_prompt_attention_mask=np.ones((1, MSL)), height=H, width=W)
    with pytest.raises(ValueError, match="greater than 512"):
        ours(PROMPT, height=H, width=W, max_sequence_length=600)
    with pytest.raises(ValueError, match="cfg=2 splits"):
        ChromaPipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W, guidance_scale=1.0)


def test_cli_tiny_chroma(tmp_path, capsys, monkeypatch):
    """scripts/generate.py --model tiny-chroma: a .png with CFG and a negative prompt (on one device: the meshes are
    covered above); a cfg=2 mesh without guidance refused before any weight is read."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c.png"
    rc = cli.main(["--model", "tiny-chroma", "--output", str(out), "--guidance-scale", "3", "--negative-prompt",
                   "blurry", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 64, 3) and image.std() > 1  # the tiny defaults: 48 x 64
    assert '"model_family": "chroma"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-chroma", "--output", str(tmp_path / "n.png"), "--mesh", "cfg=2",
                   "--guidance-scale", "1", "--no-progress"])
    assert rc == 2 and "cfg=2 splits" in capsys.readouterr().err


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of chroma-tiny (15 image + 16 T5 tokens, 6 + one pad kept, both CFG halves) against
    diffusers' transformer (on the text cropped to the 7 kept tokens, no mask: bench_families.ChromaTorchReference)
    on one device and cfg=2 x ulysses=3; the compiled program's FLOPs == the analytic count; the full-size folder
    read as Chroma (not FLUX) with its shapes, nothing compiled."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="chroma-tiny", meshes=[None, "cfg=2,ulysses=3"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ulysses=3", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "chroma" and r["image_tokens"] == 15 and r["text_tokens"] == 16
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["cfg=2,ulysses=3"]):
        # same weights (diffusers' own init) and inputs, fp32: measured 4.8e-7 (one device), 6.0e-7 (cfg=2 x ulysses=3);
        # a mask, RoPE or modulation-row slip moves them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("chroma1-hd")
    assert w.family == "chroma" and w.cfg and w.fam.latent_shape(w) == (2, 4096, 64)
    assert w.fam.tokens(w) == (4096, 512)


@pytest.mark.slow  # FLUX's PipeFusion cases cover the machinery in CI (tests/test_pipefusion_two_stream.py)
def test_pipefusion_equals_sequential_rule_and_warmup_one_device(tmp_path_factory):
    """PipeFusion on pipefusion=2,ulysses=2 (3 double- + 4 single-stream blocks, both stacks looped over the stages;
    the modulation rows found by the layer counter the stages hand on): the patched steps == the displaced-patch
    rule run sequentially on one device (2 patches), exact warm-up steps == one device."""
    from xdit_jax import tiny

    folder = tiny.make_tiny_model(tmp_path_factory.mktemp("chroma-pf") / "m", family="chroma",
                                  transformer={"num_layers": 3, "num_single_layers": 4, "num_attention_heads": 3})
    kw = dict(height=48, width=80, max_sequence_length=16, num_inference_steps=3, output_type="latent",
              progress=False, seed=5, negative_prompt=NEG)
    prompts = [PROMPT, "A cat."]
    one = ChromaPipeline.from_pretrained(folder)(prompts, **kw).images
    sequential = ChromaPipeline.from_pretrained(folder, pipefusion_patches=2)(prompts, **kw).images
    mesh = "pipefusion=2,ulysses=2"
    out = ChromaPipeline.from_pretrained(folder, mesh=mesh, pipefusion_patches=2)(prompts, **kw).images
    warm = ChromaPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=3)(prompts, **kw).images
    scale = np.abs(one).max()
    # fp32, float rounding only: measured 6.9e-6 (patched vs sequential) and 1.0e-5 (warm-up vs one device) of the
    # latents' max 6.0 ("A cat." padded: the masked text partial); the displaced rule itself moves them by 0.7 of it
    assert np.abs(out - sequential).max() <= 2e-5 * scale
    assert np.abs(warm - one).max() <= 2e-5 * scale
    assert np.abs(sequential - one).max() > 1e-3 * scale  # the displaced-patch rule is not the exact one


@pytest.mark.slow  # a full-width compile (~15 s); the tiny row checks the count in CI
def test_benchmark_full_width_flops_compile_only_and_e2e():
    """chroma-cpu-small (Chroma1-HD's width, 1 + 2 blocks) compiled on abstract shapes: the compiled dots == the
    analytic count; --e2e builds the tiny pipeline from its configs and runs CFG over cfg=2."""
    from xdit_jax import bench

    (row,) = bench.run_step_benchmark(bench.StepOptions(model="chroma-cpu-small", meshes=[None], compile_only=True,
                                                        log=lambda s: None))
    assert "error" not in row and row["image_tokens"] == 256 and row["text_tokens"] == 256
    assert row["flops_hlo"] == pytest.approx(row["flops_analytic"], rel=1e-9)
    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model="chroma-tiny", meshes=["cfg=2"], log=lambda s: None),
                                     steps=2)
    assert "error" not in row and row["family"] == "chroma" and row["output_shape"] == [1, 48, 80, 3]


# ---------------------------------------------------------------------------------------------- image-to-image

def test_img2img_matches_diffusers(built, monkeypatch):
    """diffusers' ChromaImg2ImgPipeline of the same parts, ours loaded from the text-to-image folder: two prompts and
    a negative prompt that fill the 16 tokens (diffusers' image-to-image adds its float mask to the logits: inert on
    all-ones masks), real CFG, strength 0.6 of 4 steps (t_start = int(4 - 2.4) = 1: 3 steps), the posterior sampled;
    the same torch draws both sides (the posterior's sample, then the noise)."""
    from diffusers import ChromaImg2ImgPipeline as TorchImg2Img

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax.pipelines.chroma import ChromaImg2ImgPipeline

    tp, _, folder = built
    tp = TorchImg2Img(**tp.components)
    ours = ChromaImg2ImgPipeline.from_pretrained(folder)
    lat = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 3, [lat, (2,) + lat[1:]])
    kw = dict(image=picture(1), height=H, width=W, strength=0.6, num_inference_steps=4, negative_prompt=NEG,
              max_sequence_length=MSL)
    prompts = [PROMPT, FOX]
    with torch.no_grad():
        ref = np.asarray(tp(prompts, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images)
    out = ours(prompts, progress=False, **kw)
    assert not draws and "image_encoding" in out.timings
    assert out.images.shape == ref.shape == (2, H, W, 3)
    # fp32 both sides, test_unpadded_image_and_latents_match_diffusers' bound (2e-4 = 1/20 of an 8-bit level; FLUX's
    # image-to-image test shows what a wrong start sigma or an unsampled posterior does: 0.5 / 0.16 of the pixels).
    # Measured 2.9e-6.
    np.testing.assert_allclose(out.images, ref, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="needs image="):
        ours(PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ours(PROMPT, image=picture(1), height=H, width=W, strength=1.5)


@pytest.mark.slow  # (the tiny folder and another compile; FLUX's CLI image-to-image run is in CI: tests/test_cli.py)
def test_img2img_cli(tmp_path, capsys, monkeypatch):
    """--image on tiny-chroma: ChromaImg2ImgPipeline (diffusers' default strength 0.9); --strength out of range
    refused."""
    import imageio.v3 as iio

    from tests.test_flux_pipeline import picture
    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    src, out = tmp_path / "in.png", tmp_path / "c.png"
    picture(1).save(src)
    rc = cli.main(["--model", "tiny-chroma", "--output", str(out), "--steps", "3", "--image", str(src),
                   "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out).shape == (48, 64, 3)
    assert '"image_encoding"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-chroma", "--output", str(tmp_path / "n.png"), "--image", str(src), "--strength",
                   "1.5", "--no-progress"])
    assert rc == 2 and "--strength must be in (0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- inpainting

def test_inpaint_matches_diffusers(built, monkeypatch):
    """diffusers' ChromaInpaintPipeline of the same parts, ours from the text-to-image folder: two prompts and a
    negative prompt that fill the 16 tokens (its float mask inert; the text shapes of the tests above: compiled once),
    real CFG (guidance 4), strength 0.8 of 4 steps (3 run), a PIL mask resized and binarized as diffusers' (the left
    latent columns kept); the same torch draws both sides (the posterior's sample, the noise; diffusers' third, the
    masked image's encode, feeds nothing its step uses)."""
    from diffusers import ChromaInpaintPipeline as TorchInpaint
    from diffusers.configuration_utils import FrozenDict
    from PIL import Image

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax.pipelines.chroma import ChromaInpaintPipeline

    tp, _, folder = built
    tp = TorchInpaint(**tp.components)
    ours = ChromaInpaintPipeline.from_pretrained(folder)
    lat = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    mask = np.zeros((50, 70), np.uint8)
    mask[:, 30:] = 255  # resized to 48 x 80: columns from ~34 on repainted
    image, mask = picture(5), Image.fromarray(mask)
    draws = _torch_draws(monkeypatch, ours, 7, [lat, (2,) + lat[1:]])
    kw = dict(image=image, mask_image=mask, height=H, width=W, strength=0.8, num_inference_steps=4,
              guidance_scale=4.0, negative_prompt=[NEG, NEG], max_sequence_length=MSL)
    # diffusers 0.42.1's ChromaInpaintPipeline reads transformer.config.guidance_embeds, which a Chroma transformer's
    # config lacks (AttributeError); False: the guidance it makes then is None, and it passes none to the transformer
    monkeypatch.setattr(tp.transformer, "_internal_dict",
                        FrozenDict({**tp.transformer.config, "guidance_embeds": False}))
    with torch.no_grad():
        ref = tp([PROMPT, FOX], generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images.numpy()
    out = ours([PROMPT, FOX], output_type="latent", progress=False, **kw)
    assert not draws and "image_encoding" in out.timings and out.images.shape == ref.shape == (2, 15, 16)
    scale = np.abs(ref).max()
    # fp32, test_unpadded_image_and_latents_match_diffusers' latent bound. Measured 1.9e-6 of 3.6;
    # without the kept region (an all-repaint mask on our side) 4.0.
    np.testing.assert_allclose(out.images, ref, atol=1e-4 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    assert_inpainting_refusals(ours, PROMPT, image, mask, H, W)


@pytest.mark.slow  # (another compile per mesh, the CLI's tiny folder; the rule is test_inpaint_matches_diffusers')
def test_inpaint_mesh_given_latents_and_cli(built, tmp_path, capsys, monkeypatch):
    """cfg=2,ring=2,ulysses=2 and pipefusion=2 (its warm-up steps only: exact) == one device, two prompts x 2 samples,
    a mask array, CFG, JAX draws; given packed latents == diffusers' (the start and the kept region's noise: only the
    posterior's sample drawn, no noise); CLI --image --mask on tiny-chroma (ChromaInpaintPipeline)."""
    import imageio.v3 as iio
    from diffusers import ChromaInpaintPipeline as TorchInpaint
    from diffusers.configuration_utils import FrozenDict
    from PIL import Image

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax import cli
    from xdit_jax.pipelines.chroma import ChromaInpaintPipeline, pack_latents

    tp, _, folder = built
    mask = np.zeros((H, W), np.float32)
    mask[8:40, 16:72] = 1.0
    kw = dict(image=picture(6), mask_image=mask, height=H, width=W, strength=0.9, num_inference_steps=3,
              guidance_scale=4.0, negative_prompt=[NEG, NEG], max_sequence_length=MSL, num_images_per_prompt=2,
              output_type="latent", progress=False, seed=8)
    prompts = [PROMPT, FOX]
    ours = ChromaInpaintPipeline.from_pretrained(folder)
    one = ours(prompts, **kw).images
    for mesh, extra in (("cfg=2,ring=2,ulysses=2", {}), ("pipefusion=2", {"pipefusion_warmup_steps": 3})):
        out = ChromaInpaintPipeline.from_pretrained(folder, mesh=mesh, **extra)(prompts, **kw).images
        np.testing.assert_allclose(out, one, atol=2e-5 * np.abs(one).max(), rtol=0, err_msg=mesh)

    with pytest.raises(ValueError, match=r"latents \(2, 15, 16\): this request's initial latents are \(1, 4, 6, "
                                         r"10\) \(packed: \(1, 15, 16\)\)"):
        ours(PROMPT, latents=initial_latents(batch=2), **{**kw, "negative_prompt": NEG, "num_images_per_prompt": 1})
    tp = TorchInpaint(**tp.components)
    monkeypatch.setattr(tp.transformer, "_internal_dict",
                        FrozenDict({**tp.transformer.config, "guidance_embeds": False}))
    lat = (1, tp.vae.config.latent_channels, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 9, [lat])  # the posterior's sample only
    given = np.random.default_rng(10).standard_normal(lat).astype(np.float32)  # (diffusers' inpainting: unpacked)
    kw = dict(image=picture(6), mask_image=Image.fromarray((mask * 255).astype(np.uint8)), height=H, width=W,
              strength=0.6, num_inference_steps=4, guidance_scale=4.0, negative_prompt=NEG, max_sequence_length=MSL)
    with torch.no_grad():
        ref = tp(PROMPT, latents=torch.from_numpy(given), generator=torch.Generator().manual_seed(9),
                 output_type="latent", **kw).images.numpy()
    out = ours(PROMPT, latents=given, output_type="latent", progress=False, **kw).images
    assert not draws
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    _torch_draws(monkeypatch, ours, 9, [lat])  # the same latents packed: the same result
    packed = ours(PROMPT, latents=pack_latents(given), output_type="latent", progress=False, **kw).images
    np.testing.assert_allclose(packed, out, atol=1e-6 * np.abs(out).max(), rtol=0)

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    src, msk, dst = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "c.png"
    picture(1).save(src)
    m = np.zeros((48, 64), np.uint8)
    m[:, 32:] = 255
    Image.fromarray(m).save(msk)
    rc = cli.main(["--model", "tiny-chroma", "--output", str(dst), "--steps", "3", "--image", str(src), "--mask",
                   str(msk), "--no-progress", "--json"])
    assert rc == 0 and iio.imread(dst).shape == (48, 64, 3)
    assert '"image_encoding"' in capsys.readouterr().out
    # --padding-mask-crop: the region around a mask of the picture's size inpainted, the picture's size out
    m = np.zeros((50, 70), np.uint8)
    m[10:30, 20:50] = 255
    Image.fromarray(m).save(msk)
    rc = cli.main(["--model", "tiny-chroma", "--output", str(dst), "--overwrite", "--steps", "3", "--image", str(src),
                   "--mask", str(msk), "--padding-mask-crop", "4", "--no-progress"])
    out = iio.imread(dst)
    assert rc == 0 and out.shape == (50, 70, 3)
    np.testing.assert_array_equal(out[m == 0], np.asarray(picture(1))[m == 0])  # (a PNG: lossless)
