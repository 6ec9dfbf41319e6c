"""Shared layers: the half-precision Linear's float32 accumulation (the CPU's fast bf16 GEMM path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xdit_jax.models import layers


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_accumulates_in_f32_on_cpu(bias):
    lin = layers.linear(48, 40, bias=bias, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    if bias:
        lin.bias[...] = jax.random.normal(jax.random.key(1), (40,), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (3, 5, 48), jnp.bfloat16)
    out = jax.jit(lambda m, x: m(x))(lin, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, 5, 40)
    # torch.nn.functional.linear on the same bf16 values, computed in float64, rounded once to bf16:
    # our result may differ from it only by the rounding of the float32 sum (<= 1 bf16 ulp).
    w = torch.from_numpy(np.array(lin.kernel[...].astype(jnp.float32))).double()
    b = torch.from_numpy(np.array(lin.bias[...].astype(jnp.float32))).double() if bias else None
    ref = torch.nn.functional.linear(torch.from_numpy(np.array(x.astype(jnp.float32))).double(), w.T, b)
    ref = ref.to(torch.bfloat16).float().numpy()
    got = np.asarray(out.astype(jnp.float32))
    ulp = np.abs(ref) * 2.0 ** -7
    assert np.all(np.abs(got - ref) <= ulp + 1e-6)
    hlo = jax.jit(lambda m, x: m(x)).lower(lin, x).as_text()
    on_cpu = jax.default_backend() == "cpu"
    # The speed-relevant property: on the CPU the GEMM takes bf16 operands and gives float32.
    assert ("xbf16>) -> tensor<3x5x40xf32>" in hlo) == on_cpu, hlo


def test_f32_linear_is_nnx_linear():
    lin = layers.linear(8, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(nnx.Linear.__call__(lin, x)))
    assert not layers.accumulates_half_in_f32(jnp.float32)
