"""Z-Image transformer (diffusers ``ZImageTransformer2DModel``, text-to-image; Tongyi-MAI/Z-Image-Turbo) in Flax NNX.

A single-stream DiT: every block holds one set of weights for image and caption tokens alike.

* ``t_embedder``: sinusoids of ``t * t_scale`` (cos first) -> Linear -> SiLU -> Linear, to ``min(dim, 256)``;
  this ``adaln_input`` modulates the image-side blocks (``adaLN_modulation``: one Linear to
  ``scale_msa, gate_msa, scale_mlp, gate_mlp``, gates through tanh, scales ``1 + .``) and the final layer;
* the image: 2 x 2 latent patches (features ``(ph, pw, c)``) -> ``all_x_embedder["2-1"]``, the token count padded
  to a multiple of :data:`SEQ_MULTI_OF` with the learned ``x_pad_token``, then the **noise refiner** (modulated
  blocks over the image tokens alone);
* the caption (the Qwen3 features of each prompt's kept tokens): ``cap_embedder`` (RMSNorm, Linear), each
  prompt's length ``n`` padded to ``ceil32(n)`` with the learned ``cap_pad_token``, then the **context refiner**
  (unmodulated blocks over the caption alone);
* the main ``layers`` over the unified ``[image, caption]`` sequence, then the final layer (LayerNorm without
  affine, ``* (1 + scale)``, Linear) and the unpatchify of the image tokens.

RoPE: 3-axis position ids ``(t, h, w)`` (``axes_dims``, ``theta`` 256, complex rotation of interleaved pairs): the
caption's token ``j`` sits at ``(1 + j, 0, 0)``, the image's patch ``(h, w)`` at ``(ceil32(n) + 1, h, w)``, the
image's pad tokens at ``(0, 0, 0)`` (diffusers' ``patchify_and_embed``).

diffusers takes a *list* of per-prompt caption features of different lengths; here they are one padded array
``cap_feats`` (B, L, cap_feat_dim) with ``cap_lens`` (B,): the first ``cap_lens[i]`` rows are prompt ``i``'s.
diffusers pads the unified sequences of a batch to the longest and masks the padded keys; the same keys are
masked here: the caption's keys past ``ceil32(n_i)``, in the context refiner and in the main layers.

Over the mesh (:func:`xdit_jax.parallel.sequence.run_blocks` with ``text=TEXT_KEYS``): the image tokens are the
sharded sequence of the noise refiner and the main layers; in the main layers the caption joins each attention as
the masked *context* of :func:`xdit_jax.parallel.attention.attention` (the order of keys does not change an
attention: ``[image, caption]`` with diffusers' mask == the image sequence with the caption as context), sharded
over the sequence group with it. The context refiner (the caption alone: at most 512 tokens, two layers) runs in
:meth:`ZImageTransformer2DModel.embed`, through the attention op with its key mask, on every device. The
omni (SigLIP) and ControlNet variants and more than one patch size are refused.

Lumina 2 (:mod:`xdit_jax.models.lumina2`, the architecture Z-Image descends from) builds on these blocks, the
timestep MLP, the final layer, RoPE and ``blocks`` / ``head``; the config properties ``kv_heads``, ``t_hidden``,
``modulation_silu`` and ``rope_angles_f32`` select where the two differ.
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
from xdit_jax.models.layers import LayerNorm, RMSNorm, linear, scan_modules, stack_modules
from xdit_jax.parallel.attention import attention

ADALN_EMBED_DIM = 256
SEQ_MULTI_OF = 32
STACKED = "layers"
# PipeFusion's stacks (looped over the stages): the noise refiner, then the main layers; both carry (image, caption)
STACKS = ("noise_refiner", STACKED)
# The caption in ``cond``: sharded over the sequence group with the image tokens (its key mask stays whole)
TEXT_KEYS = ("context", "context_rope")


def ceil_to(n, m: int = SEQ_MULTI_OF):
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # diffusers' Attention gives k/v n_heads heads too: not read
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZImageConfig:
        return cls(**known_fields(cls, d))

    def __post_init__(self):
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
        if self.siglip_feat_dim is not None:
            raise ValueError("This ZImageTransformer2DModel has siglip_feat_dim set: the Z-Image Omni variant (SigLIP "
                             "image conditions) is not supported; only the text-to-image model (siglip_feat_dim null).")
        if len(self.all_patch_size) != 1 or self.all_patch_size != (2,) or self.all_f_patch_size != (1,):
            raise ValueError(f"Only the text-to-image patching all_patch_size=(2,), all_f_patch_size=(1,) is "
                             f"supported, got {self.all_patch_size}, {self.all_f_patch_size}.")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}.")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3 or sum(self.axes_dims) != self.dim // self.n_heads \
                or any(a % 2 for a in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be 3 even sizes summing to the head dim "
                             f"{self.dim // self.n_heads} (with 3 axes_lens, got {self.axes_lens}).")

    # the names the pipelines' shared code reads
    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def attention_head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def inner_dim(self) -> int:
        return self.dim

    @property
    def num_layers(self) -> int:
        return self.n_layers

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def out_ch(self) -> int:
        return self.in_channels

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    # what the blocks shared with Lumina 2 (:mod:`xdit_jax.models.lumina2`) read where the two differ
    @property
    def kv_heads(self) -> int:
        return self.n_heads

    @property
    def t_hidden(self) -> int:  # the timestep MLP's hidden width
        return 1024

    modulation_silu = False  # adaLN_modulation is a bare Linear (Lumina 2: SiLU first)
    rope_angles_f32 = True  # RoPE angles rounded to float32 before cos / sin (Lumina 2: float64)


# ----- RoPE -----

def axis_table(dim: int, end: int, theta: float, angles_f32: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``RopeEmbedder.precompute_freqs_cis`` for one axis: cos, sin (end, dim // 2) float32 of the
    angles ``pos * theta ** (-2i / dim)`` (computed in float64, rounded to float32 as diffusers' Z-Image where
    ``angles_f32``; Lumina 2 keeps them in float64)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.outer(np.arange(end, dtype=np.float64), freqs)
    if angles_f32:
        ang = ang.astype(np.float32).astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def position_tables(ids: np.ndarray, cfg: ZImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (N, head_dim // 2) for (N, 3) integer position ids (diffusers' ``rope_embedder(ids)``)."""
    ids = np.asarray(ids, np.int64)
    cos, sin = [], []
    for a, (d, e) in enumerate(zip(cfg.axes_dims, cfg.axes_lens)):
        if ids[:, a].max(initial=0) >= e:
            raise ValueError(f"RoPE position {ids[:, a].max()} on axis {a} is past axes_lens[{a}] = {e} (too long a "
                             "caption or too large an image for this model).")
        c, s = axis_table(d, e, cfg.rope_theta, cfg.rope_angles_f32)
        cos.append(c[ids[:, a]])
        sin.append(s[ids[:, a]])
    return np.concatenate(cos, 1), np.concatenate(sin, 1)


def image_position_ids(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """((X_pad, 3) position ids of the image tokens with t = 0, (X_pad,) bool real token): patch (h, w) at
    (0, h, w); the pad tokens up to a multiple of 32 at (0, 0, 0). The real tokens' t (``ceil32(n) + 1``)
    depends on the prompt and is added per sample."""
    n = grid_h * grid_w
    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ids = np.zeros((ceil_to(n), 3), np.int64)
    ids[:n, 1], ids[:n, 2] = hh.reshape(-1), ww.reshape(-1)
    return ids, np.arange(ceil_to(n)) < n


def apply_rotary(x, cos, sin):
    """Complex rotation of interleaved pairs (diffusers' ``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis``):
    x (B, S, H, D), cos/sin (B or 1, S, D // 2) float32; math in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----- blocks -----

class Attention(nnx.Module):
    """Z-Image's and Lumina 2's attention (``cfg.kv_heads`` < heads: grouped K/V, each repeated for its
    ``heads // kv_heads`` query heads before the attention op, as diffusers' ``Lumina2AttnProcessor2_0``)."""

    def __init__(self, cfg: ZImageConfig, *, dtype, rngs):
        d, hd = cfg.dim, cfg.attention_head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.to_q = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, cfg.kv_heads * hd, bias=False, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, cfg.kv_heads * hd, bias=False, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, 1e-5, dtype=dtype) if cfg.qk_norm else None
        self.norm_k = RMSNorm(hd, 1e-5, dtype=dtype) if cfg.qk_norm else None
        self.to_out = linear(d, d, bias=False, dtype=dtype, rngs=rngs)

    def qkv(self, h, rope):
        b, s, _ = h.shape
        q = self.to_q(h).reshape(b, s, self.heads, self.head_dim)
        k, v = (p(h).reshape(b, s, self.kv_heads, self.head_dim) for p in (self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_heads != self.heads:
            k, v = (jnp.repeat(a, self.heads // self.kv_heads, axis=2) for a in (k, v))
        return q, k, v

    def out(self, o):
        return self.to_out(o.reshape(*o.shape[:2], -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: ZImageConfig, *, dtype, rngs):
        self.w1 = linear(cfg.dim, cfg.ffn_dim, bias=False, dtype=dtype, rngs=rngs)
        self.w2 = linear(cfg.ffn_dim, cfg.dim, bias=False, dtype=dtype, rngs=rngs)
        self.w3 = linear(cfg.dim, cfg.ffn_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    """diffusers ``ZImageTransformerBlock`` and ``Lumina2TransformerBlock`` (``modulation``: the noise refiner's and
    the main layers'; the context refiner's blocks have none). Lumina 2's ``norm1`` (``LuminaRMSNormZero``) is
    ``attention_norm1`` with ``adaLN_modulation`` after a SiLU (``cfg.modulation_silu``)."""

    def __init__(self, cfg: ZImageConfig, modulation: bool, *, dtype, rngs):
        d = cfg.dim
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.attention_norm1 = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.ffn_norm1 = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.attention_norm2 = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.ffn_norm2 = RMSNorm(d, cfg.norm_eps, dtype=dtype)
        self.adaLN_modulation = linear(cfg.adaln_dim, 4 * d, dtype=dtype, rngs=rngs) if modulation else None
        self.silu_first = cfg.modulation_silu

    def modulation(self, adaln):
        """(scale_msa, gate_msa, scale_mlp, gate_mlp), each (B, 1, D); None without modulation."""
        if self.adaLN_modulation is None:
            return None
        s1, g1, s2, g2 = jnp.split(self.adaLN_modulation(jax.nn.silu(adaln) if self.silu_first else adaln)[:, None],
                                   4, axis=-1)
        return 1.0 + s1, jnp.tanh(g1), 1.0 + s2, jnp.tanh(g2)

    def _pre(self, x, mod):
        h = self.attention_norm1(x)
        return h if mod is None else h * mod[0]

    def _post(self, x, o, mod):
        a = self.attention_norm2(self.attention.out(o))
        x = x + (a if mod is None else mod[1] * a)
        h = self.ffn_norm1(x)
        f = self.ffn_norm2(self.feed_forward(h if mod is None else h * mod[2]))
        return x + (f if mod is None else mod[3] * f)

    def __call__(self, x, adaln, rope, kv_valid=None):
        """The block on one token set (a refiner): ``kv_valid`` bool (B, S) keys kept (None: the attention op's
        padding)."""
        mod = self.modulation(adaln)
        o = attention(*self.attention.qkv(self._pre(x, mod), rope), kv_valid=kv_valid)
        return self._post(x, o, mod)

    def pair(self, x, c, adaln, rope, c_rope, c_mask):
        """The block on the unified ``[image, caption]`` sequence with the caption kept apart: it joins the
        image's attention as the context (its keys masked by ``c_mask`` (B, Lc)); -> (image, caption)."""
        mod = self.modulation(adaln)
        o, oc = attention(*self.attention.qkv(self._pre(x, mod), rope),
                          context=(*self.attention.qkv(self._pre(c, mod), c_rope), c_mask))
        return self._post(x, o, mod), self._post(c, oc, mod)


class TimestepEmbedder(nnx.Module):
    def __init__(self, cfg: ZImageConfig, *, dtype, rngs):
        self.mlp_0 = linear(256, cfg.t_hidden, dtype=dtype, rngs=rngs)
        self.mlp_2 = linear(cfg.t_hidden, cfg.adaln_dim, dtype=dtype, rngs=rngs)

    def __call__(self, t, dtype):
        # diffusers' float32 frequencies exp(-ln(10000) i / 128): the float32 exponent, its exp correctly rounded
        # on the host (XLA's float32 exp differs from torch's in 14 of the 128; at t x 1000 ~ 900 an ulp of a
        # frequency moves the angle by 5e-5)
        e = np.float32(-math.log(10000.0)) * np.arange(128, dtype=np.float32) / np.float32(128)
        freqs = jnp.asarray(np.exp(e.astype(np.float64)).astype(np.float32))
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        f = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(dtype)
        return self.mlp_2(jax.nn.silu(self.mlp_0(f)))


class FinalLayer(nnx.Module):
    def __init__(self, cfg: ZImageConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.norm_final = LayerNorm(cfg.dim, 1e-6, affine=False, dtype=dtype)
        self.linear = linear(cfg.dim, p * p * cfg.out_channels, dtype=dtype, rngs=rngs)
        self.adaLN_modulation = linear(cfg.adaln_dim, cfg.dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, adaln):
        scale = 1.0 + self.adaLN_modulation(jax.nn.silu(adaln))
        return self.linear(self.norm_final(x) * scale[:, None])


# ----- the model -----

class ZImageTransformer2DModel(nnx.Module):
    """``model(hidden_states, timestep, cap_feats, cap_lens)``: latents (B, C, H, W) (or diffusers' (B, C, 1, H, W)),
    ``timestep`` (B,) as diffusers' pipeline passes it (``(1000 - t) / 1000``), caption features (B, L,
    cap_feat_dim) of which the first ``cap_lens[i]`` rows are prompt ``i``'s (None: all ``L``) -> (B, C, H, W)."""

    pad_tokens = True  # the learned x_pad_token / cap_pad_token (Lumina 2 has none)

    def __init__(self, cfg: ZImageConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d, p = cfg.dim, cfg.patch_size
        self.x_embedder = linear(p * p * cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.final_layer = FinalLayer(cfg, dtype=dtype, rngs=rngs)
        self.t_embedder = TimestepEmbedder(cfg, dtype=dtype, rngs=rngs)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps, dtype=dtype)
        self.cap_linear = linear(cfg.cap_feat_dim, d, dtype=dtype, rngs=rngs)
        if self.pad_tokens:
            self.x_pad_token = nnx.Param(jnp.zeros((1, d), dtype))
            self.cap_pad_token = nnx.Param(jnp.zeros((1, d), dtype))
        n_ref = cfg.n_refiner_layers
        self.noise_refiner = stack_modules(lambda r: Block(cfg, True, dtype=dtype, rngs=r), n_ref, rngs)
        self.context_refiner = stack_modules(lambda r: Block(cfg, False, dtype=dtype, rngs=r), n_ref, rngs)
        self.layers = stack_modules(lambda r: Block(cfg, True, dtype=dtype, rngs=r), cfg.n_layers, rngs)

    def grid(self, shape) -> tuple[int, int]:
        h, w = shape[-2:]
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"Latents of {h} x {w} do not split into {p} x {p} patches: the height and width must be "
                             f"multiples of {p * 8} pixels ({p} latent pixels).")
        return h // p, w // p

    def embed(self, hidden_states, timestep, cap_feats, cap_lens=None):
        """-> (image tokens (B, X_pad, D), tokens {"rope_hw", "real"}, cond {"adaln", "context" (B, Lc, D),
        "context_rope", "context_mask" bool (B, Lc), "t_rope"}): the embeddings, the context refiner and the
        tables; ``X_pad`` = the image tokens padded to a multiple of 32, ``Lc`` = the caption array's length
        padded so."""
        cfg, dtype = self.cfg, self.dtype
        x = jnp.asarray(hidden_states)
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"Z-Image takes one frame (B, C, 1, H, W); got {tuple(x.shape)}.")
            x = x[:, :, 0]
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}.")
        b, c = x.shape[:2]
        gh, gw = self.grid(x.shape)
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        adaln = self.t_embedder(t * cfg.t_scale, dtype)

        # image: patches (ph, pw, c) -> tokens, padded to 32 with the pad token
        n = gh * gw
        x = x.astype(dtype).reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        x = self.x_embedder(x)
        pad = ceil_to(n) - n
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(self.x_pad_token[...].astype(dtype), (b, pad, cfg.dim))], 1)

        # caption: embed, the pad token on [n_i, ceil32(n_i)), keys past ceil32(n_i) masked
        cap = jnp.asarray(cap_feats)
        if cap.ndim != 3 or cap.shape[0] != b or cap.shape[2] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be ({b}, tokens, {cfg.cap_feat_dim}); got {tuple(cap.shape)}.")
        length = cap.shape[1]
        lc = ceil_to(length)
        lens = jnp.full((b,), length, jnp.int32) if cap_lens is None else jnp.asarray(cap_lens, jnp.int32).reshape(b)
        cap = self.cap_linear(self.cap_norm(cap.astype(dtype)))
        cap = jnp.pad(cap, ((0, 0), (0, lc - length), (0, 0)))
        j = jnp.arange(lc)[None]
        cap = jnp.where((j >= lens[:, None])[..., None], self.cap_pad_token[...].astype(dtype), cap)
        mask = j < ceil_to(lens)[:, None]
        ids = np.zeros((lc, 3), np.int64)
        ids[:, 0] = 1 + np.arange(lc)
        c_rope = tuple(jnp.broadcast_to(jnp.asarray(a)[None], (b,) + a.shape) for a in position_tables(ids, cfg))
        graphdef, state = nnx.split(self.context_refiner)
        cap, _ = jax.lax.scan(lambda h, s: (nnx.merge(graphdef, s)(h, None, c_rope, kv_valid=mask), None), cap, state)

        # image RoPE: (h, w) per token, t = ceil32(n_i) + 1 per sample on the real tokens (0 on the pad tokens)
        img_ids, real = image_position_ids(gh, gw)
        cos_hw, sin_hw = position_tables(img_ids, cfg)
        h0 = cfg.axes_dims[0] // 2
        cos0, sin0 = axis_table(cfg.axes_dims[0], cfg.axes_lens[0], cfg.rope_theta)
        t_pos = ceil_to(lens) + 1
        t_rope = (jnp.take(jnp.asarray(cos0), t_pos, axis=0), jnp.take(jnp.asarray(sin0), t_pos, axis=0))
        tokens = {"rope_hw": (jnp.asarray(cos_hw[:, h0:]), jnp.asarray(sin_hw[:, h0:])),
                  "real": jnp.asarray(real)}
        cond = {"adaln": adaln, "context": cap, "context_rope": c_rope, "context_mask": mask, "t_rope": t_rope}
        return x, tokens, cond

    @staticmethod
    def image_rope(tokens, cond):
        """(cos, sin) (B, S, head_dim // 2) of the image tokens (a shard of them) from the per-token (h, w) tables
        and each sample's t."""
        real = tokens["real"][None, :, None]
        parts = []
        for tab, hw, fill in zip(cond["t_rope"], tokens["rope_hw"], (1.0, 0.0)):
            t = jnp.where(real, tab[:, None, :], fill)
            parts.append(jnp.concatenate([t, jnp.broadcast_to(hw[None], (t.shape[0],) + hw.shape)], axis=-1))
        return tuple(parts)

    def blocks(self, x, tokens, cond):
        """The noise refiner over the image tokens, then the main layers with the caption as the context; on the
        image tokens (or a shard of them, or a PipeFusion patch) -> the image tokens. Both stacks carry (image,
        caption) — the refiner passes the caption on untouched — so PipeFusion can loop them over its stages."""
        adaln, rope = cond["adaln"], self.image_rope(tokens, cond)
        x, c = scan_modules(self.noise_refiner, lambda blk, xc: (blk(xc[0], adaln, rope), xc[1]),
                            (x, cond["context"]))
        c_rope, c_mask = cond["context_rope"], cond["context_mask"]
        x, _ = scan_modules(self.layers, lambda blk, xc: blk.pair(*xc, adaln, rope, c_rope, c_mask), (x, c))
        return x

    def head(self, x, cond, shape):
        """Image tokens -> the prediction (B, C, H, W) for latents of ``shape``."""
        gh, gw = self.grid(shape)
        p, c = self.cfg.patch_size, self.cfg.out_channels
        y = self.final_layer(x[:, :gh * gw], cond["adaln"])
        y = y.reshape(y.shape[0], gh, gw, p, p, c).transpose(0, 5, 1, 3, 2, 4)
        return y.reshape(y.shape[0], c, gh * p, gw * p)

    def __call__(self, hidden_states, timestep, cap_feats, cap_lens=None):
        x, tokens, cond = self.embed(hidden_states, timestep, cap_feats, cap_lens)
        return self.head(self.blocks(x, tokens, cond), cond, jnp.shape(hidden_states))


def pad_caption_list(feats: list) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' list of per-prompt caption features (L_i, d) -> (B, max L_i, d) zero-padded and the lengths."""
    feats = [np.asarray(f, np.float32) for f in feats]
    lens = np.array([len(f) for f in feats], np.int32)
    out = np.zeros((len(feats), int(lens.max()), feats[0].shape[-1]), np.float32)
    for i, f in enumerate(feats):
        out[i, :len(f)] = f
    return out, lens


def pipefusion_stacks(cfg: ZImageConfig) -> dict:
    """PipeFusion's stacks (``_init_parts``' ``stacked`` / ``stacked_layers``): the noise refiner, then the main
    layers; and the caption's ``cond`` keys (:data:`TEXT_KEYS`)."""
    return dict(stacked=STACKS, stacked_layers=(cfg.n_refiner_layers, cfg.n_layers), text_keys=TEXT_KEYS)


# ----- conversion -----

TORCH_RENAMES = [
    (r"^x_embedder\.", "all_x_embedder.2-1."),
    (r"^final_layer\.adaLN_modulation\.", "all_final_layer.2-1.adaLN_modulation.1."),
    (r"^final_layer\.", "all_final_layer.2-1."),
    (r"^t_embedder\.mlp_(\d)\.", r"t_embedder.mlp.\1."),
    (r"^cap_norm\.", "cap_embedder.0."),
    (r"^cap_linear\.", "cap_embedder.1."),
    (r"\.attention\.to_out\.", ".attention.to_out.0."),
    (r"^(noise_refiner|layers)\.(\d+)\.adaLN_modulation\.", r"\1.\2.adaLN_modulation.0."),
]


def params_from_torch(flat: dict, cfg: ZImageConfig, dtype=None, *, model=ZImageTransformer2DModel,
                      renames=TORCH_RENAMES, what: str = "Z-Image") -> dict:
    """Our params from a diffusers state dict; ``model``, ``renames`` (our keys -> the checkpoint's) and ``what``:
    another transformer of these three stacks (Lumina 2's, :func:`xdit_jax.models.lumina2.params_from_torch`)."""
    return map_state_dict(flat, expected_shapes(lambda: model(cfg)),
                          stacked={STACKED: cfg.n_layers, "noise_refiner": cfg.n_refiner_layers,
                                   "context_refiner": cfg.n_refiner_layers},
                          renames=renames, dtype=dtype, what=f"{what} transformer checkpoint")


def build(cfg: ZImageConfig, params: dict, dtype=jnp.float32) -> ZImageTransformer2DModel:
    return build_module(lambda: ZImageTransformer2DModel(cfg, dtype=dtype), params)

