"""PipeFusion on 8 simulated CPU devices.

Two contracts (xdit_jax/parallel/pipefusion.py):
* a warm-up step (one patch: the whole sequence) is exact: equal to one device;
* a patched step follows the displaced-patch rule (each patch's attention sees this step's K/V for
  the patches before it and the previous step's for those after it), and every mesh equals the
  sequential reference of that rule: the same patches run one after the other on one device.
Plus the mechanics on their own: patched with buffers made from the same input is exact.

Tolerance: fp32, only summation order differs (stage splits, patch-wise attention); pixels in
[0, 1]; 1e-4 as for the other meshes (measured <= 1.1e-5). A wrong offset, mask or stage order
gives errors of order 0.1 (the patched rule itself differs from exact by 0.11 here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xdit_jax import CogVideoXPipeline, tiny
from xdit_jax.mesh import MeshSpec, build_mesh
from xdit_jax.models import cogvideox
from xdit_jax.parallel import pipefusion
from xdit_jax.parallel.sequence import run_blocks

PROMPTS = ["A small dog running on a beach at sunset.", "A cat sleeping on a sofa."]
KW = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=6.0,
          max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, progress=False, seed=3)
# 4 layers (stages of 2 and of 1), 6 heads, RoPE; 16 text + 18 video = 34 tokens (patches pad it).
TRANSFORMER = dict(num_layers=4, num_attention_heads=6, use_rotary_positional_embeddings=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("pf") / "m", transformer=TRANSFORMER)


@pytest.fixture(scope="module")
def one_device(folder):
    return CogVideoXPipeline.from_pretrained(folder)(PROMPTS, **KW).frames


@pytest.fixture(scope="module")
def sequential(folder):
    """The displaced-patch rule run sequentially on one device, 2 and 3 patches."""
    return {m: CogVideoXPipeline.from_pretrained(folder, pipefusion_patches=m)(PROMPTS, **KW).frames for m in (2, 3)}


SLOW = pytest.mark.slow  # cases another case covers (the default run stays under 20 minutes); `-m slow` runs them


@pytest.mark.parametrize("mesh", [pytest.param("pipefusion=2", marks=SLOW),
                                  pytest.param("cfg=2,pipefusion=4", marks=SLOW),
                                  "pipefusion=3",  # 3: stages of 2, 1, 1
                                  "pipefusion=2,ring=2,ulysses=2"])
def test_warmup_steps_equal_one_device(folder, one_device, mesh):
    out = CogVideoXPipeline.from_pretrained(folder, mesh=mesh, pipefusion_warmup_steps=KW["num_inference_steps"])(
        PROMPTS, **KW).frames
    assert np.abs(out - one_device).max() <= 1e-4


@pytest.mark.parametrize("mesh,patches", [pytest.param("pipefusion=2", 2, marks=SLOW), pytest.param("pipefusion=2", 3, marks=SLOW),
                                          pytest.param("pipefusion=4", 2, marks=SLOW),
                                          pytest.param("cfg=2,pipefusion=2", 2, marks=SLOW), ("data=2,pipefusion=2", 3),
                                          pytest.param("pipefusion=3", 2, marks=SLOW),
                                          ("cfg=2,pipefusion=2,ulysses=2", 2),
                                          ("pipefusion=2,ulysses=4", 3),  # 6 heads padded to 8
                                          pytest.param("pipefusion=2,ring=4", 2, marks=SLOW),
                                          pytest.param("pipefusion=2,ring=2,ulysses=2", 3, marks=SLOW)])  # (ring x PipeFusion: test_pipefusion_stacks)
def test_patched_steps_equal_sequential_reference(folder, sequential, one_device, mesh, patches):
    pipe = CogVideoXPipeline.from_pretrained(folder, mesh=mesh, pipefusion_patches=patches)
    out = pipe(PROMPTS, **KW).frames
    assert np.abs(out - sequential[patches]).max() <= 1e-4
    # and the rule is not the exact one (stale K/V change the result): the test can tell them apart
    assert np.abs(sequential[patches] - one_device).max() > 1e-2


def _tiny_blocks():
    cfg = cogvideox.CogVideoXConfig.from_dict({**tiny.TRANSFORMER, **TRANSFORMER})
    model = cogvideox.CogVideoXTransformer3DModel(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 4, 6)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    joint, tokens, temb = model.embed(x, enc, jnp.array([500, 500]))
    blocks = lambda p, j, t, c: nnx.merge(graphdef, p).blocks(j, t, c)
    return cfg, state, blocks, joint, tokens, temb


@pytest.mark.parametrize("mesh,patches,backend", [pytest.param(None, 3, "xla", marks=SLOW),  # the meshes below cover it
                                                  pytest.param("pipefusion=2", 2, "xla", marks=SLOW),
                                                  pytest.param("pipefusion=4", 3, "xla", marks=SLOW),
                                                  ("cfg=2,pipefusion=2", 4, "xla"),
                                                  ("pipefusion=3", 2, "xla"), ("pipefusion=2,ulysses=2", 2, "xla"),
                                                  ("pipefusion=2,ring=2,ulysses=2", 3, "xla"),
                                                  ("pipefusion=2,ring=2", 2, "pallas")])
def test_patches_with_buffers_of_the_same_input_are_exact(mesh, patches, backend):
    """Buffers filled by a warm-up step on the same input hold exactly the K/V each patch recomputes,
    so the patched pass must give the full pass: checks patch offsets, token tables, masks, stages."""
    cfg, state, blocks, joint, tokens, temb = _tiny_blocks()
    ref = run_blocks(blocks, state, joint, tokens, temb, None)
    m = build_mesh(mesh)
    stages = m.shape["pipefusion"]
    state = pipefusion.pad_stack(state, "transformer_blocks", stages)  # 4 layers on 3 stages: 6 slots
    slots = len(pipefusion.stage_layout(cfg.num_layers, stages))
    cache = pipefusion.init_cache(m, slots, 2, joint.shape[1], cfg.num_attention_heads, cfg.attention_head_dim,
                                  jnp.float32, patches)
    mesh_arg = m if mesh else None

    def run(warmup):
        return jax.jit(lambda st, j, c: pipefusion.run_pipefusion(
            blocks, st, j, tokens, temb, c, mesh_arg, patches=patches, warmup=warmup, stacked="transformer_blocks",
            backend=backend, num_layers=cfg.num_layers))

    warm, cache1 = run(True)(state, joint, cache)
    patched, cache2 = run(False)(state, joint, cache1)
    assert float(jnp.abs(warm - ref).max()) <= 1e-5
    assert float(jnp.abs(patched - ref).max()) <= 1e-5
    assert float(jnp.abs(cache2[0] - cache1[0]).max()) <= 1e-5  # the same K/V were written back
    assert cache1[0].shape[2] % patches == 0 and cache1[0].shape[2] >= joint.shape[1]


def test_stage_layout():
    """Uneven stages differ by one layer; padding slots (-1) are skipped; even stages are the identity."""
    np.testing.assert_array_equal(pipefusion.stage_layout(4, 3), [0, 1, 2, -1, 3, -1])
    np.testing.assert_array_equal(pipefusion.stage_layout(30, 4), list(range(0, 8)) + list(range(8, 16))
                                  + list(range(16, 23)) + [-1] + list(range(23, 30)) + [-1])
    np.testing.assert_array_equal(pipefusion.stage_layout(42, 6), np.arange(42))


def test_bad_pipefusion_requests(folder):
    with pytest.raises(ValueError, match=r"pipefusion=8 is more stages than the model's 4 layers"):
        CogVideoXPipeline.from_pretrained(folder, mesh="pipefusion=8")
    with pytest.raises(ValueError, match="warmup"):
        CogVideoXPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_warmup_steps=0)
    pipefusion.check_mesh(MeshSpec.parse("data=2,cfg=2,pipefusion=2"), 30)  # fine


def test_stages_hold_their_layers_and_send_only_patches(folder):
    """The stacked blocks are stored split over the stages; one patched step sends one patch of
    activations per tick (M + N - 1 ticks) and all-reduces the output once; nothing else."""
    from xdit_jax.parallel import comm

    pipe = CogVideoXPipeline.from_pretrained(folder, mesh="pipefusion=2", pipefusion_patches=2)
    _, state = nnx.split(pipe.transformer)
    for kp, leaf in jax.tree_util.tree_leaves_with_path(state):
        stacked = pipefusion.starts_with(kp, "transformer_blocks")
        assert leaf.sharding.spec == (jax.sharding.PartitionSpec("pipefusion") if stacked
                                      else jax.sharding.PartitionSpec()), jax.tree_util.keystr(kp)
    compiled = pipe.compile_step(1, height=KW["height"], width=KW["width"], num_frames=KW["num_frames"],
                                 num_inference_steps=2, max_sequence_length=tiny.MAX_SEQUENCE_LENGTH)
    stats = comm.collective_stats(compiled)
    tc = pipe.transformer_config
    seq = pipefusion.padded_length(tiny.MAX_SEQUENCE_LENGTH + 3 * (32 // 16) * (48 // 16), 2)  # 34 -> 2 x 24
    d = tc.num_attention_heads * tc.attention_head_dim
    got = {s["op"]: (s["count"], s["bytes"]) for s in stats}
    assert got == {"collective-permute": (2 + 2 - 1, 2 * (seq // 2) * d * 4), "all-reduce": (1, 2 * seq * d * 4)}


def test_unpadded_transformer_on_uneven_stages_is_refused(folder):
    """A transformer laid out for one device, handed to a pipeline on uneven stages: a clear error."""
    one = CogVideoXPipeline.from_pretrained(folder)
    kw = dict(transformer=one.transformer, transformer_config=one.transformer_config, vae=one.vae,
              vae_config=one.vae_config, text_encoder=one.text_encoder, tokenizer=one.tokenizer,
              scheduler_config=one.scheduler_config)
    with pytest.raises(ValueError, match="holds 4 stacked layers in transformer_blocks, PipeFusion.s stages need 6"):
        CogVideoXPipeline(**kw, mesh="pipefusion=3")
    CogVideoXPipeline(**kw, mesh="pipefusion=2")  # even stages: the same layout
