"""Helpers for tests that need no torch."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_state(model_class, cfg, seed):
    """(graphdef, state) of a model of ``cfg`` whose every parameter is drawn on the host: N(0, 1/fan_in)
    for matrices, N(0, 0.1) for the rest (no zero-initialised gate or output hides a wrong path; no
    compiled init: a few ms, where an eager nnx init of a tiny model takes 6-15 s)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(a):
        std = a.shape[-2] ** -0.5 if a.ndim >= 2 else 0.1
        return jnp.asarray(std * rng.standard_normal(a.shape), a.dtype)

    return graphdef, jax.tree.map(draw, abstract)


def sequence_parallel_forward(model, mesh, text=None):
    """A jitted ``f(x, *embed_args, **embed_kwargs)`` = ``model(x, ...)`` with its blocks run over ``mesh`` by
    :func:`xdit_jax.parallel.sequence.run_blocks` (``text``: a two-stream model's text keys): the forward of the
    transformers whose pieces are ``embed(x, ...) -> (x, tokens, cond)``, ``blocks(x, tokens, cond)`` and
    ``head(x, cond, x's shape)`` (CogVideoX, Wan, Mochi, SD3)."""
    from xdit_jax.parallel.sequence import run_blocks

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, *args, **kwargs):
        mdl = nnx.merge(graphdef, state)
        y, tokens, cond = mdl.embed(x, *args, **kwargs)
        blocks = lambda p, h, tk, c: nnx.merge(graphdef, p).blocks(h, tk, c)  # noqa: E731
        return mdl.head(run_blocks(blocks, state, y, tokens, cond, mesh, text=text), cond, x.shape)

    return lambda x, *args, **kwargs: forward(state, x, *args, **kwargs)


def bench_rows_vs_diffusers(monkeypatch, model, meshes, tol=1e-5):
    """scripts/benchmark.py's step rows of the preset ``model`` on ``meshes`` (None: one device) against diffusers'
    transformer on the same weights and inputs, one timed step, by mesh name ("single device", "torch cpu", ...):
    every row present and without error; each of ours within ``tol`` of diffusers (fp32, outputs O(1): the bench
    families measured 4e-7 - 8e-7, where a timestep, mask, RoPE or token-layout slip moves them by O(0.01) and more);
    on one device, the compiled program's dot FLOPs == the analytic formula (it counts every dot)."""
    import pytest

    from xdit_jax import bench

    monkeypatch.setattr(bench, "measure_host_sgemm_tflops", lambda: 0.1)  # the host's roofline: not under test here
    rows = bench.run_step_benchmark(bench.StepOptions(model=model, meshes=meshes, steps=1, compare="diffusers",
                                                      settle=0, log=lambda s: None))
    by_mesh = {r["mesh"]: r for r in rows}
    names = [m or "single device" for m in meshes]
    assert sorted(by_mesh) == sorted(["torch cpu"] + names)
    for r in rows:
        assert "error" not in r, r.get("error")
    for m in names:
        assert by_mesh[m]["max_abs_diff_vs_diffusers"] < tol, m
    if "single device" in by_mesh:
        one = by_mesh["single device"]
        assert one["flops_hlo"] == pytest.approx(one["flops_analytic"], rel=1e-9)
    return by_mesh


def full_size_parameter_counts(name):
    """The bench folder ``name`` at full size: our module's parameter count (shapes only, nothing allocated) and
    diffusers' model of the same config built on torch's meta device, as ``(ours, diffusers)``."""
    import diffusers
    import torch

    from xdit_jax import bench

    w = bench.load_workload(name)
    cls = getattr(diffusers, w.fam.model_class_name)
    with torch.device("meta"):
        tm = cls.from_config({k: v for k, v in w.transformer.items() if not k.startswith("_")})
    shapes = w.fam.module.expected_shapes(lambda: w.fam.model_class(w.fam.config(w.transformer)))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)), sum(p.numel() for p in tm.parameters())


def assert_inpainting_refusals(pipe, prompt, image, mask, height, width):
    """An inpainting pipeline's bad input, each refused with what to give: no mask, no image, a mask array of
    another size, a strength out of [0, 1]."""
    import pytest

    with pytest.raises(ValueError, match="needs mask_image="):
        pipe(prompt, image=image, height=height, width=width)
    with pytest.raises(ValueError, match="needs image="):
        pipe(prompt, mask_image=mask, height=height, width=width)
    with pytest.raises(ValueError, match=r"mask_image array \(8, 8\)"):
        pipe(prompt, image=image, mask_image=np.zeros((8, 8)), height=height, width=width)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        pipe(prompt, image=image, mask_image=mask, height=height, width=width, strength=1.5)
