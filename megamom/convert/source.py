"""Reading a megamom checkpoint for conversion: the ONE place the converter touches checkpoint
directories. Weights come from `megamom.train.checkpoint.load_model_state_dict` (DeepSpeed ZeRO
0-3 layouts; tensor-, expert- and sequence-parallel layouts are to be added there and here only).

`--checkpoint` may name a checkpoint (…/checkpoints/step_XXXXXXXX), a run directory
(train.out_dir) or its checkpoints/ folder: the newest complete checkpoint is taken."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, model_config_from_dict
from .errors import ConvertError


@dataclasses.dataclass
class CheckpointSource:
    path: Path  # the step directory
    state: dict  # trainer_state.json
    model_config: ModelConfig

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def tokenizer_ref(self) -> dict:
        return dict(self.state.get("tokenizer") or {})

    def load_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights, checked against the model config (names and shapes)."""
        from ..train.checkpoint import load_model_state_dict
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports its progress on stdout
                sd = load_model_state_dict(self.path)
        except ConvertError:
            raise
        except Exception as e:  # a missing shard, a truncated file, ...: name the checkpoint
            raise ConvertError(f"cannot read the weights of checkpoint {str(self.path)!r}: "
                               f"{type(e).__name__}: {e}") from None
        check_state_dict(sd, self.model_config, f"checkpoint {str(self.path)!r}")
        return {k: v.detach().cpu() for k, v in sd.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Parameter names and shapes of the megamom model of a config (built on the meta device)."""
    from ..model import CausalLM
    with torch.device("meta"):
        model = CausalLM(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_state_dict(sd: dict, cfg: ModelConfig, what: str) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (config gives {want[k]})" for k in sorted(set(want) & set(sd))
             if tuple(sd[k].shape) != want[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{label}: " + ", ".join(items[:8]) + more)
    if problems:
        raise ConvertError(f"{what} does not match its model config: " + "; ".join(problems))


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a step, run or checkpoints/ directory (clear errors otherwise); what
    `megamom convert`, `generate` and `eval` take as --checkpoint."""
    from ..train.checkpoint import MARKER, STATE, run_checkpoints
    p = Path(path).expanduser()
    if not p.exists():
        raise ConvertError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise ConvertError(f"checkpoint {str(p)!r} is a file; pass the checkpoint directory "
                           f"(…/checkpoints/step_XXXXXXXX) or the run directory (train.out_dir)")
    if (p / STATE).is_file() or (p / MARKER).is_file():
        return p
    if (p / "config.json").is_file():
        raise ConvertError(f"{str(p)!r} is a Hugging Face model directory, not a megamom checkpoint; "
                           f"use `megamom convert from-hf --model {p}`")
    for root in (p / "checkpoints", p):
        found = run_checkpoints(root)[1]  # the run `latest` names, newest first (what a resume takes)
        if found:
            return found[0]
    partial = sorted(q.name for q in list(p.glob(".tmp-step_*")) + list((p / "checkpoints").glob(".tmp-step_*"))
                     + list(p.glob("step_*")) + list((p / "checkpoints").glob("step_*")))
    if partial:
        raise ConvertError(f"{str(p)!r} holds no complete checkpoint (only interrupted saves: "
                           f"{', '.join(partial[:4])}); resume training to write a complete one")
    raise ConvertError(f"{str(p)!r} is not a megamom checkpoint (no {MARKER} / {STATE}) nor a run directory with "
                       f"checkpoints/; pass a step_* directory (…/checkpoints/step_XXXXXXXX) or a train.out_dir")


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Resolve, check completeness and read the config (cheap: no weights are read yet)."""
    from ..train.checkpoint import CheckpointError, read_trainer_state
    step_dir = resolve_checkpoint(path)
    try:
        state = read_trainer_state(step_dir)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    model = (state.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise ConvertError(f"checkpoint {str(step_dir)!r}: trainer_state.json has no config.model section")
    try:
        cfg = model_config_from_dict(model)
    except ConfigError as e:
        raise ConvertError(f"checkpoint {str(step_dir)!r} holds an invalid model config: {e}") from None
    return CheckpointSource(step_dir, state, cfg)


def tokenizer_path(source: CheckpointSource, override: Optional[str]) -> Optional[Path]:
    """The tokenizer to export: --tokenizer, else the recorded path (absolute, relative to the
    current directory, or relative to the checkpoint / run directory)."""
    if override:
        return Path(override).expanduser()
    recorded = source.tokenizer_ref.get("path")
    if not recorded:
        return None
    p = Path(recorded).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (source.path, *source.path.parents[:3]):
        if (base / p).exists():
            return base / p
    return p
