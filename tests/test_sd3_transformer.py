"""SD3 / SD3.5 transformer == diffusers SD3Transformer2DModel; its sequence-parallel run == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as TorchModel
from diffusers.models.embeddings import PatchEmbed as TorchPatchEmbed

from tests.jax_util import sequence_parallel_forward
from tests.torch_util import randomize_, state_dict_np
from xdit_jax.mesh import build_mesh
from xdit_jax.models import sd3
from xdit_jax.safetensors_io import CheckpointError

TEXT = 7  # text tokens (77 CLIP + 256 T5 = 333 in SD3)
# 3 heads of 16 (zero-padded to 4 on ulysses=2), 3 blocks: 2 stacked + the last (context_pre_only).
# A 16x16 position table (as 192x192) over a base grid of 4 (sample_size 8 / patch 2; SD3: 64), so
# both latent shapes below are centre crops with positions i * 4 / 16.
BASE = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
        "attention_head_dim": 16, "num_attention_heads": 3, "joint_attention_dim": 24, "caption_projection_dim": 48,
        "pooled_projection_dim": 16, "pos_embed_max_size": 16}
# SD3 Medium: no q/k norm. SD3.5 Medium: RMS q/k norms and dual attention in the first blocks — here
# blocks 0 and 2 (the last one included), so the stack splits in two runs (dual 0, plain 1).
VARIANTS = {"sd3": {**BASE, "qk_norm": None},
            "sd35": {**BASE, "qk_norm": "rms_norm", "dual_attention_layers": (0, 2)}}
# (batch, latent h, latent w): a 3x5 grid (15 tokens: padded by degrees 2 and 4) and a square 4x4.
SHAPES = [(2, 6, 10), (1, 8, 8)]


def _fwd(m, *a):
    return m(*a)


FWD = jax.jit(_fwd)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    torch.manual_seed(0)
    tm = randomize_(TorchModel(**VARIANTS[request.param]), seed=1, std=0.15)
    with torch.no_grad():  # a stored table that is not the formula's: diffusers uses the checkpoint's buffer
        tm.pos_embed.pos_embed.add_(0.05 * torch.randn(tm.pos_embed.pos_embed.shape, generator=torch.Generator()
                                                       .manual_seed(2)))
    cfg = sd3.SD3Config.from_dict(dict(tm.config))
    return request.param, tm, cfg, sd3.build(cfg, sd3.params_from_torch(state_dict_np(tm), cfg))


def _inputs(cfg, b, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    enc = rng.standard_normal((b, TEXT, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)
    t = np.array([300.8, 975.0][:b], np.float32)
    return x, enc, pooled, t


def _torch(tm, x, enc, pooled, t):
    tt = torch.from_numpy
    with torch.no_grad():
        return tm(tt(x), tt(enc), tt(pooled), tt(t), return_dict=False)[0].numpy()


def test_pos_table_matches_diffusers():
    for dim, max_size, base, gh, gw in [(48, 16, 4, 3, 5), (48, 16, 4, 8, 8), (48, 16, 4, 16, 16),
                                        (1536, 192, 64, 64, 64), (1536, 192, 64, 48, 85)]:
        pe = TorchPatchEmbed(height=base * 2, width=base * 2, patch_size=2, in_channels=4, embed_dim=dim,
                             pos_embed_max_size=max_size)
        ref = pe.cropped_pos_embed(gh * 2, gw * 2)[0].numpy()
        # float64 sinusoids from two libraries (numpy's SIMD sin vs torch's), rounded to float32: a value near a
        # float32 rounding boundary can land one float32 ulp apart (seen: 1 of 720, run to run); |values| <= 1
        np.testing.assert_allclose(sd3.pos_table(dim, gh, gw, max_size, base), ref, rtol=0, atol=2 ** -23)


def test_matches_diffusers(pair):
    name, tm, cfg, model = pair
    for shape in SHAPES:
        args = _inputs(cfg, *shape)
        ref = _torch(tm, *args)
        out = np.asarray(FWD(model, *args))
        assert out.shape == ref.shape == (shape[0], cfg.out_ch) + shape[1:]
        # fp32 both sides, outputs O(3-6): measured 3.9e-5, nearly all from the timestep sinusoid (float32
        # t x freq ~ 975 rad: XLA's and torch's exp differ by an ulp, the sin/cos inputs by 6e-5 rad;
        # with t = 1.5, 3 the error is 2e-6). 1e-4 leaves 2.5x room; the bugs tried are O(1) (position
        # table cropped at the top-left corner: 2.5 / 1.7).
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5, err_msg=f"{name} {shape}")


@jax.jit(static_argnames="skip")
def _fwd_skipping(m, x, enc, pooled, t, skip):
    tokens_x, tokens, cond = m.embed(x, enc, pooled, t)
    return m.head(m.blocks(tokens_x, tokens, cond, skip_layers=skip), cond, x.shape)


def test_skip_layers_match_diffusers(pair):
    """diffusers' ``skip_layers`` (skip-layer guidance's pass): a block inside a run, the first, the last."""
    name, tm, cfg, model = pair
    args = _inputs(cfg, *SHAPES[0])
    full = _torch(tm, *args)
    for skip in [(1,), (0, 2)]:
        with torch.no_grad():
            ref = tm(*(torch.from_numpy(a) for a in args), skip_layers=list(skip), return_dict=False)[0].numpy()
        out = np.asarray(_fwd_skipping(model, *args, skip=skip))
        assert np.abs(ref - full).max() > 0.1  # the skipped blocks matter
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5, err_msg=f"{name} skip {skip}")  # as above


@pytest.mark.slow  # (the default run's time; bf16 vs fp32 of the other families' blocks: their transformer tests)
def test_bf16_close_to_fp32(pair):
    name, tm, cfg, m32 = pair
    m16 = sd3.build(cfg, sd3.params_from_torch(state_dict_np(tm), cfg, dtype=jnp.bfloat16), jnp.bfloat16)
    args = _inputs(cfg, *SHAPES[0], seed=1)
    ref = np.asarray(FWD(m32, *args))
    out = np.asarray(FWD(m16, *args).astype(jnp.float32))
    # bf16 weights and activations (8-bit mantissa, 0.4% steps), norms and softmax in float32:
    # through 3 blocks a few % of the output scale (measured 2.7% for both variants).
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 0.05, (name, err)


def test_config_checkpoint_and_input_errors(pair):
    name, tm, cfg, _ = pair
    d = dict(tm.config)
    for bad, needle in [({"qk_norm": "layer_norm"}, "qk_norm"), ({"num_layers": 1}, "at least 2"),
                        ({"caption_projection_dim": 40}, "caption_projection_dim"),
                        ({"dual_attention_layers": [5]}, "dual_attention_layers")]:
        with pytest.raises(ValueError, match=needle):
            sd3.SD3Config.from_dict({**d, **bad})
    # SD3.5 Medium's layout: dual attention in blocks 0..12 of 24 -> two stacked runs and a plain last block
    medium = sd3.SD3Config.from_dict({**d, "num_layers": 24, "dual_attention_layers": list(range(13))})
    assert medium.runs() == (("transformer_blocks", 0, 13, True), ("transformer_blocks_part1", 13, 10, False))
    large = sd3.SD3Config.from_dict({**d, "num_layers": 38, "dual_attention_layers": []})  # SD3.5 Large
    assert large.runs() == (("transformer_blocks", 0, 37, False),)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        sd3.check_input_shape(cfg, 5, 4)
    with pytest.raises(ValueError, match="pos_embed_max_size=16"):
        sd3.check_input_shape(cfg, 8, 34)
    sd = state_dict_np(tm)
    last = cfg.num_layers - 1
    sd.pop(f"transformer_blocks.{last}.attn.add_q_proj.weight")  # unused by the last block: no error
    table = sd.pop("pos_embed.pos_embed")  # a checkpoint without the buffer: the formula's table
    m = cfg.pos_embed_max_size
    computed = sd3.params_from_torch(dict(sd), cfg)["pos_embed"]["pos_embed"]
    np.testing.assert_allclose(computed, sd3.pos_table(cfg.inner_dim, m, m, m, cfg.base_size)[None], rtol=0,
                               atol=2 ** -23)  # (numpy's SIMD sin: one float32 ulp at most, as above)
    assert np.abs(computed - table).max() > 0.01  # the fixture's stored table differs (see pair)
    sd.pop("transformer_blocks.0.ff_context.net.0.proj.weight")
    sd.pop(f"transformer_blocks.{last}.norm1_context.linear.bias")
    sd["pos_embed.proj.weight"] = sd["pos_embed.proj.weight"][:, :-1]
    sd[f"transformer_blocks.{last + 1}.ff.net.2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as e:
        sd3.params_from_torch(sd, cfg)
    for key in ("transformer_blocks.0.ff_context.net.0.proj.weight", f"{last}.norm1_context.linear.bias",
                "pos_embed.proj.weight", f"transformer_blocks.{last + 1}.ff.net.2.weight"):
        assert key in str(e.value), key
    if name == "sd35":  # a dual-attention checkpoint read with a config that lacks the option
        with pytest.raises(CheckpointError, match="attn2"):
            sd3.params_from_torch(state_dict_np(tm), sd3.SD3Config.from_dict({**d, "dual_attention_layers": []}))


# (mesh, the text sharded over the sequence group as the pipeline runs it, or held whole by every device)
MESHES = [("ulysses=2", True), ("ring=2", True), ("ring=2,ulysses=2", True), ("ulysses=3", True),
          ("cfg=2,ulysses=2", True), ("ring=2,ulysses=2", False)]


@pytest.mark.parametrize("mesh,sharded", MESHES)
def test_sequence_parallel_equals_one_device(pair, mesh, sharded):
    name, _, cfg, model = pair
    args = _inputs(cfg, *SHAPES[0], seed=2)  # 15 image tokens: padded by degrees 2 and 4
    ref = np.asarray(FWD(model, *args))
    parallel = sequence_parallel_forward(model, build_mesh(mesh), text=sd3.TEXT_KEYS if sharded else None)
    out = np.asarray(parallel(*args))
    # fp32; only the order of float32 sums differs (ring's LSE merge, the text partial, padded zero heads):
    # measured 1.5e-6 on outputs O(3-5) (0 for ulysses=3, whose 3 heads need no padding).
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0, err_msg=f"{name} {mesh}")


def test_convert_component_from_saved_folder(pair, tmp_path):
    """A diffusers ``save_pretrained`` folder (safetensors + config.json, the pos_embed buffer included)
    converts through the registered class name to the same model."""
    from xdit_jax.conversion import convert_component

    _, tm, cfg, model = pair
    tm.save_pretrained(tmp_path / "transformer")
    cfg_dict, params = convert_component(tmp_path / "transformer", "SD3Transformer2DModel")
    conv = sd3.build(sd3.SD3Config.from_dict(cfg_dict), params)
    args = _inputs(cfg, *SHAPES[1], seed=3)
    np.testing.assert_array_equal(np.asarray(FWD(conv, *args)), np.asarray(FWD(model, *args)))
