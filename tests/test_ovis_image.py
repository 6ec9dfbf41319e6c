"""Ovis-Image == diffusers 0.42.1 on tiny random weights (fp32): the transformer (OvisImageTransformer2DModel), and
the pipeline from a diffusers save_pretrained folder (OvisImagePipeline: Qwen3's last hidden state after the system
prompt's 28 tokens, CFG with a negative prompt, latents after 2 steps), on one device and on a mesh (8 simulated
CPU devices); PipeFusion (slow)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from tests.fixtures import assert_close_latents, make_torch_ovis_image, pipeline_runs, torch_and_our_pipeline
from xdit_jax.models import ovis_image
from xdit_jax.pipelines.ovis_image import OvisImagePipeline

PROMPTS = ["A small dog running on a beach at sunset.", "A cat."]
NEG = "Waves crash against black rocks."
# 32 x 64 images: 4 x 8 latents, 2 x 4 = 8 packed tokens (16 channels); 40 Qwen3 tokens after the dropped 28
H, W, STEPS, MSL = 32, 64, 2, 40
CALL = dict(height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL)
initial_latents, run_torch, run_ours = pipeline_runs(((H // 16) * (W // 16), 16), CALL)
GRID, TEXT = (3, 5), 5  # the transformer test's packed latent grid and text tokens


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    return torch_and_our_pipeline(make_torch_ovis_image, OvisImagePipeline, tmp_path_factory, "ovis_image")


def test_transformer_matches_diffusers(pipes):
    """The pipeline's transformer (xdit_jax.tiny's: 2 double- and 2 single-stream blocks over 2 heads of 16, RoPE
    axes 4 + 6 + 6) on random inputs, 5 text tokens rotated as the pipeline's (ids (0, i, i))."""
    tp, ours, _ = pipes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, GRID[0] * GRID[1], 16)).astype(np.float32)
    enc = rng.standard_normal((2, TEXT, 32)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    ids = (ovis_image.image_ids(*GRID), ovis_image.text_ids(TEXT))
    graphdef, state = nnx.split(ours.transformer)
    out = np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, *ids))(state, x, enc, t))
    with torch.no_grad():
        ref = tp.transformer(*(torch.from_numpy(a) for a in (x, enc, t, *ids)), return_dict=False)[0].numpy()
    scale = np.abs(ref).max()
    # fp32 both sides: measured 3.2e-6 of outputs O(1.5), 2e-6 of the scale (a transformer of std 0.15 weights:
    # 4.3e-5 of O(3.5); FLUX's own test: 8e-5 of O(7)). Text RoPE ids of zeros instead of (0, i, i) move it by 0.08,
    # a wrong SwiGLU half or a missing context norm by O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |out| {scale}")


def test_cfg_latents_match_diffusers(pipes):
    """Two prompts of different lengths (padded: the padding's states zeroed), guidance 3 with a negative prompt, the
    dynamic shift: the latents after 2 steps."""
    tp, ours, _ = pipes
    lat = initial_latents(2)
    kw = dict(guidance_scale=3.0, negative_prompt=NEG, output_type="latent")
    # fp32; latents O(3.5): measured max |diff| 2.1e-6 (6e-7 of the scale)
    assert_close_latents(run_ours(ours, PROMPTS, lat, **kw), run_torch(tp, PROMPTS, lat, **kw))


@pytest.mark.slow
def test_text_and_image_match_diffusers(pipes):
    """The prompt encoding (measured 4.2e-6 of states O(3)) and, at the default guidance 5 with the negative prompt
    "", the decoded image (measured 2.9e-6 on [0, 1])."""
    tp, ours, _ = pipes
    with torch.no_grad():
        ref = tp._get_ovis_prompt_embeds(PROMPTS, max_sequence_length=MSL).numpy()
    np.testing.assert_allclose(np.asarray(ours.encode_prompt(PROMPTS, MSL)), ref, atol=2e-5, rtol=0)
    lat = initial_latents(1, seed=1)
    out, ref = run_ours(ours, PROMPTS[0], lat), run_torch(tp, PROMPTS[0], lat, output_type="np")
    assert out.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "ulysses=3"])
def test_mesh_matches_one_device(pipes, mesh):
    """Sequence parallelism (the joint sequence padded to the degree: 40 text + 8 image tokens over 4 or 3, the text
    sharded with the image), CFG's halves over ``cfg``."""
    _, ours, folder = pipes
    lat = initial_latents(2, seed=2)
    kw = dict(guidance_scale=3.0, output_type="latent")
    ref = run_ours(ours, PROMPTS, lat, **kw)
    out = run_ours(OvisImagePipeline.from_pretrained(folder, mesh=mesh), PROMPTS, lat, **kw)
    # one device up to float rounding: measured 8.3e-7 (cfg=2,ring=2,ulysses=2) and 7.2e-7 (ulysses=3) of latents O(3.6)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_pipefusion_equals_sequential_rule_and_warmup_one_device(pipes):
    """PipeFusion on pipefusion=2,ulysses=2 (both stacks looped over the stages, the text sliced with the patches):
    the patched steps == the displaced-patch rule run sequentially on one device (2 patches); exact warm-up steps ==
    one device."""
    _, _, folder = pipes
    lat = initial_latents(2, seed=3)
    kw = dict(guidance_scale=3.0, output_type="latent", num_inference_steps=3)
    one = run_ours(OvisImagePipeline.from_pretrained(folder), PROMPTS, lat, **kw)
    sequential = run_ours(OvisImagePipeline.from_pretrained(folder, pipefusion_patches=2), PROMPTS, lat, **kw)
    mesh = "pipefusion=2,ulysses=2"
    out = run_ours(OvisImagePipeline.from_pretrained(folder, mesh=mesh, pipefusion_patches=2), PROMPTS, lat, **kw)
    warm = run_ours(OvisImagePipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=3), PROMPTS, lat,
                    **kw)
    scale = np.abs(one).max()
    # fp32: measured 6.0e-7 (patched vs sequential) and 0 (warm-up vs one device) of latents O(3.4); the displaced
    # rule itself moves them by 0.048
    assert np.abs(out - sequential).max() <= 2e-5 * scale
    assert np.abs(warm - one).max() <= 2e-5 * scale
    assert np.abs(sequential - one).max() > 1e-3 * scale  # the displaced-patch rule is not the exact one


def test_bad_input(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPTS[0], height=40, width=W)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(PROMPTS[0], height=H, width=W, max_sequence_length=300)
    with pytest.raises(ValueError, match="Qwen3 states"):
        ours(prompt_embeds=np.zeros((1, MSL, 24), np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="cfg=2"):
        OvisImagePipeline.from_pretrained(folder, mesh="cfg=2")(PROMPTS[0], guidance_scale=1.0, **CALL)


@pytest.mark.slow  # (the pipeline's parity: above)
def test_generate_tiny_ovis_image(tmp_path, capsys):
    """``--model tiny-ovis-image`` (xdit_jax.tiny's configs and stand-in tokenizer, 32 x 64, 2 steps), CFG over cfg=2
    with the text sharded over ulysses=2."""
    import imageio.v3 as iio

    from xdit_jax import cli

    out = tmp_path / "o.png"
    rc = cli.main(["--model", "tiny-ovis-image", "--prompt", "A cat.", "--output", str(out), "--mesh",
                   "cfg=2,ulysses=2", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out).shape == (32, 64, 3)
    assert '"model_family": "ovis-image"' in capsys.readouterr().out
