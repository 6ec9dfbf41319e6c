"""HunyuanDiT transformer (diffusers ``HunyuanDiT2DModel``) in Flax NNX.

Image latents become patch tokens (Conv2d patch embed, no additive positions: 2D RoPE instead). Each
``HunyuanDiTBlock``: an optional long-skip merge (``skip_norm`` on [x; skip], ``skip_linear``), then
self-attention after a LayerNorm shifted by the timestep embedding (``AdaLayerNormShift``), cross
attention to the text after ``norm2``, an MLP after ``norm3``. Attention normalises q and k per head
(LayerNorm) and rotates with 2D RoPE: the queries always, the keys only in self-attention (the text
keys of the cross attention carry no positions). The text is [BERT (77 tokens); mT5 (256 tokens)
through ``text_embedder``] with every masked position replaced by the learned
``text_embedding_padding`` row; the cross attention then runs without a mask (as diffusers).
The conditioning vector is the timestep embedding plus ``extra_embedder`` of [an attention pool of
the raw mT5 states; (v1.0/1.1 only) the sinusoids of the 6 image-meta sizes and a style embedding].

Long skips (diffusers' loop over ``blocks`` with a list ``skips``): with ``n = num_layers`` (even),
layers ``i < n/2 - 1`` push their output, layers ``i > n/2`` pop one into their skip merge; the
two layers in between do neither. Here three stacks, each run with one ``lax.scan``:

* ``blocks_down`` — torch ``blocks.0 .. n/2-2``; the scan also returns every layer's output,
* ``blocks_mid``  — torch ``blocks.n/2-1, n/2``,
* ``blocks_skip`` — torch ``blocks.n/2+1 .. n-1`` (with skip weights); its scan consumes the
  down outputs in reverse order (last pushed = first popped).

Everything in the blocks is per token except attention, so any contiguous shard of the image tokens
runs them (:func:`xdit_jax.parallel.sequence.run_blocks`). PipeFusion runs
:meth:`HunyuanDiT2DModel.pipefusion_blocks`: the three stacks looped over the stages, the long skips
riding in the carry (a shift register each patch carries: a down block pushes, a skip block pops), so
a skip crosses stage boundaries with the patch it belongs to.

Self-attention goes through :func:`xdit_jax.parallel.attention.attention`; cross attention (and the
embedding's attention pool) through :func:`xdit_jax.parallel.attention.cross_attention` (local under
every mesh). No collective here.
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
    LayerNorm,
    TimestepEmbedding,
    apply_rope,
    gelu_tanh,
    held_layers,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
    unrolled_layers,
)
from xdit_jax.parallel.attention import attention, cross_attention

# The three block stacks (see the module docstring); ``STACKED`` names the one every config has.
STACKS = ("blocks_down", "blocks_mid", "blocks_skip")
STACKED = "blocks_mid"
TIME_PROJ_DIM = 256  # Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0), time and size
POOLER_HEADS = 8  # HunyuanDiTAttentionPool(num_heads=8)
META_SIZES = 6  # image_meta_size: original (h, w), target (h, w), crop top-left (top, left)


@dataclasses.dataclass(frozen=True)
class HunyuanDiTConfig(TransformerDims):
    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: int | None = None
    patch_size: int | None = None
    activation_fn: str = "gelu-approximate"
    sample_size: int = 32  # unused: no learned / table positions (RoPE from the latent grid)
    hidden_size: int = 1152
    num_layers: int = 28
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    cross_attention_dim: int = 1024
    norm_type: str = "layer_norm"  # unused by diffusers too
    cross_attention_dim_t5: int = 2048
    pooled_projection_dim: int = 1024
    text_len: int = 77
    text_len_t5: int = 256
    use_style_cond_and_image_meta_size: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HunyuanDiTConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.in_channels is None or cfg.patch_size is None:
            raise ValueError("A HunyuanDiT config needs in_channels and patch_size (diffusers' defaults are None).")
        if cfg.activation_fn != "gelu-approximate":
            raise ValueError(f"Unsupported activation_fn {cfg.activation_fn!r}; HunyuanDiT uses 'gelu-approximate'.")
        if cfg.hidden_size != cfg.inner_dim:
            raise ValueError(f"hidden_size={cfg.hidden_size} must equal num_attention_heads x attention_head_dim = "
                             f"{cfg.inner_dim}: diffusers' patch embedding and conditioning output hidden_size and "
                             f"the blocks take the inner dim (every release has them equal).")
        if cfg.attention_head_dim % 4:
            raise ValueError(f"attention_head_dim={cfg.attention_head_dim} must be a multiple of 4: the 2D RoPE "
                             f"splits each head into two halves of rotated pairs.")
        if cfg.num_layers < 2 or cfg.num_layers % 2:
            raise ValueError(f"num_layers={cfg.num_layers} must be even and >= 2: the long skips pair layer i with "
                             f"layer num_layers - 1 - i (diffusers fails on an odd count, popping an empty list).")
        if cfg.cross_attention_dim_t5 % POOLER_HEADS:
            raise ValueError(f"cross_attention_dim_t5={cfg.cross_attention_dim_t5} must be divisible by the "
                             f"text pooler's {POOLER_HEADS} heads.")
        return cfg

    @property
    def out_ch(self) -> int:
        """(B, 2 * in_channels, H, W) with learn_sigma (the pipeline keeps the first half)."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def ff_inner_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def text_tokens(self) -> int:
        return self.text_len + self.text_len_t5

    @property
    def n_down(self) -> int:
        """Layers that push a skip (== layers that pop one)."""
        return self.num_layers // 2 - 1

    @property
    def rope_base_size(self) -> int:
        """The pipeline's ``base_size = 512 // 8 // patch_size``: the grid the RoPE positions span."""
        return 512 // 8 // self.patch_size


# torch names that differ from the Flax path (regex on the derived torch name).
TORCH_RENAMES = [
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]


def stacked_layout(cfg: HunyuanDiTConfig) -> dict[str, tuple[str, int, int]]:
    """Flax stack -> (torch ModuleList, first torch index, layer count)."""
    n, d = cfg.num_layers, cfg.n_down
    return {"blocks_down": ("blocks", 0, d), "blocks_mid": ("blocks", d, 2), "blocks_skip": ("blocks", n // 2 + 1, d)}


# ----- 2D RoPE as the pipeline builds it (host side, static shapes) -----

def resize_crop_region(grid_h: int, grid_w: int, base_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """diffusers' ``get_resize_crop_region_for_grid((grid_h, grid_w), base_size)``: the grid resized to
    fit a base_size square (long side = base_size), centred: ((top, left), (bottom, right))."""
    if grid_h / grid_w > 1:
        rh, rw = base_size, int(round(base_size / grid_h * grid_w))
    else:
        rw, rh = base_size, int(round(base_size / grid_w * grid_h))
    top, left = int(round((base_size - rh) / 2.0)), int(round((base_size - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """torch.linspace(start, stop, n, dtype=float32) on the CPU: float32 step, filled from both ends."""
    s, e = np.float32(start), np.float32(stop)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n)
    lo = s + step * i.astype(np.float32)
    hi = e - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _rope_axis(dim: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_1d_rotary_pos_embed(dim, pos, use_real=True)`` (interleaved pairs), in float32 as torch."""
    freqs = np.float32(1.0) / np.power(np.float32(10000.0), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    ang = np.outer(pos.astype(np.float32), freqs.astype(np.float32)).astype(np.float32)
    return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, base_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's ``image_rotary_emb``: ``get_2d_rotary_pos_embed(head_dim, crop region, (grid_h,
    grid_w))`` -> (cos, sin), each (grid_h * grid_w, head_dim) float32, tokens row-major over (h, w).
    As diffusers: the first half of each head rotates by the column (w) coordinate, the second by the
    row (h); coordinates span the crop region with ``endpoint=False``."""
    (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w, base_size)
    ph = _linspace_f32(top, bottom * (grid_h - 1) / grid_h, grid_h)
    pw = _linspace_f32(left, right * (grid_w - 1) / grid_w, grid_w)
    ww, hh = np.meshgrid(pw, ph, indexing="xy")  # (grid_h, grid_w) each
    cw, sw = _rope_axis(head_dim // 2, ww.reshape(-1))
    ch, sh = _rope_axis(head_dim // 2, hh.reshape(-1))
    return np.concatenate([cw, ch], axis=1), np.concatenate([sw, sh], axis=1)


# ----- modules (named as diffusers' so the key map is derived) -----

def silu_f32(x):
    """diffusers' ``FP32SiLU`` (and ``silu(emb.float()).to(dtype)``): SiLU in float32, back to x's dtype."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class TextProjection(nnx.Module):
    """``PixArtAlphaTextProjection(act_fn="silu_fp32")``: linear_1 -> SiLU (float32) -> linear_2."""

    def __init__(self, din: int, hidden: int, dout: int, *, dtype, rngs):
        self.linear_1 = linear(din, hidden, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(hidden, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(silu_f32(self.linear_1(x)))


class FeedForward(nnx.Module):
    """``FeedForward(dim, activation_fn="gelu-approximate", inner_dim=int(dim * mlp_ratio))``
    (mlp_ratio need not be an integer: 4.3637 in the releases)."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs):
        self.net_0 = linear(dim, inner, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.net_2(gelu_tanh(self.net_0(x)))


class AttentionPool(nnx.Module):
    """``HunyuanDiTAttentionPool``: one query (the mean token) attends over [mean; tokens] + learned
    positions with 8 heads -> (B, output_dim). Runs on the raw (unmasked) mT5 states, as diffusers."""

    def __init__(self, seq_len: int, dim: int, out_dim: int, *, dtype, rngs):
        self.positional_embedding = nnx.Param(jnp.zeros((seq_len + 1, dim), dtype))
        self.k_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.q_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.c_proj = linear(dim, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, _, c = x.shape
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        x = x + self.positional_embedding[...].astype(x.dtype)[None]
        heads = lambda y: y.reshape(b, y.shape[1], POOLER_HEADS, c // POOLER_HEADS)
        o = cross_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(o.reshape(b, c))


class TimestepTextSizeStyleEmbedding(nnx.Module):
    """``HunyuanCombinedTimestepTextSizeStyleEmbedding`` -> the (B, D) conditioning vector."""

    def __init__(self, cfg: HunyuanDiTConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.dtype = dtype
        self.use_meta = cfg.use_style_cond_and_image_meta_size
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, d, dtype=dtype, rngs=rngs)
        self.pooler = AttentionPool(cfg.text_len_t5, cfg.cross_attention_dim_t5, cfg.pooled_projection_dim,
                                    dtype=dtype, rngs=rngs)
        extra_in = cfg.pooled_projection_dim
        if self.use_meta:
            self.style_embedder = nnx.Embed(1, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
            extra_in += TIME_PROJ_DIM * META_SIZES + d
        self.extra_embedder = TextProjection(extra_in, 4 * d, d, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, t5_states, image_meta_size, style):
        b = t5_states.shape[0]
        proj = lambda v: timestep_embedding(v.reshape(-1), TIME_PROJ_DIM, True, 0).astype(self.dtype)
        temb = self.timestep_embedder(proj(timestep))
        extra = [self.pooler(t5_states)]
        if self.use_meta:
            extra.append(proj(image_meta_size).reshape(b, META_SIZES * TIME_PROJ_DIM))
            extra.append(self.style_embedder(style))
        return temb + self.extra_embedder(jnp.concatenate(extra, axis=1))


class PatchEmbed(nnx.Module):
    """``PatchEmbed(pos_embed_type=None)``: the Conv2d only."""

    def __init__(self, cfg: HunyuanDiTConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(cfg.in_channels, cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """diffusers ``Attention`` with ``HunyuanAttnProcessor2_0``: per-head LayerNorm on q and k (eps
    1e-6, affine), RoPE on q always and on k in self-attention only."""

    def __init__(self, cfg: HunyuanDiTConfig, kv_dim: int, *, dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, d, dtype=dtype, rngs=rngs)
        self.norm_q = LayerNorm(hd, 1e-6, dtype=dtype)
        self.norm_k = LayerNorm(hd, 1e-6, dtype=dtype)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope, context=None):
        b, s, _ = x.shape
        src = x if context is None else context
        heads = lambda y: y.reshape(b, y.shape[1], self.heads, -1)
        q = apply_rope(self.norm_q(heads(self.to_q(x))), *rope)
        k = self.norm_k(heads(self.to_k(src)))
        v = heads(self.to_v(src))
        if context is None:
            o = attention(q, apply_rope(k, *rope), v)
        else:  # the text keys carry no positions (diffusers: ``if not attn.is_cross_attention``)
            o = cross_attention(q, k, v)
        return self.to_out(o.reshape(b, s, -1))


class AdaLayerNormShift(nnx.Module):
    """LayerNorm (float32, affine) + a shift from the conditioning vector."""

    def __init__(self, cfg: HunyuanDiTConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.linear = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, 1e-6, dtype=dtype)

    def __call__(self, x, temb):
        return self.norm(x) + self.linear(silu_f32(temb))[:, None].astype(x.dtype)


class HunyuanDiTBlock(nnx.Module):
    def __init__(self, cfg: HunyuanDiTConfig, skip: bool, *, dtype, rngs):
        d = cfg.inner_dim
        if skip:
            self.skip_norm = LayerNorm(2 * d, 1e-6, dtype=dtype)
            self.skip_linear = linear(2 * d, d, dtype=dtype, rngs=rngs)
        self.norm1 = AdaLayerNormShift(cfg, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(cfg, d, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-6, dtype=dtype)
        self.attn2 = Attention(cfg, cfg.cross_attention_dim, dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(d, 1e-6, dtype=dtype)
        self.ff = FeedForward(d, cfg.ff_inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, cond, rope, skip=None):
        """x: the image tokens (B, S, D) or any contiguous piece of them; rope: their (cos, sin)."""
        if skip is not None:
            x = self.skip_linear(self.skip_norm(jnp.concatenate([x, skip], axis=-1)))
        x = x + self.attn1(self.norm1(x, cond["temb"]), rope)
        x = x + self.attn2(self.norm2(x), rope, cond["context"])
        return x + self.ff(self.norm3(x))


class AdaLayerNormContinuous(nnx.Module):
    """diffusers ``AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)``: scale, shift
    (in that order) from SiLU (float32) of the conditioning vector."""

    def __init__(self, d: int, *, dtype, rngs):
        self.linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, 1e-6, affine=False, dtype=dtype)

    def __call__(self, x, temb):
        scale, shift = jnp.split(self.linear(silu_f32(temb).astype(x.dtype)), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


def _scan(stacked, fn, carry, xs=None):
    """``carry, y = fn(layer, carry, x)`` over a stacked module (and ``xs``) with ``lax.scan``."""
    graphdef, state = nnx.split(stacked)
    if held_layers(state):  # weights held layer by layer (layers.unstack_layers): unrolled
        return unrolled_layers(graphdef, state, fn, carry, xs)
    return jax.lax.scan(lambda c, sx: fn(nnx.merge(graphdef, sx[0]), c, sx[1]), carry, (state, xs))


class HunyuanDiT2DModel(nnx.Module):
    """``model(hidden_states, timestep, encoder_hidden_states, text_embedding_mask,
    encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size, style)`` as diffusers' forward,
    with the pipeline's RoPE computed from the latent grid (or ``image_rotary_emb`` given).

    hidden_states: (B, C, H, W) latents; timestep: (B,) or a scalar, float (the scheduler's t);
    encoder_hidden_states: (B, text_len, cross_attention_dim) BERT states, text_embedding_mask (B, text_len);
    encoder_hidden_states_t5: (B, text_len_t5, cross_attention_dim_t5) mT5 states, text_embedding_mask_t5
    (B, text_len_t5) (masks 1/True = keep); image_meta_size: (B, 6) float [orig h, orig w, target h,
    target w, crop top, crop left] in pixels and style: (B,) int (always 0) — both required when
    ``use_style_cond_and_image_meta_size`` (v1.0/1.1), ignored otherwise (v1.2).
    Returns (B, out_ch, H, W) (out_ch = 2 * in_channels with learn_sigma).
    """

    def __init__(self, cfg: HunyuanDiTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        t5 = cfg.cross_attention_dim_t5
        self.text_embedder = TextProjection(t5, 4 * t5, cfg.cross_attention_dim, dtype=dtype, rngs=rngs)
        self.text_embedding_padding = nnx.Param(jnp.zeros((cfg.text_tokens, cfg.cross_attention_dim), dtype))
        self.pos_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_extra_emb = TimestepTextSizeStyleEmbedding(cfg, dtype=dtype, rngs=rngs)
        make = lambda skip: (lambda r: HunyuanDiTBlock(cfg, skip, dtype=dtype, rngs=r))
        nd = cfg.n_down
        self.blocks_down = stack_modules(make(False), nd, rngs) if nd else None
        self.blocks_mid = stack_modules(make(False), 2, rngs)
        self.blocks_skip = stack_modules(make(True), nd, rngs) if nd else None
        self.norm_out = AdaLayerNormContinuous(d, dtype=dtype, rngs=rngs)
        self.proj_out = linear(d, cfg.patch_size * cfg.patch_size * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- pieces: embed (global) -> blocks (per token, any contiguous shard) -> head (global) --

    def embed(self, hidden_states, timestep, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
              text_embedding_mask_t5, image_meta_size=None, style=None, image_rotary_emb=None):
        """-> (x, tokens, cond).

        x: the image tokens (B, S, D), S = (H/p) * (W/p) row-major. tokens (sequence on axis 0, shards
        with x): ``rope_cos``, ``rope_sin`` (S, head_dim) float32, the pipeline's 2D RoPE for the latent
        grid (or ``image_rotary_emb`` = (cos, sin) if given). cond (batch first): ``temb`` (B, D) the
        conditioning vector; ``context`` (B, text_len + text_len_t5, cross_attention_dim) the text with
        masked positions replaced by ``text_embedding_padding`` (attended without a mask).
        """
        cfg, dtype = self.cfg, self.dtype
        b, _, h, w = hidden_states.shape
        check_input_shape(cfg, h, w)
        p = cfg.patch_size
        gh, gw = h // p, w // p
        x = self.pos_embed.proj(hidden_states.astype(dtype).transpose(0, 2, 3, 1)).reshape(b, gh * gw, -1)

        bert = jnp.asarray(encoder_hidden_states)
        t5 = jnp.asarray(encoder_hidden_states_t5)
        _check_text(bert, cfg.text_len, cfg.cross_attention_dim, b, "encoder_hidden_states (BERT)")
        _check_text(t5, cfg.text_len_t5, cfg.cross_attention_dim_t5, b, "encoder_hidden_states_t5 (mT5)")
        bert, t5 = jnp.broadcast_to(bert, (b,) + bert.shape[1:]).astype(dtype), \
            jnp.broadcast_to(t5, (b,) + t5.shape[1:]).astype(dtype)
        meta = sty = None
        if cfg.use_style_cond_and_image_meta_size:
            if image_meta_size is None or style is None:
                raise ValueError("This HunyuanDiT checkpoint (v1.0/1.1, use_style_cond_and_image_meta_size) needs "
                                 "image_meta_size (B, 6) [original h, w, target h, w, crop top, left] and style "
                                 "(B,) (0).")
            meta = jnp.broadcast_to(jnp.asarray(image_meta_size, jnp.float32).reshape(-1, META_SIZES),
                                    (b, META_SIZES))
            sty = jnp.broadcast_to(jnp.asarray(style).astype(jnp.int32).reshape(-1), (b,))
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb = self.time_extra_emb(t, t5, meta, sty)

        context = jnp.concatenate([bert, self.text_embedder(t5)], axis=1)
        keep = jnp.concatenate([_mask(text_embedding_mask, b, cfg.text_len, "text_embedding_mask"),
                                _mask(text_embedding_mask_t5, b, cfg.text_len_t5, "text_embedding_mask_t5")], axis=1)
        context = jnp.where(keep[..., None], context, self.text_embedding_padding[...].astype(dtype)[None])

        if image_rotary_emb is None:
            cos, sin = rope_2d(cfg.attention_head_dim, gh, gw, cfg.rope_base_size)
        else:
            cos, sin = image_rotary_emb
        tokens = {"rope_cos": jnp.asarray(cos, jnp.float32), "rope_sin": jnp.asarray(sin, jnp.float32)}
        return x, tokens, {"temb": temb, "context": context}

    def blocks(self, x, tokens, cond):
        """The three block stacks (a scan each) on the image tokens or a contiguous shard of them."""
        rope = (tokens["rope_cos"], tokens["rope_sin"])
        skips = None
        if self.blocks_down is not None:
            x, skips = _scan(self.blocks_down, lambda blk, y, _: (blk(y, cond, rope),) * 2, x)
        x, _ = _scan(self.blocks_mid, lambda blk, y, _: (blk(y, cond, rope), None), x)
        if self.blocks_skip is not None:  # pops: the last pushed output first
            x, _ = _scan(self.blocks_skip, lambda blk, y, s: (blk(y, cond, rope, s), None), x, skips[::-1])
        return x

    def pipefusion_blocks(self, x, tokens, cond):
        """:meth:`blocks` in the form PipeFusion runs (equal to it): each stack's scan carries the image
        tokens *and* the long skips, a register (d, B, S, D) of the down blocks' outputs: a down block pushes
        its output at the front (the register shifts back by one), a skip block takes the front and shifts
        the rest forward; the last pushed is the first popped, as diffusers' list, and no block needs its
        index (a stage holds any run of layers). Every stack carries the same (tokens, register), so the
        looped pipeline hands it from stack to stack (:func:`xdit_jax.parallel.pipefusion.run_pipefusion`)."""
        rope = (tokens["rope_cos"], tokens["rope_sin"])
        carry = (x, jnp.zeros((self.cfg.n_down,) + x.shape, x.dtype))

        def push(blk, c):
            y = blk(c[0], cond, rope)
            return y, jnp.concatenate([y[None], c[1][:-1]])

        def pop(blk, c):
            return blk(c[0], cond, rope, c[1][0]), jnp.concatenate([c[1][1:], c[1][:1]])

        if self.blocks_down is not None:
            carry = scan_modules(self.blocks_down, push, carry)
        carry = scan_modules(self.blocks_mid, lambda blk, c: (blk(c[0], cond, rope), c[1]), carry)
        if self.blocks_skip is not None:
            carry = scan_modules(self.blocks_skip, pop, carry)
        return carry[0]

    def head(self, x, cond, shape):
        """Image tokens (B, S, D) -> the prediction (B, out_ch, H, W) for latents of ``shape``."""
        cfg = self.cfg
        b, _, h, w = shape
        p = cfg.patch_size
        x = self.proj_out(self.norm_out(x, cond["temb"]))
        x = x.reshape(b, h // p, w // p, p, p, cfg.out_ch).transpose(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(b, cfg.out_ch, h, w)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
                 text_embedding_mask_t5, image_meta_size=None, style=None, image_rotary_emb=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, text_embedding_mask,
                                     encoder_hidden_states_t5, text_embedding_mask_t5, image_meta_size, style,
                                     image_rotary_emb)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: HunyuanDiTConfig) -> dict:
    """PipeFusion's stacks (``_init_parts``' ``stacked`` / ``stacked_layers``), in the order the blocks run:
    down (where the model has long skips), mid, skip."""
    stacks = [(name, n) for name, n in zip(STACKS, (cfg.n_down, 2, cfg.n_down)) if n]
    return dict(stacked=tuple(n for n, _ in stacks), stacked_layers=tuple(k for _, k in stacks))


def _check_text(states, length: int, dim: int, batch: int, name: str) -> None:
    if states.ndim != 3 or states.shape[1:] != (length, dim) or states.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (batch, {length}, {dim}) (padded to the config's text length); "
                         f"got {states.shape}.")


def _mask(mask, batch: int, length: int, name: str):
    """A (B, L) keep mask (1/True = keep) as bool; diffusers takes ``mask.bool()`` (nonzero = keep)."""
    if mask is None:
        raise ValueError(f"{name} is required (B, {length}); diffusers' HunyuanDiT always takes the text masks.")
    m = jnp.asarray(mask)
    if m.ndim != 2 or m.shape[1] != length or m.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (batch, {length}) with 1 = keep, 0 = padding; got shape {m.shape}.")
    return jnp.broadcast_to(m != 0, (batch, length))


def check_input_shape(cfg: HunyuanDiTConfig, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")


def params_from_torch(flat: dict, cfg: HunyuanDiTConfig, dtype=None) -> dict:
    stacked = {k: v for k, v in stacked_layout(cfg).items() if v[2]}
    return map_state_dict(flat, expected_shapes(lambda: HunyuanDiT2DModel(cfg)), stacked=stacked,
                          renames=TORCH_RENAMES, dtype=dtype, what="HunyuanDiT transformer checkpoint")


def build(cfg: HunyuanDiTConfig, params: dict, dtype=jnp.float32) -> HunyuanDiT2DModel:
    return build_module(lambda: HunyuanDiT2DModel(cfg, dtype=dtype), params)
