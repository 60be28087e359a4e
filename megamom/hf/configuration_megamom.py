"""Hugging Face configuration of a megamom model: the fields of `megamom.config.ModelConfig`, one
to one, plus the usual token ids. Works with transformers 4.5x and 5.x.

This file ships inside every `megamom`-format export (see megamom.hf.bundle), so it must import
nothing from megamom but what the bundle can flatten."""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ..config import ModelConfig, model_config_from_dict

_FIELDS = [f for f in dataclasses.fields(ModelConfig) if f.name != "tie_word_embeddings"]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class MegaMoMConfig(PretrainedConfig):
    model_type = "megamom"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(self, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
                 **kwargs):
        for f in _FIELDS:
            setattr(self, f.name, kwargs.pop(f.name, _default(f)))
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.to_model_config()  # invalid values fail here, naming the key

    def to_model_config(self) -> ModelConfig:
        """The megamom ModelConfig (validated: a ConfigError names a bad key)."""
        values = {f.name: getattr(self, f.name) for f in _FIELDS}
        return model_config_from_dict({**values, "tie_word_embeddings": bool(self.tie_word_embeddings)})

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "MegaMoMConfig":
        return cls(**dataclasses.asdict(cfg), **kwargs)
