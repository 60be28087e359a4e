"""Metrics: tensorboard events and the same records as JSON lines (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device (datasheet, without sparsity), for MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    """On a resume at step S, records after S (written before a crash, replayed now) are dropped
    from metrics.jsonl and tensorboard, and a record of S already there is not written twice: the
    file holds each (kind, step) once, in order."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self._logged_at_resume: set[str] = set()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "metrics.jsonl"
            if resume_step and path.is_file():
                self._logged_at_resume = _truncate_after(path, resume_step)
            # purge_step drops events of steps after the resume point (a crash replays them).
            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"),
                                        purge_step=resume_step + 1 if resume_step else None)
            self.resume_step = resume_step
            self.jsonl = open(path, "a")

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        if step == self.resume_step and kind in self._logged_at_resume:
            return
        record = {"kind": kind, "step": step}
        for key, value in values.items():
            if value is None:
                continue
            v = float(value)
            record[key] = v if math.isfinite(v) else str(v)
            self.writer.add_scalar(f"{kind}/{key}", v, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _truncate_after(path: Path, step: int) -> set[str]:
    """Keep the records up to `step` (atomically); returns the kinds already logged at `step`."""
    kept, kinds_at_step = [], set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
            if rec.get("step") == step:
                kinds_at_step.add(rec.get("kind"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return kinds_at_step
