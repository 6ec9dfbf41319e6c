"""Model and scheduler configs are the diffusers/transformers config.json read into a dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def known_fields(cls, d: Mapping[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls`` (the rest — ``_class_name``,
    ``_diffusers_version``, fields of other variants — is ignored); JSON lists become tuples so the
    frozen config stays hashable."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


class TransformerDims:
    """The widths every DiT config derives the same way (a mixin of the transformer config dataclasses,
    which hold ``num_attention_heads``, ``attention_head_dim``, ``in_channels``, ``out_channels``)."""

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_ch(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels


class FromConfigDict:
    """``from_dict`` / ``from_json`` for a config dataclass read from a diffusers/transformers JSON file
    (unknown keys ignored, see :func:`known_fields`; validation belongs in ``__post_init__``)."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        return cls(**known_fields(cls, d))

    @classmethod
    def from_json(cls, path):
        import json

        with open(path) as f:
            return cls.from_dict(json.load(f))
