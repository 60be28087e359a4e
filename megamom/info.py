"""`megamom info`: parameters (total / activated) and FLOPs per token of a config."""
from __future__ import annotations

import argparse

import torch

from .config import load_config
from .model import build_model
from .model.counting import count_parameters, flops_per_token


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # no memory, no init cost: shapes are all we need
        model = build_model(cfg.model)
    pc = count_parameters(model)
    m = cfg.model
    print(f"arch: {m.arch}  rule: {m.update_rule if m.arch != 'transformer' else '-'}  "
          f"layers: {m.num_layers}  d: {m.hidden_size}  heads: {m.num_heads}x{m.head_dim}")
    if m.arch == "mom":
        print(f"memories: {m.num_memories} routed, top-{m.topk}, shared={m.shared_mem}")
    print(f"parameters: total {pc.total / 1e6:.1f}M  activated {pc.activated / 1e6:.1f}M  "
          f"embedding {pc.embedding / 1e6:.1f}M  per memory per layer {pc.per_memory / 1e6:.2f}M")
    T = cfg.data.seq_len
    print(f"FLOPs per token at T={T}: forward {flops_per_token(m, T, False) / 1e9:.3f} G, "
          f"training {flops_per_token(m, T, True) / 1e9:.3f} G")
    return 0
