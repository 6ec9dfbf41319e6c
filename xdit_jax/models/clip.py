"""The CLIP text encoders — transformers' ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` — in
Flax NNX.

Flux takes the pooled output of CLIP-L (``CLIPTextModel``, openai/clip-vit-large-patch14); SD3 and
SDXL take the penultimate layer's hidden states and the projected pooled output of their CLIP
encoders (``CLIPTextModelWithProjection``). What a pipeline calls (``ids`` (B, 77) from the CLIP
tokenizer with ``padding="max_length"``; diffusers passes no attention mask to CLIP)::

    out = model(ids)                                   # Flux: out.pooler_output  (B, hidden)
    out = model(ids, output_hidden_states=True)        # SD3:  out.hidden_states[-2] (B, L, hidden)
                                                       #       out.text_embeds      (B, projection_dim)

``output_hidden_states`` is a static Python bool: close over it in the jitted function (the
pipelines' ``_text_encoder_fn`` passes only ``attention_mask``, enough for Flux). The outputs are
NamedTuples (pytrees), so they pass through ``jax.jit`` / ``nnx.jit`` as they are.

Submodules carry the transformers names (``text_model.embeddings.token_embedding``,
``text_model.encoder.layers.{i}.self_attn.q_proj``, ``text_model.final_layer_norm``,
``text_projection``), so :func:`xdit_jax.keymap.map_state_dict` derives the key map;
``text_model.encoder.layers`` is stacked on a leading layer axis and run with one scan. Checkpoints
on the hub (and transformers 4's ``save_pretrained``) hold ``text_model.*`` keys; transformers 5
saves a ``CLIPTextModel`` without that prefix — both load. The ``embeddings.position_ids`` buffer
older files hold is ignored.

Attention is causal always; an ``attention_mask`` (B, L) (1: attend) removes padded keys too, as
transformers combines them: a query attends to key ``j`` iff ``j <= i`` and ``mask[j] != 0``.
Disallowed scores are set to ``finfo(float32).min`` (fp32). With right padding (what CLIP
tokenizers produce) every query keeps key 0, so every row is defined. A row with no allowed key
(a left-padded query whose own and earlier keys are all masked) then attends uniformly to *every*
key, as transformers' eager attention does; its default SDPA path may differ there. Such rows never
reach the pooled output unless the EOS itself is masked.

Pooled output (transformers' rule, kept exactly): with ``eos_token_id == 2`` (configs written before
transformers PR #24773 — CLIP-L in the Flux checkpoints is one) the hidden state at the argmax of
``input_ids`` (the EOS is the highest id of CLIP's vocabulary); otherwise the first position whose id
equals ``eos_token_id`` (position 0 if there is none).

Precision: parameters and activations in ``dtype`` (fp32 or bf16); attention scores, softmax,
the residual sums inside a layer, the activation function and the LayerNorm statistics in fp32.
Inference only (no dropout). The text towers only: no vision model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import LayerNorm, linear, stack_modules

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # openai CLIP (CLIP-L)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, as torch's default (laion CLIP-G)
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    # Defaults are transformers' CLIPTextConfig defaults, so a config.json that omits a key reads alike.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    # Which module the config builds (not a config.json key): the conversion table maps the class
    # names "CLIPTextModel" / "CLIPTextModelWithProjection" to this class / the subclass below.
    with_projection: ClassVar[bool] = False

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"Unsupported CLIP hidden_act {self.hidden_act!r}; expected one of {sorted(_ACTS)} "
                             "('quick_gelu': openai CLIP, 'gelu': laion CLIP).")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}.")
        if type(self.eos_token_id) is not int:  # not None, a list, or a bool
            raise ValueError(f"CLIP eos_token_id must be one integer (the pooled output is read at the EOS), "
                             f"got {self.eos_token_id!r}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Read the ``config.json`` ``CLIPTextModel[WithProjection].save_pretrained`` writes (model_type
        ``clip_text_model``); unknown keys are ignored. A full ``CLIPModel`` config (text and vision
        towers) and an unsupported ``hidden_act`` raise ``ValueError``."""
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"Expected a CLIP text encoder config (model_type 'clip_text_model'), got model_type "
                             f"{model_type!r}; a full CLIPModel (text and vision) is not supported.")
        return cls(**known_fields(cls, d))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def act_fn(self):
        return _ACTS[self.hidden_act]


@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """The config of a ``CLIPTextModelWithProjection`` (the same config.json; builds the projection)."""

    with_projection: ClassVar[bool] = True


class CLIPTextOutput(NamedTuple):
    """``CLIPTextModel``'s output (``out[0]`` is the last hidden state, as transformers)."""

    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at the EOS position
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer (before final_layer_norm)


class CLIPTextModelOutput(NamedTuple):
    """``CLIPTextModelWithProjection``'s output (``out[0]`` is ``text_embeds``, as transformers);
    ``pooler_output`` (not in transformers' output) is the unprojected pooled state."""

    text_embeds: jax.Array  # (B, projection_dim)
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooler_output: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        length = input_ids.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"Sequence length {length} exceeds CLIP max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}.")
        tokens = self.token_embedding(input_ids).astype(jnp.float32)
        positions = self.position_embedding.embedding[...][:length].astype(jnp.float32)
        return (tokens + positions).astype(self.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.k_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.v_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.q_proj = linear(h, h, dtype=dtype, rngs=rngs)
        self.out_proj = linear(h, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, allowed):
        """``allowed``: bool, broadcastable to (B, 1, L, L): query i may attend to key j."""
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.n_heads, self.head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed, scores * (self.head_dim ** -0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.n_heads * self.head_dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.act = cfg.act_fn

    def __call__(self, x):
        y = self.fc1(x)
        return self.fc2(self.act(y.astype(jnp.float32)).astype(y.dtype))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, h, allowed):
        """Pre-norm block; the residual stream inside the block is fp32, rounded to ``dtype`` once."""
        f32 = jnp.float32
        r = h.astype(f32) + self.self_attn(self.layer_norm1(h), allowed).astype(f32)
        r = r + self.mlp(self.layer_norm2(r).astype(self.dtype)).astype(f32)
        return r.astype(self.dtype)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = stack_modules(lambda r: CLIPEncoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers, rngs)

    def __call__(self, h, allowed, collect: bool = False):
        """(last layer's output, stacked outputs of every layer (N, B, L, D) or None)."""
        graphdef, state = nnx.split(self.layers)

        def body(x, s):
            y = nnx.merge(graphdef, s)(x, allowed)
            return y, (y if collect else None)

        return jax.lax.scan(body, h, state)


def attention_allowed(length: int, attention_mask=None):
    """Bool (1 or B, 1, L, L): causal, and (when given) key ``j`` not padded — transformers'
    ``create_causal_mask`` combination."""
    causal = jnp.asarray(np.tril(np.ones((length, length), bool)))[None, None]
    if attention_mask is None:
        return causal
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape (batch, {length}), got {tuple(mask.shape)}.")
    return causal & (mask != 0)[:, None, None, :]


def eos_positions(input_ids, eos_token_id: int):
    """(B,) index of the pooled token: transformers' two rules (see the module docstring)."""
    if eos_token_id == 2:  # legacy configs: the highest id (argmax gives the first of equal maxima)
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
    """transformers 4's ``CLIPTextTransformer`` (the ``text_model`` of both classes)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        h0 = self.embeddings(input_ids)
        allowed = attention_allowed(input_ids.shape[1], attention_mask)
        h, per_layer = self.encoder(h0, allowed, collect=output_hidden_states)
        last = self.final_layer_norm(h)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.cfg.eos_token_id)]
        hidden = None
        if output_hidden_states:
            hidden = (h0,) + tuple(per_layer[i] for i in range(per_layer.shape[0]))
        return CLIPTextOutput(last, pooled, hidden)


class CLIPTextModel(nnx.Module):
    """``model(input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput``
    (``last_hidden_state``, ``pooler_output``, ``hidden_states``), arrays in ``dtype``."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nnx.Module):
    """``model(input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextModelOutput``
    (``text_embeds``, ``last_hidden_state``, ``hidden_states``, ``pooler_output``), arrays in ``dtype``."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)
        self.text_projection = linear(cfg.hidden_size, cfg.projection_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextModelOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return CLIPTextModelOutput(self.text_projection(out.pooler_output), out.last_hidden_state, out.hidden_states,
                                   out.pooler_output)


def model_class(cfg: CLIPTextConfig):
    """The module class ``cfg`` describes (:class:`CLIPTextWithProjectionConfig`: with the projection)."""
    return CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel


# --- checkpoint conversion tables ---------------------------------------------------------------

TORCH_IGNORE: list[str] = [
    r"^(text_model\.)?embeddings\.position_ids$",  # a buffer older transformers saved
]
# transformers 5 saves a CLIPTextModel without the "text_model." prefix (and reads both).
UNPREFIXED_RENAMES: list[tuple[str, str]] = [(r"^text_model\.", "")]


def is_unprefixed(flat) -> bool:
    """Whether the state dict holds the text tower's keys without ``text_model.`` (transformers 5's
    ``CLIPTextModel.save_pretrained``)."""
    return (not any(k.startswith("text_model.") for k in flat)
            and any(k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) for k in flat))


def params_from_torch(flat: dict[str, np.ndarray], cfg: CLIPTextConfig, dtype=None) -> dict:
    """Params pure dict for :class:`CLIPTextModel` (or, for a :class:`CLIPTextWithProjectionConfig`,
    :class:`CLIPTextModelWithProjection`) from a transformers state dict (numpy arrays).

    ``dtype``: cast the floating tensors to it (``None``: float32).
    """
    mdtype = jnp.float32 if dtype is None else dtype
    cls = model_class(cfg)
    return map_state_dict(
        flat,
        expected_shapes(lambda: cls(cfg, dtype=mdtype)),
        stacked={"text_model.encoder.layers": cfg.num_hidden_layers},
        renames=UNPREFIXED_RENAMES if is_unprefixed(flat) else [],
        ignore=TORCH_IGNORE,
        dtype=dtype,
        what=f"CLIP text encoder checkpoint ({cls.__name__})",
    )


def build(cfg: CLIPTextConfig, params: dict, dtype=jnp.float32):
    """A :class:`CLIPTextModel` / :class:`CLIPTextModelWithProjection` (by ``cfg``'s class) holding
    ``params`` (from :func:`params_from_torch`)."""
    cls = model_class(cfg)
    return build_module(lambda: cls(cfg, dtype=dtype), params)


# --- tokenizer ---------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the byte-level alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 600, pad_token: str = EOS, model_max_length: int = 77):
    """A CLIP tokenizer (``transformers.CLIPTokenizer``: byte-level BPE with ``</w>`` word ends, NFC +
    lower-cased, ``<|startoftext|> ... <|endoftext|>`` around each text) whose merges are trained on
    ``corpus`` with the ``tokenizers`` library; no download. ``save_pretrained`` / ``from_pretrained``
    round-trip it.

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with ``</w>``, the
    merges' tokens in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (so the EOS is the
    highest id, which the legacy ``eos_token_id == 2`` pooling relies on). Every text encodes without
    an unknown token. ``vocab_size`` is the total (at least 515, one merge); the corpus may give
    fewer merges. ``pad_token``: ``<|endoftext|>`` (CLIP-L in Flux/SD3) or ``"!"`` (CLIP-G's
    tokenizer_2 in SDXL/SD3, id 0).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    base = list(bytes_to_unicode().values())
    n_fixed = 2 * len(base) + 2
    if vocab_size < n_fixed + 1:
        raise ValueError(f"A CLIP vocabulary holds the 256 byte characters with and without '</w>' and the two "
                         f"special tokens ({n_fixed}); vocab_size={vocab_size} leaves no room for a merge.")
    template = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = template.normalizer
    tok.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    tok.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for t in base + [c + "</w>" for c in base]:
        vocab.setdefault(t, len(vocab))
    kept = []
    for a, b in merges:
        if len(vocab) >= vocab_size - 2:
            break
        kept.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary.")
    return CLIPTokenizer(vocab=vocab, merges=kept, pad_token=pad_token, model_max_length=model_max_length)
