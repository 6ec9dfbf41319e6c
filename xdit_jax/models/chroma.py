"""Chroma transformer (diffusers ``ChromaTransformer2DModel``, lodestones/Chroma1-HD) in Flax NNX.

FLUX.1's architecture (:mod:`xdit_jax.models.flux`: double-stream, then single-stream blocks, 3-axis RoPE from
the text / image ids, T5 states as the only text) with the per-block adaLN linears "pruned": one
``ChromaApproximator`` (``distilled_guidance_layer``: in_proj, residual RMSNorm + SiLU-MLP layers, out_proj)
maps [timestep, guidance 0] sinusoids next to one "mod index" sinusoid per modulation vector to ALL the
modulation vectors at once, (B, 3 * single + 12 * double + 2, D); each block and the final norm take their
rows by index (diffusers' offsets: the single-stream blocks' 3 each first, then the double-stream blocks' 6
image rows each, then their 6 text rows each, then the final norm's shift and scale). The blocks are FLUX's
(:class:`flux.DoubleBlock`, :class:`flux.SingleBlock`, FLUX's attention) with norms that take their modulation
(:class:`PrunedAdaNorm`).

The text mask: ChromaPipeline keeps the prompt's T5 tokens and ONE padding token (``arange(L) <= sum(mask)``,
:func:`text_mask`). Here that is a real KEY mask, as in the model's reference implementation
(lodestone-rock/flow) and ComfyUI: the text tokens past the kept pad token are removed as keys from every
attention (the ``c_mask`` of :func:`xdit_jax.parallel.attention.attention`, FLUX / Qwen-Image's path, on every
mesh). Their own query rows still run, but their outputs never reach a kept token (they are masked as keys in
every later attention), so the image output equals the model run on the text cropped to the kept tokens with no
mask (the text ids are all zeros: cropping moves no position). diffusers 0.42.1 does not do this: its
transformer forms ``m[q] * m[k]`` of the float 0/1 mask and torch's SDPA ADDS that float tensor to the logits,
so a padded key is not removed, only lowered by 1 for a kept query (huggingface/diffusers#12116 and #11724, the
fix still in review in #13619). With an all-ones mask (no padding: a prompt that fills ``max_sequence_length``)
the two agree; on padded prompts diffusers' output differs from ours (tests/test_chroma_transformer.py and
README.md give the measured gap on the tiny models).

The text joins every attention as the *context* (the double-stream blocks' joint attention, and the
single-stream blocks through :meth:`flux.SingleBlock.pair`, the same weights on the text kept apart from the
image): the image tokens are the one sharded sequence of both stacks, the text sharded with them
(``run_blocks(..., text=TEXT_KEYS)``; its key mask stays whole), as HunyuanVideo runs FLUX's blocks.
Each block reads its modulation rows through one layer counter in the scans' carry (``lax.dynamic_index``),
counting on from the double-stream stack into the single-stream one, which PipeFusion's stages (and its looped
stacks) hand on with the carry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models import flux
from xdit_jax.models.layers import LayerNorm, RMSNorm, linear, scan_modules, stack_modules, timestep_embedding

STACKED = "transformer_blocks"
SINGLE = "single_transformer_blocks"
STACKS = (STACKED, SINGLE)
# The text stream in ``cond``: sliced with PipeFusion's patches / sharded over the sequence group (its key mask,
# ``context_mask``, stays whole: the attention op takes the whole text's)
TEXT_KEYS = flux.TEXT_KEYS


@dataclasses.dataclass(frozen=True)
class ChromaConfig(flux.FluxConfig):
    approximator_num_channels: int = 64
    approximator_hidden_dim: int = 5120
    approximator_layers: int = 5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChromaConfig:
        cfg = super().from_dict(d)
        if cfg.approximator_num_channels % 4:
            raise ValueError(f"approximator_num_channels={cfg.approximator_num_channels} must be a multiple of 4 "
                             "(a quarter each for the timestep and the guidance sinusoids, half for the mod index).")
        return cfg

    @property
    def mod_rows(self) -> int:
        """The approximator's output rows: 3 per single-stream block, 2 x 6 per double-stream one, 2 final."""
        return 3 * self.num_single_layers + 12 * self.num_layers + 2


class PrunedAdaNorm(nnx.Module):
    """diffusers ``ChromaAdaLayerNormZero(Single)Pruned``: a LayerNorm without affine shifted and scaled by
    modulation rows given from outside: ``temb`` (B, rows, D), this norm's ``chunks`` rows from ``offset``."""

    def __init__(self, dim: int, chunks: int, offset: int, *, dtype):
        self.chunks, self.offset = chunks, offset
        self.norm = LayerNorm(dim, 1e-6, affine=False, dtype=dtype)

    def modulation(self, temb):
        return [temb[:, self.offset + i] for i in range(self.chunks)]

    def __call__(self, x, temb, modulation=None):
        shift, scale, *rest = self.modulation(temb) if modulation is None else modulation
        return self.norm(x) * (1 + scale[:, None].astype(x.dtype)) + shift[:, None].astype(x.dtype), \
            [r.astype(x.dtype) for r in rest]


def _pruned_norm(dim: int, chunks: int, stream: int, *, dtype, rngs):
    del rngs
    return PrunedAdaNorm(dim, chunks, 6 * stream, dtype=dtype)


class DoubleBlock(flux.DoubleBlock):
    """diffusers ``ChromaTransformerBlock``: FLUX's, its modulation given ((B, 12, D): 6 image, 6 text rows)."""

    ada_norm = staticmethod(_pruned_norm)


class SingleBlock(flux.SingleBlock):
    """diffusers ``ChromaSingleTransformerBlock``: FLUX's, its modulation given ((B, 3, D))."""

    ada_norm = staticmethod(_pruned_norm)


class Approximator(nnx.Module):
    """diffusers ``ChromaApproximator``: in_proj, ``n`` residual (RMSNorm -> Linear -> SiLU -> Linear), out_proj.
    The RMSNorms are torch's ``nn.RMSNorm(dim)`` with no eps: its docs say the input dtype's machine epsilon, but
    torch (2.13) takes the epsilon of the dtype it computes in, float32 for bf16 / fp16 too (1.2e-7, not bf16's
    7.8e-3: that one tripled the bf16 error of the modulation rows, 0.031 vs diffusers' 0.0097 on Chroma1-HD's
    approximator with diffusers' init)."""

    def __init__(self, din: int, dout: int, hidden: int, n: int, *, dtype, rngs):
        self.in_proj = linear(din, hidden, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([flux.TextProjection(hidden, hidden, dtype=dtype, rngs=rngs) for _ in range(n)])
        self.norms = nnx.List([RMSNorm(hidden, float(jnp.finfo(jnp.float32).eps), dtype=dtype) for _ in range(n)])
        self.out_proj = linear(hidden, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


def approximator_input(cfg: ChromaConfig, t) -> jax.Array:
    """diffusers ``ChromaCombinedTimestepTextProjEmbeddings``: (B,) timesteps (x 1000) -> (B, rows, channels):
    [sinusoid(t), sinusoid(0)] (channels / 4 each) next to the mod index's sinusoid (channels / 2) of each row."""
    q = cfg.approximator_num_channels // 4
    b = t.shape[0]
    tg = jnp.concatenate([timestep_embedding(t, q), timestep_embedding(jnp.zeros_like(t), q)], axis=-1)
    mod = timestep_embedding(jnp.arange(cfg.mod_rows, dtype=jnp.float32) * 1000, 2 * q)
    return jnp.concatenate([jnp.broadcast_to(tg[:, None], (b, cfg.mod_rows, 2 * q)),
                            jnp.broadcast_to(mod[None], (b, cfg.mod_rows, 2 * q))], axis=-1)


def text_mask(tokenizer_mask) -> np.ndarray | jax.Array:
    """ChromaPipeline's ``_get_t5_prompt_embeds`` mask: the tokenizer's (B, L) 0/1 mask -> 1 for the first
    ``sum + 1`` tokens (the prompt and one padding token), 0 after (float32, as diffusers returns it; the
    transformer takes its nonzero entries as the text keys kept)."""
    m = jnp.asarray(tokenizer_mask)
    return (jnp.arange(m.shape[1])[None] <= jnp.sum(m, axis=1, keepdims=True)).astype(jnp.float32)


def pipefusion_stacks(cfg: ChromaConfig) -> dict:
    """PipeFusion's stacks (as FLUX's): double-, then single-stream; and the text's ``cond`` keys."""
    return dict(stacked=STACKS, stacked_layers=(cfg.num_layers, cfg.num_single_layers), text_keys=TEXT_KEYS)


class ChromaTransformer2DModel(nnx.Module):
    """``model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, attention_mask)`` as diffusers'
    forward: packed latents (B, N, in_channels), T5 states (B, L, joint_attention_dim), timestep (B,) in [0, 1]
    (the pipeline's t / 1000), ids (N, 3) and (L, 3) (host arrays), ``attention_mask``: the pipeline's 0/1 mask
    (float, int or bool), (B, L + N) (its image part ones, not read) or (B, L) for the text alone, or None (every
    text token kept); its nonzero text entries are the text keys kept (a real key mask, the module docstring).
    Returns (B, N, out_channels)."""

    def __init__(self, cfg: ChromaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        d = cfg.inner_dim
        self.distilled_guidance_layer = Approximator(cfg.approximator_num_channels, d, cfg.approximator_hidden_dim,
                                                     cfg.approximator_layers, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(cfg.joint_attention_dim, d, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(cfg.in_channels, d, dtype=dtype, rngs=rngs)
        self.transformer_blocks = stack_modules(lambda r: DoubleBlock(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.single_transformer_blocks = stack_modules(lambda r: SingleBlock(cfg, dtype=dtype, rngs=r),
                                                       cfg.num_single_layers, rngs)
        self.norm_out = LayerNorm(d, 1e-6, affine=False, dtype=dtype)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_ch, dtype=dtype, rngs=rngs)

    # -- embed (global) -> blocks (image tokens sharded; the text as the context) -> head --

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None, attention_mask=None,
              rope=None):
        """-> (image (B, N, D), tokens {"rope": (N, hd) tables}, cond {"mods": the approximator's (B, rows, D),
        "context" (B, L, D), "context_rope" (B, L, hd) tables, "context_mask" bool (B, L) or absent}).
        ``rope``: ``((img_cos, img_sin), (txt_cos, txt_sin))`` ready made (else from the host ids)."""
        cfg, dtype = self.cfg, self.dtype
        b = hidden_states.shape[0]
        # t x 1000 stays float32 into the sinusoids (diffusers rounds it to the model dtype first)
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        mods = self.distilled_guidance_layer(approximator_input(cfg, t).astype(dtype))
        x = self.x_embedder(jnp.asarray(hidden_states).astype(dtype))
        c = self.context_embedder(jnp.asarray(encoder_hidden_states).astype(dtype))
        if rope is None:
            rope = (flux.rope_tables(img_ids, cfg.axes_dims_rope), flux.rope_tables(txt_ids, cfg.axes_dims_rope))
        img_rope, txt_rope = (tuple(jnp.asarray(a, jnp.float32) for a in r) for r in rope)
        cond = {"mods": mods, "context": c,
                "context_rope": tuple(jnp.broadcast_to(a[None], (b,) + a.shape) for a in txt_rope)}
        if attention_mask is not None:
            m = jnp.asarray(attention_mask)
            if m.ndim != 2 or m.shape[0] != b or m.shape[1] not in (c.shape[1], c.shape[1] + x.shape[1]):
                raise ValueError(f"attention_mask {tuple(m.shape)}: Chroma takes the pipeline's (batch, text tokens "
                                 f"[+ image tokens]) = ({b}, {c.shape[1]} [+ {x.shape[1]}]) 0/1 mask.")
            cond["context_mask"] = m[:, :c.shape[1]] != 0
        return x, {"rope": img_rope}, cond

    def _mods(self, cond, offset: int, rows: int, layers: int):
        """(B, layers, rows, D): the modulation rows of ``layers`` blocks of ``rows`` each from ``offset``."""
        m = cond["mods"]
        return m[:, offset:offset + rows * layers].reshape(m.shape[0], layers, rows, m.shape[2])

    def double_mods(self, cond):
        """(B, num_layers, 12, D): each double-stream block's 6 image rows, then its 6 text rows."""
        cfg = self.cfg
        img = 3 * cfg.num_single_layers
        return jnp.concatenate([self._mods(cond, img, 6, cfg.num_layers),
                                self._mods(cond, img + 6 * cfg.num_layers, 6, cfg.num_layers)], axis=2)

    def blocks(self, x, tokens, cond):
        """Both stacks on the image tokens (or a shard of them), the text joining each attention as the context;
        -> the image tokens. Block ``i`` reads its modulation rows at the layer counter riding in the carry."""
        cfg = self.cfg
        rope, c_rope, mask = tokens["rope"], cond["context_rope"], cond.get("context_mask")
        dm, sm = self.double_mods(cond), self._mods(cond, 0, 3, cfg.num_single_layers)
        take = lambda m, i: jax.lax.dynamic_index_in_dim(m, i, axis=1, keepdims=False)  # noqa: E731

        n = cfg.num_layers

        def double(blk, carry):
            x, c, i = carry
            return (*blk(x, c, take(dm, i), rope, c_rope, mask), i + 1)

        def single(blk, carry):  # the counter goes on from the double-stream stack's (PipeFusion hands it on)
            x, c, i = carry
            return (*blk.pair(x, c, take(sm, i - n), rope, c_rope, mask), i + 1)

        carry = scan_modules(self.transformer_blocks, double, (x, cond["context"], jnp.int32(0)))
        return scan_modules(self.single_transformer_blocks, single, carry)[0]

    def head(self, x, cond, shape=None):
        """Image tokens -> the prediction (B, N, patch^2 * out_channels)."""
        shift, scale = (cond["mods"][:, -2 + i].astype(x.dtype) for i in range(2))
        return self.proj_out(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, attention_mask=None):
        x, tokens, cond = self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
                                     attention_mask)
        return self.head(self.blocks(x, tokens, cond), cond)


TORCH_RENAMES = flux.TORCH_RENAMES


def params_from_torch(flat: dict, cfg: ChromaConfig, dtype=None) -> dict:
    return map_state_dict(flat, expected_shapes(lambda: ChromaTransformer2DModel(cfg)),
                          stacked={STACKED: cfg.num_layers, SINGLE: cfg.num_single_layers}, renames=TORCH_RENAMES,
                          ignore=[r"^time_text_embed\.mod_proj$"], dtype=dtype, what="Chroma transformer checkpoint")


def build(cfg: ChromaConfig, params: dict, dtype=jnp.float32) -> ChromaTransformer2DModel:
    return build_module(lambda: ChromaTransformer2DModel(cfg, dtype=dtype), params)
