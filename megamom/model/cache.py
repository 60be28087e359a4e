"""Inference caches. Memory layers keep a constant-size state (one [K, V] matrix per memory and
head, plus the last conv_size-1 conv inputs per memory); attention layers keep growing K/V."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class MemoryLayerCache:
    state: torch.Tensor  # [M, B, H, K, V] float32 (memory-major, as the packed segments)
    conv: Optional[dict] = None  # {"q", "k", "v"}: [M, B, W-1, C]
    # decode steps write the new state and conv tails into these tensors (a CUDA graph's static
    # buffers: megamom.generate.GraphedDecodeStep) instead of returning new ones
    update_in_place: bool = False


@dataclass
class AttentionLayerCache:
    k: torch.Tensor  # [B, H_kv, L, D]
    v: torch.Tensor


@dataclass
class ModelCache:
    layers: list = field(default_factory=list)
    seen_tokens: int = 0

    def nbytes(self) -> int:
        total = 0
        for c in self.layers:
            tensors = [c.state, *(c.conv or {}).values()] if isinstance(c, MemoryLayerCache) else [c.k, c.v]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def concat_rows(caches: list, seen_tokens: int) -> ModelCache:
    """Memory-model caches of separately prefilled rows -> one batch, their rows in order."""
    if len(caches) == 1:
        return ModelCache(caches[0].layers, seen_tokens)
    layers = []
    for parts in zip(*(c.layers for c in caches)):
        conv = None if parts[0].conv is None else {k: torch.cat([p.conv[k] for p in parts], 1) for k in parts[0].conv}
        layers.append(MemoryLayerCache(torch.cat([p.state for p in parts], 1), conv))
    return ModelCache(layers, seen_tokens)
