"""HiDream-I1 transformer (diffusers ``HiDreamImageTransformer2DModel``) in Flax NNX.

FLUX-like in shape: double-stream blocks (image and text with their own weights, one joint attention), then
single-stream blocks over the joint [image; text] sequence. What differs from FLUX (:mod:`xdit_jax.models.flux`):

* the image stream's feed-forward is a mixture of experts (diffusers' ``MOEFeedForwardSwiGLU``: a shared SwiGLU
  expert plus ``num_routed_experts`` routed ones, a softmax gate picking ``num_activated_experts`` per token). Here
  every routed expert runs densely on the local tokens and the outputs are combined with the gate's top-k weights
  (zero elsewhere): the same sum diffusers' ``moe_infer`` gathers and scatters, and token-local, so sequence
  parallelism is untouched;
* each block gets one more text input: a projection of one Llama-3.1 hidden layer (``llama_layers`` picks them),
  appended to the text for that block only (its outputs dropped). In the double-stream blocks it joins the text
  (held whole, the attention's context); in the single-stream blocks it is the attention's context of the sharded
  joint [image; T5; Llama] sequence;
* the text stream starts as [T5; the last block's Llama layer], projected without bias; the pooled CLIP embedding
  and the timestep (t in [0, 1000], not x 1000) sum into ``temb``;
* q/k RMS norms over the whole width (eps 1e-5); RoPE over (0, row, column) ids on the image tokens (the text's ids
  are zeros: not rotated), on the whole head where ``sum(axes_dims_rope) == head_dim``, else on its first half;
* the model patchifies (B, C, H, W) latents itself (``patch_size`` 2) and returns (B, C, H, W). Non-square latents
  are padded to ``max_resolution``'s token count with their keys zeroed (not masked: diffusers multiplies the keys by
  the mask, the padded tokens keep their values), as diffusers does.

PipeFusion runs :meth:`HiDreamImageTransformer2DModel.blocks`: both stacks with the text stream held whole (each
patch carries it; the single-stream blocks take it, with their Llama layer, as their attention's context:
:meth:`SingleBlock.pair`), each stack split over all the stages (FLUX's looped form). Every device holds every
block's projected Llama layer (``cond``); the index of the next block rides in the scans' carry with the patch and the
text (as ConsisID's), so a stage holding any run of blocks picks their layers (an uneven stage's padding layers pass
the carry on unchanged). The text is not cut into per-patch slices as FLUX's (``run_pipefusion``'s ``text=``, its
slices' K/V buffered): each block's Llama layer joins the attention beside the text stream, and the buffered-slice path
stores the whole context an attention is given at the slice's offset, so the Llama layer could not stay whole and
fresh next to a slice (slicing it too would make its K/V a step old for the later patches: another rule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.flux import image_ids
from xdit_jax.models.layers import (
    LayerNorm,
    RMSNorm,
    TimestepEmbedding,
    apply_rope,
    linear,
    rope_1d,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

DOUBLE = "double_stream_blocks"
SINGLE = "single_stream_blocks"
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class HiDreamConfig:
    """diffusers' config.json fields (a saved config lists them all; the defaults here are the released shape's)."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    num_layers: int = 16
    num_single_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 20
    caption_channels: tuple[int, ...] = (4096, 4096)
    text_emb_dim: int = 2048
    num_routed_experts: int = 4
    num_activated_experts: int = 2
    axes_dims_rope: tuple[int, ...] = (64, 32, 32)
    max_resolution: tuple[int, ...] = (128, 128)
    llama_layers: tuple[int, ...] = ()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def max_seq(self) -> int:
        return self.max_resolution[0] * self.max_resolution[1] // self.patch_size ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HiDreamConfig:
        d = dict(d)
        for key in ("caption_channels", "axes_dims_rope", "max_resolution", "llama_layers"):
            if d.get(key) is not None:
                d[key] = tuple(int(a) for a in d[key])
        cfg = cls(**known_fields(cls, d))
        rope = sum(cfg.axes_dims_rope)
        if any(a % 2 for a in cfg.axes_dims_rope) or rope not in (cfg.attention_head_dim, cfg.attention_head_dim // 2):
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope}: even sizes summing to attention_head_dim "
                             f"({cfg.attention_head_dim}) or half of it.")
        if len(cfg.llama_layers) != cfg.num_layers + cfg.num_single_layers:
            raise ValueError(f"llama_layers has {len(cfg.llama_layers)} entries; HiDream takes one per block "
                             f"({cfg.num_layers} + {cfg.num_single_layers}).")
        if cfg.num_layers < 1 or cfg.num_single_layers < 1:
            raise ValueError("A HiDream transformer has at least one double- and one single-stream block.")
        if cfg.num_routed_experts > 0 and not 0 < cfg.num_activated_experts <= cfg.num_routed_experts:
            raise ValueError(f"num_activated_experts={cfg.num_activated_experts} must be in [1, "
                             f"num_routed_experts={cfg.num_routed_experts}].")
        return cfg


def swiglu_dim(hidden: int, multiple_of: int = 256) -> int:
    """diffusers ``HiDreamImageFeedForwardSwiGLU``'s width: 2/3 of ``hidden``, rounded up to ``multiple_of``."""
    h = int(2 * hidden / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class SwiGLU(nnx.Module):
    """diffusers ``HiDreamImageFeedForwardSwiGLU``: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs):
        h = swiglu_dim(hidden)
        self.w1 = linear(dim, h, bias=False, dtype=dtype, rngs=rngs)
        self.w2 = linear(h, dim, bias=False, dtype=dtype, rngs=rngs)
        self.w3 = linear(dim, h, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Experts(nnx.Module):
    """The routed experts' weights stacked on an expert axis: ``w1``, ``w3`` (E, dim, h), ``w2`` (E, h, dim) (the
    torch ``experts.{e}.wN.weight`` transposed and stacked, :func:`params_from_torch`)."""

    def __init__(self, n: int, dim: int, hidden: int, *, dtype, rngs):
        h = swiglu_dim(hidden)
        init = jax.nn.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (n, dim, h), dtype))
        self.w3 = nnx.Param(init(rngs.params(), (n, dim, h), dtype))
        self.w2 = nnx.Param(init(rngs.params(), (n, h, dim), dtype))

    def __call__(self, x):
        """x (B, S, dim) -> every expert's output (B, S, E, dim)."""
        a = jnp.einsum("bsd,edh->bseh", x, self.w1[...])
        b = jnp.einsum("bsd,edh->bseh", x, self.w3[...])
        return jnp.einsum("bseh,ehd->bsed", jax.nn.silu(a) * b, self.w2[...])


class MoEGate(nnx.Module):
    """diffusers ``MoEGate`` (inference): softmax over the experts' logits, the top-k weights (not renormalized)."""

    def __init__(self, n: int, dim: int, top_k: int, *, dtype, rngs):
        self.top_k = top_k
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (n, dim), dtype) / dim ** 0.5)

    def __call__(self, x):
        """x (B, S, dim) -> (B, S, E) combine weights: the top-k softmax scores, zero for the other experts."""
        scores = jax.nn.softmax(jnp.einsum("bsd,ed->bse", x, self.weight[...]).astype(jnp.float32), axis=-1)
        top, idx = jax.lax.top_k(scores, self.top_k)
        n = scores.shape[-1]
        return jnp.sum(jax.nn.one_hot(idx, n, dtype=scores.dtype) * top[..., None], axis=-2).astype(x.dtype)


class MoEFeedForward(nnx.Module):
    """diffusers ``MOEFeedForwardSwiGLU`` (its eval branch): the shared expert plus the gate-weighted routed ones,
    every routed expert computed densely (the weights are zero outside each token's top k)."""

    def __init__(self, dim: int, hidden: int, n: int, top_k: int, *, dtype, rngs):
        self.shared_experts = SwiGLU(dim, hidden // 2, dtype=dtype, rngs=rngs)
        self.experts = Experts(n, dim, hidden, dtype=dtype, rngs=rngs)
        self.gate = MoEGate(n, dim, top_k, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        routed = jnp.einsum("bsed,bse->bsd", self.experts(x), self.gate(x))
        return routed + self.shared_experts(x)


def feed_forward(cfg: HiDreamConfig, *, dtype, rngs):
    d = cfg.inner_dim
    if cfg.num_routed_experts > 0:
        return MoEFeedForward(d, 4 * d, cfg.num_routed_experts, cfg.num_activated_experts, dtype=dtype, rngs=rngs)
    return SwiGLU(d, 4 * d, dtype=dtype, rngs=rngs)


def _heads(y, hd: int):
    return y.reshape(*y.shape[:2], -1, hd)


def _flat(y):
    return y.reshape(*y.shape[:2], -1)


class Attention(nnx.Module):
    """diffusers ``HiDreamAttention``: q/k/v/out with biases, q/k RMS norms over the whole width (eps 1e-5);
    ``single=False``: the text's own ``*_t`` projections and norms."""

    def __init__(self, cfg: HiDreamConfig, *, single: bool, dtype, rngs):
        d = cfg.inner_dim
        self.head_dim, self.single = cfg.attention_head_dim, single
        lin = lambda: linear(d, d, dtype=dtype, rngs=rngs)  # noqa: E731
        self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()
        self.q_rms_norm, self.k_rms_norm = RMSNorm(d, 1e-5, dtype=dtype), RMSNorm(d, 1e-5, dtype=dtype)
        if not single:
            self.to_q_t, self.to_k_t, self.to_v_t, self.to_out_t = lin(), lin(), lin(), lin()
            self.q_rms_norm_t, self.k_rms_norm_t = RMSNorm(d, 1e-5, dtype=dtype), RMSNorm(d, 1e-5, dtype=dtype)

    def qkv(self, x, rope=None, kmask=None, text: bool = False):
        """q, k, v (B, S, H, hd); ``rope``: (S, hd) tables (None: not rotated); ``kmask``: (S,) key multipliers
        (diffusers' ``hidden_states_masks`` on non-square latents) or None; ``text``: the ``*_t`` weights."""
        sfx = "_t" if text else ""
        hd = self.head_dim
        q = _heads(getattr(self, "q_rms_norm" + sfx)(getattr(self, "to_q" + sfx)(x)), hd)
        k = _heads(getattr(self, "k_rms_norm" + sfx)(getattr(self, "to_k" + sfx)(x)), hd)
        v = _heads(getattr(self, "to_v" + sfx)(x), hd)
        if kmask is not None:
            k = k * kmask[None, :, None, None].astype(k.dtype)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v


def _modulate(norm, x, shift, scale):
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


class DoubleBlock(nnx.Module):
    """diffusers ``HiDreamImageTransformerBlock``: image ``x`` (sharded) and text ``c`` (whole: [T5; Llama]
    stream and this block's Llama layer), one joint attention; -> (image, text)."""

    def __init__(self, cfg: HiDreamConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.adaLN_modulation = linear(d, 12 * d, dtype=dtype, rngs=rngs)
        self.norm1_i = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.norm1_t = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.attn1 = Attention(cfg, single=False, dtype=dtype, rngs=rngs)
        self.norm3_i = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff_i = feed_forward(cfg, dtype=dtype, rngs=rngs)
        self.norm3_t = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff_t = SwiGLU(d, 4 * d, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, temb, rope, kmask=None):
        (sh_i, sc_i, g_i, sh_mi, sc_mi, g_mi, sh_t, sc_t, g_t, sh_mt, sc_mt, g_mt) = jnp.split(
            self.adaLN_modulation(jax.nn.silu(temb)), 12, axis=-1)
        nx = _modulate(self.norm1_i, x, sh_i, sc_i)
        nc = _modulate(self.norm1_t, c, sh_t, sc_t)
        q, k, v = self.attn1.qkv(nx, rope, kmask)
        cq, ck, cv = self.attn1.qkv(nc, text=True)
        o, oc = attention(q, k, v, context=(cq, ck, cv, None))
        x = x + g_i[:, None] * self.attn1.to_out(_flat(o))
        c = c + g_t[:, None] * self.attn1.to_out_t(_flat(oc))
        x = x + g_mi[:, None] * self.ff_i(_modulate(self.norm3_i, x, sh_mi, sc_mi))
        c = c + g_mt[:, None] * self.ff_t(_modulate(self.norm3_t, c, sh_mt, sc_mt))
        return x, c


class SingleBlock(nnx.Module):
    """diffusers ``HiDreamImageSingleTransformerBlock`` on the joint [image; T5; Llama] sequence ``x`` (sharded),
    this block's Llama layer ``extra`` (whole) joining its attention as context (its own outputs dropped)."""

    def __init__(self, cfg: HiDreamConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.adaLN_modulation = linear(d, 6 * d, dtype=dtype, rngs=rngs)
        self.norm1_i = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.attn1 = Attention(cfg, single=True, dtype=dtype, rngs=rngs)
        self.norm3_i = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff_i = feed_forward(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, extra, temb, rope, kmask=None):
        sh, sc, g, sh_m, sc_m, g_m = jnp.split(self.adaLN_modulation(jax.nn.silu(temb)), 6, axis=-1)
        nx = _modulate(self.norm1_i, x, sh, sc)
        ne = _modulate(self.norm1_i, extra, sh, sc)
        _, ek, ev = self.attn1.qkv(ne)
        o, _ = attention(*self.attn1.qkv(nx, rope, kmask), context=(None, ek, ev, None))
        x = x + g[:, None] * self.attn1.to_out(_flat(o))
        return x + g_m[:, None] * self.ff_i(_modulate(self.norm3_i, x, sh_m, sc_m))

    def pair(self, x, c, extra, temb, rope, kmask=None):
        """The same block with the text stream ``c`` kept apart from the image tokens ``x`` (a patch of them under
        PipeFusion): ``[c; extra]`` join the attention as its context (the text not rotated, its keys kept; the
        Llama layer's outputs dropped), every other op is per token. -> (image, text)."""
        sh, sc, g, sh_m, sc_m, g_m = jnp.split(self.adaLN_modulation(jax.nn.silu(temb)), 6, axis=-1)
        nx = _modulate(self.norm1_i, x, sh, sc)
        nc = _modulate(self.norm1_i, jnp.concatenate([c, extra], axis=1), sh, sc)
        o, oc = attention(*self.attn1.qkv(nx, rope, kmask), context=(*self.attn1.qkv(nc), None))
        oc = oc[:, :c.shape[1]]

        def out(y, o):
            y = y + g[:, None] * self.attn1.to_out(_flat(o))
            return y + g_m[:, None] * self.ff_i(_modulate(self.norm3_i, y, sh_m, sc_m))

        return out(x, o), out(c, oc)


class CaptionProjection(nnx.Module):
    """diffusers' ``TextProjection`` (a Linear without bias, ``.linear``)."""

    def __init__(self, din: int, dout: int, *, dtype, rngs):
        self.linear = linear(din, dout, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


class OutEmbed(nnx.Module):
    """diffusers ``HiDreamImageOutEmbed``."""

    def __init__(self, cfg: HiDreamConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm_final = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.linear = linear(d, cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)
        self.adaLN_modulation = linear(d, 2 * d, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(temb)), 2, axis=-1)
        return self.linear(_modulate(self.norm_final, x, shift, scale))


def rope_tables(ids: np.ndarray, axes_dims, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``HiDreamImageEmbedND`` as interleaved (N, head_dim) cos / sin tables; where the axes cover half
    the head, the other half is left unrotated (cos 1, sin 0), as diffusers' ``apply_rope`` on the first half."""
    ids = np.asarray(ids, np.float32)
    tabs = [rope_1d(int(dim), ids[:, i], ROPE_THETA) for i, dim in enumerate(axes_dims)]
    cos = np.concatenate([t[0] for t in tabs], axis=-1)
    sin = np.concatenate([t[1] for t in tabs], axis=-1)
    rest = head_dim - cos.shape[1]
    if rest:
        cos = np.concatenate([cos, np.ones((len(ids), rest))], axis=-1)
        sin = np.concatenate([sin, np.zeros((len(ids), rest))], axis=-1)
    return cos.astype(np.float32), sin.astype(np.float32)


def patch_layout(cfg: HiDreamConfig, h: int, w: int):
    """(tokens in the model's sequence, the real image tokens, their RoPE ids padded, the key mask or None) for
    latents of (h, w): square latents are their ``(h/p)(w/p)`` patches; non-square ones are padded to
    ``max_seq`` (diffusers' ``patchify``)."""
    p = cfg.patch_size
    if h % p or w % p:
        raise ValueError(f"latents {h} x {w}: HiDream patchifies by {p}; both sides must be multiples of it.")
    n = (h // p) * (w // p)
    ids = image_ids(h // p, w // p)
    if h == w:
        return n, n, ids, None
    if n > cfg.max_seq:
        raise ValueError(f"latents {h} x {w} make {n} tokens, more than max_resolution's {cfg.max_seq}.")
    ids = np.concatenate([ids, np.zeros((cfg.max_seq - n, 3), np.float32)])
    mask = np.zeros((cfg.max_seq,), np.float32)
    mask[:n] = 1
    return cfg.max_seq, n, ids, mask


def patchify(latents, p: int, seq: int):
    """(B, C, H, W) -> (B, seq, p*p*C) tokens (diffusers' order: rows, columns, then (p, p, C)), zero-padded."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    return jnp.pad(x, ((0, 0), (0, seq - x.shape[1]), (0, 0)))


def unpatchify(x, p: int, h: int, w: int):
    """(B, >= (h/p)(w/p), p*p*C) -> (B, C, h, w) (diffusers' ``unpatchify``, inference branch)."""
    b = x.shape[0]
    gh, gw = h // p, w // p
    c = x.shape[-1] // (p * p)
    t = x[:, :gh * gw].reshape(b, gh, gw, p, p, c).transpose(0, 5, 1, 3, 2, 4)
    return t.reshape(b, c, gh * p, gw * p)


class HiDreamImageTransformer2DModel(nnx.Module):
    """``model(hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3, pooled_embeds)`` as
    diffusers' forward (inference): latents (B, C, H, W), timesteps (B,) in [0, 1000], T5 states (B, Lt, d_t5), the
    Llama hidden states (n_llama_layers, B, Ll, d_llama), pooled CLIP (B, text_emb_dim) -> (B, C, H, W)."""

    def __init__(self, cfg: HiDreamConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.t_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)
        self.p_embedder = TimestepEmbedding(cfg.text_emb_dim, d, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(cfg.in_channels * cfg.patch_size ** 2, d, dtype=dtype, rngs=rngs)
        self.double_stream_blocks = stack_modules(lambda r: DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers,
                                                  rngs)
        self.single_stream_blocks = stack_modules(lambda r: SingleBlock(cfg, dtype=dtype, rngs=r),
                                                  cfg.num_single_layers, rngs)
        self.final_layer = OutEmbed(cfg, dtype=dtype, rngs=rngs)
        llama_dim = cfg.caption_channels[1]
        self.double_caption = stack_modules(lambda r: CaptionProjection(llama_dim, d, dtype=dtype, rngs=r),
                                            cfg.num_layers, rngs)
        self.single_caption = stack_modules(lambda r: CaptionProjection(llama_dim, d, dtype=dtype, rngs=r),
                                            cfg.num_single_layers, rngs)
        self.t5_caption = CaptionProjection(cfg.caption_channels[0], d, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, timesteps, t5, llama, pooled, layout=None):
        """-> (image tokens (B, N, D), tokens {"rope", "kmask"?}, cond {"temb", "context" (B, Lt + Ll, D): the
        starting text stream, "llama_double" / "llama_single" (B, n, Ll, D): each block's Llama layer}).
        ``layout``: :func:`patch_layout`'s ``(seq, ids, mask)`` ready made (the pipeline's host tables:
        ``(seq, (cos, sin), mask)``)."""
        cfg, dtype = self.cfg, self.dtype
        b, _, h, w = hidden_states.shape
        if layout is None:
            seq, _, ids, mask = patch_layout(cfg, h, w)
            rope = rope_tables(ids, cfg.axes_dims_rope, cfg.attention_head_dim)
        else:
            seq, rope, mask = layout
        x = self.x_embedder(patchify(hidden_states.astype(dtype), cfg.patch_size, seq))
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        temb = self.t_embedder(timestep_embedding(t, 256, flip_sin_to_cos=True).astype(dtype))
        temb = temb + self.p_embedder(jnp.asarray(pooled).astype(dtype))
        llama = jnp.asarray(llama).astype(dtype)[jnp.asarray(cfg.llama_layers)]  # (n_blocks, B, Ll, d)
        nd = cfg.num_layers
        proj = lambda stack, a: jnp.einsum("lbsi,lio->blso", a, stack.linear.kernel[...])  # noqa: E731
        ld, ls = proj(self.double_caption, llama[:nd]), proj(self.single_caption, llama[nd:])
        context = jnp.concatenate([self.t5_caption(jnp.asarray(t5).astype(dtype)), ls[:, -1]], axis=1)
        tokens = {"rope": tuple(jnp.asarray(a, jnp.float32) for a in rope)}
        if mask is not None:
            tokens["kmask"] = jnp.asarray(mask, jnp.float32)
        return x, tokens, {"temb": temb, "context": context, "llama_double": ld, "llama_single": ls}

    def double_blocks(self, x, tokens, cond):
        """The double-stream stack on the image tokens (or a shard of them); -> (image, text stream)."""
        x, c, _ = scan_modules(self.double_stream_blocks, self._double_layer(tokens, cond),
                               (x, cond["context"], jnp.int32(0)))
        return x, c

    @staticmethod
    def _double_layer(tokens, cond):
        """A double-stream block on the carry (image, text stream, the block's index): its Llama layer picked by the
        index, appended to the text for the block (its outputs dropped)."""
        temb, rope, kmask = cond["temb"], tokens["rope"], tokens.get("kmask")
        lc = cond["context"].shape[1]

        def layer(blk, carry):
            x, c, i = carry
            extra = jax.lax.dynamic_index_in_dim(cond["llama_double"], i, axis=1, keepdims=False)
            x, c = blk(x, jnp.concatenate([c, extra], axis=1), temb, rope, kmask)
            return x, c[:, :lc], i + 1

        return layer

    @staticmethod
    def joint_tokens(tokens, text_len: int):
        """The single-stream phase's per-token tables: [image; text] (the text not rotated, its keys kept)."""
        cos, sin = tokens["rope"]
        out = {"rope": (jnp.concatenate([cos, jnp.ones((text_len, cos.shape[1]), cos.dtype)]),
                        jnp.concatenate([sin, jnp.zeros((text_len, sin.shape[1]), sin.dtype)]))}
        if "kmask" in tokens:
            out["kmask"] = jnp.concatenate([tokens["kmask"], jnp.ones((text_len,), jnp.float32)])
        return out

    def single_blocks(self, joint, tokens, cond):
        """The single-stream stack on the joint [image; text] sequence (or a contiguous shard of it)."""
        temb, rope, kmask = cond["temb"], tokens["rope"], tokens.get("kmask")

        def layer(blk, carry):
            y, i = carry
            extra = jax.lax.dynamic_index_in_dim(cond["llama_single"], i, axis=1, keepdims=False)
            return blk(y, extra, temb, rope, kmask), i + 1

        return scan_modules(self.single_stream_blocks, layer, (joint, jnp.int32(0)))[0]

    def blocks(self, x, tokens, cond):
        """Both stacks with the text stream held whole, the form PipeFusion runs (each patch carries the text): the
        double-stream blocks' (image, text, index) go on into the single-stream blocks, where the text and the
        block's Llama layer join each attention as the context (:meth:`SingleBlock.pair`) instead of the sharded
        sequence. The carry is alike for both stacks, its index counting the blocks of both (single-stream block
        ``j`` sees ``num_layers + j``). Equals :meth:`double_blocks` then :meth:`single_blocks` over [image; text].
        -> the image tokens."""
        temb, rope, kmask = cond["temb"], tokens["rope"], tokens.get("kmask")
        nd = self.cfg.num_layers

        def single(blk, carry):
            x, c, i = carry
            extra = jax.lax.dynamic_index_in_dim(cond["llama_single"], i - nd, axis=1, keepdims=False)
            x, c = blk.pair(x, c, extra, temb, rope, kmask)
            return x, c, i + 1

        carry = scan_modules(self.double_stream_blocks, self._double_layer(tokens, cond),
                             (x, cond["context"], jnp.int32(0)))
        return scan_modules(self.single_stream_blocks, single, carry)[0]

    def head(self, x, cond, shape):
        """Image tokens (the real ones first) -> the prediction (B, C, h, w); ``shape``: the latents'."""
        return unpatchify(self.final_layer(x, cond["temb"]), self.cfg.patch_size, shape[-2], shape[-1])

    def __call__(self, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
                 pooled_embeds):
        x, tokens, cond = self.embed(hidden_states, timesteps, encoder_hidden_states_t5,
                                     encoder_hidden_states_llama3, pooled_embeds)
        x, c = self.double_blocks(x, tokens, cond)
        joint = self.single_blocks(jnp.concatenate([x, c], axis=1), self.joint_tokens(tokens, c.shape[1]),
                                   {"temb": cond["temb"], "llama_single": cond["llama_single"]})
        return self.head(joint[:, :x.shape[1]], cond, hidden_states.shape)


def pipefusion_stacks(cfg: HiDreamConfig) -> dict:
    """PipeFusion's stacks (``_init_parts``' ``stacked`` / ``stacked_layers``): double-, then single-stream, looped
    over the stages (:meth:`HiDreamImageTransformer2DModel.blocks`; the text rides whole with each patch)."""
    return dict(stacked=(DOUBLE, SINGLE), stacked_layers=(cfg.num_layers, cfg.num_single_layers))


TORCH_RENAMES = [
    (r"^(double|single)_stream_blocks\.(\d+)\.", r"\1_stream_blocks.\2.block."),
    (r"\.adaLN_modulation\.", ".adaLN_modulation.1."),
    (r"^t_embedder\.", "t_embedder.timestep_embedder."),
    (r"^p_embedder\.", "p_embedder.pooled_embedder."),
    (r"^x_embedder\.", "x_embedder.proj."),
]


def params_from_torch(flat: dict, cfg: HiDreamConfig, dtype=None) -> dict:
    """Params for :class:`HiDreamImageTransformer2DModel` from diffusers' state dict: the routed experts' weights
    stacked per block (``experts.{e}.wN.weight`` -> ``experts.wN``, transposed), the caption projections split into
    the double-, single-stream and T5 ones."""
    flat = dict(flat)
    n_exp = cfg.num_routed_experts
    for key in [k for k in flat if ".ff_i.experts.0.w1.weight" in k]:
        prefix = key[:-len("0.w1.weight")]
        for w in ("w1", "w2", "w3"):
            flat[prefix + w] = np.stack([np.asarray(flat.pop(f"{prefix}{e}.{w}.weight")).T for e in range(n_exp)])
    nd, ns = cfg.num_layers, cfg.num_single_layers
    flat["t5_caption.linear.weight"] = flat.pop(f"caption_projection.{nd + ns}.linear.weight")
    return map_state_dict(flat, expected_shapes(lambda: HiDreamImageTransformer2DModel(cfg)),
                          stacked={DOUBLE: nd, SINGLE: ns, "double_caption": ("caption_projection", 0, nd),
                                   "single_caption": ("caption_projection", nd, ns)},
                          renames=TORCH_RENAMES, dtype=dtype, what="HiDream transformer checkpoint")


def build(cfg: HiDreamConfig, params: dict, dtype=jnp.float32) -> HiDreamImageTransformer2DModel:
    return build_module(lambda: HiDreamImageTransformer2DModel(cfg, dtype=dtype), params)
