"""LLaVA (transformers ``LlavaForConditionalGeneration``) as a text encoder in Flax NNX: HunyuanVideo image-to-video's
``text_encoder`` (xtuner/llava-llama-3-8b-v1_1: CLIP ViT-L/14-336 + a two-layer projector + Llama 3 8B).

* ``vision_tower``: :class:`xdit_jax.models.clip.CLIPVisionModel`; the image features are its
  ``hidden_states[vision_feature_layer]`` (-2 in the release), without the class token where
  ``vision_feature_select_strategy`` is "default" (576 patch tokens of a 336 x 336 image);
* ``multi_modal_projector``: ``linear_2(act(linear_1(features)))`` (``projector_hidden_act``: exact GELU);
* ``language_model``: :class:`xdit_jax.models.llama.LlamaModel`, on the token embeddings in which the positions holding
  ``image_token_index`` take the projected image features, in order (transformers' ``masked_scatter``), at the given
  ``position_ids`` (HunyuanVideo I2V passes ``cumsum(mask) - 1``, 1 on padding).

``lm_head`` is not read. Two key layouts load: transformers 5's (``model.vision_tower.*``,
``model.multi_modal_projector.*``, ``model.language_model.*``) and the hub's older one (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``). Only the single-layer, "default"/"full" strategy of the
release is supported (a list of ``vision_feature_layer`` is refused).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.keymap import build_module
from xdit_jax.models import clip, llama
from xdit_jax.models.layers import linear

VISION_DEFAULT = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                      image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: clip.CLIPVisionConfig
    text: llama.LlamaConfig
    image_token_index: int = 32000
    pad_token_id: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        if d.get("model_type", "llava") != "llava":
            raise ValueError(f"Expected a LLaVA config (model_type 'llava'), got {d.get('model_type')!r}.")
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only one layer is supported (the release's -2).")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r}: 'default' or 'full'.")
        act = d.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"projector_hidden_act {act!r}: only 'gelu' (the release's) is supported.")
        # transformers' LlavaConfig: a missing vision_config is CLIP ViT-L/14-336's
        vc = dict(d["vision_config"]) if d.get("vision_config") else dict(VISION_DEFAULT)
        if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"LLaVA vision tower {vc.get('model_type')!r}: only CLIP's is supported.")
        tc = dict(d.get("text_config") or {})
        tc.setdefault("model_type", "llama")
        pad = d.get("pad_token_id", tc.get("pad_token_id"))
        return cls(vision=clip.CLIPVisionConfig.from_dict(vc), text=llama.LlamaConfig.from_dict(tc),
                   image_token_index=int(d.get("image_token_index", d.get("image_token_id", 32000))),
                   pad_token_id=None if pad is None else int(pad), vision_feature_layer=layer,
                   vision_feature_select_strategy=strategy, projector_hidden_act=act,
                   multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype, rngs):
        bias = cfg.multimodal_projector_bias
        self.linear_1 = linear(cfg.vision.hidden_size, cfg.text.hidden_size, bias=bias, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def rope_at(cfg: llama.LlamaConfig, position_ids):
    """(cos, sin) (B, L, head_dim) float32 at ``position_ids`` (B, L) (transformers' rotary embedding)."""
    inv = jnp.asarray(llama.rope_inv_freq(cfg))
    freqs = jnp.asarray(position_ids, jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class LlavaModel(nnx.Module):
    """``model.hidden_state(input_ids, attention_mask, position_ids, pixel_values, index)``: the language model's
    ``hidden_states[index]`` with the image's features in place of its ``image_token_index`` tokens."""

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.cfg, self.dtype = cfg, dtype
        self.vision_tower = clip.CLIPVisionModel(cfg.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = llama.LlamaModel(cfg.text, dtype=dtype, rngs=rngs)

    def image_features(self, pixel_values):
        """(B, tokens, text hidden): the projected features of the images (B, 3, S, S)."""
        h = self.vision_tower.hidden_state(pixel_values, self.cfg.vision_feature_layer)
        if self.cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return self.multi_modal_projector(h)

    def embeddings(self, input_ids, pixel_values):
        """The token embeddings with the image features scattered, in order, over the image tokens (row-major over
        the batch, as transformers' ``masked_scatter``)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        emb = self.language_model.embed_tokens(ids)
        feats = self.image_features(pixel_values).astype(emb.dtype).reshape(-1, emb.shape[-1])
        is_image = (ids == self.cfg.image_token_index).reshape(-1)
        order = jnp.clip(jnp.cumsum(is_image) - 1, 0, feats.shape[0] - 1)
        flat = jnp.where(is_image[:, None], feats[order], emb.reshape(-1, emb.shape[-1]))
        return flat.reshape(emb.shape)

    def hidden_state(self, input_ids, attention_mask, position_ids, pixel_values, index: int):
        lm = self.language_model
        n = lm.cfg.num_hidden_layers
        if not -(n + 1) <= index <= n:
            raise IndexError(f"hidden_states has {n + 1} entries (embeddings and {n} layers); got index {index}.")
        stop = index % (n + 1)
        h0 = self.embeddings(input_ids, pixel_values)
        rope = rope_at(lm.cfg, position_ids)
        if stop == n:
            return lm(None, attention_mask, inputs_embeds=h0, rope=rope).last_hidden_state
        return lm._run(None, attention_mask, stop, False, inputs_embeds=h0, rope=rope)[1]


# --- checkpoint conversion ---------------------------------------------------------------------

_PARTS = (("vision_tower", ("model.vision_tower.", "vision_tower.")),
          ("multi_modal_projector", ("model.multi_modal_projector.", "multi_modal_projector.")),
          ("language_model", ("model.language_model.", "language_model.model.")))
_SKIPPED = ("lm_head.", "language_model.lm_head.")


def params_from_torch(flat: dict, cfg: LlavaConfig, dtype=None) -> dict:
    """Params of :class:`LlavaModel` from a ``LlavaForConditionalGeneration`` state dict (either layout)."""
    groups: dict[str, dict] = {name: {} for name, _ in _PARTS}
    for k, v in flat.items():
        if k.startswith(_SKIPPED):
            continue
        for name, prefixes in _PARTS:
            p = next((p for p in prefixes if k.startswith(p)), None)
            if p is not None:
                groups[name][k[len(p):]] = v
                break
        else:
            raise ValueError(f"LLaVA checkpoint key {k!r} is not the vision tower's, the projector's or the language "
                             "model's.")
    proj = groups["multi_modal_projector"]
    mdtype = np.float32 if dtype is None else dtype
    projector = {}
    for layer in ("linear_1", "linear_2"):
        if f"{layer}.weight" not in proj:
            raise ValueError(f"LLaVA checkpoint lacks multi_modal_projector.{layer}.weight.")
        projector[layer] = {"kernel": np.asarray(proj[f"{layer}.weight"]).T.astype(mdtype)}
        if cfg.multimodal_projector_bias:
            projector[layer]["bias"] = np.asarray(proj[f"{layer}.bias"]).astype(mdtype)
    return {"vision_tower": clip.params_from_torch(groups["vision_tower"], cfg.vision, dtype=dtype),
            "multi_modal_projector": projector,
            "language_model": llama.params_from_torch(groups["language_model"], cfg.text, dtype=dtype)}


def build(cfg: LlavaConfig, params: dict, dtype=jnp.float32) -> LlavaModel:
    return build_module(lambda: LlavaModel(cfg, dtype=dtype), params)
