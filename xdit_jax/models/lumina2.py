"""Lumina-Image 2.0 transformer (diffusers ``Lumina2Transformer2DModel``, NextDiT; Alpha-VLLM/Lumina-Image-2.0) in
Flax NNX.

Z-Image (:mod:`xdit_jax.models.zimage`) descends from this architecture; the blocks, the timestep MLP, the final
layer, RoPE and the block stacks are Z-Image's classes, read through the config's properties where the two differ
(``kv_heads``: grouped K/V; ``modulation_silu``: ``LuminaRMSNormZero`` applies SiLU before its Linear; ``t_hidden``
/ ``adaln_dim``: ``min(hidden, 1024)``; ``ffn_dim``: ``LuminaFeedForward``'s ``4 hidden`` rounded up to
``multiple_of``; ``rope_angles_f32`` False: diffusers' float64 rotary tables; ``t_scale`` 1: the pipeline passes
``1 - t / 1000`` straight to the sinusoids).

What Lumina 2 does otherwise than Z-Image (here in :meth:`Lumina2Transformer2DModel.embed`): no pad tokens (the
image tokens are ``(H / 2) (W / 2)``, the caption keeps its ``encoder_attention_mask``: prompt ``i``'s first
``n_i`` tokens); RoPE from 3-axis position ids with theta 10000, the caption's token ``j`` at ``(j, 0, 0)``, the
image's patch ``(h, w)`` at ``(n_i, h, w)`` (diffusers' ``Lumina2RotaryPosEmbed``); the main layers run over the
joint ``[caption, image]`` sequence of each prompt (its padded keys masked where the prompts' lengths differ). The
order of keys does not change an attention, so here, as in Z-Image, the image tokens are the sequence and the
caption joins the main layers' attention as the masked *context* (:data:`xdit_jax.models.zimage.TEXT_KEYS`), and
the sequence-parallel split, PipeFusion's stacks and the head are Z-Image's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module
from xdit_jax.models import zimage
from xdit_jax.models.zimage import (  # noqa: F401  (re-exported: the shared pieces)
    STACKED,
    TEXT_KEYS,
    Block,
    FinalLayer,
    TimestepEmbedder,
    axis_table,
    pipefusion_stacks,
    position_tables,
)

MAX_CAPTION = 512  # diffusers' Lumina2Pipeline refuses max_sequence_length > 512


@dataclasses.dataclass(frozen=True)
class Lumina2Config:
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 2304
    num_layers: int = 26
    num_refiner_layers: int = 2
    num_attention_heads: int = 24
    num_kv_heads: int | None = 8
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    scaling_factor: float = 1.0  # not read by diffusers' forward
    axes_dim_rope: tuple[int, ...] = (32, 32, 32)
    axes_lens: tuple[int, ...] = (300, 512, 512)
    cap_feat_dim: int = 1024

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lumina2Config:
        return cls(**known_fields(cls, d))

    def __post_init__(self):
        for name in ("axes_dim_rope", "axes_lens"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}, itself a multiple of num_kv_heads {self.num_kv_heads}.")
        hd = self.hidden_size // self.num_attention_heads
        if len(self.axes_dim_rope) != 3 or len(self.axes_lens) != 3 or sum(self.axes_dim_rope) != hd \
                or any(a % 2 for a in self.axes_dim_rope):
            raise ValueError(f"axes_dim_rope {self.axes_dim_rope} must be 3 even sizes summing to the head dim {hd} "
                             f"(with 3 axes_lens, got {self.axes_lens}).")

    # the names of the blocks shared with Z-Image (xdit_jax.models.zimage)
    dim = property(lambda self: self.hidden_size)
    n_heads = property(lambda self: self.num_attention_heads)
    kv_heads = property(lambda self: self.num_kv_heads)
    n_layers = property(lambda self: self.num_layers)
    n_refiner_layers = property(lambda self: self.num_refiner_layers)
    axes_dims = property(lambda self: self.axes_dim_rope)
    qk_norm = True
    rope_theta = 10000.0
    rope_angles_f32 = False
    modulation_silu = True
    t_scale = 1.0

    @property
    def adaln_dim(self) -> int:
        return min(self.hidden_size, 1024)

    t_hidden = adaln_dim

    @property
    def ffn_dim(self) -> int:
        inner = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * -(-inner // self.multiple_of)

    # the names the pipelines' shared code reads
    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def inner_dim(self) -> int:
        return self.hidden_size

    @property
    def out_ch(self) -> int:
        return self.out_channels


def lens_from_mask(mask, what: str = "encoder_attention_mask") -> np.ndarray:
    """(B,) kept-token counts of a (B, L) caption mask, which must keep a prefix of each row (the tokenizer pads on
    the right, as diffusers' pipeline sets it): diffusers' transformer places the first ``sum(mask)`` rows."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"{what} must be (batch, tokens); got shape {m.shape}.")
    lens = m.sum(1)
    if not (m == (np.arange(m.shape[1])[None] < lens[:, None])).all() or (lens < 1).any():
        raise ValueError(f"{what} must keep a non-empty prefix of each row (right padding, as Lumina2Pipeline's "
                         "tokenizer pads); diffusers' transformer reads only its row sums.")
    return lens.astype(np.int32)


class Lumina2Transformer2DModel(zimage.ZImageTransformer2DModel):
    """``model(hidden_states, timestep, cap_feats, cap_lens)``: latents (B, C, H, W), ``timestep`` (B,) as diffusers'
    pipeline passes it (``1 - t / 1000``), caption features (B, L, cap_feat_dim) of which the first ``cap_lens[i]``
    rows are prompt ``i``'s (None: all ``L``; :func:`lens_from_mask` turns diffusers' ``encoder_attention_mask``
    into them) -> (B, out_channels, H, W). ``__init__`` (but the pad tokens), ``blocks`` / ``head`` / ``image_rope``
    and ``__call__`` are Z-Image's."""

    pad_tokens = False

    def embed(self, hidden_states, timestep, cap_feats, cap_lens=None):
        """-> (image tokens (B, N, D), tokens {"rope_hw", "real"}, cond {"adaln", "context" (B, L, D),
        "context_rope", "context_mask" bool (B, L), "t_rope"}): the embeddings, the context refiner over the
        caption and the RoPE tables."""
        cfg, dtype = self.cfg, self.dtype
        x = jnp.asarray(hidden_states)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}.")
        b, c = x.shape[:2]
        gh, gw = self.grid(x.shape)
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        adaln = self.t_embedder(t * cfg.t_scale, dtype)

        n = gh * gw
        x = x.astype(dtype).reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        x = self.x_embedder(x)

        cap = jnp.asarray(cap_feats)
        if cap.ndim != 3 or cap.shape[0] != b or cap.shape[2] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be ({b}, tokens, {cfg.cap_feat_dim}); got {tuple(cap.shape)}.")
        length = cap.shape[1]
        lens = jnp.full((b,), length, jnp.int32) if cap_lens is None else jnp.asarray(cap_lens, jnp.int32).reshape(b)
        cap = self.cap_linear(self.cap_norm(cap.astype(dtype)))
        mask = jnp.arange(length)[None] < lens[:, None]
        # the caption's token j at (j, 0, 0) (rows past n_i: masked keys, dropped queries; their positions clipped to
        # the table: a caption array padded past axes_lens[0] is fine, a prompt that long is not:
        # check_caption_length)
        ids = np.zeros((length, 3), np.int64)
        ids[:, 0] = np.minimum(np.arange(length), cfg.axes_lens[0] - 1)
        c_rope = tuple(jnp.broadcast_to(jnp.asarray(a)[None], (b,) + a.shape) for a in position_tables(ids, cfg))
        graphdef, state = nnx.split(self.context_refiner)
        cap, _ = jax.lax.scan(lambda h, s: (nnx.merge(graphdef, s)(h, None, c_rope, kv_valid=mask), None), cap, state)

        # image RoPE: (h, w) per token, t = n_i per sample
        hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        img_ids = np.stack([np.zeros(n, np.int64), hh.reshape(-1), ww.reshape(-1)], 1)
        cos_hw, sin_hw = position_tables(img_ids, cfg)
        h0 = cfg.axes_dims[0] // 2
        cos0, sin0 = axis_table(cfg.axes_dims[0], cfg.axes_lens[0], cfg.rope_theta, cfg.rope_angles_f32)
        t_rope = (jnp.take(jnp.asarray(cos0), lens, axis=0), jnp.take(jnp.asarray(sin0), lens, axis=0))
        tokens = {"rope_hw": (jnp.asarray(cos_hw[:, h0:]), jnp.asarray(sin_hw[:, h0:])),
                  "real": jnp.ones((n,), bool)}
        cond = {"adaln": adaln, "context": cap, "context_rope": c_rope, "context_mask": mask, "t_rope": t_rope}
        return x, tokens, cond


def check_caption_length(length: int, cfg: Lumina2Config) -> None:
    """The caption's positions (and the image's t = n_i) index the first RoPE axis: refuse captions past it."""
    if length >= cfg.axes_lens[0]:
        raise ValueError(f"A caption of {length} tokens is past this model's first RoPE axis (axes_lens[0] = "
                         f"{cfg.axes_lens[0]}: at most {cfg.axes_lens[0] - 1} tokens); lower max_sequence_length.")


# ----- conversion -----

TORCH_RENAMES = [
    (r"^t_embedder\.mlp_0\.", "time_caption_embed.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp_2\.", "time_caption_embed.timestep_embedder.linear_2."),
    (r"^cap_norm\.", "time_caption_embed.caption_embedder.0."),
    (r"^cap_linear\.", "time_caption_embed.caption_embedder.1."),
    (r"^final_layer\.adaLN_modulation\.", "norm_out.linear_1."),
    (r"^final_layer\.linear\.", "norm_out.linear_2."),
    (r"^context_refiner\.(\d+)\.attention_norm1\.", r"context_refiner.\1.norm1."),
    (r"\.attention_norm1\.", ".norm1.norm."),
    (r"\.adaLN_modulation\.", ".norm1.linear."),
    (r"\.attention_norm2\.", ".norm2."),
    (r"\.attention\.to_out\.", ".attn.to_out.0."),
    (r"\.attention\.", ".attn."),
    (r"\.feed_forward\.w(\d)\.", r".feed_forward.linear_\1."),
]


def params_from_torch(flat: dict, cfg: Lumina2Config, dtype=None) -> dict:
    return zimage.params_from_torch(flat, cfg, dtype, model=Lumina2Transformer2DModel, renames=TORCH_RENAMES,
                                    what="Lumina 2")


def build(cfg: Lumina2Config, params: dict, dtype=jnp.float32) -> Lumina2Transformer2DModel:
    return build_module(lambda: Lumina2Transformer2DModel(cfg, dtype=dtype), params)
