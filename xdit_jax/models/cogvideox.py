"""CogVideoX transformer (diffusers ``CogVideoXTransformer3DModel``) in Flax NNX.

All released variants: 2B (3D sin-cos positions, Conv2d patch embed), 5B (3D RoPE) and 1.5 (RoPE,
``patch_size_t=2``, Linear patch embed), and the image-to-video ones: 5B-I2V (32 input channels: the noise and the
image's latents; a learned positional table over the joint [text; video] sequence on top of RoPE, used as diffusers
does: only at the checkpoint's ``sample_height`` x ``sample_width``, and replaced by the 3D sin-cos table where the
frame count differs from ``sample_frames``) and 1.5-I2V (the ``ofs`` embedding added to the time embedding). Submodules carry the diffusers names so the
torch -> Flax key map is derived (``xdit_jax.keymap``); the table below lists what differs.
The blocks are stacked on a leading layer axis and run with one ``lax.scan``.
Attention goes through :func:`xdit_jax.parallel.attention.attention` (never a collective here).
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
    TimestepEmbedding,
    apply_rope,
    linear,
    rope_1d,
    scan_modules,
    sincos_1d,
    stack_modules,
    timestep_embedding,
)
from xdit_jax.parallel.attention import attention

STACKED = "transformer_blocks"  # the stacked blocks (one scan; PipeFusion splits them into stages)


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig(TransformerDims):
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    qk_norm_affine: bool = True  # (not a diffusers field) CogView3-Plus's blocks: q/k LayerNorms without weights

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CogVideoXConfig":
        cfg = cls(**known_fields(cls, d))
        if cfg.use_learned_positional_embeddings and not cfg.use_rotary_positional_embeddings:
            raise ValueError("Learned positional embeddings without rotary ones: no CogVideoX checkpoint has them "
                             "(diffusers refuses them too).")
        if cfg.ofs_embed_dim and cfg.ofs_embed_dim != cfg.time_embed_dim:
            raise ValueError(f"ofs_embed_dim {cfg.ofs_embed_dim} must equal time_embed_dim {cfg.time_embed_dim} "
                             "(the ofs embedding is added to the time embedding).")
        if cfg.activation_fn != "gelu-approximate" or cfg.timestep_activation_fn != "silu":
            raise ValueError(f"Unsupported activations {cfg.activation_fn!r}/{cfg.timestep_activation_fn!r}.")
        return cfg


# torch names that differ from the Flax path (regex on the derived torch name).
TORCH_RENAMES = [
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.net_0\.", ".ff.net.0.proj."),
    (r"\.ff\.net_2\.", ".ff.net.2."),
]
# Non-persistent buffers some exports include (5B-I2V's learned table is a parameter: loaded).
TORCH_IGNORE = [r"^patch_embed\.pos_embedding$"]


def select_stream(is_text, text_value, video_value):
    """Per-token choice between the text and the video stream's (B, D) modulation -> (B, S, D)."""
    return jnp.where(is_text[None, :, None], text_value[:, None], video_value[:, None])


class LayerNormZero(nnx.Module):
    """diffusers ``CogVideoXLayerNormZero`` on the joint [text; video] sequence: one norm, and
    each token modulated by its own stream's shift/scale (``is_text`` says which)."""

    def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs):
        self.linear = linear(cfg.time_embed_dim, 6 * cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.inner_dim, cfg.norm_eps, cfg.norm_elementwise_affine, dtype=dtype)

    def __call__(self, x, temb, is_text):
        shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(self.linear(jax.nn.silu(temb)), 6, axis=-1)
        y = self.norm(x) * (1 + select_stream(is_text, e_scale, scale)) + select_stream(is_text, e_shift, shift)
        return y, select_stream(is_text, e_gate, gate)


class Attention(nnx.Module):
    def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.to_q = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(d, d, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.norm_q = LayerNorm(hd, 1e-6, cfg.qk_norm_affine, dtype=dtype)
        self.norm_k = LayerNorm(hd, 1e-6, cfg.qk_norm_affine, dtype=dtype)
        self.to_out = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope):
        b, s, _ = x.shape
        q = self.norm_q(self.to_q(x).reshape(b, s, self.heads, -1))
        k = self.norm_k(self.to_k(x).reshape(b, s, self.heads, -1))
        v = self.to_v(x).reshape(b, s, self.heads, -1)
        if rope is not None:  # per-token tables; text tokens have cos=1, sin=0 (no rotation)
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        o = attention(q, k, v)
        return self.to_out(o.reshape(b, s, -1))


class CogVideoXBlock(nnx.Module):
    def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs):
        self.norm1 = LayerNormZero(cfg, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNormZero(cfg, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, temb, tokens):
        """x: the joint [text; video] sequence (B, S, D), or any contiguous piece of it."""
        is_text, rope = tokens["is_text"], tokens.get("rope")
        h, gate = self.norm1(x, temb, is_text)
        x = x + gate * self.attn1(h, rope)
        h, gate = self.norm2(x, temb, is_text)
        return x + gate * self.ff(h)


class AdaLayerNormOut(nnx.Module):
    """diffusers ``AdaLayerNorm(chunk_dim=1)``: shift, scale from the time embedding (``eps``: the norm's, default
    the config's ``norm_eps``)."""

    def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs, eps: float | None = None):
        self.linear = linear(cfg.time_embed_dim, 2 * cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(cfg.inner_dim, cfg.norm_eps if eps is None else eps, cfg.norm_elementwise_affine,
                              dtype=dtype)

    def __call__(self, x, temb):
        shift, scale = jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs):
        p = cfg.patch_size
        if cfg.patch_size_t is None:
            self.proj = nnx.Conv(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), strides=(p, p),
                                 padding="VALID", use_bias=cfg.patch_bias, dtype=dtype, param_dtype=dtype,
                                 rngs=rngs)
        else:
            self.proj = linear(cfg.in_channels * p * p * cfg.patch_size_t, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.text_proj = linear(cfg.text_embed_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)
        if cfg.use_learned_positional_embeddings:  # 5B-I2V: over [text; video] at the sample size
            self.pos_embedding = nnx.Param(jnp.zeros((1, cfg.max_text_seq_length + learned_table_tokens(cfg),
                                                      cfg.inner_dim), dtype))


def learned_table_tokens(cfg: CogVideoXConfig) -> int:
    """Video tokens of the learned positional table (5B-I2V): the checkpoint's sample video's."""
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    if cfg.patch_size_t is not None:
        frames = (frames + cfg.patch_size_t - 1) // cfg.patch_size_t
    return frames * (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size)


def sincos_table(cfg: CogVideoXConfig, frames: int, grid_h: int, grid_w: int) -> np.ndarray:
    """diffusers ``get_3d_sincos_pos_embed`` for the video tokens, (frames*h*w, inner_dim) float32."""
    d = cfg.inner_dim
    ds, dt = 3 * d // 4, d // 4
    gh = np.arange(grid_h, dtype=np.float32) / cfg.spatial_interpolation_scale
    gw = np.arange(grid_w, dtype=np.float32) / cfg.spatial_interpolation_scale
    ww, hh = np.meshgrid(gw, gh, indexing="xy")  # (h, w) each
    spatial = np.concatenate([sincos_1d(ds // 2, ww.reshape(-1)), sincos_1d(ds // 2, hh.reshape(-1))], axis=1)
    gt = np.arange(frames, dtype=np.float32) / cfg.temporal_interpolation_scale
    temporal = sincos_1d(dt, gt)
    table = np.concatenate([np.repeat(temporal[:, None], grid_h * grid_w, axis=1),
                            np.repeat(spatial[None], frames, axis=0)], axis=-1)
    return table.reshape(frames * grid_h * grid_w, d).astype(np.float32)


def _crop_region(src_h, src_w, tgt_w, tgt_h):
    r = src_h / src_w
    if r > tgt_h / tgt_w:
        rh, rw = tgt_h, int(round(tgt_h / src_h * src_w))
    else:
        rw, rh = tgt_w, int(round(tgt_w / src_w * src_h))
    top, left = int(round((tgt_h - rh) / 2.0)), int(round((tgt_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_table(cfg: CogVideoXConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """The 3D RoPE tables the diffusers pipeline builds (``_prepare_rotary_positional_embeddings``)."""
    p = cfg.patch_size
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if cfg.patch_size_t is None:
        (t0, l0), (t1, l1) = _crop_region(grid_h, grid_w, base_w, base_h)
        pos_h = np.linspace(t0, t1 * (grid_h - 1) / grid_h, grid_h, dtype=np.float64)
        pos_w = np.linspace(l0, l1 * (grid_w - 1) / grid_w, grid_w, dtype=np.float64)
        pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float64)
    else:
        pos_h = np.arange(grid_h, dtype=np.float64)
        pos_w = np.arange(grid_w, dtype=np.float64)
        pos_t = np.arange(frames, dtype=np.float64)
    hd = cfg.attention_head_dim
    dim_t, dim_hw = hd // 4, hd // 8 * 3
    tabs = [rope_1d(dim_t, pos_t), rope_1d(dim_hw, pos_h), rope_1d(dim_hw, pos_w)]
    out = []
    for k in range(2):  # cos, sin
        t_, h_, w_ = (tab[k] for tab in tabs)
        full = np.concatenate([
            np.broadcast_to(t_[:, None, None, :], (frames, grid_h, grid_w, t_.shape[-1])),
            np.broadcast_to(h_[None, :, None, :], (frames, grid_h, grid_w, h_.shape[-1])),
            np.broadcast_to(w_[None, None, :, :], (frames, grid_h, grid_w, w_.shape[-1])),
        ], axis=-1)
        out.append(full.reshape(frames * grid_h * grid_w, -1).astype(np.float32))
    return out[0], out[1]


class CogVideoXTransformer3DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep)`` as diffusers' forward.

    hidden_states: (B, F, C, H, W) latents (diffusers' layout); encoder_hidden_states: (B, L, text_dim);
    timestep: (B,); ``ofs`` (1.5-I2V only, required there): a scalar or (B,) (the pipeline's 2.0). Returns the
    prediction in the latents' layout.
    """

    def __init__(self, cfg: CogVideoXConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(cfg.inner_dim, cfg.time_embed_dim, dtype=dtype, rngs=rngs)
        if cfg.ofs_embed_dim:  # 1.5-I2V
            self.ofs_embedding = TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: CogVideoXBlock(cfg, dtype=dtype, rngs=r),
                                                cfg.num_layers, rngs)
        self.norm_final = LayerNorm(cfg.inner_dim, cfg.norm_eps, cfg.norm_elementwise_affine, dtype=dtype)
        self.norm_out = AdaLayerNormOut(cfg, dtype=dtype, rngs=rngs)
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        self.proj_out = linear(cfg.inner_dim, p * p * pt * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- pieces: embed (global) -> blocks (per token, any contiguous shard) -> head (global) --
    # The parallel engine (xdit_jax.parallel) shards the joint sequence between embed and head.

    def embed(self, hidden_states, encoder_hidden_states, timestep, ofs=None):
        """-> (joint, tokens, temb): the joint [text; video] sequence (B, S, D); per-token tables
        ``tokens`` ({"is_text": (S,) bool, "rope": ((S, hd), (S, hd)) or absent}); temb (B, E)."""
        cfg, dtype = self.cfg, self.dtype
        b, f, c, h, w = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        temb = timestep_embedding(jnp.asarray(timestep).reshape(-1), cfg.inner_dim, cfg.flip_sin_to_cos,
                                  cfg.freq_shift)
        temb = self.time_embedding(jnp.broadcast_to(temb, (b, cfg.inner_dim)).astype(dtype))
        if bool(cfg.ofs_embed_dim) != (ofs is not None):
            raise ValueError("ofs is required by a CogVideoX1.5 image-to-video transformer (ofs_embed_dim set; its "
                             "pipeline passes 2.0) and taken by no other." if cfg.ofs_embed_dim else
                             "ofs given, but this transformer has no ofs embedding (ofs_embed_dim is None).")
        if ofs is not None:
            o = timestep_embedding(jnp.asarray(ofs, jnp.float32).reshape(-1), cfg.ofs_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
            temb = temb + self.ofs_embedding(o.astype(dtype))
        enc = self.patch_embed.text_proj(encoder_hidden_states.astype(dtype))
        x = hidden_states.astype(dtype)
        if pt is None:
            x = x.reshape(b * f, c, h, w).transpose(0, 2, 3, 1)
            x = self.patch_embed.proj(x).reshape(b, f * (h // p) * (w // p), cfg.inner_dim)
            frames = f
        else:
            x = x.transpose(0, 1, 3, 4, 2).reshape(b, f // pt, pt, h // p, p, w // p, p, c)
            x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, (f // pt) * (h // p) * (w // p), -1)
            x = self.patch_embed.proj(x)
            frames = (f + pt - 1) // pt
        text_len, n_video = enc.shape[1], x.shape[1]
        tokens = {"is_text": jnp.asarray(np.arange(text_len + n_video) < text_len)}
        if cfg.use_rotary_positional_embeddings:
            cos, sin = rope_table(cfg, frames, h // p, w // p)
            hd = cfg.attention_head_dim
            tokens["rope"] = (jnp.asarray(np.concatenate([np.ones((text_len, hd), np.float32), cos])),
                              jnp.asarray(np.concatenate([np.zeros((text_len, hd), np.float32), sin])))
        if cfg.use_learned_positional_embeddings:  # 5B-I2V: RoPE and a positional table, as diffusers
            if (h, w) != (cfg.sample_height, cfg.sample_width):
                raise ValueError(f"This model's learned positional table (CogVideoX-5b-I2V) is for latents of "
                                 f"{cfg.sample_height} x {cfg.sample_width} (a {cfg.sample_height * 8} x "
                                 f"{cfg.sample_width * 8} video); got {h} x {w}. Generate at that size.")
            if (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
                if text_len != cfg.max_text_seq_length:
                    raise ValueError(f"The learned positional table covers {cfg.max_text_seq_length} text tokens; "
                                     f"got {text_len} (use max_sequence_length={cfg.max_text_seq_length}).")
                joint = jnp.concatenate([enc, x], axis=1)
                return joint + self.patch_embed.pos_embedding[...].astype(dtype), tokens, temb
            # another frame count: diffusers computes the 3D sin-cos table of that size instead
        if cfg.use_learned_positional_embeddings or not cfg.use_rotary_positional_embeddings:
            x = x + jnp.asarray(sincos_table(cfg, frames, h // p, w // p)).astype(dtype)[None]
        return jnp.concatenate([enc, x], axis=1), tokens, temb

    def blocks(self, joint, tokens, temb):
        """The block stack (one lax.scan) on the joint sequence or a contiguous shard of it."""
        return scan_modules(self.transformer_blocks, lambda blk, x: blk(x, temb, tokens), joint)

    def head(self, joint, temb, shape):
        """Video tokens of the joint sequence -> the prediction in the latents' layout ``shape``."""
        cfg = self.cfg
        b, f, c, h, w = shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        n_video = ((f + (pt or 1) - 1) // (pt or 1)) * (h // p) * (w // p)
        x = joint[:, joint.shape[1] - n_video:]
        x = self.norm_final(x)
        x = self.proj_out(self.norm_out(x, temb))
        if pt is None:
            x = x.reshape(b, f, h // p, w // p, -1, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
            return x.reshape(b, f, -1, h, w)
        x = x.reshape(b, (f + pt - 1) // pt, h // p, w // p, -1, pt, p, p)
        x = x.transpose(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, -1, x.shape[3], h, w)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, ofs=None):
        joint, tokens, temb = self.embed(hidden_states, encoder_hidden_states, timestep, ofs)
        return self.head(self.blocks(joint, tokens, temb), temb, hidden_states.shape)


def check_input_shape(cfg: CogVideoXConfig, latent_frames: int, latent_h: int, latent_w: int) -> None:
    """Refuse latent shapes the model cannot take, with what to do instead."""
    p = cfg.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"Latent height/width {latent_h}x{latent_w} must be multiples of the patch size {p} "
                         f"(pixel height and width multiples of {8 * p}).")
    if cfg.patch_size_t and latent_frames % cfg.patch_size_t:
        raise ValueError(f"{latent_frames} latent frames are not a multiple of patch_size_t={cfg.patch_size_t}.")


def params_from_torch(flat: dict, cfg: CogVideoXConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: CogVideoXTransformer3DModel(cfg)),
                          stacked={"transformer_blocks": cfg.num_layers}, renames=TORCH_RENAMES,
                          ignore=[] if cfg.use_learned_positional_embeddings else TORCH_IGNORE, dtype=dtype,
                          what="CogVideoX transformer checkpoint")


def build(cfg: CogVideoXConfig, params: dict, dtype=jnp.float32) -> CogVideoXTransformer3DModel:
    return build_module(lambda: CogVideoXTransformer3DModel(cfg, dtype=dtype), params)
