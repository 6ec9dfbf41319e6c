"""SkyReels-V2 pipelines from diffusers save_pretrained folders == diffusers' SkyReelsV2Pipeline and
SkyReelsV2DiffusionForcingPipeline (synchronous, asynchronous with the causal block mask), on one device and on meshes
(8 simulated CPU devices); diffusion forcing on PipeFusion (slow): warm-up iterations == one device, patched ones == the
displaced-patch rule run sequentially on one device, and == one device where the patches fall between causal blocks."""

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_skyreels_v2, save_torch_pipeline
from xdit_jax.pipelines.denoise import converted_folder
from xdit_jax.pipelines.skyreels_v2 import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Pipeline, timestep_matrix

PROMPT = "A small dog running on a beach at sunset."
H, W, STEPS, MSL = 32, 48, 3, 16  # 4 x 6 latents: 6 video tokens a latent frame

_BUILT = {}


def build(tmp_path_factory, variant: str):
    """(torch pipeline, our pipeline, our converted folder), made once per variant ("t2v" or "df")."""
    if variant not in _BUILT:
        tp = make_torch_skyreels_v2(variant=variant)
        folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(f"skyreels-{variant}"))
        converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))
        cls = SkyReelsV2DiffusionForcingPipeline if variant == "df" else SkyReelsV2Pipeline
        _BUILT[variant] = (tp, cls.from_pretrained(converted), converted)
    return _BUILT[variant]


def noise(frames, seed=0):
    """diffusers' DF pipeline takes no latents (its prepare_latents returns one value where the loop unpacks four):
    its own draw from a seeded generator, reproduced."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 4, (frames - 1) // 4 + 1, H // 8, W // 8)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()


def test_t2v_latents_match_diffusers(tmp_path_factory):
    """The latents (the decode is WanPipeline's, tested against diffusers in test_wan_pipeline; the video through
    the CLI in test_cli)."""
    tp, ours, _ = build(tmp_path_factory, "t2v")
    lat = noise(9)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, negative_prompt="blurry", num_frames=9, height=H, width=W, num_inference_steps=STEPS,
                 latents=torch.from_numpy(lat), max_sequence_length=MSL, output_type="latent").frames.numpy()
    out = ours(PROMPT, "blurry", num_frames=9, height=H, width=W, num_inference_steps=STEPS, latents=lat,
               max_sequence_length=MSL, progress=False, output_type="latent").frames
    assert out.shape == ref.shape == lat.shape
    # fp32: 3 UniPC steps with CFG (diffusers' default guidance 6); measured 1.7e-6 of 3.7
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


# (num_frames, ar_step, causal_block_size, fps): synchronous; asynchronous without the mask (blocks of one frame,
# 5 iterations of 3 steps over 3 frames); asynchronous with blocks of 2 frames (the causal mask: 4 latent frames,
# 2 blocks, 4 iterations) at 16 fps (the fps embedding's other row)
DF_CASES = [(9, 0, None, 24), (9, 1, 1, 24), (13, 1, 2, 16)]


@pytest.mark.parametrize("frames,ar_step,block,fps", DF_CASES)
def test_df_latents_match_diffusers(tmp_path_factory, frames, ar_step, block, fps):
    tp, ours, _ = build(tmp_path_factory, "df")
    kw = dict(num_frames=frames, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL,
              output_type="latent", ar_step=ar_step, causal_block_size=block, fps=fps, base_num_frames=frames,
              guidance_scale=5.0)
    tp.transformer._set_ar_attention(1)  # (diffusers keeps the last call's block size in the config)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames.numpy()
    out = ours(PROMPT, latents=noise(frames), progress=False, **kw).frames
    scale = np.abs(ref).max()
    # fp32 both sides over 3-5 iterations with CFG (measured 2.6e-6 of 3.7); a frame stepped at the wrong index,
    # a missing mask or diffusers' aliased last sample not replicated (0.08) are far outside
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


@pytest.mark.parametrize("ar_step,block,overlap", [
    pytest.param(0, 1, 5, marks=pytest.mark.slow),  # (slow: the (1, 2, 9) case covers it: async, truncation, 3 windows)
    (1, 2, 9)])
def test_df_long_video_matches_diffusers(tmp_path_factory, monkeypatch, ar_step, block, overlap):
    """The long-video loop: 21 frames (6 latent) in windows of 13 (4 latent) overlapping by 5 (2 latent: 2 windows)
    or 9 (3 latent, cut to one causal block of 2: 3 windows), the condition frames noised (addnoise_condition 20).
    diffusers draws each window's noise from the generator and the condition noise from torch's global one: both
    recorded and given to ours (its _window_noise / _condition_noise)."""
    import jax.numpy as jnp
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing as df_module

    tp, ours, _ = build(tmp_path_factory, "df")
    windows, cond = [], []
    draw = df_module.randn_tensor
    def record(*a, **k):  # (a copy: diffusers denoises the tensor it gets in place)
        windows.append(draw(*a, **k))
        return windows[-1].clone()

    monkeypatch.setattr(df_module, "randn_tensor", record)
    real_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: cond.append(real_like(x, **k)) or cond[-1])
    kw = dict(num_frames=21, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL,
              output_type="latent", ar_step=ar_step, causal_block_size=block, base_num_frames=13,
              overlap_history=overlap, addnoise_condition=20.0, guidance_scale=5.0)
    tp.transformer._set_ar_attention(1)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = tp(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames.numpy()
    monkeypatch.undo()
    assert ref.shape[2] == 6 and len(windows) == (2 if overlap == 5 else 3)
    per_window = len(cond) // (len(windows) - 1)  # (every window after the first has as many iterations here)
    table = jnp.asarray(np.stack([c.numpy() for c in cond]).reshape((len(windows) - 1, per_window) + cond[0].shape))
    monkeypatch.setattr(ours, "_window_noise", lambda key, k, shape: jnp.asarray(windows[k].numpy()))
    monkeypatch.setattr(ours, "_condition_noise", lambda key, k, n, shape: table[k - 1, n])
    ours._step_cache.clear()
    out = ours(PROMPT, latents=windows[0].numpy(), progress=False, **kw).frames
    ours._step_cache.clear()
    scale = np.abs(ref).max()
    # fp32, as test_df_latents_match_diffusers (measured 1.5e-6 / 1.8e-6 of 4.2); a wrong window plan, condition slice or noise
    # mix moves whole frames by O(1)
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale, rtol=0, err_msg=f"max |latent| {scale}")


def test_timestep_matrix_as_diffusers(tmp_path_factory):
    """The host schedule == diffusers' generate_timestep_matrix, also where the window is shorter than the video
    (the long-video loop's case: sliding valid intervals) and with frames already done."""
    tp, ours, _ = build(tmp_path_factory, "df")
    template = torch.tensor([999, 941, 800, 612, 400], dtype=torch.int64)
    for args in [(6, 6, 0, 0, 1), (6, 6, 2, 0, 3), (10, 10, 2, 0, 2), (12, 6, 3, 0, 3), (8, 8, 1, 4, 2)]:
        ref = tp.generate_timestep_matrix(args[0], template, args[1], args[2], args[3], args[4])
        got = timestep_matrix(args[0], template.numpy(), *args[1:])
        for r, g in zip(ref[:3], got[:3]):
            np.testing.assert_array_equal(g, r.numpy(), err_msg=str(args))
        assert got[3] == ref[3], args
    with pytest.raises(ValueError, match="at least 3"):
        timestep_matrix(12, template.numpy(), 4, 1, 0, 2)


def test_df_meshes_match_one_device(tmp_path_factory):
    """Asynchronous diffusion forcing with the causal mask (blocks of 2 frames: 12 tokens, cut across the shards) on
    cfg=2,ring=2,ulysses=2 and ulysses=3 (24 tokens over 3)."""
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(num_frames=13, height=H, width=W, num_inference_steps=2, latents=noise(13, 2), max_sequence_length=MSL,
              progress=False, output_type="latent", ar_step=1, causal_block_size=2, base_num_frames=13)
    ref = df(PROMPT, **kw).frames
    for mesh in ["cfg=2,ring=2,ulysses=2", "ulysses=3"]:
        out = SkyReelsV2DiffusionForcingPipeline.from_pretrained(df_folder, mesh=mesh)(PROMPT, **kw).frames
        np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0, err_msg=mesh)


@pytest.mark.slow  # the T2V step is WanPipeline's (its meshes: test_wan_pipeline); the SkyReels transformer's blocks
def test_t2v_mesh_matches_one_device(tmp_path_factory):  # over these axes: test_df_meshes_match_one_device
    _, t2v, t2v_folder = build(tmp_path_factory, "t2v")
    kw = dict(num_frames=9, height=H, width=W, num_inference_steps=2, latents=noise(9, 1), max_sequence_length=MSL,
              progress=False, output_type="latent")
    ref = t2v(PROMPT, **kw).frames
    out = SkyReelsV2Pipeline.from_pretrained(t2v_folder, mesh="cfg=2,ring=2,ulysses=2")(PROMPT, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    # PipeFusion (Wan's): with 2 exact warm-up steps of 2 it equals one device
    out = SkyReelsV2Pipeline.from_pretrained(t2v_folder, mesh="pipefusion=2", pipefusion_warmup_steps=2)(
        PROMPT, **kw).frames
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_bad_input(tmp_path_factory):
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(height=H, width=W, num_inference_steps=2, max_sequence_length=MSL, progress=False)
    with pytest.raises(ValueError, match="overlap_history"):
        df(PROMPT, num_frames=17, base_num_frames=9, **kw)
    with pytest.raises(ValueError, match="must leave new frames"):
        df(PROMPT, num_frames=17, base_num_frames=9, overlap_history=9, **kw)
    with pytest.raises(ValueError, match="a window of 3 latent frames is not a multiple of causal_block_size=2"):
        df(PROMPT, num_frames=21, base_num_frames=9, overlap_history=5, causal_block_size=2, **kw)
    with pytest.raises(ValueError, match="not a multiple of causal_block_size=2"):
        df(PROMPT, num_frames=9, base_num_frames=9, ar_step=1, causal_block_size=2, **kw)
    with pytest.raises(ValueError, match="ar_step"):
        df(PROMPT, num_frames=9, base_num_frames=9, ar_step=-1, **kw)
    with pytest.raises(ValueError, match="causal_block_size"):
        df(PROMPT, num_frames=9, base_num_frames=9, causal_block_size=0, **kw)
    with pytest.raises(ValueError, match="pipefusion=3 is more stages than the model's 2 layers"):
        SkyReelsV2DiffusionForcingPipeline.from_pretrained(df_folder, mesh="pipefusion=3")
    with pytest.raises(ValueError, match="SkyReelsV2DiffusionForcingPipeline"):
        SkyReelsV2Pipeline.from_pretrained(df_folder)


@pytest.mark.slow  # (default run: its parts, WanImageToVideoPipeline in test_wan21_i2v_pipeline and the SkyReels
def test_i2v_matches_diffusers(tmp_path_factory):  # transformer with image states in test_skyreels_transformer)
    """SkyReelsV2ImageToVideoPipeline (Wan 2.1 I2V's structure, SkyReels' CLIPVisionModelWithProjection and
    CLIPProcessor folders): the latents == diffusers' (512 caption tokens: diffusers' attention splits the image states
    from the text assuming 512)."""
    from diffusers.utils.torch_utils import randn_tensor

    from tests.fixtures import random_image
    from xdit_jax.pipelines.skyreels_v2 import SkyReelsV2ImageToVideoPipeline

    tp = make_torch_skyreels_v2(variant="i2v")
    folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("skyreels-i2v")),
                              cache_dir=tmp_path_factory.mktemp("cache"))
    ours = SkyReelsV2ImageToVideoPipeline.from_pretrained(folder)
    image = random_image(0, (40, 24))  # (another size: resized for the VAE, cropped for CLIP)
    lat = randn_tensor((1, 4, 3, H // 8, W // 8), generator=torch.Generator().manual_seed(3)).numpy()
    kw = dict(num_frames=9, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=512,
              output_type="latent", guidance_scale=5.0)
    with torch.no_grad():
        ref = tp(image=image, prompt=PROMPT, negative_prompt="blurry", latents=torch.from_numpy(lat), **kw)
    ref = ref.frames.numpy()
    out = ours(image, PROMPT, "blurry", latents=lat, progress=False, **kw).frames
    # fp32, 3 UniPC steps with CFG (measured 2.9e-6 of 3.7)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("frames,ar_step,block,extra", [
    (9, 0, 1, {}),  # one-frame blocks: the image's latent frame held (pre-ready) through the schedule
    # (slow, both: the default case covers the image's path; the blocks, the windows and the condition noise are
    # test_df_latents_match_diffusers' and test_df_long_video_matches_diffusers')
    # blocks of 2 frames: diffusers then denoises the image's frame with its block (its pre-ready count is in blocks)
    pytest.param(13, 1, 2, {}, marks=pytest.mark.slow),
    # a long video (21 frames in windows of 13 overlapping by 5: two full windows; diffusers' DF I2V fails on a shorter
    # last window, its schedule made for base_num_frames), the image's frame noised by addnoise_condition
    pytest.param(21, 1, 1, dict(base_num_frames=13, overlap_history=5, addnoise_condition=20.0),
                 marks=pytest.mark.slow),
    # a last image: its latent frame appended at timestep 0 (diffusers' latent output keeps it: compared without);
    # (slow: the default case covers the image's path; this adds the appended frame, measured 1.9e-6 of 3.8)
    pytest.param(9, 1, 2, dict(last_image=1), marks=pytest.mark.slow)])
def test_df_i2v_matches_diffusers(tmp_path_factory, monkeypatch, frames, ar_step, block, extra):
    """SkyReelsV2DiffusionForcingImageToVideoPipeline: the image's VAE latent frame as the first condition frame."""
    import jax.numpy as jnp
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_i2v as df_i2v

    from tests.fixtures import random_image
    from xdit_jax.pipelines.skyreels_v2 import SkyReelsV2DiffusionForcingImageToVideoPipeline

    if "df-i2v" not in _BUILT:
        tp = make_torch_skyreels_v2(variant="df-i2v")
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("skyreels-df-i2v")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["df-i2v"] = (tp, SkyReelsV2DiffusionForcingImageToVideoPipeline.from_pretrained(folder), folder)
    tp, ours, _ = _BUILT["df-i2v"]
    windows, cond = [], []
    draw = df_i2v.randn_tensor

    def record(*a, **k):  # (a copy: diffusers denoises the tensor it gets in place)
        windows.append(draw(*a, **k))
        return windows[-1].clone()

    monkeypatch.setattr(df_i2v, "randn_tensor", record)
    real_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: cond.append(real_like(x, **k)) or cond[-1])
    image = random_image(0, (40, 24))
    if "last_image" in extra:
        extra = dict(extra, last_image=random_image(extra["last_image"], (W, H)))
    kw = dict(num_frames=frames, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL,
              output_type="latent", ar_step=ar_step, causal_block_size=block, guidance_scale=5.0,
              **dict(dict(base_num_frames=frames), **extra))
    tp.transformer._set_ar_attention(1)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = tp(image=image, prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kw).frames.numpy()
    monkeypatch.undo()
    if "last_image" in extra:
        ref = ref[:, :, :-1]
    if cond:  # (per window, told apart by its condition frames: the image's 1, then the overlap's 2)
        tables = {f: jnp.asarray(np.stack([c.numpy() for c in cond if c.shape[2] == f]))
                  for f in {c.shape[2] for c in cond}}
        assert len(tables) == len(windows)
        monkeypatch.setattr(ours, "_condition_noise", lambda key, k, n, shape: tables[shape[2]][n])
    monkeypatch.setattr(ours, "_window_noise", lambda key, k, shape: jnp.asarray(windows[k].numpy()))
    ours._step_cache.clear()
    out = ours(image, PROMPT, latents=windows[0].numpy(), progress=False, **kw).frames
    ours._step_cache.clear()
    # fp32, as test_df_latents_match_diffusers, plus the VAE encode of the image
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("frames", [13, pytest.param(21, marks=pytest.mark.slow)])  # (slow: 2 windows; the loop's
def test_df_v2v_matches_diffusers(tmp_path_factory, monkeypatch, frames):  # windows: test_df_long_video_*)
    """SkyReelsV2DiffusionForcingVideoToVideoPipeline: a 9-frame video's last 5 frames (2 latent frames) continued by
    windows of 13 frames (4 latent): one window (13) or two (21); the latents and the video (the given frames first)."""
    import jax.numpy as jnp
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_v2v as df_v2v

    from tests.fixtures import random_image
    from xdit_jax.pipelines.skyreels_v2 import SkyReelsV2DiffusionForcingVideoToVideoPipeline

    if "df-v2v" not in _BUILT:
        tp = make_torch_skyreels_v2(variant="df-v2v")
        folder = converted_folder(save_torch_pipeline(tp, tmp_path_factory.mktemp("skyreels-df-v2v")),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        _BUILT["df-v2v"] = (tp, SkyReelsV2DiffusionForcingVideoToVideoPipeline.from_pretrained(folder), folder)
    tp, ours, _ = _BUILT["df-v2v"]
    windows = []
    draw = df_v2v.randn_tensor

    def record(*a, **k):  # (a copy: diffusers denoises the tensor it gets in place)
        windows.append(draw(*a, **k))
        return windows[-1].clone()

    monkeypatch.setattr(df_v2v, "randn_tensor", record)
    video = [random_image(i, (W, H)) for i in range(9)]
    kw = dict(num_frames=frames, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL,
              ar_step=1, causal_block_size=1, base_num_frames=13, overlap_history=5, guidance_scale=5.0)
    tp.transformer._set_ar_attention(1)
    with torch.no_grad():
        ref = tp(video=video, prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
                 **kw).frames.numpy()
    monkeypatch.undo()
    monkeypatch.setattr(ours, "_window_noise", lambda key, k, shape: jnp.asarray(windows[k].numpy()))
    ours._step_cache.clear()
    out = ours(video, PROMPT, latents=windows[0].numpy(), progress=False, output_type="latent", **kw).frames
    assert out.shape == ref.shape and out.shape[2] == (frames - 1) // 4 + 1
    # fp32, as test_df_latents_match_diffusers, plus the VAE encode of the video's tail
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    if frames == 13:  # the video: the given frames, then the decoded windows
        vid = ours(video, PROMPT, latents=windows[0].numpy(), progress=False, **kw).frames
        assert vid.shape == (1, 9 + frames, H, W, 3)
        np.testing.assert_allclose(vid[0, 0], np.asarray(video[0]) / 255, atol=1 / 255 + 1e-6)  # (Lanczos at 1:1)
    ours._step_cache.clear()


# PipeFusion in diffusion forcing: asynchronous with the causal mask (blocks of 2 frames, 12 tokens; 4 latent frames,
# 24 tokens: 2 patches of 16, the first cutting block 1), 3 steps (4 iterations)
PF_KW = dict(num_frames=13, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MSL, progress=False,
             output_type="latent", ar_step=1, causal_block_size=2, base_num_frames=13, guidance_scale=5.0)


def _pf_pipe(folder, **kw):
    return SkyReelsV2DiffusionForcingPipeline.from_pretrained(folder, **kw)


@pytest.mark.slow
def test_df_pipefusion_warmup_iterations_equal_one_device(tmp_path_factory):
    """Every iteration a warm-up one (the whole sequence at once, the buffered keys masked by their blocks) == one
    device, on pipefusion=2 and pipefusion=2,ring=2 (the segment ids in the ring's buffer order)."""
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(PF_KW, latents=noise(13, 4))
    ref = df(PROMPT, **kw).frames
    for mesh in ["pipefusion=2", "pipefusion=2,ring=2"]:
        out = _pf_pipe(df_folder, mesh=mesh, pipefusion_warmup_steps=100)(PROMPT, **kw).frames
        # fp32, only summation order differs (measured <= 1.8e-6 of 3.3); as the other meshes
        np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0, err_msg=mesh)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["pipefusion=2", "cfg=2,pipefusion=2,ulysses=2", "pipefusion=2,ring=2"])
def test_df_pipefusion_patched_equal_sequential_reference(tmp_path_factory, mesh):
    """One exact iteration, then patched ones (each patch's queries: this iteration's keys of the patches up to its
    own, the last iteration's after it, both masked by the causal blocks) == the same rule run sequentially on one
    device (2 patches); and the rule differs from one device (a boundary cuts block 1: its stale keys are visible)."""
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(PF_KW, latents=noise(13, 4))
    if "seq" not in _BUILT:
        _BUILT["seq"] = (df(PROMPT, **kw).frames, _pf_pipe(df_folder, pipefusion_patches=2)(PROMPT, **kw).frames)
    one, seq = _BUILT["seq"]
    out = _pf_pipe(df_folder, mesh=mesh, pipefusion_patches=2)(PROMPT, **kw).frames
    scale = np.abs(one).max()
    # measured <= 1.3e-6 of 3.3 (0 on pipefusion=2); the rule itself differs from one device by 5.2e-3
    np.testing.assert_allclose(out, seq, atol=2e-5 * scale, rtol=0)
    assert np.abs(seq - one).max() > 1e-3 * scale


@pytest.mark.slow
def test_df_pipefusion_aligned_patches_are_exact(tmp_path_factory):
    """Patch boundaries between causal blocks: 29 frames (8 latent, 48 tokens) in blocks of 4 frames (24 tokens), 2
    patches of 24: a patch's queries see only their own block and the earlier ones, all this iteration's, so the
    patched iterations equal one device (the stale K/V of the later patch are masked)."""
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(PF_KW, num_frames=29, base_num_frames=29, causal_block_size=4, latents=noise(29, 5))
    ref = df(PROMPT, **kw).frames
    out = _pf_pipe(df_folder, mesh="pipefusion=2", pipefusion_patches=2)(PROMPT, **kw).frames
    # measured 1.7e-6 of 3.4 (3 patches, which cut the blocks, differ from one device by 6.9e-3)
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_df_pipefusion_long_video(tmp_path_factory):
    """The long-video loop on pipefusion=2 (3 windows of 4 latent frames, condition frames noised): each window's own
    buffers and warm-up iteration; == the same rule run sequentially on one device."""
    _, df, df_folder = build(tmp_path_factory, "df")
    kw = dict(PF_KW, num_frames=21, overlap_history=9, addnoise_condition=20.0, latents=noise(13, 6))
    seq = _pf_pipe(df_folder, pipefusion_patches=2)(PROMPT, **kw).frames
    out = _pf_pipe(df_folder, mesh="pipefusion=2")(PROMPT, **kw).frames
    assert out.shape[2] == 6
    # measured 0 of 3.1 (the rule differs from one device by 7.4e-3 here)
    np.testing.assert_allclose(out, seq, atol=2e-5 * np.abs(seq).max(), rtol=0)
