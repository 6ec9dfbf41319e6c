"""Small building blocks shared by the DiT models (norms with fp32 statistics, embeddings)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in float32, output in the input dtype.

    Leaves ``scale``/``bias`` map to torch ``weight``/``bias``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        if affine:
            self.scale = nnx.Param(jnp.ones((dim,), dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        else:
            self.scale = self.bias = None

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def accumulates_half_in_f32(dtype) -> bool:
    """Whether a bf16/fp16 matmul should ask for a float32 result (then cast back).

    XLA:CPU runs a bf16 x bf16 -> bf16 GEMM no faster than float32, while bf16 x bf16 -> f32 takes
    its AMX / AVX512-BF16 path: the 2-layer ``cpu-small`` bf16 step takes half the time
    (docs/benchmarks.md). On a GPU cuBLAS accumulates in float32 anyway and the wider output only
    costs bandwidth (+3.5% on the CogVideoX-5B step on an H100), so there the result stays half.
    """
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and jax.default_backend() == "cpu"


class Linear(nnx.Linear):
    """``nnx.Linear`` (same leaves: ``kernel`` (in, out), ``bias``) whose half-precision matmul
    accumulates into a float32 result where that is faster (:func:`accumulates_half_in_f32`); the
    bias is then added in float32 and the sum rounded once to the compute dtype."""

    def __call__(self, inputs):
        dtype = self.dtype or inputs.dtype
        if not accumulates_half_in_f32(dtype):
            return super().__call__(inputs)
        y = jax.lax.dot_general(inputs.astype(dtype), self.kernel[...].astype(dtype),
                                (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                                preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def linear(din: int, dout: int, *, bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs) -> Linear:
    return Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward(dim, activation_fn="gelu-approximate")``: Linear, tanh-GELU, Linear
    (submodules ``net_0`` / ``net_2``, the torch ``net.0.proj`` / ``net.2``); ``inner``: diffusers'
    ``inner_dim`` (default ``mult * dim``, which need not be an integer multiple of ``dim``); ``dim_out``:
    its ``dim_out`` (default ``dim``); ``approximate=False``: ``activation_fn="gelu"`` (erf GELU)."""

    def __init__(self, dim: int, mult: int = 4, *, inner: int | None = None, dim_out: int | None = None,
                 approximate: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = mult * dim if inner is None else inner
        self.approximate = approximate
        self.net_0 = linear(dim, inner, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, dim if dim_out is None else dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.net_0(x)
        return self.net_2(gelu_tanh(h) if self.approximate else jax.nn.gelu(h, approximate=False))


class RMSNorm(nnx.Module):
    """``torch.nn.RMSNorm`` with a weight (q/k norms); statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class PixArtAlphaTextProjection(nnx.Module):
    """diffusers ``PixArtAlphaTextProjection(act_fn="gelu_tanh")``: linear_1 -> tanh-GELU -> linear_2
    (PixArt's caption projection, Wan's text embedder)."""

    def __init__(self, din: int, d: int, *, dtype, rngs):
        self.linear_1 = linear(din, d, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(gelu_tanh(self.linear_1(x)))


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """diffusers ``get_timestep_embedding``: (N,) timesteps -> (N, dim) float32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """diffusers ``TimestepEmbedding`` (linear_1 -> SiLU -> linear_2)."""

    def __init__(self, din: int, dout: int, *, dtype=jnp.float32, rngs: nnx.Rngs, bias: bool = True):
        """``bias=False``: diffusers' ``sample_proj_bias=False`` (FLUX.2)."""
        self.linear_1 = linear(din, dout, bias=bias, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(dout, dout, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# ----- host-side positional tables (numpy, float64 then float32; static shapes) -----

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers ``get_1d_sincos_pos_embed_from_grid``: (M,) -> (M, dim) as [sin, cos]."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)``."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32).astype(np.float64) / dim))
    freqs = np.outer(pos.astype(np.float32).astype(np.float64), freqs)
    return np.repeat(np.cos(freqs), 2, axis=1), np.repeat(np.sin(freqs), 2, axis=1)


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs of ``x`` (B, S, H, D) by (S, D) tables; math in float32."""
    xf = x.astype(jnp.float32)
    x2 = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-x2[..., 1], x2[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


def stack_modules(make, n: int, rngs: nnx.Rngs):
    """``n`` copies of the module ``make(rngs)`` stacked on a leading layer axis (one compile)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def _make(r):
        return make(r)

    return _make(rngs)


def scan_modules(stacked, fn, carry, layers: tuple[int, int] | None = None):
    """Run ``carry = fn(layer, carry)`` over a stacked module with ``lax.scan`` (through
    :func:`xdit_jax.parallel.pipefusion.layer_scan`, which threads PipeFusion's per-layer K/V);
    ``layers``: only the stacked layers ``[start, stop)`` (a static slice).

    A stack whose weights are held layer by layer (:func:`unstack_layers`: each leaf a tuple of per-layer
    arrays) runs unrolled, each layer on its own arrays: no slice of a stacked array in the program."""
    from xdit_jax.parallel.pipefusion import layer_scan

    graphdef, state = nnx.split(stacked)
    if layers is not None:
        state = jax.tree.map(lambda a: a[layers[0]:layers[1]], state, is_leaf=_is_layers)
    if held_layers(state):
        return unrolled_layers(graphdef, state, lambda layer, c, _: (fn(layer, c), None), carry)[0]
    return layer_scan(lambda c, s: fn(nnx.merge(graphdef, s), c), carry, state)


def _is_layers(x) -> bool:
    return isinstance(x, tuple) and len(x) > 0 and all(hasattr(a, "shape") for a in x)


def held_layers(state) -> int:
    """The number of layers of a stack whose weights are held layer by layer (:func:`unstack_layers`), else 0."""
    held = [leaf for leaf in jax.tree.leaves(state, is_leaf=_is_layers) if _is_layers(leaf)]
    return len(held[0]) if held else 0


def unrolled_layers(graphdef, state, fn, carry, xs=None):
    """``carry, y = fn(layer, carry, x)`` layer by layer over weights held layer by layer (``lax.scan``'s
    contract: the ``y`` stacked, ``xs`` sliced on their leading axis), unrolled in the program."""
    from xdit_jax.parallel.pipefusion import _STACK

    if _STACK.get() is not None:
        raise NotImplementedError("PipeFusion splits stacked layers over its stages; weights held layer by "
                                  "layer (unstack_layers) run without it.")
    ys = []
    for i in range(held_layers(state)):
        layer = nnx.merge(graphdef, jax.tree.map(lambda t: t[i], state, is_leaf=_is_layers))
        carry, y = fn(layer, carry, None if xs is None else jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    return carry, (None if not ys or ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


def unstack_layers(state, names):
    """``state`` with the stacked arrays under the top-level entries ``names`` (the model's stacks) split into
    tuples of per-layer arrays, which :func:`scan_modules` runs unrolled: each layer's GEMMs read their
    weights where they lie, where a scan over stacked arrays copies every layer's weights out of the stack
    each step (a GPU's memcpy: 11 % of FLUX.1-dev's step on an H100). The copy is made once, here; compile
    time grows with the depth."""
    names = (names,) if isinstance(names, str) else tuple(names)

    def layer(a, i):
        if isinstance(a, jax.ShapeDtypeStruct):  # abstract weights (a compile-only build)
            sh = a.sharding
            if isinstance(sh, jax.sharding.NamedSharding):
                sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
            return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sh)
        return a[i]

    def split(path, a):
        top = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        return tuple(layer(a, i) for i in range(a.shape[0])) if top in names else a

    return jax.tree_util.tree_map_with_path(split, state)


def final_block(fn, carry):
    """``fn(carry)``: the block that ends a stack after its scan (a two-stream model's
    ``context_pre_only`` last block), through :func:`xdit_jax.parallel.pipefusion.final_block` (under
    PipeFusion it runs on the last stage only, with its own K/V buffers)."""
    from xdit_jax.parallel.pipefusion import final_block as staged

    return staged(fn, carry)
