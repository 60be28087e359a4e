"""Turning tokenized documents into fixed-size samples.

A sample has C = seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len).

- `concat` (layout a): the documents of a unit, each ending in EOS, are concatenated and cut every
  seq_len tokens into samples of C tokens: consecutive samples share one token, so every token but
  the first of the unit is a target exactly once. The last sample of a unit may be shorter (the
  loader pads it and masks the padding).
- `packed` (layout b): documents are kept whole and packed into rows of at most C tokens, each row
  storing its documents' lengths (`doc_lens`) so training can reset memories at boundaries. A
  document longer than C fills rows of its own (pieces of C tokens, again one token shared between
  consecutive pieces), and its remainder is packed like a short document. Packing is best-fit over
  `pack_bins` open rows (1 = next-fit, which keeps document order); the fullest row is written
  when a new one is needed. Rows are not padded in storage.
"""
from __future__ import annotations

import bisect
from itertools import chain
from typing import Callable

import numpy as np

Emit = Callable[[dict], None]


class SplitStats:
    def __init__(self):
        self.documents = 0
        self.tokens = 0  # document tokens, BOS/EOS included
        self.samples = 0
        self.padding = 0  # slots of samples not holding a token (filled with pad by the loader)

    def to_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "samples": self.samples,
                "padding_tokens": self.padding}


class ConcatBuilder:
    def __init__(self, seq_len: int, dtype, emit: Emit, drain_tokens: int = 1 << 18):
        self.L, self.C, self.dtype, self.emit = seq_len, seq_len + 1, dtype, emit
        self.parts: list = []
        self.n = 0
        self.drain_tokens = max(drain_tokens, 2 * self.C)
        self.stats = SplitStats()

    def add(self, ids: list, start: bool, end: bool) -> None:
        self.parts.append(ids)
        self.n += len(ids)
        self.stats.tokens += len(ids)
        self.stats.documents += end
        if self.n >= self.drain_tokens:
            self._drain()

    def _drain(self) -> None:
        arr = np.fromiter(chain.from_iterable(self.parts), dtype=self.dtype, count=self.n)
        L, C = self.L, self.C
        s = 0
        while s + C <= len(arr):
            self.emit({"input_ids": arr[s:s + C]})
            self.stats.samples += 1
            s += L
        rest = arr[s:]
        self.parts, self.n = [rest], len(rest)

    def finish(self) -> None:
        self._drain()
        if self.n >= 2:  # a single leftover token is the previous sample's last target already
            self.emit({"input_ids": np.asarray(self.parts[0], dtype=self.dtype)})
            self.stats.samples += 1
            self.stats.padding += self.C - self.n
        self.parts, self.n = [], 0


class PackedBuilder:
    def __init__(self, seq_len: int, dtype, emit: Emit, pack_bins: int = 64):
        self.L, self.C, self.dtype, self.emit = seq_len, seq_len + 1, dtype, emit
        self.max_open = max(1, pack_bins)
        self.doc: list = []  # tokens of the current document (at most ~2C kept)
        self.open: list[tuple[int, int]] = []  # sorted (free slots, row number)
        self.rows: dict[int, list] = {}  # row number -> its segments
        self.next_row = 0
        self.stats = SplitStats()

    def add(self, ids: list, start: bool, end: bool) -> None:
        self.stats.tokens += len(ids)
        if start:
            self.doc = list(ids)
        else:
            self.doc.extend(ids)
        doc, C, L = self.doc, self.C, self.L
        if len(doc) > C:  # long document: full rows of C tokens, one token shared between them
            s = 0
            while len(doc) - s > C:
                self._write([doc[s:s + C]])
                s += L
            self.doc = doc = doc[s:]
        if end:
            self.stats.documents += 1
            self._place(doc)
            self.doc = []

    def _place(self, seg: list) -> None:
        n = len(seg)
        i = bisect.bisect_left(self.open, (n, -1))  # best fit: the fullest row with room
        if i < len(self.open):
            free, row = self.open.pop(i)
        else:
            if len(self.open) >= self.max_open:  # write the fullest open row to make room
                _, full = self.open.pop(0)
                self._write(self.rows.pop(full))
            row, free = self.next_row, self.C
            self.next_row += 1
            self.rows[row] = []
        self.rows[row].append(seg)
        free -= n
        if free == 0:
            self._write(self.rows.pop(row))
        else:
            bisect.insort(self.open, (free, row))

    def _write(self, segs: list) -> None:
        lens = np.fromiter((len(s) for s in segs), dtype=np.uint32, count=len(segs))
        total = int(lens.sum())
        tokens = np.fromiter(chain.from_iterable(segs), dtype=self.dtype, count=total)
        self.emit({"input_ids": tokens, "doc_lens": lens})
        self.stats.samples += 1
        self.stats.padding += self.C - total

    def finish(self) -> None:
        for _, row in sorted((r, r) for _, r in self.open):
            self._write(self.rows.pop(row))
        self.open = []


def make_builder(layout: str, seq_len: int, dtype, emit: Emit, pack_bins: int):
    if layout == "concat":
        return ConcatBuilder(seq_len, dtype, emit)
    return PackedBuilder(seq_len, dtype, emit, pack_bins)


def columns(layout: str, dtype) -> dict:
    cols = {"input_ids": f"ndarray:{np.dtype(dtype).name}"}
    if layout == "packed":
        cols["doc_lens"] = "ndarray:uint32"
    return cols
