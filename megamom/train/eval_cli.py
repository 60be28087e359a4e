"""`megamom eval --checkpoint DIR --data DIR [DIR ...] [KEY=VALUE ...]`: token-weighted loss and
perplexity (of the mixture, and of each dataset when there are several).
`megamom eval --checkpoint DIR --task mqar [--num-pairs 8 16 ...] [--seq-len 256]`: multi-query
associative recall accuracy (megamom.data.mqar), at the answer positions only."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys

import torch

from ..config import (IMPLEMENTATION_ONLY_KEYS, ConfigError, DataConfig, _apply, model_config_from_dict,
                      parse_overrides)

# What eval's dotted overrides may set: how the data is read, and how (not what) the model computes;
# the model itself and the training settings are the checkpoint's.
MODEL_KEYS = tuple(f"model.{k}" for k in IMPLEMENTATION_ONLY_KEYS)
TAKES = f"data.* (but not data.paths: pass --data) and {', '.join(MODEL_KEYS)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint (…/checkpoints/step_XXXXXXXX) or a run directory (train.out_dir: its newest "
                        "complete checkpoint)")
    p.add_argument("--task", choices=["lm", "mqar"], default="lm",
                   help="lm: loss and perplexity on --data; mqar: associative recall accuracy (no --data)")
    p.add_argument("--data", nargs="+", default=[], help="prepared dataset director(y/ies) (--task lm)")
    p.add_argument("--num-pairs", type=int, nargs="+", default=[4, 8, 16, 32], help="MQAR key-value pairs")
    p.add_argument("--seq-len", type=int, default=256, help="MQAR example length")
    p.add_argument("--examples", type=int, default=256, help="MQAR examples per number of pairs")
    p.add_argument("--seed", type=int, default=1234, help="MQAR examples' seed")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides: {TAKES}")


def check_overrides(overrides: list[str]) -> dict:
    """The overrides as a tree, or a ConfigError naming the ones eval does not take."""
    tree = parse_overrides(overrides)
    given = [f"{section}.{key}" for section, keys in tree.items()
             for key in (keys if isinstance(keys, dict) else [""])]
    bad = [k for k in given if not (k.startswith("data.") and k not in ("data.", "data.paths") or k in MODEL_KEYS)]
    if bad:
        raise ConfigError(f"megamom eval does not take {', '.join(bad)}: it takes {TAKES} (the model and the "
                          "training settings are the checkpoint's)")
    return tree


def evaluate_checkpoint(checkpoint: str, data: list[str], split: str = "val", batch_size: int = 8,
                        max_batches: int = 0, device: str = "auto", overrides: list[str] = ()) -> dict:
    from ..convert.source import resolve_checkpoint
    from ..data import build_loader
    from ..data.loader import datasets_without_split
    from ..model import build_model
    from .checkpoint import load_model_state_dict, read_trainer_state
    tree = check_overrides(list(overrides))
    checkpoint = resolve_checkpoint(checkpoint)  # a step or run directory, or a clear error
    state = read_trainer_state(checkpoint)  # clear error for incomplete checkpoints
    cfg_dict = state["config"]
    model_cfg = model_config_from_dict({**cfg_dict["model"], **tree.get("model", {})})
    # the data settings of the training run (seq_len, reset_at_doc_boundaries, ...), on the CLI's data;
    # checked, and the loader built, before the model is
    data_cfg = _data_config(state, data, tree.get("data"))
    _check_tokenizer(state, data)
    missing = datasets_without_split(data_cfg, split)
    if missing:
        alt = " or pass --split train" if split == "val" else ""
        raise ConfigError(f"dataset {', '.join(map(repr, missing))} has no {split!r} split; prepare it with one "
                          f"(`megamom prep ... --val-fraction 0.01`){alt}")
    def loader_of(cfg):
        return build_loader(cfg, split=split, micro_batch_size=batch_size, dp_rank=0, dp_size=1, seed=0,
                            shuffle=False)

    loaders = {"": loader_of(data_cfg)}
    if len(data) > 1:  # a mixture: each dataset on its own too
        loaders.update({d: loader_of(dataclasses.replace(data_cfg, paths=[d], weights=None)) for d in data})
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = build_model(model_cfg)
    model.load_state_dict(load_model_state_dict(checkpoint))
    model.to(dev).eval()
    keys = ("input_ids", "labels") + (("segment_ids",) if data_cfg.reset_at_doc_boundaries else ())
    results = {}
    for name, loader in loaders.items():
        total, count = _token_weighted_loss(model, loader, keys, max_batches, dev)
        if count == 0:
            raise ConfigError(f"no {split} tokens found in {name or data}")
        loss = total / count
        results[name] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}
    out = {**results.pop(""), "step": state["step"]}
    if results:
        out["datasets"] = results
    return out


@torch.no_grad()
def _token_weighted_loss(model, loader, keys, max_batches: int, dev) -> tuple[float, int]:
    """(sum of the token losses, tokens) over one pass of `loader` (at most `max_batches`)."""
    total, count = 0.0, 0
    limit = min(max_batches, len(loader)) if max_batches else len(loader)  # one pass at most
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        batch = {k: v.to(dev) for k, v in batch.items() if k in keys and v is not None}
        out = model(**batch, return_logits=False)
        n = int((batch["labels"] != -100).sum())
        total += out.lm_loss.double().item() * n
        count += n
    return total, count


def evaluate_mqar(checkpoint: str, num_pairs: list[int], seq_len: int, examples: int, seed: int,
                  batch_size: int = 64, device: str = "auto", overrides: list[str] = ()) -> dict:
    """MQAR accuracy of a checkpoint per number of pairs. The vocabulary is the model's."""
    from ..convert.source import resolve_checkpoint
    from ..data.mqar import check_mqar, mqar_accuracy, mqar_batch
    from ..model import build_model
    from .checkpoint import load_model_state_dict, read_trainer_state
    tree = check_overrides(list(overrides))
    if "data" in tree:
        raise ConfigError("megamom eval --task mqar reads no dataset: drop the data.* overrides")
    checkpoint = resolve_checkpoint(checkpoint)
    state = read_trainer_state(checkpoint)
    model_cfg = model_config_from_dict({**state["config"]["model"], **tree.get("model", {})})
    for n in num_pairs:  # before the model is built
        try:
            check_mqar(n, seq_len, model_cfg.vocab_size)
        except ValueError as e:
            raise ConfigError(f"--num-pairs / --seq-len: {e}") from None
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = build_model(model_cfg)
    model.load_state_dict(load_model_state_dict(checkpoint))
    model.to(dev).eval()
    accuracy = {str(n): mqar_accuracy(model, mqar_batch(examples, n, seq_len, model_cfg.vocab_size, seed),
                                      batch_size, dev) for n in num_pairs}
    return {"task": "mqar", "seq_len": seq_len, "examples": examples, "accuracy": accuracy, "step": state["step"]}


def _data_config(state: dict, data: list[str], overrides: dict | None = None) -> DataConfig:
    """The checkpoint's saved data config (as the trainer used it) with the paths replaced by `data`
    and the command line's data.* overrides on top; mixture weights are kept only when they still
    match the number of paths."""
    saved = dict((state.get("config") or {}).get("data") or {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in saved.items() if k in known})  # keys of older versions dropped
    if cfg.weights is not None and len(cfg.weights) != len(data):
        cfg.weights = None
    cfg.paths = list(data)
    if overrides:
        _apply(cfg, overrides, "data.", "command line")
    if not cfg.tokenizer:
        cfg.tokenizer = (state.get("tokenizer") or {}).get("path")
    cfg.validate()
    return cfg


def _check_tokenizer(state: dict, data: list[str]) -> None:
    """The data must have been tokenized with the checkpoint's tokenizer."""
    from pathlib import Path
    want = (state.get("tokenizer") or {}).get("hash")
    if not want:
        return
    for d in data:
        manifest = Path(d) / "manifest.json"
        if manifest.is_file():
            got = json.loads(manifest.read_text()).get("tokenizer", {}).get("hash")
            if got and got != want:
                raise ConfigError(f"dataset {d!r} was tokenized with tokenizer {got[:12]}…, but checkpoint "
                                  f"uses {want[:12]}…; prepare the data with the checkpoint's tokenizer")


def run(args) -> int:
    from ..convert.errors import ConvertError
    from .checkpoint import CheckpointError
    # --data takes one or more values, so argparse hands it the overrides that follow it too: a
    # dotted key (no "/" before the "=") is an override, not a dataset
    dotted = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*")
    data = [d for d in args.data if not dotted.fullmatch(d)]
    overrides = [d for d in args.data if dotted.fullmatch(d)] + list(args.overrides)
    if args.task == "mqar" and data:
        print("megamom eval: error: --task mqar generates its examples: drop --data", file=sys.stderr)
        return 2
    if args.task == "lm" and not data:
        print("megamom eval: error: --data needs a prepared dataset directory (`megamom prep ... --out DIR`)",
              file=sys.stderr)
        return 2
    try:
        if args.task == "mqar":
            result = evaluate_mqar(args.checkpoint, args.num_pairs, args.seq_len, args.examples, args.seed,
                                   args.batch_size, args.device, overrides)
        else:
            result = evaluate_checkpoint(args.checkpoint, data, args.split, args.batch_size, args.max_batches,
                                         args.device, overrides)
    except (ConvertError, CheckpointError) as e:
        print(f"megamom eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
