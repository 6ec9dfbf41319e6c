"""SANA transformer (diffusers ``SanaTransformer2DModel``, the text-to-image path) in Flax NNX.

Patch tokens (Conv2d patch embed, sin-cos positions only where the config has an ``interpolation_scale``);
AdaLN-single timestep modulation (the PixArt module, without size conditions); the caption projected
(tanh-GELU MLP) and RMS-normed. Each block: modulated LayerNorm -> linear self-attention with the ReLU
kernel (SanaLinearAttnProcessor2_0) -> gated residual; softmax cross-attention of the un-normed tokens to
the masked caption; modulated LayerNorm -> GLUMBConv (1x1 expand conv, SiLU, depthwise 3x3 conv on the
2-D token grid, GLU with SiLU gate, 1x1 conv) -> gated residual. Head: LayerNorm modulated by
``scale_shift_table + embedded timestep``, linear, unpatchify.

Token mixing goes through ops in :mod:`xdit_jax.parallel`: the linear attention and the grid convolution
through :mod:`xdit_jax.parallel.token_mixing` (a psum of K^T V and sum K; a row halo exchange), the
cross-attention through :func:`xdit_jax.parallel.attention.cross_attention` (local). No collective here.
The blocks are stacked on a leading layer axis and run with one ``lax.scan``.

PipeFusion needs nothing here: the ops keep its buffers (:mod:`xdit_jax.parallel.token_mixing`).

SANA 1.5 / Sprint: ``qk_norm="rms_norm_across_heads"`` puts an RMSNorm (eps 1e-5, weight) over each token's whole
q and k projection in both attentions (per token, so local on any sequence shard and in PipeFusion's patches).
Sprint's ``guidance_embeds``: the timestep embedder's output plus a guidance embedder's (the pipeline passes
``guidance_scale * guidance_embeds_scale``; pass ``guidance=`` to the model). ``timestep_scale`` is read by the
pipelines (SanaPipeline multiplies the timestep by it, as diffusers; its Sprint pipeline does not), never here.

Refused (clear errors): other qk_norm kinds, ControlNet inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.config_util import TransformerDims, known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import (
    LayerNorm,
    PixArtAlphaTextProjection,
    RMSNorm,
    TimestepEmbedding,
    linear,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.models.pixart import TIME_PROJ_DIM, AdaLayerNormSingle, sincos_2d_table, text_key_mask
from xdit_jax.parallel.attention import cross_attention
from xdit_jax.parallel.token_mixing import grid_conv3x3, linear_attention

STACKED = "transformer_blocks"


@dataclasses.dataclass(frozen=True)
class SanaConfig(TransformerDims):
    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SanaConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.qk_norm not in QK_NORMS:
            # diffusers' other kinds normalize over dim_head (or are LayerNorms) where SANA's processors hand the
            # norm the (B, S, heads * dim_head) projection: only the across-heads RMSNorm is what checkpoints use.
            raise ValueError(f"qk_norm={cfg.qk_norm!r} is not supported; supported: None, 'rms_norm_across_heads' "
                             "(SANA 1.5 / Sprint).")
        if cfg.cross_attention_dim is None:
            raise ValueError("A SANA transformer without cross-attention (cross_attention_dim=None) is not supported.")
        if cfg.num_cross_attention_heads * cfg.cross_attention_head_dim != cfg.inner_dim:
            raise ValueError(f"num_cross_attention_heads x cross_attention_head_dim = "
                             f"{cfg.num_cross_attention_heads * cfg.cross_attention_head_dim} must equal the inner dim "
                             f"{cfg.inner_dim} (the cross-attention's output is added to the tokens).")
        if cfg.cross_attention_dim != cfg.inner_dim:
            raise ValueError(f"cross_attention_dim={cfg.cross_attention_dim} must equal the inner dim {cfg.inner_dim}: "
                             "the caption projection outputs that width.")
        return cfg

    @property
    def additional_conditions(self) -> bool:  # for pixart.AdaLayerNormSingle: no size conditions
        return False

    @property
    def ff_hidden(self) -> int:
        return int(self.mlp_ratio * self.inner_dim)


# q/k norms of both attentions: diffusers' ``Attention(qk_norm=...)``; "rms_norm_across_heads" is an RMSNorm (eps
# 1e-5, with weight) over the whole (heads * dim_head) projection of each token.
QK_NORMS = (None, "rms_norm_across_heads")

TORCH_RENAMES = [(r"\.to_out\.", ".to_out.0.")]
TORCH_IGNORE = [r"^patch_embed\.pos_embed$"]


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Conv1x1(nnx.Module):
    """A 1x1 ``nn.Conv2d`` on tokens: a linear (leaf ``kernel`` (1, 1, in, out) as the conv's, so the key map's
    conv rule converts the torch weight)."""

    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (1, 1, din, dout), dtype) * din ** -0.5)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...][0, 0].astype(x.dtype)
        return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


class DepthwiseConv3x3(nnx.Module):
    """``nn.Conv2d(c, c, 3, 1, 1, groups=c)`` on the token grid (leaf ``kernel`` (3, 3, 1, c))."""

    def __init__(self, c: int, *, dtype, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (3, 3, 1, c), dtype) / 3.0)
        self.bias = nnx.Param(jnp.zeros((c,), dtype))

    def __call__(self, x, grid):
        return grid_conv3x3(x, self.kernel[...][:, :, 0], self.bias[...], grid=grid)


class GLUMBConv(nnx.Module):
    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        d, hid = cfg.inner_dim, cfg.ff_hidden
        self.conv_inverted = Conv1x1(d, 2 * hid, bias=True, dtype=dtype, rngs=rngs)
        self.conv_depth = DepthwiseConv3x3(2 * hid, dtype=dtype, rngs=rngs)
        self.conv_point = Conv1x1(hid, d, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, grid):
        h = self.conv_depth(jax.nn.silu(self.conv_inverted(x)), grid)
        h, gate = jnp.split(h, 2, axis=-1)
        return self.conv_point(h * jax.nn.silu(gate))


def _qk_norms(cfg: SanaConfig, d: int, dtype):
    if cfg.qk_norm is None:
        return None, None
    return RMSNorm(d, 1e-5, dtype=dtype), RMSNorm(d, 1e-5, dtype=dtype)


def _apply_qk_norms(attn, q, k):
    if attn.norm_q is None:
        return q, k
    return attn.norm_q(q), attn.norm_k(k)


class LinearSelfAttention(nnx.Module):
    """``Attention`` with SanaLinearAttnProcessor2_0: ReLU(q), ReLU(k), linear attention (float32)."""

    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.to_q = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm_q, self.norm_k = _qk_norms(cfg, d, dtype)

    def __call__(self, x):
        b, s, _ = x.shape
        heads = lambda y: y.reshape(b, s, self.heads, -1)  # noqa: E731
        q, k = _apply_qk_norms(self, self.to_q(x), self.to_k(x))  # per token: local on any sequence shard
        q, k, v = jax.nn.relu(heads(q)), jax.nn.relu(heads(k)), heads(self.to_v(x))
        return self.to_out(linear_attention(q, k, v).reshape(b, s, -1))


class CrossAttention(nnx.Module):
    """``Attention`` with SanaAttnProcessor2_0 (bias on q/k/v and out): the tokens attend to the caption."""

    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.heads = cfg.num_cross_attention_heads
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(cfg.cross_attention_dim, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(cfg.cross_attention_dim, d, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm_q, self.norm_k = _qk_norms(cfg, d, dtype)  # kv_heads = heads in diffusers: both over d

    def __call__(self, x, context, context_mask):
        b, s, _ = x.shape
        heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1)  # noqa: E731
        q, k = _apply_qk_norms(self, self.to_q(x), self.to_k(context))
        o = cross_attention(heads(q), heads(k), heads(self.to_v(context)), kv_mask=context_mask)
        return self.to_out(o.reshape(b, s, -1))


class SanaCombinedTimestepGuidanceEmbeddings(nnx.Module):
    """Sana Sprint's ``time_embed`` (``guidance_embeds=True``): sinusoids (256, cos first) of the timestep and of
    the guidance, each through its own TimestepEmbedding, summed -> (the (B, 6D) modulation ``linear(silu(.))``,
    the sum as the embedded timestep). The guidance arrives already scaled (``guidance_embeds_scale``: the
    pipeline's multiply, as diffusers')."""

    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, d, dtype=dtype, rngs=rngs)
        self.guidance_embedder = TimestepEmbedding(TIME_PROJ_DIM, d, dtype=dtype, rngs=rngs)
        self.linear = linear(d, 6 * d, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, guidance):
        proj = lambda v: timestep_embedding(v, TIME_PROJ_DIM, True, 0).astype(self.dtype)  # noqa: E731
        cond = self.timestep_embedder(proj(timestep)) + self.guidance_embedder(proj(guidance))
        return self.linear(jax.nn.silu(cond)), cond


class SanaTransformerBlock(nnx.Module):
    # the self-attention and feed-forward modules (SANA-Video's block takes its own: RoPE, the frame conv)
    SELF_ATTENTION = LinearSelfAttention
    FEED_FORWARD = GLUMBConv

    def __init__(self, cfg: SanaConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = LayerNorm(d, cfg.norm_eps, False, dtype=dtype)
        self.attn1 = self.SELF_ATTENTION(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, cfg.norm_eps, cfg.norm_elementwise_affine, dtype=dtype)
        self.attn2 = CrossAttention(cfg, dtype=dtype, rngs=rngs)
        self.ff = self.FEED_FORWARD(cfg, dtype=dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(jnp.zeros((6, d), dtype))

    def __call__(self, x, cond, rope=None, first=None):
        """x: the image tokens (B, S, D) or this device's shard of them (padded); cond: see ``embed``; ``rope``:
        the self-attention's (cos, sin) tables of these tokens (SANA-Video), or None; ``first``: (S,) 1 where a token
        takes ``cond["timestep_first"]``'s modulation instead (SANA-Video image-to-video's first frame), or None."""
        b = x.shape[0]
        grid = tuple(cond["grid"].shape[1:-1])  # (H, W), or SANA-Video's (F, H, W)
        mod = self.scale_shift_table[...][None] + cond["timestep"].reshape(b, 6, -1)
        mods = jnp.split(mod.astype(x.dtype), 6, axis=1)
        if first is not None:  # per token: the first frame's modulation where marked
            mod0 = self.scale_shift_table[...][None] + cond["timestep_first"].reshape(b, 6, -1)
            mods = [jnp.where(first[None, :, None] > 0, m0, m) for m0, m in
                    zip(jnp.split(mod0.astype(x.dtype), 6, axis=1), mods)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * (self.attn1(h) if rope is None else self.attn1(h, rope))
        x = x + self.attn2(x, cond["context"], cond["context_mask"])  # un-normed tokens, as diffusers
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp, grid)


class SanaTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)`` as diffusers' forward.

    hidden_states: (B, C, H, W) latents; encoder_hidden_states: (B, L, caption_channels); timestep: (B,) or a
    scalar; encoder_attention_mask: (B, L), 1/True = keep. Returns (B, out_channels, H, W).
    """

    def __init__(self, cfg: SanaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_embed = (SanaCombinedTimestepGuidanceEmbeddings(cfg, dtype=dtype, rngs=rngs) if cfg.guidance_embeds
                           else AdaLayerNormSingle(cfg, dtype=dtype, rngs=rngs))
        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_channels, d, dtype=dtype, rngs=rngs)
        self.caption_norm = RMSNorm(d, 1e-5, dtype=dtype)
        self.transformer_blocks = stack_modules(lambda r: SanaTransformerBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((2, d), dtype))
        self.proj_out = linear(d, cfg.patch_size * cfg.patch_size * cfg.out_ch, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None):
        """-> (x, tokens, cond). x: (B, S, D) image tokens, row-major over the (H/p, W/p) grid. tokens: ``{}``.
        cond (batch first): ``timestep`` (B, 6D), ``embedded_timestep`` (B, D), ``context`` (B, L, D),
        ``context_mask`` (B, L) bool, ``grid`` (B, H/p, W/p, 0): an empty array whose static shape carries
        the token grid to the blocks' convolution (it travels with the batch through the mesh)."""
        cfg, dtype = self.cfg, self.dtype
        b, c, h, w = hidden_states.shape
        check_input_shape(cfg, c, h, w)
        p = cfg.patch_size
        gh, gw = h // p, w // p
        x = self.patch_embed.proj(hidden_states.astype(dtype).transpose(0, 2, 3, 1)).reshape(b, gh * gw, -1)
        if cfg.interpolation_scale is not None:
            pos = sincos_2d_table(cfg.inner_dim, gh, gw, cfg.sample_size // p, cfg.interpolation_scale)
            x = (x.astype(jnp.float32) + jnp.asarray(pos)[None]).astype(dtype)
        cond = self.embed_conditions(b, encoder_hidden_states, timestep, encoder_attention_mask, guidance)
        cond["grid"] = jnp.zeros((b, gh, gw, 0), dtype)
        return x, {}, cond

    def embed_conditions(self, b: int, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None):
        """``embed``'s cond without the grid: the timestep's modulation and embedding, the projected caption and its
        key mask (SANA-Video's the same)."""
        cfg, dtype = self.cfg, self.dtype
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("This SANA transformer embeds the guidance (guidance_embeds=True, Sana Sprint): "
                                 "pass guidance (the scale times guidance_embeds_scale).")
            t6, embedded = self.time_embed(t, jnp.broadcast_to(jnp.asarray(guidance).reshape(-1), (b,)))
        else:
            # diffusers' forward takes the plain path only when guidance is None; a guidance passed to a model
            # without the embedder fails there (AdaLayerNormSingle has no such argument): refused here too.
            if guidance is not None:
                raise ValueError("guidance was given, but this SANA transformer has no guidance embedding "
                                 "(guidance_embeds=False).")
            t6, embedded = self.time_embed(t, None, None, b)
        context = self.caption_projection(encoder_hidden_states.astype(dtype)).reshape(b, -1, cfg.inner_dim)
        context = self.caption_norm(context)
        return {"timestep": t6, "embedded_timestep": embedded, "context": context,
                "context_mask": text_key_mask(encoder_attention_mask, b, context.shape[1])}

    def blocks(self, x, tokens, cond):
        del tokens
        return scan_modules(self.transformer_blocks, lambda blk, y: blk(y, cond), x)

    def head(self, x, cond, shape):
        cfg = self.cfg
        b, _, h, w = shape
        p = cfg.patch_size
        mod = self.scale_shift_table[...][None] + cond["embedded_timestep"][:, None]
        shift, scale = jnp.split(mod.astype(x.dtype), 2, axis=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(b, h // p, w // p, p, p, cfg.out_ch).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(b, cfg.out_ch, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                                     guidance)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def check_input_shape(cfg: SanaConfig, channels: int, latent_h: int, latent_w: int) -> None:
    if channels != cfg.in_channels:
        raise ValueError(f"Latents have {channels} channels; this SANA transformer takes {cfg.in_channels}.")
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p}.")


def params_from_torch(flat: dict, cfg: SanaConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: SanaTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=TORCH_IGNORE,
                          dtype=dtype, what="SANA transformer checkpoint")


def build(cfg: SanaConfig, params: dict, dtype=jnp.float32) -> SanaTransformer2DModel:
    return build_module(lambda: SanaTransformer2DModel(cfg, dtype=dtype), params)


__all__ = ["SanaConfig", "SanaTransformer2DModel", "build", "params_from_torch", "check_input_shape"]
