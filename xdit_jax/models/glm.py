"""GLM (transformers ``GlmModel``), CogView4's text encoder: the Llama decoder of :mod:`xdit_jax.models.llama` with
GLM's differences as :class:`~xdit_jax.models.llama.LlamaConfig` switches.

CogView4-6B's ``text_encoder`` is glm-4-9b-hf's ``GlmModel`` (hidden 4096, 40 layers, 32 query / 2 key-value heads of
128, intermediate 13696, vocab 151552, rope_theta 10000, rms_norm_eps 1.5625e-7). Where it differs from Llama:

* biases on q / k / v (``attention_bias``), none on ``o_proj`` (:attr:`LlamaConfig.qkv_bias`);
* RoPE on the first half of each head only (``partial_rotary_factor`` 0.5), rotating the interleaved pairs
  ``(2i, 2i + 1)`` (transformers' GLM ``rotate_half`` and its ``repeat_interleave``'d cos / sin), the other half
  passed as it is (:attr:`LlamaConfig.partial_rotary_factor`, :attr:`LlamaConfig.rope_interleaved`);
* SwiGLU with gate and up in one ``gate_up_proj`` (the gate its first half; :attr:`LlamaConfig.fused_gate_up`).

diffusers' ``CogView4Pipeline._get_glm_embeds`` (:func:`prompt_embeds`) tokenizes the batch with
``padding="longest"`` (the GLM tokenizer pads on the left), pads the ids on the **left** with the pad token up to a
multiple of 16, and runs the encoder **without** an attention mask (the pad tokens are attended, causally, at
positions ``0 .. L-1``), taking ``hidden_states[-2]`` (the input of the last layer).

A ``GlmForCausalLM`` state dict (``model.*`` keys, ``lm_head`` ignored) loads too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import llama

HIDDEN_STATE_INDEX = -2  # diffusers' CogView4Pipeline: hidden_states[-2]
PAD_MULTIPLE = 16  # _get_glm_embeds pads the ids on the left to a multiple of 16


@dataclasses.dataclass(frozen=True)
class GlmConfig(llama.LlamaConfig):
    """A :class:`~xdit_jax.models.llama.LlamaConfig` with GLM's switches on, read from a GLM ``config.json``
    (defaults: transformers' ``GlmConfig``, glm-4-9b)."""

    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1.5625e-07
    qkv_bias: bool = True
    partial_rotary_factor: float = 0.5
    rope_interleaved: bool = True
    fused_gate_up: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlmConfig:
        """transformers 4's top-level ``rope_theta`` / ``partial_rotary_factor`` or transformers 5's
        ``rope_parameters``; ``attention_bias`` (GLM: q / k / v only) read as ``qkv_bias``; unknown keys ignored."""
        model_type = d.get("model_type", "glm")
        if model_type != "glm":
            raise ValueError(f"Expected a GLM config (model_type 'glm'), got model_type {model_type!r}.")
        rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        scaling = d.get("rope_scaling") or {}
        for spec in (rp, scaling):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise ValueError(f"Unsupported GLM rope type {kind!r}; only the default (partial) RoPE.")
        factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Unsupported GLM hidden_act {d['hidden_act']!r}; only 'silu'.")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in ("rope_scaling", "attention_bias", "qkv_bias", "mlp_bias", "qk_norm",
                                                "partial_rotary_factor", "rope_interleaved", "fused_gate_up",
                                                "rope_theta")}
        return cls(**kw, rope_theta=float(theta), partial_rotary_factor=float(factor),
                   qkv_bias=bool(d.get("attention_bias", True)))


def params_from_torch(flat: dict[str, np.ndarray], cfg: llama.LlamaConfig, dtype=None) -> dict:
    """Params of the GLM encoder from a ``GlmModel`` state dict or a ``GlmForCausalLM`` one (``model.*``;
    ``lm_head.weight`` ignored)."""
    if not cfg.fused_gate_up or not cfg.rope_interleaved:
        raise ValueError("A GLM encoder needs GLM's switches on: read its config with GlmConfig.from_dict.")
    return llama.params_from_torch(flat, cfg, dtype)


def build(cfg: llama.LlamaConfig, params: dict, dtype=jnp.float32) -> llama.LlamaModel:
    return llama.build(cfg, params, dtype)


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int = 1024) -> np.ndarray:
    """(B, L) int32 ids as ``_get_glm_embeds`` feeds the encoder: the batch padded to its longest (the tokenizer's
    own padding side) and truncated to ``max_sequence_length``, then padded on the left with the pad token to a
    multiple of 16."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The GLM tokenizer has no pad token: CogView4 pads the prompts with it.")
    ids = np.asarray(tokenizer(list(prompts), padding="longest", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="np")["input_ids"], np.int32)
    pad = (-ids.shape[1]) % PAD_MULTIPLE
    if pad:
        ids = np.concatenate([np.full((ids.shape[0], pad), tokenizer.pad_token_id, np.int32), ids], axis=1)
    return ids


def prompt_embeds(tokenizer, model: llama.LlamaModel, prompts: str | list[str], max_sequence_length: int = 1024,
                  encode=None):
    """diffusers' ``CogView4Pipeline._get_glm_embeds``: ``hidden_states[-2]`` (B, L, hidden) of :func:`tokenize`'s
    ids, no attention mask. ``encode``: ``fn(ids) -> hidden_states[-2]`` to run instead (a pipeline's jitted
    function)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenize(tokenizer, prompts, max_sequence_length)
    if encode is not None:
        return encode(ids)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i: nnx.merge(graphdef, s).hidden_state(i, None, HIDDEN_STATE_INDEX))
    return fn(state, jnp.asarray(ids))


def train_tokenizer(corpus, vocab_size: int = 300):
    """A small stand-in for the GLM-4 tokenizer (:func:`xdit_jax.models.llama.train_tokenizer`'s BPE, a BOS on every
    text as GLM-4's ``[gMASK]<sop>`` prefix, padding on the left as GLM-4's): for tests and random-weight runs."""
    tok = llama.train_tokenizer(corpus, vocab_size)
    tok.padding_side = "left"
    return tok
