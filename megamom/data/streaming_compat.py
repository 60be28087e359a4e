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

try:
    import streaming  # noqa: E402
except ImportError as e:
    raise ImportError(f"mosaicml-streaming is needed for prepared datasets and is not importable ({e}); install "
                      "it without its declared dependencies (torchvision, cloud SDKs): pip install --no-deps "
                      "mosaicml-streaming==0.13.0") from None
from streaming import MDSWriter, Stream, StreamingDataset  # noqa: E402
from streaming.base.storage.download import CloudDownloader  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

__all__ = ["MDSWriter", "Stream", "StreamingDataset", "clean_stale_shared_memory",
           "clean_stale_filelocks", "download_file", "streaming_version"]

streaming_version = getattr(streaming, "__version__", "unknown")


def _agreed_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
    """streaming's `get_shm_prefix` with one change: the ranks agree on the prefix (all-reduce MAX)
    before the local leader registers it. Upstream every rank picks "the first free prefix" on its
    own, so a lock file or shared memory segment that appears or disappears between two ranks'
    scans (another job, a dataset being torn down, stale lock files being cleaned) made them pick
    different prefixes and fail with "prefix=N was not registered by local leader"."""
    import torch
    import torch.distributed as dist
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as P

    P._check_self(streams_local)
    prefix_int = max(P._check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                     for name in SHM_TO_CLEAN)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        agreed = torch.tensor([prefix_int], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        prefix_int = int(agreed.item())
    if world.is_local_leader:
        data = P._pack_locals(streams_local, prefix_int)
        shm = SharedMemory(P._get_path(prefix_int, LOCALS), True, len(data))
        shm.buf[:len(data)] = data
    if distributed:
        dist.barrier()
    if not world.is_local_leader:
        try:
            shm = SharedMemory(P._get_path(prefix_int, LOCALS), False)
        except FileNotFoundError:
            raise RuntimeError(f"streaming shared memory prefix={prefix_int} was not registered by the local "
                               "leader; are all ranks of this node building the same datasets?") from None
        their_locals, their_prefix = P._unpack_locals(bytes(shm.buf))
        if streams_local != their_locals or prefix_int != their_prefix:
            raise RuntimeError(f"streaming shared memory mismatch: leader has {their_locals} at {their_prefix}, "
                               f"this rank expects {streams_local} at {prefix_int}")
    return prefix_int, shm


if streaming_version == "0.13.0":  # the function replaced above is 0.13.0's; other versions keep theirs
    import streaming.base.dataset as _dataset
    import streaming.base.shared.prefix as _prefix
    _prefix.get_shm_prefix = _agreed_shm_prefix
    _dataset.get_shm_prefix = _agreed_shm_prefix



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
