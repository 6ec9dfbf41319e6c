"""ConsisID transformer (diffusers ``ConsisIDTransformer3DModel``) in Flax NNX, on :mod:`xdit_jax.models.cogvideox`.

ConsisID (BestWishYsh/ConsisID-preview) is CogVideoX-5B-I2V's transformer (RoPE and the learned positional table,
32 input channels: the noise and the image's latents) plus an identity branch (``is_train_face``):

* the ``LocalFacialExtractor``, a perceiver resampler turning the face's identity embedding ``id_cond`` (B, id_dim)
  and the face ViT's hidden states ``id_vit_hidden`` (``LFE_num_scale`` arrays (B, N, vit_dim)) into
  ``LFE_num_querie`` identity tokens (B, Q, LFE_output_dim); it depends on neither the latents nor the timestep, so
  a pipeline computes it once per generation (:meth:`ConsisIDTransformer3DModel.face_embedding`);
* a ``PerceiverCrossAttention`` after blocks 0, k, 2k, ... (``cross_attn_interval`` k): the video tokens attend to
  the identity tokens and ``local_face_scale`` x the result is added to them (text tokens untouched).

The blocks are CogVideoX's. The stack runs as one ``lax.scan`` over groups of k blocks (the group's first block, its
cross-attention, the group's other blocks in an inner scan). The cross-attention is per video token against the
short identity tokens, which every device holds whole: on a sequence shard it is local and exact, no collective.
PipeFusion runs :meth:`ConsisIDTransformer3DModel.pipefusion_blocks` instead (equal to it: one scan over the blocks,
the next block's index in the carry that goes from stage to stage, the cross-attentions picked by it).
The inputs ``id_cond`` / ``id_vit_hidden`` come from face models (insightface, facexlib, EVA-CLIP: diffusers'
``consisid_utils.prepare_face_models`` / ``process_face_embeddings_infer``) that are not part of xdit_jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import cogvideox
from xdit_jax.models.cogvideox import CogVideoXConfig
from xdit_jax.models.layers import LayerNorm, linear, scan_modules, stack_modules

STACKED = cogvideox.STACKED
check_input_shape = cogvideox.check_input_shape


@dataclasses.dataclass(frozen=True)
class ConsisIDConfig(CogVideoXConfig):
    is_train_face: bool = False
    is_kps: bool = False
    cross_attn_interval: int = 2
    cross_attn_dim_head: int = 128
    cross_attn_num_heads: int = 16
    LFE_id_dim: int = 1280
    LFE_vit_dim: int = 1024
    LFE_depth: int = 10
    LFE_dim_head: int = 64
    LFE_num_heads: int = 16
    LFE_num_id_token: int = 5
    LFE_num_querie: int = 32
    LFE_output_dim: int = 2048
    LFE_ff_mult: int = 4
    LFE_num_scale: int = 5
    local_face_scale: float = 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConsisIDConfig":
        cfg = super().from_dict(d)
        if cfg.patch_size_t is not None or cfg.ofs_embed_dim:
            raise ValueError("A ConsisID transformer has no patch_size_t and no ofs embedding (diffusers' has none).")
        if cfg.is_train_face:
            k = cfg.cross_attn_interval
            if k < 1 or cfg.num_layers % k:
                raise ValueError(f"num_layers={cfg.num_layers} is not a multiple of cross_attn_interval={k}: diffusers "
                                 f"inserts a face cross-attention after blocks 0, {k}, ... but builds only "
                                 f"num_layers // {k} of them (an IndexError there).")
            if cfg.LFE_depth % cfg.LFE_num_scale:
                raise ValueError(f"LFE_depth={cfg.LFE_depth} must be a multiple of LFE_num_scale={cfg.LFE_num_scale}.")
            if int(cfg.inner_dim / 3 * 2) != cfg.LFE_output_dim:
                raise ValueError(f"The face cross-attention takes {int(cfg.inner_dim / 3 * 2)}-wide identity tokens "
                                 f"(2/3 of the width {cfg.inner_dim}, as diffusers) but LFE_output_dim is "
                                 f"{cfg.LFE_output_dim}: no ConsisID checkpoint has that.")
        return cfg

    @property
    def num_cross_attn(self) -> int:
        return self.num_layers // self.cross_attn_interval


def _leaky_relu(x):
    return jax.nn.leaky_relu(x, 0.01)  # torch.nn.LeakyReLU()'s slope


def _attend(q, k, v, heads: int, dim_head: int):
    """diffusers' perceiver attention: q (B, Sq, H*dh) against k, v (B', Sk, H*dh) (B' = B or 1), each side scaled by
    dh^-1/4, softmax in float32."""
    b, sq, _ = q.shape
    s = dim_head ** -0.25
    q = (q * s).reshape(b, sq, heads, dim_head)
    k = (k * s).reshape(k.shape[0], -1, heads, dim_head)
    v = v.reshape(v.shape[0], -1, heads, dim_head)
    w = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.broadcast_to(k, (b,) + k.shape[1:]))
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(q.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, jnp.broadcast_to(v, (b,) + v.shape[1:]))
    return o.reshape(b, sq, heads * dim_head)


class PerceiverAttention(nnx.Module):
    """diffusers ``PerceiverAttention`` (the extractor's): the queries attend to [context; queries]."""

    def __init__(self, dim: int, dim_head: int, heads: int, *, dtype, rngs):
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.to_q = linear(dim, inner, bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = linear(dim, 2 * inner, bias=False, dtype=dtype, rngs=rngs)
        self.to_out = linear(inner, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, context, latents):
        context, latents = self.norm1(context), self.norm2(latents)
        k, v = jnp.split(self.to_kv(jnp.concatenate([context, latents], axis=1)), 2, axis=-1)
        return self.to_out(_attend(self.to_q(latents), k, v, self.heads, self.dim_head))


class PerceiverCrossAttention(nnx.Module):
    """diffusers ``PerceiverCrossAttention``: tokens (B, S, dim) attend to identity tokens (B or 1, Q, kv_dim)."""

    def __init__(self, cfg: ConsisIDConfig, *, dtype, rngs):
        self.heads, self.dim_head = cfg.cross_attn_num_heads, cfg.cross_attn_dim_head
        dim, kv_dim, inner = cfg.inner_dim, cfg.LFE_output_dim, self.heads * self.dim_head
        self.norm1 = LayerNorm(kv_dim, dtype=dtype)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.to_q = linear(dim, inner, bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = linear(kv_dim, 2 * inner, bias=False, dtype=dtype, rngs=rngs)
        self.to_out = linear(inner, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, face, x):
        k, v = jnp.split(self.to_kv(self.norm1(face)), 2, axis=-1)
        return self.to_out(_attend(self.to_q(self.norm2(x)), k, v, self.heads, self.dim_head))


class MappingMLP(nnx.Module):
    """diffusers' ``nn.Sequential(Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear)``; the
    attribute names carry the torch indices (``fc0`` is ``0``, ``ln1`` is ``1``, ...: :data:`TORCH_RENAMES`)."""

    def __init__(self, din: int, d: int, dout: int, *, dtype, rngs):
        self.fc0 = linear(din, d, dtype=dtype, rngs=rngs)
        self.ln1 = LayerNorm(d, dtype=dtype)
        self.fc3 = linear(d, d, dtype=dtype, rngs=rngs)
        self.ln4 = LayerNorm(d, dtype=dtype)
        self.fc6 = linear(d, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = _leaky_relu(self.ln1(self.fc0(x)))
        x = _leaky_relu(self.ln4(self.fc3(x)))
        return self.fc6(x)


class PerceiverFeedForward(nnx.Module):
    """diffusers' ``nn.Sequential(LayerNorm, Linear, GELU, Linear)`` (no biases, erf GELU)."""

    def __init__(self, dim: int, mult: int, *, dtype, rngs):
        self.ln0 = LayerNorm(dim, dtype=dtype)
        self.fc1 = linear(dim, dim * mult, bias=False, dtype=dtype, rngs=rngs)
        self.fc3 = linear(dim * mult, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.gelu(self.fc1(self.ln0(x)), approximate=False))


class ExtractorLayer(nnx.Module):
    """One ``layers[i]`` of the extractor: the torch ``ModuleList([attention, feed-forward])`` (``0``, ``1``)."""

    def __init__(self, cfg: ConsisIDConfig, *, dtype, rngs):
        self.attn = PerceiverAttention(cfg.LFE_vit_dim, cfg.LFE_dim_head, cfg.LFE_num_heads, dtype=dtype, rngs=rngs)
        self.ff = PerceiverFeedForward(cfg.LFE_vit_dim, cfg.LFE_ff_mult, dtype=dtype, rngs=rngs)


class LocalFacialExtractor(nnx.Module):
    """diffusers ``LocalFacialExtractor``: (id_cond (B, id_dim), id_vit_hidden: LFE_num_scale x (B, N, vit_dim)) ->
    identity tokens (B, LFE_num_querie, LFE_output_dim)."""

    def __init__(self, cfg: ConsisIDConfig, *, dtype, rngs):
        self.cfg = cfg
        vit = cfg.LFE_vit_dim
        self.latents = nnx.Param(jnp.zeros((1, cfg.LFE_num_querie, vit), dtype))
        self.proj_out = nnx.Param(jnp.zeros((vit, cfg.LFE_output_dim), dtype))
        self.layers = nnx.List([ExtractorLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.LFE_depth)])
        for i in range(cfg.LFE_num_scale):
            setattr(self, f"mapping_{i}", MappingMLP(vit, vit, vit, dtype=dtype, rngs=rngs))
        self.id_embedding_mapping = MappingMLP(cfg.LFE_id_dim, vit, vit * cfg.LFE_num_id_token, dtype=dtype,
                                               rngs=rngs)

    def __call__(self, id_cond, id_vit_hidden):
        cfg = self.cfg
        b = id_cond.shape[0]
        ids = self.id_embedding_mapping(id_cond).reshape(b, cfg.LFE_num_id_token, cfg.LFE_vit_dim)
        x = jnp.concatenate([jnp.broadcast_to(self.latents[...], (b,) + self.latents.shape[1:]), ids], axis=1)
        per = cfg.LFE_depth // cfg.LFE_num_scale
        for i in range(cfg.LFE_num_scale):
            ctx = jnp.concatenate([ids, getattr(self, f"mapping_{i}")(id_vit_hidden[i])], axis=1)
            for layer in self.layers[i * per:(i + 1) * per]:
                x = layer.attn(ctx, x) + x
                x = layer.ff(x) + x
        return x[:, :cfg.LFE_num_querie] @ self.proj_out[...]


class ConsisIDTransformer3DModel(cogvideox.CogVideoXTransformer3DModel):
    """``model(hidden_states, encoder_hidden_states, timestep, id_cond=..., id_vit_hidden=...)`` as diffusers' forward
    (hidden_states (B, F, C, H, W); id_cond (B or 1, LFE_id_dim); id_vit_hidden LFE_num_scale arrays (B or 1, N,
    LFE_vit_dim) or one array with the scales first). The pieces ``embed`` / ``blocks`` / ``head`` are CogVideoX's
    with ``cond`` = {"temb": (B, E), "face": (B, Q, LFE_output_dim)} in place of the time embedding."""

    def __init__(self, cfg: ConsisIDConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        if cfg.is_train_face:
            self.local_facial_extractor = LocalFacialExtractor(cfg, dtype=dtype, rngs=rngs)
            self.perceiver_cross_attention = stack_modules(
                lambda r: PerceiverCrossAttention(cfg, dtype=dtype, rngs=r), cfg.num_cross_attn, rngs)

    def face_embedding(self, id_cond, id_vit_hidden):
        """The identity tokens (B, LFE_num_querie, LFE_output_dim) of the face inputs (independent of the latents
        and the timestep: computed once per generation)."""
        cfg = self.cfg
        if id_cond is None or id_vit_hidden is None:
            raise ValueError("This ConsisID transformer (is_train_face) needs id_cond and id_vit_hidden: the face's "
                             "embeddings, made by diffusers' consisid_utils.process_face_embeddings_infer (face "
                             "models outside xdit_jax).")
        id_cond = jnp.asarray(id_cond).astype(self.dtype)
        vit = [jnp.asarray(v).astype(self.dtype) for v in id_vit_hidden]
        if id_cond.ndim != 2 or id_cond.shape[1] != cfg.LFE_id_dim:
            raise ValueError(f"id_cond {tuple(id_cond.shape)}: expected (batch, {cfg.LFE_id_dim}).")
        if len(vit) != cfg.LFE_num_scale or any(v.ndim != 3 or v.shape[0] != id_cond.shape[0]
                                                or v.shape[2] != cfg.LFE_vit_dim for v in vit):
            raise ValueError(f"id_vit_hidden {[tuple(v.shape) for v in vit]}: expected {cfg.LFE_num_scale} arrays "
                             f"(batch={id_cond.shape[0]}, tokens, {cfg.LFE_vit_dim}).")
        return self.local_facial_extractor(id_cond, vit)

    def embed(self, hidden_states, encoder_hidden_states, timestep, ofs=None, id_cond=None, id_vit_hidden=None, *,
              face=None):
        """-> (joint, tokens, cond): CogVideoX's embedding; ``cond`` {"temb", "face"} (``face``: the identity
        tokens, given or computed from ``id_cond`` / ``id_vit_hidden``, broadcast to the batch)."""
        joint, tokens, temb = super().embed(hidden_states, encoder_hidden_states, timestep, ofs)
        cond = {"temb": temb}
        if self.cfg.is_train_face:
            if face is None:
                face = self.face_embedding(id_cond, id_vit_hidden)
            b = joint.shape[0]
            if face.shape[0] not in (1, b):
                raise ValueError(f"Face inputs for {face.shape[0]} samples, latents for {b}: give one face, or one "
                                 "per sample.")
            cond["face"] = jnp.broadcast_to(face.astype(self.dtype), (b,) + face.shape[1:])
        return joint, tokens, cond

    def blocks(self, joint, tokens, cond):
        """The block stack on the joint sequence or a contiguous shard of it: one scan over groups of
        ``cross_attn_interval`` blocks, the face cross-attention after each group's first block (video tokens only)."""
        cfg = self.cfg
        temb = cond["temb"]
        if not cfg.is_train_face:
            return super().blocks(joint, tokens, temb)
        k, g = cfg.cross_attn_interval, cfg.num_cross_attn
        face, is_video = cond["face"], ~tokens["is_text"][None, :, None]
        bdef, bstate = nnx.split(self.transformer_blocks)
        cdef, cstate = nnx.split(self.perceiver_cross_attention)
        bstate = jax.tree.map(lambda a: a.reshape((g, k) + a.shape[1:]), bstate)

        def run(state, x):
            return nnx.merge(bdef, state)(x, temb, tokens)

        def group(x, xs):
            bs, cs = xs
            x = run(jax.tree.map(lambda a: a[0], bs), x)
            ca = nnx.merge(cdef, cs)(face, x)
            x = x + jnp.where(is_video, cfg.local_face_scale * ca, jnp.zeros((), x.dtype)).astype(x.dtype)
            if k > 1:
                x, _ = jax.lax.scan(lambda c, s: (run(s, c), None), x, jax.tree.map(lambda a: a[1:], bs))
            return x, None

        return jax.lax.scan(group, joint, (bstate, cstate))[0]

    def pipefusion_blocks(self, joint, tokens, cond):
        """:meth:`blocks` in the form PipeFusion runs (equal to it): one scan over the blocks
        (:func:`~xdit_jax.models.layers.scan_modules`) whose carry is (tokens, the index of the next block); after
        block ``i`` with ``i % cross_attn_interval == 0`` the face cross-attention ``i // cross_attn_interval`` (its
        weights replicated, picked by the index) is added to the video tokens, as diffusers. The index rides in the
        carry that PipeFusion hands from stage to stage, so a stage holding any run of blocks applies the
        cross-attentions diffusers applies after those blocks (an uneven stage's padding layers pass the carry on
        unchanged). The cross-attention is token-local (each token against the few identity tokens, no
        collective): a patch, or its shard over ring x ulysses, runs it on its own rows."""
        cfg = self.cfg
        temb = cond["temb"]
        if not cfg.is_train_face:
            return super().blocks(joint, tokens, temb)
        k = cfg.cross_attn_interval
        face, is_video = cond["face"], ~tokens["is_text"][None, :, None]
        cdef, cstate = nnx.split(self.perceiver_cross_attention)

        def cross(x, i):
            ca = nnx.merge(cdef, jax.tree.map(lambda a: a[i // k], cstate))(face, x)
            return x + jnp.where(is_video, cfg.local_face_scale * ca, jnp.zeros((), x.dtype)).astype(x.dtype)

        def layer(blk, carry):
            x, i = carry
            x = blk(x, temb, tokens)
            x = jax.lax.cond(i % k == 0, cross, lambda x, i: x, x, i)  # (k - 1 of k blocks skip it)
            return x, i + 1

        return scan_modules(self.transformer_blocks, layer, (joint, jnp.zeros((), jnp.int32)))[0]

    def head(self, joint, cond, shape):
        return super().head(joint, cond["temb"], shape)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, ofs=None, id_cond=None, id_vit_hidden=None):
        """(``ofs``: CogVideoX's argument, None here: a ConsisID transformer has no ofs embedding.)"""
        joint, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, ofs, id_cond, id_vit_hidden)
        return self.head(self.blocks(joint, tokens, cond), cond, hidden_states.shape)


# torch names that differ from the Flax path (regex on the derived torch name, layer indices in place)
TORCH_RENAMES = [
    (r"^(transformer_blocks\.\d+\.attn1\.to_out)\.", r"\1.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
    (r"(layers\.\d+)\.attn\.", r"\1.0."),
    (r"(layers\.\d+)\.ff\.", r"\1.1."),
    (r"\.(?:fc|ln)(\d)\.", r".\1."),
]


def params_from_torch(flat: dict, cfg: ConsisIDConfig, dtype=None) -> dict:
    stacked = {"transformer_blocks": cfg.num_layers}
    if cfg.is_train_face:
        stacked["perceiver_cross_attention"] = cfg.num_cross_attn
    return map_state_dict(flat, expected_shapes(lambda: ConsisIDTransformer3DModel(cfg)), stacked=stacked,
                          renames=TORCH_RENAMES,
                          ignore=[] if cfg.use_learned_positional_embeddings else cogvideox.TORCH_IGNORE, dtype=dtype,
                          what="ConsisID transformer checkpoint")


def build(cfg: ConsisIDConfig, params: dict, dtype=jnp.float32) -> ConsisIDTransformer3DModel:
    return build_module(lambda: ConsisIDTransformer3DModel(cfg, dtype=dtype), params)
