"""Qwen3 (transformers ``Qwen3Model``), Z-Image's text encoder: the Llama decoder of :mod:`xdit_jax.models.llama`
with an RMSNorm over each head of q and of k before the rotation (``LlamaConfig.qk_norm``), no q/k/v bias.

Z-Image-Turbo's ``text_encoder`` is Qwen3-4B (hidden 2560, 36 layers, 32 query / 8 key-value heads of 128,
intermediate 9728, rope_theta 1e6). diffusers' ``ZImagePipeline._encode_prompt`` puts each prompt in the chat
template (one user message, ``add_generation_prompt=True, enable_thinking=True``), tokenizes to
``max_sequence_length`` (512) with padding and truncation, runs the encoder and takes ``hidden_states[-2]`` (the
input of the last layer), then keeps each prompt's masked tokens only (:func:`prompt_embeds`).

Here: the config reading (model_type ``qwen3``; sliding-window attention refused), the conversion of a
``Qwen3Model`` state dict or a ``Qwen3ForCausalLM`` one (``model.*`` keys, ``lm_head`` ignored) — both through
:func:`xdit_jax.models.llama.params_from_torch` — the chat template, and a small stand-in tokenizer trained on the
spot (:func:`train_tokenizer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import llama

# The Qwen3 chat template's output for user/assistant/system messages without tools, as the real template gives it
# (``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, then ``<|im_start|>assistant\n`` for the generation
# prompt, followed by an empty think block only when ``enable_thinking=False``). Z-Image uses one user message with
# ``enable_thinking=True``: ``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n``.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
HIDDEN_STATE_INDEX = -2  # diffusers' ZImagePipeline: hidden_states[-2]


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """A :class:`~xdit_jax.models.llama.LlamaConfig` with ``qk_norm`` on, read from a Qwen3 ``config.json``."""

    qk_norm: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"Expected a Qwen3 config (model_type 'qwen3'), got model_type {model_type!r}.")
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ()):
            raise ValueError("Qwen3 with sliding-window attention (use_sliding_window) is not supported.")
        base = llama.LlamaConfig.from_dict(dict(d, model_type="llama"))
        return cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(llama.LlamaConfig)},
                      "qk_norm": True})


def params_from_torch(flat: dict[str, np.ndarray], cfg: llama.LlamaConfig, dtype=None) -> dict:
    """Params of the Qwen3 encoder from a ``Qwen3Model`` state dict or a ``Qwen3ForCausalLM`` one (``model.*``;
    ``lm_head.weight`` ignored)."""
    if not cfg.qk_norm:
        raise ValueError("A Qwen3 encoder has q/k norms: its config must have qk_norm on (Qwen3Config.from_dict).")
    return llama.params_from_torch(flat, cfg, dtype)


def build(cfg: llama.LlamaConfig, params: dict, dtype=jnp.float32) -> llama.LlamaModel:
    return llama.build(cfg, params, dtype)


def format_prompts(tokenizer, prompts: list[str], enable_thinking: bool = True) -> list[str]:
    """Each prompt in the chat template as diffusers' ``_encode_prompt`` formats it (Z-Image: ``enable_thinking``;
    FLUX.2 klein: without, which appends an empty think block)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=enable_thinking)
            for p in prompts]


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int = 512,
             enable_thinking: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, max_sequence_length) of the templated prompts, padded and truncated as diffusers'."""
    enc = tokenizer(format_prompts(tokenizer, prompts, enable_thinking), padding="max_length",
                    max_length=max_sequence_length, truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def compact(states, mask) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``prompt_embeds[i][prompt_masks[i]]`` for a batch: (B, max n_i, d) with each prompt's kept tokens
    first (zeros after), and the counts n_i (B,)."""
    states, mask = np.asarray(states), np.asarray(mask) != 0
    lens = mask.sum(1).astype(np.int32)
    out = np.zeros((states.shape[0], max(int(lens.max()), 1), states.shape[-1]), states.dtype)
    for i in range(states.shape[0]):
        out[i, :lens[i]] = states[i][mask[i]]
    return out, lens


def prompt_embeds(tokenizer, model: llama.LlamaModel, prompts: str | list[str], max_sequence_length: int = 512,
                  encode=None) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``ZImagePipeline._encode_prompt`` as a padded array: (caption features (B, max n_i, hidden) in the
    model's dtype, the kept-token counts n_i (B,)) — :func:`compact` of ``hidden_states[-2]``. ``encode``:
    ``fn(ids, mask) -> hidden_states[-2]`` to run instead (a pipeline's jitted function)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length)
    if encode is None:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).hidden_state(i, m, HIDDEN_STATE_INDEX))
        states = fn(state, jnp.asarray(ids), jnp.asarray(mask))
    else:
        states = encode(ids, mask)
    return compact(jax.device_get(states), mask)


FLUX2_LAYERS = (9, 18, 27)  # diffusers' Flux2KleinPipeline: text_encoder_out_layers


def stacked_hidden_states(model: llama.LlamaModel, input_ids, attention_mask=None, layers=FLUX2_LAYERS):
    """diffusers' ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` on ids: ``hidden_states[k]`` for each ``k`` of
    ``layers`` (0: the embeddings, ``i``: layer ``i``'s output, the last: after the final norm; negative counts
    from the end), stacked and folded into the features: (B, L, len(layers) x hidden), channel-major as
    ``stack(dim=1).permute(0, 2, 1, 3).reshape``. Runs only the layers the deepest index needs."""
    n = model.cfg.num_hidden_layers
    layers = tuple(int(k) for k in layers)
    if not layers or any(not -(n + 1) <= k <= n for k in layers):
        raise ValueError(f"text_encoder_out_layers {layers}: this Qwen3 has {n + 1} hidden states (embeddings and "
                         f"{n} layers); each index must be in [{-(n + 1)}, {n}].")
    idx = [k % (n + 1) for k in layers]
    h0, h, per_layer = model._run(input_ids, attention_mask, max(idx), True)
    picked = [h0 if k == 0 else model.norm(h) if k == n else per_layer[k - 1] for k in idx]
    out = jnp.stack(picked, axis=2)  # (B, L, n_layers, D)
    return out.reshape(*out.shape[:2], -1)


def train_tokenizer(corpus, vocab_size: int = 400):
    """A small Qwen2-style tokenizer (transformers ``Qwen2Tokenizer``: byte-level BPE, ``<|endoftext|>`` as pad and
    eos, no BOS) trained on ``corpus`` with the ``tokenizers`` library (no download), the chat special tokens of
    :data:`SPECIAL_TOKENS` kept whole and :data:`CHAT_TEMPLATE` as its chat template. A stand-in for tests and
    random-weight runs: every byte has a token, so no text is unknown."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok
