"""HunyuanImage-2.1 (text-to-image) == diffusers on tiny random weights (fp32): the transformer
(HunyuanImageTransformer2DModel), the VAE decoder (AutoencoderKLHunyuanImage), the guider
(AdaptiveProjectedMixGuidance) and HunyuanImagePipeline end to end (latents and images); meshes == one device (8
simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel

from tests.fixtures import (
    assert_close_latents,
    assert_saved_folder_converts,
    make_torch_hunyuanimage,
    torch_and_our_model,
    torch_and_our_pipeline,
)
from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import hunyuanimage as hyi
from xdit_jax.models import vae_hunyuanimage as vae_hyi
from xdit_jax.pipelines import hunyuanimage as pipe_hyi
from xdit_jax.pipelines.hunyuanimage import HunyuanImagePipeline
from xdit_jax.safetensors_io import CheckpointError

# ----- the transformer -----

CONFIG = dict(tiny.HUNYUANIMAGE_TRANSFORMER, text_embed_dim=12, text_embed_2_dim=10)
L, L2 = 7, 5  # Qwen and ByT5 tokens (1000 and 128 in the pipeline)
SHAPE = (6, 5)  # latent height, width (patch 1): 30 image tokens, padded by ring x ulysses = 4 and by 3


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(HunyuanImageTransformer2DModel, CONFIG, hyi, hyi.HunyuanImageConfig)


def _inputs(cfg, seed=0):
    """A batch of two: Qwen lengths 7 and 3; ByT5 lengths 0 (no quoted text: all padding) and 4."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, *SHAPE)).astype(np.float32)
    t = np.array([500.0, 937.5], np.float32)
    text = rng.standard_normal((2, L, cfg.text_embed_dim)).astype(np.float32)
    mask = (np.arange(L)[None] < np.array([7, 3])[:, None]).astype(np.int64)
    text2 = rng.standard_normal((2, L2, cfg.text_embed_2_dim or 1)).astype(np.float32)
    mask2 = (np.arange(L2)[None] < np.array([0, 4])[:, None]).astype(np.int64)
    return x, t, text, mask, text2, mask2


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    args = _inputs(cfg)
    tt = torch.from_numpy
    x, t, text, mask, text2, mask2 = args
    with torch.no_grad():
        ref = tm(tt(x), tt(t), tt(text), tt(mask), encoder_hidden_states_2=tt(text2),
                 encoder_attention_mask_2=tt(mask2), return_dict=False)[0].numpy()
    return args, np.asarray(FWD(model, *args)), ref


def test_transformer_matches_diffusers(batch2):
    _, out, ref = batch2
    assert out.shape == ref.shape == (2, 8) + SHAPE
    # fp32 both sides, outputs O(3): measured 8.7e-6. diffusers reorders the text ([valid ByT5, valid Qwen,
    # padding]); ours keeps [ByT5; Qwen] with the padding masked: only the order of the softmax sums differs.
    np.testing.assert_allclose(out, ref, atol=5e-5, rtol=0)


def test_transformer_padding_changes_nothing(pair, batch2):
    """The padded Qwen and ByT5 tokens reach no valid key: new values there leave the output as it was."""
    _, _, model = pair
    (x, t, text, mask, text2, mask2), out, _ = batch2
    rng = np.random.default_rng(5)
    text, text2 = text.copy(), text2.copy()
    text[1, 3:] = 100 * rng.standard_normal(text[1, 3:].shape)
    text2[0] = 100 * rng.standard_normal(text2[0].shape)
    np.testing.assert_array_equal(np.asarray(FWD(model, x, t, text, mask, text2, mask2)), out)


@pytest.mark.slow  # (the default run: the pipeline's cfg=2,ring=2,ulysses=2)
@pytest.mark.parametrize("mesh", ["ulysses=3", "ring=2,ulysses=2"])
def test_transformer_sequence_parallel_equals_one_device(pair, batch2, mesh):
    _, _, model = pair
    args, ref, _ = batch2
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh), text=hyi.TEXT_KEYS)(*args))
    # fp32; only the order of float32 sums differs (the padded sequence, ulysses' head split); outputs O(3):
    # measured 7.2e-7 on ring=2,ulysses=2
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


def test_transformer_config_checkpoint_errors_and_folder(pair, tmp_path):
    tm, cfg, _ = pair
    d = dict(tm.config)
    for bad, err, needle in [(dict(rope_axes_dim=[2, 2, 12]), ValueError, "2 even sizes"),
                             (dict(qk_norm="layer_norm"), ValueError, "rms_norm"),
                             (dict(guidance_embeds=True), NotImplementedError, "guidance-distilled"),
                             (dict(use_meanflow=True), NotImplementedError, "MeanFlow"),
                             (dict(patch_size=[1, 1, 1], rope_axes_dim=[4, 2, 2]), NotImplementedError, "2-D")]:
        with pytest.raises(err, match=needle):
            hyi.HunyuanImageConfig.from_dict({**d, **bad})
    sd = state_dict_np(tm)
    gone = ["context_embedder_2.linear_3.weight", "time_guidance_embed.timestep_embedder.linear_1.weight",
            "single_transformer_blocks.1.proj_mlp.bias"]
    for k in gone:
        sd.pop(k)
    with pytest.raises(CheckpointError) as e:
        hyi.params_from_torch(sd, cfg)
    for k in gone:
        assert k in str(e.value), k
    assert_saved_folder_converts(tm, cfg, tmp_path, "HunyuanImageTransformer2DModel", hyi, hyi.HunyuanImageConfig)


@pytest.mark.slow  # (the default set's budget)
def test_transformer_without_byt5_matches_diffusers():
    """No context_embedder_2 (text_embed_2_dim null): the Qwen states alone, as diffusers."""
    tm, cfg, model = torch_and_our_model(HunyuanImageTransformer2DModel,
                                         dict(CONFIG, text_embed_2_dim=None, num_layers=1, num_single_layers=1),
                                         hyi, hyi.HunyuanImageConfig)
    x, t, text, mask, _, _ = _inputs(cfg, seed=3)
    tt = torch.from_numpy
    with torch.no_grad():
        ref = tm(tt(x), tt(t), tt(text), tt(mask), return_dict=False)[0].numpy()
    np.testing.assert_allclose(np.asarray(FWD(model, x, t, text, mask)), ref, atol=5e-5, rtol=0)


@pytest.mark.slow
def test_full_size_parameter_counts_match_diffusers():
    """diffusers' HunyuanImage-2.1 shapes (its transformer defaults with the ByT5 projection of 1472; the VAE at this
    module's defaults: 32x, 64 channels): our transformer's and VAE decoder's parameters count as diffusers'."""
    with torch.device("meta"):
        tm = HunyuanImageTransformer2DModel(text_embed_2_dim=1472)
        vcfg = vae_hyi.HunyuanImageVAEConfig()
        tv = AutoencoderKLHunyuanImage(**{k: getattr(vcfg, k) for k in vcfg.__dataclass_fields__})
    cfg = hyi.HunyuanImageConfig.from_dict(dict(tm.config))
    shapes = hyi.expected_shapes(lambda: hyi.HunyuanImageTransformer2DModel(cfg))
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(shapes) == sum(p.numel() for p in tm.parameters())  # 17.4B
    vshapes = hyi.expected_shapes(vae_hyi.module_fn(vcfg))
    assert count(vshapes) == sum(p.numel() for p in tv.decoder.parameters())


# ----- the VAE decoder -----

@pytest.fixture(scope="module")
def vae_pair():
    torch.manual_seed(0)
    tv = randomize_(AutoencoderKLHunyuanImage(**tiny.HUNYUANIMAGE_VAE), seed=2, std=0.15)
    cfg = vae_hyi.HunyuanImageVAEConfig.from_dict(dict(tv.config))
    return tv, cfg, vae_hyi.build(cfg, vae_hyi.params_from_torch(state_dict_np(tv), cfg))


def test_vae_decode_over_a_mesh_matches_diffusers(vae_pair):
    """The decoder with the image plane over 3 devices (uneven: 8 latent rows as 3 + 3 + 2) == diffusers' decode (the
    one-device decode == diffusers: the pipeline's images below)."""
    tv, cfg, model = vae_pair
    z = np.random.default_rng(0).standard_normal((2, 8, 8, 6)).astype(np.float32)
    with torch.no_grad():
        ref = tv.decode(torch.from_numpy(z)).sample.numpy()
    out = np.asarray(vae_hyi.jit_decode(model, jnp.asarray(z), mesh=build_mesh("ulysses=3")))
    assert out.shape == ref.shape == vae_hyi.decoded_shape(cfg, z.shape) == (2, 3, 64, 48)
    # fp32, outputs O(9) after 10 GroupNorm'd resnets: measured 1.1e-5 on one device, 9.8e-6 split (1.3e-6
    # relative); a wrong depth-to-space order or the conv_in shortcut missing moves it by O(1)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_vae_tiled_decode_matches_diffusers_tiled(vae_pair):
    """diffusers' enable_tiling on a 7 x 9 latent with 32-pixel tiles (4 latents, a stride of 3, 8 pixels blended, 24
    kept), each tile split over 3 devices."""
    tv, cfg, model = vae_pair
    z = np.random.default_rng(1).standard_normal((1, 8, 7, 9)).astype(np.float32)
    tiles = vae_hyi.HunyuanImageTilingConfig(tile_sample_min_size=32)
    plan = tiles.plan(cfg)
    assert (plan.tile_latent, plan.stride, plan.blend_extent, plan.row_limit) == ((4, 4), (3, 3), (8, 8), (24, 24))
    tv.enable_tiling(tile_sample_min_size=32)
    try:
        with torch.no_grad():
            ref = tv.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        tv.disable_tiling()
    out = np.asarray(vae_hyi.jit_decode(model, jnp.asarray(z), tiling=tiles, mesh=build_mesh("ulysses=3")))
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_vae_bad_configs_and_checkpoint(vae_pair):
    tv, cfg, _ = vae_pair
    d = dict(tv.config)
    for bad, err, needle in [(dict(spatial_compression_ratio=6), ValueError, "power of 2"),
                             (dict(block_out_channels=[32, 32, 48, 64]), ValueError, "multiples of 32"),
                             (dict(upsample_match_channel=False), NotImplementedError, "cannot change width")]:
        with pytest.raises(err, match=needle):
            vae_hyi.HunyuanImageVAEConfig.from_dict({**d, **bad})
    sd = state_dict_np(tv)
    sd.pop("decoder.mid_block.attentions.0.proj.weight")
    with pytest.raises(CheckpointError, match="attentions.0.proj.weight"):
        vae_hyi.params_from_torch(sd, cfg)


# ----- the guider -----

GUIDERS = [dict(guidance_scale=3.5, adaptive_projected_guidance_start_step=1),  # momentum -0.5, norm cap 10
           dict(guidance_scale=5.0, adaptive_projected_guidance_start_step=0, adaptive_projected_guidance_momentum=None,
                adaptive_projected_guidance_rescale=0.0, eta=0.5, guidance_rescale=0.6),
           dict(guidance_scale=3.0, use_original_formulation=True, adaptive_projected_guidance_start_step=1,
                adaptive_projected_guidance_rescale=2.0, start=0.25, stop=0.75),
           dict(guidance_scale=4.0, adaptive_projected_guidance_scale=1.0, adaptive_projected_guidance_start_step=0),
           dict(guidance_scale=1.0), dict(guidance_scale=6.0, stop=0.1)]


def test_guider_options_match_diffusers():
    """apg_mix (+ rescale) at each of 5 steps == diffusers' AdaptiveProjectedMixGuidance (prepare_inputs, forward) for
    its options (momentum or none, the norm cap, eta, the original formulation, a start / stop range, APG's start
    step, a neutral APG scale, guidance_rescale); the momentum buffer carried as the pipeline carries it."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    rng = np.random.default_rng(0)
    steps = 5
    preds = [(rng.standard_normal((2, 4, 3, 5)).astype(np.float32),
              2 * rng.standard_normal((2, 4, 3, 5)).astype(np.float32)) for _ in range(steps)]
    fn = jax.jit(pipe_hyi.apg_mix)
    for g in GUIDERS:
        ref_guider = AdaptiveProjectedMixGuidance(**g)
        ours = pipe_hyi.check_guider(dict(g))
        vec = jnp.asarray(pipe_hyi.guidance_vector(ours, steps))
        buf, any_on = jnp.zeros(preds[0][0].shape), False
        for i, (cond, uncond) in enumerate(preds):
            ref_guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(1.0))
            ref_guider.prepare_inputs({"x": (torch.zeros(1), torch.zeros(1))})  # (resets the momentum at step 0)
            on = ref_guider._is_cfg_enabled()
            any_on |= on
            ref = ref_guider.forward(torch.from_numpy(cond), torch.from_numpy(uncond) if on else None).pred.numpy()
            out, buf = fn(jnp.asarray(uncond), jnp.asarray(cond), buf, vec, jnp.int32(i))
            if ours["guidance_rescale"] > 0:
                from xdit_jax.pipelines.hunyuandit import rescale_guidance

                out = rescale_guidance(out, jnp.asarray(cond), vec[1])
            # fp32 (diffusers' projection in float64), values O(25): measured 5.7e-6 on APG steps, CFG steps exact
            np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0, err_msg=f"{g} step {i}")
        assert pipe_hyi.cfg_enabled(ours, steps) == any_on, g
    with pytest.raises(ValueError, match="AdaptiveProjectedMixGuidance only"):
        pipe_hyi.check_guider({"_class_name": "ClassifierFreeGuidance"})
    with pytest.raises(ValueError, match="start <= stop"):
        pipe_hyi.check_guider({"start": 0.6, "stop": 0.4})


# ----- the pipeline -----

PROMPT = 'A neon sign that reads "OPEN" above a door, \'Cafe\' in the window.'
H, W, STEPS = 64, 48, 2
LATENT = (8, 8, 6)
TEXT = 64  # Qwen tokens after the drop in the pipeline runs (diffusers' tokenizer_max_length, 1000 by default)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_hunyuanimage, HunyuanImagePipeline, tmp_path_factory, "hyi")


def _run_torch(tp, prompt, latents, **kw):
    tp.tokenizer_max_length = TEXT
    try:
        with torch.no_grad():
            out = tp(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                     **dict(dict(output_type="np"), **kw)).images
    finally:
        tp.tokenizer_max_length = pipe_hyi.MAX_SEQUENCE_LENGTH
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def _torch_images(tp, latents):
    """diffusers' pipeline's last stage: ``vae.decode(latents / scaling_factor)``, post-processed to np images."""
    with torch.no_grad():
        image = tp.vae.decode(torch.from_numpy(latents) / tp.vae.config.scaling_factor, return_dict=False)[0]
    return np.asarray(tp.image_processor.postprocess(image, output_type="np"))


def _run_ours(pipe, prompt, latents, **kw):
    kw = dict(dict(height=H, width=W, num_inference_steps=STEPS, latents=latents, progress=False,
                   max_sequence_length=TEXT), **kw)
    return pipe(prompt, **kw).images


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1,) + LATENT).astype(np.float32)


def test_glyph_texts_as_diffusers():
    from diffusers.pipelines.hunyuan_image import pipeline_hunyuanimage as ref

    for p in [PROMPT, "no quotes", 'twice "a" and "a"', "'x'", "“a” ‘b’ \"a\" 'c'"]:
        assert pipe_hyi.extract_glyph_text(p) == ref.extract_glyph_text(p), p


def test_pipeline_matches_diffusers(pipes):
    """The OCR guider (the prompt has quoted text: CFG at step 0, APG with momentum at step 1, the negative prompt
    ""), 2 steps: the latents, then the images."""
    tp, ours, _ = pipes
    lat = _latents()
    ref_latents = _run_torch(tp, PROMPT, lat, output_type="latent")
    out_latents = _run_ours(ours, PROMPT, lat, output_type="latent")
    assert_close_latents(out_latents, ref_latents)  # measured 2.4e-6 of 3.5
    ref = _torch_images(tp, ref_latents)
    out = _run_ours(ours, PROMPT, lat)
    assert out.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # images in [0, 1]: measured 3.1e-6


def test_pipeline_mesh_equals_one_device(pipes):
    """cfg=2 (the guider's two passes) x ring=2 x ulysses=2: the same latents as one device."""
    _, ours, folder = pipes
    lat = _latents(seed=4)
    ref = _run_ours(ours, PROMPT, lat, output_type="latent")
    out = _run_ours(HunyuanImagePipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2"), PROMPT, lat,
                    output_type="latent")
    # measured 2.4e-6 of 3.6 (the order of float32 sums: the padded sequence, ulysses' head split)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_pipeline_bad_input_is_refused(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 8"):
        ours(PROMPT, height=36, width=W)
    with pytest.raises(ValueError, match="prompt_embeds_mask"):
        ours(prompt_embeds=np.zeros((1, TEXT, 32), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="cfg=2"):  # guidance 1: one pass, nothing for the cfg axis to split
        HunyuanImagePipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W, guidance_scale=1.0,
                                                                   max_sequence_length=TEXT)
    with pytest.raises(ValueError, match="Mesh .* needs|devices"):
        HunyuanImagePipeline.from_pretrained(folder, mesh="ulysses=16")


@pytest.mark.slow
def test_text_encoders_match_transformers(pipes):
    """encode_prompt == diffusers': Qwen2.5-VL's hidden_states[-3] of the templated prompt less its first 34 tokens
    (with its mask), ByT5's states of the glyph text (with its mask); a prompt without quotes: zero ByT5 states, mask
    0."""
    tp, ours, _ = pipes
    prompts = [PROMPT, "A cat."]
    with torch.no_grad():
        ref = tp.encode_prompt(prompts, device="cpu", batch_size=2)
    out = ours.encode_prompt(prompts)
    assert out[0].shape == (2, 1000, 32) and out[2].shape == (2, 128, 16)
    for o, r, what in zip(out, ref, ["qwen", "qwen mask", "byt5", "byt5 mask"]):
        np.testing.assert_allclose(np.asarray(o, np.float32), r.numpy(), atol=5e-5, rtol=0, err_msg=what)
    assert np.asarray(out[3])[0].sum() > 0 and np.asarray(out[3])[1].sum() == 0  # "A cat." has no glyph text


@pytest.mark.slow
def test_pipeline_plain_guider_two_prompts_and_no_cfg_match_diffusers(pipes):
    """Prompts without quoted text: the plain guider (momentum -0.5, APG at step 1), two prompts; then the guider off
    (guidance_scale 1: one pass)."""
    tp, ours, _ = pipes
    lat = np.random.default_rng(1).standard_normal((2,) + LATENT).astype(np.float32)
    prompts = ["A cat on a sofa.", "Waves on black rocks at sunset, cinematic."]
    assert_close_latents(_run_ours(ours, prompts, lat, output_type="latent"),
                         _run_torch(tp, prompts, lat, output_type="latent"))
    saved = tp.guider
    tp.guider = type(saved)(guidance_scale=1.0)
    try:
        ref = _run_torch(tp, prompts, lat, output_type="latent")
    finally:
        tp.guider = saved
    assert_close_latents(_run_ours(ours, prompts, lat, output_type="latent", guidance_scale=1.0), ref)


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over the double- and single-stream stacks (the text sliced with the patches), the APG momentum
    carried, == the same patched rule on one device (pipefusion_patches=2); the patched steps differ from the exact
    ones."""
    _, ours, folder = pipes
    lat = _latents(seed=5)
    kw = dict(output_type="latent", num_inference_steps=3)
    exact = _run_ours(ours, PROMPT, lat, **kw)
    ref = _run_ours(HunyuanImagePipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = _run_ours(HunyuanImagePipeline.from_pretrained(folder, mesh="pipefusion=2,cfg=2"), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol


@pytest.mark.slow
def test_cli_tiny_hunyuanimage(tmp_path, capsys):
    """The tiny model from the command line: a png, the OCR guider's two passes over cfg, the image tokens over
    ulysses=3 (uneven)."""
    import imageio.v3 as iio

    from xdit_jax import cli

    out = tmp_path / "h.png"
    rc = cli.main(["--model", "tiny-hunyuanimage", "--prompt", 'A sign that reads "OPEN".', "--output", str(out),
                   "--mesh", "cfg=2,ulysses=3", "--no-progress", "--json"])
    assert rc == 0
    img = iio.imread(out)
    assert img.shape == (64, 64, 3) and img.std() > 1
    assert '"model_family": "hunyuanimage"' in capsys.readouterr().out
