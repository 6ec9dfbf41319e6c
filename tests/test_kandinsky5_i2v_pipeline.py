"""Kandinsky 5.0 image-to-video through Kandinsky5I2VPipeline == diffusers' Kandinsky5I2VPipeline (tiny random weights,
an image-conditioned transformer (visual_cond), fp32, 2 steps) with the same torch draws (the noise, then the image
latents' sample, from one generator): latents (first-frame normalization included) and video; a mesh == one device."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_kandinsky5_i2v, random_image, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.kandinsky5_i2v import Kandinsky5I2VPipeline, normalize_first_frame

PROMPT = "A small dog running on a beach at sunset."
# 17 frames of 32 x 32: 5 x 4 x 4 latents (channels last; the first-frame normalization needs >= 5), 20 visual tokens
F, H, W, STEPS = 17, 32, 32, 2
LATENT = (5, 4, 4, 4)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our pipeline, our converted folder), made once."""
    tp = make_torch_kandinsky5_i2v()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("kandinsky5_i2v"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, Kandinsky5I2VPipeline.from_pretrained(converted), converted


def torch_draws(seed, batch=1):
    """diffusers' draws from ``torch.Generator().manual_seed(seed)``: the noise (B, F', h, w, C), then the image
    latents' sample noise (1, C, 1, h, w) -> channels last (1, 1, h, w, C)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch,) + LATENT, generator=g)
    eps = torch.randn((1, LATENT[-1], 1) + LATENT[1:3], generator=g)
    return noise.numpy(), eps.permute(0, 2, 3, 4, 1).numpy()


def run_torch(tp, image, seed, **kw):
    """diffusers' (final latents after its first-frame normalization, video): one run, the latents of the last step
    taken by its callback."""
    last = {}

    def keep(pipe, i, t, kw):
        last["latents"] = kw["latents"][..., :LATENT[-1]].clone()
        return {}

    with torch.no_grad():
        video = tp(image=image, prompt=PROMPT, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(seed), output_type="np", callback_on_step_end=keep,
                   **kw).frames
        latents = tp.normalize_first_frame(last["latents"])
    return latents.numpy(), np.asarray(video)


def run_ours(pipe, image, seed, **kw):
    noise, eps = torch_draws(seed)
    pipe._image_noise = lambda shape, rng: eps
    kw = dict(dict(num_frames=F, height=H, width=W, num_inference_steps=STEPS, latents=noise, progress=False), **kw)
    return pipe(image, PROMPT, **kw).frames


def test_latents_match_diffusers(pipes):
    """No guidance, diffusers' prompt embeddings given to both (the text path: the text-to-video pipeline's default
    test): the final latents, first-frame normalization included (the video: the slow test below)."""
    tp, ours, _ = pipes
    image = random_image(0, (W, H))
    with torch.no_grad():
        qwen, clip, cu = tp.encode_prompt(PROMPT, max_sequence_length=512)
        ref = tp(image=image, prompt=PROMPT, prompt_embeds_qwen=qwen, prompt_embeds_clip=clip, prompt_cu_seqlens=cu,
                 num_frames=F, height=H, width=W, num_inference_steps=STEPS, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent").frames.numpy()
    noise, eps = torch_draws(0)
    ours._image_noise = lambda shape, rng: eps
    out = ours(image, prompt_embeds_qwen=qwen.numpy(), prompt_embeds_clip=clip.numpy(), num_frames=F, height=H,
               width=W, num_inference_steps=STEPS, guidance_scale=1.0, latents=noise, output_type="latent",
               progress=False).frames
    assert out.shape == ref.shape == (1,) + LATENT
    # latents O(4) after 2 Euler steps, fp32 both: measured 3.1e-5 (7e-6 of their scale); both sides round q / k to
    # bfloat16 after the RoPE (diffusers' apply_rotary), so an ulp of difference before it can flip one entry to the
    # other bfloat16 neighbour and move outputs by ~1e-5 of the scale (the text-to-image test's note)
    np.testing.assert_allclose(out, ref, atol=3e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow  # (the default test: latents without guidance)
def test_cfg_video_matches_diffusers(pipes):
    """Guidance 5 with diffusers' default negative prompt, the prompt encoded by each: latents, then the video (17
    frames: the VAE's temporal tiles)."""
    tp, ours, _ = pipes
    image = random_image(2, (W, H))
    ref_latents, ref = run_torch(tp, image, 2)
    out = run_ours(ours, image, 2, output_type="latent")
    assert out.shape == ref_latents.shape == (1,) + LATENT
    # measured 1.05e-3 of 12.0 (9e-5 of the scale; image / seed 0: 3.9e-5): the bfloat16 q / k flips above, amplified
    # by guidance 5 (uncond + 5 (text - uncond)) and spread over the first 4 frames by the first-frame normalization
    # (before it: 5.9e-4); a wrong mask, frame or normalization moves them by 1e-1 and more
    np.testing.assert_allclose(out, ref_latents, atol=2e-4 * np.abs(ref_latents).max(), rtol=0)
    out = run_ours(ours, image, 2)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)  # (pixels in [0, 1]: measured 1.2e-4)


def test_normalize_first_frame_matches_diffusers():
    from diffusers import Kandinsky5I2VPipeline as TorchPipe

    x = np.random.default_rng(0).standard_normal((2, 7, 2, 3, 4)).astype(np.float32)
    x[:, :4] = 0.5 * x[:, :4] + 0.3  # (the clamps bind)
    ref = TorchPipe.normalize_first_frame(TorchPipe, torch.from_numpy(x.copy())).numpy()
    np.testing.assert_allclose(np.asarray(normalize_first_frame(x)), ref, atol=1e-6, rtol=0)


def test_bad_input(pipes):
    _, ours, converted = pipes
    assert not (converted / "text_encoder" / "vision_params").exists()  # (conversion: Qwen2.5-VL reads text only)
    with pytest.raises(ValueError, match="image must be given"):
        ours(None, PROMPT, num_frames=F, height=H, width=W)
    with pytest.raises(ValueError, match="latent frames"):
        ours(random_image(0, (W, H)), PROMPT, num_frames=9, height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(random_image(0, (W, H)), PROMPT, num_frames=F, height=40, width=W)
    with pytest.raises(ValueError, match="is not 32 x 32"):
        ours(np.zeros((16, 16, 3), np.uint8), PROMPT, num_frames=F, height=H, width=W, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,warmup", [("cfg=2,ring=2,ulysses=2", 1),
                                         ("pipefusion=2,ulysses=2", 2)])  # (PipeFusion: both steps exact)
def test_mesh_equals_one_device(pipes, mesh, warmup):
    _, ours, converted = pipes
    image = random_image(1, (W, H))
    ref = run_ours(ours, image, 1, output_type="latent")
    pipe = Kandinsky5I2VPipeline.from_pretrained(converted, mesh=mesh, pipefusion_warmup_steps=warmup)
    out = run_ours(pipe, image, 1, output_type="latent")
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=mesh)
