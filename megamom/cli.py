"""`megamom` console script. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used, so
`megamom --help` stays fast and a broken optional dependency only affects its own command.

Config overrides are positional `dotted.key=value` pairs after the options, on every command
that takes a config (e.g. `megamom train --config configs/tiny.yaml model.num_memories=8`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import ConfigError

COMMANDS = {
    "train": ("megamom.train.cli", "train a model (default: the tiny MoM on the shipped corpus)"),
    "eval": ("megamom.train.eval_cli", "loss and perplexity of a checkpoint on a prepared dataset"),
    "tokenizer": ("megamom.tokenizer.cli", "train, apply or export a sentencepiece tokenizer"),
    "prep": ("megamom.data_prep.cli", "tokenize raw text into streaming (MDS) shards"),
    "prep-mqar": ("megamom.data_prep.mqar", "write associative-recall (MQAR) examples as a training dataset"),
    "convert": ("megamom.convert.cli", "convert checkpoints to and from Hugging Face format"),
    "generate": ("megamom.generate_cli", "generate text from a checkpoint or Hugging Face export"),
    "info": ("megamom.info", "parameters (total / activated) and FLOPs per token of a config"),
    "plan": ("megamom.parallel.planner", "per-GPU memory and communication of the layouts for a config on N GPUs"),
    "launch": ("megamom.launchers.cli", "megamom train under torchrun on this node, keeping the trainer's exit codes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamom", description=__doc__.split("\n")[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"megamom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK (which it
    also sets) is what we use."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    # Parse only the command name first, then let the command's module add its own options.
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv)
        if not argv:
            parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.parse_args(argv)  # argparse prints the "invalid choice" error and exits 2
        return 2
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("megamom"):
            print(f"megamom {name}: not available in this build ({e.name} is missing)", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"megamom {name}", description=help_text)
    module.add_arguments(sub)
    try:  # options and dotted overrides in any order
        if hasattr(module, "parse_args"):  # a command that hands unknown arguments on (launch)
            args = module.parse_args(sub, argv[1:])
        else:
            args = sub.parse_intermixed_args(argv[1:])
    except TypeError:  # argparse cannot intermix with sub-parsers / REMAINDER: plain parsing then
        args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"megamom {name}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
