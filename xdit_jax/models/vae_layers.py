"""Layers every VAE decoder shares (channels-last): a convolution whose spatial 'same' padding
fetches its halo from the neighbouring devices under a spatially sharded decode, and GroupNorm
whose statistics are global there (:mod:`xdit_jax.parallel.vae`'s two hooks; on one device both
are the plain ops). A VAE model built from these never calls a collective itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.parallel import vae as spatial


def group_norm_stats(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance (float32) of ``x`` (N, ..., C) per sample and channel group.

    Reduces over every axis but the first and the group; the results broadcast against
    ``x.reshape(N, ..., G, C // G)``. This is the one reduction over space and time in the
    decoder; it is :func:`xdit_jax.parallel.vae.group_norm_stats`, which under a spatially sharded
    decode leaves out the padding and ``psum``s the partial sums (global statistics).
    """
    return spatial.group_norm_stats(x, num_groups)


def group_norm(x, scale, bias, num_groups: int, eps: float, stats_fn=group_norm_stats):
    """torch ``nn.GroupNorm`` on channels-last ``x``, in float32; returns ``x.dtype``."""
    mean, var = stats_fn(x, num_groups)
    xg = x.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups)).astype(jnp.float32)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)



class Conv(nnx.Module):
    """A convolution over channels-last input with a fixed zero padding (torch ``ConvNd``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 padding: tuple[tuple[int, int], ...] | None = None, *, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros(tuple(kernel_size) + (in_channels, out_channels), dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))
        self.padding = tuple(padding) if padding is not None else ((0, 0),) * len(kernel_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        nd = kernel.ndim - 2
        dims = "DHW"[-nd:]
        dn = ("N" + dims + "C", dims + "IO", "N" + dims + "C")
        x, padding = x.astype(kernel.dtype), self.padding
        if nd >= 2:  # height and width may be split over devices: fetch the halo (a no-op on one)
            x, padding = spatial.conv_halo(x, padding)
        y = jax.lax.conv_general_dilated(x, kernel, (1,) * nd, padding, dimension_numbers=dn)
        return y + self.bias[...]


class GroupNorm(nnx.Module):
    """torch ``nn.GroupNorm`` (affine) with float32 statistics."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, *, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps)
