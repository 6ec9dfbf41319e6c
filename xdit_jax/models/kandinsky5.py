"""Kandinsky 5.0 transformer (diffusers ``Kandinsky5Transformer3DModel``, kandinskylab/Kandinsky-5.0-*) in Flax NNX.

Two stacks with one time conditioning (``time_embed`` = the sinusoids of the timestep, ``model_dim`` wide, cos
first, through ``time_embeddings`` (Linear, SiLU, Linear), plus ``pooled_text_embeddings`` of the CLIP pooled
vector (Linear, LayerNorm)); every modulation is ``Linear(SiLU(time_embed))`` chunked into shift / scale / gate:

* the text stack (``text_transformer_blocks``, "encoder" blocks): the Qwen2.5-VL states through
  ``text_embeddings`` (Linear, LayerNorm), then self-attention over the text (1-D RoPE of the token index) and a
  GELU feed-forward, each on a modulated LayerNorm with a gated residual;
* the visual stack (``visual_transformer_blocks``, "decoder" blocks): patch tokens (features ``(pt, ph, pw, C)``,
  channels-last latents (B, T, H, W, C) as diffusers') through ``visual_embeddings``, then self-attention (3-D
  RoPE: the head split into ``axes_dims`` for the frame, row and column; each axis' angles divided by the
  pipeline's ``scale_factor``), cross-attention to the text stack's output (no RoPE), and the feed-forward;
* ``out_layer``: modulated LayerNorm, Linear, unpatchify (features ``(C, pt, ph, pw)`` there).

Attention: q / k RMS-normed per head (torch's ``nn.RMSNorm`` without eps: float32's machine epsilon); after the
RoPE diffusers rounds q and k to bfloat16 (its ``apply_rotary`` returns bfloat16, then back to the input dtype),
and so does this model, also in float32 (the reference's numbers; see the tests).

Over the mesh: the text stack runs in :meth:`embed`, before the sharding (every device holds the text whole); the
visual tokens are the sharded sequence of :func:`xdit_jax.parallel.sequence.run_blocks`, self-attention through
:func:`xdit_jax.parallel.attention.attention`, cross-attention through
:func:`~xdit_jax.parallel.attention.cross_attention` (local under every mesh). ``text_mask`` (B, L) masks text
tokens: diffusers runs the negative and the positive prompt as separate calls, each padded to its own longest
prompt; here they are one CFG batch, the shorter padded further with masked tokens (masked in the text stack's
self-attention and as cross-attention keys), which changes nothing for the real ones.

Refused (clear errors): the sparse "nabla" attention (``attention_type`` other than "regular").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import LayerNorm, apply_rope, linear, scan_modules, stack_modules
from xdit_jax.parallel.attention import attention, cross_attention, local_attention

STACKED = "visual_transformer_blocks"
TEXT_STACK = "text_transformer_blocks"
ROPE_MAX_POS = (128, 128, 128)  # diffusers' Kandinsky5RoPE3D tables
TEXT_ROPE_MAX_POS = 1024  # Kandinsky5RoPE1D's
F32_EPS = float(np.finfo(np.float32).eps)  # torch.nn.RMSNorm(eps=None) on float32 inputs


@dataclasses.dataclass(frozen=True)
class Kandinsky5Config:
    in_visual_dim: int = 4
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    time_dim: int = 512
    out_visual_dim: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 2048
    ff_dim: int = 5120
    num_text_blocks: int = 2
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    visual_cond: bool = False
    attention_type: str = "regular"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Kandinsky5Config:
        return cls(**known_fields(cls, d))

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "axes_dims", tuple(int(a) for a in self.axes_dims))
        if self.attention_type != "regular":
            raise NotImplementedError(
                f"Kandinsky 5.0 attention_type={self.attention_type!r} (the sparse 'nabla' attention of the 10 s "
                "checkpoints: flex attention over a block mask estimated per step) is not supported here; only "
                "'regular' (full) attention.")
        if len(self.patch_size) != 3 or len(self.axes_dims) != 3:
            raise ValueError(f"patch_size and axes_dims must have 3 entries; got {self.patch_size}, {self.axes_dims}.")
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be even (RoPE rotates pairs).")
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} is not a multiple of the head dim sum(axes_dims) = "
                             f"{self.head_dim}.")
        if self.model_dim % 2:
            raise ValueError(f"model_dim {self.model_dim} must be even (the timestep sinusoids).")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def heads(self) -> int:
        return self.model_dim // self.head_dim

    # the names the shared pipeline code reads (PipeFusion's K/V buffers, the latent shape)
    @property
    def num_attention_heads(self) -> int:
        return self.heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim

    @property
    def num_layers(self) -> int:
        return self.num_visual_blocks

    @property
    def in_channels(self) -> int:
        return self.in_visual_dim

    @property
    def visual_embed_dim(self) -> int:
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim


def _freqs(n: int, max_period: float = 10000.0) -> np.ndarray:
    """diffusers' ``get_freqs(n)`` in float32."""
    return np.exp(np.float32(-math.log(max_period)) * np.arange(n, dtype=np.float32) / np.float32(n)).astype(
        np.float32)


def _pairs(args):
    """Angles (..., D/2) -> (cos, sin) (..., D) for :func:`~xdit_jax.models.layers.apply_rope` (pairs interleaved);
    numpy where the angles are (the tables of a static shape), else traced."""
    xp = np if isinstance(args, np.ndarray) else jnp
    args = args.astype(np.float32)
    return xp.repeat(xp.cos(args), 2, axis=-1), xp.repeat(xp.sin(args), 2, axis=-1)


def text_rope_table(cfg: Kandinsky5Config, length: int):
    """cos, sin (length, head_dim) of diffusers' ``Kandinsky5RoPE1D`` at positions 0..length-1."""
    if length > TEXT_ROPE_MAX_POS:
        raise ValueError(f"{length} text tokens exceed Kandinsky 5.0's text RoPE table of {TEXT_ROPE_MAX_POS}.")
    pos = np.arange(length, dtype=np.float32)
    return _pairs(np.outer(pos, _freqs(cfg.head_dim // 2)).astype(np.float32))


def visual_rope_table(cfg: Kandinsky5Config, grid, scale_factor=(1.0, 1.0, 1.0)):
    """cos, sin (T' H' W', head_dim) of diffusers' ``Kandinsky5RoPE3D`` (row-major frames, rows, columns); each axis'
    float32 angles divided by its ``scale_factor`` entry."""
    for n, m, name in zip(grid, ROPE_MAX_POS, ("frames", "rows", "columns")):
        if n > m:
            raise ValueError(f"{n} latent {name} (after patching) exceed Kandinsky 5.0's RoPE table of {m}.")
    static = all(isinstance(s, (int, float, np.number)) for s in scale_factor)
    parts = []
    for ax, (d, n, s) in enumerate(zip(cfg.axes_dims, grid, scale_factor)):
        a = np.outer(np.arange(n, dtype=np.float32), _freqs(d // 2)).astype(np.float32)
        a = a / np.float32(s) if static else a / jnp.asarray(s, jnp.float32)  # a traced scale: the same float32 op
        shape = [1, 1, 1, d // 2]
        shape[ax] = n
        parts.append((np if static else jnp).broadcast_to(a.reshape(shape), (*grid, d // 2)))
    xp = np if static else jnp
    return _pairs(xp.concatenate(parts, axis=-1).reshape(-1, cfg.head_dim // 2))


# ----- modules (diffusers' names) -----

class Embeddings(nnx.Module):
    """``Kandinsky5TextEmbeddings``: Linear, LayerNorm with weights."""

    def __init__(self, din: int, d: int, *, dtype, rngs):
        self.in_layer = linear(din, d, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, 1e-5, affine=True, dtype=dtype)

    def __call__(self, x):
        return self.norm(self.in_layer(x))


class TimeEmbeddings(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        self.in_layer = linear(cfg.model_dim, cfg.time_dim, dtype=dtype, rngs=rngs)
        self.out_layer = linear(cfg.time_dim, cfg.time_dim, dtype=dtype, rngs=rngs)
        self.half = cfg.model_dim // 2

    def __call__(self, t, dtype):
        args = t.astype(jnp.float32)[:, None] * jnp.asarray(_freqs(self.half))[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        return self.out_layer(jax.nn.silu(self.in_layer(emb.astype(dtype))))


class VisualEmbeddings(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        self.in_layer = linear(int(np.prod(cfg.patch_size)) * cfg.visual_embed_dim, cfg.model_dim, dtype=dtype,
                               rngs=rngs)


class Modulation(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, n: int, *, dtype, rngs):
        self.n = n
        self.out_layer = linear(cfg.time_dim, n * cfg.model_dim, dtype=dtype, rngs=rngs)

    def __call__(self, temb):
        """-> n chunks (B, 1, D) float32 in diffusers' order."""
        return jnp.split(self.out_layer(jax.nn.silu(temb)).astype(jnp.float32)[:, None], self.n, axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        d = cfg.model_dim
        self.heads = cfg.heads
        self.to_query = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_key = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_value = linear(d, d, dtype=dtype, rngs=rngs)
        self.query_norm = RMSNormNoEps(cfg.head_dim, dtype=dtype)
        self.key_norm = RMSNormNoEps(cfg.head_dim, dtype=dtype)
        self.out_layer = linear(d, d, dtype=dtype, rngs=rngs)

    def qkv(self, x, src, rope=None):
        heads = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        q = self.query_norm(heads(self.to_query(x)))
        k = self.key_norm(heads(self.to_key(src)))
        v = heads(self.to_value(src))
        if rope is not None:  # diffusers' apply_rotary: float32 math, the result rounded to bfloat16
            q = apply_rope(q.astype(jnp.float32), *rope).astype(jnp.bfloat16).astype(q.dtype)
            k = apply_rope(k.astype(jnp.float32), *rope).astype(jnp.bfloat16).astype(k.dtype)
        return q, k, v

    def out(self, o):
        return self.out_layer(o.reshape(*o.shape[:2], -1))


class RMSNormNoEps(nnx.Module):
    """``torch.nn.RMSNorm(dim)`` (eps None: the float32 machine epsilon on the float32 statistics)."""

    def __init__(self, dim: int, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + F32_EPS)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class FeedForward(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        self.in_layer = linear(cfg.model_dim, cfg.ff_dim, bias=False, dtype=dtype, rngs=rngs)
        self.out_layer = linear(cfg.ff_dim, cfg.model_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.out_layer(jax.nn.gelu(self.in_layer(x), approximate=False))


def _modulated(norm, x, shift, scale):
    return (norm(x.astype(jnp.float32)) * (scale + 1.0) + shift).astype(x.dtype)


def _gated(x, gate, out):
    return (x.astype(jnp.float32) + gate * out.astype(jnp.float32)).astype(x.dtype)


class TextBlock(nnx.Module):
    """``Kandinsky5TransformerEncoderBlock`` on the text (B, L, D)."""

    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        d = cfg.model_dim
        self.text_modulation = Modulation(cfg, 6, dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(d, 1e-5, affine=False, dtype=dtype)  # self_attention_norm / feed_forward_norm
        self.self_attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb, rope, mask):
        shift, scale, gate, f_shift, f_scale, f_gate = self.text_modulation(temb)
        h = _modulated(self.ln, x, shift, scale)
        o = local_attention(*self.self_attention.qkv(h, h, rope), kv_valid=mask)
        x = _gated(x, gate, self.self_attention.out(o))
        return _gated(x, f_gate, self.feed_forward(_modulated(self.ln, x, f_shift, f_scale)))


class VisualBlock(nnx.Module):
    """``Kandinsky5TransformerDecoderBlock`` on the visual tokens (or a shard of them), the text whole."""

    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        d = cfg.model_dim
        self.visual_modulation = Modulation(cfg, 9, dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(d, 1e-5, affine=False, dtype=dtype)  # the three norms (no weights)
        self.self_attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.cross_attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, tokens, cond):
        (shift, scale, gate, c_shift, c_scale, c_gate,
         f_shift, f_scale, f_gate) = self.visual_modulation(cond["temb"])
        h = _modulated(self.ln, x, shift, scale)
        x = _gated(x, gate, self.self_attention.out(attention(*self.self_attention.qkv(h, h, tokens["rope"]))))
        h = _modulated(self.ln, x, c_shift, c_scale)
        o = cross_attention(*self.cross_attention.qkv(h, cond["context"]), kv_mask=cond["context_mask"])
        x = _gated(x, c_gate, self.cross_attention.out(o))
        return _gated(x, f_gate, self.feed_forward(_modulated(self.ln, x, f_shift, f_scale)))


class OutLayer(nnx.Module):
    def __init__(self, cfg: Kandinsky5Config, *, dtype, rngs):
        self.modulation = Modulation(cfg, 2, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.model_dim, 1e-5, affine=False, dtype=dtype)
        self.out_layer = linear(cfg.model_dim, int(np.prod(cfg.patch_size)) * cfg.out_visual_dim, dtype=dtype,
                                rngs=rngs)


# ----- the model -----

class Kandinsky5Transformer3DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, pooled_projections, scale_factor=(1, 1, 1),
    text_mask=None)``: channels-last latents (B, T, H, W, C) as diffusers' (C = ``visual_embed_dim``), Qwen states
    (B, L, in_text_dim), timesteps (B,) (the scheduler's, 0..1000), CLIP pooled (B, in_text_dim2); the text RoPE at
    positions 0..L-1 and the visual RoPE at 0..T'-1 / 0..H'-1 / 0..W'-1 (diffusers' pipelines' ``text_rope_pos``
    and ``visual_rope_pos``) -> (B, T, H, W, out_visual_dim)."""

    def __init__(self, cfg: Kandinsky5Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        self.time_embeddings = TimeEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.text_embeddings = Embeddings(cfg.in_text_dim, cfg.model_dim, dtype=dtype, rngs=rngs)
        self.pooled_text_embeddings = Embeddings(cfg.in_text_dim2, cfg.time_dim, dtype=dtype, rngs=rngs)
        self.visual_embeddings = VisualEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.text_transformer_blocks = stack_modules(lambda r: TextBlock(cfg, dtype=dtype, rngs=r),
                                                     cfg.num_text_blocks, rngs)
        self.visual_transformer_blocks = stack_modules(lambda r: VisualBlock(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_visual_blocks, rngs)
        self.out_layer = OutLayer(cfg, dtype=dtype, rngs=rngs)

    def grid(self, shape) -> tuple[int, int, int]:
        t, h, w = shape[1:4]
        pt, ph, pw = self.cfg.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"Latents of {t} x {h} x {w} (frames x height x width) do not split into "
                             f"{pt} x {ph} x {pw} patches: the pixel height and width must be multiples of "
                             f"{8 * ph} x {8 * pw}.")
        return t // pt, h // ph, w // pw

    def embed_text(self, encoder_hidden_states, temb, text_mask=None):
        """The text stack (run whole, before any sharding): (B, L, in_text_dim) -> (B, L, D)."""
        cfg, dtype = self.cfg, self.dtype
        text = jnp.asarray(encoder_hidden_states)
        if text.ndim != 3 or text.shape[2] != cfg.in_text_dim:
            raise ValueError(f"encoder_hidden_states must be (B, tokens, {cfg.in_text_dim}); got {tuple(text.shape)}.")
        b, n = text.shape[:2]
        mask = jnp.ones((b, n), bool) if text_mask is None else jnp.asarray(text_mask).astype(bool)
        cos, sin = text_rope_table(cfg, n)
        rope = (jnp.asarray(cos), jnp.asarray(sin))
        c = self.text_embeddings(text.astype(dtype))
        graphdef, state = nnx.split(self.text_transformer_blocks)
        c, _ = jax.lax.scan(lambda h, s: (nnx.merge(graphdef, s)(h, temb, rope, mask), None), c, state)
        return c, mask

    def embed(self, hidden_states, encoder_hidden_states, timestep, pooled_projections, scale_factor=(1.0, 1.0, 1.0),
              text_mask=None):
        """-> (visual tokens (B, N, D), tokens {"rope": (cos, sin) (N, head_dim)}, cond {"temb" (B, time_dim),
        "context" (B, L, D) the text stack's output, "context_mask" bool (B, L)})."""
        cfg, dtype = self.cfg, self.dtype
        x = jnp.asarray(hidden_states)
        if x.ndim != 5 or x.shape[-1] != cfg.visual_embed_dim:
            raise ValueError(f"latents must be channels-last (B, T, H, W, {cfg.visual_embed_dim}); got "
                             f"{tuple(x.shape)}.")
        b, c = x.shape[0], x.shape[-1]
        gt, gh, gw = self.grid(x.shape)
        pt, ph, pw = cfg.patch_size
        x = x.astype(dtype).reshape(b, gt, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = self.visual_embeddings.in_layer(x.reshape(b, gt * gh * gw, -1))
        pooled = jnp.asarray(pooled_projections)
        if pooled.shape != (b, cfg.in_text_dim2):
            raise ValueError(f"pooled_projections must be ({b}, {cfg.in_text_dim2}); got {tuple(pooled.shape)}.")
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb = self.time_embeddings(t, dtype) + self.pooled_text_embeddings(pooled.astype(dtype))
        context, mask = self.embed_text(encoder_hidden_states, temb, text_mask)
        if context.shape[0] != b:
            raise ValueError(f"encoder_hidden_states has {context.shape[0]} rows for {b} latents.")
        cos, sin = visual_rope_table(cfg, (gt, gh, gw), scale_factor)
        return x, {"rope": (jnp.asarray(cos), jnp.asarray(sin))}, {"temb": temb, "context": context,
                                                                    "context_mask": mask}

    def blocks(self, x, tokens, cond):
        """The visual stack on the visual tokens (or a shard of them, or a PipeFusion patch)."""
        return scan_modules(self.visual_transformer_blocks, lambda blk, y: blk(y, tokens, cond), x)

    def head(self, x, cond, shape):
        """Visual tokens -> the prediction (B, T, H, W, out_visual_dim) for latents of ``shape``."""
        cfg = self.cfg
        gt, gh, gw = self.grid(shape)
        pt, ph, pw = cfg.patch_size
        shift, scale = self.out_layer.modulation(cond["temb"])
        y = self.out_layer.out_layer(_modulated(self.out_layer.norm, x, shift, scale))
        b, c = y.shape[0], cfg.out_visual_dim
        y = y.reshape(b, gt, gh, gw, c, pt, ph, pw).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, gt * pt, gh * ph, gw * pw, c)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, pooled_projections,
                 scale_factor=(1.0, 1.0, 1.0), text_mask=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, pooled_projections,
                                     scale_factor, text_mask)
        return self.head(self.blocks(x, tokens, cond), cond, jnp.shape(hidden_states))


def pipefusion_stacks(cfg: Kandinsky5Config) -> dict:
    """PipeFusion's and the sequence-parallel loop's view of the stack: the visual stack (the text whole)."""
    return dict(stacked=STACKED, stacked_layers=cfg.num_visual_blocks)


# ----- conversion -----

def params_from_torch(flat: dict, cfg: Kandinsky5Config, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: Kandinsky5Transformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_visual_blocks, TEXT_STACK: cfg.num_text_blocks},
                          dtype=dtype, what="Kandinsky 5.0 transformer checkpoint")


def build(cfg: Kandinsky5Config, params: dict, dtype=jnp.float32) -> Kandinsky5Transformer3DModel:
    return build_module(lambda: Kandinsky5Transformer3DModel(cfg, dtype=dtype), params)
