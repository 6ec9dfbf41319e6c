"""HunyuanVideo-1.5 transformer (diffusers ``HunyuanVideo15Transformer3DModel``, text-to-video) in Flax NNX.

HunyuanVideo 1.0's design (:mod:`xdit_jax.models.hunyuan_video`) with only double-stream blocks, read against
diffusers' source; what is the same math is 1.0's (and FLUX's) code:

* the patch embed (Conv3d of ``(patch_size_t, patch_size, patch_size)``), the 3-D RoPE over the (t, h, w) patch
  grid of the video tokens only, the token refiner of the Qwen2.5-VL states (``context_embedder``: 1.0's
  ``TokenRefiner``; its MLP ratio is diffusers' fixed 4.0), the double-stream blocks (``flux.DoubleBlock``:
  AdaLayerNormZero, joint attention with per-head RMS q/k norms, the tanh-GELU MLPs) and the head
  (AdaLayerNormContinuous, ``proj_out``, unpatchify) are 1.0's;
* new here: the time embedding alone (no guidance, no pooled text: ``time_embed``), the ByT5 glyph-text
  projection (``context_embedder_2``: LayerNorm, Linear, GELU, Linear, GELU, Linear), the condition-type
  embedding (``cond_type_embed``: 0 added to the Qwen tokens, 1 to the ByT5 ones, 2 to the image tokens);
* the text: diffusers reorders each sample's text tokens as ``[valid image, valid ByT5, valid Qwen, padding]``
  and masks the padding out of every attention (as keys; their own rows do not reach the video). Attention is a
  sum over the set of visible keys and the text is not rotated, so the order is immaterial: here the text is
  ``[ByT5; Qwen]`` with their masks as the key mask of the context (:func:`xdit_jax.parallel.attention.attention`),
  and the video tokens are the sequence sharded over ring x ulysses (the text sharded too: ``TEXT_KEYS``).
* text-to-video: diffusers' T2V pipeline passes zero image embeddings, which the model multiplies by 0 and masks
  out entirely (the 729 ``image_embedder`` tokens are invisible keys), so they are not computed here
  (``image_embeds=None``). Image-to-video's SigLIP states (``image_embeds``) go through ``image_embedder`` (+ the
  type-2 row) and join the context in front, all visible. ``use_meanflow`` (the step-distilled models): a second
  time embedder for MeanFlow's ``timestep_r`` (the next step's timestep), its embedding added to the timestep's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models import hunyuan_video as hv
from xdit_jax.models.layers import (
    LayerNorm,
    TimestepEmbedding,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)

STACKED = "transformer_blocks"
REFINER = hv.REFINER
TEXT_KEYS = hv.TEXT_KEYS
BYT5_HIDDEN = 2048  # diffusers' HunyuanVideo15ByT5TextProjection(in, 2048, inner): fixed


@dataclasses.dataclass(frozen=True)
class HunyuanVideo15Config(TransformerDims):
    in_channels: int = 65
    out_channels: int | None = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 3584
    text_embed_2_dim: int = 1472
    image_embed_dim: int = 1152
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    target_size: int = 640
    task_type: str = "i2v"
    use_meanflow: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanVideo15Config:
        cfg = cls(**known_fields(cls, d))
        cfg = dataclasses.replace(cfg, rope_axes_dim=tuple(int(a) for a in cfg.rope_axes_dim))
        if cfg.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={cfg.qk_norm!r}: HunyuanVideo-1.5 uses rms_norm.")
        if (len(cfg.rope_axes_dim) != 3 or sum(cfg.rope_axes_dim) != cfg.attention_head_dim
                or any(a % 2 for a in cfg.rope_axes_dim)):
            raise ValueError(f"rope_axes_dim {cfg.rope_axes_dim} must be 3 even sizes summing to attention_head_dim "
                             f"{cfg.attention_head_dim}.")
        if cfg.num_layers < 1 or cfg.num_refiner_layers < 1:
            raise ValueError("A HunyuanVideo-1.5 transformer has at least one block and one token refiner block.")
        return cfg

    @property
    def refiner(self) -> HunyuanVideo15Config:
        """The config 1.0's token refiner reads: diffusers builds 1.5's with the default MLP ratio 4.0."""
        return dataclasses.replace(self, mlp_ratio=4.0)


class ByT5TextProjection(nnx.Module):
    """diffusers ``HunyuanVideo15ByT5TextProjection``: LayerNorm (eps 1e-5, affine), Linear, GELU (erf), Linear,
    GELU, Linear."""

    def __init__(self, din: int, hidden: int, dout: int, *, dtype, rngs):
        self.norm = LayerNorm(din, 1e-5, dtype=dtype)
        self.linear_1 = linear(din, hidden, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(hidden, hidden, dtype=dtype, rngs=rngs)
        self.linear_3 = linear(hidden, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        gelu = lambda y: jax.nn.gelu(y, approximate=False)  # noqa: E731
        return self.linear_3(gelu(self.linear_2(gelu(self.linear_1(self.norm(x))))))


class ImageProjection(nnx.Module):
    """diffusers ``HunyuanVideo15ImageProjection`` (image-to-video's SigLIP states): LayerNorm, Linear, GELU (erf),
    Linear, LayerNorm; unused by text-to-video (module docstring)."""

    def __init__(self, din: int, dout: int, *, dtype, rngs):
        self.norm_in = LayerNorm(din, 1e-5, dtype=dtype)
        self.linear_1 = linear(din, din, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(din, dout, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(dout, 1e-5, dtype=dtype)

    def __call__(self, x):
        return self.norm_out(self.linear_2(jax.nn.gelu(self.linear_1(self.norm_in(x)), approximate=False)))


class TimeEmbedding(nnx.Module):
    """diffusers ``HunyuanVideo15TimeEmbedding``: sinusoids (256, flip) -> MLP; with ``meanflow``, MeanFlow's
    ``timestep_r`` through a second embedder of its own, added."""

    def __init__(self, d: int, *, meanflow: bool = False, dtype, rngs):
        self.timestep_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)
        if meanflow:
            self.timestep_embedder_r = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, dtype, timestep_r=None):
        emb = self.timestep_embedder(timestep_embedding(timestep, 256, flip_sin_to_cos=True).astype(dtype))
        if timestep_r is not None:
            if not hasattr(self, "timestep_embedder_r"):
                raise ValueError("timestep_r: this HunyuanVideo-1.5 transformer has no MeanFlow embedder "
                                 "(use_meanflow false in its config).")
            emb = emb + self.timestep_embedder_r(timestep_embedding(timestep_r, 256, flip_sin_to_cos=True)
                                                 .astype(dtype))
        return emb


class CondTypeEmbed(nnx.Module):
    """``nn.Embedding(3, inner_dim)``: 0 the Qwen tokens, 1 the ByT5 ones, 2 the image ones."""

    def __init__(self, d: int, *, dtype):
        self.embedding = nnx.Param(jnp.zeros((3, d), dtype))


class HunyuanVideo15Transformer3DModel(hv.HunyuanVideoTransformer3DModel):
    """``model(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2,
    encoder_attention_mask_2)`` as diffusers' forward for text-to-video (zero ``image_embeds``): latents
    (B, in_channels, F, H, W) (the pipeline's noise, zero condition latents and a zero mask channel), timestep (B,)
    (0..1000), Qwen2.5-VL states (B, L, text_embed_dim) with their mask (B, L), ByT5 states (B, L2,
    text_embed_2_dim) with their mask (B, L2). Returns (B, out_channels, F, H, W). ``grid`` and ``head`` are 1.0's.
    """

    def __init__(self, cfg: HunyuanVideo15Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.x_embedder = hv.PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.image_embedder = ImageProjection(cfg.image_embed_dim, d, dtype=dtype, rngs=rngs)
        self.context_embedder = hv.TokenRefiner(cfg.refiner, dtype=dtype, rngs=rngs)
        self.context_embedder_2 = ByT5TextProjection(cfg.text_embed_2_dim, BYT5_HIDDEN, d, dtype=dtype, rngs=rngs)
        self.time_embed = TimeEmbedding(d, meanflow=cfg.use_meanflow, dtype=dtype, rngs=rngs)
        self.cond_type_embed = CondTypeEmbed(d, dtype=dtype)
        self.transformer_blocks = stack_modules(lambda r: flux.DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers,
                                                rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.patch_size_t * cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2,
              encoder_attention_mask_2, image_embeds=None, rope=None, timestep_r=None):
        """-> (video (B, N, D), tokens {"rope"}, cond {"temb", "context" (B, L2 + L, D): [ByT5; Qwen],
        "context_mask" bool (B, L2 + L)}). ``image_embeds`` (B, 729, image_embed_dim): image-to-video's SigLIP
        states, all visible, in front of the text ([image; ByT5; Qwen]); None: text-to-video (diffusers' zero image
        embeddings, which it masks out). ``timestep_r`` (B,): a MeanFlow model's (``use_meanflow``) second timestep,
        the next step's (diffusers' image-to-video pipeline passes it; None: not embedded, as its text-to-video)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        r = None if timestep_r is None else jnp.broadcast_to(jnp.asarray(timestep_r, jnp.float32).reshape(-1), (b,))
        temb = self.time_embed(t, dtype, r)
        mask = jnp.asarray(encoder_attention_mask) != 0
        mask_2 = jnp.asarray(encoder_attention_mask_2) != 0
        types = self.cond_type_embed.embedding[...]
        context = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype), t, mask) + types[0]
        context_2 = self.context_embedder_2(jnp.asarray(encoder_hidden_states_2).astype(dtype)) + types[1]
        x = self.x_embedder.proj(jnp.transpose(jnp.asarray(hidden_states).astype(dtype), (0, 2, 3, 4, 1)))
        x = x.reshape(b, -1, cfg.inner_dim)
        if rope is None:
            rope = hv.rope_tables(*self.grid(hidden_states.shape), cfg.rope_axes_dim, cfg.rope_theta)
        rope = tuple(jnp.asarray(a, jnp.float32) for a in rope)
        parts, masks = [context_2, context], [mask_2, mask]
        if image_embeds is not None:
            image = self.image_embedder(jnp.asarray(image_embeds).astype(dtype)) + types[2]
            parts, masks = [image] + parts, [jnp.ones(image.shape[:2], bool)] + masks
        return x, {"rope": rope}, {"temb": temb, "context": jnp.concatenate(parts, axis=1),
                                   "context_mask": jnp.concatenate(masks, axis=1)}

    def blocks(self, x, tokens, cond):
        """The double-stream stack on the video tokens (or a shard of them), the text as the masked context;
        -> the video tokens."""
        temb, rope, mask = cond["temb"], tokens["rope"], cond["context_mask"]
        x, _ = scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, temb, rope, None, mask),
                            (x, cond["context"]))
        return x

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                 encoder_hidden_states_2, encoder_attention_mask_2, image_embeds=None, timestep_r=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                     encoder_hidden_states_2, encoder_attention_mask_2, image_embeds,
                                     timestep_r=timestep_r)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: HunyuanVideo15Config) -> dict:
    """PipeFusion's stack (the double-stream blocks) and the text's ``cond`` keys."""
    return dict(stacked=STACKED, stacked_layers=cfg.num_layers, text_keys=TEXT_KEYS)


TORCH_RENAMES = list(hv.TORCH_RENAMES)
# a MeanFlow time embedder in a checkpoint whose config says use_meanflow false: unused (diffusers builds none)
TORCH_IGNORE = (r"^time_embed\.timestep_embedder_r\.",)


def params_from_torch(flat: dict, cfg: HunyuanVideo15Config, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: HunyuanVideo15Transformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, REFINER: cfg.num_refiner_layers},
                          renames=TORCH_RENAMES, ignore=() if cfg.use_meanflow else TORCH_IGNORE, dtype=dtype,
                          what="HunyuanVideo-1.5 transformer checkpoint")


def build(cfg: HunyuanVideo15Config, params: dict, dtype=jnp.float32) -> HunyuanVideo15Transformer3DModel:
    return build_module(lambda: HunyuanVideo15Transformer3DModel(cfg, dtype=dtype), params)
