"""Bad input: the reasons a document or file is rejected, and how each message reads.

Every rejection is counted by reason in the manifest and listed (file, line, what, fix) in
`errors.jsonl`; with `--strict` the first one stops the run with the same message.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


class PrepError(RuntimeError):
    """Data preparation cannot go on; the message names the input and the fix."""


# Document-level reasons (the document is counted in documents.read and documents.rejected).
DOC_REASONS = {
    "invalid_utf8": "not valid UTF-8; pass --invalid-utf8 replace to keep it with U+FFFD in place of "
                    "the bad bytes, or re-encode the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "malformed_json": "not a JSON object; each line of a .jsonl file must be one JSON object: fix or "
                      "remove the line",
    "missing_field": "has no text field; pass --text-field NAME (dotted for nested fields: meta.text)",
    "bad_field_type": "text field is not a string; pass --text-field naming a string field",
    "empty": "document is empty or only whitespace (nothing to train on)",
    "binary": "document contains NUL bytes (binary data, not text); remove it from the inputs",
    "line_too_long": "line is longer than --max-line-bytes; raise the limit or split the record",
    "truncated": "the file could not be read past part of this document (a corrupt / truncated archive, or "
                 "a read error): the document is dropped; check the file",
}
# File-level reasons (the file yields no further documents; counted in files.rejected).
FILE_REASONS = {
    "binary": "file contains NUL bytes (binary, not text): remove it from the inputs or fix its extension",
    "unreadable": "file cannot be read (permissions, or a corrupt / truncated archive): check the file",
    "missing_field": "file has no such column; pass --text-field naming a string column",
    "bad_field_type": "column is not a string column; pass --text-field naming a string column",
}


@dataclass
class BadInput:
    level: str  # "document" | "file"
    reason: str
    path: str
    line: Optional[int] = None  # 1-based line (or row for parquet) where known
    offset: Optional[int] = None  # byte offset of the line in the (decompressed) file
    detail: str = ""

    def where(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.offset is not None:
            return f"{self.path} (byte {self.offset})"
        return self.path

    def message(self) -> str:
        fix = (DOC_REASONS if self.level == "document" else FILE_REASONS).get(self.reason, "")
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.where()}: {self.level} rejected [{self.reason}]{detail}: {fix}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["message"] = self.message()
        return d


class StrictStop(PrepError):
    """--strict: the first bad input ends the run."""

    def __init__(self, bad: BadInput):
        self.bad = bad
        super().__init__(bad.message() + " (stopped by --strict; without it bad input is skipped and "
                                          "counted)")

    def __reduce__(self):  # travels from worker processes as the BadInput, not the message
        return (StrictStop, (self.bad,))
