"""Wan VACE transformer (diffusers ``WanVACETransformer3DModel``) in Flax NNX: :mod:`xdit_jax.models.wan` plus VACE.

VACE conditions Wan 2.1 on a control video: its ``control_hidden_states`` (B, ``vace_in_channels``, F, H, W) — the
inactive and reactive latents of the video split by its mask, then the mask folded to 64 channels, see
:class:`xdit_jax.pipelines.wan_vace.WanVACEPipeline` — are patch-embedded by ``vace_patch_embedding`` (zero tokens
appended where they are fewer than the video's) and run through a second stack of Wan blocks, ``vace_blocks``: the
first adds the video's embedded tokens after a ``proj_in`` of its own, each one ends with a ``proj_out`` whose
output is a *hint*. Hint ``j`` times ``control_hidden_states_scale[j]`` is added to the video tokens after main block
``sorted(vace_layers)[j]`` (diffusers pops the hints in the order of the main loop).

Both stacks are token-local apart from their self-attention (the same op, the same RoPE), so sequence parallelism
shards them together: :meth:`WanVACETransformer3DModel.embed` packs the control tokens beside the video tokens on the
feature axis ((B, S, 2 D), one sequence to shard) and :meth:`blocks` unpacks them, runs the VACE stack (one scan),
then the main stack (one scan) with the hints added, and returns the video tokens (B, S, D) for :meth:`head`.

diffusers keeps ``vace_blocks.0.proj_in`` inside the first VACE block; here it is ``vace_proj_in`` so that the VACE
blocks stack (the key map renames it). PipeFusion runs the two stacks looped over the stages
(:func:`pipefusion_stacks`): the VACE stack on a patch's control rows, then the main stack, the patch's hints riding
with it in the scans' carry (:meth:`WanVACETransformer3DModel.blocks`); each stack has its own stale K/V buffers.
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
from xdit_jax.models.layers import linear, scan_modules, stack_modules

VACE_STACKED = "vace_blocks"


@dataclasses.dataclass(frozen=True)
class WanVACEConfig(wan.WanConfig):
    vace_layers: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30, 35)
    vace_in_channels: int = 96

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVACEConfig:
        cfg = super().from_dict(d)
        layers = tuple(int(i) for i in cfg.vace_layers)
        if not layers or max(layers) >= cfg.num_layers or min(layers) < 0:
            raise ValueError(f"vace_layers {list(layers)} must be layers of the {cfg.num_layers}-layer transformer.")
        if 0 not in layers:
            raise ValueError("vace_layers must include layer 0 (diffusers' rule: the first VACE block is the one with "
                             "the input projection).")
        if len(set(layers)) != len(layers):
            raise ValueError(f"vace_layers {list(layers)} name a layer twice.")
        return dataclasses.replace(cfg, vace_layers=layers)

    @property
    def num_vace(self) -> int:
        return len(self.vace_layers)

    def hint_of_layer(self) -> np.ndarray:
        """(num_layers,) int32: the hint added after each main layer (-1: none). diffusers pops its hints in the main
        loop's order, so hint ``j`` goes after the ``j``-th smallest of ``vace_layers``."""
        out = np.full((self.num_layers,), -1, np.int32)
        for j, layer in enumerate(sorted(self.vace_layers)):
            out[layer] = j
        return out


class WanVACEBlock(wan.WanTransformerBlock):
    """diffusers ``WanVACETransformerBlock`` without its input projection (``vace_proj_in`` of the model): a Wan block
    on the control tokens, then ``proj_out`` -> the hint. Returns (control tokens, hint)."""

    def __init__(self, cfg: WanVACEConfig, *, dtype, rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.proj_out = linear(cfg.inner_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, c, tokens, cond):
        c = super().__call__(c, tokens, cond)
        return c, self.proj_out(c)


class WanVACETransformer3DModel(wan.WanTransformer3DModel):
    """``model(hidden_states, timestep, encoder_hidden_states, control_hidden_states=...,
    control_hidden_states_scale=None)`` as diffusers' forward: ``control_hidden_states`` (B, vace_in_channels, F, H, W)
    with at most the video's frames; ``control_hidden_states_scale`` (num_vace,) (default ones) or (B, num_vace)."""

    def __init__(self, cfg: WanVACEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        d, p = cfg.inner_dim, tuple(cfg.patch_size)
        self.vace_patch_embedding = nnx.Conv(cfg.vace_in_channels, d, kernel_size=p, strides=p, padding="VALID",
                                             use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.vace_proj_in = linear(d, d, dtype=dtype, rngs=rngs)
        self.vace_blocks = stack_modules(lambda r: WanVACEBlock(cfg, dtype=dtype, rngs=r), cfg.num_vace, rngs)

    def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
              first_frame_timestep=None, control_hidden_states=None, control_hidden_states_scale=None):
        """As :meth:`WanTransformer3DModel.embed`, x the video and control tokens side by side: (B, S, 2 D); cond adds
        ``vace_scale`` (B, num_vace)."""
        cfg, dtype = self.cfg, self.dtype
        if control_hidden_states is None:
            raise ValueError("control_hidden_states is required by a VACE transformer (the conditioning latents).")
        if first_frame_timestep is not None:
            raise NotImplementedError("first_frame_timestep (TI2V-5B) is not a VACE input.")
        b = hidden_states.shape[0]
        ctrl = jnp.asarray(control_hidden_states)
        if ctrl.ndim != 5 or ctrl.shape[0] != b or ctrl.shape[1] != cfg.vace_in_channels:
            raise ValueError(f"control_hidden_states {tuple(ctrl.shape)}: expected ({b}, {cfg.vace_in_channels}, "
                             "frames, height, width).")
        wan.check_input_shape(cfg, *ctrl.shape[2:])
        scale = jnp.ones((cfg.num_vace,), dtype) if control_hidden_states_scale is None else \
            jnp.asarray(control_hidden_states_scale).astype(dtype)
        if scale.shape not in ((cfg.num_vace,), (b, cfg.num_vace)):
            raise ValueError(f"control_hidden_states_scale {tuple(scale.shape)}: one scale per VACE layer "
                             f"({cfg.num_vace},).")
        x, tokens, cond = super().embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        c = self.vace_patch_embedding(ctrl.astype(dtype).transpose(0, 2, 3, 4, 1)).reshape(b, -1, cfg.inner_dim)
        if c.shape[1] > x.shape[1]:
            raise ValueError(f"control_hidden_states make {c.shape[1]} tokens, more than the video's {x.shape[1]}.")
        c = jnp.pad(c, ((0, 0), (0, x.shape[1] - c.shape[1]), (0, 0)))  # diffusers' zero padding
        cond["vace_scale"] = jnp.broadcast_to(scale, (b, cfg.num_vace))
        return jnp.concatenate([x, c.astype(x.dtype)], axis=-1), tokens, cond

    def blocks(self, x, tokens, cond):
        """Both stacks on the packed tokens (B, S, 2 D) or a contiguous shard of them -> the video tokens (B, S, D).

        One carry for both scans, as PipeFusion's looped stacks need it (:func:`xdit_jax.parallel.pipefusion.
        run_pipefusion`: each stack split over all the stages, the last stage handing the carry to the first):
        (video tokens, control tokens, the hints register (num_vace, B, S, D), a layer counter). The VACE blocks
        run on the control tokens and write hint ``n`` (the counter); then the main blocks run on the video tokens,
        main layer ``n - num_vace`` adding its hint where it has one. The code between the scans passes the carry
        on unchanged, and the counter rides in the carry (an uneven stage's padding layers leave it as it is), so no
        block needs to know where its stage starts."""
        cfg = self.cfg
        d, nv = cfg.inner_dim, cfg.num_vace
        x, c = x[..., :d], x[..., d:]
        c = self.vace_proj_in(c) + x
        carry = (x, c, jnp.zeros((nv,) + c.shape, c.dtype), jnp.int32(0))

        def vace_layer(blk, carry):
            x, c, hints, n = carry
            c, hint = blk(c, tokens, cond)
            return x, c, jax.lax.dynamic_update_index_in_dim(hints, hint.astype(hints.dtype), n, 0), n + 1

        index = jnp.asarray(np.concatenate([np.full((nv,), -1, np.int32), cfg.hint_of_layer()]))
        scale = cond["vace_scale"]

        def main_layer(blk, carry):
            x, c, hints, n = carry
            x = blk(x, tokens, cond)
            j = index[n]
            jj = jnp.maximum(j, 0)
            hinted = x + hints[jj] * scale[:, jj][:, None, None].astype(x.dtype)
            return jnp.where(j >= 0, hinted, x), c, hints, n + 1

        carry = scan_modules(self.vace_blocks, vace_layer, carry)
        return scan_modules(self.transformer_blocks, main_layer, carry)[0]

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                 control_hidden_states=None, control_hidden_states_scale=None):
        x, tokens, cond = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                     control_hidden_states=control_hidden_states,
                                     control_hidden_states_scale=control_hidden_states_scale)
        return self.head(self.blocks(x, tokens, cond), cond, hidden_states.shape)


def pipefusion_stacks(cfg: WanVACEConfig) -> dict:
    """PipeFusion's stacks (``_init_parts``' ``stacked`` / ``stacked_layers``) in the order :meth:`blocks` scans them:
    the VACE blocks, then the main blocks."""
    return dict(stacked=(VACE_STACKED, wan.STACKED), stacked_layers=(cfg.num_vace, cfg.num_layers))


TORCH_RENAMES = [(r"^vace_proj_in\.", "vace_blocks.0.proj_in.")] + wan.TORCH_RENAMES


def params_from_torch(flat: dict, cfg: WanVACEConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: WanVACETransformer3DModel(cfg)),
                          stacked={wan.STACKED: cfg.num_layers, VACE_STACKED: cfg.num_vace}, renames=TORCH_RENAMES,
                          ignore=wan.TORCH_IGNORE + [r"^vace_blocks\.\d+\.attn2\.norm_added_q\.weight$"], dtype=dtype,
                          what="Wan VACE transformer checkpoint")


def build(cfg: WanVACEConfig, params: dict, dtype=jnp.float32) -> WanVACETransformer3DModel:
    return build_module(lambda: WanVACETransformer3DModel(cfg, dtype=dtype), params)
