"""A run directory (train.out_dir) belongs to one run at a time: a new run in a used directory
first moves the previous run's records into archive/ (nothing is deleted), so a later resume can
never continue the old run and metrics.jsonl never mixes two runs."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt

RECORDS = ("checkpoints", "metrics.jsonl", "tb", "config.yaml")


def check_writable(out_dir: Path) -> None:
    """Fail before any work when the run directory cannot be written (every rank checks: nodes
    may mount it differently); nothing is created."""
    from ..config import ConfigError
    from ..fsutil import check_writable as probe
    probe(out_dir, f"train.out_dir={str(out_dir)!r}", ConfigError)


def previous_run_id(out_dir: Path) -> Optional[str]:
    return ckpt.run_checkpoints(out_dir / "checkpoints")[0]


def archive_previous_run(out_dir: Path) -> Optional[Path]:
    """Move the records of an earlier run out of the way; returns where they went (None: unused)."""
    present = [out_dir / name for name in RECORDS if (out_dir / name).exists()]
    if not any(p.name != "config.yaml" for p in present):
        return None
    name = previous_run_id(out_dir) or time.strftime("%Y%m%d-%H%M%S", time.localtime(present[0].stat().st_mtime))
    dest = out_dir / "archive" / name
    n = 1
    while dest.exists():
        n += 1
        dest = out_dir / "archive" / f"{name}.{n}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    return dest
