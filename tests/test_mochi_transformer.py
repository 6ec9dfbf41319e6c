"""Mochi transformer == diffusers MochiTransformer3DModel; its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MochiTransformer3DModel as TorchModel
from diffusers.models.transformers.transformer_mochi import MochiRoPE

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import mochi
from xdit_jax.safetensors_io import CheckpointError

TEXT = 7  # caption tokens (256 in Mochi 1)
# 3 heads of 8 (zero-padded to 4 on ulysses=2), a caption stream narrower than the video one (12 vs
# 24, as 1536 vs 3072), 8 pooler heads over a 16-wide text embedding, 3 blocks: 2 stacked + the last.
CONFIG = dict(patch_size=2, num_attention_heads=3, attention_head_dim=8, num_layers=3, pooled_projection_dim=12,
              in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=TEXT)
# (batch, frames, latent h, latent w): 3 x 2 x 3 = 18 and 2 x 3 x 2 = 12 video tokens; 18 is padded
# by ring=4 / ulysses=4, 12 by 5.
SHAPES = [(3, 3, 4, 6), (2, 2, 6, 4)]
# A full caption, a short one (the rest padding, as T5's mask), and none at all (diffusers'
# force_zeros_for_empty_prompt negative prompt): the masked tokens must change nothing.
LENGTHS = [TEXT, 3, 0]


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = mochi.MochiConfig.from_dict(dict(tm.config))
    return tm, cfg, mochi.build(cfg, mochi.params_from_torch(state_dict_np(tm), cfg))


def _inputs(cfg, b, f, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, f, h, w)).astype(np.float32)
    text = rng.standard_normal((b, TEXT, cfg.text_embed_dim)).astype(np.float32)
    mask = (np.arange(TEXT)[None] < np.array(LENGTHS[:b])[:, None]).astype(np.int64)
    t = np.array([12.5, 500.0, 990.0][:b], np.float32)
    return x, text, t, mask


def _torch(tm, x, text, t, mask):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(text), tt(t), tt(mask), return_dict=False)[0].numpy()


def test_positions_match_diffusers():
    rope = MochiRoPE()
    for f, gh, gw in [(3, 2, 3), (2, 3, 2), (28, 30, 53), (1, 96, 96)]:
        ref = rope._get_positions(f, gh, gw, dtype=torch.float32).numpy()
        # float32 linspace on both sides; torch may round an edge differently by an ulp (~1e-5 at 96).
        np.testing.assert_allclose(mochi.positions(f, gh, gw), ref, atol=2e-5, rtol=0)


def test_matches_diffusers(pair):
    tm, cfg, model = pair
    for shape in SHAPES:
        args = _inputs(cfg, *shape)
        ref = _torch(tm, *args)
        out = np.asarray(FWD(model, *args))
        assert out.shape == ref.shape == (shape[0], cfg.out_ch) + shape[1:]
        # fp32 both sides, outputs O(1-3): measured 4e-6. 2e-5 leaves room for reordered float32 sums
        # (our joint softmax is two partials merged); the bugs tried give 0.9 (caption mask ignored)
        # and 1.2 (RoPE pairs rotated the other way).
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5, err_msg=str(shape))


def test_masked_caption_tokens_change_nothing(pair):
    _, cfg, model = pair
    x, text, t, mask = _inputs(cfg, *SHAPES[0], seed=4)
    noisy = text.copy()
    noisy[mask == 0] = 1e3  # garbage in the padded caption tokens
    a, b = np.asarray(FWD(model, x, text, t, mask)), np.asarray(FWD(model, x, noisy, t, mask))
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # (the default run's time; bf16 vs fp32 of the other families' blocks: their transformer tests)
def test_bf16_close_to_fp32(pair):
    tm, cfg, m32 = pair
    m16 = mochi.build(cfg, mochi.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    args = _inputs(cfg, *SHAPES[0], seed=1)
    ref = np.asarray(FWD(m32, *args))
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16 weights and activations (8-bit mantissa, 0.4% steps), norms and softmax in float32:
    # through 3 blocks a few % of the output scale (measured below 2%).
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_config_checkpoint_and_input_errors(pair):
    tm, cfg, _ = pair
    d = dict(tm.config)
    for bad, needle in [(dict(activation_fn="gelu"), "swiglu"), (dict(num_layers=1), "at least 2")]:
        with pytest.raises(ValueError, match=needle):
            mochi.MochiConfig.from_dict({**d, **bad})
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        mochi.check_input_shape(cfg, 5, 4)
    sd = state_dict_np(tm)
    last = cfg.num_layers - 1
    sd.pop(f"transformer_blocks.{last}.attn1.add_q_proj.weight")  # unused by the last block: no error
    mochi.params_from_torch(dict(sd), cfg)
    sd.pop("transformer_blocks.0.ff_context.net.0.proj.weight")
    sd.pop(f"transformer_blocks.{last}.norm1_context.linear_1.bias")
    sd["pos_frequencies"] = sd["pos_frequencies"][:, :-1]
    sd[f"transformer_blocks.{last + 1}.ff.net.2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as e:
        mochi.params_from_torch(sd, cfg)
    for key in ("transformer_blocks.0.ff_context.net.0.proj.weight", f"{last}.norm1_context.linear_1.bias",
                "pos_frequencies", f"transformer_blocks.{last + 1}.ff.net.2.weight"):
        assert key in str(e.value), key


# (mesh, the caption sharded over the sequence group as the pipeline runs it, or held whole by every device)
# Slow-marked for the default run's time (`pytest -m slow` runs them): ulysses and ring alone (both inside the
# ring x ulysses case), ring=4 (uneven padding: ulysses=3), cfg x ulysses (the batch split: the Mochi pipeline's meshes)
MESHES = [pytest.param("ulysses=2", True, marks=pytest.mark.slow), pytest.param("ring=2", True, marks=pytest.mark.slow),
          ("ring=2,ulysses=2", True), ("ulysses=3", True), pytest.param("ring=4", True, marks=pytest.mark.slow),
          pytest.param("cfg=2,ulysses=2", True, marks=pytest.mark.slow), ("ring=2,ulysses=2", False)]


@pytest.mark.parametrize("mesh,sharded", MESHES)
def test_sequence_parallel_equals_one_device(pair, mesh, sharded):
    _, cfg, model = pair
    shape = (2,) + SHAPES[0][1:]  # 18 video tokens: padded for every degree but 2, 3
    args = _inputs(cfg, *shape, seed=2)
    ref = np.asarray(FWD(model, *args))
    parallel = sequence_parallel_forward(model, build_mesh(mesh), text=mochi.TEXT_KEYS if sharded else None)
    out = np.asarray(parallel(*args))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the caption partial, padded
    # zero heads); outputs O(1).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=mesh)
