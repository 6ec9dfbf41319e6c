"""HunyuanVideo-1.5 (text-to-video) == diffusers on tiny random weights (fp32): the transformer
(HunyuanVideo15Transformer3DModel), the text encoders (Qwen2.5-VL's language model and ByT5, through the pipeline's
encode_prompt), the VAE decoder (AutoencoderKLHunyuanVideo15) and HunyuanVideo15Pipeline end to end (latents and
frames); meshes == one device (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel

from tests.fixtures import (
    assert_close_latents,
    assert_saved_folder_converts,
    make_torch_hunyuan_video15,
    torch_and_our_model,
    torch_and_our_pipeline,
)
from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny
from xdit_jax.mesh import build_mesh
from xdit_jax.models import hunyuan_video15 as hv15
from xdit_jax.models import vae_hunyuan_video15 as vae15
from xdit_jax.pipelines import hunyuan_video15 as pipe15
from xdit_jax.pipelines.hunyuan_video15 import HunyuanVideo15Pipeline
from xdit_jax.safetensors_io import CheckpointError

# ----- the transformer -----

CONFIG = dict(tiny.HUNYUAN_VIDEO15_TRANSFORMER, text_embed_dim=12, text_embed_2_dim=10, image_embed_dim=6)
L, L2 = 7, 5  # Qwen and ByT5 tokens (1000 and 256 in the pipeline)
SHAPE = (2, 4, 6)  # latent frames, height, width (patch 1): 48 video tokens, padded by ring x ulysses = 4 and by 3


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(HunyuanVideo15Transformer3DModel, CONFIG, hv15, hv15.HunyuanVideo15Config)


def _inputs(cfg, seed=0):
    """A batch of two: Qwen lengths 7 and 3; ByT5 lengths 0 (no quoted text: all padding) and 4."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.in_channels, *SHAPE)).astype(np.float32)
    t = np.array([500.0, 937.5], np.float32)
    text = rng.standard_normal((2, L, cfg.text_embed_dim)).astype(np.float32)
    mask = (np.arange(L)[None] < np.array([7, 3])[:, None]).astype(np.int64)
    text2 = rng.standard_normal((2, L2, cfg.text_embed_2_dim)).astype(np.float32)
    mask2 = (np.arange(L2)[None] < np.array([0, 4])[:, None]).astype(np.int64)
    return x, t, text, mask, text2, mask2


@pytest.fixture(scope="module")
def batch2(pair):
    tm, cfg, model = pair
    args = _inputs(cfg)
    tt = torch.from_numpy
    x, t, text, mask, text2, mask2 = args
    with torch.no_grad():  # T2V: zero image embeddings (the pipeline's)
        ref = tm(tt(x), tt(t), tt(text), tt(mask), encoder_hidden_states_2=tt(text2),
                 encoder_attention_mask_2=tt(mask2), image_embeds=torch.zeros(2, 3, cfg.image_embed_dim),
                 return_dict=False)[0].numpy()
    return args, np.asarray(FWD(model, *args)), ref


def test_transformer_matches_diffusers(batch2):
    _, out, ref = batch2
    assert out.shape == ref.shape == (2, 4) + SHAPE
    # fp32 both sides, outputs O(2.5): measured 4.7e-6. diffusers reorders the text ([valid ByT5, valid Qwen,
    # padding]); ours keeps [ByT5; Qwen] with the padding masked: only the order of the softmax sums differs. A
    # padded key let in, a wrong cond-type row or RoPE on the text moves the output by O(0.01) and more.
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


def test_meanflow_transformer_matches_diffusers():
    """use_meanflow: timestep_r (the next step's timestep) through its own embedder, added to the timestep's; with
    and without it (diffusers' text-to-video passes none)."""
    tm, cfg, model = torch_and_our_model(HunyuanVideo15Transformer3DModel,
                                         dict(CONFIG, num_layers=1, use_meanflow=True), hv15, hv15.HunyuanVideo15Config)
    x, t, text, mask, text2, mask2 = _inputs(cfg, seed=3)
    r = np.array([250.0, 0.0], np.float32)
    tt = torch.from_numpy
    for timestep_r in (r, None):
        with torch.no_grad():
            ref = tm(tt(x), tt(t), tt(text), tt(mask), encoder_hidden_states_2=tt(text2),
                     encoder_attention_mask_2=tt(mask2), image_embeds=torch.zeros(2, 3, cfg.image_embed_dim),
                     timestep_r=None if timestep_r is None else tt(timestep_r), return_dict=False)[0].numpy()
        out = np.asarray(FWD(model, x, t, text, mask, text2, mask2, None, timestep_r))
        # fp32, outputs O(2): measured 3.3e-6 with timestep_r, 2.1e-6 without (the plain model: 4.7e-6)
        np.testing.assert_allclose(out, ref, atol=5e-5, rtol=0, err_msg=str(timestep_r))
    plain = hv15.HunyuanVideo15Config.from_dict(dict(tm.config, use_meanflow=False))
    without = hv15.build(plain, hv15.params_from_torch(state_dict_np(tm), plain))  # the r embedder's weights unused
    with pytest.raises(ValueError, match="no MeanFlow embedder"):
        without(x, t, text, mask, text2, mask2, None, r)


@pytest.mark.slow  # (the default run: the pipeline's cfg=2,ring=2,ulysses=2 and the CLI's cfg=2,ulysses=3)
@pytest.mark.parametrize("mesh", ["ulysses=3", "ring=2,ulysses=2"])
def test_transformer_sequence_parallel_equals_one_device(pair, batch2, mesh):
    _, _, model = pair
    args, ref, _ = batch2
    out = np.asarray(sequence_parallel_forward(model, build_mesh(mesh), text=hv15.TEXT_KEYS)(*args))
    # fp32; only the order of float32 sums differs (the padded sequence, ulysses' head split); outputs O(2.5)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)


def test_transformer_config_checkpoint_errors_and_folder(pair, tmp_path):
    tm, cfg, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(rope_axes_dim=[2, 2, 2]), "summing to attention_head_dim"),
                        (dict(qk_norm="layer_norm"), "rms_norm")]:
        with pytest.raises(ValueError, match=needle):
            hv15.HunyuanVideo15Config.from_dict({**d, **bad})
    sd = state_dict_np(tm)
    gone = ["context_embedder_2.linear_3.weight", "cond_type_embed.weight",
            "context_embedder.token_refiner.refiner_blocks.1.attn.to_k.weight"]
    for k in gone:
        sd.pop(k)
    with pytest.raises(CheckpointError) as e:
        hv15.params_from_torch(sd, cfg)
    for k in gone:
        assert k in str(e.value), k
    assert_saved_folder_converts(tm, cfg, tmp_path, "HunyuanVideo15Transformer3DModel", hv15,
                                 hv15.HunyuanVideo15Config)


@pytest.mark.slow
def test_transformer_full_size_parameter_count_matches_diffusers():
    with torch.device("meta"):
        tm = HunyuanVideo15Transformer3DModel()
    want = sum(p.numel() for p in tm.parameters())
    cfg = hv15.HunyuanVideo15Config.from_dict(dict(tm.config))
    shapes = hv15.expected_shapes(lambda: hv15.HunyuanVideo15Transformer3DModel(cfg))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == want  # 8.3B


@pytest.mark.slow
def test_transformer_bf16_close_to_fp32(pair, batch2):
    tm, cfg, _ = pair
    args, _, ref = batch2
    m16 = hv15.build(cfg, hv15.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16 weights and activations (0.4% steps), norms / softmax / RoPE in float32, 2 blocks and the refiner
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 0.05, err


# ----- the VAE decoder -----

@pytest.fixture(scope="module")
def vae_pair():
    torch.manual_seed(0)
    tv = randomize_(AutoencoderKLHunyuanVideo15(**tiny.HUNYUAN_VIDEO15_VAE), seed=2, std=0.15)
    cfg = vae15.HunyuanVideo15VAEConfig.from_dict(dict(tv.config))
    return tv, cfg, vae15.build(cfg, vae15.params_from_torch(state_dict_np(tv), cfg))


def test_vae_decode_over_a_mesh_matches_diffusers(vae_pair):
    """The decoder with the image plane over 3 devices (uneven: 8 latent rows as 3 + 3 + 2) == diffusers' decode (the
    one-device decode == diffusers: the pipeline's frames below)."""
    tv, cfg, model = vae_pair
    z = np.random.default_rng(0).standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = tv.decode(torch.from_numpy(z)).sample.numpy()
    out = np.asarray(vae15.jit_decode(model, jnp.asarray(z), mesh=build_mesh("ulysses=3")))
    assert out.shape == ref.shape == vae15.decoded_shape(cfg, z.shape) == (1, 3, 5, 64, 64)
    # fp32, outputs O(1): measured 6.6e-7 on one device, 5e-7 split (the causal frame mask off, or the first frame's
    # channel half wrong, gives O(0.1))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_vae_tiled_decode_matches_diffusers_tiled(vae_pair):
    """diffusers' enable_tiling on a 7 x 9 latent with 32-pixel tiles (4 latents, a stride of 3, 8 pixels blended, 24
    kept): 3 x 3 tiles of four shapes, every overlap blended; each tile split over 3 devices (uneven)."""
    tv, cfg, model = vae_pair
    z = np.random.default_rng(1).standard_normal((1, 4, 2, 7, 9)).astype(np.float32)
    tiles = vae15.HunyuanVideo15TilingConfig(tile_sample_min_height=32, tile_sample_min_width=32)
    plan = tiles.plan(cfg.spatial_compression_ratio)
    assert (plan.tile_latent, plan.stride, plan.blend_extent, plan.row_limit) == ((4, 4), (3, 3), (8, 8), (24, 24))
    tv.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_latent_min_height=4,
                     tile_latent_min_width=4)  # (diffusers keeps 256 // 8 latents unless told)
    try:
        with torch.no_grad():
            ref = tv.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        tv.disable_tiling()
    out = np.asarray(vae15.jit_decode(model, jnp.asarray(z), tiling=tiles, mesh=build_mesh("ulysses=3")))
    assert out.shape == ref.shape == (1, 3, 5, 56, 72)
    # fp32, outputs O(1): measured 6.9e-7 on one device and split (a tile blended with the unblended neighbour, or the
    # blend ramp off by one, gives O(0.01))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # tiling changes the numbers (each tile decodes on its own): the test would see it
        untiled = tv.decode(torch.from_numpy(z)).sample.numpy()
    assert np.abs(untiled - ref).max() > 1e-2


# ----- the pipeline -----

PROMPT = 'A neon sign that reads "OPEN" above a door, “Cafe” in the window.'
F, H, W, STEPS = 5, 32, 48, 2
LATENT = (4, 2, 4, 6)
TEXT = 64  # Qwen tokens after the crop in the pipeline runs (diffusers' tokenizer_max_length, 1000 by default: the
# text-encoder test keeps it; 64 here saves ~6 s of diffusers' run and of ours per call)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_hunyuan_video15, HunyuanVideo15Pipeline, tmp_path_factory, "hv15")


def _run_torch(tp, prompt, latents, **kw):
    tp.tokenizer_max_length = TEXT
    try:
        with torch.no_grad():
            out = tp(prompt=prompt, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                     latents=torch.from_numpy(latents), **kw).frames
    finally:
        tp.tokenizer_max_length = pipe15.MAX_SEQUENCE_LENGTH
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def _torch_frames(tp, latents):
    """diffusers' pipeline's last stage: ``vae.decode(latents / scaling_factor)``, post-processed to np frames."""
    with torch.no_grad():
        video = tp.vae.decode(torch.from_numpy(latents) / tp.vae.config.scaling_factor, return_dict=False)[0]
    return np.asarray(tp.video_processor.postprocess_video(video, output_type="np"))


def _run_ours(pipe, prompt, latents, **kw):
    kw = dict(dict(num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=latents, progress=False,
                   max_sequence_length=TEXT), **kw)
    return pipe(prompt, **kw).frames


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1,) + LATENT).astype(np.float32)


def test_glyph_texts_and_default_size_as_diffusers():
    from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5 as ref
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    for p in [PROMPT, "no quotes", 'twice "a" and "a"', '"x"', "“a” “b” \"a\""]:
        assert pipe15.extract_glyph_texts(p) == ref.extract_glyph_texts(p), p
    for target, spatial in [(640, 16), (960, 16), (64, 8)]:
        want = HunyuanVideo15ImageProcessor(vae_scale_factor=spatial).calculate_default_height_width(9, 16, target)
        assert pipe15.default_size(target, spatial) == tuple(want)  # (480, 848) for 640 x 16


def test_text_encoders_match_transformers(pipes):
    """encode_prompt == diffusers': Qwen2.5-VL's hidden_states[-3] of the chat-templated prompt cropped by 108 (with
    its mask), ByT5's states of the glyph text (with its mask); a prompt without quotes: zero ByT5 states, mask 0."""
    tp, ours, _ = pipes
    prompts = [PROMPT, "A cat."]
    with torch.no_grad():
        ref = tp.encode_prompt(prompts, device="cpu", dtype=torch.float32, batch_size=2)
    out = ours.encode_prompt(prompts)
    assert out[0].shape == (2, 1000, 32) and out[2].shape == (2, 256, 16)
    for o, r, what in zip(out, ref, ["qwen", "qwen mask", "byt5", "byt5 mask"]):
        # fp32; states O(1-10) through 1 Qwen layer / 2 T5 layers: measured 5.7e-6 / 3.5e-6
        np.testing.assert_allclose(np.asarray(o, np.float32), r.numpy(), atol=5e-5, rtol=0, err_msg=what)
    assert np.asarray(out[3])[0].sum() > 0 and np.asarray(out[3])[1].sum() == 0  # "A cat." has no glyph text


def test_pipeline_matches_diffusers(pipes):
    """The guider's CFG (scale 6, the negative prompt ""), 2 steps: the latents, then the frames."""
    tp, ours, _ = pipes
    lat = _latents()
    ref_latents = _run_torch(tp, PROMPT, lat, output_type="latent")
    assert_close_latents(_run_ours(ours, PROMPT, lat, output_type="latent"), ref_latents)  # measured 1.9e-6 of 2.8
    ref = _torch_frames(tp, ref_latents)
    out = _run_ours(ours, PROMPT, lat)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # frames in [0, 1]: measured 1.8e-7


def test_pipeline_mesh_equals_one_device(pipes):
    """cfg=2 (the guider's two passes) x ring=2 x ulysses=2: the same latents as one device."""
    _, ours, folder = pipes
    lat = _latents(seed=4)
    ref = _run_ours(ours, PROMPT, lat, output_type="latent")
    out = _run_ours(HunyuanVideo15Pipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2"), PROMPT, lat,
                    output_type="latent")
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_pipeline_bad_input_is_refused(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 8"):
        ours(PROMPT, height=36, width=W, num_frames=F)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours(PROMPT, height=H, width=W, num_frames=6)
    with pytest.raises(ValueError, match="prompt_embeds_mask"):
        ours(prompt_embeds=np.zeros((1, 1000, 32), np.float32), height=H, width=W, num_frames=F)
    with pytest.raises(ValueError, match="cfg=2"):  # guidance 1: one pass, nothing for the cfg axis to split
        HunyuanVideo15Pipeline.from_pretrained(folder, mesh="cfg=2")(PROMPT, height=H, width=W, num_frames=F,
                                                                     guidance_scale=1.0)
    with pytest.raises(ValueError, match="start <= stop"):
        pipe15.check_guider({"guidance_scale": 6.0, "start": 0.6, "stop": 0.4})
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe15.check_guider({"guidance_scale": 6.0, "guidance_rescale": 1.5})
    with pytest.raises(ValueError, match="ClassifierFreeGuidance only"):
        pipe15.check_guider({"_class_name": "AdaptiveProjectedGuidance"})


GUIDERS = [dict(guidance_scale=6.0, guidance_rescale=0.7), dict(guidance_scale=3.0, use_original_formulation=True),
           dict(guidance_scale=6.0, start=0.25, stop=0.75), dict(guidance_scale=4.0, start=0.5, guidance_rescale=0.3),
           dict(guidance_scale=0.0, use_original_formulation=True), dict(guidance_scale=5.0, stop=0.1)]


def test_guider_options_match_diffusers():
    """guided() at each of 4 steps == diffusers' ClassifierFreeGuidance (set_state, forward) for its options
    (rescale, the original formulation, a start / stop range); cfg_enabled == whether any step guides."""
    from diffusers.guiders import ClassifierFreeGuidance

    rng = np.random.default_rng(0)
    cond, uncond = (rng.standard_normal((2, 4, 2, 3, 5)).astype(np.float32) * s for s in (1.0, 2.0))
    steps = 4
    for g in GUIDERS:
        ref_guider = ClassifierFreeGuidance(**g)
        ours = pipe15.check_guider(dict(g))
        vec = jnp.asarray(pipe15.guidance_vector(ours, ours["guidance_scale"], steps))
        any_on = False
        for i in range(steps):
            ref_guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(1.0))
            any_on |= ref_guider._is_cfg_enabled()
            ref = ref_guider.forward(torch.from_numpy(cond), torch.from_numpy(uncond))
            fn = pipe15.guided_rescaled if ours["guidance_rescale"] else pipe15.guided
            out = fn(jnp.asarray(uncond), jnp.asarray(cond), vec, jnp.int32(i))
            # fp32, values O(12): measured 9.5e-7 (one ulp)
            np.testing.assert_allclose(np.asarray(out), ref.pred.numpy(), atol=1e-5, rtol=0, err_msg=f"{g} step {i}")
        assert pipe15.cfg_enabled(ours, ours["guidance_scale"], steps) == any_on, g


def test_pipeline_guider_rescale_and_range_match_diffusers(pipes):
    """The guider with guidance_rescale 0.7 and start 0.5: step 0 the prompt's prediction alone, step 1 guided and
    rescaled."""
    tp, ours, _ = pipes
    lat = _latents(seed=2)
    g = dict(guidance_scale=6.0, guidance_rescale=0.7, start=0.5)
    tp.guider, saved = type(tp.guider)(**g), tp.guider
    ours.guider, our_saved = pipe15.check_guider(dict(g, guidance_rescale=0.0)), ours.guider
    try:
        ref = _run_torch(tp, PROMPT, lat, output_type="latent")
        out = _run_ours(ours, PROMPT, lat, output_type="latent", guidance_rescale=0.7)  # this call's rescale
        assert ours.guider["guidance_rescale"] == 0.0
    finally:
        tp.guider, ours.guider = saved, our_saved
    assert_close_latents(out, ref)  # measured 1.7e-6 of 2.8


@pytest.mark.slow
def test_pipeline_no_cfg_and_two_prompts_match_diffusers(pipes):
    """The guider off (scale 1: one pass) and two prompts of different lengths and glyph texts."""
    tp, ours, _ = pipes
    lat = np.random.default_rng(1).standard_normal((2,) + LATENT).astype(np.float32)
    prompts = [PROMPT, "A cat."]
    tp.guider = type(tp.guider)(guidance_scale=1.0)
    try:
        ref = _run_torch(tp, prompts, lat, output_type="latent")
    finally:
        tp.guider = type(tp.guider)(**{k: v for k, v in tiny.HUNYUAN_VIDEO15_GUIDER.items() if k[0] != "_"})
    assert_close_latents(_run_ours(ours, prompts, lat, output_type="latent", guidance_scale=1.0), ref)


@pytest.mark.slow
def test_pipefusion_matches_sequential_rule(pipes):
    """pipefusion=2 over the double-stream stack (the text sliced with the patches) == the same patched rule on one
    device (pipefusion_patches=2); the patched steps differ from the exact ones."""
    _, ours, folder = pipes
    lat = _latents(seed=5)
    kw = dict(output_type="latent", num_inference_steps=3)
    exact = _run_ours(ours, PROMPT, lat, **kw)
    ref = _run_ours(HunyuanVideo15Pipeline.from_pretrained(folder, pipefusion_patches=2), PROMPT, lat, **kw)
    out = _run_ours(HunyuanVideo15Pipeline.from_pretrained(folder, mesh="pipefusion=2"), PROMPT, lat, **kw)
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol


# ----- the benchmark's family -----

def test_benchmark_tiny_rows_vs_diffusers(monkeypatch):
    """scripts/benchmark.py's step of hunyuanvideo15-tiny (48 video + 16 Qwen + 256 ByT5 tokens, CFG) against
    diffusers' transformer, on one device and on cfg=2 x ulysses=3; the compiled FLOPs == the analytic formula; the
    full-size folder read as HunyuanVideo-1.5 with its shapes (nothing compiled)."""
    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model="hunyuanvideo15-tiny", meshes=[None, "cfg=2,ulysses=3"],
                                                      steps=1, compare="diffusers", settle=0, log=lambda s: None))
    assert sorted((r["mesh"], r["impl"]) for r in rows) == [
        ("cfg=2,ulysses=3", "xdit_jax"), ("single device", "xdit_jax"), ("torch cpu", "diffusers")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["family"] == "hunyuan_video15" and r["latent_shape"] == [2, 9, 2, 4, 6] and r["video_tokens"] == 48
    by_mesh = {r["mesh"]: r for r in rows}
    for r in (by_mesh["single device"], by_mesh["cfg=2,ulysses=3"]):
        # same weights and inputs, fp32, outputs O(1): measured 3.6e-7 on one device
        assert r["max_abs_diff_vs_diffusers"] < 1e-4
    one = by_mesh["single device"]
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    w = bench.load_workload("hunyuanvideo-1.5-480p")
    assert w.family == "hunyuan_video15" and w.cfg and w.latent_shape() == (2, 65, 31, 30, 53)
    assert w.fam.tokens(w) == (31 * 30 * 53, 1000 + 256)


def test_full_size_configs_folder():
    """configs/hunyuanvideo-1.5-480p reads into the modules' configs; its defaults are the pipeline's; the release's
    size passes the checks."""
    import json
    from pathlib import Path

    from xdit_jax.conversion import model_class, model_components

    root = Path(__file__).resolve().parents[1] / "configs" / "hunyuanvideo-1.5-480p"
    for name, cls in model_components(root).items():
        if name != "guider":
            model_class(cls)[1].from_dict(json.loads((root / name / "config.json").read_text()))
    tc, vc = pipe15.read_configs(root)
    assert (tc.num_layers, tc.in_channels, vc.latent_channels, vc.spatial_compression_ratio) == (54, 65, 32, 16)
    defaults = json.loads((root / "defaults.json").read_text())
    dv = pipe15.default_video(tc, vc)
    assert {k: defaults[k] for k in dv} == dv == {"height": 480, "width": 848, "num_frames": 121, "fps": 15}
    assert pipe15.check_guider(json.loads((root / "guider" / "guider_config.json").read_text()))["guidance_scale"] == 6
    pipe15.check_request(tc, vc, 480, 848, 121, 1, "cfg=2,ulysses=4", 6.0)


# ----- image-to-video (HunyuanVideo15ImageToVideoPipeline) -----

@pytest.mark.slow  # (the default set's budget; I2V is covered end to end by the slow pipeline test below)
def test_transformer_with_image_states_matches_diffusers(pair, batch2):
    """Image-to-video's SigLIP states through image_embedder (+ the type-2 row), all visible in front of the text."""
    tm, cfg, model = pair
    (x, t, text, mask, text2, mask2), _, _ = batch2
    img = np.random.default_rng(9).standard_normal((2, 3, cfg.image_embed_dim)).astype(np.float32)
    tt = torch.from_numpy
    with torch.no_grad():
        ref = tm(tt(x), tt(t), tt(text), tt(mask), encoder_hidden_states_2=tt(text2),
                 encoder_attention_mask_2=tt(mask2), image_embeds=tt(img), return_dict=False)[0].numpy()
    # fp32, outputs O(2.5): measured 4.3e-6 (as the text-only forward)
    np.testing.assert_allclose(np.asarray(FWD(model, x, t, text, mask, text2, mask2, img)), ref, atol=5e-5, rtol=0)


@pytest.mark.slow
def test_siglip_and_vae_encoder_match_transformers_and_diffusers(vae_pair):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from xdit_jax.models import siglip
    from xdit_jax.models import vae_hunyuan_video15_encoder as enc

    skw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_SIGLIP.items() if k != "model_type"}
    tm = randomize_(SiglipVisionModel(SiglipVisionConfig(**skw)), seed=3, std=0.2).eval()
    cfg = siglip.SiglipVisionConfig.from_dict(tm.config.to_dict())
    sd = state_dict_np(tm)
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    for flat in (sd, {"vision_model." + k: v for k, v in sd.items()}):  # transformers 5's keys and the older prefix
        out = np.asarray(siglip.build(cfg, siglip.params_from_torch(flat, cfg))(x))
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # fp32, outputs O(3): measured 1.3e-6
    tv, vcfg, _ = vae_pair
    model = enc.build(vcfg, enc.params_from_torch(state_dict_np(tv), vcfg))
    for frames in (1, 5):
        v = np.random.default_rng(frames).uniform(-1, 1, (1, 3, frames, 32, 48)).astype(np.float32)
        with torch.no_grad():
            ref = tv.encode(torch.from_numpy(v)).latent_dist.mode().numpy()
        out = np.asarray(enc.jit_encode(model, jnp.asarray(v)))
        # fp32, latents O(25) through 3 downsamplings: measured 2.7e-5 (1e-6 of the scale)
        np.testing.assert_allclose(out, ref, atol=2e-6 * np.abs(ref).max(), rtol=0, err_msg=str(frames))


@pytest.fixture(scope="module")
def i2v_pipes(tmp_path_factory):
    from tests.fixtures import make_torch_hunyuan_video15_i2v
    from xdit_jax.pipelines.hunyuan_video15 import HunyuanVideo15ImageToVideoPipeline

    return torch_and_our_pipeline(make_torch_hunyuan_video15_i2v, HunyuanVideo15ImageToVideoPipeline,
                                  tmp_path_factory, "hv15i2v")


@pytest.mark.slow
def test_meanflow_image_to_video_pipeline_matches_diffusers(tmp_path_factory):
    """A use_meanflow transformer in image-to-video: timestep_r the next step's timestep, 0 at the last (3 steps)."""
    import functools

    from PIL import Image

    from tests.fixtures import make_torch_hunyuan_video15_i2v
    from xdit_jax.pipelines.hunyuan_video15 import HunyuanVideo15ImageToVideoPipeline

    tp, ours, _ = torch_and_our_pipeline(functools.partial(make_torch_hunyuan_video15_i2v, meanflow=True),
                                         HunyuanVideo15ImageToVideoPipeline, tmp_path_factory, "hv15mf")
    assert ours.transformer_config.use_meanflow
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 72, 3), dtype=np.uint8))
    lat = np.random.default_rng(3).standard_normal((1, 4, 2, 6, 9)).astype(np.float32)
    tp.tokenizer_max_length = TEXT
    try:
        with torch.no_grad():
            ref = tp(image=img, prompt=PROMPT, latents=torch.from_numpy(lat), output_type="latent", num_frames=F,
                     num_inference_steps=3).frames.numpy()
    finally:
        tp.tokenizer_max_length = pipe15.MAX_SEQUENCE_LENGTH
    out = ours(img, PROMPT, output_type="latent", num_frames=F, num_inference_steps=3, latents=lat, progress=False,
               max_sequence_length=TEXT).frames
    assert_close_latents(out, ref)  # measured 2.2e-6 of 3.2 (without timestep_r: 0.11 off)


@pytest.mark.slow
def test_image_to_video_pipeline_matches_diffusers(i2v_pipes):
    """A 40 x 60 image: the 48 x 72 bucket of target_size 64, resized and cropped; its SigLIP states in both CFG
    halves, its latents as the first frame's condition: the latents (2 steps) and the frames."""
    from PIL import Image

    tp, ours, folder = i2v_pipes
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    lat = np.random.default_rng(1).standard_normal((1, 4, 2, 6, 9)).astype(np.float32)
    call = dict(num_frames=F, num_inference_steps=STEPS)
    tp.tokenizer_max_length = TEXT
    try:
        with torch.no_grad():
            ref = tp(image=img, prompt=PROMPT, latents=torch.from_numpy(lat), output_type="latent", **call).frames
    finally:
        tp.tokenizer_max_length = pipe15.MAX_SEQUENCE_LENGTH
    ref = ref.numpy()
    kw = dict(call, latents=lat, progress=False, max_sequence_length=TEXT)
    assert_close_latents(ours(img, PROMPT, output_type="latent", **kw).frames, ref)  # measured 1.7e-6 of 3.1
    frames = ours(img, PROMPT, **kw).frames
    assert frames.shape == (1, F, 48, 72, 3)
    np.testing.assert_allclose(frames, _torch_frames(tp, ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sizes the video from the image"):
        ours(img, PROMPT, height=48, width=72, **kw)
    out = ours.__class__.from_pretrained(folder, mesh="cfg=2,ulysses=2")(img, PROMPT, output_type="latent", **kw)
    np.testing.assert_allclose(out.frames, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    # compile_step for the image's bucket: the step's image inputs shaped as the call places them (CFG doubles them)
    compiled = ours.compile_step(1, height=48, width=72, num_frames=F, num_inference_steps=STEPS,
                                 max_sequence_length=TEXT)
    states, cond = ours.encode_image(pipe15.resize_and_crop(img, 48, 72), 48, 72)
    texts = compiled.args_info[0][5]
    assert [(t.shape, t.dtype) for t in texts[4:]] == [((2,) + a.shape[1:], a.dtype) for a in (states, cond)]
    assert compiled.cost_analysis()["flops"] > 0
