"""LongCat-Image transformer (diffusers ``LongCatImageTransformer2DModel``, meituan-longcat/LongCat-Image) in Flax NNX.

FLUX.1's architecture, block for block: the double-stream blocks (``LongCatImageTransformerBlock``: adaLN-Zero per
stream, q/k/v with biases and per-head RMS norms of eps 1e-6, the text's own projections, tanh-GELU MLPs) and the
single-stream blocks (``LongCatImageSingleTransformerBlock``: attention and MLP in parallel over [text; image]) are
diffusers' FLUX blocks with other class names, so they are :class:`flux.DoubleBlock` / :class:`flux.SingleBlock`
here, stacked and scanned as FLUX's, and the final adaLN + projection is FLUX's head. The model differs in its
embeddings only:

* no pooled text projection and no guidance embedding: ``time_embed`` is diffusers' ``Timesteps(256,
  flip_sin_to_cos=True)`` -> ``TimestepEmbedding`` of ``t x 1000`` alone (:class:`TimestepEmbed`);
* the text comes from Qwen2.5-VL (``joint_attention_dim`` 3584) and is rotated too: LongCatImagePipeline's text ids
  are (0, i, i) and its image ids (1, 512 + row, 512 + column) (:func:`text_ids`, :func:`image_ids`), FLUX's 3-axis
  RoPE (theta 10000, ``axes_dims_rope`` (16, 56, 56)) over them.

So everything FLUX's pipeline does with the blocks (the two phases over the mesh, the text sharded with the image in
the double-stream phase; PipeFusion's two-stack form, :meth:`flux.FluxTransformer2DModel.blocks`) holds here as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models.layers import TimestepEmbedding, timestep_embedding

STACKED = flux.STACKED
SINGLE = flux.SINGLE
STACKS = flux.STACKS
TEXT_KEYS = flux.TEXT_KEYS


@dataclasses.dataclass(frozen=True)
class LongCatImageConfig(flux.FluxConfig):
    """diffusers' config.json; FLUX's fields with LongCat's defaults (no ``guidance_embeds``: always False)."""

    joint_attention_dim: int = 3584
    pooled_projection_dim: int = 3584

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LongCatImageConfig:
        d = {k: v for k, v in d.items() if k != "guidance_embeds"}
        return flux.checked_config(cls, d, "LongCat-Image", "packs")


def text_ids(length: int) -> np.ndarray:
    """LongCatImagePipeline's text ``prepare_pos_ids(modality_id=0, type="text")``: (L, 3) = (0, i, i)."""
    ids = np.zeros((length, 3), np.float32)
    ids[:, 1] = ids[:, 2] = np.arange(length)
    return ids


def image_ids(grid_h: int, grid_w: int, start: int, modality: int = 1) -> np.ndarray:
    """LongCatImagePipeline's image ``prepare_pos_ids(modality_id=1, type="image", start=(start, start))``: (h*w, 3)
    = (modality, start + row, start + column) per packed latent token (``start``: the pipeline's
    ``tokenizer_max_length``, 512)."""
    ids = flux.image_ids(grid_h, grid_w)
    ids[:, 0] = modality
    ids[:, 1:] += start
    return ids


class TimestepEmbed(nnx.Module):
    """diffusers ``LongCatImageTimestepEmbeddings``: 256 sinusoids (cos first) of t x 1000 -> ``TimestepEmbedding``."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)

    def __call__(self, t):
        return self.timestep_embedder(timestep_embedding(t, 256, flip_sin_to_cos=True).astype(self.dtype))


def pipefusion_stacks(cfg: LongCatImageConfig) -> dict:
    """PipeFusion's stacks (as FLUX's): double-, then single-stream; and the text's ``cond`` keys."""
    return flux.pipefusion_stacks(cfg)


class LongCatImageTransformer2DModel(flux.FluxTransformer2DModel):
    """``model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids)`` as diffusers' forward: packed
    latents (B, N, in_channels), Qwen2.5-VL states (B, L, joint_attention_dim), timestep (B,) in [0, 1] (the
    pipeline's t / 1000), ids (N, 3) and (L, 3) (host arrays). Returns (B, N, out_channels). The block stacks and the
    head are FLUX's (:class:`flux.FluxTransformer2DModel`)."""

    def __init__(self, cfg: LongCatImageConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.time_embed = TimestepEmbed(d, dtype=dtype, rngs=rngs)
        self._init_stacks(cfg, dtype, rngs)

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None, rope=None):
        """-> (image (B, N, D), tokens {"rope": image tables (N, hd)}, cond {"temb", "context" (B, L, D),
        "context_rope": (B, L, hd) tables}, text tables (L, hd)), as :meth:`flux.FluxTransformer2DModel.embed`;
        ``rope``: ``((img_cos, img_sin), (txt_cos, txt_sin))`` ready made (else from the host ids)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        # t x 1000 stays float32 into the sinusoids (diffusers rounds it to the model dtype first)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        temb = self.time_embed(t)
        x = self.x_embedder(jnp.asarray(hidden_states).astype(dtype))
        c = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype))
        img_rope, c_rope, txt_rope = flux.rotated_text_rope(cfg.axes_dims_rope, b, img_ids, txt_ids, rope)
        return x, {"rope": img_rope}, {"temb": temb, "context": c, "context_rope": c_rope}, txt_rope

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        return self.forward_embedded(*self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids))


TORCH_RENAMES = flux.TORCH_RENAMES


def params_from_torch(flat: dict, cfg: LongCatImageConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: LongCatImageTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers}, renames=TORCH_RENAMES,
                          dtype=dtype, what="LongCat-Image transformer checkpoint")


def build(cfg: LongCatImageConfig, params: dict, dtype=jnp.float32) -> LongCatImageTransformer2DModel:
    return build_module(lambda: LongCatImageTransformer2DModel(cfg, dtype=dtype), params)
