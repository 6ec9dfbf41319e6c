"""SigLIP's vision tower (transformers ``SiglipVisionModel``: ``last_hidden_state``) in Flax NNX: HunyuanVideo-1.5
image-to-video's ``image_encoder`` (siglip-so400m-patch14-384: 729 states of 1152).

CLIP's vision tower (:mod:`xdit_jax.models.clip`) without the class token and the pre-LayerNorm: the patches (a
Conv2d of stride ``patch_size``, with bias) plus learned positions, CLIP's pre-norm encoder layers (their names and
math: q/k/v/out projections with biases, LayerNorms, the fc1 / fc2 MLP; the activation ``gelu_pytorch_tanh``), the
post-LayerNorm. The attention-pooling ``head`` (``vision_use_head``) is not built: ``last_hidden_state`` does not
read it (its tensors are ignored at conversion). Both key layouts load: transformers 5's (``embeddings.*``) and the
``vision_model.*`` prefix of older saves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import clip
from xdit_jax.models.layers import LayerNorm

ACTS = dict(clip._ACTS, gelu_pytorch_tanh=lambda x: jax.nn.gelu(x, approximate=True))


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers' ``SiglipVisionConfig`` (its defaults: siglip-base-patch16-224)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_act not in ACTS:
            raise ValueError(f"Unsupported SigLIP hidden_act {self.hidden_act!r}; expected one of {sorted(ACTS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiglipVisionConfig:
        """A ``SiglipVisionModel`` config.json (or a full ``SiglipModel``'s ``vision_config``)."""
        d = d.get("vision_config", d)
        return cls(**known_fields(cls, d))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def act_fn(self):
        return ACTS[self.hidden_act]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                        dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.num_patches, d, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values):
        """(B, C, H, W) channels-first -> (B, num_patches, hidden) in float32."""
        cfg = self.cfg
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != cfg.num_channels or shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must have shape (batch, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}) (SiglipImageProcessor's), got {shape}.")
        patches = self.patch_embedding(jnp.transpose(pixel_values, (0, 2, 3, 1)))
        patches = patches.reshape(shape[0], -1, cfg.hidden_size).astype(jnp.float32)
        return patches + self.position_embedding.embedding[...].astype(jnp.float32)


class SiglipVisionModel(nnx.Module):
    """``model(pixel_values) -> last_hidden_state`` (B, num_patches, hidden) in ``dtype``."""

    def __init__(self, cfg: SiglipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg, self.dtype = cfg, dtype
        self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = clip.CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values):
        h, _ = self.encoder(self.embeddings(jnp.asarray(pixel_values)).astype(self.dtype))
        return self.post_layernorm(h)


TORCH_IGNORE = (r"^(vision_model\.)?head\.", r"^(vision_model\.)?embeddings\.position_ids$")


def params_from_torch(flat: dict, cfg: SiglipVisionConfig, dtype=None) -> dict:
    prefixed = any(k.startswith("vision_model.") for k in flat)
    return map_state_dict(flat, expected_shapes(lambda: SiglipVisionModel(cfg, dtype=dtype or jnp.float32)),
                          stacked={"encoder.layers": cfg.num_hidden_layers},
                          renames=[(r"^", "vision_model.")] if prefixed else [], ignore=TORCH_IGNORE, dtype=dtype,
                          what="SigLIP vision tower checkpoint")


def build(cfg: SiglipVisionConfig, params: dict, dtype=jnp.float32) -> SiglipVisionModel:
    return build_module(lambda: SiglipVisionModel(cfg, dtype=dtype), params)
