"""Cosmos-Predict2 transformer (diffusers ``CosmosTransformer3DModel``, Text2Image and Video2World) in Flax NNX.

The latents (B, C, F, H, W), with the Video2World condition-mask channel and the padding-mask channel appended
(``concat_padding_mask``: the pipelines' all-zero mask, resized to the latents), are cut into (1, 2, 2) patches and
projected by one bias-free Linear (``patch_embed.proj``). The timestep's sinusoids (width D) give two embeddings:
``temb`` (``time_embed.t_embedder``: Linear, SiLU, Linear to 3 D) and ``emb`` (``time_embed.norm``, an RMSNorm of
the sinusoids). Each block is adaLN-LoRA modulated three times (``norm1`` / ``norm2`` / ``norm3``: SiLU(emb) ->
Linear to ``adaln_lora_dim`` -> Linear to 3 D, plus ``temb``; shift, scale, gate of a weight-free LayerNorm),
self-attends over the video tokens (q / k RMS-normed per head, Cosmos' 3D RoPE: the head dim split into frame /
height / width parts, NTK-scaled, rotate-half layout; the frame positions scaled by ``24 / fps`` where the pipeline
gives an fps), cross-attends to the T5 caption (no mask: the pipelines zero the states after each caption) and runs
an erf-GELU MLP, all bias-free. With ``extra_pos_embed_type="learnable"`` (the 2B / 14B releases) a normalised sum of
three learned tables (frame, row, column) is added to the tokens at the start of every block. The head is one more
adaLN-LoRA LayerNorm (shift, scale) and a Linear to the patches.

Video2World gives every latent frame its own timestep (the conditioned frames a tiny one): the timestep is (B,) or
(B, F) (diffusers' (B, 1, F, 1, 1)); ``cond`` then holds per-frame tables and ``tokens["frame"]`` picks each token's.

Self-attention goes through :func:`xdit_jax.parallel.attention.attention` (sequence-parallel over the video tokens;
the RoPE tables, frame indices and learnable positions are per-token ``tokens`` sharded with them), cross-attention
through :func:`xdit_jax.parallel.attention.cross_attention` (local under every mesh). No collective here.

Not supported (a clear error): Cosmos 2.5's options (``img_context_dim_in``, ``use_crossattn_projection``,
``controlnet_block_every_n``: the Predict2.5 / Transfer2.5 checkpoints) and Cosmos 1.0 (another transformer layout,
the AutoencoderKLCosmos VAE), which :mod:`xdit_jax.pipelines.cosmos` refuses by its pipeline class.
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
from xdit_jax.models.layers import LayerNorm, RMSNorm, linear, scan_modules, stack_modules, timestep_embedding
from xdit_jax.parallel.attention import attention, cross_attention

STACKED = "transformer_blocks"
BASE_FPS = 24


@dataclasses.dataclass(frozen=True)
class CosmosConfig(TransformerDims):
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    num_layers: int = 28
    mlp_ratio: float = 4.0
    text_embed_dim: int = 1024
    adaln_lora_dim: int = 256
    max_size: tuple[int, int, int] = (128, 240, 240)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_scale: tuple[float, float, float] = (2.0, 1.0, 1.0)
    concat_padding_mask: bool = True
    extra_pos_embed_type: str | None = "learnable"
    use_crossattn_projection: bool = False
    controlnet_block_every_n: int | None = None
    img_context_dim_in: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CosmosConfig:
        kw = known_fields(cls, d)
        for k in ("max_size", "patch_size", "rope_scale"):
            if k in kw:
                kw[k] = tuple(kw[k])
        cfg = cls(**kw)
        if cfg.img_context_dim_in or cfg.use_crossattn_projection or cfg.controlnet_block_every_n:
            raise NotImplementedError("This CosmosTransformer3DModel is a Cosmos 2.5 one (img_context_dim_in / "
                                      "use_crossattn_projection / controlnet_block_every_n set: Predict2.5 or "
                                      "Transfer2.5); xdit_jax runs the Cosmos-Predict2 transformers only.")
        if cfg.extra_pos_embed_type not in (None, "learnable"):
            raise ValueError(f"extra_pos_embed_type={cfg.extra_pos_embed_type!r}: None or 'learnable'.")
        if len(cfg.patch_size) != 3 or len(cfg.max_size) != 3 or len(cfg.rope_scale) != 3:
            raise ValueError("patch_size, max_size and rope_scale are (t, h, w) triples.")
        return cfg

    @property
    def text_dim(self) -> int:
        """The caption states' width (the pipelines' name for it)."""
        return self.text_embed_dim

    @property
    def patch_in(self) -> int:
        """Channels the patch embedding takes: the latents' (with Video2World's condition mask) + the padding mask."""
        return self.in_channels + (1 if self.concat_padding_mask else 0)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """diffusers ``CosmosRotaryPosEmbed``: (frames, height, width) parts of the head dim."""
        hw = self.attention_head_dim // 6 * 2
        return self.attention_head_dim - 2 * hw, hw, hw

    @property
    def max_patches(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.max_size, self.patch_size))


TORCH_RENAMES = [
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]


def rope_table(cfg: CosmosConfig, f: int, h: int, w: int, fps: float | None = None):
    """(cos, sin), each (f h w, head_dim) float32, as diffusers' ``CosmosRotaryPosEmbed`` (``[t, h, w] * 2``: the
    rotate-half layout) for a grid of f x h x w patches."""
    dt, dh, dw = cfg.rope_dims
    mt, mh, mw = cfg.max_patches
    if f > mt or h > mh or w > mw:
        raise ValueError(f"{f} x {h} x {w} patches exceed this model's max_size {cfg.max_size} (in patches "
                         f"{mt} x {mh} x {mw}).")
    f32 = np.float32

    def freqs(dim, scale):
        ntk = scale ** (dim / (dim - 2))
        rng = (np.arange(0, dim, 2, dtype=f32)[: dim // 2] / f32(dim)).astype(f32)
        return (f32(1.0) / (f32(10000.0 * ntk) ** rng)).astype(f32)

    seq = np.arange(max(cfg.max_patches), dtype=f32)
    pos_t = seq[:f] if fps is None else (seq[:f] / f32(fps) * f32(BASE_FPS)).astype(f32)
    et = np.outer(pos_t, freqs(dt, cfg.rope_scale[0])).astype(f32)
    eh = np.outer(seq[:h], freqs(dh, cfg.rope_scale[1])).astype(f32)
    ew = np.outer(seq[:w], freqs(dw, cfg.rope_scale[2])).astype(f32)
    et = np.broadcast_to(et[:, None, None], (f, h, w, et.shape[-1]))
    eh = np.broadcast_to(eh[None, :, None], (f, h, w, eh.shape[-1]))
    ew = np.broadcast_to(ew[None, None, :], (f, h, w, ew.shape[-1]))
    fr = np.concatenate([et, eh, ew] * 2, axis=-1).reshape(f * h * w, -1)
    return np.cos(fr).astype(f32), np.sin(fr).astype(f32)


def apply_rope_half(x, cos, sin):
    """diffusers ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-2)``: rotate the halves of ``x`` (B, S, H,
    D) by (S, D) tables; math in float32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


class CosmosAttention(nnx.Module):
    """diffusers ``Attention(qk_norm="rms_norm")`` with ``CosmosAttnProcessor2_0``: bias-free projections, q / k
    RMS-normed per head (eps 1e-5); self-attention with RoPE, or cross-attention to ``context``."""

    def __init__(self, cfg: CosmosConfig, kv_dim: int, *, dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, 1e-5, dtype=dtype)
        self.norm_k = RMSNorm(hd, 1e-5, dtype=dtype)

    def __call__(self, x, rope=None, context=None):
        b, s, _ = x.shape
        src = x if context is None else context
        heads = lambda y: y.reshape(b, y.shape[1], self.heads, -1)  # noqa: E731
        q = self.norm_q(heads(self.to_q(x)))
        k = self.norm_k(heads(self.to_k(src)))
        v = heads(self.to_v(src))
        if context is None:
            q, k = apply_rope_half(q, *rope), apply_rope_half(k, *rope)
            o = attention(q, k, v)
        else:
            o = cross_attention(q, k, v)
        return self.to_out(o.reshape(b, s, -1))


class AdaLoRA(nnx.Module):
    """The adaLN-LoRA modulation of ``CosmosAdaLayerNormZero`` (``n`` = 3: shift, scale, gate) and
    ``CosmosAdaLayerNorm`` (``n`` = 2): SiLU(emb) -> Linear -> Linear, plus ``temb``'s first n D."""

    def __init__(self, d: int, lora: int, n: int, *, dtype, rngs):
        self.n = n
        self.linear_1 = linear(d, lora, bias=False, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(lora, n * d, bias=False, dtype=dtype, rngs=rngs)

    def modulation(self, emb, temb):
        """(B, F, D) emb, (B, F, 3 D) temb -> n tables (B, F, D), float32."""
        d = emb.shape[-1]
        m = self.linear_2(self.linear_1(jax.nn.silu(emb))).astype(jnp.float32)
        m = m + temb[..., : self.n * d].astype(jnp.float32)
        return jnp.split(m, self.n, axis=-1)


class CosmosMLP(nnx.Module):
    """diffusers ``FeedForward(dim, mult, activation_fn="gelu", bias=False)``: erf GELU."""

    def __init__(self, d: int, inner: int, *, dtype, rngs):
        self.net_0 = linear(d, inner, bias=False, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, d, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.net_2(jax.nn.gelu(self.net_0(x), approximate=False))


def _per_token(tables, frame):
    """Per-frame (B, F, D) tables -> per-token (B, S, D) for the tokens' frame indices (S,)."""
    return [jnp.take(t, frame, axis=1) for t in tables]


class CosmosTransformerBlock(nnx.Module):
    def __init__(self, cfg: CosmosConfig, *, dtype, rngs):
        d, lora = cfg.inner_dim, cfg.adaln_lora_dim
        self.norm1 = AdaLoRA(d, lora, 3, dtype=dtype, rngs=rngs)
        self.attn1 = CosmosAttention(cfg, d, dtype=dtype, rngs=rngs)
        self.norm2 = AdaLoRA(d, lora, 3, dtype=dtype, rngs=rngs)
        self.attn2 = CosmosAttention(cfg, cfg.text_embed_dim, dtype=dtype, rngs=rngs)
        self.norm3 = AdaLoRA(d, lora, 3, dtype=dtype, rngs=rngs)
        self.ff = CosmosMLP(d, int(d * cfg.mlp_ratio), dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(d, 1e-6, affine=False, dtype=dtype)

    def __call__(self, x, tokens, cond):
        """x: the video tokens (B, S, D) or any contiguous piece of them; tokens: {"rope", "frame"[, "pos"]} for
        those tokens; cond: see :meth:`CosmosTransformer3DModel.embed`."""
        f32 = jnp.float32
        frame = tokens["frame"]
        if "pos" in tokens:
            x = x + tokens["pos"][None].astype(x.dtype)

        def modulated(norm, x):
            shift, scale, gate = _per_token(norm.modulation(cond["emb"], cond["temb"]), frame)
            return (self.ln(x).astype(f32) * (1 + scale) + shift).astype(x.dtype), gate

        h, gate = modulated(self.norm1, x)
        x = (x.astype(f32) + gate * self.attn1(h, rope=tokens["rope"]).astype(f32)).astype(x.dtype)
        h, gate = modulated(self.norm2, x)
        x = (x.astype(f32) + gate * self.attn2(h, context=cond["context"]).astype(f32)).astype(x.dtype)
        h, gate = modulated(self.norm3, x)
        return (x.astype(f32) + gate * self.ff(h).astype(f32)).astype(x.dtype)


class CosmosEmbedding(nnx.Module):
    """diffusers ``CosmosEmbedding``: sinusoids (width D) -> temb (Linear, SiLU, Linear to 3 D) and their
    RMSNorm."""

    def __init__(self, d: int, *, dtype, rngs):
        self.t_embedder = AdaLoRA(d, d, 3, dtype=dtype, rngs=rngs)  # (only its two linears are used)
        self.norm = RMSNorm(d, 1e-6, dtype=dtype)

    def __call__(self, t, d: int, dtype):
        s = timestep_embedding(t, d, True, 0).astype(dtype)
        e = self.t_embedder
        return e.linear_2(jax.nn.silu(e.linear_1(s))), self.norm(s)


class LearnablePositions(nnx.Module):
    """diffusers ``CosmosLearnablePositionalEmbed``: three learned tables (frame, row, column) summed per token
    and divided by ``eps + |e| / sqrt(D)``; float32."""

    def __init__(self, cfg: CosmosConfig, *, dtype):
        d = cfg.inner_dim
        mt, mh, mw = cfg.max_patches
        self.pos_emb_t = nnx.Param(jnp.zeros((mt, d), dtype))
        self.pos_emb_h = nnx.Param(jnp.zeros((mh, d), dtype))
        self.pos_emb_w = nnx.Param(jnp.zeros((mw, d), dtype))

    def __call__(self, f: int, h: int, w: int):
        f32 = jnp.float32
        e = (self.pos_emb_t[...][:f].astype(f32)[:, None, None] + self.pos_emb_h[...][:h].astype(f32)[None, :, None]
             + self.pos_emb_w[...][:w].astype(f32)[None, None, :]).reshape(f * h * w, -1)
        norm = jnp.sqrt(jnp.sum(jnp.square(e), axis=-1, keepdims=True))
        return e / (1e-6 + norm * np.float32(np.sqrt(1.0 / e.shape[-1])))


def resize_nearest(mask, h: int, w: int):
    """torchvision's ``resize(..., NEAREST)`` of a (..., H, W) mask to (..., h, w): source index floor(i * H / h)."""
    mask = jnp.asarray(mask, jnp.float32)
    hh, ww = mask.shape[-2:]
    ri = np.minimum(np.floor(np.arange(h) * (hh / h)).astype(np.int64), hh - 1)
    ci = np.minimum(np.floor(np.arange(w) * (ww / w)).astype(np.int64), ww - 1)
    return mask[..., ri, :][..., ci]


class PatchEmbed(nnx.Module):
    def __init__(self, din: int, d: int, *, dtype, rngs):
        self.proj = linear(din, d, bias=False, dtype=dtype, rngs=rngs)


class CosmosTransformer3DModel(nnx.Module):
    """``model(hidden_states, timestep, encoder_hidden_states, fps=, condition_mask=, padding_mask=)`` as
    diffusers' forward. hidden_states: (B, C, F, H, W); timestep: (B,), (B, F) or (B, 1, F, 1, 1);
    encoder_hidden_states: (B, L, text_embed_dim). Returns (B, out_channels, F, H, W)."""

    def __init__(self, cfg: CosmosConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        p = int(np.prod(cfg.patch_size))
        self.patch_embed = PatchEmbed(cfg.patch_in * p, d, dtype=dtype, rngs=rngs)
        self.learnable_pos_embed = (LearnablePositions(cfg, dtype=dtype) if cfg.extra_pos_embed_type == "learnable"
                                    else None)
        self.time_embed = CosmosEmbedding(d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: CosmosTransformerBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = AdaLoRA(d, cfg.adaln_lora_dim, 2, dtype=dtype, rngs=rngs)
        self.ln_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, p * cfg.out_ch, bias=False, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, timestep, encoder_hidden_states, fps=None, condition_mask=None,
              padding_mask=None):
        """-> (x, tokens, cond).

        x: the video tokens (B, S, D), S = F' H' W' row-major. tokens: ``rope`` ((S, head_dim) cos, sin), ``frame``
        (S,) each token's latent frame, ``pos`` (S, D) the learnable positions (where the model has them). cond:
        ``temb`` (B, F', 3 D), ``emb`` (B, F', D) (per latent frame; one row for a timestep per sample), ``context``
        (B, L, text_embed_dim) the caption.
        """
        cfg, dtype = self.cfg, self.dtype
        x = jnp.asarray(hidden_states)
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"Latents {f} x {h} x {w} (frames x height x width) must be multiples of the patch "
                             f"size {cfg.patch_size}.")
        parts = [x.astype(dtype)]
        if condition_mask is not None:
            parts.append(jnp.broadcast_to(jnp.asarray(condition_mask, dtype), (b, 1, f, h, w)))
        if cfg.concat_padding_mask:
            pm = (jnp.zeros((1, 1, h, w), dtype) if padding_mask is None
                  else resize_nearest(padding_mask, h, w).astype(dtype))
            parts.append(jnp.broadcast_to(pm.reshape(1, 1, 1, h, w)[:1], (b, 1, f, h, w)))
        x = jnp.concatenate(parts, axis=1)
        if x.shape[1] != cfg.patch_in:
            raise ValueError(f"{x.shape[1]} input channels (latents, condition mask, padding mask); this transformer's "
                             f"patch embedding takes {cfg.patch_in} (Video2World: give condition_mask).")
        fp, hp, wp = f // pt, h // ph, w // pw
        c = x.shape[1]
        x = x.reshape(b, c, fp, pt, hp, ph, wp, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, fp * hp * wp, -1)
        x = self.patch_embed.proj(x)

        t = jnp.asarray(timestep)
        if t.ndim == 5:
            t = t.reshape(t.shape[0], -1)
        if t.ndim == 2:
            if t.shape != (b, f) or pt != 1:
                raise ValueError(f"A timestep per latent frame must be (B, F) = ({b}, {f}) with a temporal patch of "
                                 f"1; got {tuple(t.shape)}.")
            nf = f
        else:
            t = jnp.broadcast_to(t.reshape(-1), (b,))[:, None]
            nf = 1
        temb, emb = self.time_embed(t.reshape(-1), cfg.inner_dim, dtype)
        cond = {"temb": temb.reshape(b, nf, -1), "emb": emb.reshape(b, nf, -1),
                "context": jnp.asarray(encoder_hidden_states).astype(dtype)}
        cos, sin = rope_table(cfg, fp, hp, wp, fps)
        frame = np.arange(fp * hp * wp) // (hp * wp) if nf > 1 else np.zeros(fp * hp * wp, np.int64)
        tokens = {"rope": (jnp.asarray(cos), jnp.asarray(sin)), "frame": jnp.asarray(frame, jnp.int32)}
        if self.learnable_pos_embed is not None:
            tokens["pos"] = self.learnable_pos_embed(fp, hp, wp)
        return x, tokens, cond

    def blocks(self, x, tokens, cond):
        """The block stack (one lax.scan) on the video tokens or a contiguous shard of them."""
        return scan_modules(self.transformer_blocks, lambda blk, y: blk(y, tokens, cond), x)

    def head(self, x, cond, shape):
        """Video tokens (B, S, D) -> the prediction (B, out_channels, F, H, W) for latents of ``shape``."""
        cfg = self.cfg
        b, _, f, h, w = shape
        pt, ph, pw = cfg.patch_size
        fp, hp, wp = f // pt, h // ph, w // pw
        nf = cond["emb"].shape[1]
        frame = jnp.asarray(np.arange(fp * hp * wp) // (hp * wp) if nf > 1 else np.zeros(fp * hp * wp, np.int64))
        shift, scale = _per_token(self.norm_out.modulation(cond["emb"], cond["temb"]), frame)
        y = (self.ln_out(x).astype(jnp.float32) * (1 + scale) + shift).astype(x.dtype)
        y = self.proj_out(y).reshape(b, fp, hp, wp, ph, pw, pt, cfg.out_ch)
        y = y.transpose(0, 7, 1, 6, 2, 4, 3, 5)
        return y.reshape(b, cfg.out_ch, f, h, w)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, fps=None, condition_mask=None,
                 padding_mask=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, fps, condition_mask,
                                     padding_mask)
        return self.head(self.blocks(x, tokens, cond), cond, jnp.shape(hidden_states))


def params_from_torch(flat: dict, cfg: CosmosConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: CosmosTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, dtype=dtype,
                          what="Cosmos transformer checkpoint")


def build(cfg: CosmosConfig, params: dict, dtype=jnp.float32) -> CosmosTransformer3DModel:
    return build_module(lambda: CosmosTransformer3DModel(cfg, dtype=dtype), params)
