"""Stable Diffusion 3 / 3.5 transformer (diffusers ``SD3Transformer2DModel``, MMDiT) in Flax NNX.

Every block is a two-stream *joint* block (diffusers ``JointTransformerBlock``): the image and the
text tokens (both ``heads x head_dim`` wide) keep their own weights (AdaLN-Zero norms, q/k/v,
output, MLP) and meet in one joint attention over ``[image; text]`` (no text mask: SD3 attends to
all 333 CLIP + T5 tokens). As in Mochi and FLUX's double-stream phase, the parallel engine shards
the image tokens; the text (sharded in slices of its own, :data:`TEXT_KEYS`, or whole) joins each
attention as a *context*
(:func:`xdit_jax.parallel.attention.attention` with ``context=``).

The last block is ``context_pre_only`` (its text norm is an ``AdaLayerNormContinuous``; no text
output, no text MLP) and is its own module, as Mochi's. The others are stacked and run with
``lax.scan``; blocks listed in ``dual_attention_layers`` (SD3.5 Medium: 0..12) add a second
self-attention ``attn2`` over the image tokens only, modulated by ``SD35AdaLayerNormZeroX`` (9
chunks). Since a stack holds alike layers, the non-last blocks are stacked in *runs* of
consecutive blocks of the same kind: ``transformer_blocks`` (the first run; the only one for SD3 /
SD3.5 Large), ``transformer_blocks_part1``, ... (``SD3Transformer2DModel.runs`` lists them).
``qk_norm``: ``None`` (SD3 Medium) or ``"rms_norm"`` (SD3.5) on q/k and the text's added q/k.

Positions: a fixed 2D sin-cos table over a ``pos_embed_max_size``² grid (positions ``i *
base / max``, ``base = sample_size / patch_size``), cropped at the centre to the latent's grid
(diffusers ``PatchEmbed.cropped_pos_embed``): the checkpoint's stored table, as diffusers loads it
(:func:`pos_table` computes it where a checkpoint has none), added in :meth:`embed`, so the blocks
need no per-token tables.

PipeFusion splits the stacked blocks into stages; each image patch carries a slice of the text stream
through them (:mod:`xdit_jax.parallel.pipefusion`, :data:`TEXT_KEYS`), and the last block runs on the last
stage (:func:`xdit_jax.models.layers.final_block`). SD3.5 Medium's runs are PipeFusion's stacks (each split
over all the stages, looped), and its dual-attention blocks keep two K/V buffers each
(:func:`pipefusion_stacks`).
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
from xdit_jax.models.flux import TextProjection
from xdit_jax.models.layers import (
    FeedForward,
    LayerNorm,
    RMSNorm,
    TimestepEmbedding,
    final_block,
    linear,
    scan_modules,
    sincos_1d,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"
# The text stream in ``cond`` (CLIP + T5 states): sliced with PipeFusion's patches, sharded over the sequence group
TEXT_KEYS = ("context",)
QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3Config(TransformerDims):
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SD3Config:
        d = dict(d)
        if d.get("dual_attention_layers") is not None:
            d["dual_attention_layers"] = tuple(int(i) for i in d["dual_attention_layers"])
        else:
            d.pop("dual_attention_layers", None)
        cfg = cls(**known_fields(cls, d))
        if cfg.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={cfg.qk_norm!r} is not supported (SD3 uses None, SD3.5 'rms_norm').")
        if cfg.num_layers < 2:
            raise ValueError(f"num_layers={cfg.num_layers}: an SD3 transformer has at least 2 blocks.")
        if cfg.caption_projection_dim != cfg.inner_dim:
            raise ValueError(f"caption_projection_dim={cfg.caption_projection_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {cfg.inner_dim} (the joint blocks give both streams that width, "
                             "as every SD3 checkpoint does).")
        bad = [i for i in cfg.dual_attention_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are not block indices (num_layers={cfg.num_layers}).")
        if not cfg.pos_embed_max_size:
            raise ValueError("pos_embed_max_size must be set (every SD3 checkpoint crops its position table).")
        return cfg


    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    def runs(self) -> tuple[tuple[str, int, int, bool], ...]:
        """The stacked runs of the non-last blocks: (Flax name, first block index, count, dual)."""
        dual = [i in self.dual_attention_layers for i in range(self.num_layers - 1)]
        out, start = [], 0
        for i in range(1, len(dual) + 1):
            if i == len(dual) or dual[i] != dual[start]:
                name = STACKED if not out else f"{STACKED}_part{len(out)}"
                out.append((name, start, i - start, dual[start]))
                start = i
        return tuple(out)


def _fp16_clip(x):
    """Guard for float16 (as FLUX's): clip the text stream to fp16's finite range; no-op otherwise."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


# ----- norms -----

class AdaNormZero(nnx.Module):
    """diffusers ``AdaLayerNormZero`` (6 chunks) / ``SD35AdaLayerNormZeroX`` (9): LayerNorm without
    affine (statistics in float32), modulated by the conditioning. Returns (x modulated by
    (shift_msa, scale_msa), [gate_msa, shift_mlp, scale_mlp, gate_mlp], and for 9 chunks the same
    normed x modulated by (shift_msa2, scale_msa2) with gate_msa2, else None)."""

    def __init__(self, dim: int, chunks: int, *, dtype, rngs):
        self.chunks = chunks
        self.linear = linear(dim, chunks * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, 1e-6, affine=False, dtype=dtype)

    def __call__(self, x, temb):
        m = jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)
        n = self.norm(x)
        mod = lambda shift, scale: n * (1 + scale[:, None]) + shift[:, None]
        second = (mod(m[6], m[7]), m[8]) if self.chunks == 9 else None
        return mod(m[0], m[1]), m[2:6], second


class AdaNormContinuous(nnx.Module):
    """diffusers ``AdaLayerNormContinuous(elementwise_affine=False, eps=1e-6)``: note (scale, shift) order."""

    def __init__(self, dim: int, cond_dim: int, *, dtype, rngs):
        self.linear = linear(cond_dim, 2 * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, 1e-6, affine=False, dtype=dtype)

    def __call__(self, x, temb):
        scale, shift = jnp.split(self.linear(jax.nn.silu(temb).astype(x.dtype)), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


# ----- the blocks -----

def _heads(y, head_dim: int):
    return y.reshape(*y.shape[:2], -1, head_dim)


def _flat(y):
    return y.reshape(*y.shape[:2], -1)


class Attention(nnx.Module):
    """diffusers ``Attention`` + ``JointAttnProcessor2_0``. ``joint``: the text's added k/v (and q with
    its output projection unless ``context_out`` is False: the last block's text queries, which
    diffusers computes and throws away, are not built); without ``joint``: plain self-attention
    (SD3.5's ``attn2``)."""

    def __init__(self, cfg: SD3Config, *, joint: bool, context_out: bool, dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.head_dim, self.joint, self.context_out = hd, joint, context_out
        rms = cfg.qk_norm == "rms_norm"
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, dtype=dtype) if rms else None
        self.norm_k = RMSNorm(hd, dtype=dtype) if rms else None
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        if joint:
            self.add_k_proj = linear(d, d, dtype=dtype, rngs=rngs)
            self.add_v_proj = linear(d, d, dtype=dtype, rngs=rngs)
            self.norm_added_k = RMSNorm(hd, dtype=dtype) if rms else None
            if context_out:
                self.add_q_proj = linear(d, d, dtype=dtype, rngs=rngs)
                self.norm_added_q = RMSNorm(hd, dtype=dtype) if rms else None
                self.to_add_out = linear(d, d, dtype=dtype, rngs=rngs)

    @staticmethod
    def _proj(proj, norm, x, hd):
        y = _heads(proj(x), hd)
        return y if norm is None else norm(y)

    def __call__(self, x, c=None):
        """Image ``x`` (sharded), text ``c`` (whole; None for plain self-attention) -> (image out,
        text out or None)."""
        hd = self.head_dim
        q = self._proj(self.to_q, self.norm_q, x, hd)
        k = self._proj(self.to_k, self.norm_k, x, hd)
        v = _heads(self.to_v(x), hd)
        if c is None:
            return self.to_out(_flat(attention(q, k, v))), None
        ck = self._proj(self.add_k_proj, self.norm_added_k, c, hd)
        cv = _heads(self.add_v_proj(c), hd)
        cq = self._proj(self.add_q_proj, self.norm_added_q, c, hd) if self.context_out else None
        o, oc = attention(q, k, v, context=(cq, ck, cv, None))  # SD3 attends to every text token
        return self.to_out(_flat(o)), (self.to_add_out(_flat(oc)) if self.context_out else None)


class JointBlock(nnx.Module):
    """diffusers ``JointTransformerBlock``; ``last``: ``context_pre_only``; ``dual``: ``use_dual_attention``."""

    def __init__(self, cfg: SD3Config, *, last: bool = False, dual: bool = False, dtype, rngs):
        d = cfg.inner_dim
        self.last, self.dual = last, dual
        self.norm1 = AdaNormZero(d, 9 if dual else 6, dtype=dtype, rngs=rngs)
        if last:
            self.norm1_context = AdaNormContinuous(d, d, dtype=dtype, rngs=rngs)
        else:
            self.norm1_context = AdaNormZero(d, 6, dtype=dtype, rngs=rngs)
            self.norm2_context = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
            self.ff_context = FeedForward(d, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, joint=True, context_out=not last, dtype=dtype, rngs=rngs)
        if dual:
            self.attn2 = Attention(cfg, joint=False, context_out=False, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff = FeedForward(d, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, temb):
        nx, (gate_msa, shift_mlp, scale_mlp, gate_mlp), second = self.norm1(x, temb)
        if self.last:
            nc = self.norm1_context(c, temb)
        else:
            nc, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp), _ = self.norm1_context(c, temb)
        a, ac = self.attn(nx, nc)
        x = x + gate_msa[:, None] * a
        if self.dual:
            nx2, gate_msa2 = second
            x = x + gate_msa2[:, None] * self.attn2(nx2)[0]
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        if self.last:
            return x, None
        c = c + c_gate_msa[:, None] * ac
        c = c + c_gate_mlp[:, None] * self.ff_context(self.norm2_context(c) * (1 + c_scale_mlp[:, None])
                                                      + c_shift_mlp[:, None])
        return x, _fp16_clip(c)


# ----- embeddings -----

class TimeTextEmbed(nnx.Module):
    """diffusers ``CombinedTimestepTextProjEmbeddings``: MLP(256-sinusoid of t) + MLP(pooled text)."""

    def __init__(self, cfg: SD3Config, *, dtype, rngs):
        self.timestep_embedder = TimestepEmbedding(256, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.text_embedder = TextProjection(cfg.pooled_projection_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, pooled):
        proj = timestep_embedding(timestep, 256, flip_sin_to_cos=True).astype(pooled.dtype)
        return self.timestep_embedder(proj) + self.text_embedder(pooled)


class PatchEmbed(nnx.Module):
    """diffusers ``PatchEmbed``: the patchify conv and the position table ``pos_embed`` (1, max², D) — the
    checkpoint's own (a persistent buffer in diffusers; :func:`pos_table` where a checkpoint lacks it),
    centre-cropped for the latent's grid in :meth:`crop`."""

    def __init__(self, cfg: SD3Config, *, dtype, rngs):
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        self.max_size = m
        self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                             dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, m * m, cfg.inner_dim), dtype))

    def crop(self, grid_h: int, grid_w: int):
        """diffusers ``cropped_pos_embed``: the centre (grid_h x grid_w) of the table, (grid_h * grid_w, D)."""
        m = self.max_size
        top, left = (m - grid_h) // 2, (m - grid_w) // 2
        table = self.pos_embed[...].reshape(m, m, -1)[top:top + grid_h, left:left + grid_w]
        return table.reshape(grid_h * grid_w, -1)


def pos_table(dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int) -> np.ndarray:
    """diffusers ``PatchEmbed.cropped_pos_embed``: the centre ``grid_h x grid_w`` crop of the 2D sin-cos
    table over a ``max_size``² grid (``get_2d_sincos_pos_embed(dim, max_size, base_size)``), as
    (grid_h * grid_w, dim) float32, tokens row-major; the first half encodes the column, the second
    the row. Positions in float32 (``arange / (max / base)``, as torch), sinusoids in float64."""
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(f"A latent grid of {grid_h}x{grid_w} patches exceeds pos_embed_max_size={max_size}.")
    pos = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    ww, hh = np.meshgrid(pos[left:left + grid_w], pos[top:top + grid_h], indexing="xy")  # (grid_h, grid_w)
    table = np.concatenate([sincos_1d(dim // 2, ww.reshape(-1)), sincos_1d(dim // 2, hh.reshape(-1))], axis=1)
    return table.astype(np.float32)


class SD3Transformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, pooled_projections, timestep)`` as diffusers'
    forward: latents (B, C, H, W), text states (B, L, joint_attention_dim), pooled text
    (B, pooled_projection_dim), timestep (B,) in [0, 1000] (the scheduler's t). Returns (B, C_out, H, W)."""

    def __init__(self, cfg: SD3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(cfg.joint_attention_dim, d, dtype=dtype, rngs=rngs)
        self.runs = cfg.runs()
        for name, _, count, dual in self.runs:
            setattr(self, name, stack_modules(lambda r, dual=dual: JointBlock(cfg, dual=dual, dtype=dtype, rngs=r),
                                              count, rngs))
        self.last_block = JointBlock(cfg, last=True, dual=(cfg.num_layers - 1) in cfg.dual_attention_layers,
                                     dtype=dtype, rngs=rngs)
        self.norm_out = AdaNormContinuous(d, d, dtype=dtype, rngs=rngs)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed (global) -> blocks (any contiguous shard of the image tokens, text whole) -> head (global) --

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """-> (image (B, N, D) with positions added, tokens {} (no per-token tables), cond {"temb" (B, D),
        "context" (B, L, D)})."""
        cfg, dtype = self.cfg, self.dtype
        b, _, h, w = hidden_states.shape
        check_input_shape(cfg, h, w)
        p = cfg.patch_size
        gh, gw = h // p, w // p
        x = self.pos_embed.proj(hidden_states.astype(dtype).transpose(0, 2, 3, 1)).reshape(b, gh * gw, -1)
        x = (x.astype(jnp.float32) + self.pos_embed.crop(gh, gw).astype(jnp.float32)[None]).astype(dtype)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        temb = self.time_text_embed(t, jnp.asarray(pooled_projections).astype(dtype))
        c = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype))
        return x, {}, {"temb": temb, "context": c}

    def blocks(self, x, tokens, cond, skip_layers=()):
        """The stacked runs (one lax.scan each) then the last block, on the image tokens or a shard of
        them; the text stream is carried along whole. Returns the image tokens. ``skip_layers``: block
        indices left out (diffusers' ``skip_layers``, for skip-layer guidance): both streams pass them
        unchanged (a static choice: the scans run over the blocks in between)."""
        temb = cond["temb"]
        skip = frozenset(int(i) for i in skip_layers)
        xc = (x, cond["context"])
        for name, first, count, _ in self.runs:
            start = first
            for i in range(first, first + count + 1):  # scan each run of kept blocks
                if i == first + count or i in skip:
                    if i > start:
                        xc = scan_modules(getattr(self, name), lambda blk, s: blk(*s, temb), xc,
                                          layers=None if (start, i) == (first, first + count)
                                          else (start - first, i - first))
                    start = i + 1
        if self.cfg.num_layers - 1 in skip:
            return xc[0]
        return final_block(lambda xc: self.last_block(*xc, temb)[0], xc)

    def head(self, x, cond, shape):
        """Image tokens -> the prediction (B, C_out, H, W) (``shape``: the latents')."""
        b, _, h, w = shape
        p = self.cfg.patch_size
        x = self.proj_out(self.norm_out(x, cond["temb"]))
        x = x.reshape(b, h // p, w // p, p, p, -1)
        return jnp.transpose(x, (0, 5, 1, 3, 2, 4)).reshape(b, -1, h, w)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: SD3Config) -> dict:
    """PipeFusion's view of the block stack (keyword arguments of the pipelines' ``_init_parts``): the
    stacked runs in order (``stacked`` names, ``stacked_layers``), the attentions each run's blocks make
    (``stack_attentions``: 2 for dual attention) and the last block's (``tail_attentions``); the text's
    ``cond`` keys (:data:`TEXT_KEYS`)."""
    runs = cfg.runs()
    one = len(runs) == 1
    return dict(stacked=runs[0][0] if one else tuple(r[0] for r in runs),
                stacked_layers=runs[0][2] if one else tuple(r[2] for r in runs),
                stack_attentions=tuple(2 if r[3] else 1 for r in runs),
                tail_attentions=2 if cfg.num_layers - 1 in cfg.dual_attention_layers else 1,
                text_keys=TEXT_KEYS)


def check_input_shape(cfg: SD3Config, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    p, m = cfg.patch_size, cfg.pos_embed_max_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")
    if latent_h // p > m or latent_w // p > m:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} exceed the position table: at most "
                         f"{m * p} latent pixels ({m * p * 8} image pixels) per side (pos_embed_max_size={m}).")


def _torch_names(cfg: SD3Config):
    last = f"transformer_blocks.{cfg.num_layers - 1}."
    renames = [
        (r"^last_block\.", last),
        (r"\.(attn|attn2)\.to_out\.", r".\1.to_out.0."),
        (r"\.(ff|ff_context)\.net_0\.", r".\1.net.0.proj."),
        (r"\.(ff|ff_context)\.net_2\.", r".\1.net.2."),
    ]
    ignore = [
        # the last block's text queries: computed by diffusers, their output thrown away
        rf"^{last.replace('.', chr(92) + '.')}attn\.(add_q_proj|norm_added_q)\.",
    ]
    stacked = {name: (STACKED, first, count) for name, first, count, _ in cfg.runs()}
    return renames, ignore, stacked


def params_from_torch(flat: dict, cfg: SD3Config, dtype=None) -> dict:
    """The params of a torch state dict; its position table ``pos_embed.pos_embed`` as stored (diffusers
    loads that buffer; computed by :func:`pos_table` where a checkpoint has none)."""
    renames, ignore, stacked = _torch_names(cfg)
    if "pos_embed.pos_embed" not in flat:
        m = cfg.pos_embed_max_size
        flat = {**flat, "pos_embed.pos_embed": pos_table(cfg.inner_dim, m, m, m, cfg.base_size)[None]}
    return map_state_dict(flat, expected_shapes(lambda: SD3Transformer2DModel(cfg)), stacked=stacked,
                          renames=renames, ignore=ignore, dtype=dtype, what="SD3 transformer checkpoint")


def build(cfg: SD3Config, params: dict, dtype=jnp.float32) -> SD3Transformer2DModel:
    return build_module(lambda: SD3Transformer2DModel(cfg, dtype=dtype), params)
