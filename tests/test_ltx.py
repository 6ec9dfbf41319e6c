"""LTX-Video: transformer == diffusers LTXVideoTransformer3DModel (T2V and I2V per-token timesteps), its
sequence-parallel run == one device; VAE decode == diffusers AutoencoderKLLTXVideo; the pipelines == diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LTXVideoTransformer3DModel as TorchModel
from flax import nnx

from tests.fixtures import torch_and_our_model
from xdit_jax.mesh import build_mesh
from xdit_jax.models import ltx
from xdit_jax.parallel.sequence import run_blocks

TEXT = 6  # caption tokens (128 in LTX-Video)
# 2 heads of 8: inner 16, 16 % 6 = 4 (RoPE's padding of cos 1 / sin 0 exercised), 2 blocks, 8 latent channels
CONFIG = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
              num_layers=2, caption_channels=12)
GRID = (3, 2, 3)  # latent frames, rows, columns: 18 tokens (padded by ring=2,ulysses=2 and ulysses=4; not by 3)
SCALE = (8 / 25, 32.0, 32.0)  # diffusers' rope_interpolation_scale at 25 fps


def _fwd(m, x, text, t, mask, first=None):
    return m(x, text, t, mask, *GRID, SCALE, first)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    return torch_and_our_model(TorchModel, CONFIG, ltx, ltx.LTXConfig)


def _inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, int(np.prod(GRID)), CONFIG["in_channels"])).astype(np.float32)
    text = rng.standard_normal((b, TEXT, CONFIG["caption_channels"])).astype(np.float32)
    mask = (np.arange(TEXT)[None] < np.array([TEXT, 2, 0][:b])[:, None]).astype(np.int64)
    t = np.array([37.5, 880.0, 500.0][:b], np.float32)
    return x, text, t, mask


def _torch(tm, x, text, t, mask):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(text), tt(t), tt(mask), *GRID, rope_interpolation_scale=SCALE,
                  return_dict=False)[0].numpy()


def test_matches_diffusers(pair):
    tm, cfg, model = pair
    args = _inputs()
    ref = _torch(tm, *args)
    out = np.asarray(FWD(model, *args))
    # fp32 both sides, outputs O(3): measured 3.5e-6 (I2V 2.8e-6); 2e-5 leaves room for reordered float32 sums.
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.slow  # (the default run's time: test_i2v_pipeline_matches_diffusers runs the same per-token timesteps)
def test_first_frame_timestep_matches_per_token_timesteps(pair):
    """diffusers' image-to-video: a (B, S) timestep, t * (1 - mask) with the first latent frame's tokens at 0."""
    tm, cfg, model = pair
    x, text, t, mask = _inputs(seed=1)
    per_token = np.repeat(t[:, None], x.shape[1], axis=1)
    per_token[:, :GRID[1] * GRID[2]] = 0.0
    ref = _torch(tm, x, text, per_token, mask)
    out = np.asarray(FWD(model, x, text, t, mask, np.zeros_like(t)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)  # measured 2.8e-6, as above


def _parallel(model, mesh):
    """The forward with the blocks over ``mesh`` (tests.jax_util's, with the static grid closed over)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, text, t, mask):
        mdl = nnx.merge(graphdef, state)
        y, tokens, cond = mdl.embed(x, text, t, mask, *GRID, SCALE)
        blocks = lambda p, h, tk, c: nnx.merge(graphdef, p).blocks(h, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, y, tokens, cond, mesh), cond, x.shape, tokens)

    return lambda *a: forward(state, *a)


# (slow-marked for the default run's time: the pipeline's and the bench row's meshes run these blocks over
# cfg=2,ring=2,ulysses=2 and ulysses=3 in the default set)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "ulysses=3"])
def test_sequence_parallel_equals_one_device(pair, mesh):
    _, cfg, model = pair
    x, text, t, mask = _inputs(seed=2)
    ref = np.asarray(FWD(model, x, text, t, mask))
    out = np.asarray(_parallel(model, build_mesh(mesh))(x, text, t, mask))
    # fp32: only the order of float32 sums differs (ring LSE merge, padded rows); outputs O(3): measured 1.4e-6
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_config_and_input_errors(pair):
    tm, cfg, model = pair
    with pytest.raises(ValueError, match="rms_norm_across_heads"):
        ltx.LTXConfig.from_dict({**dict(tm.config), "qk_norm": "rms_norm"})
    x, text, t, mask = _inputs()
    with pytest.raises(ValueError, match="num_frames x height x width"):
        model(x, text, t, mask, 2, 2, 3)


# ----- the VAE decoder -----

from diffusers import AutoencoderKLLTXVideo  # noqa: E402

from tests.torch_util import randomize_, state_dict_np  # noqa: E402
from xdit_jax.models import vae_ltx  # noqa: E402

ENCODER = dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
               layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False))
# 0.9.0's decoder layout (widths change: conv_in resnets with the LayerNorm shortcut; a block without upsampler)
VAE_090 = dict(ENCODER, decoder_block_out_channels=(8, 16, 32, 32), decoder_layers_per_block=(1, 1, 1, 1, 1),
               decoder_spatio_temporal_scaling=(True, True, True, False))
# 0.9.5's: timestep-conditioned, residual upsamplers with upscale_factor 2, every block upsampling
VAE_095 = dict(ENCODER, decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 1),
               decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
               upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
               spatial_compression_ratio=32, temporal_compression_ratio=8)

# 0.9.1's: timestep-conditioned, noise injected in the first three blocks (its scales zeroed for the comparison:
# the noise is torch's generator there, a JAX key here)
VAE_091 = dict(VAE_095, decoder_inject_noise=(True, True, True, False))
VAES = {"0.9.0": VAE_090, "0.9.1": VAE_091, "0.9.5": VAE_095}


def _vae_pair(kw, seed=3):
    torch.manual_seed(0)
    tv = randomize_(AutoencoderKLLTXVideo(**kw), seed=seed, std=0.15)
    with torch.no_grad():  # the per-channel statistics are buffers: set them too
        tv.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        tv.latents_std.copy_(torch.linspace(0.5, 1.5, 8))
        for name, p in tv.named_parameters():
            if "per_channel_scale" in name:
                p.zero_()
    cfg = vae_ltx.LTXVAEConfig.from_dict(dict(tv.config))
    return tv, cfg, vae_ltx.build(cfg, vae_ltx.params_from_torch(state_dict_np(tv), cfg))


DECODE = jax.jit(lambda m, z, t: vae_ltx.decode(m, z, t))


# (0.9.5 slow-marked for the default run's time: the pipeline tests decode with the tiny 0.9.5-layout VAE against
# diffusers' frames)
@pytest.mark.parametrize("variant", ["0.9.0", pytest.param("0.9.1", marks=pytest.mark.slow),
                                     pytest.param("0.9.5", marks=pytest.mark.slow)])
def test_vae_decode_matches_diffusers(variant):
    tv, cfg, model = _vae_pair(VAES[variant])
    z = np.random.default_rng(5).standard_normal((2, 8, 2, 2, 3)).astype(np.float32)
    t = np.array([0.05, 0.025], np.float32) if cfg.timestep_conditioning else None
    with torch.no_grad():
        ref = tv.decode(torch.from_numpy(z), None if t is None else torch.from_numpy(t)).sample.numpy()
    out = np.asarray(DECODE(model, z, t))
    assert out.shape == ref.shape == vae_ltx.decoded_shape(cfg, z.shape) == (2, 3, 9, 64, 96)
    # fp32 both sides, outputs up to 6: measured 1.6e-5 (0.9.0), 1.0e-5 (0.9.1), 5.7e-6 (0.9.5): float32 sums of
    # 3x3x3 convolutions ordered otherwise; 1e-4: 6x the worst measured
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(vae_ltx.denormalize(model, z)),
                               tv.latents_mean.view(1, -1, 1, 1, 1).numpy() + z * tv.latents_std.view(
                                   1, -1, 1, 1, 1).numpy(), rtol=1e-6, atol=1e-6)


# (slow-marked for the default run's time: the pipeline's mesh test decodes the tiny 0.9.5 VAE over cfg=2,ring=2,ulysses=2)
@pytest.mark.parametrize("variant,mesh", [pytest.param("0.9.5", "cfg=2,ulysses=3", marks=pytest.mark.slow),
                                          pytest.param("0.9.0", "ring=2,ulysses=2", marks=pytest.mark.slow),
                                          pytest.param("0.9.1", "ring=2,ulysses=2", marks=pytest.mark.slow)])
def test_vae_decode_over_mesh_equals_one_device(variant, mesh):
    """The image plane split over the mesh's devices (explicit halos; 0.9.1's noise: XLA's partitioning)."""
    tv, cfg, model = _vae_pair(VAES[variant])
    if cfg.injects_noise:  # the noise planes on: they must be the global ones on every shard
        for blk in model.decoder.up_blocks:
            for r in blk.resnets:
                if r.inject_noise:
                    r.per_channel_scale1[...] = jnp.full_like(r.per_channel_scale1[...], 0.3)
    z = np.random.default_rng(6).standard_normal((2, 8, 2, 2, 3)).astype(np.float32)
    t = np.array([0.05, 0.025], np.float32) if cfg.timestep_conditioning else None
    ref = np.asarray(DECODE(model, z, t))
    m = build_mesh(mesh)
    out = np.asarray(jax.jit(lambda mdl, z, t: vae_ltx.decode(mdl, z, t, mesh=m))(model, z, t))
    # fp32; measured 4.5e-6 (0.9.5), 1.4e-5 (0.9.0), 7e-6 (0.9.1) on outputs up to 6: the order of conv sums
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


# ----- the pipelines -----

from tests.fixtures import make_torch_ltx, torch_and_our_pipeline  # noqa: E402
from xdit_jax import LTXPipeline  # noqa: E402

PROMPT = "A small dog running on a beach at sunset."
# 9 frames of 64 x 96: 2 latent frames of 2 x 3 (12 tokens); 2 steps; CFG with guidance_rescale; a 0.9.1+ VAE decoded
# at decode_timestep 0.05 without noise (diffusers' noise is torch's generator)
CALL = dict(height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=3.0, guidance_rescale=0.3,
            max_sequence_length=16, decode_timestep=0.05, decode_noise_scale=0.0, frame_rate=24)
LATENT = (12, 8)  # diffusers' packed latents (tokens, channels)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return torch_and_our_pipeline(make_torch_ltx, LTXPipeline, tmp_path_factory, "ltx")


def _torch_run(tp, latents, **kw):
    with torch.no_grad():
        out = tp(prompt=PROMPT, latents=torch.from_numpy(latents), **dict(CALL, **kw)).frames
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def test_pipeline_matches_diffusers(pipes):
    tp, pipe, _ = pipes
    lat = np.random.default_rng(0).standard_normal((1,) + LATENT).astype(np.float32)
    ref_lat = _torch_run(tp, lat, output_type="latent")
    out_lat = pipe(PROMPT, latents=lat, output_type="latent", progress=False, **CALL).frames
    # both float32, 2 steps: measured 1.2e-6 on latents up to 2.5; assert_close_latents: 1e-5 of their scale
    from tests.fixtures import assert_close_latents

    assert_close_latents(out_lat, ref_lat)
    ref = _torch_run(tp, lat, output_type="np")
    out = pipe(PROMPT, latents=lat, progress=False, **CALL).frames
    assert out.shape == ref.shape == (1, 9, 64, 96, 3)
    # frames in [0, 1] through the VAE: measured 4.9e-6; 2e-4 leaves room for float32 conv orderings
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", pytest.param("ulysses=3", marks=pytest.mark.slow)])
def test_pipeline_mesh_equals_one_device(pipes, mesh):
    _, pipe, folder = pipes
    par = LTXPipeline.from_pretrained(folder, mesh=mesh)
    lat = np.random.default_rng(1).standard_normal((1,) + LATENT).astype(np.float32)
    kw = dict(CALL, decode_noise_scale=None)  # the decode noise too (drawn from the seed: the same on every mesh)
    ref = pipe(PROMPT, latents=lat, progress=False, **kw).frames
    out = par(PROMPT, latents=lat, progress=False, **kw).frames
    # fp32; the order of float32 sums (ring merge, the decode's halos): measured 2.6e-6 (ulysses=3: 2.1e-6)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


# 0.9.5's encoder: LTXVideo095DownBlock3D with the space-to-depth downsamplers
VAE_095_ENCODER = dict(VAE_095, block_out_channels=(8, 16, 32, 64, 64), layers_per_block=(1, 1, 1, 1, 1),
                       down_block_types=("LTXVideo095DownBlock3D",) * 4,
                       spatio_temporal_scaling=(True, True, True, True),
                       downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"))


@pytest.mark.parametrize("variant", ["0.9.0", pytest.param("0.9.5", marks=pytest.mark.slow)])
def test_vae_encoder_matches_diffusers(variant):
    from xdit_jax.models import vae_ltx_encoder

    tv, cfg, _ = _vae_pair(VAE_090 if variant == "0.9.0" else VAE_095_ENCODER)
    enc = vae_ltx_encoder.build(cfg, vae_ltx_encoder.params_from_torch(state_dict_np(tv), cfg))
    x = np.random.default_rng(7).uniform(-1, 1, (1, 3, 9, 64, 96)).astype(np.float32)
    with torch.no_grad():
        dist = tv.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = jax.jit(vae_ltx_encoder.encode)(enc, x)
    assert mean.shape == tuple(dist.mean.shape) == (1, 8, 2, 2, 3)
    # fp32 both sides, means up to 7: measured 1.8e-6 (0.9.0), 7.3e-6 (0.9.5); logvar 7e-7 / 2.7e-6
    np.testing.assert_allclose(np.asarray(mean), dist.mean.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), dist.logvar.numpy(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def i2v_pipes(tmp_path_factory):
    from xdit_jax import LTXImageToVideoPipeline

    return torch_and_our_pipeline(lambda: make_torch_ltx(i2v=True), LTXImageToVideoPipeline, tmp_path_factory,
                                  "ltx_i2v")


def test_i2v_pipeline_matches_diffusers(i2v_pipes):
    """diffusers' LTXImageToVideoPipeline from the same latents (their first frame the image's): the first frame's
    tokens at timestep 0 and kept through the steps; then our run from an image: its first latent frame is the
    image's normalized encoding (a posterior sample: JAX's key, not torch's generator)."""
    from tests.fixtures import assert_close_latents, random_image

    tp, pipe, _ = i2v_pipes
    lat = np.random.default_rng(2).standard_normal((1,) + LATENT).astype(np.float32)
    ref = _torch_run(tp, lat, output_type="latent")
    out = pipe(prompt=PROMPT, latents=lat, output_type="latent", progress=False, **CALL).frames
    assert_close_latents(out, ref)  # float32, 2 steps: measured 1.3e-6 on latents up to 2.7
    np.testing.assert_array_equal(out[:, :6], lat[:, :6])  # the first latent frame (2 x 3 tokens) is kept as given
    image = random_image(3, (96, 64))
    first = pipe(image, PROMPT, output_type="latent", progress=False, **CALL).frames
    cond = np.asarray(pipe.encode_image(image, 64, 96, jax.random.key(0)))  # (1, C, 1, 2, 3)
    np.testing.assert_allclose(first[:, :6], cond[:, :, 0].reshape(1, 8, 6).transpose(0, 2, 1), rtol=0, atol=0)


def test_condition_pipeline_image_at_frame_0_matches_diffusers(i2v_pipes, monkeypatch):
    """LTXConditionPipeline (diffusers' 0.9.5+ pipeline) on the image-to-video fixture's parts with the 0.9.5+
    scheduler config: an image at frame 0 blended into the first latent frame, its tokens at timestep 0, never
    stepped, reset with the image-condition noise before each step; the text as prompt_embeds (diffusers' masked
    T5), the random draws ours on both sides (tests/test_ltx_condition.py: more conditions, a mesh, the folder)."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import LTXConditionPipeline as TorchCondition

    from tests.fixtures import assert_close_latents, random_image
    from tests.test_ltx_condition import CALL as COND_CALL
    from tests.test_ltx_condition import SEED, torch_with_our_draws
    from xdit_jax import LTXConditionPipeline, LTXVideoCondition, tiny

    tp, i2v, _ = i2v_pipes
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.LTX_CONDITION_SCHEDULER.items()
                                               if not k.startswith("_")})
    tcp = TorchCondition(**dict(tp.components, scheduler=sched))
    parts = dict(transformer=i2v.transformer, transformer_config=i2v.transformer_config, vae=i2v.vae,
                 vae_config=i2v.vae_config, text_encoder=i2v.text_encoder, tokenizer=i2v.tokenizer,
                 vae_encoder=i2v.vae_encoder)  # the same loaded parts, the 0.9.5+ scheduler config
    pipe = LTXConditionPipeline(**parts, scheduler_config=dataclasses.replace(i2v.scheduler_config,
                                                                              use_dynamic_shifting=False))
    with torch.no_grad():
        pe, pm, ne, nm = tcp.encode_prompt(PROMPT, None, True, max_sequence_length=16)
    text = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                negative_prompt_attention_mask=nm)
    conds = [LTXVideoCondition(image=random_image(1, (96, 64)), frame_index=0)]
    ref = torch_with_our_draws(tcp, monkeypatch, conds, 9, **text)
    out = pipe(conditions=conds, num_frames=9, output_type="latent", seed=SEED, progress=False,
               **{k: v.numpy() for k, v in text.items()}, **COND_CALL).frames
    assert out.shape == ref.shape == (1, 8, 2, 2, 3)
    assert_close_latents(out, ref)  # float32 both sides, 2 steps: measured 1.7e-6 on latents up to 4.3
    img = conds[0].image
    with pytest.raises(ValueError, match="must not be provided"):
        pipe(conditions=conds, image=img, prompt=PROMPT, num_frames=9, **COND_CALL)
    with pytest.raises(ValueError, match="outside the video"):
        pipe(image=img, frame_index=9, prompt=PROMPT, num_frames=9, **COND_CALL)
    with pytest.raises(ValueError, match="divisible by 32"):
        pipe(image=img, prompt=PROMPT, **dict(COND_CALL, height=48))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):  # (0.9.0 / 0.9.1's: diffusers' set_timesteps too)
        LTXConditionPipeline(**parts, scheduler_config=i2v.scheduler_config)(image=img, prompt=PROMPT, **COND_CALL)


def test_pipeline_refusals(pipes):
    _, pipe, folder = pipes
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe(PROMPT, **dict(CALL, height=48))
    with pytest.raises(ValueError, match="LTXImageToVideoPipeline"):
        pipe(PROMPT, image=np.zeros((64, 96, 3), np.uint8), **CALL)
    with pytest.raises(ValueError, match="packed latents"):
        pipe(PROMPT, latents=np.zeros((1, 8, 2, 2, 3), np.float32), **CALL)


def test_bench_tiny_row_vs_diffusers():
    """The ltx-tiny benchmark preset (2 layers, 18 video + 16 T5 tokens, 6 real) against diffusers' transformer, on one
    device (``meshes``: a ulysses=3 row in the slow variant), 1 timed step."""
    _bench_rows([None])


@pytest.mark.slow
def test_bench_tiny_rows_on_a_mesh_vs_diffusers():
    """As above with ulysses=3 (18 tokens over 3, the 2 heads zero-padded to 3)."""
    _bench_rows([None, "ulysses=3"])


def _bench_rows(meshes):
    from xdit_jax import bench

    rows = bench.run_step_benchmark(bench.StepOptions(model="ltx-tiny", meshes=meshes, steps=1,
                                                      compare="diffusers", settle=0, log=lambda s: None))
    names = ["single device" if m is None else m for m in meshes]
    assert sorted((r["mesh"], r["impl"]) for r in rows) == sorted([(m, "xdit_jax") for m in names]
                                                                  + [("torch cpu", "diffusers")])
    assert "18+16 tokens" in bench.format_table(rows)
    ours = [next(r for r in rows if r["mesh"] == m) for m in names]
    one = ours[0]
    for r in ours:
        assert "error" not in r, r.get("error")
        assert r["family"] == "ltx" and r["latent_shape"] == [2, 18, 8] and r["video_tokens"] == 18
        assert r["text_valid_tokens"] == 6 and r["latent_frames"] == 3 and r["step_median_s"] > 0
        # fp32, outputs O(1): measured 4.8e-7 (one device and cfg=2,ring=2,ulysses=2)
        assert r["max_abs_diff_vs_diffusers"] < 1e-5
    # the compiled program's dots are the analytic count (measured equal)
    assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9) and one["collective_bytes"] == 0
    for r in ours[1:]:
        assert r["collectives"]["all-to-all"] > 0


@pytest.mark.slow
def test_config_folders_match_diffusers():
    """configs/ltx-video-0.9.x: our transformer, VAE decoder and encoder built from the files have diffusers'
    parameter counts (its builds of the same files, on the meta device); the bench reads them as LTX workloads."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKLLTXVideo as TorchVAE

    from xdit_jax import bench
    from xdit_jax.models import vae_ltx_encoder

    def ours(make):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))

    for name in ("ltx-video-0.9.0", "ltx-video-0.9.1"):
        folder = Path(bench.CONFIG_DIR) / name
        t = json.loads((folder / "transformer" / "config.json").read_text())
        v = json.loads((folder / "vae" / "config.json").read_text())
        strip = lambda d: {k: x for k, x in d.items() if not k.startswith("_")}  # noqa: E731
        with torch.device("meta"):
            tt, tv = TorchModel(**strip(t)), TorchVAE(**strip(v))
        tc, vc = ltx.LTXConfig.from_dict(t), vae_ltx.LTXVAEConfig.from_dict(v)
        assert ours(lambda: ltx.LTXVideoTransformer3DModel(tc)) == sum(p.numel() for p in tt.parameters())
        # (ours holds the latents' mean / std as parameters: diffusers' buffers)
        assert ours(vae_ltx.module_fn(vc)) == sum(p.numel() for p in tv.decoder.parameters()) + 2 * 128
        assert ours(vae_ltx_encoder.module_fn(vc)) == sum(p.numel() for p in tv.encoder.parameters())
        w = bench.load_workload(name)
        assert w.family == "ltx" and w.tokens() == (21 * 16 * 22, 128) and w.latent_shape() == (2, 7392, 128)


@pytest.mark.slow
def test_bf16_close_to_fp32(pair):
    tm, cfg, m32 = pair
    m16 = ltx.build(cfg, ltx.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    args = _inputs(seed=3)
    ref = np.asarray(FWD(m32, *args))
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16 weights and activations (8-bit mantissa), norms, RoPE and softmax in float32: through 2 blocks a few %
    # of the output scale (measured 1.5%)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.slow
def test_pipefusion(pipes):
    """PipeFusion over 2 stages (one block each): with every step a warm-up step (exact, the whole sequence) it equals
    one device; with 1 warm-up step the second step attends to one-step-old K/V of the other patch (xDiT's rule):
    close, not equal."""
    _, pipe, folder = pipes
    lat = np.random.default_rng(4).standard_normal((1,) + LATENT).astype(np.float32)
    kw = dict(CALL, output_type="latent", progress=False)
    ref = pipe(PROMPT, latents=lat, **kw).frames
    exact = LTXPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_warmup_steps=2)
    np.testing.assert_allclose(exact(PROMPT, latents=lat, **kw).frames, ref, atol=1e-5, rtol=0)  # measured 0.0
    patched = LTXPipeline.from_pretrained(folder, mesh="cfg=2,pipefusion=2")
    out = patched(PROMPT, latents=lat, **kw).frames
    assert np.isfinite(out).all() and not np.allclose(out, ref, atol=1e-6)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()  # stale K/V in one step of two (measured 2.7e-4 of the scale)
