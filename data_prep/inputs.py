"""Finding input files (files, directories, globs) and cutting them into work units."""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import PrepError

TEXT_EXTS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
SUPPORTED = ".txt, .jsonl, .ndjson, .parquet (text and JSON lines also as .gz / .zst)"
BLOCK = 1 << 20  # read size of an input file
SNIFF = 8192  # bytes read to tell a binary file


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    key: str  # stable name relative to the input spec (decides the train/val split of its documents)
    format: str  # text | jsonl | parquet
    compression: Optional[str]  # None | gzip | zstd
    size: int
    mtime_ns: int

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Part:
    """A piece of one file: the whole file, a byte range of an uncompressed line-oriented file, or
    a range of parquet row groups."""

    file: InputFile
    start: int = 0  # byte offset (line files) or first row group (parquet)
    end: Optional[int] = None  # exclusive; None = to the end
    first: bool = True  # first part of its file
    binary: bool = False  # the file looked binary when planned: its one part only reports that
    size: int = 0  # bytes it holds (uncompressed for parquet, on disk otherwise): what grouping weighs


@dataclass(frozen=True)
class Unit:
    """A piece of work for one process: consecutive parts of about `unit_bytes` (many small files
    make one unit, a big file several). Its output goes to `<split>/<uid>/`."""

    uid: str
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


def open_binary(f: InputFile):
    raw = open(f.path, "rb", buffering=BLOCK)
    if f.compression == "gzip":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), BLOCK)
    if f.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_size=BLOCK,
                                                                            closefd=True), BLOCK)
    return raw


def classify(path: str) -> Optional[tuple[str, Optional[str]]]:
    name = path.lower()
    comp = None
    for ext, c in COMPRESSIONS.items():
        if name.endswith(ext):
            comp, name = c, name[: -len(ext)]
            break
    fmt = TEXT_EXTS.get(os.path.splitext(name)[1])
    if fmt is None or (fmt == "parquet" and comp):
        return None
    return fmt, comp


def _input(path: str, key: str) -> tuple[InputFile, tuple[int, int]]:
    """The input file, and its identity (device, inode): one file reached by two paths is read once."""
    fmt, comp = classify(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise PrepError(f"input {path!r}: cannot stat ({e.strerror})") from None
    return InputFile(os.path.abspath(path), key, fmt, comp, st.st_size, st.st_mtime_ns), (st.st_dev, st.st_ino)


def _walk(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def discover(specs: list[str]) -> tuple[list[InputFile], list[str]]:
    """Expand files, directories (recursively; hidden entries skipped) and globs into input files,
    sorted and without duplicates. Returns (inputs, skipped): files found in directories or globs
    whose type is not supported are skipped and listed; an explicitly named one is an error."""
    if not specs:
        raise PrepError("no inputs given: pass files, directories or globs of " + SUPPORTED)
    inputs: dict[tuple[int, int], InputFile] = {}
    skipped: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(spec)
        if glob.has_magic(spec):
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise PrepError(f"input glob {spec!r} matches no file")
            base = _glob_base(spec)
            candidates = [(m, os.path.relpath(m, base)) for m in matches]
        elif os.path.isdir(spec):
            files = _walk(spec)
            candidates = [(f, os.path.relpath(f, spec)) for f in files]
            if not files:
                raise PrepError(f"input directory {spec!r} holds no files")
        elif os.path.isfile(spec):
            if classify(spec) is None:
                raise PrepError(f"input {spec!r}: unsupported file type; supported: {SUPPORTED}")
            candidates = [(spec, os.path.basename(spec))]
        else:
            raise PrepError(f"input {spec!r} does not exist (pass files, directories or globs)")
        for path, key in candidates:
            if classify(path) is None:
                skipped.append(path)
                continue
            f, ident = _input(path, key.replace(os.sep, "/"))
            inputs.setdefault(ident, f)
    if not inputs:
        raise PrepError(f"no input files of a supported type ({SUPPORTED}) among {specs}; "
                        f"skipped: {skipped[:5]}")
    return sorted(inputs.values(), key=lambda f: (f.key, f.path)), skipped


def _glob_base(spec: str) -> str:
    parts = Path(spec).parts
    base = []
    for p in parts:
        if glob.has_magic(p):
            break
        base.append(p)
    return str(Path(*base)) if base else "."


def splittable(f: InputFile, txt_mode: str) -> bool:
    """Byte ranges can be processed independently only in uncompressed one-document-per-line files."""
    return f.compression is None and (f.format == "jsonl" or (f.format == "text" and txt_mode == "line"))


def plan_units(files: list[InputFile], txt_mode: str, unit_bytes: int) -> list[Unit]:
    """Work units of the files: their parts, in order, grouped into units of about `unit_bytes`, so
    that a unit (and its shards) is large whatever the file layout. The plan depends only on the
    files and the settings, never on the number of workers or tasks. Text files are sniffed for
    binary content here, once per file: a binary (or unopenable) file is one part, so it is
    reported and counted once."""
    units: list[Unit] = []
    group: list[tuple[str, Part]] = []
    size = 0

    def close():
        nonlocal group, size
        if group:
            units.append(Unit(group[0][0], tuple(p for _, p in group)))
        group, size = [], 0

    for i, part_id, part in _parts(files, txt_mode, unit_bytes):
        if group and size + part.size > unit_bytes:
            close()
        group.append((f"{i:05d}-{part_id:04d}", part))
        size += part.size
        if size >= unit_bytes:
            close()
    close()
    return units


def _parts(files: list[InputFile], txt_mode: str, unit_bytes: int):
    for i, f in enumerate(files):
        if f.format == "parquet":
            for j, (s, e, n) in enumerate(_parquet_ranges(f, unit_bytes)):
                yield i, j, Part(f, s, e, j == 0, size=n)
            continue
        try:
            binary = _sniff_binary(f)
        except (OSError, EOFError, ValueError):  # unreadable: one part, whose worker reports it
            yield i, 0, Part(f, size=f.size)
            continue
        if not binary and splittable(f, txt_mode) and f.size > unit_bytes:
            for j, s in enumerate(range(0, f.size, unit_bytes)):
                e = min(s + unit_bytes, f.size)
                yield i, j, Part(f, s, e, j == 0, size=e - s)
        else:  # a compressed file weighs its size on disk: an estimate, it cannot be cut anyway
            yield i, 0, Part(f, binary=binary, size=f.size)


def _sniff_binary(f: InputFile) -> bool:
    if f.compression is None:  # unbuffered: a buffered read would fetch a whole block of every file
        with open(f.path, "rb", buffering=0) as fh:
            return b"\x00" in fh.read(SNIFF)
    with open_binary(f) as fh:
        return b"\x00" in fh.read(SNIFF)


def _parquet_ranges(f: InputFile, unit_bytes: int) -> list[tuple[int, Optional[int], int]]:
    """Runs of row groups of about `unit_bytes` (uncompressed), with their size. An unreadable file
    is one range, whose worker then reports the problem."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(f.path).metadata
    except Exception:
        return [(0, None, f.size)]
    ranges, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= unit_bytes:
            ranges.append((start, g + 1, size))
            start, size = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups, size))
    return ranges
