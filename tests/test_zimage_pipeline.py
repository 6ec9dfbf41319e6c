"""The Z-Image pipeline from a diffusers save_pretrained folder == diffusers' ZImagePipeline (tiny random weights,
fp32), on one device and on meshes (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.fixtures import assert_close_latents, make_torch_zimage, pipeline_runs, torch_and_our_pipeline
from xdit_jax.mesh import build_mesh
from xdit_jax.pipelines.zimage import ZImagePipeline

PROMPT = "A small dog running on a beach at sunset."
PROMPTS = [PROMPT, "A cat."]  # 22 and 11 kept Qwen3 tokens: captions of 32 tokens, and of different lengths
NEGATIVE = "Waves crash against black rocks."
# 64 x 64 images: 4 x 8 x 8 latents, 16 image tokens (padded to 32 by the model); 2 steps; 64 Qwen3 tokens
H, W, STEPS, TOKENS = 64, 64, 2, 64
LATENT = (4, 8, 8)
# CFG as diffusers with every option (a negative prompt each, one of them "": of another length): sigmas 1, 0.5 shifted by 3 -> 1, 0.75: (1000 - t) / 1000 = 0, 0.25, so a
# truncation at 0.2 leaves the second step unguided; the norm capped at the positive prediction's
CFG = dict(guidance_scale=3.0, negative_prompt=[NEGATIVE, ""], cfg_normalization=True, cfg_truncation=0.2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_zimage, ZImagePipeline, tmp_path_factory, "zimage")


# (diffusers' _encode_prompt writes the templated text into the lists it is given: run_torch_pipeline copies them)
initial_latents, run_torch, run_ours = pipeline_runs(
    LATENT, dict(height=H, width=W, num_inference_steps=STEPS, max_sequence_length=TOKENS))


# Latents O(3) after 2 Euler steps, both sides fp32: measured 6.0e-6 (guidance 0) and 5.4e-6 (CFG 3, two prompts),
# 1.8e-6 and 1.5e-6 of their scale — the rounding of
# two fp32 implementations (Qwen3, the transformer's timestep sinusoids: tests/test_zimage_transformer.py). 1e-5 of
# the scale leaves room; a wrong template, hidden state, kept token, pad token, shift or sign moves them by 1e-2+.
_close_latents = assert_close_latents


def test_turbo_image_matches_diffusers(pipes):
    """One prompt, guidance 0 (Z-Image-Turbo: no CFG): the latents, then the decoded image."""
    tp, ours, _ = pipes
    lat = initial_latents()
    kw = dict(guidance_scale=0.0)
    _close_latents(run_ours(ours, PROMPT, lat, output_type="latent", **kw),
                   run_torch(tp, PROMPT, lat, output_type="latent", **kw))
    ref = run_torch(tp, PROMPT, lat, output_type="np", **kw)
    out = run_ours(ours, PROMPT, lat, **kw)
    assert out.shape == ref.shape == (1, H, W, 3)
    # pixels in [0, 1]: measured max |diff| 3.7e-6 (the VAE on latents 6e-6 apart)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def cfg_two_prompts(pipes):
    tp, ours, _ = pipes
    lat = initial_latents(2, seed=1)
    ref = run_torch(tp, PROMPTS, lat, output_type="latent", **CFG)
    return lat, ref, run_ours(ours, PROMPTS, lat, output_type="latent", **CFG)


def test_cfg_prompts_of_different_lengths_match_diffusers(cfg_two_prompts):
    """Two prompts of different lengths, CFG with a negative prompt, cfg_normalization and cfg_truncation."""
    _, ref, out = cfg_two_prompts
    _close_latents(out, ref)


def test_unguided_steps_run_the_prompt_half_alone(pipes):
    """The steps cfg_truncation leaves unguided run the prompt's half alone (diffusers skips the negative pass there;
    on one device the parity test above runs that path: its second step), except where the halves run side by side
    (cfg=2) or PipeFusion's buffers hold both."""
    _, ours, _ = pipes
    dim = ours.transformer_config.cap_feat_dim
    texts = (ours._put_batch(jnp.zeros((4, 32, dim), ours.dtype), True), ours._put_batch(jnp.ones(4, jnp.int32), True))
    pick = ours._unguided_steps(np.asarray([3.0, 0.0], np.float32), texts, True, None)
    assert pick(0) is None and pick(1) is not None
    assert ours._unguided_steps(np.asarray([3.0, 3.0], np.float32), texts, True, None) is None  # all guided
    assert ours._unguided_steps(np.asarray([3.0, 0.0], np.float32), texts, True, kv=object()) is None  # PipeFusion


def test_mesh_equals_one_device(pipes, cfg_two_prompts):
    """cfg x ring x ulysses (the halves over cfg, the 32 image tokens and the caption over ring 2 x ulysses 2)."""
    _, _, folder = pipes
    lat, _, one = cfg_two_prompts
    pipe = ZImagePipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,ring=2,ulysses=2"))
    out = run_ours(pipe, PROMPTS, lat, output_type="latent", **CFG)
    # float reordering only: measured max |diff| 1.9e-6 (latents O(3))
    np.testing.assert_allclose(out, one, atol=2e-5, rtol=0)


def test_prompt_embeds_as_diffusers_lists(pipes):
    """diffusers' prompt_embeds / negative_prompt_embeds (lists of per-prompt kept tokens) == the prompts."""
    tp, ours, _ = pipes
    lat = initial_latents()
    with torch.no_grad():
        pe, ne = tp.encode_prompt([PROMPT], device=torch.device("cpu"), negative_prompt=[NEGATIVE],
                                  max_sequence_length=TOKENS)
    kw = dict(guidance_scale=2.0, num_inference_steps=1, output_type="latent")
    out = run_ours(ours, None, lat, prompt_embeds=[e.numpy() for e in pe],
                   negative_prompt_embeds=[e.numpy() for e in ne], **kw)
    ref = run_torch(tp, PROMPT, lat, negative_prompt=NEGATIVE, **kw)
    _close_latents(out, ref)


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over both stacks (the noise refiner's 1 layer, the main layers' 2, looped; the caption sliced with
    the patches) with CFG: == the same patched rule run on one device (pipefusion_patches=2). 64 x 64: 32 image tokens
    (16 + the pad tokens), two patches of 16: a real split."""
    _, ours, folder = pipes
    lat = initial_latents(1, seed=5)
    kw = dict(output_type="latent", num_inference_steps=3, guidance_scale=2.0, negative_prompt=NEGATIVE)
    exact = run_ours(ours, PROMPT, lat, **kw)
    ref = run_ours(ZImagePipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = run_ours(ZImagePipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=2")), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()  # measured 0 (the same program order), latents O(3.7)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V differ: measured 2.4)
    cfg_pf = run_ours(ZImagePipeline.from_pretrained(folder, mesh=build_mesh("cfg=2,pipefusion=2,ulysses=2")),
                      PROMPT, lat, **kw)
    # with the CFG halves split and Ulysses inside each patch: float reordering, measured 8.8e-6 (2.4e-6 of the scale)
    np.testing.assert_allclose(cfg_pf, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_images_per_prompt_over_data(pipes):
    """num_images_per_prompt=2 of two prompts with CFG (a negative prompt each) on data=2 == diffusers; on data=3
    (the batch of 4 padded to 6) == data=2."""
    tp, _, folder = pipes
    lat = initial_latents(4, seed=7)
    kw = dict(output_type="latent", guidance_scale=2.0, num_images_per_prompt=2, negative_prompt=["", NEGATIVE])
    out = run_ours(ZImagePipeline.from_pretrained(folder, mesh=build_mesh("data=2")), PROMPTS, lat, **kw)
    _close_latents(out, run_torch(tp, PROMPTS, lat, **kw))  # measured 2.1e-5 at latents O(5)
    padded = run_ours(ZImagePipeline.from_pretrained(folder, mesh=build_mesh("data=3")), PROMPTS, lat, **kw)
    np.testing.assert_allclose(padded, out, atol=1e-5 * np.abs(out).max(), rtol=0)  # measured 0


def test_compile_step(pipes):
    """The CFG step compiles for given shapes without running (the caption array rounded up to 32 tokens)."""
    _, ours, _ = pipes
    compiled = ours.compile_step(2, height=H, width=W, num_inference_steps=STEPS, guidance_scale=2.0, caption_tokens=40)
    shapes = [a.shape for a in jax.tree.leaves(compiled.args_info) if hasattr(a, "shape")]
    assert (4, 64, 32) in shapes and (2,) + LATENT in shapes  # [prompt; negative] x 2 captions of 64; the latents


def test_bad_requests(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=72, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="guidance_scale > 0"):
        ZImagePipeline.from_pretrained(folder, mesh=build_mesh("cfg=2"))(PROMPT, height=H, width=W,
                                                                         guidance_scale=0.0)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages"):
        ZImagePipeline.from_pretrained(folder, mesh=build_mesh("pipefusion=3"))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ours(None, prompt_embeds=[np.zeros((3, 32), np.float32)], guidance_scale=1.0, height=H, width=W)


def test_cli_tiny_zimage(tmp_path, capsys, monkeypatch):
    """scripts/generate.py --model tiny-zimage: a .png with CFG and a negative prompt on a cfg x ulysses 3 mesh (the
    model's 32 image tokens padded to 33 over the 3 devices of a CFG half); a cfg=2 mesh without guidance refused."""
    import imageio.v3 as iio

    from xdit_jax import cli

    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "z.png"
    rc = cli.main(["--model", "tiny-zimage", "--output", str(out), "--guidance-scale", "2", "--negative-prompt",
                   "blurry", "--mesh", "cfg=2,ulysses=3", "--max-sequence-length", "48", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (64, 64, 3) and image.std() > 1  # the tiny defaults: 64 x 64
    assert '"model_family": "zimage"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-zimage", "--output", str(tmp_path / "n.png"), "--mesh", "cfg=2", "--no-progress"])
    assert rc == 2 and "guidance_scale > 0" in capsys.readouterr().err


def test_full_size_configs_folder():
    """configs/z-image-turbo (diffusers' layout of Tongyi-MAI/Z-Image-Turbo) reads into the modules' configs; its
    defaults are the CLI's; the release's sizes pass the checks, bad ones are named."""
    import json
    from pathlib import Path

    from xdit_jax import cli
    from xdit_jax.conversion import model_class, model_components
    from xdit_jax.pipelines import zimage as zp
    from xdit_jax.schedulers import flow_match

    root = Path(__file__).resolve().parents[1] / "configs" / "z-image-turbo"
    cfgs = {}
    for name, cls in model_components(root).items():
        _, cfg_cls = model_class(cls)
        cfgs[name] = cfg_cls.from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = zp.read_configs(root)
    assert (tc.dim, tc.n_layers, tc.n_heads, tc.n_refiner_layers, tc.axes_dims) == (3840, 30, 30, 2, (32, 48, 48))
    assert tc.cap_feat_dim == cfgs["text_encoder"].hidden_size == 2560 and cfgs["text_encoder"].qk_norm
    assert vc.latent_channels == tc.in_channels == 16 and vc.shift_factor is not None
    sched = flow_match.FlowMatchEulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
    assert sched.shift == 3.0 and not sched.use_dynamic_shifting
    defaults = json.loads((root / "defaults.json").read_text())
    assert {k: defaults[k] for k in ("height", "width")} == zp.default_size(tc, vc) == {"height": 1024, "width": 1024}
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (
        cli.DEFAULTS["zimage"]["steps"], cli.DEFAULTS["zimage"]["guidance_scale"]) == (9, 0.0)
    zp.check_request(tc, vc, 1024, 1024, 1, "cfg=2,ulysses=4", 5.0)
    from flax import nnx

    from xdit_jax.models import llama, zimage

    count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    # abstract builds (nothing allocated): Z-Image's 6B transformer, Qwen3-4B (tied embeddings, no lm_head)
    assert count(nnx.eval_shape(lambda: zimage.ZImageTransformer2DModel(tc))) == 6_154_908_736
    assert count(nnx.eval_shape(lambda: llama.LlamaModel(cfgs["text_encoder"]))) == 4_022_468_096
    with pytest.raises(ValueError, match="multiples of 16"):
        zp.check_request(tc, vc, 1000, 1024)


def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of zimage-tiny (24 image tokens padded to 32, a 32-token caption of which 20 kept)
    against diffusers' transformer on one device and ring=2 x ulysses=2; the compiled program's FLOPs == the analytic
    count; the full-size folder read as Z-Image with its shapes, nothing compiled."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="zimage-tiny", meshes=[None, "ring=2,ulysses=2"], steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("ring=2,ulysses=2", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "zimage" and r["latent_shape"] == [1, 4, 8, 12] and r["image_tokens"] == 24
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["ring=2,ulysses=2"]):
        # same weights and inputs, fp32, outputs O(1): measured 8.3e-7 (one device) and 7.2e-7 (ring 2 x ulysses 2);
        # the bound leaves room for the timestep sinusoid's float32 exp (tests/test_zimage_transformer.py: 1.2e-4 at
        # t x 1000 = 875, here 500); a mask, pad-token or RoPE slip moves them by O(0.01) and more
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("z-image-turbo")
    assert w.family == "zimage" and not w.cfg and w.latent_shape() == (1, 16, 128, 128)
    assert w.fam.tokens(w) == (64 * 64, 64)


@pytest.mark.slow  # (another step's compile and torch runs per variant; the start and kept region are FLUX's, by default)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_diffusers(pipes, monkeypatch, kind):
    """diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline on the same parts, ours from the text-to-image folder:
    a 64 x 64 picture (the size defaults to it), strength 0.6 of 4 steps (3 run), CFG with truncation and
    normalization (the unguided step runs the prompt's half alone, the kept region with it); the same torch draws
    both sides (the posterior's sample, the noise; inpainting's masked image sample, drawn last by diffusers, feeds
    nothing of its step)."""
    import diffusers
    from PIL import Image

    from xdit_jax.pipelines import zimage

    tp, _, folder = pipes
    name = {"img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"}[kind]
    tp = getattr(diffusers, name)(**tp.components)
    ours = getattr(zimage, name).from_pretrained(folder)
    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(6)
    draws = [torch.randn((1,) + LATENT, generator=g).numpy() for _ in range(2)]

    def normal(key, shape):
        d = draws.pop(0)
        assert d.shape == tuple(shape)
        return d
    monkeypatch.setattr(ours, "_normal", normal)
    kw = dict(image=picture, strength=0.6, num_inference_steps=4, max_sequence_length=TOKENS, guidance_scale=3.0,
              negative_prompt=NEGATIVE, cfg_normalization=True, cfg_truncation=0.5)
    if kind == "inpaint":
        mask = np.zeros((H, W), np.uint8)
        mask[16:48, 8:40] = 255
        kw["mask_image"] = Image.fromarray(mask)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, generator=torch.Generator().manual_seed(6), output_type="latent", **kw).images
    out = ours(PROMPT, output_type="latent", progress=False, **kw).images
    assert not draws
    _close_latents(out, ref.numpy())
