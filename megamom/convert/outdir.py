"""Output directories written all-or-nothing: into a temporary sibling, renamed into place at the
end; any failure removes the temporary directory, so a half-written output never exists."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConvertError


def check_out(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Fail early (before any expensive work) on an output that would clobber something."""
    out = Path(out).expanduser()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise ConvertError(f"--out {str(out)!r} overlaps the input {str(src)!r}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {str(out)!r} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def staged(out: Path):
    """Yields a temporary directory next to `out`; on success it replaces `out` atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
