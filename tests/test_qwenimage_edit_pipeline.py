"""The Qwen-Image-Edit pipelines from diffusers save_pretrained folders == diffusers' QwenImageEditPipeline /
QwenImageEditPlusPipeline (tiny random weights, fp32; the 2511 zero_cond_t transformer for Plus), on one device and
on a cfg x ring x ulysses mesh (8 simulated CPU devices).

diffusers sizes the images at 1024^2 pixels (Plus: 384^2 for Qwen2.5-VL) through ``calculate_dimensions``; here both
sides take AREA instead (diffusers' function patched, ours by argument) so that the tiny models run small images.
Qwen2.5-VL's positions: diffusers' text encoder is given ``mm_token_type_ids`` (the 3-D positions, our default;
diffusers 0.42.1 as it runs gives 1-D ones, ``mrope=False``: tests/test_qwen2_5_vl_image.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import make_torch_qwenimage_edit, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.qwenimage import QwenImagePipeline
from xdit_jax.pipelines.qwenimage_edit import QwenImageEditPipeline, QwenImageEditPlusPipeline

PROMPT = "A small dog running on a beach at sunset."
NEGATIVE = "Waves crash."
# an image of aspect 3 : 2 at AREA pixels: 96 x 64 (6 x 4 packed tokens = 24 noisy, 24 condition tokens); Qwen2.5-VL
# sees it at 36 x 24 (the processor's max_pixels): 9 x 6 = 54 image tokens
AREA, STEPS = 96 * 64, 2
H, W = 64, 96
LATENT = (24, 16)


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _patch_diffusers(monkeypatch, tp, plus):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as pe
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as pp

    mod = pp if plus else pe
    orig = mod.calculate_dimensions
    # the 1024^2 areas (Plus's VAE_IMAGE_SIZE too) -> AREA; Plus's CONDITION_IMAGE_SIZE as the test sets it
    monkeypatch.setattr(mod, "calculate_dimensions", lambda area, ratio: orig(AREA if area == 1024 ** 2 else area,
                                                                             ratio))
    forward = tp.text_encoder.forward

    def fwd(*a, input_ids=None, **kw):  # the 3-D positions (see the module docstring)
        return forward(*a, input_ids=input_ids, mm_token_type_ids=(input_ids == 4).int(), **kw)

    monkeypatch.setattr(tp.text_encoder, "forward", fwd)


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    tp = make_torch_qwenimage_edit()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp("qwenimage_edit"))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return tp, QwenImageEditPipeline.from_pretrained(converted), converted


def initial_latents(batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch,) + LATENT).astype(np.float32)


def run_torch(tp, image, prompt, latents, monkeypatch, plus=False, **kw):
    with monkeypatch.context() as m:
        _patch_diffusers(m, tp, plus)
        with torch.no_grad():
            out = tp(image=image, prompt=prompt, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                     **kw).images
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def run_ours(pipe, image, prompt, latents, **kw):
    kw = dict(dict(num_inference_steps=STEPS, latents=latents, progress=False, vae_image_area=AREA), **kw)
    return pipe(image, prompt, **kw).images


def _close(out, ref):
    # latents O(3.7) after 2 Euler steps; fp32 both sides (as test_qwenimage_pipeline: 1e-5 of the scale). Measured:
    # Edit with true CFG 1.9e-6, Plus 2511 two images 1.2e-6; the other Qwen2.5-VL positions (mrope) move the Edit
    # latents by 0.06, dropping true CFG by 0.09, diffusers' condition image at another area (a test bug met on the
    # way) by 0.01
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_edit_matches_diffusers_with_true_cfg(edit, monkeypatch):
    """One image (60 x 90 pixels, resized to 64 x 96 for the VAE and the VL), true CFG with a negative prompt: the
    latents, then the image."""
    tp, ours, _ = edit
    img, lat = _image(60, 90, 0), initial_latents()
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    out = run_ours(ours, img, PROMPT, lat, output_type="latent", **kw)
    ref = run_torch(tp, img, PROMPT, lat, monkeypatch, output_type="latent", **kw)
    assert out.shape == ref.shape == (1,) + LATENT
    _close(out, ref)
    pix = run_ours(ours, img, PROMPT, lat, **kw)
    ref = run_torch(tp, img, PROMPT, lat, monkeypatch, output_type="np", **kw)
    assert pix.shape == ref.shape == (1, H, W, 3)
    np.testing.assert_allclose(pix, ref, atol=1e-4, rtol=0)  # pixels in [0, 1] (measured 6e-8): as the T2I test


def test_mesh_matches_one_device(edit):
    """cfg x ring x ulysses with true CFG: 24 noisy + 24 condition tokens over 4 devices."""
    _, ours, folder = edit
    img, lat = _image(60, 90, 0), initial_latents(seed=4)
    kw = dict(output_type="latent", negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    ref = run_ours(ours, img, PROMPT, lat, **kw)
    out = run_ours(QwenImageEditPipeline.from_pretrained(folder, mesh="cfg=2,ring=2,ulysses=2"), img, PROMPT, lat,
                   **kw)
    # float32 sums in another order (measured 1.2e-6 of 3.7)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_bad_requests_refused(edit):
    _, ours, folder = edit
    assert (folder / "text_encoder" / "vision_params").exists()  # conversion wrote the vision tower
    with pytest.raises(ValueError, match="not QwenImagePipeline"):  # the loader names the folder's pipeline
        QwenImagePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="edits an image"):
        ours(None, PROMPT)
    with pytest.raises(ValueError, match="one image"):
        ours([_image(8, 8, 0)] * 2, PROMPT)
    with pytest.raises(ValueError, match="aspect ratio"):
        ours(_image(2, 600, 0), PROMPT)


def test_plus_2511_two_images_match_diffusers(tmp_path_factory, monkeypatch):
    """QwenImageEditPlusPipeline with the zero_cond_t transformer: two images of other sizes (each at its aspect ratio
    for the VL and the VAE; the output at the last one's), no CFG."""
    tp = make_torch_qwenimage_edit(plus=True, zero_cond_t=True)
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("plus")),
                              cache_dir=tmp_path_factory.mktemp("cache_plus"))
    ours = QwenImageEditPlusPipeline.from_pretrained(folder)
    assert ours.transformer_config.zero_cond_t
    imgs = [_image(40, 40, 1), _image(60, 90, 2)]
    lat = initial_latents(seed=2)
    kw = dict(true_cfg_scale=1.0, output_type="latent")
    out = run_ours(ours, imgs, PROMPT, lat, condition_image_area=AREA // 4, **kw)
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as pp

    monkeypatch.setattr(pp, "CONDITION_IMAGE_SIZE", AREA // 4)
    ref = run_torch(tp, imgs, PROMPT, lat, monkeypatch, plus=True, **kw)
    _close(out, ref)


# slow: PipeFusion's machinery runs in the default suite (tests/test_pipefusion_two_stream.py, the T2I Qwen-Image's
# text slicing) and the edit pipelines' joint sequence over a mesh in test_mesh_matches_one_device
@pytest.mark.slow
def test_plus_pipefusion_matches_sequential_rule(tmp_path_factory):
    """pipefusion=2 on Plus 2511 (the 24 noisy + 24 condition tokens in two patches, zero_cond_t's flags patched with
    them) == the same patched rule on one device (pipefusion_patches=2)."""
    tp = make_torch_qwenimage_edit(plus=True, zero_cond_t=True)
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("plus_pf")),
                              cache_dir=tmp_path_factory.mktemp("cache_plus_pf"))
    img, lat = _image(60, 90, 0), initial_latents(seed=5)
    kw = dict(output_type="latent", num_inference_steps=3)
    exact = run_ours(QwenImageEditPlusPipeline.from_pretrained(folder), img, PROMPT, lat, **kw)
    ref = run_ours(QwenImageEditPlusPipeline.from_pretrained(folder, pipefusion_patches=2), img, PROMPT, lat, **kw)
    out = run_ours(QwenImageEditPlusPipeline.from_pretrained(folder, mesh="pipefusion=2"), img, PROMPT, lat, **kw)
    # latents O(3.6): measured 2.4e-7; the stale K/V move them by 0.013
    atol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert np.abs(ref - exact).max() > 20 * atol


def test_full_size_configs_folders(tmp_path):
    """configs/qwen-image-edit and -2511 read into the modules' configs (the vision tower of Qwen2.5-VL-7B: parameter
    count == transformers'), the pipeline classes; a tiny configs folder of the Plus layout builds with random
    weights (from_config: the vision tower and the VAE's encoder drawn too) and runs one step."""
    import json
    from pathlib import Path

    import jax
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from xdit_jax import tiny
    from xdit_jax.keymap import expected_shapes
    from xdit_jax.models import qwen2_5_vl_vision as vv
    from xdit_jax.models import qwenimage as qi
    from xdit_jax.pipelines import pipeline_class

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, cls, zero in [("qwen-image-edit", QwenImageEditPipeline, False),
                            ("qwen-image-edit-2511", QwenImageEditPlusPipeline, True)]:
        index = json.loads((root / name / "model_index.json").read_text())
        assert pipeline_class(index["_class_name"]) is cls
        tc = qi.QwenImageConfig.from_dict(json.loads((root / name / "transformer" / "config.json").read_text()))
        assert tc.zero_cond_t == zero
        te = json.loads((root / name / "text_encoder" / "config.json").read_text())
        vcfg = vv.VisionConfig.from_dict(te)
        assert vcfg.out_hidden_size == tc.joint_attention_dim and vcfg.fullatt_block_indexes == (7, 15, 23, 31)
        pcfg = vv.ProcessorConfig.from_dict(json.loads((root / name / "processor" / "preprocessor_config.json")
                                                       .read_text()))
        assert (pcfg.min_pixels, pcfg.max_pixels, pcfg.patch_size) == (3136, 12845056, 14)
    with torch.device("meta"):
        tm = Qwen2_5_VisionTransformerPretrainedModel(transformers.Qwen2_5_VLConfig(**te).vision_config)
    got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(expected_shapes(lambda: vv.Qwen25VisionTransformer(vcfg))))
    assert got == sum(p.numel() for p in tm.parameters())  # 669M
    tiny.write_configs(tmp_path, "qwenimage-edit-plus")
    pipe = QwenImageEditPlusPipeline.from_config(tmp_path)
    out = pipe(_image(60, 90, 0), PROMPT, num_inference_steps=2, vae_image_area=AREA, output_type="latent",
               true_cfg_scale=1.0, progress=False).images
    assert out.shape == (1,) + LATENT and np.isfinite(out).all()


# slow: the default run's mesh test is Edit's cfg x ring x ulysses (test_mesh_matches_one_device)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=2,cfg=2,ulysses=2", "cfg=2,ring=3"])
def test_plus_batch_meshes_match_one_device(tmp_path_factory, mesh):
    """Plus 2511, two images, two prompts x 2 samples each with negative prompts: over data (the condition latents'
    rows with the batch) and over ring=3 (48 tokens + padding) == one device; measured 9.5e-7 / 8.3e-7 of 4.3."""
    tp = make_torch_qwenimage_edit(plus=True, zero_cond_t=True)
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("plus_mesh")),
                              cache_dir=tmp_path_factory.mktemp("cache_plus_mesh"))
    imgs, prompts = [_image(40, 40, 1), _image(60, 90, 2)], [PROMPT, "A cat."]
    lat = np.random.default_rng(5).standard_normal((4,) + LATENT).astype(np.float32)
    kw = dict(output_type="latent", negative_prompt=["Blurry.", "Dark."], true_cfg_scale=3.0, num_images_per_prompt=2)
    ref = run_ours(QwenImageEditPlusPipeline.from_pretrained(folder), imgs, prompts, lat, **kw)
    out = run_ours(QwenImageEditPlusPipeline.from_pretrained(folder, mesh=mesh), imgs, prompts, lat, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow  # (another pipeline's step compile and torch run; inpainting's rule is test_qwenimage_pipeline's)
def test_edit_inpaint_matches_diffusers(edit, monkeypatch):
    """diffusers' QwenImageEditInpaintPipeline on the edit folder's parts: the 60 x 90 image (96 x 64 at the test's
    area) with a mask, strength 0.6 of 4 steps (3 run), true CFG; the image's posterior sample (the condition tokens
    and the kept region) and the noise the same torch draws both sides."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as pi
    from diffusers import QwenImageEditInpaintPipeline as TorchInpaint

    from xdit_jax.pipelines.qwenimage_edit import QwenImageEditInpaintPipeline

    tp, _, folder = edit
    tp = TorchInpaint(**tp.components)
    ours = QwenImageEditInpaintPipeline.from_pretrained(folder)
    z = tp.vae.config.z_dim
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(s, generator=g).numpy() for s in [(1, z, 1, H // 8, W // 8), (1, 1, z, H // 8, W // 8)]]

    def normal(key, shape):
        d = draws.pop(0)
        assert d.size == int(np.prod(shape))
        return d.reshape(shape)
    monkeypatch.setattr(ours, "_normal", normal)
    mask = np.zeros((60, 90), np.uint8)
    mask[10:50, 30:80] = 255
    img = _image(60, 90, 5)
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=4, strength=0.6)
    with monkeypatch.context() as m:
        _patch_diffusers(m, tp, False)
        orig = pi.calculate_dimensions
        m.setattr(pi, "calculate_dimensions", lambda area, ratio: orig(AREA if area == 1024 ** 2 else area, ratio))
        with torch.no_grad():
            ref = tp(image=img, mask_image=Image.fromarray(mask), prompt=PROMPT, output_type="latent",
                     generator=torch.Generator().manual_seed(3), **kw).images.numpy()
    out = ours(img, PROMPT, mask_image=Image.fromarray(mask), output_type="latent", progress=False,
               vae_image_area=AREA, **kw).images
    assert not draws and out.shape == ref.shape == (1,) + LATENT
    _close(out, ref)
