"""`load_tokenizer(path)`: a sentencepiece `.model`, a directory written by `megamom tokenizer
train|export`, or any Hugging Face tokenizer directory."""
from __future__ import annotations

import json
from pathlib import Path

from .base import Tokenizer, TokenizerError

MARKER = "megamom_tokenizer.json"  # written by train/export next to tokenizer.model
SPM_NAME = "tokenizer.model"


def load_tokenizer(path: str | Path, num_threads: int = 1) -> Tokenizer:
    """Load a tokenizer. Directories written by megamom hold both the sentencepiece model and its
    Hugging Face export (identical ids, tested); the sentencepiece model is used (it is faster, and
    the hash is then the same as for the bare `.model`). Other directories go through
    `transformers.AutoTokenizer`. `ids:<vocab>`: token ids written as text (tokenizer/ids.py)."""
    from .hf import HFTokenizer, is_hf_dir
    from .ids import PREFIX, IdsTokenizer
    from .spm import SentencePieceTokenizer

    if str(path).startswith(PREFIX):  # token ids as text (synthetic tasks)
        return IdsTokenizer.parse(str(path))
    p = Path(path).expanduser()
    if p.is_file():
        return SentencePieceTokenizer.from_file(p, num_threads)
    if p.is_dir():
        if (p / MARKER).is_file() and (p / SPM_NAME).is_file():
            tok = SentencePieceTokenizer.from_file(p / SPM_NAME, num_threads)
            tok.path = str(p)
            return tok
        if is_hf_dir(p):
            return HFTokenizer(p)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer.from_file(models[0], num_threads)
        raise TokenizerError(f"{str(p)!r} holds no tokenizer: expected a sentencepiece .model, a directory "
                             "from `megamom tokenizer train`, or a Hugging Face tokenizer directory "
                             "(tokenizer.json)")
    raise TokenizerError(f"tokenizer {str(p)!r} does not exist; train one with `megamom tokenizer train` "
                         "or point to a sentencepiece .model / Hugging Face tokenizer directory")


def read_marker(path: str | Path) -> dict:
    f = Path(path) / MARKER
    return json.loads(f.read_text()) if f.is_file() else {}
