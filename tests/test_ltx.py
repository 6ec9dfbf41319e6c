"""LTX-Video: transformer == diffusers LTXVideoTransformer3DModel (T2V and I2V per-token timesteps), its
sequence-parallel run == one device; VAE decode == diffusers AutoencoderKLLTXVideo; the pipelines == diffusers."""

import jax
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


@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", pytest.param("ulysses=3", marks=pytest.mark.slow)])
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
