"""Qwen-Image transformer (diffusers ``QwenImageTransformer2DModel``, text-to-image) in Flax NNX.

An MMDiT of double-stream blocks only (60 in Qwen-Image): the text (Qwen2.5-VL states) and the packed image
tokens keep their own weights and meet in one joint attention over ``[text; image]``. The block's math is
FLUX's double-stream block (:class:`xdit_jax.models.flux.DoubleBlock`: per-stream shift/scale/gate
modulation of an affine-free LayerNorm, q/k RMS norms, a tanh-GELU MLP of 4x width; diffusers' ``img_mod`` /
``txt_mod`` are FLUX's ``norm1.linear`` / ``norm1_context.linear`` in the same chunk order), so it is that
class, read from Qwen's key names. What is Qwen-Image's own lives here:

* the conditioning: the timestep's sinusoids (``t * 1000``) through a ``TimestepEmbedding``, no pooled text and
  no guidance embedding;
* the text input: an RMSNorm (with weight) over the Qwen2.5-VL states, then ``txt_in``;
* the 3-D RoPE (``QwenEmbedRope``, theta 10000, ``scale_rope``): an image token at packed grid position
  (row, column) has ids (0, row - (h - h // 2), column - (w - w // 2)) (centred on the image), and text token
  i has the id ``max(h // 2, w // 2) + i`` on all three axes; interleaved pairs, as FLUX's tables;
* the text padding: ``encoder_hidden_states_mask`` masks the text keys (any pattern, as diffusers' joint
  attention mask); the text joins every attention as the *context* of
  :func:`xdit_jax.parallel.attention.attention` with that key mask, the image tokens the sharded sequence
  (the text sharded too with ``text=TEXT_KEYS``, its mask whole).

Qwen-Image-Edit (diffusers' ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``): the condition images'
packed latents follow the noisy ones in the sequence, each image with its own RoPE positions (``img_shapes``: one
(frames, grid_h, grid_w) per image; image ``i`` takes the frame index ``i``, every image is centred on its own
grid, the text starts after the largest half-grid of them all). ``zero_cond_t`` (Qwen-Image-Edit-2511): the
condition tokens are modulated by the embedding of timestep 0 (the noisy ones by the step's), the text and the
output head by the step's; the per-token choice is a table of the sequence (``tokens["cond"]``), so it shards and
patches with the tokens.

The layered / ControlNet variants (``use_additional_t_cond``, ``use_layer3d_rope``) and ``guidance_embeds``
(diffusers' forward cannot take a guidance: its ``QwenTimestepProjEmbeddings`` has no guidance embedder) are
refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models.layers import (
    LayerNorm,
    RMSNorm,
    TimestepEmbedding,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)

STACKED = "transformer_blocks"
# The text stream in ``cond``: sliced with PipeFusion's patches / sharded over the sequence group (its key mask,
# ``context_mask``, stays whole)
TEXT_KEYS = ("context", "context_rope")
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class QwenImageConfig(TransformerDims):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageConfig:
        cfg = cls(**known_fields(cls, d))
        cfg = dataclasses.replace(cfg, axes_dims_rope=tuple(int(a) for a in cfg.axes_dims_rope))
        for flag, what in (("use_additional_t_cond", "Qwen-Image-Layered's additional timestep condition"),
                           ("use_layer3d_rope", "Qwen-Image-Layered's layer 3-D RoPE")):
            if getattr(cfg, flag):
                raise ValueError(f"{flag}=true: {what}, not supported (the Qwen-Image and Qwen-Image-Edit "
                                 f"transformers, {flag} false).")
        if cfg.guidance_embeds:
            raise ValueError("guidance_embeds=true: diffusers' QwenImageTransformer2DModel has no guidance embedder "
                             "(its forward cannot take a guidance); only guidance_embeds false is supported.")
        if (len(cfg.axes_dims_rope) != 3 or sum(cfg.axes_dims_rope) != cfg.attention_head_dim
                or any(a % 2 for a in cfg.axes_dims_rope)):
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must be 3 even sizes summing to "
                             f"attention_head_dim {cfg.attention_head_dim}.")
        if cfg.in_channels % 4:
            raise ValueError(f"in_channels={cfg.in_channels}: the packed 2x2 latents' channels, a multiple of 4.")
        if cfg.num_layers < 1:
            raise ValueError("A Qwen-Image transformer has at least one block.")
        return cfg


# ----- positions -----

def _axis_table(pos: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """One axis' interleaved cos, sin (N, dim) of integer positions, computed as diffusers' ``rope_params``:
    float32 frequencies, float32 angles."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    freqs = np.float32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    ang = (pos.astype(np.float32)[:, None] * freqs[None, :]).astype(np.float64)  # the float32 angles, exactly
    return np.repeat(np.cos(ang).astype(np.float32), 2, axis=1), np.repeat(np.sin(ang).astype(np.float32), 2, axis=1)


def rope_ids(grid_h: int, grid_w: int, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``QwenEmbedRope`` (``scale_rope``) positions of one image (frame 0) of the packed grid
    (grid_h, grid_w) and ``text_len`` text tokens -> (image ids (h*w, 3), text ids (L, 3))."""
    ids = np.zeros((grid_h, grid_w, 3), np.int64)
    ids[..., 1] = (np.arange(grid_h) - (grid_h - grid_h // 2))[:, None]
    ids[..., 2] = (np.arange(grid_w) - (grid_w - grid_w // 2))[None, :]
    start = max(grid_h // 2, grid_w // 2)
    txt = np.repeat((start + np.arange(text_len))[:, None], 3, axis=1)
    return ids.reshape(-1, 3), txt


def rope_ids_multi(shapes, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``QwenEmbedRope`` (``scale_rope``) positions of several images (the edit pipelines' ``img_shapes``
    of one sample: the noisy latents', then each condition image's (frames, grid_h, grid_w)): image ``i``'s frame ids
    ``i .. i + frames - 1``, rows and columns centred on its grid; the text from the largest ``max(h // 2, w // 2)``
    -> (image ids (sum f*h*w, 3), text ids (L, 3))."""
    ids, start = [], 0
    for i, (f, h, w) in enumerate(tuple(int(v) for v in s) for s in shapes):
        one = np.zeros((f, h, w, 3), np.int64)
        one[..., 0] = (i + np.arange(f))[:, None, None]
        one[..., 1] = (np.arange(h) - (h - h // 2))[None, :, None]
        one[..., 2] = (np.arange(w) - (w - w // 2))[None, None, :]
        ids.append(one.reshape(-1, 3))
        start = max(start, h // 2, w // 2)
    txt = np.repeat((start + np.arange(text_len))[:, None], 3, axis=1)
    return np.concatenate(ids), txt


def _tables(ids, axes_dims):
    parts = [_axis_table(ids[:, i], int(d), ROPE_THETA) for i, d in enumerate(axes_dims)]
    return tuple(np.concatenate([p[j] for p in parts], axis=1) for j in (0, 1))


def rope_tables(grid_h: int, grid_w: int, text_len: int, axes_dims) -> tuple[tuple, tuple]:
    """((img cos, img sin) (h*w, head_dim), (txt cos, txt sin) (L, head_dim)) float32, diffusers'
    ``QwenEmbedRope`` as real interleaved tables."""
    img, txt = rope_ids(grid_h, grid_w, text_len)
    return _tables(img, axes_dims), _tables(txt, axes_dims)


def rope_tables_multi(shapes, text_len: int, axes_dims) -> tuple[tuple, tuple]:
    """:func:`rope_tables` of several images (:func:`rope_ids_multi`)."""
    img, txt = rope_ids_multi(shapes, text_len)
    return _tables(img, axes_dims), _tables(txt, axes_dims)


def condition_flags(shapes) -> np.ndarray:
    """(N,) float32: 1 on the condition images' tokens (every image after the first), the ``zero_cond_t``
    choice of diffusers' ``modulate_index``."""
    sizes = [int(np.prod(s)) for s in shapes]
    return np.concatenate([np.zeros(sizes[0], np.float32), np.ones(sum(sizes[1:]), np.float32)])


# ----- the model -----

class DoubleBlock(flux.DoubleBlock):
    """diffusers ``QwenImageTransformerBlock``: FLUX's double-stream block; with ``temb0`` (``zero_cond_t``) the image
    tokens where ``is_cond`` is 1 take the modulation of ``temb0`` (timestep 0), the others ``temb``'s."""

    def __call__(self, x, c, temb, rope, c_rope, c_mask=None, temb0=None, is_cond=None):
        if temb0 is None:
            return super().__call__(x, c, temb, rope, c_rope, c_mask)
        sel = (is_cond != 0)[None, :, None]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (
            jnp.where(sel, m0[:, None], m[:, None])
            for m, m0 in zip(self.norm1.modulation(temb), self.norm1.modulation(temb0)))
        nx = self.norm1.norm(x) * (1 + scale) + shift
        nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(c, temb)
        a, ac = self.attn.joint(nx, nc, rope, c_rope, c_mask)
        x = x + gate * a
        x = x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        c = c + c_gate[:, None] * ac
        c = c + c_gate_mlp[:, None] * self.ff_context(self.norm2_context(c) * (1 + c_scale_mlp[:, None])
                                                      + c_shift_mlp[:, None])
        return x, c

class TimeEmbed(nnx.Module):
    """diffusers ``QwenTimestepProjEmbeddings`` (without the additional condition): sinusoids of ``t * 1000``
    (flip_sin_to_cos, shift 0) -> ``TimestepEmbedding``."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.timestep_embedder = TimestepEmbedding(256, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, dtype):
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1000.0)
        return self.timestep_embedder(t.astype(dtype))


class QwenImageTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shape)`` as
    diffusers' forward: packed latents (B, N, in_channels), Qwen2.5-VL states (B, L, joint_attention_dim), their
    mask (B, L) or None (all valid), timestep (B,) in [0, 1] (the pipeline's t / 1000), ``img_shape``: (frames,
    grid_h, grid_w) of the packed grid (diffusers' ``img_shapes[0]``; frames 1). Returns (B, N, 4 *
    out_channels)."""

    def __init__(self, cfg: QwenImageConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.time_text_embed = TimeEmbed(d, dtype=dtype, rngs=rngs)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, 1e-6, dtype=dtype)
        self.img_in = linear(cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.txt_in = linear(cfg.joint_attention_dim, d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers,
                                                rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed (global) -> blocks (any contiguous shard of the image tokens; the text as the context) -> head --

    def embed(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shape=None,
              rope=None, img_shapes=None, cond_flags=None):
        """-> (image (B, N, D), tokens {"rope": (cos, sin) (N, head_dim)[, "cond": (N,) zero_cond_t's flags]}, cond
        {"temb"[, "temb0": timestep 0's], "context" (B, L, D), "context_rope": (B, L, head_dim) tables,
        "context_mask": bool (B, L) or None}). ``img_shape``: the noisy latents' (frames, grid_h, grid_w), or
        ``img_shapes``: a list of them, the noisy latents' then each condition image's (the edit pipelines', one
        sample's: every sample has the same). ``rope``: the tables ``((img_cos, img_sin), (txt_cos, txt_sin))`` ready
        made and ``cond_flags`` (:func:`condition_flags`, ``zero_cond_t``) (the pipeline passes them into its jitted
        step), else computed on the host from the shapes."""
        cfg, dtype = self.cfg, self.dtype
        b, n = hidden_states.shape[:2]
        l = encoder_hidden_states.shape[1]
        # the timestep stays float32 into the sinusoids (diffusers: rounded to the model dtype first)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb = self.time_text_embed(t, dtype)
        x = self.img_in(jnp.asarray(hidden_states).astype(dtype))
        c = self.txt_in(self.txt_norm(jnp.asarray(encoder_hidden_states).astype(dtype)))
        if img_shapes is None and img_shape is not None:
            img_shapes = [img_shape]
        if img_shapes is not None:
            img_shapes = [tuple(int(v) for v in s) for s in img_shapes]
            if sum(f * h * w for f, h, w in img_shapes) != n:
                raise ValueError(f"img_shapes {img_shapes} do not describe the {n} image tokens (each (frames, "
                                 "height/16, width/16); the noisy latents' first, then each condition image's).")
        if rope is None:
            if img_shapes is None:
                raise ValueError("Pass img_shape(s) (frames, grid_h, grid_w) or the RoPE tables.")
            rope = rope_tables_multi(img_shapes, l, cfg.axes_dims_rope)
        img_rope, txt_rope = (tuple(jnp.asarray(a, jnp.float32) for a in r) for r in rope)
        c_rope = tuple(jnp.broadcast_to(a[None], (b,) + a.shape) for a in txt_rope)
        mask = None if encoder_hidden_states_mask is None else jnp.asarray(encoder_hidden_states_mask) != 0
        if mask is not None and mask.shape != (b, l):
            raise ValueError(f"encoder_hidden_states_mask {tuple(mask.shape)} must be (batch, text tokens) = "
                             f"({b}, {l}).")
        tokens = {"rope": img_rope}
        cond = {"temb": temb, "context": c, "context_rope": c_rope, "context_mask": mask}
        if cfg.zero_cond_t:
            if cond_flags is None:
                if img_shapes is None:
                    raise ValueError("zero_cond_t: pass img_shapes (or cond_flags) to tell the condition tokens.")
                cond_flags = condition_flags(img_shapes)
            tokens["cond"] = jnp.asarray(cond_flags, jnp.float32)
            cond["temb0"] = self.time_text_embed(jnp.zeros_like(t), dtype)
        return x, tokens, cond

    def double_blocks(self, x, tokens, cond):
        """The double-stream stack on the image tokens (or a shard of them); -> (image, text)."""
        temb, rope, c_rope, mask = cond["temb"], tokens["rope"], cond["context_rope"], cond.get("context_mask")
        temb0, flags = cond.get("temb0"), tokens.get("cond")
        return scan_modules(self.transformer_blocks,
                            lambda blk, xc: blk(*xc, temb, rope, c_rope, mask, temb0, flags), (x, cond["context"]))

    def blocks(self, x, tokens, cond):
        """The blocks on the image tokens (or a shard of them), the text joining each attention as the masked
        context; -> the image tokens."""
        return self.double_blocks(x, tokens, cond)[0]

    def head(self, x, cond, shape=None):
        """Image tokens -> the prediction (B, N, patch^2 * out_channels) (diffusers' ``norm_out`` =
        ``AdaLayerNormContinuous``: scale first, then shift; the step's ``temb`` also under ``zero_cond_t``);
        ``shape`` is not needed."""
        scale, shift = jnp.split(self.norm_out_linear(jax.nn.silu(cond["temb"]).astype(x.dtype)), 2, axis=-1)
        return self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])

    def __call__(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shape=None,
                 rope=None, img_shapes=None, cond_flags=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                                     img_shape, rope, img_shapes, cond_flags)
        return self.head(self.blocks(x, tokens, cond), cond)


def pipefusion_stacks(cfg: QwenImageConfig) -> dict:
    """PipeFusion's stack (one: the double-stream blocks) and the text's ``cond`` keys."""
    return dict(stacked=STACKED, stacked_layers=cfg.num_layers, text_keys=TEXT_KEYS)


TORCH_RENAMES = [
    (r"^norm_out_linear\.", "norm_out.linear."),
    (r"\.norm1\.linear\.", ".img_mod.1."),
    (r"\.norm1_context\.linear\.", ".txt_mod.1."),
    (r"\.attn\.to_out\.", ".attn.to_out.0."),
    (r"\.ff\.net_0\.", ".img_mlp.net.0.proj."),
    (r"\.ff\.net_2\.", ".img_mlp.net.2."),
    (r"\.ff_context\.net_0\.", ".txt_mlp.net.0.proj."),
    (r"\.ff_context\.net_2\.", ".txt_mlp.net.2."),
]


def params_from_torch(flat: dict, cfg: QwenImageConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: QwenImageTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, dtype=dtype,
                          what="Qwen-Image transformer checkpoint")


def build(cfg: QwenImageConfig, params: dict, dtype=jnp.float32) -> QwenImageTransformer2DModel:
    return build_module(lambda: QwenImageTransformer2DModel(cfg, dtype=dtype), params)
