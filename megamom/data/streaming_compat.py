"""The one place that imports mosaicml-streaming.

`import streaming` imports `streaming.vision`, which imports torchvision; on a CPU torch that either
fails (`operator torchvision::nms does not exist`) or drags in a CUDA build. We never use the vision
datasets, so an empty `streaming.vision` module is registered before the import. Everything else in
megamom imports streaming symbols from here.

Also here: the workarounds for streaming's process-global state (shared memory names in /dev/shm
and lock files in the temp dir, both keyed by a small integer "prefix").
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import types

if "streaming.vision" not in sys.modules:
    _stub = types.ModuleType("streaming.vision")
    _stub.__path__ = []  # a package with nothing in it: `import streaming.vision.x` fails cleanly
    sys.modules["streaming.vision"] = _stub

import streaming  # noqa: E402
from streaming import MDSWriter, Stream, StreamingDataset  # noqa: E402
from streaming.base.storage.download import CloudDownloader  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

__all__ = ["MDSWriter", "Stream", "StreamingDataset", "clean_stale_shared_memory",
           "clean_stale_filelocks", "download_file", "streaming_version"]

streaming_version = getattr(streaming, "__version__", "unknown")



def download_file(remote: str, local: str, timeout: float = 60.0) -> None:
    """Copy one file from a remote (s3://, gs://, ..., or a plain path) to a local path."""
    CloudDownloader.direct_download(remote, local, timeout)


_FILELOCK = re.compile(r"^(\d{6})_(barrier|cache)_filelock$")


def clean_stale_filelocks() -> int:
    """Remove streaming lock files of jobs that are gone; returns how many were removed.

    StreamingDataset takes the first free prefix P and creates `/dev/shm/P_locals` plus lock files
    `$TMPDIR/P_barrier_filelock`, `P_cache_filelock`. At exit it unlinks the shared memory but never
    the lock files, and a prefix whose lock file exists is skipped forever: every run on a machine
    then takes a higher prefix and scans all earlier ones. A lock file whose `P_locals` shared memory
    is gone belongs to no live dataset (the shared memory is created first and removed last), so it
    is safe to remove. Linux only (elsewhere shared memory is not visible as files): a no-op there.
    """
    if not os.path.isdir("/dev/shm"):
        return 0
    root = tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        m = _FILELOCK.match(name)
        if not m or os.path.exists(f"/dev/shm/{m.group(1)}_locals"):
            continue
        try:
            os.unlink(os.path.join(root, name))
            removed += 1
        except OSError:  # another process removed it first, or it is not ours to remove
            pass
    return removed
