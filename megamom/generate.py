"""Autoregressive generation with the recurrent cache: prefill through the chunked path, then one
token at a time. Memory layers keep a constant-size state; attention layers a growing K/V cache."""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
    """input_ids: [B, T] prompt. Greedy when temperature == 0. Returns [B, T + new] (rows that hit
    eos keep emitting eos). use_cache=False runs the whole sequence again for every new token (a
    model whose memories are split over expert ranks keeps no decode state)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None: no top-k filter)")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, input_ids, max_new_tokens, temperature, top_k, eos_id, generator, use_cache)
    finally:
        model.train(was_training)  # also when generation fails


def _generate(model, input_ids, max_new_tokens, temperature, top_k, eos_id, generator, use_cache=True):
    out = model(input_ids, use_cache=use_cache, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = _sample(logits.float(), temperature, top_k, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens.append(nxt[:, None])
        if eos_id is not None and bool(done.all()):
            break
        if use_cache:
            out = model(nxt[:, None], cache=cache, logits_to_keep=1)
        else:
            out = model(torch.cat(tokens, 1), logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, 1)


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
