"""Token-to-memory routing: router, dropless stable packing, and its weighted inverse.

Packed ("memory-major") order: rows sorted by (memory, document, position). Each token appears
once per selected memory (top-k) and once more for the shared memory, which is memory index E.
A segment is one (memory, document) pair; all segments of a layer go to ONE scan call through
`cu_seqlens` (empty segments included, so segment m * D + d is always memory m, document d).

Everything is vectorised: one sort, a binary search, gathers (on the GPU path a counting sort in
three Triton kernels, kernels/triton/packing.py), and nothing reads back to the host (the scan
bounds its chunk count on the device). The exchange of rows between expert-parallel ranks plugs in
between `pack` and `combine` (see megamom.parallel)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .layers import compute_dtype


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


def count_indices(index: torch.Tensor, size: int) -> torch.Tensor:
    """bincount with a known size. torch.bincount on CUDA reads the maximum back to the host (a
    sync that stalls the GPU once per layer); an integer scatter-add does not, and is exact."""
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


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


def grouped_projection(x: torch.Tensor, weights, packing: Packing, fused: bool = False, narrow=None,
                       keep_rows: bool = False):
    """Per-memory projection of every packed row: row r gets x[token_r] @ W[memory_r]^T, with W the
    weights [M, P_i, d] (a tensor, or a list stacked along dim 1: the layer's k | v).
    narrow: per-memory weights [M, Q_j, d] of a few columns each (the per-head beta and scalar decay),
    projected for every token by every memory in one dense GEMM and gathered per row: they stay out of
    the grouped GEMM, whose width then stays a multiple of its tile (H200, B8 T2048 d1024: fwd + dx +
    dW 1.02 ms at 2048 columns, 1.17 ms at 2048 + 8; `benchmarks/bench_gemm_shapes.py`).
    keep_rows: the grouped path saves the gathered token rows [A, d] for its weight gradient instead of
    gathering them again (model.scan_keep=all: +100 MB a layer at B8 T2048 d1024, one gather less).
    -> (rows [A, sum P_i], narrow rows [A, sum Q_j] or None).

    On CUDA with bf16 compute this is ONE grouped GEMM over the memory-major rows (each token pays
    only for its top-k + shared memories); elsewhere one dense GEMM of every token by every memory,
    then a gather (extra FLOPs, but a single vectorised op with an exactly reproducible backward)."""
    parts = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    narrow = list(narrow or [])
    dtype = _grouped_mm_dtype(x, sum(p.shape[1] for p in parts))
    if dtype is not None:
        offs = memory_row_ends(packing)
        nw = _StackWeights.apply(dtype, *narrow) if narrow else None
        # cast, then gather: half the bytes moved under autocast
        rows, narrow_rows = _GroupedProjection.apply(x.to(dtype), _StackWeights.apply(dtype, *parts),
                                                     packing.row_token, packing.slot_row, offs, fused, nw,
                                                     packing.row_memory, keep_rows)
        return rows, (narrow_rows if narrow else None)
    return _dense_per_memory(x, parts, packing), (_dense_per_memory(x, narrow, packing) if narrow else None)


def _dense_per_memory(x: torch.Tensor, parts: list, packing: Packing) -> torch.Tensor:
    weight = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    M, P, d = weight.shape
    return pack_per_memory(F.linear(x, weight.reshape(M * P, d)).view(x.shape[0], M, P), packing)


class _StackWeights(torch.autograd.Function):
    """torch.cat(parts, 1).to(dtype) in one pass: each part is cast straight into its slice. The
    backward gives each part a contiguous gradient in its own dtype, one copy each (the cast's and
    the cat's backward would cast the whole gradient, then hand out strided slices that the gradient
    accumulation copies again: ~1 ms a mom-340m step)."""

    @staticmethod
    def forward(ctx, dtype, *parts):
        out = parts[0].new_empty(parts[0].shape[0], sum(p.shape[1] for p in parts), parts[0].shape[2], dtype=dtype)
        c0 = 0
        for p in parts:
            out[:, c0:c0 + p.shape[1]].copy_(p)
            c0 += p.shape[1]
        ctx.layout = [(p.shape[1], p.dtype) for p in parts]
        return out

    @staticmethod
    def backward(ctx, grad):
        grads, c0 = [], 0
        for n, dtype in ctx.layout:
            grads.append(grad[:, c0:c0 + n].to(dtype, memory_format=torch.contiguous_format))
            c0 += n
        return (None, *grads)


def memory_row_ends(packing: Packing) -> torch.Tensor:
    """int32 [M]: the packed row after each memory's last row (the grouped GEMM's group offsets)."""
    return packing.cu_seqlens[packing.num_docs::packing.num_docs].to(torch.int32)


class _GroupedProjection(torch.autograd.Function):
    """rows = x[row_token]; out = one grouped GEMM of each memory's rows by its weight [M, P, d];
    narrow rows = (x @ every memory's narrow weight [M, Q, d])[token, memory of the row] (None: no narrow
    weights, and an empty [A, 0] output).
    Saves x (the token rows, which the layer's other projections keep anyway), and the packed rows
    (k + shared times larger) only with keep_rows: else the backward gathers them again for the
    weight gradient, one gather (~50 us at B8 T2048 d1024 on an H200) for 100 MB less per layer.
    The narrow rows' input gradient is added into the grouped one by the GEMM itself (addmm, beta
    1), not by a separate add."""

    @staticmethod
    def forward(ctx, x, weight, row_token, slot_row, offs, fused, narrow_weight, row_memory, keep_rows=False):
        gathered = x.index_select(0, row_token)
        ctx.save_for_backward(x, weight, row_token, slot_row, offs, narrow_weight, row_memory,
                              gathered if keep_rows else None)
        ctx.fused = fused
        rows = torch._grouped_mm(gathered, weight.transpose(1, 2), offs=offs)
        if narrow_weight is None:
            return rows, rows.new_empty(rows.shape[0], 0)
        M, Q, d = narrow_weight.shape
        every = F.linear(x, narrow_weight.reshape(M * Q, d))  # [N, M * Q]: every token by every memory
        return rows, every.view(-1, Q).index_select(0, row_token * M + row_memory)

    @staticmethod
    def backward(ctx, grad, grad_narrow):
        x, weight, row_token, slot_row, offs, nw, row_memory, gathered = ctx.saved_tensors
        d_every = None
        if nw is not None:  # the rows' gradients back to [N, M * Q] ((token, memory) pairs are unique: no sums)
            M, Q, d = nw.shape
            d_every = grad_narrow.new_zeros(x.shape[0] * M, Q).index_copy_(
                0, row_token * M + row_memory, grad_narrow).view(x.shape[0], M * Q)
        grad = grad.contiguous()
        dx = dw = dnw = None
        if ctx.needs_input_grad[0]:
            dx = sum_token_rows(torch._grouped_mm(grad, weight, offs=offs), slot_row, ctx.fused)
            if d_every is not None:
                dx.addmm_(d_every, nw.reshape(M * Q, d))
        if ctx.needs_input_grad[1]:
            gathered = x.index_select(0, row_token) if gathered is None else gathered
            dw = torch._grouped_mm(grad.t(), gathered, offs=offs)
        if ctx.needs_input_grad[6] and nw is not None:
            dnw = (d_every.t() @ x).view(M, Q, d)
        return dx, dw, None, None, None, None, dnw, None, None


def _grouped_mm_dtype(x: torch.Tensor, out_features: int) -> Optional[torch.dtype]:
    """The compute dtype when torch's grouped GEMM applies (bf16 on sm90, 16-byte aligned rows of x
    and of the output), else None. Only sm90 (where the GPU tests run it, a memory without rows included): on Blackwell
    torch's grouped GEMM has open correctness bugs (pytorch#172439: non-zero weight gradients for
    empty groups; #193633: NaN gradients), so other cards take the dense projection."""
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return None
    dtype = compute_dtype(x)
    ok = (dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] == 9
          and x.shape[1] % 8 == 0 and out_features % 8 == 0)
    return dtype if ok else None


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


def load_balancing_loss(probs: torch.Tensor, topk_index: torch.Tensor, num_memories: int,
                        counts_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch loss E * sum_e f_e P_e with f_e = tokens sent to e / (k N), P_e = mean_t p_te.
    Equals 1 at perfect balance. `counts_reduce` (optional) all-reduces the counts and token
    totals over the ranks that share a sequence. Returns (loss, f)."""
    N, k = topk_index.shape
    counts = count_indices(topk_index.reshape(-1), num_memories).to(probs.dtype)
    prob_sum = probs.sum(0)
    total = probs.new_full((), float(N))  # a fill kernel; torch.tensor(..., device) would copy from the host
    if counts_reduce is not None:
        counts, total = counts_reduce(counts, total)
    f = counts / (k * total)
    P = prob_sum / total
    return num_memories * (f * P).sum(), f


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, -1).pow(2).mean()


def router_losses(r: RouterOutput, num_memories: int, fused: bool = False, counts_reduce=None):
    """-> (balance loss, z loss, token fraction per memory [E], detached) of a routing. fused (the
    caller's `use_triton`, float32 router outputs, counts not reduced over ranks): one Triton kernel
    each way (kernels/triton/router_loss.py); else load_balancing_loss and router_z_loss."""
    if fused and counts_reduce is None and r.probs.dtype == torch.float32 and r.probs.shape[0] > 0:
        from megamom.kernels.triton.router_loss import router_losses_fused
        assert r.probs.shape[1] == num_memories, (r.probs.shape, num_memories)
        return router_losses_fused(r.logits, r.probs, r.topk_index)
    aux, f = load_balancing_loss(r.probs, r.topk_index, num_memories, counts_reduce)
    return aux, router_z_loss(r.logits), f.detach()
