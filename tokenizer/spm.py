"""A sentencepiece `.model` as a megamom Tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from .base import Tokenizer, TokenizerError, opt_id, sha256_bytes


class SentencePieceTokenizer(Tokenizer):
    """Wraps `SentencePieceProcessor`. Pickles as the model bytes, so it can go to worker processes.

    `num_threads` is what sentencepiece uses for `encode_batch` (1 in data-prep workers, which are
    one per core already). The hash is the sha256 of the serialized model: the model file is the
    whole definition of the tokenizer (pieces, scores, normalizer, special ids).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, path: str = "", num_threads: int = 1):
        self._proto = bytes(model_proto)
        self.path = str(path)
        self.num_threads = num_threads
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with terse messages
            raise TokenizerError(f"{path or 'model bytes'} is not a valid sentencepiece model ({e}); "
                                 "pass a .model file written by sentencepiece (megamom tokenizer train "
                                 "makes one) or a Hugging Face tokenizer directory") from None
        sp = self._sp
        self.vocab_size = int(sp.get_piece_size())
        self.bos_id, self.eos_id = opt_id(sp.bos_id()), opt_id(sp.eos_id())
        self.pad_id, self.unk_id = opt_id(sp.pad_id()), opt_id(sp.unk_id())
        self.hash = sha256_bytes(self._proto)
        self.dummy_prefix = bool(self.proto().normalizer_spec.add_dummy_prefix)

    @classmethod
    def from_file(cls, path: str | Path, num_threads: int = 1) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read sentencepiece model {str(path)!r}: {e.strerror}") from None
        return cls(data, str(path), num_threads)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def proto(self):
        """The parsed ModelProto (pieces, trainer_spec, normalizer_spec)."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(self._proto)
        return m

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"proto": self._proto, "path": self.path, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["path"], state["num_threads"])
