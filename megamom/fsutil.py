"""Output directories and sizes: all-or-nothing directory outputs (write into a temporary sibling,
rename into place at the end), the early check of an --out, and parsing sizes like 64MiB."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing an existing `dst` (only ever a
    complete older copy) with two renames, so `dst` is never half-written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # put the previous copy back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yields a temporary directory next to `out`; on success it replaces `out`; on any failure it
    is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: str | Path, overwrite: bool = False, inputs: tuple = (), *, error: type = ValueError,
              require_empty: bool = True) -> Path:
    """Fail early (before any expensive work) on an output directory that would clobber something:
    one that overlaps an input, an existing regular file, or (with `require_empty`, unless
    `overwrite`) a non-empty directory. Raises `error(message)`; returns the path."""
    out = Path(out).expanduser()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise error(f"--out {str(out)!r} overlaps the input {str(src)!r}; choose another directory")
    if out.exists() and not out.is_dir():
        raise error(f"--out {str(out)!r} exists and is a file, not a directory; choose another --out")
    if require_empty and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it, or choose "
                    "another --out")
    return out


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KI": 2**10, "KIB": 2**10, "MI": 2**20, "MIB": 2**20,
               "GI": 2**30, "GIB": 2**30, "TI": 2**40, "TIB": 2**40}


def parse_size(text: str | int, *, error: type = ValueError, what: str = "size") -> int:
    """'5GB' (10^9, as transformers), '500MiB' (2^20), '64k', '1000000' -> bytes (> 0); units are
    case-insensitive. A bad value raises `error(message)` naming it (`what` says what it is)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise error(f"{what} {text!r} is not a size like 5GB, 500MB, 64MiB or 1048576")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise error(f"{what} {text!r} must be > 0")
    return size
