"""Reading documents out of a work unit, streamed: memory is bounded by `chunk_chars` (text,
one-document-per-file and paragraph modes) or `max_line_bytes` (JSON lines), never by file size.

A reader yields `Piece(text, start, end, key)`: a document arrives as one piece, or as several when
it is larger than `chunk_chars` (cut at a space, so that encoding the pieces one by one gives the
ids of the whole text; see `_cut`). `key` identifies the document inside its file (byte offset, or
row for parquet) and decides its train/val split. Bad input is reported to the `Recorder`, which
counts it (or raises under --strict).
"""
from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

from .errors import BadInput, StrictStop
from .inputs import BLOCK, InputFile, Part, Unit, open_binary

_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str from json.loads: always unpaired


class Piece(NamedTuple):
    text: str
    start: bool  # first piece of its document
    end: bool  # last piece of its document
    key: int  # document id inside its file (byte offset or row)


@dataclass
class ReadOptions:
    text_field: str = "text"
    txt_mode: str = "file"  # file | line | paragraph
    invalid_utf8: str = "replace"  # replace | reject
    max_line_bytes: int = 256 << 20
    chunk_chars: int = 1 << 20
    dummy_prefix: bool = False  # the tokenizer prepends a space: cut pieces *at* a space, dropping it


class Recorder:
    """Counts documents and bad input of one unit; keeps the first `max_listed` messages."""

    def __init__(self, strict: bool, max_listed: int = 10000):
        self.strict = strict
        self.max_listed = max_listed
        self.docs_read = 0
        self.utf8_replaced = 0
        self.blank_lines = 0
        self.rejected: dict[str, int] = {}
        self.files_rejected: dict[str, int] = {}
        self.bad: list[BadInput] = []
        self.n_bad = 0

    def reject(self, bad: BadInput) -> None:
        if bad.level == "document":
            self.rejected[bad.reason] = self.rejected.get(bad.reason, 0) + 1
        else:
            self.files_rejected[bad.reason] = self.files_rejected.get(bad.reason, 0) + 1
        self.n_bad += 1
        if self.strict:
            raise StrictStop(bad)
        if len(self.bad) < self.max_listed:
            self.bad.append(bad)


def read_unit(unit: Unit, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    """All documents of a unit, part after part."""
    for part in unit.parts:
        yield from read_part(part, opt, rec)


def read_part(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    """All documents of a part of a file. File-level problems (unreadable, binary) end the unit's file early:
    what was read before stays counted, the file is counted as rejected, and a document the failure
    cut off (counted as read, not finished) is rejected as `truncated`, so that documents read =
    written + rejected holds. Pieces of it already handed on (a streamed document) stay where they
    went: a streamed document cannot be taken back."""
    f = unit.file
    if unit.binary:  # sniffed once per file by plan_units
        rec.reject(BadInput("file", "binary", f.path, detail="NUL byte in its first 8 KiB"))
        return
    read0, rejected0 = rec.docs_read, sum(rec.rejected.values())
    finished = 0
    open_key: Optional[int] = None  # key of the document whose pieces are being handed on
    try:
        for piece in _read(unit, opt, rec):
            if piece.end:
                finished += 1
                open_key = None
            else:
                open_key = piece.key
            yield piece
    except StrictStop:
        raise
    except (OSError, EOFError, ValueError) as e:  # incl. gzip.BadGzipFile, zstd errors, truncation
        if type(e).__module__.startswith("json"):
            raise
        why = f"{type(e).__name__}: {e}"
        rec.reject(BadInput("file", "unreadable", f.path, detail=why))
        cut = rec.docs_read - read0 - finished - (sum(rec.rejected.values()) - rejected0)
        if cut > 0:  # at most one: documents are read one at a time
            if open_key is None and f.format == "text" and opt.txt_mode == "file":
                open_key = 0
            for _ in range(cut):
                rec.reject(BadInput("document", "truncated", f.path, None, open_key,
                                    f"the read failed inside it: {why}"))


def _read(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    if unit.file.format == "parquet":
        yield from _parquet(unit, opt, rec)
    elif unit.file.format == "jsonl":
        yield from _jsonl(unit, opt, rec)
    elif opt.txt_mode == "line":
        yield from _text_lines(unit, opt, rec)
    elif opt.txt_mode == "paragraph":
        yield from _text_paragraphs(unit, opt, rec)
    else:
        yield from _text_file(unit, opt, rec)


# ---------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------

def _lines(unit: Part, limit: int) -> Iterator[tuple[int, bytes, bool, bool]]:
    """(offset of the line, bytes, first piece, last piece) for the lines that *start* in
    [unit.start, unit.end). A line longer than `limit` comes in several pieces."""
    with open_binary(unit.file) as fh:
        pos = unit.start
        if pos > 0:  # skip the line that began in the previous unit
            fh.seek(pos - 1)
            pos -= 1
            while True:
                part = fh.readline(limit)
                pos += len(part)
                if not part or part.endswith(b"\n"):
                    break
        while unit.end is None or pos < unit.end:
            line = fh.readline(limit)
            if not line:
                return
            start, first = pos, True
            pos += len(line)
            while True:
                last = line.endswith(b"\n") or len(line) < limit
                if not last:
                    nxt = fh.readline(limit)
                    if not nxt:
                        last = True
                    yield start, line, first, last
                    if not nxt:
                        break
                    pos += len(nxt)
                    line, first = nxt, False
                    continue
                yield start, line, first, True
                break


def _decode(data: bytes, f: InputFile, offset: int, line: Optional[int], opt: ReadOptions,
            rec: Recorder) -> Optional[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if opt.invalid_utf8 == "reject":
            rec.reject(BadInput("document", "invalid_utf8", f.path, line, offset,
                                f"bad byte 0x{data[e.start]:02x} at byte {e.start} of the line"))
            return None
        rec.utf8_replaced += 1
        return data.decode("utf-8", errors="replace")


def _jsonl(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    f = unit.file
    lineno = 0 if unit.first else None  # line numbers of later byte ranges are filled in later
    path = opt.text_field.split(".")
    for offset, raw, first, last in _lines(unit, opt.max_line_bytes):
        if lineno is not None and first:
            lineno += 1
        if not (first and last):  # longer than max_line_bytes: skip its pieces, count it once
            if first:
                rec.docs_read += 1
                rec.reject(BadInput("document", "line_too_long", f.path, lineno, offset,
                                    f"> {opt.max_line_bytes} bytes"))
            continue
        if not raw.strip():
            rec.blank_lines += 1
            continue
        rec.docs_read += 1
        replaced = rec.utf8_replaced
        s = _decode(raw, f, offset, lineno, opt, rec)
        if s is None:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            # (some messages end in "at": "Unterminated string starting at")
            rec.reject(BadInput("document", "malformed_json", f.path, lineno, offset,
                                f"{e.msg.removesuffix(' at')} at column {e.colno}"))
            continue
        if not isinstance(obj, dict):
            rec.reject(BadInput("document", "malformed_json", f.path, lineno, offset,
                                f"a JSON {type(obj).__name__}, not an object"))
            continue
        value = obj
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            keys = ", ".join(list(obj)[:8])
            rec.reject(BadInput("document", "missing_field", f.path, lineno, offset,
                                f"no field {opt.text_field!r}; keys: {keys}"))
            continue
        if not isinstance(value, str):
            rec.reject(BadInput("document", "bad_field_type", f.path, lineno, offset,
                                f"{opt.text_field!r} is a {type(value).__name__}"))
            continue
        if b"\\u" in raw:  # only a \uXXXX escape can give a lone surrogate (not valid Unicode text)
            m = _SURROGATE.search(value)
            if m:
                if opt.invalid_utf8 == "reject":
                    rec.reject(BadInput("document", "invalid_utf8", f.path, lineno, offset,
                                        f"lone surrogate escape \\u{ord(m.group()):04x} at character "
                                        f"{m.start()} of {opt.text_field!r}"))
                    continue
                if rec.utf8_replaced == replaced:  # a document is counted once
                    rec.utf8_replaced += 1
                value = _SURROGATE.sub("\ufffd", value)
        yield from _whole(value, offset, f, lineno, opt, rec)


def _whole(text: str, key: int, f: InputFile, line: Optional[int], opt: ReadOptions,
           rec: Recorder) -> Iterator[Piece]:
    """A document that is in memory already: checked, then cut if it is very large."""
    if not text.strip():
        rec.reject(BadInput("document", "empty", f.path, line, key))
        return
    if "\x00" in text:
        rec.reject(BadInput("document", "binary", f.path, line, key, "NUL character in the text"))
        return
    if len(text) <= opt.chunk_chars:
        yield Piece(text, True, True, key)
        return
    doc = _Streamed(key, opt)
    yield from doc.feed(text)
    yield from doc.close()


def _text_lines(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    f = unit.file
    lineno = 0 if unit.first else None
    doc: Optional[_Streamed] = None
    dec = None
    for offset, raw, first, last in _lines(unit, opt.chunk_chars):
        if first:
            if lineno is not None:
                lineno += 1
            if last:  # the usual case: the line fits in one piece
                text = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
                if not text.strip():
                    rec.blank_lines += 1
                    continue
                rec.docs_read += 1
                s = _decode(text, f, offset, lineno, opt, rec)
                if s is not None:
                    yield from _whole(s, offset, f, lineno, opt, rec)
                continue
            rec.docs_read += 1
            doc = _Streamed(offset, opt)
            dec = codecs.getincrementaldecoder("utf-8")("replace")
        text = raw.rstrip(b"\r\n") if last and raw.endswith(b"\n") else raw
        s = dec.decode(text, final=last)
        if "\ufffd" in s and _has_bad_utf8(text):
            rec.utf8_replaced += 1  # a streamed document cannot be taken back: bad bytes are replaced
        yield from doc.feed(s)
        if last:
            yield from doc.close()
            doc = None


def _has_bad_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        return e.reason != "unexpected end of data"


def _text_paragraphs(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    """Documents separated by blank lines; the line breaks inside a paragraph are kept."""
    f = unit.file
    lineno = 0
    doc: Optional[_Streamed] = None  # set once a paragraph outgrows chunk_chars
    parts: list[str] = []
    size, start_off, start_line = 0, 0, 0
    skipping = False  # the current paragraph was rejected: skip to the next blank line

    def flush():
        nonlocal doc, parts, size
        text = "\n".join(parts)
        parts, size = [], 0
        if doc is None:
            yield from _whole(text, start_off, f, start_line, opt, rec)
        else:
            if text:
                yield from doc.feed("\n" + text)
            yield from doc.close()
            doc = None

    for offset, raw, first, last in _lines(unit, opt.max_line_bytes):
        lineno += first
        text = raw.rstrip(b"\r\n")
        if not text.strip():
            if parts or doc is not None:
                yield from flush()
            skipping = False
            continue
        if skipping:
            continue
        if not parts and doc is None:
            rec.docs_read += 1
            start_off, start_line = offset, lineno
        if doc is not None:  # part of a streamed paragraph: it cannot be taken back, so replace
            s = text.decode("utf-8", errors="replace")
            rec.utf8_replaced += "\ufffd" in s and _has_bad_utf8(text)
        else:
            s = _decode(text, f, offset, lineno, opt, rec)
            if s is None:
                parts, size, skipping = [], 0, True
                continue
        parts.append(s)
        size += len(s)
        if size > opt.chunk_chars:  # a huge paragraph: stream it
            joined = "\n".join(parts)
            if doc is None:
                doc = _Streamed(start_off, opt)
                yield from doc.feed(joined)
            else:
                yield from doc.feed("\n" + joined)
            parts, size = [], 0
    if parts or doc is not None:
        yield from flush()


def _text_file(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    """The whole file is one document, read in blocks."""
    f = unit.file
    rec.docs_read += 1
    if opt.invalid_utf8 == "reject":  # a streamed document cannot be taken back: check it first
        dec = codecs.getincrementaldecoder("utf-8")("strict")
        done = 0
        with open_binary(f) as fh:
            while True:
                block = fh.read(BLOCK)
                try:
                    dec.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    rec.reject(BadInput("document", "invalid_utf8", f.path, None, done + max(e.start, 0),
                                        "bad UTF-8 byte sequence"))
                    return
                if not block:
                    break
                done += len(block)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    doc = _Streamed(0, opt)
    replaced = False
    with open_binary(f) as fh:
        while True:
            block = fh.read(BLOCK)
            s = dec.decode(block, final=not block)
            if not replaced and "\ufffd" in s:
                replaced = True
            if s:
                yield from doc.feed(s)
            if not block:
                break
    if replaced:
        rec.utf8_replaced += 1
    if not doc.started:
        text = doc.take()
        if "\x00" in text:
            rec.reject(BadInput("document", "binary", f.path, None, 0, "NUL character in the text"))
            return
        if not text.strip():
            rec.reject(BadInput("document", "empty", f.path, None, 0))
            return
        yield Piece(text, True, True, 0)
        return
    yield from doc.close()


def _parquet(unit: Part, opt: ReadOptions, rec: Recorder) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = unit.file
    pf = pq.ParquetFile(f.path)
    field = opt.text_field
    schema = pf.schema_arrow
    if field not in schema.names:
        n = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start, unit.end or pf.num_row_groups))
        rec.docs_read += n
        rec.rejected["missing_field"] = rec.rejected.get("missing_field", 0) + n
        rec.reject(BadInput("file", "missing_field", f.path,
                            detail=f"no column {field!r} ({n} rows rejected); columns: "
                                   f"{', '.join(schema.names[:8])}"))
        return
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ)):
        n = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start, unit.end or pf.num_row_groups))
        rec.docs_read += n
        rec.rejected["bad_field_type"] = rec.rejected.get("bad_field_type", 0) + n
        rec.reject(BadInput("file", "bad_field_type", f.path, detail=f"column {field!r} is {typ} ({n} rows rejected)"))
        return
    groups = list(range(unit.start, unit.end if unit.end is not None else pf.num_row_groups))
    row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            rec.docs_read += 1
            if value is None:
                rec.reject(BadInput("document", "missing_field", f.path, row, None, f"{field!r} is null"))
                continue
            if isinstance(value, bytes):
                value = _decode(value, f, None, row, opt, rec)
                if value is None:
                    continue
            yield from _whole(value, row, f, row, opt, rec)


# ---------------------------------------------------------------------------------------------
# Cutting a huge document into pieces without changing its ids
# ---------------------------------------------------------------------------------------------

# sentencepiece (no dummy prefix) and byte-level BPE attach a space to the word after it, and no
# piece spans "x" + " y": cutting just before a space that follows a non-space character is exact.
_CUT_BEFORE = re.compile(r"(?<=\S) ")
# With a dummy prefix the tokenizer adds the space back at the start of each piece: cut at a single
# space between two words and drop it.
_CUT_AT = re.compile(r"(?<=\S) (?=\S)")


def _cut(buf: str, lo: int, hi: int, dummy_prefix: bool) -> tuple[str, str]:
    window = buf[lo:hi]
    rx = _CUT_AT if dummy_prefix else _CUT_BEFORE
    m = None
    for m in rx.finditer(window):
        pass
    if m is not None:
        i = lo + m.start()
        return (buf[:i], buf[i + 1:]) if dummy_prefix else (buf[:i], buf[i:])
    j = window.rfind("\n")
    if j >= 0:
        return buf[: lo + j + 1], buf[lo + j + 1:]
    return buf[:hi], buf[hi:]


class _Streamed:
    """A document fed in blocks, handed on in pieces of about `chunk_chars`."""

    def __init__(self, key: int, opt: ReadOptions):
        self.key, self.chunk, self.dummy = key, opt.chunk_chars, opt.dummy_prefix
        self.buf: list[str] = []
        self.n = 0
        self.started = False

    def take(self) -> str:
        s = "".join(self.buf)
        self.buf, self.n = [], 0
        return s

    def feed(self, s: str) -> Iterator[Piece]:
        self.buf.append(s)
        self.n += len(s)
        while self.n >= 2 * self.chunk:
            text = self.take()
            head, tail = _cut(text, self.chunk // 2, self.chunk, self.dummy)
            self.buf, self.n = [tail], len(tail)
            yield Piece(head, not self.started, False, self.key)
            self.started = True

    def close(self) -> Iterator[Piece]:
        text = self.take()
        if self.started or text:
            yield Piece(text, not self.started, True, self.key)
        self.started = False
