"""PipeFusion for SANA: the token mixers' buffers (xdit_jax.parallel.token_mixing: the linear attention's per-patch
sums, the grid conv's input) == the full-sequence ops when they hold the same step's values; the pipeline's patched
steps == the same rule run sequentially on one device, on pipefusion and combined meshes; warm-up steps == the plain
run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdit_jax import tiny
from xdit_jax.parallel import token_mixing
from xdit_jax.parallel.attention import AttentionConfig, attention_context
from xdit_jax.pipelines.sana import SanaPipeline

PROMPT = "A small dog running on a beach at sunset."
MSL = tiny.SANA_MAX_SEQUENCE_LENGTH


@pytest.mark.parametrize("grid,patches", [((5, 6), 3), ((3, 4), 4)])  # patches of 10 / 3 tokens: halo 7 / 5
def test_ops_with_buffers_of_this_step_equal_full_sequence(grid, patches):
    """A warm-up call fills the buffers from the whole sequence; the patched calls on the same inputs then see
    this step's values everywhere, so each equals the full-sequence op (a halo longer than a patch included)."""
    h, w = grid
    s = h * w
    plen = -(-s // patches)
    sp = plen * patches
    rng = np.random.default_rng(0)
    b, heads, d, c = 2, 3, 4, 5
    q, k = (jnp.asarray(np.abs(rng.standard_normal((b, sp, heads, d))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, sp, heads, d)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, sp, c)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((3, 3, c)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((c,)), jnp.float32)

    def both(q, k, v, x):
        return token_mixing.linear_attention(q, k, v), token_mixing.grid_conv3x3(x, wt, bias, grid=grid)

    @jax.jit
    def run(q, k, v, x):
        bufs = token_mixing.MixingBuffers(jnp.zeros((1, b, patches, heads, d, d + 1)),
                                          jnp.zeros((1, b, sp + 2 * (w + 1), c)), w + 1)
        with attention_context(AttentionConfig(valid_len=s if sp != s else None)):
            ref = both(q, k, v, x)
            with token_mixing.mixing_state(bufs, 0, jnp.int32(0), True, patches=patches, plen=plen,
                                           warm=np.arange(sp)[None]) as cell:
                warm = both(q, k, v, x)
            outs = []
            for m in range(patches):
                sl = lambda a: a[:, m * plen:(m + 1) * plen]  # noqa: E731
                bufs = token_mixing.MixingBuffers(cell.la, cell.conv, w + 1)
                with token_mixing.mixing_state(bufs, 0, jnp.int32(m), True, patches=patches, plen=plen) as cell:
                    outs.append(both(sl(q), sl(k), sl(v), sl(x)))
        return ref, warm, [jnp.concatenate([o[i] for o in outs], axis=1) for i in range(2)]

    ref, warm, got = run(q, k, v, x)
    for i in range(2):
        # the warm-up call is the plain op (the per-patch sums are extra): bitwise; the patched calls sum the
        # patches' partial sums instead of all tokens at once, the conv adds its 9 taps in another order: float32
        # rounding, measured 1.5e-7 / 1.2e-7 (linear attention, outputs <= 0.7), 9.5e-7 / 2.4e-7 (conv, outputs <= 8)
        np.testing.assert_array_equal(np.asarray(warm[i])[:, :s], np.asarray(ref[i])[:, :s])
        np.testing.assert_allclose(np.asarray(got[i])[:, :s], np.asarray(ref[i])[:, :s], atol=1e-5 if i else 2e-6,
                                   rtol=0)


def test_ops_refuse_pipefusion_without_or_with_wrong_buffers():
    from xdit_jax.parallel.attention import kv_cache

    x = jnp.zeros((1, 4, 2, 3))
    with kv_cache(jnp.zeros((0, 1, 4, 1, 1)), jnp.zeros((0, 1, 4, 1, 1)), 0, 0, True, slots=0):
        with pytest.raises(NotImplementedError, match="init_mixing"):
            token_mixing.linear_attention(x, x, x)
        with pytest.raises(NotImplementedError, match="init_mixing"):
            token_mixing.grid_conv3x3(x[..., 0], jnp.zeros((3, 3, 2)), grid=(2, 2))
    bufs = token_mixing.MixingBuffers(jnp.zeros((1, 1, 2, 2, 3, 4)), jnp.zeros((1, 1, 8 + 2 * 3, 2)), 3)  # 2 wide
    with token_mixing.mixing_state(bufs, 0, jnp.int32(0), True, patches=2, plen=4):
        with pytest.raises(ValueError, match="grid width 4"):  # a 2 x 4 grid: its halo is 5, the buffer's 3
            token_mixing.grid_conv3x3(jnp.zeros((1, 4, 2)), jnp.zeros((3, 3, 2)), grid=(2, 4))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("sana") / "tiny", family="sana")


def _run(folder, prompts, lat, steps=3, **load):
    kw = dict(height=lat.shape[2] * 4, width=lat.shape[3] * 4, num_inference_steps=steps, latents=lat,
              max_sequence_length=MSL, use_resolution_binning=False, complex_human_instruction=[], progress=False,
              output_type="latent")
    return SanaPipeline.from_pretrained(folder, **load)(prompts, **kw).images


@pytest.fixture(scope="module")
def sequential(folder):
    """The tiny SANA (2 blocks, 9 x 12 latent grid: 108 tokens, halo 13) for 3 steps: exact on one device, and the
    sequential patched rule (2 patches of 56 tokens, one warm-up step)."""
    lat = np.random.default_rng(3).standard_normal((1, 4, 9, 12)).astype(np.float32)
    return lat, _run(folder, PROMPT, lat), _run(folder, PROMPT, lat, pipefusion_patches=2)


def test_pipefusion_matches_sequential_rule(folder, sequential):
    """pipefusion=2 (the 2 blocks on 2 stages, 2 patches): its patched steps == the same rule run sequentially on one
    device; warm-up-only (every step a warm-up step, the buffers filled and never read) == the plain run."""
    lat, exact, ref = sequential
    out = _run(folder, PROMPT, lat, mesh="pipefusion=2")
    # latents O(5): measured 0.0 (the stages compute each patch as the sequential rule does), while the patched
    # rule moves them by 0.68 from the exact run
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.abs(ref - exact).max() > 1e-2  # the patched steps really ran (stale sums and halos differ)
    warm = _run(folder, PROMPT, lat, pipefusion_patches=2, pipefusion_warmup_steps=3)
    np.testing.assert_array_equal(warm, exact)  # measured: bitwise (the warm-up runs the plain ops)


@pytest.mark.parametrize("mesh", ["cfg=2,pipefusion=2,ulysses=2",
                                  pytest.param("pipefusion=2,ring=2,ulysses=2", marks=pytest.mark.slow)])
def test_pipefusion_combined_mesh_matches_sequential_rule(folder, sequential, mesh):
    """PipeFusion x CFG x Ulysses (and x ring): each patch split over the sequence group (its partial sums psum'ed, its
    conv input gathered), == the sequential rule."""
    lat, _, ref = sequential
    out = _run(folder, PROMPT, lat, mesh=mesh)
    # latents O(5): measured 2.4e-6 (both meshes): float32 rounding of the sums split over devices, vs 0.68 that
    # the patched rule moves them
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_pipefusion_halo_longer_than_a_patch(folder):
    """A 4 x 24 grid (halo 25 tokens) in 8 patches of 16 tokens, two prompts on data=2,pipefusion=2,ulysses=2: a halo
    reads two neighbouring patches (this step's before, the last step's after), == the sequential rule."""
    lat = np.random.default_rng(4).standard_normal((2, 4, 4, 24)).astype(np.float32)
    prompts = [PROMPT, "A cat."]
    ref = _run(folder, prompts, lat, steps=3, pipefusion_patches=8)
    out = _run(folder, prompts, lat, steps=3, mesh="data=2,pipefusion=2,ulysses=2", pipefusion_patches=8)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # measured 1.8e-6 (latents O(5))
    exact = _run(folder, prompts, lat, steps=3)
    assert np.abs(ref - exact).max() > 1e-2  # measured 0.31


@pytest.mark.slow
def test_pipefusion_uneven_stages(tmp_path):
    """3 blocks on 2 stages (2 + 1 and a padding slot): == the sequential rule."""
    f3 = tiny.make_tiny_model(tmp_path / "tiny3", family="sana", transformer={"num_layers": 3})
    lat = np.random.default_rng(5).standard_normal((1, 4, 9, 12)).astype(np.float32)
    ref = _run(f3, PROMPT, lat, steps=3, pipefusion_patches=2)
    out = _run(f3, PROMPT, lat, steps=3, mesh="pipefusion=2")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # measured 0.0


# Slow: Sprint's step differs from SANA's only outside the blocks (the trig-flow scaling, the SCM update), and the
# blocks' PipeFusion runs above (test_pipefusion_matches_sequential_rule); Sprint's pipeline == diffusers and its
# meshes in tests/test_sana_sprint_pipeline.py.
@pytest.mark.slow
def test_sana_sprint_pipefusion_matches_sequential_rule(tmp_path):
    """Sana Sprint (guidance embedded, 2 SCM steps: one warm-up, one patched) on pipefusion=2,ulysses=2 == the
    sequential patched rule on one device; the patched step really differs from the exact run."""
    from xdit_jax.pipelines.sana import SanaSprintPipeline

    f = tiny.make_tiny_model(tmp_path / "sprint", family="sana-sprint")
    lat = np.random.default_rng(3).standard_normal((1, 4, 9, 12)).astype(np.float32)
    kw = dict(height=36, width=48, latents=lat, max_sequence_length=MSL, use_resolution_binning=False,
              complex_human_instruction=[], progress=False, output_type="latent", seed=5)
    run = lambda **load: SanaSprintPipeline.from_pretrained(f, **load)(PROMPT, **kw).images  # noqa: E731
    exact, ref = run(), run(pipefusion_patches=2)
    out = run(mesh="pipefusion=2,ulysses=2")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)  # measured 6.0e-7 (latents O(3.5))
    assert np.abs(ref - exact).max() > 1e-2  # measured 0.10
