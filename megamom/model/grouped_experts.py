"""The memories' projections of a MoM layer: every packed row projected by its own memory's
weights, as one grouped GEMM over the memory-major rows on the GPU (each token pays only for its
top-k + shared memories) and as a dense projection plus a gather elsewhere. The routed memories'
weights are stacked [E, P, d]; the shared memory's are its own [P, d] (MemoryWeight)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Packing, memory_row_ends, pack_per_memory, sum_token_rows
from .layers import compute_dtype


# One projection of every memory: (routed weights [E, P, d] or None, shared memory's weight [P, d] or
# None). The shared memory is memory index E, after the routed ones.
MemoryWeight = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]



def stack_memories(families: list[MemoryWeight]) -> torch.Tensor:
    """[M, sum P, d]: per memory (the routed ones, then the shared one) its projections side by side."""
    cols = []
    for routed, shared in families:
        parts = ([] if routed is None else [routed]) + ([] if shared is None else [shared[None]])
        cols.append(parts[0] if len(parts) == 1 else torch.cat(parts, 0))
    return cols[0] if len(cols) == 1 else torch.cat(cols, 1)



def grouped_projection(x: torch.Tensor, weights: list[MemoryWeight], packing: Packing, fused: bool = False,
                       narrow: Optional[list[MemoryWeight]] = None, keep_rows: bool = False):
    """Per-memory projection of every packed row: row r gets x[token_r] @ W[memory_r]^T, with W the
    memories' weights (MemoryWeight families, stacked along the output dim: the layer's k | v).
    narrow: per-memory weight families of a few columns each (the per-head beta and scalar decay),
    projected for every token by every memory in one dense GEMM and gathered per row: they stay out of
    the grouped GEMM, whose width then stays a multiple of its tile (H200, B8 T2048 d1024: fwd + dx +
    dW 1.02 ms at 2048 columns, 1.17 ms at 2048 + 8; `benchmarks/bench_gemm_shapes.py`).
    keep_rows: the grouped path saves the gathered token rows [A, d] for its weight gradient instead of
    gathering them again (model.scan_keep=all: +100 MB a layer at B8 T2048 d1024, one gather less).
    -> (rows [A, sum P_i], narrow rows [A, sum Q_j] or None).

    On CUDA with bf16 compute this is ONE grouped GEMM over the memory-major rows (each token pays
    only for its top-k + shared memories); elsewhere one dense GEMM of every token by every memory,
    then a gather (extra FLOPs, but a single vectorised op with an exactly reproducible backward)."""
    narrow = list(narrow or [])
    dtype = _grouped_mm_dtype(x, sum(_width(f) for f in weights))
    if dtype is not None:
        offs = memory_row_ends(packing)
        nw = _stack_cast(dtype, narrow) if narrow else None
        # cast, then gather: half the bytes moved under autocast
        rows, narrow_rows = _GroupedProjection.apply(x.to(dtype), _stack_cast(dtype, weights),
                                                     packing.row_token, packing.slot_row, offs, fused, nw,
                                                     packing.row_memory, keep_rows)
        return rows, (narrow_rows if narrow else None)
    return _dense_per_memory(x, weights, packing), (_dense_per_memory(x, narrow, packing) if narrow else None)



def _width(family: MemoryWeight) -> int:
    routed, shared = family
    return routed.shape[1] if routed is not None else shared.shape[0]



def _dense_per_memory(x: torch.Tensor, families: list[MemoryWeight], packing: Packing) -> torch.Tensor:
    weight = stack_memories(families)
    M, P, d = weight.shape
    return pack_per_memory(F.linear(x, weight.reshape(M * P, d)).view(x.shape[0], M, P), packing)



def _stack_cast(dtype: torch.dtype, families: list[MemoryWeight]) -> torch.Tensor:
    layout = [(r is not None, sh is not None) for r, sh in families]
    return _StackWeights.apply(dtype, layout, *[t for f in families for t in f if t is not None])



class _StackWeights(torch.autograd.Function):
    """stack_memories(families).to(dtype) in one pass: each weight (a routed stack [E, P, d], the
    shared memory's [P, d]) is cast straight into its block of [M, sum P, d]. The backward gives each
    weight a contiguous gradient in its own dtype, one copy each (the cast's and the cat's backward
    would cast the whole gradient, then hand out strided slices that the gradient accumulation
    copies again: ~1 ms a mom-340m step)."""

    @staticmethod
    def forward(ctx, dtype, layout, *weights):
        it = iter(weights)
        families = [(next(it) if has_routed else None, next(it) if has_shared else None)
                    for has_routed, has_shared in layout]
        E = next((r.shape[0] for r, _ in families if r is not None), 0)
        M = E + int(layout[0][1])
        d = weights[0].shape[-1]
        out = weights[0].new_empty(M, sum(_width(f) for f in families), d, dtype=dtype)
        blocks, c0 = [], 0
        for routed, shared in families:
            P = _width((routed, shared))
            if routed is not None:
                out[:E, c0:c0 + P].copy_(routed)
                blocks.append((slice(0, E), slice(c0, c0 + P), routed.dtype))
            if shared is not None:
                out[E, c0:c0 + P].copy_(shared)
                blocks.append((E, slice(c0, c0 + P), shared.dtype))
            c0 += P
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = [grad[rows, cols].to(dtype, memory_format=torch.contiguous_format) for rows, cols, dtype in ctx.blocks]
        return (None, None, *grads)



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

