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
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")  # Qwen2.5-VL's image placeholders
IMAGE_PAD = "<|image_pad|>"

# Qwen-Image-Edit (diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline): the system part, then the image(s)
# inside the user turn; both crop the first 64 tokens
_EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                "objects, background), then explain how the user's text instruction should alter or modify the image. "
                "Generate a new image that meets the user's requirements while maintaining consistency with the "
                "original input where appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_TEMPLATE_START = 64


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


# pipelines whose Qwen2.5-VL reads text only (conversion leaves the vision tower out)
TEXT_ONLY_PIPELINES = ("QwenImagePipeline", "Kandinsky5T2VPipeline", "Kandinsky5T2IPipeline", "Kandinsky5I2VPipeline")
TEXT_ONLY_PIPELINES += ("LongCatImagePipeline",)  # (its text_processor is for prompt rewriting, refused)


def extra_params_from_torch(flat: dict, cfg: llama.LlamaConfig, dtype=None, config_dict=None,
                            pipeline: str | None = None) -> dict:
    """``{"vision_params": ...}``: the vision tower's params (:mod:`xdit_jax.models.qwen2_5_vl_vision`, what
    Qwen-Image-Edit reads the input image with), which conversion saves next to the language model's; empty for a
    checkpoint without ``visual.*`` tensors or without its config, and for the folders whose pipeline reads text only
    (:data:`TEXT_ONLY_PIPELINES`: 0.67B parameters they never read)."""
    from xdit_jax.models import qwen2_5_vl_vision as vv

    if config_dict is None or not vv.vision_keys(flat) or pipeline in TEXT_ONLY_PIPELINES:
        return {}
    vcfg = vv.VisionConfig.from_dict(config_dict)
    return {"vision_params": vv.params_from_torch(flat, vcfg, dtype=dtype)}


def mrope_section(d: dict[str, Any]) -> tuple[int, ...]:
    """The ``mrope_section`` of a ``Qwen2_5_VLForConditionalGeneration`` config dict (transformers' default (16, 24,
    24) where none is named)."""
    t = d.get("text_config")
    t = dict(d, **t) if isinstance(t, dict) else dict(d)
    rp = t.get("rope_parameters") or t.get("rope_scaling") or {}
    return tuple(int(v) for v in rp.get("mrope_section", (16, 24, 24)))


def params_from_torch(flat: dict, cfg: llama.LlamaConfig, dtype=None) -> dict:
    """Params of :class:`llama.LlamaModel` (``qkv_bias``) from a ``Qwen2_5_VLForConditionalGeneration`` state dict
    (either key layout, see the module docstring)."""
    return llama.params_from_torch(_text_keys(flat), cfg, dtype=dtype)


# --- the prompt ---------------------------------------------------------------------------------

def _pad_to_multiple(tokenizer, ids: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) right-padded (pad id, mask 0) to a multiple of ``multiple`` tokens."""
    pad = -ids.shape[1] % max(int(multiple), 1)
    if pad:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = np.concatenate([ids, np.full((ids.shape[0], pad), pad_id, ids.dtype)], axis=1)
        mask = np.concatenate([mask, np.zeros((mask.shape[0], pad), mask.dtype)], axis=1)
    return ids, mask


def tokenize_prompts(tokenizer, prompts: str | list[str], multiple: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, L) of the templated prompts as diffusers tokenizes them (padding to the longest, truncation
    at ``TOKENIZER_MAX_LENGTH + TEMPLATE_START``), then right-padded to a multiple of ``multiple`` tokens (fewer
    compiled lengths; the causal encoder's valid tokens do not see padding on their right, whichever side the
    tokenizer pads: :func:`crop_states` reads the valid tokens by the mask, as diffusers)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_START,
                    padding=True, truncation=True, return_tensors="np")
    return _pad_to_multiple(tokenizer, np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), multiple)


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


# --- image tokens and the multimodal RoPE (Qwen-Image-Edit) --------------------------------------------------

def edit_texts(prompts: list[str], n_images: int, plus: bool) -> list[str]:
    """The templated prompts of diffusers' QwenImageEditPipeline (``plus=False``: one image, its placeholder in the
    template) / QwenImageEditPlusPipeline ("Picture i: <image>" for each image before the prompt)."""
    if not plus:
        if n_images != 1:
            raise ValueError(f"Qwen-Image-Edit takes one image, got {n_images} (Qwen-Image-Edit-2509 / 2511: the "
                             "QwenImageEditPlusPipeline).")
        return [EDIT_TEMPLATE.format(p) for p in prompts]
    pictures = "".join(EDIT_PLUS_PICTURE.format(i + 1) for i in range(n_images))
    return [EDIT_PLUS_TEMPLATE.format(pictures + p) for p in prompts]


def expand_image_tokens(text: str, counts: list[int]) -> str:
    """Qwen2VLProcessor's text expansion: the i-th ``<|image_pad|>`` repeated ``counts[i]`` times (the image's merge
    units)."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"{len(parts) - 1} image placeholders in the text, {len(counts)} images.")
    out = parts[0]
    for n, rest in zip(counts, parts[1:]):
        out += IMAGE_PAD * int(n) + rest
    return out


def rope_index(ids: np.ndarray, mask: np.ndarray, image_token_id: int, grids, merge: int) -> np.ndarray:
    """transformers' ``Qwen2_5_VLModel.get_rope_index`` for images: (3, B, L) int64 positions. The valid tokens of
    each row, in runs of text and image tokens: a text run counts on from the current position on all three axes;
    an image run of grid (t, h, w) takes (current + t', current + row, current + column) over its (h / merge) x
    (w / merge) units, and the position moves on by max(h, w) / merge. The images' grids are read in order across the
    rows (as transformers' iterator); padded tokens keep 0."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    pos = np.zeros((3,) + ids.shape, np.int64)
    grid_iter = iter([tuple(int(v) for v in g) for g in grids])
    for b in range(ids.shape[0]):
        valid = mask[b] != 0
        is_img = ids[b][valid] == image_token_id
        out, cur, i, n = [], 0, 0, int(valid.sum())
        while i < n:
            j = i
            while j < n and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                out.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                t, h, w = next(grid_iter)
                lh, lw = h // merge, w // merge
                if t * lh * lw != j - i:
                    raise ValueError(f"{j - i} image tokens in a run, the image's grid {(t, h, w)} makes "
                                     f"{t * lh * lw}.")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
                out.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
                cur += max(h, w) // merge
            i = j
        if out:
            pos[:, b, valid] = np.concatenate(out, axis=1)
    return pos


def mrope_cos_sin(positions: np.ndarray, cfg: llama.LlamaConfig, section) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) (B, L, head_dim) float32 of transformers' ``Qwen2_5_VLRotaryEmbedding`` for (3, B, L) positions:
    the frequencies split by ``mrope_section``, chunk i from axis i % 3, repeated twice (rotate-half)."""
    inv = llama.rope_inv_freq(cfg)
    freqs = np.asarray(positions).astype(np.float32)[..., None] * inv  # (3, B, L, head_dim / 2), float32
    chunks = np.split(freqs, np.cumsum(section)[:-1], axis=-1)
    freqs = np.concatenate([c[i % 3] for i, c in enumerate(chunks)], axis=-1)
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def tokenize_edit(tokenizer, texts: list[str], counts: list[int], multiple: int = 32):
    """(ids, mask) (B, L) of templated texts with every image placeholder expanded (``counts``: each image's merge
    units, the same images in every text), padded to the longest as Qwen2VLProcessor (no truncation), then
    right-padded to a multiple of ``multiple`` (see :func:`tokenize_prompts`)."""
    enc = tokenizer([expand_image_tokens(t, counts) for t in texts], padding=True, return_tensors="np")
    return _pad_to_multiple(tokenizer, np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), multiple)


def image_feature_index(ids: np.ndarray, image_token_id: int, n_features: int) -> np.ndarray:
    """(B, L) int32: for each image token its row in the images' features (each row's image tokens read the
    features from the first: the same images in every row), -1 elsewhere (transformers' ``masked_scatter`` per
    row)."""
    is_img = np.asarray(ids) == image_token_id
    idx = np.cumsum(is_img, axis=1) - 1
    counts = is_img.sum(1)
    if (counts != n_features).any():
        raise ValueError(f"image tokens per row {counts.tolist()}, image features {n_features}.")
    return np.where(is_img, idx, -1).astype(np.int32)


def encode_with_images(model: LlamaModel, ids, mask, features, feat_idx, rope):
    """``hidden_states[-1]`` of the language model with the image features in place of the image tokens'
    embeddings (``feat_idx``: :func:`image_feature_index`) and the (B, L, head_dim) RoPE tables ``rope``."""
    emb = model.embed_tokens(jnp.asarray(ids, jnp.int32))
    feats = jnp.asarray(features).astype(emb.dtype)[jnp.maximum(feat_idx, 0)]
    emb = jnp.where((feat_idx >= 0)[..., None], feats, emb)
    return model(None, mask, inputs_embeds=emb, rope=rope).last_hidden_state


def qwen_edit_prompt_embeds(tokenizer, model: LlamaModel, vision, prompts: str | list[str], images,
                            processor_cfg, *, plus: bool = False, section=(16, 24, 24), mrope: bool = True,
                            encode=None, encode_vision=None):
    """diffusers' ``QwenImageEditPipeline._get_qwen_prompt_embeds`` (``plus``: QwenImageEditPlusPipeline's) for
    ``images`` (a list; PIL images or (H, W, 3) arrays, already resized as the pipeline does): each image through
    :func:`xdit_jax.models.qwen2_5_vl_vision.preprocess` and the vision tower, the templated prompts with the images'
    tokens expanded, the language model with the image features in place; ``hidden_states[-1]``, each row's valid
    tokens less the first :data:`EDIT_TEMPLATE_START`. ``mrope``: the image tokens' 3-D positions
    (:func:`rope_index`, what Qwen2.5-VL is trained with and transformers computes from ``mm_token_type_ids``);
    False: positions ``0 .. L-1`` for every token, what transformers 5.23 does when diffusers 0.42.1 calls it
    without ``mm_token_type_ids``. ``encode(ids, mask, features, feat_idx, cos, sin)`` /
    ``encode_vision(pixels, layout)``: jitted functions (None: jitted here). -> (embeds (B, L', hidden), mask)."""
    from xdit_jax.models import qwen2_5_vl_vision as vv

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images = list(images)
    if not images:
        raise ValueError("Qwen-Image-Edit needs an image.")
    pix, grids = zip(*(vv.preprocess(im, processor_cfg) for im in images))
    merge = vision.cfg.spatial_merge_size
    counts = [int(np.prod(g)) // merge ** 2 for g in grids]
    if encode_vision is None:
        gd, st = nnx.split(vision)
        encode_vision = jax.jit(lambda x, lay: nnx.merge(gd, st)(x, lay))
    features = encode_vision(np.concatenate(pix), vv.vision_layout(grids, vision.cfg))
    ids, mask = tokenize_edit(tokenizer, edit_texts(prompts, len(images), plus), counts)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    feat_idx = image_feature_index(ids, image_token_id, sum(counts))
    if mrope:
        pos = rope_index(ids, mask, image_token_id, list(grids) * len(prompts), merge)
    else:
        pos = np.broadcast_to(np.arange(ids.shape[1]), (3,) + ids.shape)
    cos, sin = mrope_cos_sin(pos, model.cfg, section)
    if encode is None:
        gd, st = nnx.split(model)
        encode = jax.jit(lambda i, m, f, fi, c, s: encode_with_images(nnx.merge(gd, st), i, m, f, fi, (c, s)))
    states = encode(ids, mask, features, feat_idx, cos, sin)
    states = np.asarray(jax.device_get(states.astype(jnp.float32) if states.dtype == jnp.bfloat16 else states))
    return crop_states(states, mask, EDIT_TEMPLATE_START)


# --- tokenizer ----------------------------------------------------------------------------------

def train_tokenizer(corpus, vocab_size: int = 600, vision_tokens: bool = False):
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

    special = list(SPECIAL_TOKENS) + (list(VISION_TOKENS) if vision_tokens else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    import json

    model = json.loads(t.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": special[1:]})
    tok.padding_side = "right"
    return tok
