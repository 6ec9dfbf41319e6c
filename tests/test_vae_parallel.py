"""Spatially sharded VAE decode == one-device decode, on meshes of 2, 3, 4 and 8 devices with
latent sizes the device grid does not divide; the vae-memory benchmark's rows."""

import contextlib
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xdit_jax.keymap import expected_shapes
from xdit_jax.mesh import build_mesh
from xdit_jax.models import vae_cogvideox as vae_mod
from xdit_jax.parallel import vae as pvae
from xdit_jax.parallel import vae_bench

TINY = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4)
# T=5: an odd 3-frame first chunk, then a scanned 2-frame chunk with the carried conv caches
# (which are sharded too). 5x7 latents -> 17 frames of 40x56; no device count below divides both.
LATENT = (1, 4, 5, 5, 7)


@pytest.fixture(scope="module")
def model():
    """Random weights (std 0.1; norm scales around 1), as tests/torch_util.randomize_ makes them."""
    cfg = vae_mod.CogVideoXVAEConfig(**TINY)
    rng = np.random.default_rng(0)

    def init(path, s):
        noise = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        return noise + 1.0 if getattr(path[-1], "key", None) == "scale" else noise

    params = jax.tree_util.tree_map_with_path(init, expected_shapes(vae_mod.module_fn(cfg)))
    return vae_mod.build(cfg, params)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh", "grid", "strategy"))
def _decode(graphdef, state, z, mesh=None, grid=None, strategy="shard_map"):
    return vae_mod.decode(nnx.merge(graphdef, state), z, mesh=mesh, grid=grid, strategy=strategy)


@pytest.fixture(scope="module")
def z():
    return jnp.asarray(np.random.default_rng(1).standard_normal(LATENT).astype(np.float32))


@pytest.fixture(scope="module")
def reference(model, z):
    graphdef, state = nnx.split(model)
    out = np.asarray(_decode(graphdef, state, z))
    assert out.shape == (1, 3, 17, 40, 56)
    return out


# (mesh spec, grid or None for the default, strategy): 2, 3, 4 devices split the height
# unevenly (the 4-device last block is all padding); 8 devices cannot all get a latent row of
# 5, so the default grid splits the width (7 over 8); (2, 4) splits both, padded both ways,
# with halo corners; GSPMD as the alternative strategy.
CASES = [
    pytest.param("data=2", None, "shard_map", marks=pytest.mark.slow),  # the cfg=2,ulysses=4 cases split 8 ways
    ("ulysses=3", None, "shard_map"),
    ("x=2,y=2", None, "shard_map"),  # a mesh of other axis names than the pipeline's
    ("cfg=2,ulysses=4", None, "shard_map"),
    ("cfg=2,ulysses=4", (2, 4), "shard_map"),
    ("ulysses=3", None, "gspmd"),
]


def _mesh(spec):
    if spec.startswith("x="):  # any Mesh works, whatever its axes are called
        return Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("x", "y"))
    return build_mesh(spec)


@pytest.mark.parametrize("spec,grid,strategy", CASES)
def test_sharded_equals_one_device(model, z, reference, spec, grid, strategy):
    mesh = _mesh(spec)
    graphdef, state = nnx.split(model)
    # As in the pipeline: weights replicated on the pipeline's own mesh (its axes, not the VAE's).
    state = jax.device_put(state, NamedSharding(mesh, P()))
    out = _decode(graphdef, state, z, mesh=mesh, grid=grid, strategy=strategy)
    assert out.shape == reference.shape
    err = np.abs(np.asarray(out) - reference).max()
    assert err <= 1e-4, f"{spec} grid={grid} {strategy}: max abs diff {err}"


def test_choose_grid():
    assert pvae.choose_grid(8, 60, 90) == (8, 1)  # full size: rows only
    assert pvae.choose_grid(3, 5, 7) == (3, 1)
    assert pvae.choose_grid(8, 5, 7) == (1, 8)
    assert pvae.choose_grid(8, 2, 40) == (2, 4)
    assert pvae.choose_grid(1, 1, 1) == (1, 1)


def test_hooks_are_plain_on_one_device():
    x = jnp.arange(2 * 3 * 4 * 8, dtype=jnp.float32).reshape(1, 2, 3, 4, 8)
    y, pad = pvae.conv_halo(x, ((0, 0), (1, 1), (1, 1)))
    assert y is x and pad == ((0, 0), (1, 1), (1, 1))
    mean, var = pvae.group_norm_stats(x, 2)
    xg = np.asarray(x).reshape(1, 2, 3, 4, 2, 4)
    np.testing.assert_allclose(np.asarray(mean)[0, 0, 0, 0, :, 0], xg.mean(axis=(1, 2, 3, 5))[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var)[0, 0, 0, 0, :, 0], xg.var(axis=(1, 2, 3, 5))[0], rtol=1e-5)


def test_vae_memory_bench_rows():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = vae_bench.main(["--model", "tiny", "--devices", "1,4", "--frames", "1", "--height", "24",
                             "--width", "40", "--dtype", "float32", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    assert [r["devices"] for r in rows] == [1, 4]
    for r in rows:
        assert r["bench"] == "vae_decode_memory"
        assert r["peak_bytes_per_device"] > 0 and r["temp_bytes"] > 0 and r["argument_bytes"] > 0
    # The activations split (at this toy size fixed buffers weigh much; the full-size numbers
    # are in the benchmark's docstring).
    assert rows[-1]["peak_bytes_per_device"] < rows[0]["peak_bytes_per_device"]
