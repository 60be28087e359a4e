"""Token ids as text, for synthetic tasks whose data are ids (megamom prep-mqar): `ids:<vocab>`
names it wherever a tokenizer path goes (data.tokenizer, a manifest). Text is the ids separated by
spaces, so a prompt is written as ids too (`--sample-prompt "12 7 300"`)."""
from __future__ import annotations

from typing import Sequence

from .base import Tokenizer, TokenizerError, sha256_bytes

PREFIX = "ids:"


class IdsTokenizer(Tokenizer):
    kind = "ids"

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise TokenizerError(f"ids:{vocab_size}: an ids vocabulary needs at least 2 ids")
        self.vocab_size = vocab_size
        self.path = f"{PREFIX}{vocab_size}"
        self.hash = sha256_bytes(b"megamom-ids", str(vocab_size).encode())
        self.bos_id = self.eos_id = self.pad_id = self.unk_id = None

    @classmethod
    def parse(cls, spec: str) -> "IdsTokenizer":
        size = spec[len(PREFIX):]
        if not (size.isascii() and size.isdigit()):
            raise TokenizerError(f"tokenizer {spec!r}: write the ids vocabulary as ids:<size>, e.g. ids:512")
        return cls(int(size))

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not (word.isascii() and word.isdigit()) or int(word) >= self.vocab_size:
                raise TokenizerError(f"{word!r} is not an id of the {self.path} vocabulary (0 to "
                                     f"{self.vocab_size - 1}, separated by spaces)")
            ids.append(int(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def id_to_piece(self, i: int) -> str:
        return str(int(i))
