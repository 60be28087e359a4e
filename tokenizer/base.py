"""What every tokenizer in megamom offers, whatever its backend (sentencepiece or Hugging Face)."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer could not be trained, loaded or exported; the message says why and what to do."""


class Tokenizer:
    """Text <-> ids. `encode` adds no special tokens: BOS/EOS are placed by the data pipeline.

    Attributes: `vocab_size` (ids are in [0, vocab_size)), `bos_id`, `eos_id`, `pad_id`, `unk_id`
    (None where the tokenizer has none), `hash` (stable content hash, "sha256:<hex>": equal hashes
    mean equal ids for every text), `kind` ("sentencepiece" or "hf"), `path` (where it was loaded
    from), `dummy_prefix` (the backend prepends a space to every text it encodes; decides how a
    huge document is cut into pieces without changing its ids).
    """

    kind: str = "?"
    path: str = ""
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]
    hash: str
    dummy_prefix: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def info(self) -> dict:
        """What a manifest or checkpoint records about this tokenizer."""
        return {"kind": self.kind, "path": self.path, "hash": self.hash, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"hash={self.hash[:19]}...)")


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return "sha256:" + h.hexdigest()


def opt_id(i: int) -> Optional[int]:
    """sentencepiece says -1 for "none"; we say None."""
    return None if i is None or i < 0 else int(i)
