"""Autoregressive generation with the recurrent cache: prefill through the chunked path, then one
token at a time. Memory layers keep a constant-size state; attention layers a growing K/V cache.

`generate` continues a batch of equal-length prompts; `generate_batch` takes prompts of any
lengths: a memory model prefills them packed into rows (the documents of a row, `cu_seqlens` in
the scan: no padding), its cache holding one row per prompt, and decodes them together, each
stopping at its EOS, on CUDA through one CUDA graph per step (`GraphedDecodeStep`); a model with
attention layers runs each prompt alone."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .model.cache import MemoryLayerCache, ModelCache, concat_rows
from .model.layers import held_inference_weights, inference_weights


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True, top_p: float = 1.0) -> torch.Tensor:
    """input_ids: [B, T] prompt. Greedy when temperature == 0. Returns [B, T + new] (rows that hit
    eos keep emitting eos). use_cache=False runs the whole sequence again for every new token (a
    model whose memories are split over expert ranks keeps no decode state)."""
    _check(max_new_tokens, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        with inference_weights(model):  # (the weights stacked for decoding, once)
            return _generate(model, input_ids, max_new_tokens, temperature, top_k, eos_id, generator, use_cache,
                             top_p)
    finally:
        model.train(was_training)  # also when generation fails


def _check(max_new_tokens: int, top_k: Optional[int], top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None: no top-k filter)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus filter)")


def _generate(model, input_ids, max_new_tokens, temperature, top_k, eos_id, generator, use_cache=True, top_p=1.0):
    out = model(input_ids, use_cache=use_cache, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = _next_tokens(logits, done, temperature, top_k, generator, top_p, eos_id)
        tokens.append(nxt[:, None])
        if eos_id is not None and bool(done.all()):
            break
        if use_cache:
            out = model(nxt[:, None], cache=cache, logits_to_keep=1)
        else:
            out = model(torch.cat(tokens, 1), logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, 1)


class GraphedDecodeStep:
    """A memory model's decode step for a batch, replayed from one CUDA graph: the tokens and every
    layer's memory states and conv tails live in static buffers that the graph reads and updates in
    place, so a step is one replay instead of a few hundred kernel launches from Python. Built from
    a prefill's cache (its rows are the batch); step(tokens [P]) -> the next logits [P, V] (a view of
    the graph's output buffer, overwritten by the next step). It takes the cache's tensors over
    (they are updated in place). The graph reads the weights as they were at capture (it keeps the
    stacked copies it reads alive): build a new one after training changes them."""

    def __init__(self, model, cache):
        if model.config.arch == "transformer":
            raise ValueError("a CUDA-graphed decode step needs a memory model (an attention cache grows)")
        self.model = model
        self.cache = _updated_in_place(cache, clone=False)
        first = self.cache.layers[0].state
        self.tokens = torch.zeros(first.shape[1], 1, dtype=torch.long, device=first.device)
        with inference_weights(model):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (kernel compilation, autotuning) on copies of the state
                for _ in range(2):
                    model(self.tokens, cache=_updated_in_place(self.cache, clone=True), logits_to_keep=1)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                out = model(self.tokens, cache=self.cache, logits_to_keep=1)
            self._weights = held_inference_weights(model)  # (the graph reads them after the context drops them)
        assert all(new.state is mine.state for new, mine in zip(out.cache.layers, self.cache.layers))
        self.logits = out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits


def _updated_in_place(cache, clone: bool):
    """A memory model's cache on the same contiguous tensors (clone: on copies) whose decode steps
    update it in place."""
    def own(t):
        return t.clone(memory_format=torch.contiguous_format) if clone else t.contiguous()
    return ModelCache([MemoryLayerCache(own(layer.state), None if layer.conv is None else
                                        {n: own(t) for n, t in layer.conv.items()}, True)
                       for layer in cache.layers], cache.seen_tokens)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: Optional[int] = None, top_p: float = 1.0, eos_id: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, check_every: int = 8,
                   on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
                   cuda_graph: Optional[bool] = None, prefill_tokens: int = 65536) -> list[list[int]]:
    """Each prompt's new tokens (ending with its EOS where one came). A megamom CausalLM; prompts of
    any lengths (each at least one token). check_every: decode steps between the host's looks at
    whether every prompt has stopped (each look is a device sync). on_tokens(next [P]): called with
    every step's tokens (a streaming printer; it syncs each step). cuda_graph: decode through a
    GraphedDecodeStep (None: for a memory model on CUDA). prefill_tokens: the most prompt tokens
    one forward prefills (prompts are packed into rows up to it, a longer prompt is prefilled in
    pieces, each continuing the cache): bounds the prefill's activation memory."""
    _check(max_new_tokens, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if check_every < 1:
        raise ValueError(f"check_every={check_every} must be >= 1")
    if prefill_tokens < 1:
        raise ValueError(f"prefill_tokens={prefill_tokens} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        if model.config.arch == "transformer":  # an attention cache holds one sequence per row
            if cuda_graph:
                raise ValueError("cuda_graph needs a memory model (an attention cache grows)")
            return [new for p in prompts for new in _decode(model, [p], max_new_tokens, temperature, top_k, top_p,
                                                               eos_id, generator, check_every, on_tokens)]
        if cuda_graph is None:
            cuda_graph = model.output_weight.device.type == "cuda"
        with inference_weights(model):  # (the weights stacked for decoding, once)
            return _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                           check_every, on_tokens, cuda_graph, prefill_tokens)
    finally:
        model.train(was_training)


def prefill(model, prompts: list[list[int]], prefill_tokens: Optional[int] = None):
    """(cache with one row per prompt, each prompt's last logits [P, V]) of a megamom CausalLM.
    Memory models pack consecutive prompts into one row of up to prefill_tokens tokens (None: no
    limit; `cu_seqlens` in the scan, no padding) and prefill a longer prompt in pieces of that size;
    an attention model takes one prompt."""
    device = model.output_weight.device
    budget = prefill_tokens or sum(len(p) for p in prompts)
    caches, logits, group = [], [], []
    grouped = 0  # tokens in `group`

    def flush():
        ids = torch.tensor([t for p in group for t in p], device=device)[None]
        if len(group) == 1:  # one prompt, in pieces
            cache = None
            for start in range(0, ids.shape[1], budget):
                out = model(ids[:, start:start + budget], cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
            caches.append(cache)
            logits.append(out.logits[:, -1])
        else:  # one packed row: the cache gets a row per prompt, the logits of each prompt's last token
            lengths = torch.tensor([len(p) for p in group], device=device)
            segments = torch.repeat_interleave(torch.arange(len(group), device=device), lengths)[None]
            out = model(ids, segment_ids=segments, use_cache=True, logits_at=lengths.cumsum(0) - 1)
            caches.append(out.cache)
            logits.append(out.logits[0])
        group.clear()

    if model.config.arch == "transformer" and len(prompts) != 1:
        raise ValueError("an attention model prefills one prompt at a time")
    for p in prompts:
        if group and grouped + len(p) > budget:
            flush()
            grouped = 0
        group.append(p)
        grouped += len(p)
    flush()
    return (caches[0] if len(caches) == 1 else concat_rows(caches, 0)), torch.cat(logits)


def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, generator, check_every, on_tokens,
            cuda_graph=False, prefill_tokens=None):
    device = model.output_weight.device
    if model.config.arch == "transformer":
        prefill_tokens = None  # (the attention cache is continued by one prompt at a time anyway)
    cache, logits = prefill(model, prompts, prefill_tokens)
    graphed = GraphedDecodeStep(model, cache) if cuda_graph and max_new_tokens > 1 else None
    steps = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = _next_tokens(logits, done, temperature, top_k, generator, top_p, eos_id)
        steps.append(nxt)
        if on_tokens is not None:
            on_tokens(nxt)
        if step == max_new_tokens - 1 or (eos_id is not None and (step + 1) % check_every == 0 and bool(done.all())):
            break
        if graphed is not None:
            logits = graphed.step(nxt)
        else:
            out = model(nxt[:, None], cache=cache, logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1]
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    if eos_id is not None:
        rows = [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return rows


def _next_tokens(logits, done, temperature, top_k, generator, top_p, eos_id) -> torch.Tensor:
    """The next token of every row; rows that stopped (`done`, updated in place) repeat EOS."""
    nxt = _sample(logits.float(), temperature, top_k, generator, top_p)
    if eos_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        done |= nxt == eos_id
    return nxt


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator,
            top_p: float = 1.0) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:  # the smallest set of most likely tokens whose probability reaches top_p
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # (the most likely token is always kept)
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
