"""Output directories and sizes: all-or-nothing directory outputs (write into a temporary sibling,
rename into place at the end, with the modes the umask gives), the early check of an --out, and
parsing sizes like 64MiB."""
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


def umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give a finished output tree the modes a plain mkdir / open would have given it (0o777 / 0o666,
    less the umask): mkdtemp makes 0700 directories and safetensors writes 0600 files, which the
    other users of a shared filesystem could not read."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o100 else 0o666  # executables stay so
        os.chmod(path, full & ~mask)


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yields a temporary directory next to `out`; on success it replaces `out` (with the modes the
    umask gives); on any failure it is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_modes(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: str | Path, overwrite: bool = False, inputs: tuple = (), *, error: type = ValueError,
              require_empty: bool = True, staged: bool = True) -> Path:
    """Fail early (before any expensive work) on an output directory that would clobber something:
    one that overlaps an input, an existing regular file, or (with `require_empty`, unless
    `overwrite`) a non-empty directory; or one that cannot be written (`staged`: the output is
    written next to it and renamed into place, so its parent must be writable; else the output
    itself). Raises `error(message)`; returns the path."""
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
    check_writable(out.parent if staged else out, f"--out {str(out)!r}", error)
    return out


def check_writable(path: Path, name: str, error: type = ValueError) -> None:
    """Raise `error` naming `name` (how the user gave the path) when `path`, or the nearest existing
    directory above it, cannot be written. A directory made and removed there shows what the OS says
    (permission denied, read-only filesystem, a file in the path) now rather than after the work, and
    leaves nothing behind."""
    base = Path(path)
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megamom-probe-", dir=base))
    except OSError as e:
        raise error(f"{name} is not writable ({e.strerror}: {str(base)!r}); choose another directory") from None


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
