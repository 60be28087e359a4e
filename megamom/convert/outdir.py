"""Output directories written all-or-nothing: into a temporary sibling, renamed into place at the
end; any failure removes the temporary directory, so a half-written output never exists."""
from __future__ import annotations

from pathlib import Path

from ..fsutil import staged_dir as staged  # noqa: F401  (the converters' all-or-nothing output)
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
