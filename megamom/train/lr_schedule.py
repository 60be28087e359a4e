"""Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps.

A tiny scheduler object (not torch's LambdaLR) so it works on DeepSpeed's wrapped optimizers,
whose class is not a torch Optimizer, and checkpoints as plain numbers."""
from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    def __init__(self, optimizer, peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.optimizer = optimizer
        self.peak_lr, self.warmup_steps = peak_lr, warmup_steps
        self.max_steps, self.min_lr_ratio = max_steps, min_lr_ratio
        self.step_count = 0
        self._apply()

    def lr(self) -> float:
        return self.peak_lr * lr_factor(self.step_count, self.warmup_steps, self.max_steps, self.min_lr_ratio)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()

    def step(self, *args, **kwargs) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.lr() for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = int(sd["step_count"])
        self._apply()
