"""Chroma transformer == diffusers ChromaTransformer2DModel where diffusers is right: with padded text and the
pipeline's mask, == diffusers on each sample's text cropped to the kept tokens with no mask (our mask is a real key
mask; diffusers adds its float mask to the logits, huggingface/diffusers#12116); with an all-ones mask (no padding:
diffusers' float mask is inert), == diffusers with its mask; without a mask. Its run over a mesh == one device."""

import jax
import numpy as np
import pytest
import torch
from diffusers import ChromaTransformer2DModel as TorchModel
from flax import nnx

from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import chroma, flux
from xdit_jax.parallel.sequence import run_blocks

TEXT = 6  # T5 tokens (512 in Chroma1-HD)
# 3 heads of 16 (RoPE axes 4 + 6 + 6), 2 double- and 2 single-stream blocks, a 2-layer approximator of width 32
CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=3, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
              approximator_hidden_dim=32, approximator_layers=2)
GRID = (3, 5)  # 15 image tokens (padded by the degrees 2 and 3) + 6 text (padded by 4)
IDS = (flux.image_ids(*GRID), np.zeros((TEXT, 3), np.float32))
# the tokenizer's masks: prompt lengths 2 and 6 (no padding: the extra token falls off the end)
TOKENIZER_MASK = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**CONFIG), seed=1, std=0.15)
    cfg = chroma.ChromaConfig.from_dict(dict(tm.config))
    return tm, cfg, chroma.build(cfg, chroma.params_from_torch(state_dict_np(tm), cfg))


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, GRID[0] * GRID[1], cfg.in_channels)).astype(np.float32)
    enc = rng.standard_normal((2, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    # ChromaPipeline's mask: the prompt and one padding token, then ones over the image tokens
    mask = np.concatenate([np.asarray(chroma.text_mask(TOKENIZER_MASK)), np.ones((2, x.shape[1]), np.float32)], 1)
    return x, enc, t, mask


FWD = jax.jit(lambda m, x, e, t, mask: m(x, e, t, *IDS, mask))


def _torch(tm, x, enc, t, mask, txt_ids=IDS[1]):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(enc), tt(t), tt(IDS[0]), tt(txt_ids), attention_mask=None if mask is None else tt(mask),
                  return_dict=False)[0].numpy()


def _torch_cropped(tm, x, enc, t, mask):
    """diffusers on each sample's text cropped to the tokens ``mask`` keeps, without a mask (the text ids are zeros:
    cropping moves no position): what a real key mask computes."""
    outs = []
    for i in range(x.shape[0]):
        kept = int(np.count_nonzero(mask[i, :TEXT]))
        outs.append(_torch(tm, x[i:i + 1], enc[i:i + 1, :kept], t[i:i + 1], None, IDS[1][:kept]))
    return np.concatenate(outs)


def test_text_mask_matches_pipeline():
    got = np.asarray(chroma.text_mask(TOKENIZER_MASK))
    np.testing.assert_array_equal(got, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_padded_text_matches_diffusers_on_cropped_text(pair):
    """Sample 0 keeps 3 of its 6 text tokens (prompt 2 + one pad), sample 1 all 6 (mask all ones)."""
    tm, cfg, model = pair
    x, enc, t, mask = _inputs(cfg)
    out = np.asarray(FWD(model, x, enc, t, mask))
    ref = _torch_cropped(tm, x, enc, t, mask)
    # fp32 both sides; outputs O(4); measured max |diff| 2.9e-6
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    diffusers = _torch(tm, x, enc, t, mask)
    # the unpadded sample: diffusers with its own float mask (all ones: a uniform logit shift) agrees too (2.9e-6)
    np.testing.assert_allclose(out[1:], diffusers[1:], atol=2e-5, rtol=0)
    # the mask is no no-op: without it sample 0 moves by 1.09
    assert np.abs(np.asarray(FWD(model, x, enc, t, np.ones_like(mask)))[0] - ref[0]).max() > 0.1
    # diffusers' additive float mask on the padded sample (the 3 padded keys lowered by 1, not removed,
    # diffusers#12116): measured max |diff| to ours 0.48 on outputs O(4) (this random tiny model)
    assert np.abs(diffusers[0] - out[0]).max() > 0.1


@pytest.mark.slow  # without a mask: FLUX's unmasked context path, which the pipeline never takes
def test_matches_diffusers_without_mask(pair):
    tm, cfg, model = pair
    x, enc, t, _ = _inputs(cfg)
    ref = _torch(tm, x, enc, t, None)
    out = np.asarray(jax.jit(lambda m: m(x, enc, t, *IDS))(model))
    # fp32 both sides; outputs O(4); measured max |diff| 2.9e-6
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_approximator_rms_norm_bf16_matches_torch():
    """torch's ``nn.RMSNorm(dim)`` (no eps) in bf16 takes float32's epsilon (1.2e-7, its compute dtype's), not
    bf16's 7.8e-3: on small activations the two differ by O(1)."""
    norm = chroma.Approximator(4, 4, 64, 1, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0)).norms[0]
    x = (np.random.default_rng(0).standard_normal((3, 64)) * 0.01).astype(np.float32)
    tx = torch.from_numpy(x).bfloat16()
    with torch.no_grad():
        ref = torch.nn.RMSNorm(64).bfloat16()(tx).float().numpy()
    out = np.asarray(norm(jax.numpy.asarray(tx.float().numpy(), jax.numpy.bfloat16)).astype(np.float32))
    # bf16 outputs O(2.5); measured max |diff| 0 (with bf16's epsilon: 2.3)
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=0)


def test_config_and_checkpoint_errors(pair):
    tm, cfg, model = pair
    with pytest.raises(ValueError, match="multiple of 4"):
        chroma.ChromaConfig.from_dict(dict(CONFIG, approximator_num_channels=18))
    x, enc, t, mask = _inputs(cfg)
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(lambda: model(x, enc, t, *IDS, mask[:, :4]))
    sd = state_dict_np(tm)
    sd.pop("distilled_guidance_layer.in_proj.weight")
    with pytest.raises(Exception, match="in_proj"):
        chroma.params_from_torch(sd, cfg)


# slow-marked for the time budget: in CI the pipeline test runs cfg=2,ring=2,ulysses=2 == one device and the
# benchmark row cfg=2,ulysses=3 == diffusers (tests/test_chroma_pipeline.py)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["cfg=2,ring=2,ulysses=2", "ulysses=3"])
def test_sequence_parallel_equals_one_device(pair, mesh):
    _, cfg, model = pair
    x, enc, t, mask = _inputs(cfg, seed=2)
    ref = np.asarray(FWD(model, x, enc, t, mask))
    graphdef, state = nnx.split(model)
    m = build_mesh(mesh)

    @jax.jit
    def parallel(state, x, enc, t, mask):
        mdl = nnx.merge(graphdef, state)
        h, tokens, cond = mdl.embed(x, enc, t, *IDS, mask)
        blocks = lambda p, y, tk, c: nnx.merge(graphdef, p).blocks(y, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, h, tokens, cond, m, text=chroma.TEXT_KEYS), cond)

    out = np.asarray(parallel(state, x, enc, t, mask))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the masked text partial); outputs O(4);
    # measured max |diff| 2.7e-6 (cfg=2,ring=2,ulysses=2), 0 (ulysses=3)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0, err_msg=mesh)


def test_full_size_config_parameter_count_matches_diffusers():
    """configs/chroma1-hd's transformer: our parameter tree holds as many weights as diffusers' model (meta device),
    and the conversion's key map covers every one of its keys (shapes only, no weights made)."""
    import json
    from pathlib import Path

    from xdit_jax.keymap import expected_shapes

    hub = json.loads((Path(__file__).resolve().parents[1] / "configs/chroma1-hd/transformer/config.json").read_text())
    hub = {k: v for k, v in hub.items() if not k.startswith("_")}
    with torch.device("meta"):
        tm = TorchModel(**hub)
    want = sum(p.numel() for p in tm.parameters())
    cfg = chroma.ChromaConfig.from_dict(hub)
    shapes = expected_shapes(lambda: chroma.ChromaTransformer2DModel(cfg))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == want  # 8.90B
