"""ChronoEdit transformer (diffusers ``ChronoEditTransformer3DModel``, NVIDIA's ChronoEdit-14B) in Flax NNX.

It is Wan 2.1's image-to-video transformer (:mod:`xdit_jax.models.wan`: the blocks, the CLIP image states with their
own K/V, the embedders, the head and the key map, all inherited as they are) with another 3D RoPE
(``ChronoEditRotaryPosEmbed``); the checkpoints' keys are Wan's (the RoPE has no weights).

The RoPE differs from Wan's in two ways, both reproduced here:

* Two latent frames (the input image and the edit, ChronoEdit's default, or the two end frames kept after the
  temporal reasoning steps) sit at the frame positions 0 and ``rope_temporal_skip_len - 1`` (diffusers:
  ``freqs[:temporal_skip_len][[0, -1]]``), as if the reasoning frames between them were still there; any other count
  at 0, 1, 2, ... as in Wan.
* The per-axis tables are built with Wan's split of the head dim (frames ``d - 4 (d // 6)``, height and width
  ``2 (d // 6)`` each), then cut at ChronoEdit's split (``d - 2 (d // 3)``, ``d // 3``, ``d // 3``). The two agree
  where ``d % 6`` is 0, 1 or 2 (ChronoEdit-14B's 128); elsewhere a column takes its axis from the second split and
  its frequency from the first, and a rotated pair may straddle two axes: diffusers rotates pair ``k`` by the cosine
  of column ``2k`` and the sine of column ``2k + 1``, which the tables here hold in both columns of the pair.

Known difference: diffusers does not keep this RoPE in float32 (``_keep_in_fp32_modules`` lacks ``rope``, Wan's has
it), so a bfloat16 diffusers model rotates by bfloat16-rounded tables; here they stay float32 in every dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import wan
from xdit_jax.models.layers import rope_1d

STACKED = wan.STACKED


@dataclasses.dataclass(frozen=True)
class ChronoEditConfig(wan.WanConfig):
    rope_temporal_skip_len: int = 8

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChronoEditConfig:
        cfg = super().from_dict(d)
        if isinstance(cfg.rope_temporal_skip_len, bool) or not isinstance(cfg.rope_temporal_skip_len, int) \
                or cfg.rope_temporal_skip_len < 1:
            raise ValueError(f"rope_temporal_skip_len={cfg.rope_temporal_skip_len!r} must be an int >= 1 (the frame "
                             "position of the edit, plus one, when two latent frames run).")
        return cfg

    @property
    def chrono_rope_dims(self) -> tuple[int, int, int]:
        """diffusers ``ChronoEditRotaryPosEmbed``'s split of the head dim into (frames, height, width) columns."""
        d = self.attention_head_dim
        return d - 2 * (d // 3), d // 3, d // 3


def frame_positions(cfg: ChronoEditConfig, latent_frames: int) -> np.ndarray:
    """The frame positions of the RoPE: (0, skip - 1) for two latent frames (the table's rows 0 and
    ``min(rope_temporal_skip_len, rope_max_seq_len) - 1``, as diffusers indexes them), else 0, 1, 2, ..."""
    if latent_frames == 2:
        return np.array([0, min(cfg.rope_temporal_skip_len, cfg.rope_max_seq_len) - 1])
    return np.arange(latent_frames)


def rope_table(cfg: ChronoEditConfig, frames: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, head_dim) cos and sin tables of the video tokens (frames, h, w) row-major, as diffusers'
    ``ChronoEditRotaryPosEmbed`` and its ``apply_rotary_emb`` (cosine of column 2k, sine of 2k + 1) rotate them."""
    n = max(frames, grid_h, grid_w)
    if n > cfg.rope_max_seq_len:
        raise ValueError(f"{n} positions along one axis exceed the model's rope_max_seq_len={cfg.rope_max_seq_len}.")

    def full(pos):  # diffusers' concatenated buffers (Wan's split) at these positions: (len(pos), d) cos, sin
        parts = [rope_1d(dim, pos, wan.ROPE_THETA) for dim in cfg.rope_dims]
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)

    s0, s1, _ = cfg.chrono_rope_dims
    cols = (slice(0, s0), slice(s0, s0 + s1), slice(s0 + s1, None))
    positions = (frame_positions(cfg, frames), np.arange(grid_h), np.arange(grid_w))
    shapes = ((frames, 1, 1), (1, grid_h, 1), (1, 1, grid_w))
    tabs = []
    for which in (0, 1):
        grids = []
        for pos, col, shape in zip(positions, cols, shapes):
            t = full(pos)[which][:, col]
            grids.append(np.broadcast_to(t.reshape(*shape, -1), (frames, grid_h, grid_w, t.shape[1])))
        tab = np.concatenate(grids, axis=-1).reshape(frames * grid_h * grid_w, -1)
        tab = np.repeat(tab[:, which::2], 2, axis=1)  # cos: column 2k's; sin: column 2k + 1's (diffusers' pairs)
        tabs.append(tab.astype(np.float32))
    return tabs[0], tabs[1]


class ChronoEditTransformer3DModel(wan.WanTransformer3DModel):
    """``model(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)`` as diffusers' forward
    (:class:`xdit_jax.models.wan.WanTransformer3DModel`'s, with ChronoEdit's RoPE)."""

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
              first_frame_timestep=None):
        """As :meth:`WanTransformer3DModel.embed`, ``tokens["rope"]`` ChronoEdit's (:func:`rope_table`)."""
        if first_frame_timestep is not None:
            raise ValueError("first_frame_timestep is Wan 2.2 TI2V-5B's; ChronoEdit takes one timestep per sample.")
        cfg = self.cfg
        _, _, f, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        if f == 2 and pt != 1:
            raise ValueError(f"Two latent frames with a temporal patch size {pt}: diffusers' ChronoEdit RoPE places "
                             "two frames at positions 0 and skip - 1 only for patch size 1.")
        x, tokens, cond = super().embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        cos, sin = rope_table(cfg, f // pt, h // ph, w // pw)
        tokens["rope"] = (jnp.asarray(cos), jnp.asarray(sin))
        return x, tokens, cond

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def params_from_torch(flat: dict, cfg: ChronoEditConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: ChronoEditTransformer3DModel(cfg)),
                          stacked={STACKED: cfg.num_layers}, renames=wan.TORCH_RENAMES, ignore=wan.TORCH_IGNORE,
                          dtype=dtype, what="ChronoEdit transformer checkpoint")


def build(cfg: ChronoEditConfig, params: dict, dtype=jnp.float32) -> ChronoEditTransformer3DModel:
    return build_module(lambda: ChronoEditTransformer3DModel(cfg, dtype=dtype), params)
