"""HunyuanVideo image-to-video (latent_concat) == diffusers' HunyuanVideoImageToVideoPipeline (tiny random weights,
fp32): the LLaVA text encoder with the image vs transformers, the pipeline's latents after 2 steps, one mesh."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_hunyuan_video_i2v, make_torch_llava, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.hunyuan_video_i2v import HunyuanVideoImageToVideoPipeline

PROMPT = "A small dog running on a beach at sunset."
NEGATIVE = "Waves crash against black rocks."
F, H, W, STEPS = 5, 32, 32, 2
LATENT = (1, 4, 2, 4, 4)


def _image():
    from PIL import Image

    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tp = make_torch_hunyuan_video_i2v()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("hunyuanvideo_i2v"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, HunyuanVideoImageToVideoPipeline.from_pretrained(converted), converted


def run_torch(tp, latents, **kw):
    with torch.no_grad():
        return tp(image=_image(), prompt=PROMPT, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                  latents=torch.from_numpy(latents), prompt_template=tiny.hunyuan_video_i2v_template(),
                  output_type="latent", **kw).frames.numpy()


def run_ours(pipe, latents, **kw):
    kw = dict(dict(num_frames=F, height=H, width=W, num_inference_steps=STEPS), **kw)
    return pipe(_image(), PROMPT, latents=latents, prompt_template=tiny.hunyuan_video_i2v_template(),
                output_type="latent", progress=False, **kw).frames


def test_llava_prompt_embeds_match_diffusers():
    """The LLaVA encoder with the image (its tokens in place of <image>, diffusers' positions) and diffusers' crop
    (``_get_llama_prompt_embeds`` on the same transformers model): the states (image tokens every 2nd, then the
    prompts' without the template) and their masks, two prompts of different lengths."""
    import types

    import jax
    from diffusers import HunyuanVideoImageToVideoPipeline as TorchPipeline
    from flax import nnx

    from tests.torch_util import state_dict_np
    from xdit_jax.models import llava
    from xdit_jax.pipelines.hunyuan_video_i2v import llava_prompt_embeds

    tm, processor = make_torch_llava()
    tok, template = tiny.train_llava_tokenizer(), tiny.hunyuan_video_i2v_template()
    prompts, msl = [PROMPT, "A cat."], 64
    ns = types.SimpleNamespace(tokenizer=tok, text_encoder=tm, image_processor=processor)
    with torch.no_grad():  # (diffusers: an image per prompt; ours: one for all)
        ref, ref_mask = TorchPipeline._get_llama_prompt_embeds(ns, [_image()] * 2, prompts, template, device="cpu",
                                                               dtype=torch.float32, max_sequence_length=msl,
                                                               image_embed_interleave=2)
    cfg = llava.LlavaConfig.from_dict(tm.config.to_dict())
    graphdef, state = nnx.split(llava.build(cfg, llava.params_from_torch(state_dict_np(tm), cfg)))
    enc = jax.jit(lambda *a: nnx.merge(graphdef, state).hidden_state(*a, -3))
    emb, mask = llava_prompt_embeds(tok, cfg, processor, prompts, msl, template, _image(), 2, enc)
    ref, ref_mask = ref.numpy(), ref_mask.numpy()
    assert emb.shape == ref.shape == (2, 8 + msl - 4, 32)
    np.testing.assert_array_equal(mask, ref_mask)
    assert ref_mask[0].sum() > ref_mask[1].sum()
    valid = ref_mask != 0  # (the padding's states are masked everywhere downstream)
    # measured 2.9e-6 of 4.9 (256 tokens)
    np.testing.assert_allclose(emb[valid], ref[valid], atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_latents_match_diffusers_and_mesh(pipes):
    """2 steps, the embedded guidance: the latents (first frame dropped, as diffusers) == diffusers'; then
    ring=2,ulysses=2 == one device."""
    tp, ours, folder = pipes
    lat = np.random.default_rng(0).standard_normal(LATENT).astype(np.float32)
    ref = run_torch(tp, lat, guidance_scale=4.0)
    out = run_ours(ours, lat, guidance_scale=4.0)
    assert out.shape == ref.shape == (1, 4, 1, 4, 4)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    mesh = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, mesh="ring=2,ulysses=2"), lat,
                    guidance_scale=4.0)
    np.testing.assert_allclose(mesh, out, atol=1e-5 * scale, rtol=0)


@pytest.mark.slow
def test_true_cfg_and_video_match_diffusers(pipes):
    """true CFG (the negative prompt with a black image) on cfg=2; the decoded video without the image's frames."""
    tp, ours, folder = pipes
    lat = np.random.default_rng(1).standard_normal(LATENT).astype(np.float32)
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    ref = run_torch(tp, lat, **kw)
    out = run_ours(ours, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    mesh = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, mesh="cfg=2,ulysses=2"), lat, **kw)
    np.testing.assert_allclose(mesh, out, atol=1e-5 * np.abs(ref).max(), rtol=0)
    with torch.no_grad():
        vref = tp(image=_image(), prompt=PROMPT, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                  latents=torch.from_numpy(lat), prompt_template=tiny.hunyuan_video_i2v_template(),
                  output_type="np").frames
    video = ours(_image(), PROMPT, num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=lat,
                 prompt_template=tiny.hunyuan_video_i2v_template(), progress=False).frames
    assert video.shape == vref.shape == (1, 1, H, W, 3)
    np.testing.assert_allclose(video, vref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tr_pipes(tmp_path_factory):
    """(torch pipeline, ours, converted folder) of the token_replace kind."""
    tp = make_torch_hunyuan_video_i2v(condition="token_replace")
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("hunyuanvideo_i2v_tr"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, HunyuanVideoImageToVideoPipeline.from_pretrained(converted), converted


@pytest.mark.slow
def test_token_replace_pipeline_matches_diffusers(tr_pipes):
    """image_condition_type="token_replace" (HunyuanVideo-I2V-33ch's kind): the image's latents as the first frame
    of every step's input, its tokens' own modulation, interleave 4; the latents (the image's frame kept) after 2
    steps == diffusers', and on ring=2,ulysses=2."""
    tp, ours, folder = tr_pipes
    lat = np.random.default_rng(2).standard_normal(LATENT).astype(np.float32)
    ref = run_torch(tp, lat, guidance_scale=4.0)
    out = run_ours(ours, lat, guidance_scale=4.0)
    assert out.shape == ref.shape == (1, 4, 2, 4, 4)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    mesh = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, mesh="ring=2,ulysses=2"), lat,
                    guidance_scale=4.0)
    np.testing.assert_allclose(mesh, out, atol=1e-5 * scale, rtol=0)
    # true CFG: the negative's image states every 2nd (diffusers' encode_prompt default), so 4 more text tokens than
    # the prompt's; one batch here, the prompt's padded (masked): == diffusers' two passes, and on cfg=2,ring=2
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    ref = run_torch(tp, lat, **kw)
    out = run_ours(ours, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    mesh = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, mesh="cfg=2,ring=2"), lat, **kw)
    np.testing.assert_allclose(mesh, out, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["latent_concat", "token_replace"])
def test_pipefusion_matches_sequential_rule(request, kind):
    """pipefusion=2 (64 x 32: 16 video tokens, two patches of 8; the condition and token_replace's first-frame flag
    sliced with them) == the same patched rule on one device (pipefusion_patches=2)."""
    _, ours, folder = request.getfixturevalue("pipes" if kind == "latent_concat" else "tr_pipes")
    lat = np.random.default_rng(5).standard_normal((1, 4, 2, 8, 4)).astype(np.float32)
    kw = dict(height=64, num_inference_steps=3)
    exact = run_ours(ours, lat, **kw)
    ref = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, pipefusion_patches=2), lat, **kw)
    out = run_ours(HunyuanVideoImageToVideoPipeline.from_pretrained(folder, mesh="pipefusion=2"), lat, **kw)
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    # the patched steps really ran (stale K/V differ; little here: measured 1.7e-5 for latent_concat)
    assert np.abs(ref - exact).max() > atol


@pytest.mark.slow
def test_bad_input_is_refused(pipes):
    _, ours, _ = pipes
    with pytest.raises(ValueError, match="needs an image"):
        ours(None, PROMPT, height=H, width=W, num_frames=F)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours(_image(), PROMPT, height=H, width=W, num_frames=6)
    with pytest.raises(ValueError, match="image features"):  # the release's template on the tiny tower
        ours(_image(), PROMPT, height=H, width=W, num_frames=F)


@pytest.mark.slow
def test_generate_cli_image_to_video(pipes, tmp_path, monkeypatch):
    """The CLI on the HunyuanVideo I2V folder with --image: the video without the image's frames."""
    import imageio.v3 as iio

    from xdit_jax import cli
    from xdit_jax.pipelines import hunyuan_video_i2v

    _, _, folder = pipes
    # (the tiny stand-in tokenizer's positions in the default template; the release's would be refused)
    monkeypatch.setattr(hunyuan_video_i2v, "DEFAULT_PROMPT_TEMPLATE", tiny.hunyuan_video_i2v_template())
    image = tmp_path / "first.png"
    _image().save(image)
    monkeypatch.setenv("XDIT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hv_i2v"
    rc = cli.main(["--model", str(folder), "--image", str(image), "--prompt", PROMPT, "--output", str(out),
                   "--steps", "2", "--height", str(H), "--width", str(W), "--num-frames", "9", "--mesh", "ring=2",
                   "--no-progress"])
    assert rc == 0
    frames = sorted(out.glob("*.png"))
    assert len(frames) == 5 and iio.imread(frames[0]).shape == (H, W, 3)


def _token_replace_pair():
    from diffusers import HunyuanVideoTransformer3DModel as TorchModel

    from tests.torch_util import randomize_, state_dict_np
    from xdit_jax.models import hunyuan_video as hv

    torch.manual_seed(0)
    tm = randomize_(TorchModel(**dict(tiny.HUNYUAN_VIDEO_TRANSFORMER, image_condition_type="token_replace",
                                      num_layers=1, num_single_layers=1)), seed=1, std=0.15)
    cfg = hv.HunyuanVideoConfig.from_dict(dict(tm.config))
    return tm, cfg, hv.build(cfg, hv.params_from_torch(state_dict_np(tm), cfg))


def _transformer_inputs(cfg, shape=(3, 4, 6), text=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, *shape)).astype(np.float32)
    emb = rng.standard_normal((2, text, cfg.text_embed_dim)).astype(np.float32)
    mask = (np.arange(text)[None] < np.array([[text], [3]])).astype(np.int64)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
    return x, np.array([500.0, 937.5], np.float32), emb, mask, pooled, np.full((2,), 4000.0, np.float32)


def test_token_replace_transformer_matches_diffusers():
    """image_condition_type="token_replace": the first latent frame's tokens modulated by timestep 0's embedding in
    every double- and single-stream block, as diffusers' TokenReplace blocks (3 frames of a 2 x 3 patch grid: 6 of 18
    tokens)."""
    import jax

    tm, cfg, model = _token_replace_pair()
    args = _transformer_inputs(cfg)
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(a) for a in args), return_dict=False)[0].numpy()
    out = np.asarray(jax.jit(lambda m, *a: m(*a))(model, *args))
    assert out.shape == ref.shape == (2, 4, 3, 4, 6)
    # fp32, outputs O(2): measured 2.1e-5, the float32 floor of the sinusoids of t and of the 4,000 rad guidance
    # (tests/test_hunyuan_video_transformer.py: 1e-4)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_token_replace_transformer_sequence_parallel():
    """ring=2,ulysses=2 over 18 video tokens (padded to 20; the first-frame flag sharded with them) == one device."""
    import jax

    from tests.jax_util import sequence_parallel_forward
    from xdit_jax.mesh import build_mesh
    from xdit_jax.models import hunyuan_video as hv

    _, cfg, model = _token_replace_pair()
    args = _transformer_inputs(cfg, seed=1)
    ref = np.asarray(jax.jit(lambda m, *a: m(*a))(model, *args))
    fwd = sequence_parallel_forward(model, build_mesh("ring=2,ulysses=2"), text=hv.TEXT_KEYS)
    np.testing.assert_allclose(np.asarray(fwd(*args)), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
