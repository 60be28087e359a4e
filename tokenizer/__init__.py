"""Tokenizers: train sentencepiece (BPE / unigram), load a .model or a Hugging Face directory,
export to Hugging Face format with identical ids (`megamom tokenizer`, see docs/data.md)."""
from .base import Tokenizer, TokenizerError
from .load import load_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer", "TrainSpec", "export_hf"]


def __getattr__(name):  # heavy imports (transformers) only when used
    if name in ("train_tokenizer", "TrainSpec"):
        from . import train

        return getattr(train, name)
    if name == "export_hf":
        from .export import export_hf

        return export_hf
    raise AttributeError(name)
