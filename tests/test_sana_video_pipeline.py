"""The SANA-Video pipeline from a diffusers save_pretrained folder == diffusers' SanaVideoPipeline (latents and
decoded video); a mesh == one device; resolution binning tables == diffusers'; bad requests refused."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_sana_video, torch_and_our_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.denoise import as_numpy
from xdit_jax.pipelines.sana_video import SanaVideoPipeline, check_request

PROMPT = "A small dog running on a beach at sunset."
NEG = "blurry, low quality"
H, W, FRAMES = 32, 64, 9  # (diffusers takes multiples of 32) 3 x 4 x 8 latents: 3 x 2 x 4 = 24 video tokens
MSL = tiny.SANA_MAX_SEQUENCE_LENGTH
CALL = dict(height=H, width=W, frames=FRAMES, num_inference_steps=2, guidance_scale=4.5, max_sequence_length=MSL,
            use_resolution_binning=False)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return torch_and_our_pipeline(make_torch_sana_video, SanaVideoPipeline, tmp_path_factory, "sana_video")


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, 3, H // 8, W // 8)).astype(np.float32)


def test_video_matches_diffusers(pipes):
    """A negative prompt, CFG, DPM-Solver++ with flow sigmas, 2 steps: the latents, and the Wan VAE decode of them as
    diffusers' pipeline decodes (unscaled by the VAE's latents mean / std, postprocessed to [0, 1]). No complex human
    instruction (SANA's prompt encoding, tested with it in tests/test_sana_pipeline.py; SANA-Video's default list ==
    diffusers': below): one Gemma compile."""
    tp, ours, _ = pipes
    lat = initial_latents()
    with torch.no_grad():
        ref_lat = tp(prompt=PROMPT, negative_prompt=NEG, latents=torch.from_numpy(lat), output_type="latent",
                     complex_human_instruction=[], **CALL).frames
        vc = tp.vae.config
        z = ref_lat * torch.tensor(vc.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(vc.latents_mean).view(
            1, -1, 1, 1, 1)
        ref = tp.video_processor.postprocess_video(tp.vae.decode(z, return_dict=False)[0], output_type="np")
    ref_lat = ref_lat.numpy()
    out_lat = ours(PROMPT, NEG, latents=lat, output_type="latent", complex_human_instruction=[], progress=False,
                   **CALL).frames
    # flow latents, fp32 both sides: measured 5.0e-6 at a scale of 3.9 (1.3e-6 of it)
    scale = np.abs(ref_lat).max()
    np.testing.assert_allclose(out_lat, ref_lat, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    out = as_numpy(ours._decode_fn()(ours._put_replicated(out_lat)))
    assert out.shape == ref.shape == (1, FRAMES, H, W, 3)
    # pixels in [0, 1]: measured 1.5e-7; 1e-4 is 1/40 of an 8-bit level
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def _i2v_parity(tp_i2v, ours, lat, image, **kw):
    """diffusers' SanaImageToVideoPipeline and ours from the same latents and image: (ours, diffusers') latents."""
    call = dict(CALL, complex_human_instruction=[], **kw)
    with torch.no_grad():
        ref = tp_i2v(image=image, prompt=PROMPT, negative_prompt=NEG, latents=torch.from_numpy(lat),
                     output_type="latent", **call).frames.numpy()
    out = ours(image, PROMPT, NEG, latents=lat, output_type="latent", progress=False, **call).frames
    return out, ref


@pytest.mark.slow  # (~8 s: its own step, text and VAE encoder compiles)
def test_image_to_video_matches_diffusers(pipes):
    """SanaImageToVideoPipeline on the text-to-video folder (as diffusers loads SANA-Video_2B_480p_diffusers; its
    DPM-Solver++): the image's VAE latents in frame 0, that frame's tokens at timestep 0, frames 1.. stepped."""
    from diffusers import SanaImageToVideoPipeline as TorchI2V

    from tests.fixtures import random_image
    from xdit_jax.pipelines.sana_video import SanaImageToVideoPipeline

    tp, _, folder = pipes
    image = random_image(5, (W, H))
    out, ref = _i2v_parity(TorchI2V(**tp.components), SanaImageToVideoPipeline.from_pretrained(folder),
                           initial_latents(seed=3), image)
    scale = np.abs(ref).max()
    # flow latents, fp32: measured 4.1e-6 at a scale of 4.1 (flow-matching Euler below: 4.4e-6 at 3.7)
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


@pytest.mark.slow
def test_image_to_video_flow_match_matches_diffusers(tmp_path_factory):
    """SanaImageToVideoPipeline's own scheduler (flow-matching Euler, shift 3) in its own folder; its PipeFusion run;
    SanaVideoPipeline on that folder (text-to-video with flow-matching Euler)."""
    from tests.fixtures import make_torch_sana_video_i2v, random_image
    from xdit_jax.pipelines.sana_video import SanaImageToVideoPipeline

    tp, ours, folder = torch_and_our_pipeline(make_torch_sana_video_i2v, SanaImageToVideoPipeline, tmp_path_factory,
                                              "sana_video_i2v")
    lat, image = initial_latents(seed=4), random_image(6, (W, H))
    out, ref = _i2v_parity(tp, ours, lat, image)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    # PipeFusion (the first frame's timestep mask travels with the patches): pipefusion=2 == the sequential rule
    kw = dict(CALL, num_inference_steps=3, latents=lat, complex_human_instruction=[], progress=False,
              output_type="latent")
    seq = SanaImageToVideoPipeline.from_pretrained(folder, pipefusion_patches=2)(image, PROMPT, **kw).frames
    pf = SanaImageToVideoPipeline.from_pretrained(folder, mesh="pipefusion=2")(image, PROMPT, **kw).frames
    np.testing.assert_allclose(pf, seq, atol=2e-5 * np.abs(seq).max(), rtol=0)
    np.testing.assert_array_equal(seq[:, :, :1], out[:, :, :1])  # frame 0: the image's latents, kept
    # SanaVideoPipeline with this folder's flow-matching Euler (diffusers' text-to-video pipeline runs it too)
    from diffusers import SanaVideoPipeline as TorchT2V

    with torch.no_grad():
        ref = TorchT2V(**tp.components)(prompt=PROMPT, negative_prompt=NEG, latents=torch.from_numpy(lat),
                                        output_type="latent", complex_human_instruction=[], **CALL).frames.numpy()
    out = SanaVideoPipeline.from_pretrained(folder)(PROMPT, NEG, latents=lat, output_type="latent",
                                                    complex_human_instruction=[], progress=False, **CALL).frames
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "ulysses=3"])
def test_mesh_matches_one_device(pipes, mesh):
    """24 video tokens: chunks of 6 over ring x ulysses = 4 (< a frame of 8: the frame conv gathers), of 8 over
    ulysses=3 (halos by ppermute); the VAE decode over the mesh too. (Padding: the transformer's test.)"""
    _, ours, folder = pipes
    kw = dict(CALL, latents=initial_latents(seed=2), complex_human_instruction=[], progress=False)
    ref = ours(PROMPT, **kw).frames
    out = SanaVideoPipeline.from_pretrained(folder, mesh=mesh)(PROMPT, **kw).frames
    # pixels in [0, 1], float reordering only: measured 6e-8 (both meshes)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_binned_decode_resizes_as_diffusers(pipes):
    """Resolution binning's way back: each decoded frame resized and center-cropped to the requested size, as
    diffusers' ``resize_and_crop_tensor`` (bilinear, no antialias) before postprocessing."""
    tp, ours, _ = pipes
    lat = initial_latents(seed=7)
    with torch.no_grad():
        vc = tp.vae.config
        z = torch.from_numpy(lat) * torch.tensor(vc.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(
            vc.latents_mean).view(1, -1, 1, 1, 1)
        video = tp.video_processor.resize_and_crop_tensor(tp.vae.decode(z, return_dict=False)[0], 40, 24)
        ref = tp.video_processor.postprocess_video(video, output_type="np")
    out = as_numpy(ours._decode_fn((24, 40))(ours._put_replicated(lat)))
    assert out.shape == ref.shape == (1, FRAMES, 24, 40, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_resolution_binning_tables_match_diffusers():
    from diffusers.pipelines.sana_video.pipeline_sana_video import ASPECT_RATIO_480_BIN, ASPECT_RATIO_720_BIN

    from xdit_jax.pipelines.sana_video import aspect_ratio_bins, binned_size

    for s, table in {30: ASPECT_RATIO_480_BIN, 22: ASPECT_RATIO_720_BIN}.items():
        assert aspect_ratio_bins(s) == {k: (int(h), int(w)) for k, (h, w) in table.items()}
    assert binned_size(480, 832, 30) == (480, 832) and binned_size(100, 100, 8) == (100, 100)


def test_complex_human_instruction_is_diffusers_default():
    import inspect

    from diffusers import SanaVideoPipeline as TorchPipeline

    from xdit_jax.pipelines.sana_video import SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION

    default = inspect.signature(TorchPipeline.__call__).parameters["complex_human_instruction"].default
    assert SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION == default


def test_bad_requests(pipes):
    _, ours, folder = pipes
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPT, **dict(CALL, height=40))
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        ours(PROMPT, **dict(CALL, frames=None, num_frames=0))
    with pytest.raises(ValueError, match="disagree"):
        ours(PROMPT, **dict(CALL, num_frames=5))
    with pytest.raises(ValueError, match="more stages than the model's 2 layers"):
        check_request(ours.transformer_config, ours.vae_config, H, W, FRAMES, mesh_spec="pipefusion=4")


def _pf_run(folder, lat, steps=3, **load):
    kw = dict(CALL, num_inference_steps=steps, latents=lat, complex_human_instruction=[], progress=False,
              output_type="latent")
    return SanaVideoPipeline.from_pretrained(folder, **load)(PROMPT, **kw).frames


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["pipefusion=2", "cfg=2,pipefusion=2,ulysses=2"])
def test_pipefusion_matches_sequential_rule(pipes, mesh):
    """PipeFusion (SANA's rule; the frame conv's input in the conv buffer's last channels, a halo of one frame = 8
    tokens, 2 patches of 12): pipefusion=2 (and x CFG x Ulysses) == the same rule run sequentially on one device;
    warm-up-only == the plain run; the patched steps really differ from it."""
    folder = pipes[2]
    lat = initial_latents(seed=5)
    exact, ref = _pf_run(folder, lat), _pf_run(folder, lat, pipefusion_patches=2)
    out = _pf_run(folder, lat, mesh=mesh)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    assert np.abs(ref - exact).max() > 1e-2
    warm = _pf_run(folder, lat, pipefusion_patches=2, pipefusion_warmup_steps=3)
    np.testing.assert_allclose(warm, exact, atol=1e-6 * np.abs(exact).max(), rtol=0)
