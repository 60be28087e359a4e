"""The router stage of a MoM layer: each token's top-k memories and their weights (float32
softmax, top-k, renormalised), and the load-balancing statistics of a routing.

`Router.counts_reduce` is the seam for layouts that split a sequence over ranks: a function
(counts [E], total tokens) -> the same summed over the ranks that share the routing statistics.
With it set, each rank's balance and z losses are its parts of the whole sequence's (they add up
to them; each rank's gradient for its own tokens); it is None on one rank. `Router.part_scale`
multiplies the losses a router reports: sequence parallelism sets it to the number of ranks, so that
their mean (what DeepSpeed and the logs take) is the whole sequence's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterStats:
    aux_loss: torch.Tensor  # scalar, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    token_fraction: torch.Tensor  # [E] detached: share of routed slots per memory


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] float32
    probs: torch.Tensor  # [N, E] float32, full softmax
    topk_weight: torch.Tensor  # [N, k] renormalised
    topk_index: torch.Tensor  # [N, k]



def route(x: torch.Tensor, weight: torch.Tensor, topk: int, fused: bool = False) -> RouterOutput:
    """x: [N, d]; weight: [E, d]. Softmax in float32 (float64 inputs stay float64, the reference
    precision of the tests), top-k, renormalise to sum 1. fused (the caller's `use_triton`): one
    Triton kernel each way, float32 (kernels/triton/router.py; ties go to the lower memory index)."""
    if fused:
        from megamom.kernels.triton.router import route_fused
        return RouterOutput(*route_fused(x, weight, topk))
    dt = torch.promote_types(x.dtype, torch.float32)
    # autocast would run this linear in bf16 whatever its inputs: near-ties then pick other memories
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.to(dt), weight.to(dt))
    probs = logits.softmax(-1)
    w, idx = probs.topk(topk, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return RouterOutput(logits, probs, w, idx)



def count_indices(index: torch.Tensor, size: int) -> torch.Tensor:
    """bincount with a known size. torch.bincount on CUDA reads the maximum back to the host (a
    sync that stalls the GPU once per layer); an integer scatter-add does not, and is exact."""
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))



def load_balancing_loss(probs: torch.Tensor, topk_index: torch.Tensor, num_memories: int,
                        counts_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch loss E * sum_e f_e P_e with f_e = tokens sent to e / (k N), P_e = mean_t p_te.
    Equals 1 at perfect balance. `counts_reduce` (optional) all-reduces the counts and token
    totals over the ranks that share a sequence. Returns (loss, f)."""
    return _balance(probs, topk_index, num_memories, counts_reduce)[:2]


def _balance(probs, topk_index, num_memories: int, counts_reduce=None):
    """-> (balance loss, f, token total (the group's with counts_reduce))."""
    N, k = topk_index.shape
    counts = count_indices(topk_index.reshape(-1), num_memories).to(probs.dtype)
    prob_sum = probs.sum(0)
    total = probs.new_full((), float(N))  # a fill kernel; torch.tensor(..., device) would copy from the host
    if counts_reduce is not None:
        counts, total = counts_reduce(counts, total)
    f = counts / (k * total)
    P = prob_sum / total
    return num_memories * (f * P).sum(), f, total



def paper_balance_loss(topk_weight: torch.Tensor, topk_index: torch.Tensor, num_memories: int, rows: int,
                       counts_reduce=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoM authors' balance loss over `rows` sequences of N / rows tokens each (token-major):
    per sequence b, f_be = share of its tokens that chose e, P_be = mean over its tokens of the
    softmax over the top-k logits (0 for unchosen memories: the router's renormalised top-k weights),
    loss = E * mean_b sum_e f_be P_be (k when balanced). `counts_reduce` sums the per-sequence counts
    and token totals over the ranks holding slices of the same sequences. -> (loss, f over every slot
    as the switch form reports it [E], the group's token total)."""
    N, k = topk_index.shape
    E = num_memories
    chosen = torch.zeros(N, E, dtype=topk_weight.dtype, device=topk_weight.device)
    weights = chosen.scatter(1, topk_index, topk_weight)  # [N, E]: P's terms, differentiable
    chosen = chosen.scatter(1, topk_index, 1.0)
    counts = chosen.view(rows, -1, E).sum(1)  # [B, E]
    prob_sum = weights.view(rows, -1, E).sum(1)
    total = topk_weight.new_full((rows,), float(N // rows))
    if counts_reduce is not None:
        counts, total = counts_reduce(counts, total)
    loss = E * ((counts / total[:, None]) * (prob_sum / total[:, None])).sum(1).mean()
    return loss, counts.sum(0) / (k * total.sum()), total.sum()


def router_z_loss(logits: torch.Tensor, total: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2; given `total` (the tokens of every rank sharing the sequences),
    the sum over this rank's tokens / total: its part of the group's mean."""
    lse2 = torch.logsumexp(logits, -1).pow(2)
    return lse2.mean() if total is None else lse2.sum() / total



def router_losses(r: RouterOutput, num_memories: int, fused: bool = False, counts_reduce=None,
                  form: str = "switch", rows: int = 1):
    """-> (balance loss, z loss, token fraction per memory [E], detached) of a routing. fused (the
    caller's `use_triton`, float32 router outputs): one Triton kernel each way, also with counts
    reduced over ranks (kernels/triton/router_loss.py); else load_balancing_loss and router_z_loss.
    form: "switch" or "paper" (`paper_balance_loss` over `rows` sequences; torch)."""
    if fused and form == "switch" and r.probs.dtype == torch.float32 and r.probs.shape[0] > 0:
        from megamom.kernels.triton.router_loss import router_losses_fused
        assert r.probs.shape[1] == num_memories, (r.probs.shape, num_memories)
        return router_losses_fused(r.logits, r.probs, r.topk_index, counts_reduce)
    if form == "paper":
        aux, f, total = paper_balance_loss(r.topk_weight, r.topk_index, num_memories, rows, counts_reduce)
    else:
        aux, f, total = _balance(r.probs, r.topk_index, num_memories, counts_reduce)
    # with reduced counts, this rank's part of the group's mean, as the balance loss
    return aux, router_z_loss(r.logits, total if counts_reduce is not None else None), f.detach()



class Router(nn.Module):
    """weight [E, d] (E: every routed memory, also where expert parallelism holds fewer of them)."""

    def __init__(self, hidden_size: int, num_memories: int, topk: int, aux_loss_form: str = "switch"):
        super().__init__()
        self.aux_loss_form = aux_loss_form
        self.weight = nn.Parameter(torch.empty(num_memories, hidden_size))
        # drawn as nn.Linear draws its weight (MemoryMixer.reset_parameters overwrites it), so that a
        # seed keeps giving the same model as when the router was an nn.Linear
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.topk = topk
        self.counts_reduce: Optional[Callable] = None
        self.part_scale = 1.0

    @property
    def num_memories(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, fused: bool = False) -> RouterOutput:
        return route(x, self.weight, self.topk, fused)

    def stats(self, r: RouterOutput, fused: bool = False, rows: int = 1) -> RouterStats:
        """rows: the sequences the routed tokens belong to (token-major), for the paper form."""
        aux, z, f = router_losses(r, self.num_memories, fused, self.counts_reduce, self.aux_loss_form, rows)
        if self.part_scale != 1.0:
            aux, z = aux * self.part_scale, z * self.part_scale
        return RouterStats(aux, z, f)
