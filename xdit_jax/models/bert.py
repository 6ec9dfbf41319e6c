"""The BERT encoder — transformers' ``BertModel`` up to ``last_hidden_state`` — in Flax NNX.

HunyuanDiT encodes its prompts with it (hfl/chinese-roberta-wwm-ext-large: 24 layers, hidden 1024)
and takes ``text_encoder(input_ids, attention_mask=mask)[0]``, the last hidden state; here
``model(input_ids, attention_mask)`` returns that array itself. The pooler is not built.

Submodules carry the transformers names (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query`` ...), so :func:`xdit_jax.keymap.map_state_dict`
derives the key map; ``encoder.layer`` is stacked on a leading layer axis and run with one scan.
Checkpoints may hold the ``pooler.*`` weights and the ``embeddings.position_ids`` /
``embeddings.token_type_ids`` buffers (ignored), and may be a ``BertFor*`` head model whose
encoder sits under ``bert.`` (read from there; the heads are ignored).

Attention mask: as transformers, a key whose mask entry is 0 gets ``finfo(float32).min`` added to
its (fp32) score; padded *queries* still attend to the valid keys and get defined outputs. A row
whose mask is all 0 then has all scores equal to that minimum and attends uniformly to every
key — what transformers 5's eager attention does (4.x's additive float masks should act alike;
not checked here). transformers 5's default SDPA attention, with a boolean mask, gives such a row a
zero attention output instead. Tokenizers that add [CLS]/[SEP] never produce such a row.

Precision: parameters and activations in ``dtype`` (fp32 or bf16); attention scores, softmax,
residual sums and LayerNorm statistics in fp32. Inference only (no dropout), encoder only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.config_util import known_fields
from xdit_jax.keymap import build_module, expected_shapes, map_state_dict
from xdit_jax.models.layers import LayerNorm, linear, stack_modules

_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf, as torch's default
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    # Defaults are transformers' BertConfig defaults, so a config.json that omits a key reads alike.
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"Unsupported BERT hidden_act {self.hidden_act!r}; expected one of {sorted(_ACTS)}.")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"Unsupported BERT position_embedding_type {self.position_embedding_type!r}; "
                             "only 'absolute' position embeddings are implemented.")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("Only the BERT encoder is implemented (is_decoder and add_cross_attention must be "
                             "false): causal self-attention and cross-attention are not supported.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"BERT hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        """Read a transformers ``BertConfig`` config.json dict; unknown keys are ignored.

        ``position_embedding_type`` (gone from transformers 5, present in older files) and
        ``hidden_act`` are checked: anything but what is implemented raises ``ValueError``.
        """
        d = {k: v for k, v in d.items() if v is not None}  # JSON null: the default
        return cls(**known_fields(cls, d))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def act_fn(self):
        return _ACTS[self.hidden_act]


def _add_norm(norm: LayerNorm, x, residual, dtype):
    """``norm(x + residual)`` with the sum and the statistics in fp32, the result in ``dtype``."""
    return norm(x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dtype)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype

        def embed(n):
            return nnx.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.word_embeddings = embed(cfg.vocab_size)
        self.position_embeddings = embed(cfg.max_position_embeddings)
        self.token_type_embeddings = embed(cfg.type_vocab_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids, token_type_ids=None):
        length = input_ids.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"Sequence length {length} exceeds BERT max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}.")
        f32 = jnp.float32
        words = self.word_embeddings(input_ids).astype(f32)
        if token_type_ids is None:  # transformers: an all-zeros buffer
            types = self.token_type_embeddings.embedding[...][0].astype(f32)
        else:
            types = self.token_type_embeddings(jnp.asarray(token_type_ids, jnp.int32)).astype(f32)
        positions = self.position_embeddings.embedding[...][:length].astype(f32)
        return self.LayerNorm((words + types) + positions).astype(self.dtype)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = linear(h, h, dtype=dtype, rngs=rngs)
        self.key = linear(h, h, dtype=dtype, rngs=rngs)
        self.value = linear(h, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask_bias):
        """``mask_bias``: (B, 1, 1, L) fp32, 0 or ``finfo(float32).min`` per key; or None."""
        b, l, _ = x.shape
        q = self.query(x).reshape(b, l, self.n_heads, self.head_dim)
        k = self.key(x).reshape(b, l, self.n_heads, self.head_dim)
        v = self.value(x).reshape(b, l, self.n_heads, self.head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if mask_bias is not None:
            scores = scores + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.n_heads * self.head_dim)


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.dense = linear(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x, residual):
        return _add_norm(self.LayerNorm, self.dense(x), residual, self.dtype)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = BertSelfOutput(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.act = cfg.act_fn

    def __call__(self, x):
        y = self.dense(x)
        return self.act(y.astype(jnp.float32)).astype(y.dtype)


class BertOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.dense = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x, residual):
        return _add_norm(self.LayerNorm, self.dense(x), residual, self.dtype)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = BertOutput(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask_bias):
        h = self.attention(x, mask_bias)
        return self.output(self.intermediate(h), h)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = stack_modules(lambda r: BertLayer(cfg, dtype=dtype, rngs=r), cfg.num_hidden_layers, rngs)

    def __call__(self, h, mask_bias):
        graphdef, state = nnx.split(self.layer)

        def body(x, s):
            return nnx.merge(graphdef, s)(x, mask_bias), None

        h, _ = jax.lax.scan(body, h, state)
        return h


def extended_attention_bias(attention_mask, length: int):
    """(B, L) mask (1/True: attend) -> (B, 1, 1, L) fp32 additive bias: 0, or ``finfo(float32).min``."""
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2 or mask.shape[1] != length:
        raise ValueError(f"attention_mask must have shape (batch, {length}), got {tuple(mask.shape)}.")
    return jnp.where(mask != 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None, :]


class BertModel(nnx.Module):
    """``model(input_ids, attention_mask=None, token_type_ids=None) -> last_hidden_state``
    (B, L, hidden_size) in ``dtype``. ``None`` mask: every key is attended; ``None`` token types: 0."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg = cfg
        self.dtype = dtype
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = BertEncoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        h = self.embeddings(input_ids, token_type_ids)
        bias = None if attention_mask is None else extended_attention_bias(attention_mask, input_ids.shape[1])
        return self.encoder(h, bias)


# --- checkpoint conversion tables ---------------------------------------------------------------

TORCH_IGNORE: list[str] = [
    r"^(bert\.)?pooler\.",  # BertModel(add_pooling_layer=True): the pooler is not used
    r"^(bert\.)?embeddings\.position_ids$",  # buffers older transformers saved
    r"^(bert\.)?embeddings\.token_type_ids$",
]
# A BertFor* head model's checkpoint: the encoder under "bert.", the heads (cls.*, classifier.*) ignored.
PREFIXED_RENAMES: list[tuple[str, str]] = [(r"^", "bert.")]
PREFIXED_IGNORE: list[str] = [r"^(?!bert\.)"]


def is_prefixed(flat) -> bool:
    """Whether the state dict is a ``BertFor*`` model's (encoder keys under ``bert.``)."""
    return (any(k.startswith("bert.") for k in flat)
            and not any(k.startswith(("embeddings.", "encoder.")) for k in flat))


def params_from_torch(flat: dict[str, np.ndarray], cfg: BertConfig, dtype=None) -> dict:
    """Params pure dict for :class:`BertModel` from a transformers state dict (numpy arrays).

    ``dtype``: cast the floating tensors to it (``None``: float32).
    """
    mdtype = jnp.float32 if dtype is None else dtype
    prefixed = is_prefixed(flat)
    return map_state_dict(
        flat,
        expected_shapes(lambda: BertModel(cfg, dtype=mdtype)),
        stacked={"encoder.layer": cfg.num_hidden_layers},
        renames=PREFIXED_RENAMES if prefixed else [],
        ignore=TORCH_IGNORE + (PREFIXED_IGNORE if prefixed else []),
        dtype=dtype,
        what="BERT text encoder checkpoint",
    )


def build(cfg: BertConfig, params: dict, dtype=jnp.float32) -> BertModel:
    """A :class:`BertModel` holding ``params`` (from :func:`params_from_torch`)."""
    return build_module(lambda: BertModel(cfg, dtype=dtype), params)


# --- tokenizer ---------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as BERT vocabularies


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 128, lowercase: bool = True):
    """A BERT WordPiece tokenizer trained on ``corpus`` with the ``tokenizers`` library, as a
    ``transformers.BertTokenizerFast`` (no download): BERT normalizer (Chinese characters split
    apart, lowercased) and pre-tokenizer, ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, and
    ``[CLS] ... [SEP]`` added around each text. ``save_pretrained`` / ``AutoTokenizer`` round-trip it.

    Every character of the corpus enters the vocabulary whatever ``vocab_size`` says; a corpus whose
    alphabet does not fit raises ``ValueError`` (the ids must stay below the model's vocab_size).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    corpus = list(corpus)
    if not corpus:
        raise ValueError("train_tokenizer needs a non-empty corpus.")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##")
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"The corpus needs {tok.get_vocab_size()} tokens (its characters, with and without the "
                         f"'##' prefix, and the special tokens), more than vocab_size={vocab_size}; raise "
                         "vocab_size or use a smaller corpus.")
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), ids
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids[2]), ("[SEP]", ids[3])])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                             tokenize_chinese_chars=True, strip_accents=None)
