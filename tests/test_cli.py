"""scripts/generate.py: writes a playable video of the requested size; bad input fails fast and clearly."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xdit_jax import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdit_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("XDIT_JAX_CACHE", str(cache))


def read_video(path):
    import imageio.v3 as iio

    return iio.imread(path)


def test_generate_mp4(tmp_path, capsys):
    out = tmp_path / "dog.mp4"
    rc = cli.main(["--output", str(out), "--steps", "2", "--num-frames", "9", "--height", "32", "--width", "48",
                   "--no-progress", "--json"])
    assert rc == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 48, 3)
    assert frames.std() > 1  # real content, not a constant picture
    text = capsys.readouterr().out
    assert "text_encoding" in text and "denoising" in text and "decoding" in text and "peak device memory" in text


def test_generate_png_folder_and_batch(tmp_path):
    """Two prompts, two videos each, on data=3 (4 samples: the transformer's batch padded to 6)."""
    out = tmp_path / "frames"
    rc = cli.main(["--output", str(out), "--steps", "1", "--num-frames", "1", "--height", "32", "--width", "32",
                   "--prompt", "a cat", "--prompt", "a dog", "--num-videos-per-prompt", "2", "--no-progress",
                   "--mesh", "data=3", "--vae-slicing", "--vae-tiling"])
    assert rc == 0
    assert not (tmp_path / "frames_4").exists()
    for i in range(4):
        pngs = sorted((tmp_path / f"frames_{i}").glob("*.png"))
        assert len(pngs) == 1


def test_generate_pipefusion(tmp_path):
    """xDiT's flags: two stages, two patches, one exact warm-up step then a patched one."""
    out = tmp_path / "pf.gif"
    rc = cli.main(["--output", str(out), "--steps", "2", "--num-frames", "9", "--height", "32", "--width", "48",
                   "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "2", "--warmup_steps", "1",
                   "--no-progress"])
    assert rc == 0 and read_video(out).shape[0] == 9


def test_generate_pixart_image(tmp_path, capsys):
    """The tiny PixArt-Sigma: a .png of the requested size, on a sequence-parallel x CFG mesh."""
    import imageio.v3 as iio

    out = tmp_path / "cat.png"
    rc = cli.main(["--model", "tiny-pixart", "--output", str(out), "--steps", "2", "--height", "32", "--width", "48",
                   "--mesh", "cfg=2,ulysses=2", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (32, 48, 3) and image.std() > 1
    assert '"model_family": "pixart"' in capsys.readouterr().out


@pytest.mark.slow
def test_generate_cogview3_image(tmp_path, capsys):
    """The tiny CogView3-Plus: a .png of the requested size with a negative prompt, on a CFG x ring mesh."""
    import imageio.v3 as iio

    out = tmp_path / "c.png"
    rc = cli.main(["--model", "tiny-cogview3", "--output", str(out), "--height", "32", "--width", "48",
                   "--negative-prompt", "blurry", "--mesh", "cfg=2,ring=2", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (32, 48, 3) and image.std() > 1
    assert '"model_family": "cogview3"' in capsys.readouterr().out


def test_generate_sana_image(tmp_path, capsys):
    """The tiny SANA (Gemma 2, linear attention, GLUMBConv, DC-AE): a .png of the requested size on a CFG x ring
    mesh (the linear attention's psum and the grid convolution's halo over ring)."""
    import imageio.v3 as iio

    out = tmp_path / "s.png"
    rc = cli.main(["--model", "tiny-sana", "--output", str(out), "--steps", "2", "--height", "32", "--width", "48",
                   "--mesh", "cfg=2,ring=2", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (32, 48, 3) and image.std() > 1
    assert '"model_family": "sana"' in capsys.readouterr().out


def test_generate_sana_sprint_image(tmp_path, capsys):
    """The tiny Sana Sprint (guidance embedded, SCM's default 2 steps) on data=2,ulysses=2 with two prompts; a cfg
    axis and a negative prompt refused before loading (no CFG batch)."""
    import imageio.v3 as iio

    out = tmp_path / "s.png"
    rc = cli.main(["--model", "tiny-sana-sprint", "--output", str(out), "--height", "32", "--width", "48",
                   "--prompt", "A cat.", "--prompt", "A dog.", "--mesh", "data=2,ulysses=2", "--no-progress", "--json"])
    assert rc == 0
    paths = sorted(tmp_path.glob("s*.png"))
    assert len(paths) == 2 and all(iio.imread(p).shape == (32, 48, 3) for p in paths)
    text = capsys.readouterr().out
    assert '"model_family": "sana-sprint"' in text
    for extra, needle in [(["--mesh", "cfg=2"], "embeds its guidance"), (["--negative-prompt", "blurry"], "negative prompt")]:
        rc = cli.main(["--model", "tiny-sana-sprint", "--output", str(tmp_path / "x.png"), "--no-progress", *extra])
        assert rc == 2 and needle in capsys.readouterr().err


# Slow (the default run's time): the CLI's PipeFusion flags run in test_generate_pipefusion, SANA's PipeFusion
# numerics in tests/test_sana_pipefusion.py
@pytest.mark.slow
def test_generate_sana_image_pipefusion(tmp_path, capsys):
    """The tiny SANA on pipefusion=2 (the linear attention's and the grid conv's buffers): one warm-up step, then a
    patched one."""
    import imageio.v3 as iio

    rc = cli.main(["--model", "tiny-sana", "--output", str(tmp_path / "p.png"), "--steps", "2", "--height", "32",
                   "--width", "48", "--mesh", "pipefusion=2", "--no-progress"])
    assert rc == 0 and iio.imread(tmp_path / "p.png").shape == (32, 48, 3)
    assert "PipeFusion: 2 stage(s), 2 patches" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_sana_video(tmp_path, capsys):
    """The tiny SANA-Video (Gemma 2, RoPE'd linear attention, per-frame and frame convs, Wan's VAE): a 9-frame .mp4 on a
    CFG x ring x ulysses mesh, on pipefusion=2, and with --image (SanaImageToVideoPipeline). (Slow: making the tiny
    folder alone takes ~10 s.)"""
    import imageio.v3 as iio

    out = tmp_path / "v.mp4"
    rc = cli.main(["--model", "tiny-sana-video", "--output", str(out), "--mesh", "cfg=2,ring=2,ulysses=2",
                   "--no-progress", "--json"])
    assert rc == 0
    assert iio.imread(out).shape == (9, 32, 64, 3)
    assert '"model_family": "sana-video"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-sana-video", "--output", str(tmp_path / "p.mp4"), "--mesh", "pipefusion=2",
                   "--no-progress"])
    assert rc == 0 and iio.imread(tmp_path / "p.mp4").shape == (9, 32, 64, 3)
    assert "PipeFusion: 2 stage(s), 2 patches" in capsys.readouterr().err
    image = tmp_path / "first.png"  # --image: SanaImageToVideoPipeline on the same folder
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    rc = cli.main(["--model", "tiny-sana-video", "--output", str(tmp_path / "i.mp4"), "--image", str(image),
                   "--no-progress"])
    assert rc == 0 and iio.imread(tmp_path / "i.mp4").shape == (9, 32, 64, 3)


def test_generate_lumina2_image(tmp_path, capsys):
    """The tiny Lumina 2 (Gemma 2 with the system prompt, Z-Image's blocks with grouped K/V, FLUX's VAE): a .png at the
    tiny default size (sample_size 8 x 8 = 64) with CFG and a negative prompt, on one device (the meshes:
    tests/test_lumina2_pipeline.py); cfg=2 without guidance (> 1) refused before loading."""
    import imageio.v3 as iio

    out = tmp_path / "l.png"
    rc = cli.main(["--model", "tiny-lumina2", "--output", str(out), "--negative-prompt", "blurry", "--no-progress",
                   "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (64, 64, 3) and image.std() > 1
    assert '"model_family": "lumina2"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-lumina2", "--output", str(tmp_path / "n.png"), "--mesh", "cfg=2",
                   "--guidance-scale", "1", "--no-progress"])
    assert rc == 2 and "guidance_scale > 1" in capsys.readouterr().err


def test_generate_flux2_klein_image(tmp_path, capsys):
    """The tiny FLUX.2 klein (Qwen3's stacked hidden states, shared modulation, AutoencoderKLFlux2): a .png of the
    requested size with CFG over cfg x ulysses=3 (uneven: 2 heads, 12 image + 32 text tokens padded)."""
    import imageio.v3 as iio

    out = tmp_path / "k.png"
    rc = cli.main(["--model", "tiny-flux2-klein", "--output", str(out), "--height", "48", "--width", "64",
                   "--mesh", "cfg=2,ulysses=3", "--negative-prompt", "blurry", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 64, 3) and image.std() > 1
    assert '"model_family": "flux2"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-flux2-klein", "--output", str(tmp_path / "b.png"), "--height", "40"])
    assert rc == 2 and "multiples of 16" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_flux2_klein_reference_image(tmp_path):
    """--image: FLUX.2 klein's reference image (80 x 72: cropped to 80 x 64), on one device."""
    import imageio.v3 as iio

    ref = tmp_path / "ref.png"
    iio.imwrite(ref, np.random.default_rng(0).integers(0, 256, (72, 80, 3), dtype=np.uint8))
    rc = cli.main(["--model", "tiny-flux2-klein", "--output", str(tmp_path / "r.png"), "--image", str(ref),
                   "--height", "64", "--width", "80", "--no-progress"])
    assert rc == 0 and iio.imread(tmp_path / "r.png").shape == (64, 80, 3)


@pytest.mark.slow
def test_generate_flux2_dev_folder(tmp_path, capsys):
    """A diffusers FLUX.2-dev folder (Flux2Pipeline, tiny random Mistral 3) runs as the flux2 family on ulysses=2;
    cfg=2 is refused before loading (its guidance is embedded)."""
    import imageio.v3 as iio

    from tests.fixtures import make_torch_flux2_dev, save_torch_pipeline

    folder = save_torch_pipeline(make_torch_flux2_dev(), tmp_path / "dev")
    rc = cli.main(["--model", str(folder), "--output", str(tmp_path / "o.png"), "--height", "64", "--width", "64",
                   "--steps", "2", "--max-sequence-length", "32", "--mesh", "ulysses=2", "--no-progress"])
    assert rc == 0 and iio.imread(tmp_path / "o.png").shape == (64, 64, 3)
    rc = cli.main(["--model", str(folder), "--output", str(tmp_path / "p.png"), "--mesh", "cfg=2"])
    assert rc == 2 and "embeds its guidance" in capsys.readouterr().err


def test_generate_hunyuandit_image(tmp_path):
    """The tiny HunyuanDiT (two text encoders, long skips): a .png, on one device (the CLI on meshes: the PixArt,
    Qwen-Image, SANA, Mochi cases; HunyuanDiT's meshes: tests/test_hunyuandit_pipeline.py)."""
    import imageio.v3 as iio

    out = tmp_path / "h.png"
    rc = cli.main(["--model", "tiny-hunyuandit", "--output", str(out), "--steps", "2", "--height", "32",
                   "--width", "32", "--guidance-rescale", "0.5", "--no-progress"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (32, 32, 3) and image.std() > 1


def test_generate_mochi_video(tmp_path, capsys):
    """The tiny Mochi (two streams, caption held whole): an .mp4 of 6k+1 frames on a CFG x USP mesh."""
    import imageio.v3 as iio

    out = tmp_path / "m.mp4"
    rc = cli.main(["--model", "tiny-mochi", "--output", str(out), "--steps", "2", "--num-frames", "13",
                   "--mesh", "cfg=2,ring=2,ulysses=2", "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (13, 32, 48, 3) and video.std() > 1  # the tiny defaults: 32 x 48
    assert '"model_family": "mochi"' in capsys.readouterr().out


def test_generate_wan_video(tmp_path, capsys):
    """The tiny Wan 2.1 (UMT5, UniPC, causal VAE): an .mp4 of 4k+1 frames on a PipeFusion x ulysses mesh (the second
    step patched)."""
    import imageio.v3 as iio

    out = tmp_path / "w.mp4"
    rc = cli.main(["--model", "tiny-wan", "--output", str(out), "--steps", "2", "--mesh", "pipefusion=2,ulysses=2",
                   "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (9, 32, 48, 3) and video.std() > 1  # the tiny defaults: 9 x 32 x 48
    assert '"model_family": "wan"' in capsys.readouterr().out


def test_generate_ltx_image_to_video(tmp_path, capsys):
    """The tiny LTX-Video with --image (LTXImageToVideoPipeline on the text-to-video folder: the VAE's encoder) and
    --fps (its frame_rate), on one device (its meshes and the text-to-video path: tests/test_ltx.py)."""
    import imageio.v3 as iio
    from PIL import Image

    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "l.mp4"
    rc = cli.main(["--model", "tiny-ltx", "--output", str(out), "--image", str(image), "--fps", "24",
                   "--guidance-rescale", "0.5", "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (9, 64, 96, 3) and video.std() > 1  # the tiny defaults: 9 x 64 x 96
    assert '"model_family": "ltx"' in capsys.readouterr().out


def test_generate_hunyuan_video15_video(tmp_path, capsys):
    """The tiny HunyuanVideo-1.5 (Qwen2.5-VL + ByT5 glyph text, the guider's CFG with --guidance-rescale, the
    DC-AE-style causal VAE): an .mp4 of 4k+1 frames, CFG's two passes over cfg and the video tokens over ulysses=3
    (uneven)."""
    import imageio.v3 as iio

    out = tmp_path / "h.mp4"
    rc = cli.main(["--model", "tiny-hunyuanvideo15", "--prompt", 'A sign that reads "OPEN".', "--output", str(out),
                   "--mesh", "cfg=2,ulysses=3", "--guidance-rescale", "0.5", "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (5, 32, 48, 3) and video.std() > 1  # the tiny defaults: 5 x 32 x 48, 2 steps
    assert '"model_family": "hunyuan_video15"' in capsys.readouterr().out


@pytest.mark.slow  # (~15 s; the I2V pipeline's parity: tests/test_hunyuan_video15.py)
def test_generate_hunyuan_video15_image_to_video_random_weights(tmp_path, capsys):
    """A tiny HunyuanVideo-1.5 I2V configs folder with --random-weights and --image: the video takes the image's
    bucket (40 x 60 -> 48 x 72); --height is refused (the size comes from the image)."""
    import imageio.v3 as iio
    from PIL import Image

    from xdit_jax import tiny

    folder = tiny.write_hunyuan_video15_i2v_configs(tmp_path / "i2v")
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "i.mp4"
    base = ["--model", str(folder), "--random-weights", "--image", str(image), "--steps", "2", "--num-frames", "5",
            "--max-sequence-length", "32", "--no-progress"]
    assert cli.main(base + ["--output", str(out), "--height", "48"]) == 2
    assert "sizes the video from the image" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(out), "--json"]) == 0
    video = iio.imread(out)
    assert video.shape == (5, 48, 72, 3)
    assert '"model_family": "hunyuan_video15"' in capsys.readouterr().out


def test_generate_skyreels_v2_diffusion_forcing_video(tmp_path, capsys):
    """The tiny SkyReels-V2 diffusion forcing model: asynchronous (--ar-step 1) with causal blocks of 3 latent frames
    (the 9 frames' 3: one block) and the fps embedding's 16 fps row, on one device (its meshes and long videos:
    tests/test_skyreels_v2_pipeline.py)."""
    import imageio.v3 as iio

    out = tmp_path / "s.mp4"
    rc = cli.main(["--model", "tiny-skyreels-v2", "--output", str(out), "--steps", "2", "--ar-step", "1",
                   "--causal-block-size", "3", "--fps", "16", "--no-progress", "--json"])
    assert rc == 0
    video = iio.imread(out)
    assert video.shape == (9, 32, 48, 3) and video.std() > 1  # the tiny defaults: 9 x 32 x 48
    assert '"model_family": "skyreels_v2"' in capsys.readouterr().out


def test_generate_skyreels_v2_video_extension(tmp_path, capsys):
    """--video on a diffusion forcing checkpoint: diffusers' video-to-video pipeline (the same weights) extends a gif of
    9 frames by the tiny default's 9, conditioned on its last 5 (--overlap-history); the output starts with the video
    (its pipeline's parity: tests/test_skyreels_v2_pipeline.py)."""
    import imageio.v3 as iio

    given = (np.random.default_rng(0).random((9, 32, 48, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "in.gif", given, duration=60, loop=0)
    assert len(cli.read_video(tmp_path / "in.gif")) == 9
    (tmp_path / "frames").mkdir()
    for i in (2, 0, 1):  # a folder of frames: read in name order
        iio.imwrite(tmp_path / "frames" / f"f{i}.png", given[i])
    np.testing.assert_array_equal(np.stack(cli.read_video(tmp_path / "frames")), given[:3])
    out = tmp_path / "x.mp4"
    rc = cli.main(["--model", "tiny-skyreels-v2", "--video", str(tmp_path / "in.gif"), "--overlap-history", "5",
                   "--output", str(out), "--steps", "2", "--no-progress"])
    assert rc == 0
    assert iio.imread(out).shape == (18, 32, 48, 3) and "18 frames" in capsys.readouterr().out


# Slow (the default run's time): the CLI's image-to-video path with --random-weights runs in
# test_generate_cogvideox_image_to_video_random_weights, Wan 2.2 I2V / TI2V in tests/test_wan22_pipeline.py
@pytest.mark.slow
def test_generate_wan22_image_to_video_random_weights(tmp_path, capsys):
    """A tiny Wan 2.2 I2V-A14B layout (WanImageToVideoPipeline: two experts taking latents + mask + image latents)
    from configs alone, random weights (the VAE's encoder too): --image resized to the video, --guidance-scale-2
    for the low-noise steps (2 steps at t = 999, 750: one each), on a cfg=2 mesh; a TI2V-5B layout with --image."""
    import json
    import shutil

    import imageio.v3 as iio
    import numpy as np

    from xdit_jax import tiny

    configs = tmp_path / "wan22"
    configs.mkdir()
    tiny.write_configs(configs, "wan")
    transformer = json.loads((configs / "transformer" / "config.json").read_text())
    (configs / "transformer" / "config.json").write_text(json.dumps({**transformer, "in_channels": 12}))
    shutil.copytree(configs / "transformer", configs / "transformer_2")
    index = json.loads((configs / "model_index.json").read_text())
    index.update(_class_name="WanImageToVideoPipeline", transformer_2=index["transformer"], boundary_ratio=0.875)
    (configs / "model_index.json").write_text(json.dumps(index))
    image = tmp_path / "first.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    out = tmp_path / "w.mp4"
    common = ["--model", str(configs), "--random-weights", "--steps", "2", "--height", "32", "--width", "48",
              "--num-frames", "5", "--max-sequence-length", "16", "--no-progress"]
    rc = cli.main(common + ["--output", str(out), "--image", str(image), "--guidance-scale", "4",
                            "--guidance-scale-2", "3", "--mesh", "cfg=2"])
    assert rc == 0
    assert iio.imread(out).shape == (5, 32, 48, 3)
    with pytest.raises(SystemExit) as e:  # an image-to-video model without --image: refused
        raise SystemExit(cli.main(common + ["--output", str(tmp_path / "y.mp4")]))
    assert e.value.code == 2 and "give the first frame with --image" in capsys.readouterr().err
    # TI2V-5B's folder (a WanPipeline with expand_timesteps, the Wan 2.2 VAE): --image picks image-to-video
    ti2v = tmp_path / "ti2v"
    ti2v.mkdir()
    tiny.write_configs(ti2v, "wan")
    (ti2v / "vae" / "config.json").write_text(json.dumps(dict(tiny.WAN22_VAE, num_res_blocks=1)))
    index = json.loads((ti2v / "model_index.json").read_text())
    (ti2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    rc = cli.main(common[:1] + [str(ti2v)] + common[2:] + ["--output", str(tmp_path / "t.mp4"), "--image", str(image),
                                                           "--mesh", "ulysses=2"])
    assert rc == 0 and iio.imread(tmp_path / "t.mp4").shape == (5, 32, 48, 3)
    # Wan 2.1 FLF2V's layout (CLIP image encoder, its processor's config, a position table over two images' states)
    # (its run end to end: test_benchmark's --e2e of the same folder)
    flf2v = tiny.write_wan_i2v_configs(tmp_path / "flf2v", flf2v=True)
    with pytest.raises(SystemExit) as e:  # FLF2V without --last-image: refused before loading
        raise SystemExit(cli.main(common[:1] + [str(flf2v)] + common[2:] + ["--output", str(tmp_path / "y.mp4"),
                                                                            "--image", str(image)]))
    assert e.value.code == 2 and "give last_image too" in capsys.readouterr().err
    for argv, needle in [(["--model", "tiny-wan", "--guidance-scale-2", "3"], "two-expert Wan 2.2 A14B model"),
                         (["--model", "tiny-wan", "--image", str(image)], "not an image-to-video model")]:
        with pytest.raises(SystemExit) as e:  # refused before any weights for a one-transformer text-to-video Wan
            raise SystemExit(cli.main(argv + ["--output", str(tmp_path / "x.mp4"), "--no-progress"]))
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "y.mp4").exists()


def test_generate_cogvideox_image_to_video_random_weights(tmp_path, capsys):
    """A tiny CogVideoX1.5-I2V configs folder (ofs, patch_size_t): --image runs image-to-video on ulysses=2;
    --last-image is refused (CogVideoX takes the first frame only)."""
    import json

    import imageio.v3 as iio
    import numpy as np

    from xdit_jax import tiny

    configs = tmp_path / "cogvideox-i2v"
    tiny.write_configs(configs, "cogvideox", dict(use_rotary_positional_embeddings=True, patch_size_t=2,
                                                  patch_bias=False, in_channels=8, ofs_embed_dim=32))
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps(dict(index, _class_name="CogVideoXImageToVideoPipeline")))
    image = tmp_path / "first.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    common = ["--model", str(configs), "--random-weights", "--steps", "2", "--height", "64", "--width", "96",
              "--num-frames", "9", "--no-progress", "--image", str(image)]
    rc = cli.main(common + ["--output", str(tmp_path / "c.mp4"), "--mesh", "ulysses=2"])
    assert rc == 0 and iio.imread(tmp_path / "c.mp4").shape == (9, 64, 96, 3)
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(common + ["--output", str(tmp_path / "y.mp4"), "--last-image", str(image)]))
    assert e.value.code == 2 and "first frame only" in capsys.readouterr().err
    assert not (tmp_path / "y.mp4").exists()


def test_generate_flux_image(tmp_path, capsys):
    """The tiny FLUX (two phases: text whole, then joint): a .png with true CFG, on one device (the CLI on meshes: the
    PixArt, Qwen-Image, SANA, Mochi cases; FLUX's meshes: tests/test_flux_pipeline.py; --image: the next test)."""
    import imageio.v3 as iio

    out = tmp_path / "f.png"
    rc = cli.main(["--model", "tiny-flux", "--output", str(out), "--steps", "2",
                   "--negative-prompt", "blurry", "--true-cfg-scale", "2", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 64, 3) and image.std() > 1  # the tiny defaults: 48 x 64
    assert '"model_family": "flux"' in capsys.readouterr().out


@pytest.mark.slow  # (the default run's time: FLUX's image-to-image vs diffusers is tests/test_flux_pipeline.py's)
def test_generate_flux_image_to_image(tmp_path, capsys):
    """--image on the tiny FLUX (FluxImg2ImgPipeline on the text-to-image folder): 2 steps at strength 0.5 run 1."""
    import imageio.v3 as iio
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src)
    out2 = tmp_path / "f2.png"
    rc = cli.main(["--model", "tiny-flux", "--output", str(out2), "--steps", "2", "--image", str(src), "--strength",
                   "0.5", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out2).shape == (48, 64, 3)
    assert '"image_encoding"' in capsys.readouterr().out


def test_generate_qwenimage_image(tmp_path, capsys):
    """The tiny Qwen-Image (Qwen2.5-VL text, true CFG with the negative prompt at diffusers' default 4): a .png on a
    CFG x ring x ulysses mesh."""
    import imageio.v3 as iio

    out = tmp_path / "q.png"
    rc = cli.main(["--model", "tiny-qwenimage", "--output", str(out), "--steps", "2", "--mesh", "cfg=2,ring=2,ulysses=2",
                   "--negative-prompt", "blurry", "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 80, 3) and image.std() > 1  # the tiny defaults: 48 x 80
    assert '"model_family": "qwenimage"' in capsys.readouterr().out


def test_generate_qwenimage_edit_plus_two_images(tmp_path, capsys):
    """The tiny Qwen-Image-Edit-2511 (zero_cond_t) with two --image (one 40 x 40, one 60 x 90: the output at the last
    one's aspect ratio, 96 x 64 at the tiny area), on one device (the edit meshes:
    tests/test_qwenimage_edit_pipeline.py)."""
    import imageio.v3 as iio
    from PIL import Image

    paths = []
    for i, (h, w) in enumerate([(40, 40), (60, 90)]):
        paths.append(tmp_path / f"in{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "e.png"
    rc = cli.main(["--model", "tiny-qwenimage-edit-plus", "--output", str(out), "--steps", "2", "--image", str(paths[0]),
                   "--image", str(paths[1]), "--no-progress", "--json"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (64, 96, 3) and image.std() > 1
    assert '"model_family": "qwenimage"' in capsys.readouterr().out


@pytest.mark.slow  # (15 s; SD3's skip-layer guidance vs diffusers: tests/test_sd3_pipeline.py, by default)
def test_generate_sd3_image(tmp_path):
    """The tiny Stable Diffusion 3 (three text encoders, joint blocks): a .png with skip-layer guidance on the second
    step, on one device (SD3's meshes: tests/test_sd3_pipeline.py)."""
    import imageio.v3 as iio

    out = tmp_path / "s.png"
    rc = cli.main(["--model", "tiny-sd3", "--output", str(out), "--steps", "2", "--height", "48", "--width", "80",
                   "--skip-guidance-layers", "0", "--skip-layer-guidance-stop", "1",
                   "--no-progress"])
    assert rc == 0
    image = iio.imread(out)
    assert image.shape == (48, 80, 3) and image.std() > 1


def test_generate_random_weights(tmp_path, capsys):
    """--random-weights: a pipeline from a folder of configs alone (no weights, no tokenizer files), on a mesh."""
    import imageio.v3 as iio

    from xdit_jax import tiny

    configs = tmp_path / "configs"
    configs.mkdir()
    tiny.write_configs(configs, "pixart")
    out = tmp_path / "r.png"
    rc = cli.main(["--model", str(configs), "--random-weights", "--output", str(out), "--steps", "2", "--height",
                   "64", "--width", "64", "--no-resolution-binning", "--mesh", "cfg=2,ulysses=2", "--no-progress"])
    assert rc == 0
    assert iio.imread(out).shape == (64, 64, 3)
    assert "random weights from" in capsys.readouterr().err
    assert sorted(p.name for p in configs.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                        "transformer", "vae"]  # nothing converted or written


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny-hunyuandit", "--mesh", "pipefusion=3"], "2 layers of the model's largest block stack"),
    (["--model", "tiny-mochi", "--mesh", "pipefusion=2"], "more stages than the model's 1 layers"),  # 1 scanned
    (["--model", "tiny-flux", "--mesh", "pipefusion=3"], "2 layers of the model's largest block stack"),
    (["--model", "tiny-sd3", "--mesh", "pipefusion=2"], "more stages than the model's 1 layers"),
    (["--model", "tiny-pixart", "--skip-guidance-layers", "1"], "--skip-guidance-layers (SD3's)"),
    (["--model", "tiny-sd3", "--skip-guidance-layers", "9"], "block indices are 0..1"),
    (["--model", "tiny-flux", "--mesh", "cfg=2"], "cfg=2 splits"),
    (["--model", "tiny-flux", "--no-resolution-binning"], "not used by this flux model"),
    (["--model", "tiny-pixart", "--true-cfg-scale", "2"], "--true-cfg-scale (FLUX's, HunyuanVideo's and Qwen-Image's)"),
    (["--model", "tiny-qwenimage", "--guidance-scale", "3"], "not guidance-distilled"),
    (["--model", "tiny-qwenimage", "--mesh", "cfg=2"], "cfg=2 splits"),
    (["--model", "tiny-qwenimage-edit"], "give the image to edit with --image"),
    (["--model", "tiny-qwenimage-edit", "--image", str(ROOT / "README.md"), "--image", str(ROOT / "README.md")],
     "takes one image"),
    (["--model", "tiny-pixart", "--image", str(ROOT / "README.md")], "takes no image"),
    (["--model", "tiny-qwenimage", "--image", str(ROOT / "README.md"), "--strength", "1.5"],
     "--strength must be in (0, 1]"),  # (Qwen-Image image-to-image)
    (["--model", "tiny-pixart", "--strength", "0.5"], "--strength: image-to-image (a FLUX.1"),
    (["--model", "tiny-pixart", "--image", str(ROOT / "README.md"), "--mask", str(ROOT / "README.md")],
     "--mask: inpainting takes a FLUX.1 (Kontext too), SD3, Chroma, Qwen-Image or Z-Image model"),
    (["--model", "tiny-flux", "--image", str(ROOT / "README.md"), "--strength", "0"], "--strength must be in (0, 1]"),
    (["--model", "tiny-flux", "--image", str(ROOT / "README.md"), "--padding-mask-crop", "4"],
     "--padding-mask-crop PX (>= 0): inpainting only"),
    (["--model", "tiny-pixart", "--guidance-scale-2", "3"], "--guidance-scale-2 (Wan 2.2 A14B's)"),
    (["--guidance-scale-2", "-1"], "--guidance-scale-2 must be >= 0"),
    (["--image", "/no/such.png"], "--image /no/such.png is not a file"),
    (["--model", "tiny-mochi", "--use-dynamic-cfg"], "--use-dynamic-cfg (CogVideoX's)"),
    (["--model", "tiny-mochi", "--output", "m.png"], "makes videos"),
    (["--model", "tiny-wan", "--mesh", "pipefusion=3"], "more stages than the model's 2 layers"),
    (["--model", "tiny-wan", "--ar-step", "5"], "--ar-step (SkyReels-V2 diffusion forcing's)"),
    (["--model", "tiny-skyreels-v2", "--num-frames", "13", "--base-num-frames", "9"], "needs --overlap-history"),
    (["--model", "tiny-skyreels-v2", "--video", str(ROOT / "README.md")], "give --overlap-history"),
    (["--model", "tiny-pixart", "--video", str(ROOT / "README.md")], "does not extend videos"),
    (["--model", "tiny-wan", "--video", str(ROOT / "README.md"), "--num-frames", "5"],
     "--num-frames: Wan video-to-video"),
    (["--video", "/no/such.mp4"], "neither a video file nor a folder"),
    (["--video", str(ROOT / "README.md"), "--image", str(ROOT / "README.md")], "give one of them"),
    (["--model", "tiny-pixart", "--output", "x.mp4"], "makes images"),
    (["--model", "tiny-pixart", "--num-frames", "9"], "--num-frames: not used by this pixart model"),
    (["--model", "tiny-hunyuandit", "--max-sequence-length", "20"], "77 + 256"),
    (["--model", "tiny-latte", "--max-sequence-length", "20"], "Latte's T5 length is fixed"),
    (["--guidance-rescale", "0.5"], "not used by this cogvideox model"),
    (["--model", "tiny-pixart", "--height", "40"], "multiples of 16"),
    (["--model", "tiny-cogview3", "--height", "144"], "position table"),  # (8 x 8 patches in the tiny model)
    (["--height", "50"], "multiples of 16"),
    (["--num-frames", "10"], "8k+1"),
    (["--model", "tiny-kandinsky5", "--num-frames", "6"], "4k + 1"),
    (["--mesh", "cfg=3"], "cfg must be 1 or 2"),
    (["--mesh", "tensor=2"], "Unknown mesh axis"),
    (["--mesh", "data=64"], "devices"),
    (["--model", "/no/such/dir"], "does not exist"),
    (["--output", "x.avi"], ".mp4"),
    (["--steps", "0"], ">= 1"),
    (["--num-images-per-prompt", "0"], "--num-images-per-prompt must be >= 1"),
    (["--mesh", "pipefusion=4"], "more stages than the model's 2 layers"),
    (["--mesh", "pipefusion=2", "--warmup-steps", "0"], ">= 1"),
])
def test_bad_input(tmp_path, capsys, argv, needle):
    out = tmp_path / ("o.png" if {"tiny-pixart", "tiny-hunyuandit", "tiny-flux", "tiny-sd3", "tiny-qwenimage",
                                  "tiny-qwenimage-edit", "tiny-cogview3"} & set(argv)
                      else "o.mp4")
    if "--output" not in argv:
        argv = argv + ["--output", str(out)]
    with pytest.raises(SystemExit) as e:
        rc = cli.main(argv + ["--no-progress"])
        raise SystemExit(rc)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        cli.main(["--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    second = tmp_path / "p_1.png"  # the second image of a batch
    second.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        cli.main(["--model", "tiny-pixart", "--output", str(tmp_path / "p.png"), "--num-images-per-prompt", "2"])
    assert "p_1.png exists" in capsys.readouterr().err
    assert second.read_bytes() == b"precious" and not (tmp_path / "p_0.png").exists()


def test_script_help_runs():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--mesh" in r.stdout and "--ulysses_degree" in r.stdout


def test_every_tiny_name_has_a_family():
    """Each tiny model names a family the command line knows (tiny-flux-kontext: FLUX's), before anything loads."""
    from xdit_jax import tiny

    for name in tiny.TINY_NAMES:
        assert cli._family_of(name) in cli.FAMILIES, name
    assert cli._family_of("tiny-flux-kontext") == "flux"


def test_generate_consisid(tmp_path, capsys):
    """The tiny ConsisID: --image (the face) and --id-embeds (its embeddings, an .npz as diffusers' face models make
    them) to a video on one device (its meshes: tests/test_consisid_pipeline.py); refused without --id-embeds (saying
    how to make it), and --id-embeds refused for other models."""
    import imageio.v3 as iio

    from xdit_jax import tiny

    cfg, rng = tiny.CONSISID_TRANSFORMER, np.random.default_rng(0)
    ids = tmp_path / "ids.npz"
    np.savez(ids, id_cond=rng.standard_normal((1, cfg["LFE_id_dim"])).astype(np.float32),
             id_vit_hidden=rng.standard_normal((cfg["LFE_num_scale"], 1, 5, cfg["LFE_vit_dim"])).astype(np.float32))
    face = tmp_path / "face.png"
    iio.imwrite(face, rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    common = ["--model", "tiny-consisid", "--image", str(face), "--steps", "2", "--no-progress"]
    for argv, needle in [([], "--id-embeds FILE.npz with the arrays id_cond and id_vit_hidden"),
                         (["--id-embeds", str(tmp_path / "none.npz")], "no such file")]:
        with pytest.raises(SystemExit) as e:
            raise SystemExit(cli.main(common + argv + ["--output", str(tmp_path / "x.mp4")]))
        assert e.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(["--id-embeds", str(ids), "--output", str(tmp_path / "x.mp4")]))
    assert e.value.code == 2 and "--id-embeds (ConsisID's)" in capsys.readouterr().err
    out = tmp_path / "c.mp4"
    assert cli.main(common + ["--id-embeds", str(ids), "--output", str(out), "--json"]) == 0
    video = iio.imread(out)
    assert video.shape == (9, 64, 96, 3) and video.std() > 1  # the tiny defaults: the learned table's 9 x 64 x 96
    assert '"model_family": "consisid"' in capsys.readouterr().out


def _kandinsky5_i2v_configs(tmp_path):
    """A tiny Kandinsky 5.0 I2V configs folder (an image-conditioned transformer: visual_cond) and a first frame."""
    import json

    import imageio.v3 as iio

    from xdit_jax import tiny

    configs = tmp_path / "kandinsky5-i2v"
    tiny.write_configs(configs, "kandinsky5", dict(visual_cond=True))
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps(dict(index, _class_name="Kandinsky5I2VPipeline")))
    image = tmp_path / "first.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    return configs, image


def test_kandinsky5_image_to_video_refusals(tmp_path, capsys):
    """A Kandinsky 5.0 I2V folder: no --image, --last-image, 9 frames (2 latent frames: diffusers' first-frame
    normalization has no reference) refused before loading (the run: the slow test below)."""
    configs, image = _kandinsky5_i2v_configs(tmp_path)
    base = ["--model", str(configs), "--random-weights", "--output", str(tmp_path / "k.mp4"), "--no-progress"]
    for extra, message in ([[], "give the first frame with --image"],
                           [["--image", str(image), "--last-image", str(image)], "first frame only"],
                           [["--image", str(image), "--num-frames", "9"], "1 or >= 17 frames"]):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(cli.main(base + extra))
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "k.mp4").exists()


@pytest.mark.slow  # (the pipeline's parity: tests/test_kandinsky5_i2v_pipeline.py)
def test_generate_kandinsky5_image_to_video_random_weights(tmp_path, capsys):
    """--image on a Kandinsky 5.0 I2V folder with --random-weights (the VAE's encoder too): 17 frames of 32 x 32 on
    ulysses=2."""
    import imageio.v3 as iio

    configs, image = _kandinsky5_i2v_configs(tmp_path)
    out = tmp_path / "k.mp4"
    rc = cli.main(["--model", str(configs), "--random-weights", "--image", str(image), "--steps", "2", "--height", "32",
                   "--width", "32", "--num-frames", "17", "--max-sequence-length", "32", "--mesh", "ulysses=2",
                   "--no-progress", "--output", str(out), "--json"])
    assert rc == 0 and iio.imread(out).shape == (17, 32, 32, 3)
    assert '"model_family": "kandinsky5"' in capsys.readouterr().out


def test_kandinsky5_image_to_image_refusals(tmp_path, capsys):
    """A Kandinsky 5.0 I2I folder: no --image and --last-image refused before loading (the run: the slow test below)."""
    configs, image = _kandinsky5_i2v_configs(tmp_path)
    index = json.loads((configs / "model_index.json").read_text())
    (configs / "model_index.json").write_text(json.dumps(dict(index, _class_name="Kandinsky5I2IPipeline")))
    base = ["--model", str(configs), "--random-weights", "--output", str(tmp_path / "k.png"), "--no-progress"]
    for extra, message in ([[], "give the image to edit with --image"],
                           [["--image", str(image), "--last-image", str(image)], "takes one image"]):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(cli.main(base + extra))
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "k.png").exists()


@pytest.mark.slow  # (the pipeline's parity: tests/test_kandinsky5_i2i_pipeline.py)
def test_generate_kandinsky5_image_to_image(tmp_path, capsys):
    """--image on the tiny diffusers Kandinsky5I2IPipeline saved (converted on first use): a .png of the image's size
    (32 x 32, snapped to the instance's resolution list: diffusers' has no toy sizes, so 1024 x 1024 here would be
    slow; the run takes the list's nearest: the test patches it)."""
    import imageio.v3 as iio

    from tests.fixtures import make_torch_kandinsky5_i2i, save_torch_pipeline
    from xdit_jax.pipelines import kandinsky5_t2i

    folder = save_torch_pipeline(make_torch_kandinsky5_i2i(), tmp_path / "k5-i2i")
    image = tmp_path / "in.png"
    iio.imwrite(image, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = tmp_path / "k.png"
    old = kandinsky5_t2i.Kandinsky5T2IPipeline.resolutions
    kandinsky5_t2i.Kandinsky5T2IPipeline.resolutions = ((32, 32),)
    try:
        rc = cli.main(["--model", str(folder), "--image", str(image), "--steps", "2", "--no-progress", "--output",
                       str(out), "--json"])
    finally:
        kandinsky5_t2i.Kandinsky5T2IPipeline.resolutions = old
    assert rc == 0 and iio.imread(out).shape == (32, 32, 3)
    assert '"model_family": "kandinsky5-t2i"' in capsys.readouterr().out


@pytest.mark.slow  # (the pipeline's parity: tests/test_hidream_pipeline.py)
def test_generate_hidream(tmp_path, capsys):
    """tiny-hidream (two CLIPs, T5 and Llama as xdit_jax.tiny's HiDream-I1; its default_sample_size 8): diffusers' size
    rule keeps 48 x 80's aspect ratio at 64 x 64 pixels' area (not the release's 1024 x 1024, 768 x 1280), CFG over
    cfg=2."""
    import imageio.v3 as iio

    out = tmp_path / "h.png"
    rc = cli.main(["--model", "tiny-hidream", "--output", str(out), "--height", "48", "--width", "80", "--mesh", "cfg=2",
                   "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out).shape == (48, 80, 3)
    assert '"model_family": "hidream"' in capsys.readouterr().out


@pytest.mark.slow
def test_generate_longcat_image(tmp_path, capsys):
    """The tiny LongCat-Image (FLUX.1's blocks on the tiny Qwen2.5-VL, 512 text tokens): a .png at the tiny default size
    with CFG over cfg=2,ulysses=2; --max-sequence-length refused (its text length is fixed), --image refused (a
    text-to-image folder)."""
    import imageio.v3 as iio

    out = tmp_path / "l.png"
    rc = cli.main(["--model", "tiny-longcat", "--prompt", 'A sign that says "OPEN".', "--output", str(out),
                   "--mesh", "cfg=2,ulysses=2", "--no-progress", "--json"])
    assert rc == 0 and iio.imread(out).shape == (48, 80, 3)
    assert '"model_family": "longcat"' in capsys.readouterr().out
    rc = cli.main(["--model", "tiny-longcat", "--output", str(tmp_path / "m.png"), "--max-sequence-length", "64"])
    assert rc == 2 and "--max-sequence-length" in capsys.readouterr().err
    rc = cli.main(["--model", "tiny-longcat", "--output", str(tmp_path / "i.png"), "--image", str(out)])
    assert rc == 2 and "takes no image" in capsys.readouterr().err
