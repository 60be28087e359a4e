"""Output directories written all-or-nothing: into a temporary sibling, renamed into place at the
end; any failure removes the temporary directory, so a half-written output never exists."""
from __future__ import annotations

from pathlib import Path

from .. import fsutil
from ..fsutil import staged_dir as staged  # noqa: F401  (the converters' all-or-nothing output)
from .errors import ConvertError


def check_out(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Fail early (before any expensive work) on an output that would clobber something."""
    return fsutil.check_out(out, overwrite, inputs, error=ConvertError)
