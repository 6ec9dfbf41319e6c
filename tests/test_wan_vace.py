"""Wan VACE: the transformer == diffusers' WanVACETransformer3DModel; WanVACEPipeline from a diffusers folder ==
diffusers' WanVACEPipeline (a control video, its mask and a reference image); a sequence-parallel mesh == one device;
PipeFusion (slow): warm-up steps == one device, patched steps == the sequential stale-K/V rule; Wan 2.2's two-expert
layout (slow): == diffusers', meshes and PipeFusion == one device, the CLI's --guidance-scale-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanVACETransformer3DModel
from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_vace
from flax import nnx

from tests.fixtures import make_torch_wan_vace, save_torch_pipeline
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.models import wan_vace
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.wan_vace import WanVACEPipeline

# 3 layers with hints after layers 0 and 2 given out of order ([2, 0]: diffusers pops the hints in the main loop's
# order), 6 control channels, control latents of one frame fewer than the video's (zero tokens appended).
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=8, freq_dim=16, ffn_dim=40, num_layers=3, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64, vace_layers=[2, 0], vace_in_channels=6)


def test_transformer_matches_diffusers():
    tm = randomize_(WanVACETransformer3DModel(**CONFIG), seed=1, std=0.15)
    cfg = wan_vace.WanVACEConfig.from_dict(dict(tm.config))
    model = wan_vace.build(cfg, wan_vace.params_from_torch(state_dict_np(tm), cfg))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 6, 10)).astype(np.float32)
    enc = rng.standard_normal((2, 5, 8)).astype(np.float32)
    ctrl = rng.standard_normal((2, 6, 2, 6, 10)).astype(np.float32)
    t = np.array([999, 37])
    fwd = jax.jit(lambda m, *a: m(*a))
    scale = np.array([0.7, 1.3], np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(enc),
                 control_hidden_states=torch.from_numpy(ctrl), control_hidden_states_scale=torch.from_numpy(scale),
                 return_dict=False)[0].numpy()
    out = np.asarray(fwd(model, x, t, enc, None, ctrl, scale))
    # fp32 both sides, outputs O(3): measured 7e-7; a hint after the wrong layer or unscaled moves them by 1e-1
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    with pytest.raises(ValueError, match="must include layer 0"):
        wan_vace.WanVACEConfig.from_dict(dict(CONFIG, vace_layers=[1, 2]))
    with pytest.raises(ValueError, match="one scale per VACE layer"):
        model(x, t, enc, None, ctrl, np.ones(3, np.float32))


@pytest.mark.slow  # (five PipeFusion programs compiled)
@pytest.mark.parametrize("mesh,patches", [("pipefusion=3", 3), ("pipefusion=2,ulysses=2", 2), (None, 3)])
def test_pipefusion_patches_with_buffers_of_the_same_input_are_exact(mesh, patches):
    """The two stacks looped over the stages (the VACE stack's 2 blocks: a padding slot on 3 stages; the main 3:
    uneven on 2), the hints riding with the patches in the carry: a warm-up pass fills both stacks' K/V buffers and
    a patched pass over them on the same input equals the model's blocks (a hint added after the wrong layer, lost
    at a stage boundary or taken from another patch moves the output by O(0.1-1)). 45 video tokens, the control's
    30 with zeros appended."""
    from tests.jax_util import random_state
    from xdit_jax.mesh import build_mesh
    from xdit_jax.parallel import pipefusion

    cfg = wan_vace.WanVACEConfig.from_dict(CONFIG)
    graphdef, state = random_state(wan_vace.WanVACETransformer3DModel, cfg, 4)
    rng = np.random.default_rng(3)
    model = nnx.merge(graphdef, state)
    x, tokens, cond = model.embed(rng.standard_normal((2, 4, 3, 6, 10)).astype(np.float32), np.array([999, 37]),
                                  rng.standard_normal((2, 5, 8)).astype(np.float32),
                                  control_hidden_states=rng.standard_normal((2, 6, 2, 6, 10)).astype(np.float32),
                                  control_hidden_states_scale=np.array([0.7, 1.3], np.float32))
    ref = jax.jit(lambda st: nnx.merge(graphdef, st).blocks(x, tokens, cond))(state)
    stacks = wan_vace.pipefusion_stacks(cfg)
    m = build_mesh(mesh)
    stages = m.shape["pipefusion"]
    st = pipefusion.pad_stack(state, stacks["stacked"], stages)
    cache = pipefusion.init_cache(m, pipefusion.stack_slots(stacks["stacked_layers"], stages), 2, x.shape[1],
                                  cfg.num_attention_heads, cfg.attention_head_dim, jnp.float32, patches)

    def run(warmup):
        return jax.jit(lambda s, c: pipefusion.run_pipefusion(
            lambda p, y, t, c: nnx.merge(graphdef, p).blocks(y, t, c), s, x, tokens, cond, c, m if mesh else None,
            patches=patches, warmup=warmup, stacked=stacks["stacked"], num_layers=stacks["stacked_layers"]))

    warm, cache1 = run(True)(st, cache)
    patched, cache2 = run(False)(st, cache1)
    scale = float(jnp.abs(ref).max())
    assert ref.shape == x.shape[:2] + (cfg.inner_dim,) and scale > 0.5
    # fp32, only the summation order differs (stage splits, patches, Ulysses); measured: see the commit message
    for out in (warm, patched):
        np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0)
    for a, b in zip(cache1, cache2):  # the same K/V written back, in both stacks' buffers
        assert float(jnp.abs(b - a).max()) <= 2e-5 * float(jnp.abs(a).max())
    print(f"{mesh}, {patches} patches: warm-up {float(jnp.abs(warm - ref).max()):.1e}, patched "
          f"{float(jnp.abs(patched - ref).max()):.1e} of {scale:.2f}")


# ------------------------------------------------------------------------------------------------------- pipeline

PROMPT, NEG = "A small dog running on a beach at sunset.", "blurry"
F, H, W, MSL = 5, 32, 48, 16  # 2 x 4 x 6 latents; + 2 reference frames
_BUILT = {}


def build(tmp_path_factory):
    if "vace" not in _BUILT:
        tp = make_torch_wan_vace()
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("wan-vace")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["vace"] = (tp, WanVACEPipeline.from_pretrained(folder), folder)
    return _BUILT["vace"]


def conditions(seed=0):
    """5 frames at 48 x 32 (PIL, as given to both), a mask white (generate) on the right half with grey levels
    around the 0.5 threshold, and two reference images: 40 x 20 (fitted into 48 x 24 on the white canvas) and 20 x 36
    (its own size rounded to 16 x 32, then fitted into 16 x 32: the order of the two reference frames matters)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    video = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(F)]
    mask = []
    for i in range(F):
        m = np.zeros((H, W), np.uint8)
        m[:, W // 2:] = 255
        m[: 8 + i, :8] = 120 + 2 * i
        mask.append(Image.fromarray(m).convert("RGB"))
    refs = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((20, 40, 3), (36, 20, 3))]
    return video, mask, refs


def _patch_ftfy(monkeypatch):
    monkeypatch.setattr(pipeline_wan_vace, "basic_clean", pipeline_wan.basic_clean)


def test_pipeline_matches_diffusers(tmp_path_factory, monkeypatch):
    """2 UniPC steps with CFG, conditioning_scale per layer; the same initial latents (2 references + 2 frames) both
    sides; latents and the decoded video (the reference frame dropped)."""
    _patch_ftfy(monkeypatch)
    tp, ours, _ = build(tmp_path_factory)
    video, mask, refs = conditions()
    lat = np.random.default_rng(1).standard_normal((1, 4, 2 + (F - 1) // 4 + 1, H // 8, W // 8)).astype(np.float32)
    kw = dict(prompt=PROMPT, negative_prompt=NEG, video=video, mask=mask, reference_images=refs,
              conditioning_scale=[0.8, 1.2], height=H, width=W, num_frames=F, num_inference_steps=2,
              guidance_scale=5.0, max_sequence_length=MSL)
    seen = {}
    decode = tp.vae.decode

    def record(z, *a, **k):  # diffusers' latents as it decodes them: the reference frames dropped, unscaled
        seen["torch"] = z.float().numpy()
        return decode(z, *a, **k)

    monkeypatch.setattr(tp.vae, "decode", record)
    denoise = ours._denoise

    def keep(*a, **k):
        seen["ours"] = np.asarray(denoise(*a, **k))
        return seen["ours"]

    monkeypatch.setattr(ours, "_denoise", keep)
    with torch.no_grad():
        ref = np.asarray(tp(latents=torch.from_numpy(lat), **kw).frames)
    out = ours(latents=lat, progress=False, **kw).frames
    assert out.shape == ref.shape == (1, F, H, W, 3) and seen["ours"].shape == lat.shape
    vc = ours.vae_config
    ours_z = seen["ours"][:, :, 2:] * np.asarray(vc.latents_std).reshape(1, -1, 1, 1, 1) + np.asarray(
        vc.latents_mean).reshape(1, -1, 1, 1, 1)
    scale = np.abs(seen["torch"]).max()
    # fp32 both sides: the control latents (two VAE encodes, the reference's), 2 steps, the VAE decode. Latents within
    # 1e-5 of their scale, pixels in [0, 1] within 1e-4 (measured: see the commit message)
    np.testing.assert_allclose(ours_z, seen["torch"], atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    print(f"latents: max diff {np.abs(ours_z - seen['torch']).max():.2e} of {scale:.2f}; pixels: "
          f"{np.abs(out - ref).max():.2e}")


def test_bad_input(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    video, mask, _ = conditions()
    with pytest.raises(ValueError, match="mask can only be given with a video"):
        ours(PROMPT, mask=mask, height=H, width=W)
    with pytest.raises(ValueError, match="one mask frame a frame"):
        ours(PROMPT, video=video, mask=mask[:3], height=H, width=W)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours(PROMPT, video=video[:4], height=H, width=W)
    with pytest.raises(ValueError, match="2 VACE layers"):
        ours(PROMPT, video=video, height=H, width=W, conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="resize them"):
        ours(PROMPT, video=video, height=H, width=64)
    with pytest.raises(ValueError, match="guidance_scale_2 is only for a two-expert pipeline"):
        ours(PROMPT, video=video, height=H, width=W, guidance_scale_2=3.0)


@pytest.mark.slow  # (the pipeline compiled again on an 8-device mesh)
def test_mesh_matches_one_device(tmp_path_factory):
    _, ours, folder = build(tmp_path_factory)
    video, mask, refs = conditions(seed=2)
    kw = dict(video=video, mask=mask, reference_images=refs, height=H, width=W, num_inference_steps=2,
              max_sequence_length=MSL, output_type="latent", progress=False, seed=3)
    one = ours(PROMPT, NEG, **kw).frames
    out = WanVACEPipeline.from_pretrained(folder, mesh="cfg=2,ulysses=2,ring=2")(PROMPT, NEG, **kw).frames
    np.testing.assert_allclose(out, one, atol=1e-5 * np.abs(one).max(), rtol=0)
    print(f"mesh vs one device: max diff {np.abs(out - one).max():.2e} of {np.abs(one).max():.2f}")


@pytest.mark.slow  # (three more pipelines compiled, on meshes)
def test_pipefusion(tmp_path_factory):
    """PipeFusion over both stacks (the VACE stack's 2 blocks, then the main stack's 2, looped over the stages; the
    hints riding with the patches), CFG, a reference image: warm-up steps only == one device; 1 warm-up + 2 patched
    steps == the same patched rule run sequentially on one device (pipefusion_patches=2), on pipefusion=2 and on
    cfg=2,pipefusion=2,ulysses=2. 18 video tokens (a reference frame + 2 frames, 2 x 3 each) padded to two patches
    of 16."""
    _, ours, folder = build(tmp_path_factory)
    video, mask, refs = conditions(seed=6)
    kw = dict(video=video, mask=mask, reference_images=refs[:1], conditioning_scale=[0.9, 1.1], height=H, width=W,
              num_inference_steps=3, max_sequence_length=MSL, output_type="latent", progress=False, seed=7)
    exact = ours(PROMPT, NEG, **kw).frames
    warm = WanVACEPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_warmup_steps=3)
    out = warm(PROMPT, NEG, **kw).frames
    np.testing.assert_allclose(out, exact, atol=1e-5 * np.abs(exact).max(), rtol=0)
    print(f"pipefusion=2, warm-up steps only vs one device: max diff {np.abs(out - exact).max():.2e} of "
          f"{np.abs(exact).max():.2f}")
    ref = WanVACEPipeline.from_pretrained(folder, pipefusion_patches=2)(PROMPT, NEG, **kw).frames
    atol = 1e-5 * np.abs(ref).max()
    assert np.abs(ref - exact).max() > 20 * atol  # the patched steps really ran (stale K/V; measured 3.4e-3 of 3.7)
    for mesh in ("pipefusion=2", "cfg=2,pipefusion=2,ulysses=2"):
        out = WanVACEPipeline.from_pretrained(folder, mesh=mesh)(PROMPT, NEG, **kw).frames
        np.testing.assert_allclose(out, ref, atol=atol, rtol=0, err_msg=mesh)
        print(f"{mesh} vs the sequential rule: max diff {np.abs(out - ref).max():.2e} of {np.abs(ref).max():.2f} "
              f"(patched vs exact: {np.abs(ref - exact).max():.2e})")


@pytest.mark.slow  # (the pipeline loaded and compiled again by the CLI)
def test_cli(tmp_path_factory, tmp_path, capsys):
    """--video / --mask (folders of frames) / --reference-image / --conditioning-scale on a VACE folder -> an mp4 of
    the video's frames at its size; the VACE flags refused on another family, a mask without a video refused."""
    import imageio.v3 as iio

    from xdit_jax import cli

    _, _, folder = build(tmp_path_factory)
    video, mask, refs = conditions(seed=4)
    for name, frames in (("video", video), ("mask", mask)):
        (tmp_path / name).mkdir()
        for i, f in enumerate(frames):
            f.save(tmp_path / name / f"{i:03d}.png")
    refs[0].save(tmp_path / "ref.png")
    out = tmp_path / "out.mp4"
    rc = cli.main(["--model", str(folder), "--video", str(tmp_path / "video"), "--mask", str(tmp_path / "mask"),
                   "--reference-image", str(tmp_path / "ref.png"), "--conditioning-scale", "0.5", "--steps", "2",
                   "--max-sequence-length", str(MSL), "--output", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert iio.imread(out, index=None).shape[:3] == (F, H, W)
    rc = cli.main(["--model", str(folder), "--mask", str(tmp_path / "mask"), "--output", str(tmp_path / "b.mp4")])
    assert rc == 2 and "goes with a control --video" in capsys.readouterr().err
    rc = cli.main(["--model", "tiny-wan", "--reference-image", str(tmp_path / "ref.png"), "--output",
                   str(tmp_path / "c.mp4")])
    assert rc == 2 and "Wan VACE only" in capsys.readouterr().err


@pytest.mark.slow  # (another control shape to compile)
def test_without_video_or_reference_matches_diffusers(tmp_path_factory, monkeypatch):
    """No video, mask or reference (diffusers' grey zeros video and all-ones mask: text-to-video through VACE), one
    float conditioning_scale, no CFG: the latents == diffusers' (the same initial latents)."""
    _patch_ftfy(monkeypatch)
    tp, ours, _ = build(tmp_path_factory)
    lat = np.random.default_rng(5).standard_normal((1, 4, (F - 1) // 4 + 1, H // 8, W // 8)).astype(np.float32)
    kw = dict(prompt=PROMPT, conditioning_scale=0.7, height=H, width=W, num_frames=F, num_inference_steps=2,
              guidance_scale=1.0, max_sequence_length=MSL, output_type="latent")
    with torch.no_grad():
        ref = tp(latents=torch.from_numpy(lat), **kw).frames.numpy()
    out = ours(latents=lat, progress=False, **kw).frames
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    print(f"no video / mask / reference: max diff {np.abs(out - ref).max():.2e} of {np.abs(ref).max():.2f}")


# ------------------------------------------------------------------------------------- Wan 2.2: two experts

STEPS_2 = 3  # UniPC at t = 999, 857, 600: with boundary_ratio 0.875 step 0 is transformer's, steps 1-2 transformer_2's


def build_two(tmp_path_factory):
    """(torch pipeline, ours, converted folder) of the tiny two-expert VACE layout (boundary_ratio 0.875)."""
    if "vace2" not in _BUILT:
        tp = make_torch_wan_vace(two_experts=True)
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("wan-vace2")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["vace2"] = (tp, WanVACEPipeline.from_pretrained(folder), folder)
    return _BUILT["vace2"]


@pytest.mark.slow  # (a second tiny VACE pipeline built and compiled)
def test_two_experts_match_diffusers(tmp_path_factory, monkeypatch):
    """Wan 2.2's two-expert VACE layout: 3 UniPC steps, the first the high-noise expert's with guidance 4, the other
    two transformer_2's with guidance_scale_2 2, both fed the control video, mask, a reference and the per-layer
    conditioning scales; the latents (reference frame kept, as diffusers' latent output) == diffusers' from the same
    initial latents. Each expert has its own random weights (measured: transformer throughout moves the latents by
    2.0 of 3.2, guidance_scale_2 = guidance_scale by 0.26)."""
    _patch_ftfy(monkeypatch)
    tp, ours, _ = build_two(tmp_path_factory)
    assert ours.transformer_2 is not None and ours.boundary_ratio == 0.875
    assert ours.stages(ours.schedule(STEPS_2).timesteps) == [(0, 0), (1, 1)]
    video, mask, refs = conditions(seed=8)
    lat = np.random.default_rng(9).standard_normal((1, 4, 1 + (F - 1) // 4 + 1, H // 8, W // 8)).astype(np.float32)
    kw = dict(prompt=PROMPT, negative_prompt=NEG, video=video, mask=mask, reference_images=refs[:1],
              conditioning_scale=[0.8, 1.2], height=H, width=W, num_frames=F, num_inference_steps=STEPS_2,
              guidance_scale=4.0, guidance_scale_2=2.0, max_sequence_length=MSL, output_type="latent")
    with torch.no_grad():
        ref = tp(latents=torch.from_numpy(lat), **kw).frames.numpy()
    out = ours(latents=lat, progress=False, **kw).frames
    scale = np.abs(ref).max()
    assert out.shape == ref.shape == lat.shape
    # fp32 both sides (measured: see the commit message)
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")
    print(f"two experts: max diff {np.abs(out - ref).max():.2e} of {scale:.2f}")
    one = ours(latents=lat, progress=False, **dict(kw, guidance_scale_2=4.0)).frames  # the other low-noise guidance
    assert np.abs(one - ref).max() > 1e-2 * scale


@pytest.mark.slow  # (three more pipelines compiled, on meshes)
def test_two_experts_meshes_match_one_device(tmp_path_factory):
    """cfg=2,ulysses=2 == one device; PipeFusion over both stacks with 2 warm-up steps on pipefusion=2: the warm-up
    starts again where transformer_2 takes over (step 1), so all three steps are exact and == one device (with the
    warm-up only at the start step 2 would run patched on stale K/V); with 1 warm-up step (steps 0 and 1 exact, step 2
    patched) pipefusion=2 == the same patched rule run on one device (pipefusion_patches=2)."""
    _, ours, folder = build_two(tmp_path_factory)
    video, mask, refs = conditions(seed=10)
    kw = dict(video=video, mask=mask, reference_images=refs[:1], conditioning_scale=[0.9, 1.1], height=H, width=W,
              num_inference_steps=STEPS_2, guidance_scale=4.0, guidance_scale_2=2.0, max_sequence_length=MSL,
              output_type="latent", progress=False, seed=11)
    exact = ours(PROMPT, NEG, **kw).frames
    atol = 1e-5 * np.abs(exact).max()
    for mesh, warmup in (("cfg=2,ulysses=2", 1), ("pipefusion=2", 2)):
        out = WanVACEPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=warmup)(
            PROMPT, NEG, **kw).frames
        np.testing.assert_allclose(out, exact, atol=atol, rtol=0, err_msg=mesh)
        print(f"two experts, {mesh} (warm-up {warmup}) vs one device: max diff {np.abs(out - exact).max():.2e} of "
              f"{np.abs(exact).max():.2f}")
    ref = WanVACEPipeline.from_pretrained(folder, pipefusion_patches=2)(PROMPT, NEG, **kw).frames
    assert np.abs(ref - exact).max() > 20 * atol  # the patched step really ran
    out = WanVACEPipeline.from_pretrained(folder, mesh="pipefusion=2")(PROMPT, NEG, **kw).frames
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    print(f"two experts, pipefusion=2 vs the sequential rule: max diff {np.abs(out - ref).max():.2e} "
          f"(patched vs exact: {np.abs(ref - exact).max():.2e})")


@pytest.mark.slow  # (the two-expert pipeline loaded and compiled again by the CLI)
def test_two_experts_cli(tmp_path_factory, tmp_path, capsys):
    """--guidance-scale-2 on a two-expert VACE folder (with --video / --reference-image) -> an mp4 of the video's
    frames; on a one-transformer VACE folder it is refused."""
    import imageio.v3 as iio

    from xdit_jax import cli

    _, _, folder = build_two(tmp_path_factory)
    video, _, refs = conditions(seed=12)
    (tmp_path / "video").mkdir()
    for i, f in enumerate(video):
        f.save(tmp_path / "video" / f"{i:03d}.png")
    refs[0].save(tmp_path / "ref.png")
    out = tmp_path / "out.mp4"
    rc = cli.main(["--model", str(folder), "--video", str(tmp_path / "video"), "--reference-image",
                   str(tmp_path / "ref.png"), "--guidance-scale", "4", "--guidance-scale-2", "2", "--steps",
                   str(STEPS_2), "--max-sequence-length", str(MSL), "--output", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert iio.imread(out, index=None).shape[:3] == (F, H, W)
    _, _, one = build(tmp_path_factory)
    rc = cli.main(["--model", str(one), "--video", str(tmp_path / "video"), "--guidance-scale-2", "2", "--output",
                   str(tmp_path / "b.mp4")])
    assert rc == 2 and "two-expert" in capsys.readouterr().err
