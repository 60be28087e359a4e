"""One work unit, start to finish, in one process: read -> tokenize -> samples -> MDS shards.

The unit's shards are written to `.prep/tmp/<uid>/<split>/`, moved to `<split>/<uid>/`, and only
then is the unit's marker `.prep/units/<uid>.json` written (atomically): a unit without a marker
is redone from scratch on the next run, so a crash at any point never leaves a unit that looks
finished. A unit's output depends only on its input and the settings, never on timing or on the
number of workers, so an interrupted and resumed run writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import xxhash

from .errors import StrictStop
from .packing import columns, make_builder
from .readers import ReadOptions, Recorder, read_part

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # text handed to the tokenizer at once


@dataclass
class PrepSettings:
    """Everything that decides the output bytes (recorded in the manifest, part of its fingerprint)."""

    seq_len: int = 2048
    layout: str = "packed"  # concat (a) | packed (b)
    text_field: str = "text"
    txt_mode: str = "file"
    add_bos: bool = False
    add_eos: bool = True
    val_fraction: float = 0.0
    seed: int = 0
    invalid_utf8: str = "replace"
    pack_bins: int = 64
    unit_bytes: int = 64 << 20
    shard_bytes: int = 64 << 20
    compression: Optional[str] = "zstd"
    hashes: tuple = ("sha1", "xxh64")
    max_line_bytes: int = 256 << 20
    chunk_chars: int = 1 << 20

    def __post_init__(self):
        # The one place "none" becomes None: settings from the CLI, the API and replace() agree.
        if isinstance(self.compression, str) and self.compression.strip().lower() == "none":
            self.compression = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hashes"] = list(self.hashes)
        return d


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# Per-process state, set once by `init_worker` (the tokenizer is loaded once per process).
_TOK = None
_STOP = None  # a multiprocessing Event: set when the run stops (--strict), the units left are skipped


def init_worker(tokenizer, stop=None) -> None:
    global _TOK, _STOP
    _STOP = stop
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if isinstance(tokenizer, (str, Path)):
        from megamom.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer, num_threads=1)
    if hasattr(tokenizer, "num_threads"):
        tokenizer.num_threads = 1  # one process per core already
    _TOK = tokenizer


class _Splitter:
    """Train/val by document: a hash of (seed, file key, document key) against val_fraction, so the
    assignment does not depend on how files are cut into units or on the number of workers."""

    def __init__(self, seed: int, file_key: str, val_fraction: float):
        self.prefix = f"{seed}\0{file_key}\0".encode()
        self.cut = int(val_fraction * 2.0**64)

    def __call__(self, key: int) -> int:
        if self.cut == 0:
            return 0
        return int(xxhash.xxh64_intdigest(self.prefix + str(key).encode()) < self.cut)


def process_unit(job: tuple) -> dict:
    """Run one unit; returns its report (also written as its marker). `job` is
    (unit, settings, out_dir, strict)."""
    unit, st, out_dir, strict = job
    if _STOP is not None and _STOP.is_set():  # the run stopped: end quickly, write nothing
        return {"uid": unit.uid, "skipped": True}
    from megamom.data.streaming_compat import MDSWriter

    tok = _TOK
    out = Path(out_dir)
    tmp = out / ".prep" / "tmp" / unit.uid
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tok.vocab_size)
    cols = columns(st.layout, dtype)
    rec = Recorder(strict)
    writers: dict[int, MDSWriter] = {}

    def emitter(split: int):
        def emit(sample: dict) -> None:
            w = writers.get(split)
            if w is None:
                w = writers[split] = MDSWriter(out=str(tmp / SPLITS[split]), columns=cols,
                                               compression=st.compression, hashes=list(st.hashes),
                                               size_limit=st.shard_bytes, max_workers=1)
            w.write(sample)
        return emit

    builders = [make_builder(st.layout, st.seq_len, dtype, emitter(i), st.pack_bins) for i in (0, 1)]
    bos = [tok.bos_id] if st.add_bos else []
    eos = [tok.eos_id] if st.add_eos else []
    opt = ReadOptions(text_field=st.text_field, txt_mode=st.txt_mode, invalid_utf8=st.invalid_utf8,
                      max_line_bytes=st.max_line_bytes, chunk_chars=st.chunk_chars,
                      dummy_prefix=tok.dummy_prefix)
    batch, chars = [], 0
    current = 0  # split of the document being read

    def flush():
        nonlocal batch, chars
        # Texts are valid Unicode here: the readers reject or replace lone surrogates (JSON escapes).
        all_ids = tok.encode_batch([p.text for p, _ in batch])
        for (piece, split), ids in zip(batch, all_ids):
            if piece.start and bos:
                ids = bos + ids
            if piece.end and eos:
                ids.extend(eos)
            builders[split].add(ids, piece.start, piece.end)
        batch, chars = [], 0

    try:
        for part in unit.parts:  # documents of several files share the unit's batches and rows
            split_of = _Splitter(st.seed, part.file.key, st.val_fraction)
            for piece in read_part(part, opt, rec):
                if piece.start:
                    current = split_of(piece.key)
                batch.append((piece, current))
                chars += len(piece.text)
                if chars >= BATCH_CHARS:
                    flush()
        flush()
        for b in builders:
            b.finish()
        for w in writers.values():
            w.finish()
    except StrictStop:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    report = {
        "uid": unit.uid, "parts": [[p.file.path, p.start, p.end] for p in unit.parts],
        "documents_read": rec.docs_read, "utf8_replaced": rec.utf8_replaced, "blank_lines": rec.blank_lines,
        "rejected": dict(sorted(rec.rejected.items())), "files_rejected": dict(sorted(rec.files_rejected.items())),
        "splits": {SPLITS[i]: b.stats.to_dict() for i, b in enumerate(builders)},
        "bad": [b.to_dict() for b in rec.bad], "bad_total": rec.n_bad,
    }
    # Publish: shards first, the marker last (it is what says "this unit is done").
    for i, name in enumerate(SPLITS):
        final = out / name / unit.uid
        shutil.rmtree(final, ignore_errors=True)
        if i in writers:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, final)
    write_json_atomic(out / ".prep" / "units" / f"{unit.uid}.json", report)
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid: the tasks of a job array may write the same file from several machines at once
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
