"""A Hugging Face tokenizer directory as a megamom Tokenizer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .base import Tokenizer, TokenizerError, sha256_bytes

# The files that define a tokenizer in a Hugging Face directory (a model directory may hold weights
# too: they are not part of the tokenizer's identity).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                      "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


class HFTokenizer(Tokenizer):
    """Wraps `AutoTokenizer.from_pretrained(dir)` (local files only). Pickles as its directory."""

    kind = "hf"

    def __init__(self, path: str | Path):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelize over processes
        path = Path(path)
        if not is_hf_dir(path):
            raise TokenizerError(f"{str(path)!r} is not a Hugging Face tokenizer directory (no tokenizer.json "
                                 "or tokenizer_config.json); pass such a directory or a sentencepiece .model")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise TokenizerError(f"cannot load the Hugging Face tokenizer in {str(path)!r}: {e}") from None
        self._tok = tok
        self.path = str(path)
        self.vocab_size = len(tok)
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.pad_id, self.unk_id = tok.pad_token_id, tok.unk_token_id
        chunks = []
        for name in HF_TOKENIZER_FILES:
            f = path / name
            if f.is_file():
                chunks += [name.encode(), f.read_bytes()]
        self.hash = sha256_bytes(*chunks)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.convert_ids_to_tokens(int(i))

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])
