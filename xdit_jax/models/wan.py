"""Wan 2.1 transformer (diffusers ``WanTransformer3DModel``, text-to-video) in Flax NNX.

The video latents (B, C, F, H, W) become patch tokens (Conv3d patch embed, ``patch_size`` (1, 2, 2)); each
block modulates a float32 LayerNorm with a per-block ``scale_shift_table`` plus the shared timestep
projection (6 x D per sample), self-attends over the video tokens (q/k RMS-normed across all heads, then
Wan's 3D RoPE: the head dim split into frame / height / width parts), cross-attends to the UMT5 caption
(projected by ``condition_embedder.text_embedder``; no mask: WanPipeline zero-pads the states instead) and
runs a tanh-GELU MLP. Submodules carry the diffusers names so the torch -> Flax key map is derived
(:mod:`xdit_jax.keymap`); the table below lists what differs. The blocks are stacked on a leading layer axis
and run with one ``lax.scan``.

Self-attention goes through :func:`xdit_jax.parallel.attention.attention` (sequence-parallel over the video
tokens; the RoPE tables are per-token ``tokens`` sharded with them), cross-attention through
:func:`xdit_jax.parallel.attention.cross_attention` (local under every mesh: the caption is whole on every
device, as PixArt's). No collective here.

Wan 2.2's transformers (A14B's two experts, TI2V-5B's 48-channel one) are this model, and so are Wan 2.1's
image-to-video ones (``image_dim`` / ``added_kv_proj_dim``): the CLIP image encoder's penultimate states
(``encoder_hidden_states_image``, (B, 257, image_dim); FLF2V-14B's ``pos_embed_seq_len`` = 2 x 257: the first and
last frames' states side by side, plus a learned position table) go through ``condition_embedder.image_embedder``
(LayerNorm, GELU MLP, LayerNorm) and every block's cross-attention attends to them with their own K/V
(``attn2.add_k_proj`` / ``add_v_proj``, K RMS-normed by ``norm_added_k``); the two cross-attentions' outputs add up
before ``to_out``. diffusers concatenates image and text states and splits them again assuming 512 text tokens; here
they stay two inputs, so any caption length works.

SkyReels-V2's transformer (:mod:`xdit_jax.models.skyreels_v2`) is this model too, with three switches the blocks and the
head read: ``tokens["frame"]`` (a modulation per latent frame, ``cond`` holding (B, F, ...) tables),
``tokens["segment"]`` (the block-causal self-attention) and float64-exact timestep sinusoids.

Not supported here (a clear error): any timestep per token (diffusers' 2-D ``timestep``) but TI2V-5B's: all tokens at one
timestep (text-to-video, passed per sample) or the first latent frame's at another (image-to-video,
``first_frame_timestep``: two modulations chosen per token, not a table per token).
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
    PixArtAlphaTextProjection,
    RMSNorm,
    TimestepEmbedding,
    apply_rope,
    linear,
    rope_1d,
    scan_modules,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention, cross_attention

# The stacked blocks (one scan; PipeFusion splits them into stages). diffusers calls them ``blocks``, the name of
# the engine's method here, so the attribute is ``transformer_blocks`` and a rename maps it.
STACKED = "transformer_blocks"
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class WanConfig(TransformerDims):
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        cfg = cls(**known_fields(cls, d))
        if (cfg.image_dim is None) != (cfg.added_kv_proj_dim is None):
            raise ValueError(f"image_dim={cfg.image_dim} and added_kv_proj_dim={cfg.added_kv_proj_dim}: a Wan 2.1 "
                             "image-to-video transformer sets both (the CLIP image states' width and their K/V "
                             "projections'), a text-to-video one neither.")
        if cfg.added_kv_proj_dim is not None and cfg.added_kv_proj_dim != cfg.inner_dim:
            raise ValueError(f"added_kv_proj_dim={cfg.added_kv_proj_dim} must equal the model width "
                             f"{cfg.inner_dim}: the image states reach attn2's add_k_proj / add_v_proj after the "
                             "image embedder projects them to that width.")
        if cfg.pos_embed_seq_len is not None and cfg.image_dim is None:
            raise ValueError("pos_embed_seq_len is the image embedder's position table (Wan 2.1 FLF2V); it needs "
                             "image_dim.")
        if cfg.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={cfg.qk_norm!r} is not supported: Wan uses 'rms_norm_across_heads'.")
        if len(cfg.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {cfg.patch_size}.")
        return cfg

    @property
    def takes_image(self) -> bool:
        """Wan 2.1 image-to-video: CLIP image states (``encoder_hidden_states_image``) are an input."""
        return self.image_dim is not None

    @property
    def image_tokens_per_video(self) -> int | None:
        """Image states per video the embedder takes in a row: ``pos_embed_seq_len`` (FLF2V: two images' 257) or,
        without a position table, any count (None)."""
        return self.pos_embed_seq_len

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """diffusers ``WanRotaryPosEmbed``: the head dim split into (frames, height, width) parts."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


# torch names that differ from the Flax path (regex on the derived torch name).
TORCH_RENAMES = [
    (r"^transformer_blocks\.", "blocks."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.(ffn?)\.net_0\.", r".\1.net.0.proj."),  # the blocks' ffn, the image embedder's ff
    (r"\.(ffn?)\.net_2\.", r".\1.net.2."),
]


def sincos_timestep_embedding(t, dim: int):
    """diffusers ``get_1d_sincos_pos_embed_from_grid(dim, t, flip_sin_to_cos=True)`` ([cos, sin]), which computes in
    float64 (SkyReels-V2's ``SkyReelsV2Timesteps``), to float32 rounding without float64: each frequency split in a
    13-bit head and a tail, the timestep in its integer part and fraction, so that ``floor(t) * head`` is exact for
    ``t < 2048`` and the rest is small; ``sin(a + b)`` by the sum formulas. (A plain float32 product is off by up to
    6e-5 rad at t = 999.)"""
    half = dim // 2
    omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / (dim / 2.0))
    om32 = omega.astype(np.float32)
    head = (om32.view(np.uint32) & np.uint32(~((1 << 10) - 1) & 0xFFFFFFFF)).view(np.float32)  # 13 significant bits
    tail = (omega - head.astype(np.float64)).astype(np.float32)
    t = jnp.asarray(t).astype(jnp.float32).reshape(-1)
    ti = jnp.floor(t)
    a = ti[:, None] * jnp.asarray(head)[None]  # exact
    b = ti[:, None] * jnp.asarray(tail)[None] + (t - ti)[:, None] * jnp.asarray(om32)[None]
    sin = jnp.sin(a) * jnp.cos(b) + jnp.cos(a) * jnp.sin(b)
    cos = jnp.cos(a) * jnp.cos(b) - jnp.sin(a) * jnp.sin(b)
    return jnp.concatenate([cos, sin], axis=-1)


def rope_table(cfg: WanConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``WanRotaryPosEmbed`` for the video tokens (frames, h, w) row-major: (S, head_dim) cos and
    sin tables, interleaved pairs (float64 frequencies rounded to float32, as there)."""
    n = max(frames, grid_h, grid_w)
    if n > cfg.rope_max_seq_len:
        raise ValueError(f"{n} positions along one axis exceed the model's rope_max_seq_len={cfg.rope_max_seq_len}.")
    parts = [rope_1d(d, np.arange(m), ROPE_THETA) for d, m in zip(cfg.rope_dims, (frames, grid_h, grid_w))]
    shapes = ((frames, 1, 1), (1, grid_h, 1), (1, 1, grid_w))
    tabs = []
    for which in (0, 1):
        grids = [np.broadcast_to(p[which].reshape(*s, -1), (frames, grid_h, grid_w, p[which].shape[1]))
                 for p, s in zip(parts, shapes)]
        tabs.append(np.concatenate(grids, axis=-1).reshape(frames * grid_h * grid_w, -1).astype(np.float32))
    return tabs[0], tabs[1]


class WanAttention(nnx.Module):
    """diffusers ``WanAttention``: self-attention over the video tokens (with RoPE) when ``context`` is None,
    else cross-attention to ``context``; q and k RMS-normed over all heads before the head split."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs, added_kv: bool = False):
        d = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.to_q = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, dtype=dtype, rngs=rngs)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(d, cfg.eps, dtype=dtype)
        self.norm_k = RMSNorm(d, cfg.eps, dtype=dtype)
        if added_kv:  # Wan 2.1 I2V's attn2: the image states' own K/V
            self.add_k_proj = linear(cfg.added_kv_proj_dim, d, dtype=dtype, rngs=rngs)
            self.add_v_proj = linear(cfg.added_kv_proj_dim, d, dtype=dtype, rngs=rngs)
            self.norm_added_k = RMSNorm(d, cfg.eps, dtype=dtype)

    def __call__(self, x, rope=None, context=None, context_img=None, segments=None):
        b, s, _ = x.shape
        src = x if context is None else context
        heads = lambda y: y.reshape(b, y.shape[1], self.heads, -1)  # noqa: E731
        q = heads(self.norm_q(self.to_q(x)))
        k = heads(self.norm_k(self.to_k(src)))
        v = heads(self.to_v(src))
        if context is None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            o = attention(q, k, v, segments=segments)
        else:
            o = cross_attention(q, k, v)
            if context_img is not None:  # a second softmax over the image states, added (diffusers' order)
                k_img = heads(self.norm_added_k(self.add_k_proj(context_img)))
                o = o + cross_attention(q, k_img, heads(self.add_v_proj(context_img)))
        return self.to_out(o.reshape(b, s, -1))


class WanTransformerBlock(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.norm1 = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.attn1 = WanAttention(cfg, dtype=dtype, rngs=rngs)
        self.attn2 = WanAttention(cfg, dtype=dtype, rngs=rngs, added_kv=cfg.takes_image)
        self.norm2 = LayerNorm(d, cfg.eps, affine=True, dtype=dtype) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(d, inner=cfg.ffn_dim, dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.scale_shift_table = nnx.Param(jnp.zeros((1, 6, d), dtype))

    def __call__(self, x, tokens, cond):
        """x: the video tokens (B, S, D) or any contiguous piece of them; tokens: {"rope": (cos, sin)} for
        those tokens; cond: see :meth:`WanTransformer3DModel.embed`."""
        f32 = jnp.float32
        table = self.scale_shift_table[...].astype(f32)
        if "frame" in tokens:  # a timestep per latent frame (SkyReels-V2's diffusion forcing): (B, F, 6, D)
            proj, frame = cond["timestep_proj"].astype(f32), tokens["frame"]
            mod = [table[:, j][:, None] + jnp.take(proj[:, :, j], frame, axis=1) for j in range(6)]  # (B, S, D)
        elif "first" in tokens:  # the first latent frame's tokens at their own timestep (TI2V image-to-video)
            mod = table + cond["timestep_proj"].astype(f32)  # (B, 6, D)
            first = tokens["first"].astype(bool)[None, :, None]  # (1, S, 1)
            mod_first = table + cond["timestep_proj_first"].astype(f32)
            mod = [jnp.where(first, a, b) for a, b in zip(jnp.split(mod_first, 6, axis=1), jnp.split(mod, 6, axis=1))]
        else:
            mod = jnp.split(table + cond["timestep_proj"].astype(f32), 6, axis=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        h = (self.norm1(x.astype(f32)) * (1 + scale) + shift).astype(x.dtype)
        x = (x.astype(f32) + self.attn1(h, rope=tokens["rope"], segments=tokens.get("segment")) * gate).astype(x.dtype)
        h = x if self.norm2 is None else self.norm2(x.astype(f32)).astype(x.dtype)
        x = x + self.attn2(h, context=cond["context"], context_img=cond.get("context_img"))
        h = (self.norm3(x.astype(f32)) * (1 + c_scale) + c_shift).astype(x.dtype)
        return (x.astype(f32) + self.ffn(h).astype(f32) * c_gate).astype(x.dtype)


class WanImageEmbedding(nnx.Module):
    """diffusers ``WanImageEmbedding``: (FLF2V: + a position table) -> LayerNorm -> Linear, exact GELU, Linear ->
    LayerNorm (float32 norms with weights, eps 1e-5)."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs):
        din, d = cfg.image_dim, cfg.inner_dim
        self.dtype = dtype
        self.norm1 = LayerNorm(din, 1e-5, affine=True, dtype=dtype)
        self.ff = FeedForward(din, mult=1, dim_out=d, approximate=False, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, 1e-5, affine=True, dtype=dtype)
        self.pos_embed = (nnx.Param(jnp.zeros((1, cfg.pos_embed_seq_len, din), dtype))
                          if cfg.pos_embed_seq_len is not None else None)

    def __call__(self, image):
        x = image.astype(jnp.float32)
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"encoder_hidden_states_image has {x.shape[1]} tokens a row; this model's image "
                                 f"embedder takes {self.pos_embed.shape[1]} (pos_embed_seq_len: the first and the "
                                 "last frame's CLIP states side by side).")
            x = x + self.pos_embed[...].astype(jnp.float32)
        h = self.ff(self.norm1(x).astype(self.dtype))
        return self.norm2(h.astype(jnp.float32)).astype(self.dtype)


class WanTimeTextEmbedding(nnx.Module):
    """diffusers ``WanTimeTextImageEmbedding``: timestep, caption and (Wan 2.1 I2V) image embedders."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs):
        d = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, d, dtype=dtype, rngs=rngs)
        self.time_proj = linear(d, 6 * d, dtype=dtype, rngs=rngs)
        self.text_embedder = PixArtAlphaTextProjection(cfg.text_dim, d, dtype=dtype, rngs=rngs)
        self.image_embedder = WanImageEmbedding(cfg, dtype=dtype, rngs=rngs) if cfg.takes_image else None
        self.float64_sinusoids = bool(getattr(cfg, "float64_sinusoids", False))

    def embed_time(self, timestep, dtype):
        """(N,) timesteps -> (temb (N, D), timestep_proj (N, 6 D))."""
        if self.float64_sinusoids:  # SkyReels-V2: diffusers' get_1d_sincos_pos_embed_from_grid in float64
            t = sincos_timestep_embedding(timestep, self.freq_dim)
        else:
            t = timestep_embedding(timestep, self.freq_dim, True, 0)
        temb = self.time_embedder(t.astype(dtype))
        return temb, self.time_proj(jax.nn.silu(temb))

    def __call__(self, timestep, text, dtype):
        temb, proj = self.embed_time(timestep, dtype)
        return temb, proj, self.text_embedder(text.astype(dtype))

    def embed_image(self, image, dtype):
        return self.image_embedder(image.astype(dtype))


class WanTransformer3DModel(nnx.Module):
    """``model(hidden_states, timestep, encoder_hidden_states)`` as diffusers' forward.

    hidden_states: (B, C, F, H, W) latents (diffusers' layout); timestep: (B,) or a scalar;
    encoder_hidden_states: (B, L, text_dim) UMT5 states; encoder_hidden_states_image (Wan 2.1 I2V only, required
    there): (B, N, image_dim) CLIP image states. Returns (B, out_channels, F, H, W).
    """

    def __init__(self, cfg: WanConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.inner_dim
        p = tuple(cfg.patch_size)
        self.patch_embedding = nnx.Conv(cfg.in_channels, d, kernel_size=p, strides=p, padding="VALID",
                                        use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.condition_embedder = WanTimeTextEmbedding(cfg, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: WanTransformerBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_out = LayerNorm(d, cfg.eps, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.out_ch * int(np.prod(p)), dtype=dtype, rngs=rngs)
        self.scale_shift_table = nnx.Param(jnp.zeros((1, 2, d), dtype))

    # -- pieces: embed (global) -> blocks (per token, any contiguous shard) -> head (global) --
    # The parallel engine (xdit_jax.parallel) shards the video tokens between embed and head.

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
              first_frame_timestep=None):
        """-> (x, tokens, cond).

        x: the video tokens (B, S, D), S = F' * H' * W' row-major (frames, rows, columns of patches).
        tokens: ``{"rope": ((S, head_dim) cos, (S, head_dim) sin)}``. cond (batch first, sharded with the
        batch): ``temb`` (B, D) for the head, ``timestep_proj`` (B, 6, D) the blocks' modulation,
        ``context`` (B, L, D) the projected caption, and for an image-to-video model ``context_img`` (B, N, D) the
        embedded CLIP image states.

        ``first_frame_timestep`` (B,): the tokens of the first latent frame at this timestep, the others at
        ``timestep`` (diffusers' per-token timesteps of TI2V-5B's image-to-video, which are exactly so); then
        ``tokens["first"]`` (S,) marks them and cond holds ``temb_first`` / ``timestep_proj_first`` too.
        """
        cfg, dtype = self.cfg, self.dtype
        b, _, f, h, w = hidden_states.shape
        check_input_shape(cfg, f, h, w)
        pt, ph, pw = cfg.patch_size
        x = self.patch_embedding(hidden_states.astype(dtype).transpose(0, 2, 3, 4, 1))  # (B, F', H', W', D)
        grid = x.shape[1:4]
        x = x.reshape(b, -1, cfg.inner_dim)
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
        temb, proj, context = self.condition_embedder(t, encoder_hidden_states, dtype)
        cos, sin = rope_table(cfg, *grid)
        cond = {"temb": temb, "timestep_proj": proj.reshape(b, 6, cfg.inner_dim), "context": context}
        if cfg.takes_image != (encoder_hidden_states_image is not None):
            raise ValueError("encoder_hidden_states_image (CLIP image states) is required by a Wan 2.1 image-to-video "
                             "transformer and taken by no other." if cfg.takes_image else
                             "encoder_hidden_states_image given, but this transformer has no image embedder "
                             "(image_dim is None).")
        if cfg.takes_image:
            img = jnp.asarray(encoder_hidden_states_image)
            if img.ndim != 3 or img.shape[0] != b or img.shape[2] != cfg.image_dim:
                raise ValueError(f"encoder_hidden_states_image {tuple(img.shape)}: expected ({b}, tokens, "
                                 f"{cfg.image_dim}).")
            cond["context_img"] = self.condition_embedder.embed_image(img, dtype)
        tokens = {"rope": (jnp.asarray(cos), jnp.asarray(sin))}
        if first_frame_timestep is not None:
            t0 = jnp.broadcast_to(jnp.asarray(first_frame_timestep).reshape(-1), (b,))
            temb0, proj0, _ = self.condition_embedder(t0, encoder_hidden_states, dtype)
            cond.update(temb_first=temb0, timestep_proj_first=proj0.reshape(b, 6, cfg.inner_dim))
            tokens["first"] = jnp.asarray(np.arange(x.shape[1]) < grid[1] * grid[2], jnp.float32)
        return x, tokens, cond

    def blocks(self, x, tokens, cond):
        """The block stack (one lax.scan) on the video tokens or a contiguous shard of them."""
        return scan_modules(self.transformer_blocks, lambda blk, y: blk(y, tokens, cond), x)

    def head(self, x, cond, shape):
        """Video tokens (B, S, D) -> the prediction (B, out_channels, F, H, W) for latents of ``shape``."""
        cfg = self.cfg
        b, _, f, h, w = shape
        pt, ph, pw = cfg.patch_size
        f32 = jnp.float32
        if cond["temb"].ndim == 3:  # a timestep per latent frame (SkyReels-V2): each token its frame's (B, S, D)
            frame = jnp.arange(x.shape[1]) // ((h // ph) * (w // pw))
            temb = jnp.take(cond["temb"].astype(f32), frame, axis=1)
            table = self.scale_shift_table[...].astype(f32)
            shift, scale = table[:, 0][:, None] + temb, table[:, 1][:, None] + temb
        else:
            mod = self.scale_shift_table[...].astype(f32) + cond["temb"].astype(f32)[:, None]  # (B, 2, D)
            shift, scale = jnp.split(mod, 2, axis=1)
        if "temb_first" in cond:  # the first latent frame's tokens (the first H' W') at their own timestep
            first = (jnp.arange(x.shape[1]) < (h // ph) * (w // pw))[None, :, None]
            mod0 = self.scale_shift_table[...].astype(f32) + cond["temb_first"].astype(f32)[:, None]
            shift0, scale0 = jnp.split(mod0, 2, axis=1)
            shift, scale = jnp.where(first, shift0, shift), jnp.where(first, scale0, scale)
        x = self.proj_out((self.norm_out(x.astype(f32)) * (1 + scale) + shift).astype(x.dtype))
        x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, cfg.out_ch)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, cfg.out_ch, f, h, w)

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                 first_frame_timestep=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                     first_frame_timestep)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def check_input_shape(cfg: WanConfig, latent_frames: int, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    pt, ph, pw = cfg.patch_size
    if latent_h % ph or latent_w % pw:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size "
                         f"{ph}x{pw} (pixel height and width multiples of {8 * ph}x{8 * pw}).")
    if latent_frames % pt:
        raise ValueError(f"{latent_frames} latent frames are not a multiple of the temporal patch size {pt}.")


# diffusers ignores the norm_added_q some I2V checkpoints carry (never used: the queries are the video's).
TORCH_IGNORE = [r"^blocks\.\d+\.attn2\.norm_added_q\.weight$"]


def params_from_torch(flat: dict, cfg: WanConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: WanTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=TORCH_IGNORE, dtype=dtype,
                          what="Wan transformer checkpoint")


def build(cfg: WanConfig, params: dict, dtype=jnp.float32) -> WanTransformer3DModel:
    return build_module(lambda: WanTransformer3DModel(cfg, dtype=dtype), params)
