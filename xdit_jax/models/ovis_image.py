"""Ovis-Image transformer (diffusers ``OvisImageTransformer2DModel``, AIDC-AI/Ovis-Image-7B) in Flax NNX.

FLUX.1's architecture (:mod:`xdit_jax.models.flux`: double-stream blocks, then single-stream blocks over the joint
[text; image] sequence, 3-axis RoPE over (t, y, x) ids with theta 10000, FLUX's q/k RMS norms and adaLN-Zero
modulation, the continuous adaLN head) with these differences, each a small subclass here:

* the feed-forwards are SwiGLU: the double-stream blocks' ``ff`` / ``ff_context`` are diffusers'
  ``FeedForward(activation_fn="swiglu")`` (``net.0.proj``: d -> 2 x 4d, value then gate, ``value * silu(gate)``;
  ``net.2``: 4d -> d) and the single-stream blocks' ``proj_mlp`` is 2 x 4d wide (``silu(gate) * value``, value
  first) before the same ``proj_out`` over [attention; MLP] (:class:`SwiGLU`, :class:`DoubleBlock`,
  :class:`SingleBlock`);
* no pooled text projection and no guidance embedding: the time embedding alone (``timestep_embedder``, at the top
  level) conditions every block;
* the text (Qwen3's last hidden state, 2048 wide) goes through an RMSNorm (``context_embedder_norm``, eps 1e-6,
  with weight) before ``context_embedder``;
* the pipeline's text ids are (0, i, i): the text tokens ARE rotated (FLUX's are zeros), which FLUX's per-sample
  text tables (``context_rope``) already carry.

The parallel forms are FLUX's: the image tokens are the sharded sequence, the text sharded with them and joining
each attention as the context (``run_blocks(..., text=TEXT_KEYS)``: :meth:`flux.FluxTransformer2DModel.blocks`,
the single-stream blocks through :meth:`flux.SingleBlock.pair`); PipeFusion splits both stacks over all stages
(:func:`pipefusion_stacks`, FLUX's looped two-stack form).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models.layers import (
    LayerNorm,
    RMSNorm,
    TimestepEmbedding,
    linear,
    timestep_embedding,
)

STACKED, SINGLE, STACKS = flux.STACKED, flux.SINGLE, flux.STACKS
TEXT_KEYS = flux.TEXT_KEYS
pipefusion_stacks = flux.pipefusion_stacks
rope_tables, image_ids = flux.rope_tables, flux.image_ids


@dataclasses.dataclass(frozen=True)
class OvisImageConfig(flux.FluxConfig):
    """diffusers' OvisImageTransformer2DModel config (its defaults: Ovis-Image-7B's)."""

    out_channels: int | None = 64
    num_layers: int = 6
    num_single_layers: int = 27
    joint_attention_dim: int = 2048

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OvisImageConfig:
        return flux.checked_config(cls, d, "Ovis-Image", "packs")


def text_ids(length: int):
    """OvisImagePipeline's ``text_ids``: (L, 3) = (0, i, i) per text token."""
    ids = np.zeros((length, 3), np.float32)
    ids[:, 1] = ids[:, 2] = np.arange(length)
    return ids


class SwiGLU(nnx.Module):
    """diffusers ``FeedForward(dim, dim_out=dim, activation_fn="swiglu")``: ``net.0.proj`` d -> 2 x inner (value,
    gate), ``value * silu(gate)``, ``net.2`` inner -> d (submodules ``net_0`` / ``net_2`` as
    :class:`xdit_jax.models.layers.FeedForward`'s)."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs):
        self.net_0 = linear(dim, 2 * inner, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.net_0(x), 2, axis=-1)
        return self.net_2(value * jax.nn.silu(gate))


class DoubleBlock(flux.DoubleBlock):
    """diffusers ``OvisImageTransformerBlock``: FLUX's double-stream block with SwiGLU feed-forwards (4d inner)."""

    def __init__(self, cfg: OvisImageConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = self.ada_norm(d, 6, 0, dtype=dtype, rngs=rngs)
        self.norm1_context = self.ada_norm(d, 6, 1, dtype=dtype, rngs=rngs)
        self.attn = self.attention_cls(cfg, added=True, pre_only=False, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff = SwiGLU(d, 4 * d, dtype=dtype, rngs=rngs)
        self.norm2_context = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff_context = SwiGLU(d, 4 * d, dtype=dtype, rngs=rngs)


class SingleBlock(flux.SingleBlock):
    """diffusers ``OvisImageSingleTransformerBlock``: FLUX's single-stream block whose parallel MLP is SwiGLU
    (``proj_mlp`` d -> 2m, value then gate, ``silu(gate) * value``; m = 4d)."""

    def __init__(self, cfg: OvisImageConfig, *, dtype, rngs):
        d, m = cfg.inner_dim, flux.mlp_dim(cfg)
        self.norm = self.ada_norm(d, 3, 0, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(d, 2 * m, dtype=dtype, rngs=rngs)
        self.attn = self.attention_cls(cfg, added=False, pre_only=True, dtype=dtype, rngs=rngs)
        self.proj_out = linear(d + m, d, dtype=dtype, rngs=rngs)

    def _out(self, x, h, o, gate):
        value, g = jnp.split(self.proj_mlp(h), 2, axis=-1)
        y = jnp.concatenate([o.reshape(*o.shape[:2], -1), jax.nn.silu(g) * value], axis=-1)
        return flux._fp16_clip(x + gate[:, None] * self.proj_out(y))


class OvisImageTransformer2DModel(flux.FluxTransformer2DModel):
    """``model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids)`` as diffusers' forward: packed
    latents (B, N, in_channels), Qwen3 states (B, L, joint_attention_dim), timestep (B,) in [0, 1] (the pipeline's
    t / 1000), ids (N, 3) and (L, 3). Returns (B, N, out_channels). Its stages (``embed``, ``blocks``,
    ``double_blocks``, ``single_blocks``, ``head``) are FLUX's."""

    def __init__(self, cfg: OvisImageConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)
        self.context_embedder_norm = RMSNorm(cfg.joint_attention_dim, 1e-6, dtype=dtype)
        self._init_stacks(cfg, dtype, rngs, DoubleBlock, SingleBlock)

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None, rope=None):
        """-> (image (B, N, D), tokens {"rope"}, cond {"temb", "context", "context_rope"}, text tables (L, hd)), as
        :meth:`flux.FluxTransformer2DModel.embed`: host ids (numpy), or ``rope`` = ((img cos, sin), (txt cos, sin))
        ready made (the ids are then ignored)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        temb = self.timestep_embedder(timestep_embedding(t, 256, flip_sin_to_cos=True).astype(dtype))
        x = self.x_embedder(hidden_states.astype(dtype))
        c = self.context_embedder(self.context_embedder_norm(encoder_hidden_states.astype(dtype)))
        img_rope, c_rope, txt_rope = flux.rotated_text_rope(cfg.axes_dims_rope, b, img_ids, txt_ids, rope)
        return x, {"rope": img_rope}, {"temb": temb, "context": c, "context_rope": c_rope}, txt_rope

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        return self.forward_embedded(*self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids))


def params_from_torch(flat: dict, cfg: OvisImageConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: OvisImageTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers},
                          renames=flux.TORCH_RENAMES, dtype=dtype, what="Ovis-Image transformer checkpoint")


def build(cfg: OvisImageConfig, params: dict, dtype=jnp.float32) -> OvisImageTransformer2DModel:
    return build_module(lambda: OvisImageTransformer2DModel(cfg, dtype=dtype), params)
