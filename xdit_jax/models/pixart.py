"""PixArt-alpha / PixArt-Sigma transformer (diffusers ``PixArtTransformer2DModel``) in Flax NNX.

The image latents become patch tokens (Conv2d patch embed + 2D sin-cos positions); each block is
diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``: a shared timestep
modulation (``adaln_single``, 6 x D per sample) plus a per-block ``scale_shift_table``, self-attention
over the image tokens, cross-attention to the caption (unmodulated, un-normed input), and a GELU(tanh)
MLP. Submodules carry the diffusers names so the torch -> Flax key map is derived
(``xdit_jax.keymap``); the tables below list what differs. The blocks are stacked on a leading layer
axis and run with one ``lax.scan``.

Self-attention goes through :func:`xdit_jax.parallel.attention.attention` (sequence-parallel over
the image tokens); cross-attention through :func:`xdit_jax.parallel.attention.cross_attention`
(local under every mesh: the caption is whole on every device). No collective here.
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
from xdit_jax.models.layers import (
    FeedForward,
    LayerNorm,
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    linear,
    scan_modules,
    sincos_1d,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention, cross_attention

STACKED = "transformer_blocks"  # the stacked blocks (one scan; PipeFusion splits them into stages)
TIME_PROJ_DIM = 256  # diffusers PixArtAlphaCombinedTimestepSizeEmbeddings: Timesteps(256, flip, shift 0)


@dataclasses.dataclass(frozen=True)
class PixArtConfig(TransformerDims):
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    cross_attention_dim: int | None = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False  # no effect here: logits and softmax are always float32
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None
    attention_type: str | None = "default"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PixArtConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.norm_type != "ada_norm_single":
            raise ValueError(f"Only PixArt transformers (norm_type 'ada_norm_single') are supported; this config "
                             f"has norm_type={cfg.norm_type!r} (e.g. a DiT 'Transformer2DModel' with 'ada_norm_zero').")
        if cfg.num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm cannot be None with norm_type 'ada_norm_single' (as in diffusers).")
        if cfg.activation_fn != "gelu-approximate":
            raise ValueError(f"Unsupported activation_fn {cfg.activation_fn!r}; PixArt uses 'gelu-approximate'.")
        if cfg.attention_type not in (None, "default"):
            raise ValueError(f"attention_type {cfg.attention_type!r} (GLIGEN fuser) is not supported; only 'default'.")
        if cfg.cross_attention_dim is None:
            raise ValueError("A PixArt transformer without cross-attention (cross_attention_dim=None) is not "
                             "supported: every released checkpoint attends to a caption.")
        if cfg.caption_channels is not None and cfg.cross_attention_dim != cfg.inner_dim:
            raise ValueError(f"cross_attention_dim={cfg.cross_attention_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {cfg.inner_dim}: the caption projection outputs that width.")
        if cfg.additional_conditions and cfg.inner_dim % 3:
            raise ValueError(f"Additional conditions (resolution, aspect ratio) need an inner dim divisible by 3 "
                             f"(two D/3 resolution embeddings + one D/3 aspect-ratio embedding), got {cfg.inner_dim}.")
        return cfg


    @property
    def learned_sigma(self) -> bool:
        """The prediction carries a variance half: (B, 2 * in_channels, H, W); the pipeline keeps
        ``[:, :in_channels]`` (diffusers: ``out_channels // 2 == latent_channels``)."""
        return self.out_ch // 2 == self.in_channels

    @property
    def additional_conditions(self) -> bool:
        """diffusers: ``use_additional_conditions`` None means ``sample_size == 128`` (PixArt-alpha 1024px)."""
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)

    @property
    def pos_interpolation_scale(self) -> float:
        if self.interpolation_scale is not None:
            return self.interpolation_scale
        return max(self.sample_size // 64, 1)

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size


# torch names that differ from the Flax path (regex on the derived torch name).
TORCH_RENAMES = [
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]
# A positional table exported as a buffer (diffusers keeps it non-persistent for PixArt).
TORCH_IGNORE = [r"^pos_embed\.pos_embed$"]


def sincos_2d_table(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """diffusers ``get_2d_sincos_pos_embed(dim, (grid_h, grid_w), base_size, interpolation_scale)``:
    (grid_h * grid_w, dim) float32, tokens row-major over (h, w); the first half encodes the column
    (w) coordinate, the second the row (h). Positions are float32 as torch computes them."""
    pos_h = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size) / np.float32(interpolation_scale)
    pos_w = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size) / np.float32(interpolation_scale)
    return sincos_2d_grid(dim, pos_h, pos_w)


def sincos_2d_grid(dim: int, pos_h: np.ndarray, pos_w: np.ndarray) -> np.ndarray:
    """diffusers ``get_2d_sincos_pos_embed_from_grid`` on the grid of row positions ``pos_h`` x column positions
    ``pos_w``: (len(pos_h) * len(pos_w), dim) float32, tokens row-major; the first half encodes the column."""
    ww, hh = np.meshgrid(pos_w, pos_h, indexing="xy")  # (grid_h, grid_w) each
    table = np.concatenate([sincos_1d(dim // 2, ww.reshape(-1)), sincos_1d(dim // 2, hh.reshape(-1))], axis=1)
    return table.astype(np.float32)


class PixArtAlphaCombinedTimestepSizeEmbeddings(nnx.Module):
    """Timestep embedding (+ resolution and aspect-ratio embeddings when the config uses them)."""

    def __init__(self, cfg: PixArtConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, d, dtype=dtype, rngs=rngs)
        self.use_additional_conditions = cfg.additional_conditions
        if self.use_additional_conditions:
            self.resolution_embedder = TimestepEmbedding(TIME_PROJ_DIM, d // 3, dtype=dtype, rngs=rngs)
            self.aspect_ratio_embedder = TimestepEmbedding(TIME_PROJ_DIM, d // 3, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, resolution, aspect_ratio, batch_size: int):
        proj = lambda v: timestep_embedding(jnp.asarray(v).reshape(-1), TIME_PROJ_DIM, True, 0).astype(self.dtype)
        emb = self.timestep_embedder(proj(timestep))
        emb = jnp.broadcast_to(emb, (batch_size, emb.shape[-1]))
        if self.use_additional_conditions:
            res = self.resolution_embedder(proj(resolution)).reshape(batch_size, -1)  # [h, w] per sample
            ar = self.aspect_ratio_embedder(proj(aspect_ratio)).reshape(batch_size, -1)
            emb = emb + jnp.concatenate([res, ar], axis=1)
        return emb


class AdaLayerNormSingle(nnx.Module):
    """-> (the (B, 6D) block modulation, the (B, D) embedded timestep the output head uses)."""

    def __init__(self, cfg: PixArtConfig, *, dtype, rngs):
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.linear = linear(cfg.inner_dim, 6 * cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, resolution, aspect_ratio, batch_size: int):
        embedded = self.emb(timestep, resolution, aspect_ratio, batch_size)
        return self.linear(jax.nn.silu(embedded)), embedded


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: PixArtConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """diffusers ``Attention`` (AttnProcessor2_0): self-attention over the image tokens when
    ``context`` is None, else cross-attention of the image tokens to ``context``.

    ``local``: the self-attention's keys are all on this device (Latte's temporal attention over the
    frames of each patch position): it goes through :func:`cross_attention`, never the
    sequence-parallel op (no collective, no PipeFusion buffer). A ``context`` of fewer samples than
    ``x`` (a divisor: Latte's caption, one per video, for the frames of that video next to each other)
    is projected once per sample and its K/V repeated."""

    def __init__(self, cfg: PixArtConfig, kv_dim: int, *, local: bool = False, dtype, rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.local = local
        self.to_q = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, context=None, context_mask=None):
        b, s, _ = x.shape
        src = x if context is None else context
        heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1)  # noqa: E731
        q, k, v = heads(self.to_q(x)), heads(self.to_k(src)), heads(self.to_v(src))
        if context is None:
            o = cross_attention(q, k, v) if self.local else attention(q, k, v)
        else:
            if k.shape[0] != b:  # one context per group of b / B_ctx consecutive rows
                k, v = (jnp.repeat(a, b // k.shape[0], axis=0) for a in (k, v))
                if context_mask is not None:
                    context_mask = jnp.repeat(context_mask, b // context_mask.shape[0], axis=0)
            o = cross_attention(q, k, v, kv_mask=context_mask)
        return self.to_out(o.reshape(b, s, -1))


class BasicTransformerBlock(nnx.Module):
    """``BasicTransformerBlock(norm_type="ada_norm_single")``; ``cross=False``: without the
    cross-attention (diffusers' ``cross_attention_dim=None``: Latte's temporal blocks); ``local``: its
    self-attention is local to the device (:class:`Attention`)."""

    def __init__(self, cfg: PixArtConfig, *, cross: bool = True, local: bool = False, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = LayerNorm(d, cfg.norm_eps, cfg.norm_elementwise_affine, dtype=dtype)
        self.attn1 = Attention(cfg, d, local=local, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(cfg, cfg.cross_attention_dim, dtype=dtype, rngs=rngs) if cross else None
        self.norm2 = LayerNorm(d, cfg.norm_eps, cfg.norm_elementwise_affine, dtype=dtype)
        self.ff = FeedForward(cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(jnp.zeros((6, d), dtype))

    def __call__(self, x, cond):
        """x: the image tokens (B, S, D) or any contiguous piece of them; cond: see ``embed``
        (``timestep`` (B, 6D); with the cross-attention ``context`` and ``context_mask``)."""
        b = x.shape[0]
        mod = self.scale_shift_table[...][None] + cond["timestep"].reshape(b, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod.astype(x.dtype), 6, axis=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h)
        if self.attn2 is not None:
            # PixArt: the cross-attention sees the un-normed, unmodulated tokens (norm2 is the MLP's norm).
            x = x + self.attn2(x, cond["context"], cond["context_mask"])
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(h)


class PixArtTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, added_cond, encoder_attention_mask)``
    as diffusers' forward.

    hidden_states: (B, C, H, W) latents (diffusers' layout); encoder_hidden_states: (B, L, caption_channels)
    (or (B, L, cross_attention_dim) without a caption projection); timestep: (B,) or a scalar;
    added_cond: {"resolution": (B, 2) [height, width] in pixels, "aspect_ratio": (B, 1) height / width}
    when ``cfg.additional_conditions`` (ignored otherwise); encoder_attention_mask: (B, L), 1/True = keep.
    Returns (B, out_channels, H, W).
    """

    def __init__(self, cfg: PixArtConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.adaln_single = AdaLayerNormSingle(cfg, dtype=dtype, rngs=rngs)
        self.caption_projection = (PixArtAlphaTextProjection(cfg.caption_channels, d, dtype=dtype, rngs=rngs)
                                   if cfg.caption_channels is not None else None)
        self.transformer_blocks = stack_modules(lambda r: BasicTransformerBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((2, d), dtype))
        self.proj_out = linear(d, cfg.patch_size * cfg.patch_size * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- pieces: embed (global) -> blocks (per token, any contiguous shard) -> head (global) --
    # The parallel engine (xdit_jax.parallel) shards the image tokens between embed and head.

    def embed(self, hidden_states, encoder_hidden_states, timestep, added_cond=None, encoder_attention_mask=None):
        """-> (x, tokens, cond).

        x: the image tokens (B, S, D), S = (H/p) * (W/p) row-major, positions added. tokens: ``{}``
        (PixArt has no per-token tables). cond (batch first, sharded with the batch):
        ``timestep`` (B, 6D) block modulation; ``embedded_timestep`` (B, D) for the head;
        ``context`` (B, L, D) projected caption; ``context_mask`` (B, L) bool keys to attend.
        """
        cfg, dtype = self.cfg, self.dtype
        b, _, h, w = hidden_states.shape
        check_input_shape(cfg, h, w)
        p = cfg.patch_size
        gh, gw = h // p, w // p
        x = self.pos_embed.proj(hidden_states.astype(dtype).transpose(0, 2, 3, 1)).reshape(b, gh * gw, -1)
        pos = sincos_2d_table(cfg.inner_dim, gh, gw, cfg.base_size, cfg.pos_interpolation_scale)
        x = (x.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(dtype)

        resolution = aspect_ratio = None
        if cfg.additional_conditions:
            if not added_cond or added_cond.get("resolution") is None or added_cond.get("aspect_ratio") is None:
                raise ValueError("This PixArt checkpoint uses additional conditions: pass added_cond="
                                 "{'resolution': (B, 2) [height, width], 'aspect_ratio': (B, 1) height / width}.")
            resolution = jnp.broadcast_to(jnp.asarray(added_cond["resolution"], jnp.float32).reshape(-1, 2), (b, 2))
            aspect_ratio = jnp.broadcast_to(jnp.asarray(added_cond["aspect_ratio"], jnp.float32).reshape(-1, 1),
                                            (b, 1))
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        t6, embedded = self.adaln_single(t, resolution, aspect_ratio, b)

        context = encoder_hidden_states.astype(dtype)
        if self.caption_projection is not None:
            context = self.caption_projection(context).reshape(b, -1, cfg.inner_dim)
        cond = {"timestep": t6, "embedded_timestep": embedded, "context": context,
                "context_mask": text_key_mask(encoder_attention_mask, b, context.shape[1])}
        return x, {}, cond

    def blocks(self, x, tokens, cond):
        """The block stack (one lax.scan) on the image tokens or a contiguous shard of them."""
        del tokens  # no per-token tables
        return scan_modules(self.transformer_blocks, lambda blk, y: blk(y, cond), x)

    def head(self, x, cond, shape):
        """Image tokens (B, S, D) -> the prediction (B, out_channels, H, W) for latents of ``shape``."""
        cfg = self.cfg
        b, _, h, w = shape
        p = cfg.patch_size
        mod = self.scale_shift_table[...][None] + cond["embedded_timestep"][:, None]  # (B, 2, D)
        shift, scale = jnp.split(mod.astype(x.dtype), 2, axis=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(b, h // p, w // p, p, p, cfg.out_ch).transpose(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(b, cfg.out_ch, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, added_cond=None, encoder_attention_mask=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, added_cond,
                                     encoder_attention_mask)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def text_key_mask(encoder_attention_mask, batch: int, length: int):
    """diffusers' encoder_attention_mask (B, L), 1/True = keep, as the (B, L) bool key mask of the
    cross-attention; None: every key. diffusers adds ``(1 - mask) * -10000`` to the logits, so a
    sample whose mask is all zero attends uniformly shifted logits, i.e. to every key as if unmasked;
    such rows are unmasked here (a -inf mask would give 0 instead)."""
    if encoder_attention_mask is None:
        return jnp.ones((batch, length), bool)
    m = jnp.asarray(encoder_attention_mask)
    if m.ndim != 2 or m.shape[1] != length:
        raise ValueError(f"encoder_attention_mask must be (batch, {length}) with 1 = keep, 0 = discard; "
                         f"got shape {m.shape}.")
    keep = m if m.dtype == jnp.bool_ else m.astype(jnp.float32) > 0.5
    keep = jnp.broadcast_to(keep, (batch, length))
    return keep | ~jnp.any(keep, axis=1, keepdims=True)


def check_input_shape(cfg: PixArtConfig, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")


def params_from_torch(flat: dict, cfg: PixArtConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: PixArtTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=TORCH_IGNORE,
                          dtype=dtype, what="PixArt transformer checkpoint")


def build(cfg: PixArtConfig, params: dict, dtype=jnp.float32) -> PixArtTransformer2DModel:
    return build_module(lambda: PixArtTransformer2DModel(cfg, dtype=dtype), params)
