"""The Qwen-Image pipeline from a diffusers save_pretrained folder == diffusers' QwenImagePipeline (tiny random
weights, fp32), on one device and on meshes (8 simulated CPU devices)."""

import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_qwenimage, pipeline_runs, torch_and_our_pipeline
from tests.jax_util import assert_inpainting_refusals
from xdit_jax.pipelines.qwenimage import QwenImagePipeline

PROMPT = "A small dog running on a beach at sunset."
PROMPTS = [PROMPT, "A cat."]
NEGATIVE = "Waves crash."
# 48 x 80: 6 x 10 latents, 3 x 5 = 15 packed tokens of 16 channels
H, W, STEPS = 48, 80, 2
LATENT = (15, 16)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_qwenimage, QwenImagePipeline, tmp_path_factory, "qwenimage")


initial_latents, run_torch, run_ours = pipeline_runs(
    LATENT, dict(height=H, width=W, num_inference_steps=STEPS, true_cfg_scale=1.0))


# Latents O(3.5) after 2 Euler steps. Both sides fp32: measured 1.2e-6 for one prompt, 2.1e-6 for two prompts with
# true CFG (6e-7 of the scale); the plain CFG combine instead of diffusers' norm-rescaled one moves them by 0.05, a
# wrong text mask, template crop or RoPE position by 1e-2 and more.
_close_latents = assert_close_latents


def test_one_prompt_image_matches_diffusers(pipes):
    """One prompt without CFG: the latents, then the image."""
    tp, ours, _ = pipes
    lat = initial_latents()
    _close_latents(run_ours(ours, PROMPT, lat, output_type="latent"), run_torch(tp, PROMPT, lat, output_type="latent"))
    ref = run_torch(tp, PROMPT, lat, output_type="np")
    out = run_ours(ours, PROMPT, lat)
    assert out.shape == ref.shape == (1, H, W, 3)
    # pixels in [0, 1] from the tiny VAE (measured 6e-8): 1e-4 is ~1/40 of an 8-bit level
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_two_prompts_and_true_cfg_match_diffusers(pipes):
    """Two prompts of different lengths (each row's text mask) with true CFG (diffusers' default scale 4, one
    negative prompt per prompt: the norm-rescaled combine, the negative's text of another length)."""
    tp, ours, _ = pipes
    _, mask = ours.encode_prompt(PROMPTS)
    lengths = np.asarray(mask).sum(1)
    assert lengths[0] > lengths[1] > 0  # the template cropped: the prompts' tokens
    lat = initial_latents(batch=2, seed=1)
    negs = [NEGATIVE, "Blurry."]
    out = run_ours(ours, PROMPTS, lat, output_type="latent", negative_prompt=negs, true_cfg_scale=4.0)
    ref = run_torch(tp, PROMPTS, lat, output_type="latent", negative_prompt=negs, true_cfg_scale=4.0)
    assert out.shape == ref.shape == (2,) + LATENT
    _close_latents(out, ref)
    plain = run_ours(ours, PROMPTS, lat, output_type="latent")
    assert np.abs(plain - out).max() > 1e-2  # true CFG changed the result


def test_given_embeddings_as_prompt(pipes):
    """prompt_embeds / prompt_embeds_mask (diffusers' arguments) == the prompt; without a mask: all tokens valid."""
    _, ours, _ = pipes
    emb, mask = ours.encode_prompt([PROMPT])
    lat = initial_latents(seed=3)
    ref = run_ours(ours, PROMPT, lat, output_type="latent")
    out = run_ours(ours, None, lat, output_type="latent", prompt_embeds=np.asarray(emb),
                   prompt_embeds_mask=np.asarray(mask))
    np.testing.assert_array_equal(out, ref)
    out = run_ours(ours, None, lat, output_type="latent", prompt_embeds=np.asarray(emb))
    np.testing.assert_array_equal(out, ref)  # one prompt: its mask is all ones


def test_bad_requests_refused(pipes):
    _, ours, folder = pipes
    assert not (folder / "text_encoder" / "vision_params").exists()  # text-to-image: the vision tower not converted
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=W, num_inference_steps=1)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(PROMPT, height=H, width=W, max_sequence_length=2000)
    with pytest.raises(ValueError, match="embeddings"):
        ours(None, prompt_embeds=np.zeros((1, 3, 7), np.float32), height=H, width=W)


# cfg x ring x ulysses with true CFG (its two passes over cfg, the 15 image tokens over 4); ulysses=3 (uneven: 15
# tokens and 2 heads padded); data x ulysses with two prompts. The latents to float32 rounding of sums in another order:
# measured 9.5e-7, 2.5e-7, 2.5e-7 on latents O(3.7).
MESHES = [("cfg=2,ring=2,ulysses=2", PROMPT, dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0)),
          pytest.param("ulysses=3", PROMPT, {}, marks=pytest.mark.slow),
          pytest.param("data=2,ulysses=2", PROMPTS, {}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh,prompt,kw", MESHES)
def test_meshes_match_one_device(pipes, mesh, prompt, kw):
    _, ours, folder = pipes
    lat = initial_latents(batch=1 if isinstance(prompt, str) else 2, seed=4)
    ref = run_ours(ours, prompt, lat, output_type="latent", **kw)
    out = run_ours(QwenImagePipeline.from_pretrained(folder, mesh=mesh), prompt, lat, output_type="latent", **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_full_size_configs_folder():
    """configs/qwen-image (diffusers' layout of Qwen/Qwen-Image) reads into the modules' configs; the text encoder
    is Qwen2.5-VL-7B's language model (parameter count == transformers' without the vision tower and lm_head); the
    release's default size passes the checks, bad requests are named."""
    import json
    from pathlib import Path

    import jax
    import transformers

    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.keymap import expected_shapes
    from xdit_jax.models import llama
    from xdit_jax.pipelines import qwenimage as qip
    from xdit_jax.schedulers import flow_match

    root = Path(__file__).resolve().parents[1] / "configs" / "qwen-image"
    cfgs = {}
    for name, cls in model_components(root).items():
        _, cfg_cls = model_class(cls)
        cfgs[name] = cfg_cls.from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = qip.read_configs(root)
    assert (tc.num_layers, tc.inner_dim, tc.joint_attention_dim, tc.axes_dims_rope) == (60, 3072, 3584, (16, 56, 56))
    assert vc.z_dim == 16 and vc.spatial_compression_ratio == 8
    te = cfgs["text_encoder"]
    assert (te.hidden_size, te.num_hidden_layers, te.num_key_value_heads, te.qkv_bias) == (3584, 28, 4, True)
    raw = {k: v for k, v in json.loads((root / "text_encoder" / "config.json").read_text()).items()
           if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        tm = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**raw))
    want = sum(p.numel() for p in tm.model.language_model.parameters())
    got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(expected_shapes(lambda: llama.LlamaModel(te))))
    assert got == want  # 7.07B
    sched = flow_match.FlowMatchEulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
    assert sched.use_dynamic_shifting and sched.shift_terminal == 0.02 and sched.time_shift_type == "exponential"
    defaults = json.loads((root / "defaults.json").read_text())
    assert (defaults["height"], defaults["width"], defaults["num_inference_steps"], defaults["true_cfg_scale"]) == (
        1328, 1328, 50, 4.0)
    qip.check_request(tc, vc, 1328, 1328, 1, "cfg=2,ulysses=4", 4.0)
    with pytest.raises(ValueError, match="more stages"):
        qip.check_request(tc, vc, 1328, 1328, 1, "pipefusion=64")
    with pytest.raises(ValueError, match="multiples of 16"):
        qip.check_request(tc, vc, 1320, 1328, 1)


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of qwenimage-tiny (15 image + 16 text tokens, true CFG: the negative half's text
    masked) against diffusers' transformer on one device and on ulysses=2; the full-size folder read as Qwen-Image
    (not FLUX: both have axes_dims_rope) with its shapes, nothing compiled."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="qwenimage-tiny", meshes=[None, "ulysses=2"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("single device", "xdit_jax"), ("torch cpu", "diffusers"), ("ulysses=2", "xdit_jax")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "qwenimage" and r["latent_shape"] == [2, 15, 16] and r["image_tokens"] == 15
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["ulysses=2"]):
        # same weights and inputs, fp32, outputs O(1): measured 4.8e-7 and 3.6e-7; a text-mask or RoPE slip moves
        # them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert "15 image + 16 Qwen2.5-VL tokens" in bench.format_table(rows)
    w = bench.load_workload("qwen-image")
    assert w.family == "qwenimage" and w.cfg and w.latent_shape() == (2, 83 * 83, 64)
    assert w.fam.tokens(w) == (83 * 83, 64)
    small = bench.load_workload("qwenimage-cpu-small")
    assert small.transformer["num_layers"] == 1 and small.latent_shape() == (2, 256, 64)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,kw", [("pipefusion=2", {}),
                                     ("cfg=2,pipefusion=2", dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0))])
def test_pipefusion_matches_sequential_rule(pipes, mesh, kw):
    """pipefusion=2 over the block stack (the text sliced with the patches, its mask whole): == the same patched rule
    run on one device (pipefusion_patches=2). 64 x 64: 4 x 4 = 16 image tokens, two patches of 8: a real split."""
    _, ours, folder = pipes
    lat = np.random.default_rng(5).standard_normal((1, 16, 16)).astype(np.float32)
    kw = dict(kw, output_type="latent", num_inference_steps=3, height=64, width=64)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(QwenImagePipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(QwenImagePipeline.from_pretrained(folder, mesh=mesh), PROMPT, lat, **kw)
    # latents O(3): measured 2.4e-7 (pipefusion=2) and 9.5e-7 (with cfg=2); the stale K/V move them by 0.014 / 0.04
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ)


def test_random_weights_from_configs(tmp_path):
    """QwenImagePipeline.from_config: the tiny configs alone (no weights; the stand-in Qwen2 tokenizer) run."""
    from xdit_jax import tiny

    tiny.write_configs(tmp_path, "qwenimage")
    pipe = QwenImagePipeline.from_config(tmp_path, seed=1)
    out = run_ours(pipe, PROMPT, initial_latents())
    assert out.shape == (1, H, W, 3) and np.isfinite(out).all()
    # one step: sigmas [1.0], which shift_terminal's stretch divides by zero (diffusers' schedule is NaN): refused
    with pytest.raises(ValueError, match="shift_terminal"):
        run_ours(pipe, PROMPT, initial_latents(), num_inference_steps=1)
    assert type(pipe.tokenizer).__name__.startswith("Qwen2Tokenizer")


@pytest.mark.slow
def test_benchmark_e2e_true_cfg_over_cfg():
    """--e2e builds the Qwen-Image pipeline from the tiny configs with random weights: true CFG (negative prompt " ",
    diffusers' scale 4) split over cfg=2, the stages timed."""
    from xdit_jax import bench

    (row,) = bench.run_e2e_benchmark(bench.StepOptions(model="qwenimage-tiny", meshes=["cfg=2"], cfg=True,
                                                       log=lambda s: None), steps=2)
    assert "error" not in row, row.get("error")
    assert row["output_shape"] == [1, H, W, 3] and row["mesh"] == "cfg=2"
    assert row["call"]["true_cfg_scale"] == 4.0 and row["call"]["negative_prompt"] == " "
    assert {"text_encoding", "denoising", "decoding"} <= set(row["warm_stages_s"])


@pytest.mark.slow
def test_images_per_prompt_keep_each_prompts_mask(pipes):
    """num_images_per_prompt=2 with two prompts of different lengths and true CFG. diffusers 0.42.1 repeats the
    states per prompt ([e0, e0, e1, e1]) but its mask per batch ([m0, m1, m0, m1]: ``mask.repeat(1, n, 1)`` of a 2-D
    mask), so its rows 1 and 2 read one prompt's states under the other's mask; ours keeps each prompt's mask with its
    states. Rows 0 and 3 (where diffusers' pairs are right) == diffusers; every row == its prompt alone."""
    tp, ours, _ = pipes
    lat = initial_latents(batch=4, seed=7)
    negs = [NEGATIVE, "Blurry."]
    kw = dict(output_type="latent", negative_prompt=negs, true_cfg_scale=4.0)
    out = run_ours(ours, PROMPTS, lat, num_images_per_prompt=2, **kw)
    ref = run_torch(tp, PROMPTS, lat, num_images_per_prompt=2, **kw)
    for i in (0, 3):  # measured 1.6e-6 on latents O(3.5) (as the one-image tests)
        _close_latents(out[i], ref[i])
    assert np.abs(out[1] - ref[1]).max() > 1e-2  # diffusers' row 1: prompt 0's states under prompt 1's mask
    for i, (p, n) in enumerate([(0, 0), (0, 0), (1, 1), (1, 1)]):
        alone = run_ours(ours, PROMPTS[p], lat[i:i + 1], output_type="latent", negative_prompt=negs[n],
                         true_cfg_scale=4.0)
        _close_latents(out[i:i + 1], alone)


@pytest.mark.slow
def test_bf16_close_to_fp32(pipes):
    """bf16 weights and activations (text encoder, transformer) against our fp32, true CFG: measured 1.1% of the
    latents' scale after 2 steps."""
    _, ours, folder = pipes
    lat = initial_latents(seed=8)
    kw = dict(output_type="latent", negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    ref = run_ours(ours, PROMPT, lat, **kw)
    out = run_ours(QwenImagePipeline.from_pretrained(folder, dtype="bfloat16"), PROMPT, lat, **kw)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05


@pytest.mark.slow
def test_full_width_flops_compile_only():
    """configs/qwen-image at full width, 2 blocks, 256 x 256 with true CFG, compiled on abstract shapes (no weights):
    the compiled program's dots == the analytic count (measured 299.19 G both); cfg=2,ulysses=4 compiles too."""
    from xdit_jax import bench

    rows = bench.run_step_benchmark(bench.StepOptions(model="qwen-image", layers=2, height=256, width=256,
                                                      meshes=[None, "cfg=2,ulysses=4"], compile_only=True,
                                                      log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    one = by_mesh["single device"]
    assert "error" not in one and one["image_tokens"] == 256 and one["text_tokens"] == 64
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    assert "error" not in by_mesh["cfg=2,ulysses=4"]


# ---------------------------------------------------------------------------------------------- image-to-image

def test_img2img_matches_diffusers(pipes, monkeypatch):
    """diffusers' QwenImageImg2ImgPipeline of the same parts, ours loaded from the text-to-image folder: true CFG
    (its default 4 with a negative prompt), strength 0.6 of 4 steps (t_start = int(4 - 2.4) = 1: 3 steps), the
    image encoded by the Wan 2.1 encoder as one frame with the posterior sampled (diffusers' ``retrieve_latents``
    default) and normalized by latents_mean / latents_std; the same torch draws both sides (the posterior's sample,
    then the noise: (1, 16, 1, 6, 10) there, (1, 16, 6, 10) here, the same values)."""
    from diffusers import QwenImageImg2ImgPipeline as TorchImg2Img

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax.pipelines.qwenimage import QwenImageImg2ImgPipeline

    tp, _, folder = pipes
    tp = TorchImg2Img(**tp.components)
    ours = QwenImageImg2ImgPipeline.from_pretrained(folder)
    lat = (1, tp.vae.config.z_dim, H // 8, W // 8)
    draws = _torch_draws(monkeypatch, ours, 3, [lat, lat])
    kw = dict(image=picture(1), height=H, width=W, strength=0.6, num_inference_steps=4, negative_prompt=NEGATIVE)
    with torch.no_grad():
        ref = tp(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images.numpy()
    out = ours(PROMPT, output_type="latent", progress=False, **kw)
    assert not draws and "image_encoding" in out.timings
    assert out.images.shape == ref.shape == (1,) + LATENT
    # fp32 both sides, the latents' bound above. Measured 1.3e-6 of 2.4; the posterior's mode instead of its sample
    # moved them by 0.80
    _close_latents(out.images, ref)
    with pytest.raises(ValueError, match="needs image="):
        ours(PROMPT, height=H, width=W)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ours(PROMPT, image=picture(1), height=H, width=W, strength=-0.5)


@pytest.mark.slow  # (another pipeline to compile on a mesh; the rule is test_img2img_matches_diffusers')
def test_img2img_mesh_and_cli(pipes, tmp_path, capsys, monkeypatch):
    """cfg=2,ring=2,ulysses=2 (the image's encode split over the mesh) == one device, two prompts x 2 samples with
    true CFG, JAX draws; given latents used as given; CLI --image on tiny-qwenimage (QwenImageImg2ImgPipeline)."""
    import imageio.v3 as iio
    from diffusers import QwenImageImg2ImgPipeline as TorchImg2Img

    from tests.test_flux_pipeline import picture
    from xdit_jax import cli
    from xdit_jax.pipelines.qwenimage import QwenImageImg2ImgPipeline

    tp, _, folder = pipes
    kw = dict(image=picture(2), height=H, width=W, strength=0.7, num_inference_steps=3, negative_prompt=NEGATIVE,
              num_images_per_prompt=2, output_type="latent", progress=False, seed=5)
    one = QwenImageImg2ImgPipeline.from_pretrained(folder)
    ref = one(PROMPTS, **kw).images
    out = QwenImageImg2ImgPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2")(PROMPTS, **kw).images
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    given = initial_latents(seed=6)  # used as given (no image encoded), from the strength's step: == diffusers
    kw = dict(image=picture(2), height=H, width=W, strength=0.7, num_inference_steps=3, negative_prompt=NEGATIVE)
    with torch.no_grad():
        want = TorchImg2Img(**tp.components)(PROMPT, latents=torch.from_numpy(given), output_type="latent",
                                             **kw).images.numpy()
    _close_latents(one(PROMPT, latents=given, output_type="latent", progress=False, **kw).images, want)

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    src, dst = tmp_path / "in.png", tmp_path / "q.png"
    picture(1).save(src)
    rc = cli.main(["--model", "tiny-qwenimage", "--output", str(dst), "--steps", "2", "--image", str(src),
                   "--strength", "0.5", "--negative-prompt", "blurry", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(dst).shape == (48, 80, 3)
    assert '"image_encoding"' in capsys.readouterr().out


def test_inpaint_matches_diffusers(pipes, monkeypatch):
    """diffusers' QwenImageInpaintPipeline of the same parts, ours from the text-to-image folder: true CFG (its
    default 4 with a negative prompt), strength 0.8 of 4 steps (3 run), a PIL mask resized and binarized as
    diffusers' (the left latent columns kept); the same torch draws both sides (the posterior's sample, the noise;
    diffusers' third, the masked image's encode, feeds nothing its step uses)."""
    from diffusers import QwenImageInpaintPipeline as TorchInpaint
    from PIL import Image

    from tests.test_flux_pipeline import _torch_draws, picture
    from xdit_jax.pipelines.qwenimage import QwenImageInpaintPipeline

    tp, _, folder = pipes
    tp = TorchInpaint(**tp.components)
    ours = QwenImageInpaintPipeline.from_pretrained(folder)
    lat = (1, tp.vae.config.z_dim, H // 8, W // 8)
    mask = np.zeros((50, 70), np.uint8)
    mask[:, 30:] = 255  # resized to 48 x 80: columns from ~34 on repainted
    image, mask = picture(5), Image.fromarray(mask)
    draws = _torch_draws(monkeypatch, ours, 7, [lat, lat])
    kw = dict(image=image, mask_image=mask, height=H, width=W, strength=0.8, num_inference_steps=4,
              negative_prompt=NEGATIVE)
    with torch.no_grad():
        ref = tp(PROMPT, generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images.numpy()
    out = ours(PROMPT, output_type="latent", progress=False, **kw)
    assert not draws and "image_encoding" in out.timings and out.images.shape == ref.shape == (1,) + LATENT
    # fp32 both sides, the latents' bound above. Measured 1.7e-6 of 4.0; without the kept region (an
    # all-repaint mask on our side) 4.1
    _close_latents(out.images, ref)
    assert_inpainting_refusals(ours, PROMPT, image, mask, H, W)


@pytest.mark.slow  # (another compile per mesh, the CLI's tiny folder; the rule is test_inpaint_matches_diffusers')
def test_inpaint_mesh_given_latents_and_cli(pipes, tmp_path, capsys, monkeypatch):
    """cfg=2,ring=2,ulysses=2 and pipefusion=2 (its warm-up steps only: exact) == one device, two prompts x 2 samples,
    a mask array, true CFG, JAX draws; given packed latents: the start and the kept region's noise (only the
    posterior's sample drawn), so the kept tokens end as the image's latents (diffusers 0.42.1 fails on given latents
    here); CLI --image --mask on tiny-qwenimage (QwenImageInpaintPipeline)."""
    import imageio.v3 as iio
    import jax
    from PIL import Image

    from tests.test_flux_pipeline import picture
    from xdit_jax import cli
    from xdit_jax.pipelines.denoise import StageTimer
    from xdit_jax.pipelines.flux import pack_latents
    from xdit_jax.pipelines.qwenimage import QwenImageInpaintPipeline

    _, _, folder = pipes
    mask = np.zeros((H, W), np.float32)
    mask[:, 32:] = 1.0  # latent columns 4.. repainted: packed token columns 2.. (the first two kept whole)
    kw = dict(image=picture(6), mask_image=mask, height=H, width=W, strength=0.9, num_inference_steps=3,
              negative_prompt=NEGATIVE, num_images_per_prompt=2, output_type="latent", progress=False, seed=8)
    ours = QwenImageInpaintPipeline.from_pretrained(folder)
    one = ours(PROMPTS, **kw).images
    for mesh, extra in (("cfg=2,ring=2,ulysses=2", {}), ("pipefusion=2", {"pipefusion_warmup_steps": 3})):
        out = QwenImageInpaintPipeline.from_pretrained(folder, mesh=mesh, **extra)(PROMPTS, **kw).images
        np.testing.assert_allclose(out, one, atol=1e-5 * np.abs(one).max(), rtol=0, err_msg=mesh)

    drawn = []
    normal = ours._normal
    monkeypatch.setattr(ours, "_normal", lambda key, shape: drawn.append(shape) or normal(key, shape))
    kw.update(num_images_per_prompt=1, latents=initial_latents(seed=10))
    out = ours(PROMPT, **kw).images
    assert len(drawn) == 1  # the posterior's sample; no noise
    clean = pack_latents(ours.clean_image_latents(kw["image"], H, W, 1, 1, jax.random.key(8), StageTimer()))
    kept = pack_latents(np.broadcast_to(1 - mask[None, None, ::8, ::8], (1, 16, H // 8, W // 8)))[0, :, 0] == 1
    assert kept.sum() == 6  # 2 token columns x 3 rows
    np.testing.assert_allclose(out[:, kept], np.asarray(clean)[:, kept], atol=1e-6, rtol=0)

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    src, msk, dst = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "q.png"
    picture(1).save(src)
    m = np.zeros((48, 80), np.uint8)
    m[:, 40:] = 255
    Image.fromarray(m).save(msk)
    rc = cli.main(["--model", "tiny-qwenimage", "--output", str(dst), "--steps", "2", "--image", str(src), "--mask",
                   str(msk), "--strength", "0.9", "--negative-prompt", "blurry", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(dst).shape == (48, 80, 3)
    assert '"image_encoding"' in capsys.readouterr().out
