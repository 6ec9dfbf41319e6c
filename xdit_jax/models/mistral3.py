"""Mistral 3's language model (transformers ``Mistral3ForConditionalGeneration``, text path only), FLUX.2-dev's text
encoder (Mistral-Small-3.x-24B), on :mod:`xdit_jax.models.llama`.

Mistral is Llama (no biases, SwiGLU, GQA, rotate-half RoPE) when it attends to the whole sequence
(``sliding_window`` null, as Mistral Small 3.x): :class:`llama.LlamaModel`. The vision tower
(``vision_tower.*``), the projector (``multi_modal_projector.*``) and ``lm_head`` are not read. Two key layouts load:
transformers 5's (``model.language_model.*``) and the older one (``language_model.model.*``).

Flux2Pipeline's prompt embeddings (diffusers' ``_get_mistral_3_small_prompt_embeds``): a system message and the
prompt as a chat (:func:`format_messages`), the tokenizer's chat template without a generation prompt, padded and
truncated to ``max_sequence_length``, ``hidden_states`` of layers (10, 20, 30) stacked into the features
(:func:`xdit_jax.models.qwen3.stacked_hidden_states`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xdit_jax.models import llama
from xdit_jax.models.llama import build  # noqa: F401  (the module interface conversion reads)

# diffusers' pipeline_flux2 SYSTEM_MESSAGE (from BFL's flux2 repository)
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")
FLUX2_DEV_LAYERS = (10, 20, 30)  # diffusers' Flux2Pipeline: text_encoder_out_layers


class Mistral3TextConfig:
    """Reads a ``Mistral3ForConditionalGeneration`` config.json (its ``text_config``; or a bare Mistral one) into a
    :class:`llama.LlamaConfig`."""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> llama.LlamaConfig:
        t = d.get("text_config")
        t = dict(t) if isinstance(t, dict) else dict(d)
        if t.get("model_type", "mistral") not in ("mistral", "ministral"):
            raise ValueError(f"Expected a Mistral text config, got model_type {t.get('model_type')!r}.")
        if t.get("sliding_window"):
            raise ValueError(f"sliding_window={t['sliding_window']}: Mistral's sliding-window attention is not "
                             "supported (Mistral Small 3.x attends to the whole sequence: null).")
        return llama.LlamaConfig.from_dict(dict(t, model_type="llama"))


def _text_keys(flat: dict) -> dict:
    """The language model's keys of either layout, without their prefix; the vision tower, projector and lm_head
    dropped."""
    out = {}
    for k, v in flat.items():
        if k.startswith("model.language_model."):
            out[k[len("model.language_model."):]] = v
        elif k.startswith("language_model.model."):
            out[k[len("language_model.model."):]] = v
        elif k.startswith(("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                           "multi_modal_projector.", "lm_head.", "language_model.lm_head.")):
            continue
        else:  # a bare MistralModel save
            out[k] = v
    return out


def params_from_torch(flat: dict, cfg: llama.LlamaConfig, dtype=None) -> dict:
    """Params of :class:`llama.LlamaModel` from a ``Mistral3ForConditionalGeneration`` state dict (either layout)."""
    return llama.params_from_torch(_text_keys(flat), cfg, dtype=dtype)


def format_messages(prompts: list[str], system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """diffusers' ``format_input`` (text only): per prompt, the system message and the prompt (``[IMG]`` removed) as
    content lists."""
    return [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
             {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int = 512,
             system_message: str = SYSTEM_MESSAGE) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, max_sequence_length) as diffusers' ``_get_mistral_3_small_prompt_embeds`` tokenizes: the chat
    template (no generation prompt), padded to and truncated at ``max_sequence_length``."""
    enc = tokenizer.apply_chat_template(format_messages(prompts, system_message), add_generation_prompt=False,
                                        tokenize=True, return_dict=True, return_tensors="np", padding="max_length",
                                        truncation=True, max_length=max_sequence_length)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
