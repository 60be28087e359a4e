"""dispatch.build_packing as a counting sort in three Triton kernels (the torch version: an argsort and
~30 small ops a layer, each a launch the host issues and the GPU waits for).

Rows are sorted by (memory, token): tokens are in time order and documents non-decreasing, so that
is the (memory, document, position) order of the packing. For memory m and token n let
before[m, n] = the number of packed rows ahead of (n, m) = (rows of memories < m) + (tokens < n that
selected m): the row of (n, m) if n selected m.

  _count_kernel   grid (token blocks, M): how many tokens of the block selected memory m
  (torch)         inclusive cumsum of the counts in (memory, block) order: each block's first row
  _rows_kernel    grid (token blocks, M): before[m, n] by a cumsum within the block; the rows of the
                  selected (n, m): row_token, row_memory, row_segment, row_slot, and slot_row[n, j]
  _finish_kernel  grid (rows): row_position = row - before[m, first token of n's document];
                  cu_seqlens[m * D + d] = before[m, first token of a document >= d] (or memory m's
                  end when there is none: empty segments at the end of a memory)

Deterministic, no atomics, no host sync (A = N * R rows, dropless); equal to the torch version in every
output (tests/kernels/test_packing_triton.py: interpreter on CPU; tests/gpu/test_kernels_gpu.py)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _selected(topk, o_n, m_n, m, E, K: tl.constexpr, SHARED: tl.constexpr, BLOCK: tl.constexpr):
    """-> (did token o_n select memory m, the slot j it selected m in: j < K routed, K shared). A
    token's K indices are distinct (top-k), so at most one j hits."""
    sel = tl.zeros([BLOCK], dtype=tl.int32)
    slot = tl.full([BLOCK], K, dtype=tl.int32)
    for j in tl.static_range(K):
        hit = tl.load(topk + o_n * K + j, mask=m_n, other=-1) == m
        sel = tl.where(hit, 1, sel)
        slot = tl.where(hit, j, slot)
    if SHARED:
        sel = tl.where(m == E, 1, sel)
    return tl.where(m_n, sel, 0), slot


@triton.jit
def _count_kernel(topk, counts, N, E, K: tl.constexpr, SHARED: tl.constexpr, BLOCK: tl.constexpr):
    b, m = tl.program_id(0), tl.program_id(1)  # token blocks on axis 0: no 65535 limit
    o_n = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sel, _ = _selected(topk, o_n, o_n < N, m, E, K, SHARED, BLOCK)
    tl.store(counts + m.to(tl.int64) * tl.num_programs(0) + b, tl.sum(sel, 0).to(tl.int64))


@triton.jit
def _rows_kernel(topk, doc_ids, counts, ends, before, row_token, row_memory, row_segment, row_slot, slot_row,
                 N, E, D, K: tl.constexpr, R: tl.constexpr, SHARED: tl.constexpr, BLOCK: tl.constexpr):
    b, m = tl.program_id(0), tl.program_id(1)
    f = m.to(tl.int64) * tl.num_programs(0) + b
    first = tl.load(ends + f) - tl.load(counts + f)  # the packed row of this block's first selection
    o_n = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    sel, slot = _selected(topk, o_n, m_n, m, E, K, SHARED, BLOCK)
    row = first + tl.cumsum(sel, 0) - sel  # before[m, n]
    tl.store(before + m.to(tl.int64) * N + o_n, row, mask=m_n)
    ms = m_n & (sel > 0)
    doc = tl.load(doc_ids + o_n, mask=ms, other=0)
    tl.store(row_token + row, o_n, mask=ms)
    tl.store(row_memory + row, tl.zeros_like(row) + m, mask=ms)
    tl.store(row_segment + row, m * D + doc, mask=ms)
    tl.store(row_slot + row, o_n * R + slot, mask=ms)
    tl.store(slot_row + o_n * R + slot, row, mask=ms)


@triton.jit
def _finish_kernel(doc_ids, doc_first, ends, before, row_token, row_memory, row_position, cu, N, A, MD, D, NB,
                   BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_a = o < A
    n = tl.load(row_token + o, mask=m_a, other=0)
    m = tl.load(row_memory + o, mask=m_a, other=0)
    start = tl.load(doc_first + tl.load(doc_ids + n, mask=m_a, other=0), mask=m_a, other=0)
    seg_first = tl.load(before + m * N + start, mask=m_a, other=0)
    tl.store(row_position + o, (o - seg_first).to(tl.int32), mask=m_a)
    # cu_seqlens[i] for segment i = m * D + d; the last entry is A
    m_c = o < MD
    mc, dc = o // D, o % D
    fc = tl.load(doc_first + dc, mask=m_c, other=0)
    inside = m_c & (fc < N)
    val = tl.load(before + mc * N + fc, mask=inside, other=0)
    val = tl.where(inside, val, tl.load(ends + mc * NB + NB - 1, mask=m_c & (fc >= N), other=0))
    val = tl.where(o == MD, A, val)
    tl.store(cu + o, val, mask=o <= MD)


def build_packing_triton(topk_index: Optional[torch.Tensor], doc_ids: torch.Tensor, num_docs: int,
                         num_routed: int, shared: bool) -> tuple:
    """dispatch.build_packing's outputs (row_token, row_memory, row_segment, slot_row, row_slot,
    row_position, cu_seqlens), same dtypes; topk_index [N, k] (None: no router), doc_ids [N]
    non-decreasing global document indices < num_docs (not checked: that would cost a host sync)."""
    N = doc_ids.numel()
    device = doc_ids.device
    K = topk_index.shape[1] if topk_index is not None else 0
    M, R = num_routed + int(shared), K + int(shared)
    A, MD = N * R, M * num_docs
    i64 = dict(dtype=torch.long, device=device)
    row_token, row_memory, row_segment, row_slot = (torch.empty(A, **i64) for _ in range(4))
    slot_row = torch.empty(N, R, **i64)
    row_position = torch.empty(A, dtype=torch.int32, device=device)
    cu = torch.empty(MD + 1, **i64)
    if N == 0 or M == 0:
        cu.zero_()
        return row_token, row_memory, row_segment, slot_row, row_slot, row_position, cu
    cfg = launch_cfg("packing")
    BLOCK = cfg.pop("BLOCK")
    NB = triton.cdiv(N, BLOCK)
    doc_ids = doc_ids.contiguous()
    topk = topk_index.contiguous() if topk_index is not None else doc_ids  # K = 0: never read
    counts = torch.empty(M * NB, **i64)
    _count_kernel[(NB, M)](topk, counts, N, num_routed, K=K, SHARED=shared, BLOCK=BLOCK, **cfg)
    ends = counts.cumsum(0)
    before = torch.empty(M, N, **i64)
    _rows_kernel[(NB, M)](topk, doc_ids, counts, ends, before, row_token, row_memory, row_segment, row_slot,
                          slot_row, N, num_routed, num_docs, K=K, R=R, SHARED=shared, BLOCK=BLOCK, **cfg)
    doc_first = torch.searchsorted(doc_ids, torch.arange(num_docs, **i64))
    _finish_kernel[(triton.cdiv(max(A, MD + 1), BLOCK),)](
        doc_ids, doc_first, ends, before, row_token, row_memory, row_position, cu, N, A, MD, num_docs, NB,
        BLOCK=BLOCK, **cfg)
    return row_token, row_memory, row_segment, slot_row, row_slot, row_position, cu
