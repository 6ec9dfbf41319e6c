"""HunyuanVideo transformer (diffusers ``HunyuanVideoTransformer3DModel``, text-to-video) in Flax NNX.

FLUX's architecture on video: double-stream blocks (the video and the text tokens keep their own weights and
meet in one joint attention), then single-stream blocks (one set of weights over the joint sequence). The
pieces whose math is FLUX's are FLUX's (:mod:`xdit_jax.models.flux`: the blocks, their attention, the time /
guidance / pooled-text embedding); what is HunyuanVideo's own lives here:

* the patch embed: a Conv3d of ``(patch_size_t, patch_size, patch_size)`` over the (B, C, F, H, W) latents;
* the token refiner (``HunyuanVideoTokenRefiner``): the Llama states are projected and refined by a few
  self-attention blocks under the text mask, conditioned on the timestep and their masked mean;
* the 3-D RoPE over (t, h, w) patch positions (``rope_axes_dim``, ``rope_theta``), on the video tokens only
  (the text is not rotated), computed for the global positions before sharding;
* the text padding: diffusers' ``attention_mask`` lets every query see the video tokens and the first
  ``encoder_attention_mask.sum()`` text tokens of its sample; the rest of the text keys are invisible. Here the
  text joins every attention as the *context* of :func:`xdit_jax.parallel.attention.attention` with that key
  mask, in the double-stream blocks and in the single-stream ones (:meth:`flux.SingleBlock.pair`: the same
  weights on the text, kept apart from the video), so the video tokens are the one sharded sequence of both
  stacks (the text sharded too with ``text=TEXT_KEYS``, as Mochi's caption; its mask stays whole).

So one ``blocks(x, tokens, cond)`` runs both stacks (two ``lax.scan``s) and the model has the embed / blocks /
head split of the other families (:func:`xdit_jax.parallel.sequence.run_blocks`, PipeFusion's looped stacks).
Image-to-video (:mod:`xdit_jax.pipelines.hunyuan_video_i2v`): ``image_condition_type="latent_concat"`` is this model
on more input channels (the image's latents and a mask beside the noise); ``"token_replace"``: the first latent
frame's tokens (the image's) are modulated by the embedding of timestep 0 (+ the pooled text, no guidance) instead of
``temb`` in every block (diffusers' ``HunyuanVideoTokenReplace*`` blocks: the same weights). The first-frame flag is
a per-token table (``tokens["first"]``), so it shards and slices with the video tokens.
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
    TimestepEmbedding,
    gelu_tanh,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)

STACKED = "transformer_blocks"
SINGLE = "single_transformer_blocks"
STACKS = (STACKED, SINGLE)
REFINER = "context_embedder.refiner_blocks"
# The text stream in ``cond``: sliced with PipeFusion's patches / sharded over the sequence group (its key mask,
# ``context_mask``, stays whole)
TEXT_KEYS = ("context",)


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig(TransformerDims):
    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanVideoConfig:
        cfg = cls(**known_fields(cls, d))
        cfg = dataclasses.replace(cfg, rope_axes_dim=tuple(int(a) for a in cfg.rope_axes_dim))
        if cfg.image_condition_type not in (None, "latent_concat", "token_replace"):
            raise ValueError(f"image_condition_type={cfg.image_condition_type!r}: diffusers knows 'latent_concat' "
                             "and 'token_replace'.")
        if cfg.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={cfg.qk_norm!r}: HunyuanVideo uses rms_norm.")
        if (len(cfg.rope_axes_dim) != 3 or sum(cfg.rope_axes_dim) != cfg.attention_head_dim
                or any(a % 2 for a in cfg.rope_axes_dim)):
            raise ValueError(f"rope_axes_dim {cfg.rope_axes_dim} must be 3 even sizes summing to attention_head_dim "
                             f"{cfg.attention_head_dim}.")
        if cfg.num_layers < 1 or cfg.num_single_layers < 1 or cfg.num_refiner_layers < 1:
            raise ValueError("A HunyuanVideo transformer has at least one double-stream, one single-stream and one "
                             "token refiner block.")
        return cfg


# ----- the token refiner -----

class LinearSiLU(nnx.Module):
    """diffusers ``FeedForward(activation_fn="linear-silu")``: Linear, SiLU, Linear (``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs):
        self.net_0 = linear(dim, inner, dtype=dtype, rngs=rngs)
        self.net_2 = linear(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.net_2(jax.nn.silu(self.net_0(x)))


class RefinerBlock(nnx.Module):
    """diffusers ``HunyuanVideoIndividualTokenRefinerBlock``: self-attention (diffusers' plain ``Attention``)
    and a SiLU MLP, pre-LayerNorms, gated by the refiner's conditioning (``norm_out``)."""

    def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.norm1 = LayerNorm(d, 1e-6, dtype=dtype)
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-6, dtype=dtype)
        self.ff = LinearSiLU(d, int(d * cfg.mlp_ratio), dtype=dtype, rngs=rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb, mask):
        """x (B, L, D); mask: bool (B, L, L), query x key."""
        b, n, d = x.shape
        h = self.norm1(x)
        heads = lambda y: y.reshape(b, n, self.heads, -1)  # noqa: E731
        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        p = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(x.dtype)
        gate_msa, gate_mlp = jnp.split(self.norm_out_linear(jax.nn.silu(temb)), 2, axis=-1)
        x = x + self.to_out(o.reshape(b, n, d)) * gate_msa[:, None]
        return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class RefinerTimeTextEmbed(nnx.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings`` (the refiner's): time + the masked mean of the text."""

    def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)
        self.text_embedder = flux.TextProjection(cfg.text_embed_dim, d, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, pooled):
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True).astype(pooled.dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)


class TokenRefiner(nnx.Module):
    """diffusers ``HunyuanVideoTokenRefiner`` (the model's ``context_embedder``)."""

    def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs):
        self.time_text_embed = RefinerTimeTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self.proj_in = linear(cfg.text_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.refiner_blocks = stack_modules(lambda r: RefinerBlock(cfg, dtype=dtype, rngs=r), cfg.num_refiner_layers,
                                            rngs)

    def __call__(self, x, timestep, mask):
        """x (B, L, text_dim), timestep (B,) float32, mask bool (B, L) -> (B, L, D)."""
        w = mask.astype(jnp.float32)[:, :, None]
        # diffusers divides by the count (NaN for an all-padding prompt; guarded here)
        pooled = (jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)).astype(x.dtype)
        temb = self.time_text_embed(timestep, pooled)
        h = self.proj_in(x)
        # query i sees key j where both are text tokens; every query sees key 0 (diffusers' self_attn_mask)
        pair = (mask[:, :, None] & mask[:, None, :]).at[:, :, 0].set(True)
        graphdef, state = nnx.split(self.refiner_blocks)
        # a plain scan, not scan_modules: PipeFusion counts the model's block stacks by their scans
        h, _ = jax.lax.scan(lambda c, s: (nnx.merge(graphdef, s)(c, temb, pair), None), h, state)
        return h


# ----- token replace (image_condition_type "token_replace") -----

class TimeTextEmbed(flux.TimeTextEmbed):
    """FLUX's time + guidance + pooled text; :meth:`token_replace`: diffusers' ``token_replace_emb``."""

    def token_replace(self, timestep, pooled):
        """The embedding of ``timestep`` (zeros) plus the pooled text, without the guidance."""
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True).astype(pooled.dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)


def _per_token(first, mod, tr_mod):
    """Each modulation chunk per token (B, N, D): ``tr_mod``'s on the first frame's tokens, ``mod``'s elsewhere."""
    sel = first[None, :, None] > 0
    return [jnp.where(sel, b[:, None], a[:, None]) for a, b in zip(mod, tr_mod)]


def token_replace_double(blk, x, c, temb, tr_temb, first, rope, c_mask):
    """diffusers ``HunyuanVideoTokenReplaceTransformerBlock`` on :class:`flux.DoubleBlock`'s weights: the video's
    adaLN per token (``first``: 1 on the first frame's tokens); the text's as FLUX's. -> (video, text)."""
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _per_token(first, blk.norm1.modulation(temb),
                                                                    blk.norm1.modulation(tr_temb))
    nx = blk.norm1.norm(x) * (1 + scale) + shift
    nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = blk.norm1_context(c, temb)
    a, ac = blk.attn.joint(nx, nc, rope, None, c_mask)
    x = x + gate * a
    x = x + gate_mlp * blk.ff(blk.norm2(x) * (1 + scale_mlp) + shift_mlp)
    c = c + c_gate[:, None] * ac
    c = c + c_gate_mlp[:, None] * blk.ff_context(blk.norm2_context(c) * (1 + c_scale_mlp[:, None])
                                                 + c_shift_mlp[:, None])
    return x, flux._fp16_clip(c)


def token_replace_single(blk, x, c, temb, tr_temb, first, rope, c_mask):
    """diffusers ``HunyuanVideoTokenReplaceSingleTransformerBlock`` on :class:`flux.SingleBlock`'s weights (as
    :meth:`flux.SingleBlock.pair`: the text as the context), the video's adaLN per token. -> (video, text)."""
    mod = blk.norm.modulation(temb)
    shift, scale, gate = _per_token(first, mod, blk.norm.modulation(tr_temb))
    hx = blk.norm.norm(x) * (1 + scale) + shift
    hc, _ = blk.norm(c, temb, mod)
    o, oc = blk.attn.attend(*blk.attn.qkv(hx, rope), *blk.attn.qkv(hc, None, batched=True), c_mask)
    y = jnp.concatenate([o.reshape(*o.shape[:2], -1), gelu_tanh(blk.proj_mlp(hx))], axis=-1)
    return flux._fp16_clip(x + gate * blk.proj_out(y)), blk._out(c, hc, oc, mod[2])


# ----- positions -----

def rope_tables(frames: int, grid_h: int, grid_w: int, axes_dim, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``HunyuanVideoRotaryPosEmbed``: cos, sin (frames*h*w, sum(axes_dim)) float32 of the patch grid
    (t, y, x) positions, each axis' interleaved table computed in float32 as diffusers does."""
    grids = np.meshgrid(np.arange(frames, dtype=np.float32), np.arange(grid_h, dtype=np.float32),
                        np.arange(grid_w, dtype=np.float32), indexing="ij")
    cos, sin = [], []
    for pos, dim in zip(grids, axes_dim):
        # torch's float32 pow is correctly rounded here: the float64 power rounded once
        exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        freqs = np.float32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
        ang = np.outer(pos.reshape(-1), freqs).astype(np.float64)  # the float32 angles, exactly
        cos.append(np.repeat(np.cos(ang).astype(np.float32), 2, axis=1))
        sin.append(np.repeat(np.sin(ang).astype(np.float32), 2, axis=1))
    return np.concatenate(cos, axis=1).astype(np.float32), np.concatenate(sin, axis=1).astype(np.float32)


def text_key_mask(encoder_attention_mask):
    """diffusers' key mask of the text in the double/single-stream blocks: the first ``mask.sum()`` tokens of each
    sample (the valid length, wherever the mask's ones lie) -> bool (B, L)."""
    m = jnp.asarray(encoder_attention_mask)
    valid = jnp.sum(m != 0, axis=1)
    return jnp.arange(m.shape[1])[None] < valid[:, None]


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs):
        k = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=k, strides=k, padding="VALID",
                             dtype=dtype, param_dtype=dtype, rngs=rngs)


# ----- the model -----

class HunyuanVideoTransformer3DModel(nnx.Module):
    """``model(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
    guidance)`` as diffusers' forward: latents (B, C, F, H, W), timestep (B,) (the scheduler's t, 0..1000),
    Llama states (B, L, text_embed_dim) with their mask (B, L), pooled CLIP (B, pooled_projection_dim),
    guidance (B,) (the embedded guidance scale x 1000; required when ``guidance_embeds``). Returns the
    prediction (B, out_channels, F, H, W) (sizes rounded down to the patch, as diffusers')."""

    def __init__(self, cfg: HunyuanVideoConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.x_embedder = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.context_embedder = TokenRefiner(cfg, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: flux.DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers,
                                                rngs)
        self.single_transformer_blocks = stack_modules(lambda r: flux.SingleBlock(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_single_layers, rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.patch_size_t * cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed (global) -> blocks (any contiguous shard of the video tokens; the text as the context) -> head --

    def grid(self, shape) -> tuple[int, int, int]:
        _, _, f, h, w = shape
        return f // self.cfg.patch_size_t, h // self.cfg.patch_size, w // self.cfg.patch_size

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
              guidance=None, rope=None):
        """-> (video (B, N, D), tokens {"rope": (cos, sin) (N, head_dim)}, cond {"temb", "context" (B, L, D),
        "context_mask" bool (B, L)}). ``rope``: the tables ready made (else computed on the host from the
        latents' static shape)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        # timestep and guidance stay float32 into the sinusoids (diffusers: the model dtype's)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("This HunyuanVideo transformer embeds the guidance (guidance_embeds): pass guidance.")
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,))
        temb = self.time_text_embed(t, guidance, jnp.asarray(pooled_projections).astype(dtype))
        mask = jnp.asarray(encoder_attention_mask) != 0
        context = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype), t, mask)
        x = self.x_embedder.proj(jnp.transpose(jnp.asarray(hidden_states).astype(dtype), (0, 2, 3, 4, 1)))
        x = x.reshape(b, -1, cfg.inner_dim)
        if rope is None:
            rope = rope_tables(*self.grid(hidden_states.shape), cfg.rope_axes_dim, cfg.rope_theta)
        rope = tuple(jnp.asarray(a, jnp.float32) for a in rope)
        tokens = {"rope": rope}
        cond = {"temb": temb, "context": context, "context_mask": text_key_mask(encoder_attention_mask)}
        if cfg.image_condition_type == "token_replace":
            f, h, w = self.grid(hidden_states.shape)
            tokens["first"] = jnp.asarray(np.arange(f * h * w) < h * w, jnp.float32)
            cond["tr_temb"] = self.time_text_embed.token_replace(jnp.zeros_like(t),
                                                                jnp.asarray(pooled_projections).astype(dtype))
        return x, tokens, cond

    def double_blocks(self, x, tokens, cond):
        """The double-stream stack; -> (video, text)."""
        temb, rope, mask = cond["temb"], tokens["rope"], cond["context_mask"]
        if "first" in tokens:
            return scan_modules(self.transformer_blocks, lambda blk, xc: token_replace_double(
                blk, *xc, temb, cond["tr_temb"], tokens["first"], rope, mask), (x, cond["context"]))
        return scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, temb, rope, None, mask),
                            (x, cond["context"]))

    def blocks(self, x, tokens, cond):
        """Both stacks on the video tokens (or a shard of them), the text joining each attention as the context
        (masked keys as diffusers'); -> the video tokens."""
        temb, rope, mask = cond["temb"], tokens["rope"], cond["context_mask"]
        xc = self.double_blocks(x, tokens, cond)
        if "first" in tokens:
            x, _ = scan_modules(self.single_transformer_blocks, lambda blk, xc: token_replace_single(
                blk, *xc, temb, cond["tr_temb"], tokens["first"], rope, mask), xc)
            return x
        x, _ = scan_modules(self.single_transformer_blocks, lambda blk, xc: blk.pair(*xc, temb, rope, None, mask), xc)
        return x

    def head(self, x, cond, shape):
        """Video tokens -> the prediction (B, out_channels, F, H, W) of the latents' ``shape``."""
        cfg = self.cfg
        f, h, w = self.grid(shape)
        pt, p = cfg.patch_size_t, cfg.patch_size
        scale, shift = jnp.split(self.norm_out_linear(jax.nn.silu(cond["temb"]).astype(x.dtype)), 2, axis=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
        x = x.reshape(shape[0], f, h, w, -1, pt, p, p)
        return jnp.transpose(x, (0, 4, 1, 5, 2, 6, 3, 7)).reshape(shape[0], -1, f * pt, h * p, w * p)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                 guidance=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                     pooled_projections, guidance)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: HunyuanVideoConfig) -> dict:
    """PipeFusion's stacks (as FLUX's): double-, then single-stream; and the text's ``cond`` keys."""
    return dict(stacked=STACKS, stacked_layers=(cfg.num_layers, cfg.num_single_layers), text_keys=TEXT_KEYS)


TORCH_RENAMES = [
    # the refiner's blocks: flat here, under token_refiner (and their attention under attn) in diffusers
    (r"^context_embedder\.refiner_blocks\.(\d+)\.(to_q|to_k|to_v|to_out)\.",
     r"context_embedder.token_refiner.refiner_blocks.\1.attn.\2."),
    (r"^context_embedder\.refiner_blocks\.(\d+)\.norm_out_linear\.",
     r"context_embedder.token_refiner.refiner_blocks.\1.norm_out.linear."),
    (r"^context_embedder\.refiner_blocks\.", "context_embedder.token_refiner.refiner_blocks."),
    (r"^norm_out_linear\.", "norm_out.linear."),
    (r"\.attn\.to_out\.", ".attn.to_out.0."),
    (r"\.(ff|ff_context)\.net_0\.", r".\1.net.0.proj."),
    (r"\.(ff|ff_context)\.net_2\.", r".\1.net.2."),
]


def params_from_torch(flat: dict, cfg: HunyuanVideoConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: HunyuanVideoTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers,
                                   REFINER: cfg.num_refiner_layers},
                          renames=TORCH_RENAMES, dtype=dtype, what="HunyuanVideo transformer checkpoint")


def build(cfg: HunyuanVideoConfig, params: dict, dtype=jnp.float32) -> HunyuanVideoTransformer3DModel:
    return build_module(lambda: HunyuanVideoTransformer3DModel(cfg, dtype=dtype), params)
