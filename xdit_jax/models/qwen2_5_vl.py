"""Qwen2.5-VL's language model (transformers ``Qwen2_5_VLForConditionalGeneration``, text path only) as Qwen-Image's
text encoder, on :mod:`xdit_jax.models.llama`.

Qwen2 is Llama with biases on q/k/v (none on o_proj): :class:`llama.LlamaModel` with ``qkv_bias``. The vision
tower (``visual.*``) and ``lm_head`` are not read. Two key layouts load: transformers 5's
(``model.language_model.*``, ``model.visual.*``) and the older one of the Qwen/Qwen-Image checkpoint
(``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``visual.*``).

Positions: for text-only input Qwen2.5-VL's multimodal RoPE (``mrope_section`` over (t, h, w)) has the same
position on all three axes, so it is the 1-D rotate-half RoPE of Llama; transformers 5.23 (no image grid: no
``rope_deltas``) gives every row the positions ``0 .. L-1`` whatever its mask, as :class:`llama.LlamaModel`
(checked against transformers in tests/test_qwen2_5_vl.py, right and left padding). Attention is causal with the
padded keys removed.

QwenImagePipeline's prompt embeddings (:func:`qwen_prompt_embeds`, diffusers' ``_get_qwen_prompt_embeds``): the
prompt inside :data:`PROMPT_TEMPLATE`, tokenized with padding to the longest, ``hidden_states[-1]`` (the final
norm's output), each row's valid tokens less the template's first :data:`TEMPLATE_START` (34), right-padded with
zeros to the longest; the mask marks the kept tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import llama
from xdit_jax.models.llama import LlamaModel, build  # noqa: F401  (the module interface conversion reads)

PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                   "{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_START = 34  # diffusers' prompt_template_encode_start_idx: the system part's tokens with Qwen2's tokenizer
TOKENIZER_MAX_LENGTH = 1024  # diffusers' tokenizer_max_length (the templated text: + TEMPLATE_START)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class Qwen25VLTextConfig:
    """Reads a ``Qwen2_5_VLForConditionalGeneration`` config.json (its ``text_config``, or the flat keys of older
    saves) into a :class:`llama.LlamaConfig` with ``qkv_bias``."""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> llama.LlamaConfig:
        t = d.get("text_config")
        t = dict(d, **t) if isinstance(t, dict) else dict(d)
        if t.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: Qwen2.5-VL's sliding-window attention is not supported "
                             "(Qwen-Image's text encoder uses full attention).")
        rp = t.get("rope_parameters") or t.get("rope_scaling") or {}
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"Qwen2.5-VL rope type {kind!r} is not supported (only the default / mrope RoPE).")
        theta = rp.get("rope_theta", t.get("rope_theta", 1000000.0))
        n_heads = int(t.get("num_attention_heads", 64))
        hidden = int(t.get("hidden_size", 8192))
        section = rp.get("mrope_section")
        if section is not None and 2 * sum(section) != hidden // n_heads:
            raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {hidden // n_heads // 2}.")
        kv = t.get("num_key_value_heads")
        return llama.LlamaConfig(
            vocab_size=int(t.get("vocab_size", 152064)), hidden_size=hidden,
            intermediate_size=int(t.get("intermediate_size", 29568)),
            num_hidden_layers=int(t.get("num_hidden_layers", 80)), num_attention_heads=n_heads,
            num_key_value_heads=None if kv is None else int(kv), hidden_act=t.get("hidden_act", "silu"),
            max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)), rope_theta=float(theta), qkv_bias=True,
            pad_token_id=t.get("pad_token_id"))


def _text_keys(flat: dict) -> dict:
    """The language model's keys of either layout, without their prefix; the vision tower and lm_head dropped."""
    out = {}
    for k, v in flat.items():
        if k.startswith("model.language_model."):
            out[k[len("model.language_model."):]] = v
        elif k.startswith(("visual.", "model.visual.", "lm_head.")):
            continue
        elif k.startswith("model."):
            out[k[len("model."):]] = v
        else:  # a bare Qwen2_5_VLTextModel / Qwen2Model save
            out[k] = v
    return out


def params_from_torch(flat: dict, cfg: llama.LlamaConfig, dtype=None) -> dict:
    """Params of :class:`llama.LlamaModel` (``qkv_bias``) from a ``Qwen2_5_VLForConditionalGeneration`` state dict
    (either key layout, see the module docstring)."""
    return llama.params_from_torch(_text_keys(flat), cfg, dtype=dtype)


# --- the prompt ---------------------------------------------------------------------------------

def tokenize_prompts(tokenizer, prompts: str | list[str], multiple: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, L) of the templated prompts as diffusers tokenizes them (padding to the longest, truncation
    at ``TOKENIZER_MAX_LENGTH + TEMPLATE_START``), then right-padded to a multiple of ``multiple`` tokens (fewer
    compiled lengths; the causal encoder's valid tokens do not see padding on their right, whichever side the
    tokenizer pads: :func:`crop_states` reads the valid tokens by the mask, as diffusers)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_START,
                    padding=True, truncation=True, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    pad = -ids.shape[1] % max(int(multiple), 1)
    if pad:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = np.concatenate([ids, np.full((ids.shape[0], pad), pad_id, ids.dtype)], axis=1)
        mask = np.concatenate([mask, np.zeros((mask.shape[0], pad), mask.dtype)], axis=1)
    return ids, mask


def crop_states(states: np.ndarray, mask: np.ndarray, drop: int = TEMPLATE_START) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ``_extract_masked_hidden`` then the template crop: each row's valid states less the first
    ``drop``, right-padded with zeros to the longest -> (embeds (B, L', D), int64 mask (B, L'))."""
    states = np.asarray(states)
    rows = [states[b][np.asarray(mask[b]) != 0][drop:] for b in range(states.shape[0])]
    n = max(r.shape[0] for r in rows)
    if n == 0:
        raise ValueError(f"Every prompt is within the template's first {drop} tokens: nothing is left to encode.")
    emb = np.zeros((len(rows), n, states.shape[2]), states.dtype)
    out_mask = np.zeros((len(rows), n), np.int64)
    for b, r in enumerate(rows):
        emb[b, :r.shape[0]] = r
        out_mask[b, :r.shape[0]] = 1
    return emb, out_mask


def qwen_prompt_embeds(tokenizer, model: LlamaModel, prompts: str | list[str], encode=None):
    """diffusers' ``QwenImagePipeline._get_qwen_prompt_embeds``: (prompt embeds (B, L', hidden) in the model's
    dtype, mask (B, L') int64), see the module docstring. ``encode``: ``fn(ids, mask) -> last hidden state`` (a
    pipeline's jitted function); None: ``model`` jitted here."""
    ids, mask = tokenize_prompts(tokenizer, prompts)
    if encode is None:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).last_hidden_state)
        states = fn(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    else:
        states = encode(ids, mask)
    states = np.asarray(jax.device_get(states.astype(jnp.float32) if states.dtype == jnp.bfloat16 else states))
    emb, out_mask = crop_states(states, mask)
    return emb, out_mask


# --- tokenizer ----------------------------------------------------------------------------------

def train_tokenizer(corpus, vocab_size: int = 600):
    """A small ``transformers.Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer) trained on ``corpus`` with the
    ``tokenizers`` library (no download): the special tokens of :data:`SPECIAL_TOKENS` (ids 0..2, ``<|endoftext|>``
    the pad token), no BOS, right padding, as Qwen2's. With the template in the corpus and a vocabulary that merges
    its words whole, the system part is :data:`TEMPLATE_START` tokens, as with the real tokenizer (checked in the
    tests). A stand-in for tests and random-weight runs."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    base = Qwen2Tokenizer()  # Qwen2's normalizer / pre-tokenizer / decoder on an empty BPE
    t = Tokenizer(models.BPE())
    t.normalizer = base.backend_tokenizer.normalizer
    t.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    from tokenizers import pre_tokenizers as pt

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    import json

    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.padding_side = "right"
    return tok
