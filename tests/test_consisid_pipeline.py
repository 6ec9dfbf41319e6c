"""ConsisIDPipeline == diffusers' ConsisIDPipeline (tiny random weights, 2 steps): latents and
frames, the face inputs given as diffusers takes them; a cfg=2,ulysses=3 mesh == one device; PipeFusion (slow): warm-up
steps == one device, patched steps == the displaced-patch rule run sequentially on one device. CogVideoXDDIMScheduler:
the release's CogVideoXDPMScheduler draws noise in its steps (torch's there, JAX's here; its step is tested with the
same noise in test_schedulers.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_consisid, random_image, save_torch_pipeline
from xdit_jax import tiny
from xdit_jax.pipelines.consisid import ConsisIDPipeline
from xdit_jax.pipelines.denoise import converted_folder

PROMPT = "A woman smiling in a park."
NEG = "blurry, low quality"
H, W, F, STEPS, MSL = 64, 96, 9, 2, 16  # the learned positional table's size (the tiny config's sample: 8 x 12)
CFG = tiny.CONSISID_TRANSFORMER


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(torch pipeline, our one-device pipeline, our converted folder). Both sides take the image latents' mode (no
    sampling noise): diffusers' sample uses torch's generator, ours JAX's."""
    tp = make_torch_consisid()
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("consisid")),
                              cache_dir=tmp_path_factory.mktemp("cache"))
    pipe = ConsisIDPipeline.from_pretrained(folder)
    pipe._image_noise = lambda shape, rng: jnp.zeros(shape, jnp.float32)
    return tp, pipe, folder


def face(seed=0, tokens=5):
    rng = np.random.default_rng(seed)
    id_cond = rng.standard_normal((1, CFG["LFE_id_dim"])).astype(np.float32)
    vit = [rng.standard_normal((1, tokens, CFG["LFE_vit_dim"])).astype(np.float32)
           for _ in range(CFG["LFE_num_scale"])]
    return id_cond, vit


def _latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 4, H // 8, W // 8)).astype(np.float32)


def _diffusers(tp, image, lat, ids, output_type, monkeypatch, **kw):
    from diffusers.pipelines.consisid import pipeline_consisid

    monkeypatch.setattr(pipeline_consisid, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    with torch.no_grad():
        out = tp(image=image, prompt=PROMPT, negative_prompt=NEG, num_frames=F, height=H, width=W,
                 num_inference_steps=STEPS, latents=torch.from_numpy(lat), max_sequence_length=MSL,
                 output_type=output_type, id_cond=torch.from_numpy(ids[0]),
                 id_vit_hidden=[torch.from_numpy(v) for v in ids[1]], **kw).frames
    return out.numpy() if output_type == "latent" else np.asarray(out)


def _ours(pipe, image, lat, ids, output_type="np", prompt=PROMPT, steps=STEPS, **kw):
    return pipe(image, prompt, NEG, num_frames=F, height=H, width=W, num_inference_steps=steps, latents=lat,
                max_sequence_length=MSL, output_type=output_type, progress=False, id_cond=ids[0],
                id_vit_hidden=ids[1], **kw).frames


def test_matches_diffusers(pipes, monkeypatch):
    """Frames (the image a PIL image of another size, resized as diffusers does) and latents (dynamic CFG)."""
    tp, ours, _ = pipes
    image, lat, ids = random_image(0, (80, 48)), _latents(seed=1), face(0)
    ref = _diffusers(tp, image, lat, ids, "np", monkeypatch, guidance_scale=6.0)
    out = _ours(ours, image, lat, ids, guidance_scale=6.0)
    assert out.shape == ref.shape == (1, F, H, W, 3)
    # fp32 both sides; measured max error 1.0e-5; 1e-4 is ~1/40 of an 8-bit level
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    ref_lat = _diffusers(tp, image, lat, ids, "latent", monkeypatch, guidance_scale=4.0, use_dynamic_cfg=True)
    out_lat = _ours(ours, image, lat, ids, "latent", guidance_scale=4.0, use_dynamic_cfg=True)
    # measured max error 4.7e-6 of max |latent| 2.2 (2.1e-6 relative); 1e-5 relative allows reordered float32 sums
    np.testing.assert_allclose(out_lat, ref_lat, atol=1e-5 * np.abs(ref_lat).max(), rtol=0)
    # the face matters (its identity tokens enter every step)
    other = _ours(ours, image, lat, face(7), "latent", guidance_scale=4.0, use_dynamic_cfg=True)
    assert np.abs(other - out_lat).max() > 1e-3 * np.abs(out_lat).max()


@pytest.mark.parametrize("mesh", ["cfg=2,ulysses=3", pytest.param("cfg=2,ring=2,ulysses=2", marks=pytest.mark.slow)])
def test_mesh_matches_one_device(pipes, mesh):
    """cfg=2,ulysses=3: the joint sequence (16 text + 72 video tokens) padded to 90 and split over 3 devices, the
    face's identity tokens whole on each (slow: cfg=2,ring=2,ulysses=2, 2.9e-6 of 2.2 measured); the one-device reference
    reuses test_matches_diffusers' compiled step."""
    _, ours, folder = pipes
    kw = dict(guidance_scale=6.0, use_dynamic_cfg=True)
    lat, ids = _latents(seed=2), face(3)
    ref = _ours(ours, random_image(3, (W, H)), lat, ids, "latent", **kw)
    pipe = ConsisIDPipeline.from_pretrained(folder, mesh=mesh)
    pipe._image_noise = ours._image_noise
    out = _ours(pipe, random_image(3, (W, H)), lat, ids, "latent", **kw)
    # measured max error 3.3e-6 of max |latent| 2.2 (1.5e-6 relative); the same 1e-5 relative as against diffusers
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_bad_input(pipes):
    _, ours, folder = pipes
    image = random_image(0, (W, H))
    with pytest.raises(ValueError, match="needs the face's id_cond and id_vit_hidden.*process_face_embeddings_infer"):
        ours(image, PROMPT, num_frames=F, height=H, width=W, max_sequence_length=MSL)
    id_cond, vit = face()
    with pytest.raises(ValueError, match="give one face"):
        ours(image, PROMPT, num_frames=F, height=H, width=W, max_sequence_length=MSL,
             id_cond=np.concatenate([id_cond, id_cond]), id_vit_hidden=vit)
    with pytest.raises(ValueError, match="expected 2 arrays"):
        ours(image, PROMPT, num_frames=F, height=H, width=W, max_sequence_length=MSL, id_cond=id_cond,
             id_vit_hidden=vit[:1])
    with pytest.raises(ValueError, match="needs an image"):
        ours(prompt=PROMPT, id_cond=id_cond, id_vit_hidden=vit)
    with pytest.raises(ValueError, match="pipefusion=8 is more stages than the model's 4 layers"):
        ConsisIDPipeline.from_pretrained(folder, mesh="pipefusion=8")


PF_STEPS = 3  # a warm-up step, then two patched steps (the second reads the first's K/V as the stale ones)


def _pf(pipe, seed=4, **kw):
    return _ours(pipe, random_image(seed, (W, H)), _latents(seed=seed), face(seed), "latent", guidance_scale=6.0,
                 steps=PF_STEPS, **kw)


@pytest.fixture(scope="module")
def pf_refs(pipes):
    """(one device, the displaced-patch rule run sequentially on one device with 2 and with 3 patches): latents."""
    _, ours, folder = pipes
    seq = {}
    for m in (2, 3):
        pipe = ConsisIDPipeline.from_pretrained(folder, pipefusion_patches=m)
        pipe._image_noise = ours._image_noise
        seq[m] = _pf(pipe)
    return _pf(ours), seq


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["pipefusion=3", "cfg=2,pipefusion=2,ulysses=2"])
def test_pipefusion_warmup_steps_equal_one_device(pipes, pf_refs, mesh):
    """PipeFusion with every step a warm-up step (the whole sequence at once) == one device: pipefusion=3 puts blocks
    0-1, 2 and 3 on the stages, so the face cross-attentions (after blocks 0 and 2) run on the first two."""
    _, ours, folder = pipes
    pipe = ConsisIDPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=PF_STEPS)
    pipe._image_noise = ours._image_noise
    ref = pf_refs[0]
    # fp32; only summation order differs (stages, shards): measured 4.7e-6 of max |latent| 2.8; the 1e-5 relative of
    # the other meshes
    np.testing.assert_allclose(_pf(pipe), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,patches", [("pipefusion=2", 2), ("pipefusion=3", 3), ("data=2,pipefusion=4", 2),
                                          ("cfg=2,pipefusion=2,ulysses=2", 3), ("pipefusion=2,ring=2", 2)])
def test_pipefusion_patched_steps_equal_sequential_reference(pipes, pf_refs, mesh, patches):
    """The patched steps (each patch's attention: this step's K/V of the patches before it, the last step's after it;
    the face cross-attentions on the patch's own rows) == the same rule run sequentially on one device; and the rule
    is not the exact one (the test can tell them apart)."""
    _, ours, folder = pipes
    pipe = ConsisIDPipeline.from_pretrained(folder, mesh=mesh, pipefusion_patches=patches)
    pipe._image_noise = ours._image_noise
    one, seq = pf_refs
    out = _pf(pipe)
    # measured <= 4.9e-6 of 2.8 (every mesh here); the rule itself differs from one device by 0.024 (2 patches) and
    # 0.030 (3), and a cross-attention after the wrong block by more
    np.testing.assert_allclose(out, seq[patches], atol=1e-5 * np.abs(one).max(), rtol=0)
    assert np.abs(seq[patches] - one).max() > 1e-3 * np.abs(one).max()
