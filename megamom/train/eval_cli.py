"""`megamom eval --checkpoint DIR --data DIR`: token-weighted loss and perplexity."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from ..config import ConfigError, DataConfig, model_config_from_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    p.add_argument("--data", required=True, nargs="+", help="prepared dataset director(y/ies)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def evaluate_checkpoint(checkpoint: str, data: list[str], split: str = "val", batch_size: int = 8,
                        max_batches: int = 0, device: str = "auto") -> dict:
    from ..data import build_loader
    from ..model import build_model
    from .checkpoint import load_model_state_dict, read_trainer_state
    state = read_trainer_state(checkpoint)  # clear error for missing / incomplete checkpoints
    cfg_dict = state["config"]
    model_cfg = model_config_from_dict(cfg_dict["model"])
    # the data settings of the training run (seq_len, reset_at_doc_boundaries, ...), on the CLI's data;
    # checked, and the loader built, before the model is
    data_cfg = _data_config(state, data)
    _check_tokenizer(state, data)
    loader = build_loader(data_cfg, split=split, micro_batch_size=batch_size, dp_rank=0, dp_size=1,
                          seed=0, shuffle=False)
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = build_model(model_cfg)
    model.load_state_dict(load_model_state_dict(checkpoint))
    model.to(dev).eval()
    keys = ("input_ids", "labels") + (("segment_ids",) if data_cfg.reset_at_doc_boundaries else ())
    total, count = 0.0, 0
    with torch.no_grad():
        limit = min(max_batches, len(loader)) if max_batches else len(loader)  # one pass at most
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            batch = {k: v.to(dev) for k, v in batch.items() if k in keys and v is not None}
            out = model(**batch, return_logits=False)
            n = int((batch["labels"] != -100).sum())
            total += out.lm_loss.double().item() * n
            count += n
    if count == 0:
        raise ConfigError(f"no {split} tokens found in {data}")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count, "step": state["step"]}


def _data_config(state: dict, data: list[str]) -> DataConfig:
    """The checkpoint's saved data config (as the trainer used it) with the paths replaced by `data`;
    mixture weights are kept only when they still match the number of paths."""
    saved = dict((state.get("config") or {}).get("data") or {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in saved.items() if k in known})  # keys of older versions dropped
    if cfg.weights is not None and len(cfg.weights) != len(data):
        cfg.weights = None
    cfg.paths = list(data)
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
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.max_batches,
                                 args.device)
    print(json.dumps(result))
    return 0
