"""FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) in Flax NNX.

Two kinds of blocks, each stacked and run with one ``lax.scan``:

* ``transformer_blocks`` (double-stream, 19 in FLUX.1): the text and the image tokens keep their own
  weights (norms, q/k/v, output, MLP) and meet in one joint attention over ``[text; image]``. Here
  the image tokens are the sharded sequence and the text (512 T5 tokens) joins each attention as
  a *context* (whole, or in slices of its own: :data:`TEXT_KEYS`)
  (:func:`xdit_jax.parallel.attention.attention` with ``context=``), as Mochi's caption does.
  :meth:`FluxTransformer2DModel.double_blocks` returns both streams.
* ``single_transformer_blocks`` (single-stream, 38): one set of weights over the joint
  ``[text; image]`` sequence, which the parallel engine shards as one sequence (as CogVideoX's).

So a step runs the block stacks in two phases (:func:`xdit_jax.parallel.sequence.run_blocks` twice);
between them the text joins the sequence. RoPE (3 axes over (t, y, x) ids, theta 10000) is applied
to every token, text included (its ids are zeros in FluxPipeline: no rotation).

PipeFusion runs :meth:`FluxTransformer2DModel.blocks`: both stacks with the text held whole (each patch
carries it; the single-stream blocks take it as their attention's context), each stack split over all the
stages (:func:`xdit_jax.parallel.pipefusion.run_pipefusion`'s looped pipeline).
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
    RMSNorm,
    TimestepEmbedding,
    apply_rope,
    gelu_tanh,
    linear,
    rope_1d,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"
SINGLE = "single_transformer_blocks"
STACKS = (STACKED, SINGLE)  # PipeFusion's order: every stage holds part of both (a looped pipeline)
# The text stream in ``cond`` (the T5 states and their RoPE tables): sliced with PipeFusion's patches, sharded
# over the sequence group in the double-stream phase (xdit_jax.parallel.sequence.run_blocks' ``text``)
TEXT_KEYS = ("context", "context_rope")
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig(TransformerDims):
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FluxConfig:
        return checked_config(cls, d, "FLUX.1", "packs")


def checked_config(cls, d: dict[str, Any], model: str, patches: str):
    """A FLUX.1 / FLUX.2 transformer config ``cls`` from its config.json dict, checked: ``axes_dims_rope`` even
    sizes summing to the head dim, ``patch_size`` 1 (``patches``: what the ``model`` pipeline does to 2x2 latent
    patches itself), both block stacks there."""
    d = dict(d)
    if "axes_dims_rope" in d:
        d["axes_dims_rope"] = tuple(int(a) for a in d["axes_dims_rope"])
    cfg = cls(**known_fields(cls, d))
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim or any(a % 2 for a in cfg.axes_dims_rope):
        raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must be even and sum to attention_head_dim "
                         f"{cfg.attention_head_dim}.")
    if cfg.patch_size != 1:
        raise ValueError(f"patch_size={cfg.patch_size}: {model} checkpoints use 1 (the pipeline {patches} 2x2 latent "
                         "patches itself).")
    if cfg.num_layers < 1 or cfg.num_single_layers < 1:  # ("A FLUX transformer": FLUX.1's, also Chroma's)
        raise ValueError(f"A {model.removesuffix('.1')} transformer has at least one double- and one single-stream "
                         "block.")
    return cfg


class AdaNorm(nnx.Module):
    """diffusers ``AdaLayerNormZero`` (``chunks=6``) / ``AdaLayerNormZeroSingle`` (3): a LayerNorm
    without affine, shifted and scaled by the conditioning; returns (normed x, the other chunks)."""

    def __init__(self, dim: int, chunks: int, *, dtype, rngs):
        self.chunks = chunks
        self.linear = linear(dim, chunks * dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, 1e-6, affine=False, dtype=dtype)

    def modulation(self, temb):
        return jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)

    def __call__(self, x, temb, modulation=None):
        """``modulation``: :meth:`modulation` of ``temb`` computed once for two streams of the same weights."""
        shift, scale, *rest = self.modulation(temb) if modulation is None else modulation
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], rest


def mlp_dim(cfg) -> int:
    """The MLP width: diffusers' ``int(dim * mlp_ratio)`` (FLUX: 4; HunyuanVideo's config names it)."""
    return int(cfg.inner_dim * getattr(cfg, "mlp_ratio", 4.0))


def _fp16_clip(x):
    """diffusers' float16 guard (FLUX's activations overflow fp16): clip to its finite range."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


def _heads(y, head_dim: int):
    return y.reshape(*y.shape[:2], -1, head_dim)


class Attention(nnx.Module):
    """diffusers ``FluxAttention``: q/k/v with bias, per-head RMS norms; ``added``: the text stream's
    own projections (double-stream blocks); ``pre_only``: no output projection (single-stream)."""

    def __init__(self, cfg: FluxConfig, *, added: bool, pre_only: bool, dtype, rngs, bias: bool = True,
                 eps: float = 1e-6):
        """``bias=False``: no biases anywhere (FLUX.2's ``Flux2Attention``); ``eps``: the q/k RMS norms'."""
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.head_dim, self.added, self.pre_only = hd, added, pre_only
        lin = lambda: linear(d, d, bias=bias, dtype=dtype, rngs=rngs)  # noqa: E731
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.norm_q = RMSNorm(hd, eps, dtype=dtype)
        self.norm_k = RMSNorm(hd, eps, dtype=dtype)
        if not pre_only:
            self.to_out = lin()
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = lin(), lin(), lin()
            self.norm_added_q = RMSNorm(hd, eps, dtype=dtype)
            self.norm_added_k = RMSNorm(hd, eps, dtype=dtype)
            self.to_add_out = lin()

    def qkv(self, x, rope, batched: bool = False):
        """q, k (RMS-normed, rotated), v; ``rope``: (S, hd) tables, or (B, S, hd) with ``batched``, or None
        (no rotation: HunyuanVideo's text tokens)."""
        hd = self.head_dim
        rot = (lambda y, *_: y) if rope is None else apply_rope_batched if batched else apply_rope
        rope = () if rope is None else rope
        q = rot(self.norm_q(_heads(self.to_q(x), hd)), *rope)
        k = rot(self.norm_k(_heads(self.to_k(x), hd)), *rope)
        return q, k, _heads(self.to_v(x), hd)

    def attend(self, q, k, v, cq, ck, cv, c_mask=None):
        """The joint attention of the (sharded) tokens' q, k, v and the context's (whole, or in slices):
        (tokens out, context out), heads kept; ``c_mask``: bool (B, Sc) context keys kept (None: all)."""
        return attention(q, k, v, context=(cq, ck, cv, c_mask))

    def joint(self, x, c, rope, c_rope, c_mask=None):
        """Double-stream: image ``x`` (sharded) and text ``c`` (whole), their RoPE tables ((S, hd) per
        image token; (B, L, hd) for the text, or None: not rotated) -> (image out, text out).
        ``c_mask``: bool (B, L) text keys kept (None: every T5 token, padding included, as FLUX)."""
        hd = self.head_dim
        q, k, v = self.qkv(x, rope)
        rot = (lambda y: y) if c_rope is None else lambda y: apply_rope_batched(y, *c_rope)  # noqa: E731
        cq = rot(self.norm_added_q(_heads(self.add_q_proj(c), hd)))
        ck = rot(self.norm_added_k(_heads(self.add_k_proj(c), hd)))
        cv = _heads(self.add_v_proj(c), hd)
        o, oc = self.attend(q, k, v, cq, ck, cv, c_mask)
        flat = lambda y: y.reshape(*y.shape[:2], -1)  # noqa: E731
        return self.to_out(flat(o)), self.to_add_out(flat(oc))


def apply_rope_batched(x, cos, sin):
    """:func:`apply_rope` with per-sample (B, S, D) tables."""
    xf = x.astype(jnp.float32)
    x2 = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-x2[..., 1], x2[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class DoubleBlock(nnx.Module):
    """diffusers ``FluxTransformerBlock``. ``ada_norm`` / ``attention_cls``: what a subclass swaps (Chroma: norms
    that take their modulation)."""

    attention_cls = Attention

    @staticmethod
    def ada_norm(dim: int, chunks: int, stream: int, *, dtype, rngs):
        """The adaLN of ``stream`` (0: image, 1: text)."""
        return AdaNorm(dim, chunks, dtype=dtype, rngs=rngs)

    def __init__(self, cfg: FluxConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = self.ada_norm(d, 6, 0, dtype=dtype, rngs=rngs)
        self.norm1_context = self.ada_norm(d, 6, 1, dtype=dtype, rngs=rngs)
        self.attn = self.attention_cls(cfg, added=True, pre_only=False, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff = FeedForward(d, inner=mlp_dim(cfg), dtype=dtype, rngs=rngs)
        self.norm2_context = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.ff_context = FeedForward(d, inner=mlp_dim(cfg), dtype=dtype, rngs=rngs)

    def __call__(self, x, c, temb, rope, c_rope, c_mask=None):
        nx, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(c, temb)
        a, ac = self.attn.joint(nx, nc, rope, c_rope, c_mask)
        x = x + gate[:, None] * a
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        c = c + c_gate[:, None] * ac
        c = c + c_gate_mlp[:, None] * self.ff_context(self.norm2_context(c) * (1 + c_scale_mlp[:, None])
                                                      + c_shift_mlp[:, None])
        return x, _fp16_clip(c)


class SingleBlock(nnx.Module):
    """diffusers ``FluxSingleTransformerBlock``: attention and an MLP in parallel on the joint sequence
    (``ada_norm`` / ``attention_cls``: as :class:`DoubleBlock`'s)."""

    attention_cls = Attention
    ada_norm = staticmethod(DoubleBlock.ada_norm)

    def __init__(self, cfg: FluxConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm = self.ada_norm(d, 3, 0, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(d, mlp_dim(cfg), dtype=dtype, rngs=rngs)
        self.attn = self.attention_cls(cfg, added=False, pre_only=True, dtype=dtype, rngs=rngs)
        self.proj_out = linear(d + mlp_dim(cfg), d, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb, rope):
        h, (gate,) = self.norm(x, temb)
        return self._out(x, h, attention(*self.attn.qkv(h, rope)), gate)

    def pair(self, x, c, temb, rope, c_rope, c_mask=None):
        """The same block with the text ``c`` kept apart from the image tokens ``x`` (a patch of them under
        PipeFusion): the text's tokens join the attention as its context, every other op is per token.
        ``c_rope``: the text's (B, L, hd) tables (None: not rotated); ``c_mask``: bool (B, L) text keys kept
        (None: all). -> (image, text)."""
        mod = self.norm.modulation(temb)
        hx, (gate,) = self.norm(x, temb, mod)
        hc, _ = self.norm(c, temb, mod)
        o, oc = self.attn.attend(*self.attn.qkv(hx, rope), *self.attn.qkv(hc, c_rope, batched=True), c_mask)
        return self._out(x, hx, o, gate), self._out(c, hc, oc, gate)

    def _out(self, x, h, o, gate):
        y = jnp.concatenate([o.reshape(*o.shape[:2], -1), gelu_tanh(self.proj_mlp(h))], axis=-1)
        return _fp16_clip(x + gate[:, None] * self.proj_out(y))


class TextProjection(nnx.Module):
    """diffusers ``PixArtAlphaTextProjection(act_fn="silu")`` (the pooled CLIP embedding)."""

    def __init__(self, din: int, dout: int, *, dtype, rngs):
        self.linear_1 = linear(din, dout, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(dout, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    """diffusers ``CombinedTimestep(Guidance)TextProjEmbeddings``: time (+ guidance) + pooled text."""

    def __init__(self, cfg: FluxConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs)
        self.guidance_embedder = TimestepEmbedding(256, d, dtype=dtype, rngs=rngs) if cfg.guidance_embeds else None
        self.text_embedder = TextProjection(cfg.pooled_projection_dim, d, dtype=dtype, rngs=rngs)

    def __call__(self, timestep, guidance, pooled):
        proj = lambda t: timestep_embedding(t, 256, flip_sin_to_cos=True).astype(pooled.dtype)  # noqa: E731
        emb = self.timestep_embedder(proj(timestep))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(proj(guidance))
        return emb + self.text_embedder(pooled)


def pipefusion_stacks(cfg: FluxConfig) -> dict:
    """PipeFusion's stacks (``_init_parts``' ``stacked`` / ``stacked_layers``): double-, then single-stream; and
    the text's ``cond`` keys (:data:`TEXT_KEYS`)."""
    return dict(stacked=STACKS, stacked_layers=(cfg.num_layers, cfg.num_single_layers), text_keys=TEXT_KEYS)


def rotated_text_rope(axes_dims, batch: int, img_ids=None, txt_ids=None, rope=None):
    """(image tables, the text's tables broadcast to ``batch`` (B, L, hd) each, the text's tables (L, hd)) for the
    families whose text is rotated too (LongCat-Image, Ovis-Image): from host ids, or ``rope`` = ((img cos, sin),
    (txt cos, sin)) ready made (the ids are then ignored)."""
    if rope is None:
        rope = (rope_tables(img_ids, axes_dims), rope_tables(txt_ids, axes_dims))
    img_rope, txt_rope = (tuple(jnp.asarray(a, jnp.float32) for a in r) for r in rope)
    return img_rope, tuple(jnp.broadcast_to(a[None], (batch,) + a.shape) for a in txt_rope), txt_rope


def rope_tables(ids: np.ndarray, axes_dims) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``FluxPosEmbed``: (N, n_axes) position ids -> cos, sin (N, sum(axes_dims)) float32."""
    ids = np.asarray(ids, np.float32)
    tabs = [rope_1d(int(dim), ids[:, i], ROPE_THETA) for i, dim in enumerate(axes_dims)]
    return (np.concatenate([t[0] for t in tabs], axis=-1).astype(np.float32),
            np.concatenate([t[1] for t in tabs], axis=-1).astype(np.float32))


def image_ids(grid_h: int, grid_w: int) -> np.ndarray:
    """FluxPipeline's ``_prepare_latent_image_ids``: (h*w, 3) = (0, row, column) per packed latent token."""
    ids = np.zeros((grid_h, grid_w, 3), np.float32)
    ids[..., 1] = np.arange(grid_h)[:, None]
    ids[..., 2] = np.arange(grid_w)[None, :]
    return ids.reshape(-1, 3)


class FluxTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
    guidance)`` as diffusers' forward: packed latents (B, N, in_channels), T5 states (B, L, 4096),
    pooled CLIP (B, 768), timestep (B,) in [0, 1] (the pipeline's t / 1000), ids (N, 3) and (L, 3),
    guidance (B,) or None (guidance-distilled checkpoints). Returns (B, N, out_channels)."""

    def __init__(self, cfg: FluxConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        self.time_text_embed = TimeTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self._init_stacks(cfg, dtype, rngs)

    def _init_stacks(self, cfg, dtype, rngs, double=None, single=None):
        """The embedders of the text and the latents, both block stacks (``double`` / ``single``: the block classes,
        default FLUX.1's) and the head: what the families on FLUX.1's stacks (LongCat-Image, Ovis-Image) build too."""
        d = cfg.inner_dim
        double, single = double or DoubleBlock, single or SingleBlock
        self.context_embedder = linear(cfg.joint_attention_dim, d, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: double(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.single_transformer_blocks = stack_modules(lambda r: single(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_single_layers, rngs)
        self.norm_out_linear = linear(d, 2 * d, dtype=dtype, rngs=rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed -> double_blocks (image tokens sharded, text whole) -> single_blocks ([text; image]
    #    sharded) -> head. The pipeline runs the two block phases over the mesh (run_blocks). --

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
              guidance=None, rope=None):
        """-> (image (B, N, D), tokens {"rope": image tables (N, hd)}, cond {"temb", "context" (B, L, D),
        "context_rope": (B, L, hd) tables}, text_rope ((L, hd) tables, for the single-stream phase)).

        The ids are host arrays (numpy; the tables are computed in float64 as diffusers does), or
        ``rope`` gives the tables ``((img_cos, img_sin), (txt_cos, txt_sin))`` ready made (the pipeline
        passes them into its jitted step; the ids are then ignored)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        # t x 1000 and guidance x 1000 stay float32 (diffusers rounds them to the model dtype first: in
        # bf16, t = 0.3 becomes 300 instead of 300.8 and its sinusoid moves by up to 0.8 rad)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("This FLUX checkpoint is guidance-distilled (guidance_embeds): pass guidance.")
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,)) * 1000
        temb = self.time_text_embed(t, guidance, jnp.asarray(pooled_projections).astype(dtype))
        x = self.x_embedder(hidden_states.astype(dtype))
        c = self.context_embedder(encoder_hidden_states.astype(dtype))
        if rope is None:
            rope = (rope_tables(img_ids, cfg.axes_dims_rope), rope_tables(txt_ids, cfg.axes_dims_rope))
        img_rope, txt_rope = (tuple(jnp.asarray(a, jnp.float32) for a in r) for r in rope)
        c_rope = tuple(jnp.broadcast_to(a[None], (b,) + a.shape) for a in txt_rope)
        return x, {"rope": img_rope}, {"temb": temb, "context": c, "context_rope": c_rope}, txt_rope

    def double_blocks(self, x, tokens, cond):
        """The double-stream stack on the image tokens (or a shard of them); -> (image, text)."""
        temb, rope, c_rope = cond["temb"], tokens["rope"], cond["context_rope"]
        return scan_modules(self.transformer_blocks, lambda blk, xc: blk(*xc, temb, rope, c_rope),
                            (x, cond["context"]))

    @staticmethod
    def joint_tokens(tokens, text_rope):
        """The single-stream phase's per-token tables: [text; image]."""
        return {"rope": tuple(jnp.concatenate([t, i], axis=0) for t, i in zip(text_rope, tokens["rope"]))}

    def single_blocks(self, joint, tokens, cond):
        """The single-stream stack on the joint [text; image] sequence (or a contiguous shard of it)."""
        temb, rope = cond["temb"], tokens["rope"]
        return scan_modules(self.single_transformer_blocks, lambda blk, y: blk(y, temb, rope), joint)

    def blocks(self, x, tokens, cond):
        """Both stacks with the text held whole, the form PipeFusion runs (each patch carries the text):
        the double-stream blocks' (image, text) go on into the single-stream blocks, where the text joins
        each attention as a context (:meth:`SingleBlock.pair`) instead of the sharded sequence. Equals
        :meth:`double_blocks` then :meth:`single_blocks` over [text; image]. -> the image tokens."""
        temb, rope, c_rope = cond["temb"], tokens["rope"], cond["context_rope"]
        xc = self.double_blocks(x, tokens, cond)
        x, _ = scan_modules(self.single_transformer_blocks, lambda blk, xc: blk.pair(*xc, temb, rope, c_rope), xc)
        return x

    def head(self, x, cond, shape=None):
        """Image tokens -> the prediction (B, N, patch^2 * out_channels); ``shape`` (the latents', as the
        other families' heads take it) is not needed."""
        scale, shift = jnp.split(self.norm_out_linear(jax.nn.silu(cond["temb"]).astype(x.dtype)), 2, axis=-1)
        return self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        return self.forward_embedded(*self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                                 img_ids, txt_ids, guidance))

    def forward_embedded(self, x, tokens, cond, txt_rope):
        """Both stacks and the head on :meth:`embed`'s outputs (the families on FLUX.1's stacks share it)."""
        x, c = self.double_blocks(x, tokens, cond)
        joint = self.single_blocks(jnp.concatenate([c, x], axis=1), self.joint_tokens(tokens, txt_rope),
                                   {"temb": cond["temb"]})
        return self.head(joint[:, c.shape[1]:], cond)


TORCH_RENAMES = [
    (r"^norm_out_linear\.", "norm_out.linear."),
    (r"\.attn\.to_out\.", ".attn.to_out.0."),
    (r"\.(ff|ff_context)\.net_0\.", r".\1.net.0.proj."),
    (r"\.(ff|ff_context)\.net_2\.", r".\1.net.2."),
]


def params_from_torch(flat: dict, cfg: FluxConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: FluxTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers}, renames=TORCH_RENAMES,
                          dtype=dtype, what="FLUX transformer checkpoint")


def build(cfg: FluxConfig, params: dict, dtype=jnp.float32) -> FluxTransformer2DModel:
    return build_module(lambda: FluxTransformer2DModel(cfg, dtype=dtype), params)
