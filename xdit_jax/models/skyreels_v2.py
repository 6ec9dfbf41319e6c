"""SkyReels-V2 transformer (diffusers ``SkyReelsV2Transformer3DModel``) in Flax NNX: Wan 2.1's model
(:mod:`xdit_jax.models.wan`, its blocks, embedders, head and key map) with what SkyReels-V2 adds.

* A timestep per latent frame (diffusers' ``enable_diffusion_forcing=True`` with a (B, F) ``timestep``): every frame
  its own time embedding and modulation (``cond["timestep_proj"]`` (B, F, 6, D), ``cond["temb"]`` (B, F, D)); each
  token takes its frame's (``tokens["frame"]``, sharded with the tokens), in the blocks and in the head.
* The block-causal self-attention of diffusion forcing (``num_frame_per_block`` > 1, set by diffusers'
  ``_set_ar_attention(causal_block_size)``): a token attends to the tokens of its own block of
  ``num_frame_per_block`` latent frames and of the blocks before it. The tokens' block ids (``tokens["segment"]``)
  go to :func:`xdit_jax.parallel.attention.attention` as ``segments``, which keeps the mask exact under
  Ulysses and ring, and applies it to PipeFusion's buffered keys (``run_pipefusion(..., segments="segment")``).
* The fps embedding (``inject_sample_info``: the diffusion-forcing checkpoints): ``fps_embedding`` (2 rows: 16 fps
  and the rest) through ``fps_projection`` (Linear, SiLU, Linear to 6 x D), added to every frame's modulation.
* The timestep sinusoids of ``get_1d_sincos_pos_embed_from_grid``, which diffusers computes in float64 here
  (:func:`xdit_jax.models.wan.sincos_timestep_embedding`: float32, rounded as float64's would be).

The image-to-video transformers (``image_dim``: SkyReels-V2-I2V) are Wan 2.1 I2V's structure (CLIP image states,
attn2's added K/V), inherited as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import wan
from xdit_jax.models.layers import linear

STACKED = wan.STACKED


@dataclasses.dataclass(frozen=True)
class SkyReelsV2Config(wan.WanConfig):
    # diffusers' SkyReelsV2Transformer3DModel defaults (the 1.3B's width)
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    text_dim: int = 4096
    ffn_dim: int = 8192
    num_layers: int = 32
    inject_sample_info: bool = False
    num_frame_per_block: int = 1

    float64_sinusoids = True  # (a class constant, not a config field: the timestep sinusoids of SkyReels-V2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkyReelsV2Config:
        cfg = super().from_dict(d)
        if not isinstance(cfg.num_frame_per_block, int) or cfg.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block={cfg.num_frame_per_block!r} must be an int >= 1 (the causal block "
                             "size of diffusion forcing, in latent frames).")
        return cfg


TORCH_RENAMES = wan.TORCH_RENAMES + [
    (r"^fps_projection\.net_0\.", "fps_projection.net.0.proj."),
    (r"^fps_projection\.net_2\.", "fps_projection.net.2."),
]


class FpsProjection(nnx.Module):
    """diffusers ``FeedForward(D, 6 D, mult=1, activation_fn="linear-silu")``: Linear, SiLU, Linear."""

    def __init__(self, d: int, *, dtype, rngs):
        self.net_0 = linear(d, d, dtype=dtype, rngs=rngs)
        self.net_2 = linear(d, 6 * d, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.net_2(jax.nn.silu(self.net_0(x)))


def fps_index(fps) -> int:
    """diffusers' DF pipelines' fps embedding row: 0 for 16 fps, 1 for any other rate."""
    return 0 if fps == 16 else 1


class SkyReelsV2Transformer3DModel(wan.WanTransformer3DModel):
    """``model(hidden_states, timestep, encoder_hidden_states, fps=None)`` as diffusers' forward.

    ``timestep``: (B,) or a scalar (diffusers' plain call), or (B, F') a timestep per latent frame (diffusers'
    ``enable_diffusion_forcing=True``); ``fps`` (required by an ``inject_sample_info`` model, taken by no other):
    (B,) or a scalar, the fps embedding's row (:func:`fps_index`; diffusers' ``fps`` argument of the transformer).
    """

    def __init__(self, cfg: SkyReelsV2Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        if cfg.inject_sample_info:
            self.fps_embedding = nnx.Embed(2, cfg.inner_dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
            self.fps_projection = FpsProjection(cfg.inner_dim, dtype=dtype, rngs=rngs)

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None, fps=None):
        """As :meth:`WanTransformer3DModel.embed`; with a (B, F') ``timestep``: ``tokens["frame"]`` (S,) and a
        modulation per frame in cond; with ``num_frame_per_block`` > 1: ``tokens["segment"]`` (S,) the tokens'
        causal block."""
        cfg, dtype = self.cfg, self.dtype
        b, _, f, h, w = hidden_states.shape
        t = jnp.asarray(timestep)
        per_frame = t.ndim == 2
        frames = f // cfg.patch_size[0]
        if t.ndim > 2 or (per_frame and t.shape != (b, frames)):
            raise ValueError(f"timestep {tuple(t.shape)}: give (batch,) or a timestep per latent frame "
                             f"({b}, {frames}).")
        x, tokens, cond = super().embed(hidden_states, t[:, 0] if per_frame else t, encoder_hidden_states,
                                        encoder_hidden_states_image)
        hw = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        frame = np.arange(frames * hw, dtype=np.int32) // hw
        if per_frame:
            temb, proj = self.condition_embedder.embed_time(t.reshape(-1), dtype)
            cond["temb"] = temb.reshape(b, frames, -1)
            cond["timestep_proj"] = proj.reshape(b, frames, 6, cfg.inner_dim)
            tokens["frame"] = jnp.asarray(frame)
        if cfg.inject_sample_info:
            if fps is None:
                raise ValueError("This SkyReels-V2 transformer (inject_sample_info) takes fps: the fps embedding's row, "
                                 "0 for 16 fps, 1 otherwise (diffusers' pipelines pass it).")
            rows = jnp.broadcast_to(jnp.asarray(fps, jnp.int32).reshape(-1), (b,))
            add = self.fps_projection(self.fps_embedding(rows)).reshape(b, 6, cfg.inner_dim)
            proj = cond["timestep_proj"]
            cond["timestep_proj"] = proj + (add[:, None] if per_frame else add).astype(proj.dtype)
        elif fps is not None:
            raise ValueError("fps given, but this transformer has no fps embedding (inject_sample_info is false).")
        n = cfg.num_frame_per_block
        if n > 1:
            if frames % n:
                raise ValueError(f"{frames} latent frames are not a multiple of the causal block size "
                                 f"num_frame_per_block={n} (diffusers' mask needs whole blocks).")
            tokens["segment"] = jnp.asarray(frame // n)
        return x, tokens, cond

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None, fps=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, fps)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def with_causal_block_size(cfg: SkyReelsV2Config, causal_block_size: int | None) -> SkyReelsV2Config:
    """diffusers' ``_set_ar_attention(causal_block_size)``: the config with that ``num_frame_per_block`` (None: as
    it is)."""
    if causal_block_size is None:
        return cfg
    if isinstance(causal_block_size, bool) or not isinstance(causal_block_size, (int, np.integer)) \
            or causal_block_size < 1:
        raise ValueError(f"causal_block_size={causal_block_size!r} must be an int >= 1 (latent frames per block).")
    return dataclasses.replace(cfg, num_frame_per_block=int(causal_block_size))


def check_input_shape(cfg: SkyReelsV2Config, latent_frames: int, latent_h: int, latent_w: int) -> None:
    """Wan's shape check (:func:`xdit_jax.models.wan.check_input_shape`), and with causal blocks whole blocks of
    latent frames (the model's own refusal, before anything is traced)."""
    wan.check_input_shape(cfg, latent_frames, latent_h, latent_w)
    frames, n = latent_frames // cfg.patch_size[0], cfg.num_frame_per_block
    if n > 1 and frames % n:
        raise ValueError(f"{frames} latent frames are not a multiple of the causal block size num_frame_per_block={n} "
                         f"(diffusers' mask needs whole blocks): pick num_frames so that the latent frames divide.")


def params_from_torch(flat: dict, cfg: SkyReelsV2Config, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: SkyReelsV2Transformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=TORCH_RENAMES, ignore=wan.TORCH_IGNORE,
                          dtype=dtype, what="SkyReels-V2 transformer checkpoint")


def build(cfg: SkyReelsV2Config, params: dict, dtype=jnp.float32) -> SkyReelsV2Transformer3DModel:
    return build_module(lambda: SkyReelsV2Transformer3DModel(cfg, dtype=dtype), params)
