"""The LongCat-Image pipeline from a diffusers save_pretrained folder == diffusers' LongCatImagePipeline (the prompt's
tokens and Qwen2.5-VL states, latents after 2 steps with CFG and its renorm) on the mesh cfg=2,ring=2,ulysses=2 (8
simulated CPU devices); one device, the decoded image, other CFG settings, other meshes and PipeFusion: slow."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_longcat, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.longcat_image import LongCatImagePipeline, split_quotation

# quoted text (tokenized character by character), a word's inner apostrophe (not a quotation)
PROMPT = 'A sign that says "Hello" on a beach, it\'s sunset.'
H, W, STEPS = 48, 80, 2  # 6 x 10 latents: 3 x 5 = 15 packed image tokens; 16 text tokens (tiny tokenizer_max_length)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder)."""
    tp = make_torch_longcat()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("longcat"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    ours = LongCatImagePipeline.from_pretrained(converted)
    ours.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    return tp, ours, converted


def initial_latents(batch=1, seed=0):
    """Packed latents (B, 15, 16), diffusers' ``latents`` argument."""
    return np.random.default_rng(seed).standard_normal((batch, (H // 16) * (W // 16), 16)).astype(np.float32)


def _diffusers(tp, prompt, lat, output_type="latent", **kw):
    with torch.no_grad():
        out = tp(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, latents=torch.from_numpy(lat),
                 output_type=output_type, enable_prompt_rewrite=False, **kw).images
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, prompt, lat, output_type="latent", **kw):
    return pipe(prompt, height=H, width=W, num_inference_steps=STEPS, latents=lat, output_type=output_type,
                progress=False, **kw).images


def test_latents_match_diffusers_on_a_mesh(built):
    """The prompt's Qwen states; default CFG (4.5, renorm from 0) and negative prompt "": the latents after 2 steps on
    cfg=2,ring=2,ulysses=2 (the 15 image tokens padded to 16, 31 joint tokens to 32) == diffusers. (One device ==
    diffusers, and == the meshes, in the slow tests below: one compile here, for the default-test budget.)"""
    tp, ours, converted = built
    assert [q for _, q in split_quotation(PROMPT)] == [False, True, False]
    with torch.no_grad():
        ref_emb = tp._encode_prompt([PROMPT]).numpy()
    emb = np.asarray(ours.encode_prompt([PROMPT]))
    assert emb.shape == ref_emb.shape == (1, tiny.LONGCAT_TOKENIZER_MAX_LENGTH, 32)
    # fp32; states O(3.5); measured max |diff| 2.6e-6
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5, rtol=0)
    lat = initial_latents()
    ref = _diffusers(tp, PROMPT, lat)
    # (the embeddings given: no text encoder compiled for the mesh)
    mesh = LongCatImagePipeline.from_pretrained(converted, mesh="cfg=2,ring=2,ulysses=2")
    mesh.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH  # (the image ids' start)
    out = _ours(mesh, None, lat, prompt_embeds=emb, negative_prompt_embeds=ours.encode_prompt([""]))
    scale = np.abs(ref).max()
    # fp32; latents O(2.8); measured max |diff| 3.3e-6 (one device: 3.3e-6; the mesh vs one device: 1.1e-6)
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_refusals(built):
    _, ours, _ = built
    with pytest.raises(NotImplementedError, match="enable_prompt_rewrite"):
        ours(PROMPT, enable_prompt_rewrite=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, height=40, width=W)
    with pytest.raises(ValueError, match="cfg_renorm_min"):
        ours(PROMPT, cfg_renorm_min=1.5)


@pytest.mark.slow
def test_image_and_cfg_settings_match_diffusers(built):
    """One device: the default settings' latents; the decoded image (FLUX's VAE shift and scale); renorm off; renorm from 0.5; no CFG (guidance 1); two
    prompts with a negative prompt each, two images per prompt."""
    tp, ours, _ = built
    lat = initial_latents()
    ref = _diffusers(tp, PROMPT, lat)  # the default settings' latents, one device (the prompt encoded here)
    np.testing.assert_allclose(_ours(ours, PROMPT, lat), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    ref = _diffusers(tp, PROMPT, lat, "np")
    out = _ours(ours, PROMPT, lat, "np")
    assert out.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)  # pixels in [0, 1]
    for kw in (dict(enable_cfg_renorm=False), dict(cfg_renorm_min=0.5, guidance_scale=7.0), dict(guidance_scale=1.0),
               dict(negative_prompt="blurry")):
        ref = _diffusers(tp, PROMPT, lat, **kw)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(_ours(ours, PROMPT, lat, **kw), ref, atol=1e-5 * scale, rtol=0, err_msg=str(kw))
    prompts, negs = [PROMPT, "A cat sleeping on a sofa."], ["blurry", "dark"]
    lat4 = initial_latents(batch=4, seed=1)
    with torch.no_grad():  # diffusers encodes each list in one call and pairs them row by row
        ref = _diffusers(tp, prompts, lat4, negative_prompt=negs, num_images_per_prompt=2)
    out = _ours(ours, prompts, lat4, negative_prompt=negs, num_images_per_prompt=2)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["pipefusion=2", "pipefusion=2,ulysses=2", "ulysses=3"])
def test_mesh_matches_one_device(built, mesh):
    """An odd sequence degree == one device; PipeFusion (FLUX's two-stack form: 1 exact warm-up step, then 2 patches
    attending to one-step-old K/V of the other patch) == its sequential reference on one device (the same 2 patches)."""
    _, ours, converted = built
    lat = initial_latents()
    ref_pipe = ours
    if "pipefusion" in mesh:
        ref_pipe = LongCatImagePipeline.from_pretrained(converted, pipefusion_patches=2)
        ref_pipe.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
        exact = _ours(ours, PROMPT, lat)
    ref = _ours(ref_pipe, PROMPT, lat)
    pipe = LongCatImagePipeline.from_pretrained(converted, mesh=mesh)
    pipe.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    np.testing.assert_allclose(_ours(pipe, PROMPT, lat), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    if "pipefusion" in mesh:  # (the stale K/V of the patched step: not the exact result)
        assert np.abs(ref - exact).max() > 1e-4
