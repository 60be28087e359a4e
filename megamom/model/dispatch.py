"""The dispatch stage of a MoM layer: dropless, stable packing of each token's rows memory-major,
and its weighted inverse.

Packed ("memory-major") order: rows sorted by (memory, document, position). Each token appears
once per selected memory (top-k) and once more for the shared memory, which is memory index E.
A segment is one (memory, document) pair; all segments of a layer go to ONE scan call through
`cu_seqlens` (empty segments included, so segment m * D + d is always memory m, document d).

Everything is vectorised: one sort, a binary search, gathers (on the GPU path a counting sort in
three Triton kernels, kernels/triton/packing.py), and nothing reads back to the host (the scan
bounds its chunk count on the device). `Dispatcher` is the seam for expert parallelism: a version
that exchanges the packed rows between the ranks holding the memories replaces it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


@dataclass
class Packing:
    row_token: torch.Tensor  # [A] source token of each packed row
    row_memory: torch.Tensor  # [A] memory of each packed row (E = shared)
    row_segment: torch.Tensor  # [A] segment index (memory * num_docs + doc)
    slot_row: torch.Tensor  # [N, R] packed row of (token, slot); slots = top-k choices (+ shared)
    row_slot: torch.Tensor  # [A] inverse of slot_row: row a is slot_row.view(-1)[row_slot[a]]
    row_position: torch.Tensor  # [A] int32 position of each row in its segment
    cu_seqlens: torch.Tensor  # [M * num_docs + 1]
    num_memories: int  # M = routed + shared
    num_docs: int
    num_tokens: int



def build_packing(topk_index: Optional[torch.Tensor], doc_ids: torch.Tensor, num_docs: int,
                  num_routed: int, shared: bool, fused: bool = False) -> Packing:
    """topk_index: [N, k] (None when there is no router); doc_ids: [N] global document index of
    each token, non-decreasing in token order. Returns the memory-major packing.
    fused (the caller's `use_triton`): the same packing by a counting sort in three Triton kernels
    (kernels/triton/packing.py) instead of an argsort and ~30 small ops."""
    N = doc_ids.numel()
    M = num_routed + int(shared)
    if fused:
        from megamom.kernels.triton.packing import build_packing_triton
        return Packing(*build_packing_triton(topk_index, doc_ids, num_docs, num_routed, shared), M, num_docs, N)
    device = doc_ids.device
    tokens = torch.arange(N, device=device)
    mems, toks = [], []
    if topk_index is not None:
        k = topk_index.shape[1]
        mems.append(topk_index.reshape(-1))
        toks.append(tokens.repeat_interleave(k))
    if shared:
        mems.append(torch.full((N,), num_routed, device=device, dtype=torch.long))
        toks.append(tokens)
    slot_mem = torch.cat(mems).long()  # assignment order: routed slots token-major, then shared
    slot_tok = torch.cat(toks)
    # (memory, token) pairs are unique, so this key sorts them into a unique, stable order; int32
    # keys when they fit: a radix sort's passes scale with the key's bits
    key = slot_mem * N + slot_tok
    order = torch.argsort(key.to(torch.int32) if M * N < 2**31 else key)
    row_token, row_memory = slot_tok[order], slot_mem[order]
    row_segment = row_memory * num_docs + doc_ids[row_token]
    # rows are sorted by segment: each segment's first row by binary search (no atomics, no count)
    cu = torch.searchsorted(row_segment, torch.arange(M * num_docs + 1, device=device))
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(order.numel(), device=device)
    # assignment a = slot * N + token for the shared slot, token * k + j for routed ones
    if topk_index is not None:
        k = topk_index.shape[1]
        routed = slot_row[: N * k].view(N, k)
        slot_row = torch.cat([routed, slot_row[N * k:].view(-1, N).t()], 1) if shared else routed
    else:
        slot_row = slot_row.view(1, N).t()
    slot_row = slot_row.contiguous()
    row_slot = torch.empty_like(order)
    row_slot[slot_row.view(-1)] = torch.arange(order.numel(), device=device)
    row_position = (torch.arange(order.numel(), device=device) - cu[row_segment]).to(torch.int32)
    return Packing(row_token, row_memory, row_segment, slot_row, row_slot, row_position, cu, M, num_docs, N)



class _GatherTokens(torch.autograd.Function):
    """x[row_token] with a deterministic backward: the gradient of token n is the sum of its R rows,
    read through `slot_row` (no atomics, so bitwise reproducible on GPU too). fused: the backward
    is one Triton kernel (same float32 sum in the same order)."""

    @staticmethod
    def forward(ctx, x, row_token, slot_row, fused):
        ctx.save_for_backward(slot_row)
        ctx.fused = fused
        return x.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return sum_token_rows(grad, slot_row, ctx.fused), None, None, None



def sum_token_rows(grad: torch.Tensor, slot_row: torch.Tensor, fused: bool) -> torch.Tensor:
    """[A, ...] packed-row gradients -> [N, ...]: each token's rows summed in float32, in slot order."""
    if fused:
        from megamom.kernels.triton.gather_sum import gather_sum
        return gather_sum(grad, slot_row)
    N, R = slot_row.shape
    rows = grad.index_select(0, slot_row.reshape(-1)).view(N, R, *grad.shape[1:])
    return rows.sum(1, dtype=torch.promote_types(grad.dtype, torch.float32)).to(grad.dtype)



def pack(x: torch.Tensor, packing: Packing, fused: bool = False) -> torch.Tensor:
    """[N, ...] token rows -> [A, ...] packed rows (a token repeated once per selected memory).
    fused (the caller's `use_triton(x, backend)`): the backward's sum over each token's rows is one
    Triton kernel."""
    return _GatherTokens.apply(x, packing.row_token, packing.slot_row, fused)



def pack_per_memory(y: torch.Tensor, packing: Packing) -> torch.Tensor:
    """y: [N, M, P] per-memory projections of every token -> [A, P], each row the projection of
    its token by its own memory. (token, memory) pairs are unique, so the gather is injective."""
    N, M, P = y.shape
    return y.reshape(N * M, P).index_select(0, packing.row_token * M + packing.row_memory)



def memory_row_ends(packing: Packing) -> torch.Tensor:
    """int32 [M]: the packed row after each memory's last row (the grouped GEMM's group offsets)."""
    return packing.cu_seqlens[packing.num_docs::packing.num_docs].to(torch.int32)



class _Permute(torch.autograd.Function):
    """x[index] for a permutation `index` of the rows; the backward is the gather by the inverse
    permutation (no atomics as in index_add, no sort as in advanced indexing's index_put: that one
    once took 59% of the layer's GPU time)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None



def combine(rows: torch.Tensor, packing: Packing, slot_weight: torch.Tensor) -> torch.Tensor:
    """Weighted inverse of `pack`: rows [A, ...] -> [N, ...] = sum over slots of weight * row.
    slot_weight: [N, R] (routing weights, 1 for the shared memory)."""
    N, R = packing.slot_row.shape
    gathered = _Permute.apply(rows, packing.slot_row.view(-1), packing.row_slot).view(N, R, *rows.shape[1:])
    w = slot_weight.to(gathered.dtype).view(*slot_weight.shape, *([1] * (gathered.dim() - 2)))
    return (gathered * w).sum(1)



class Dispatcher(nn.Module):
    """Tokens -> packed rows of the memories and back, on a rank that holds every memory. No parameters."""

    def __init__(self, num_routed: int, shared: bool):
        super().__init__()
        self.num_routed, self.shared = num_routed, shared

    def forward(self, topk_index: Optional[torch.Tensor], doc_ids: torch.Tensor, num_docs: int,
                fused: bool = False) -> Packing:
        return build_packing(topk_index, doc_ids, num_docs, self.num_routed, self.shared, fused)

    def gather(self, x: torch.Tensor, packing: Packing, fused: bool = False) -> torch.Tensor:
        return pack(x, packing, fused)

    def run(self, x: torch.Tensor, doc_ids: torch.Tensor, packing: Packing, experts, row_shape: tuple,
            fused: bool = False, seq_slice=None):
        """The memory experts over the packed rows: here every memory is held, so
        experts(x, packing, seq_slice) as it is (megamom.parallel.expert_parallel exchanges the rows
        with the ranks holding them, and gives the experts the slice as those ranks see it)."""
        return experts(x, packing, seq_slice)

    def combine(self, rows: torch.Tensor, packing: Packing, slot_weight: torch.Tensor) -> torch.Tensor:
        return combine(rows, packing, slot_weight)
