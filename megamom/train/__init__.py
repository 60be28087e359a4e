"""Training engine on DeepSpeed ZeRO: `Trainer(cfg).fit()`; CLI in megamom.train.cli."""
from .trainer import Trainer, TrainingError, resolve_batching

__all__ = ["Trainer", "TrainingError", "resolve_batching"]
