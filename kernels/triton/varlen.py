"""The scan's chunk table (`Varlen`) from cu_seqlens in one kernel, on the device, no host sync.

For S segments of lengths L_s, chunks of C rows: n_s = ceil(L_s / C), ends = cumsum(n), offsets =
ends - n; chunk slot t (of NT, an upper bound of sum n_s) belongs to segment seg_t = min(#{s: ends_s
<= t}, S - 1), as chunk t - offsets[seg_t] of it (past its last chunk for the surplus slots, which
every scan kernel masks out). The torch reference (`_prepare_varlen_torch`) takes about 14 small
kernels (a cast, differences, a floor division, a cumsum, arange, searchsorted, a gather, a stack and
casts) per layer; each program here walks the segments in blocks twice (S is small: memories x
documents), counting ends at or below its slots, then taking the largest end before their segment."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _chunk_counts(cu, s0, S, C: tl.constexpr, BS: tl.constexpr):
    """-> (segments s0 + o_s, their mask, their chunk counts (0 where masked), their first rows)."""
    o_s = s0 + tl.arange(0, BS)
    m_s = o_s < S
    lo = tl.load(cu + o_s, mask=m_s, other=0).to(tl.int32)
    hi = tl.load(cu + o_s + 1, mask=m_s, other=0).to(tl.int32)
    return o_s, m_s, tl.where(m_s, (hi - lo + C - 1) // C, 0), lo


@triton.jit
def _varlen_kernel(cu, cu32, idx, offsets, S, NT, C: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    slot = pid * BLOCK + tl.arange(0, BLOCK)
    first = pid == 0  # program 0 also writes the per-segment outputs
    count = tl.zeros([BLOCK], dtype=tl.int32)
    carry = pid * 0
    for s0 in range(0, S, BS):
        o_s, m_s, n, lo = _chunk_counts(cu, s0, S, C, BS)
        ends = tl.cumsum(n, 0) + carry
        count += tl.sum(((ends[None, :] <= slot[:, None]) & m_s[None, :]).to(tl.int32), 1)
        tl.store(offsets + o_s, ends - n, mask=m_s & first)
        tl.store(cu32 + o_s, lo, mask=m_s & first)
        carry += tl.sum(n, 0)
    tl.store(cu32 + S + tl.arange(0, 1), tl.load(cu + S + tl.arange(0, 1)).to(tl.int32), mask=first)
    seg = tl.minimum(count, S - 1)
    before = tl.zeros([BLOCK], dtype=tl.int32)  # ends[seg - 1] (0 for segment 0): the segment's first slot
    carry = pid * 0
    for s0 in range(0, S, BS):
        o_s, m_s, n, _ = _chunk_counts(cu, s0, S, C, BS)
        ends = tl.cumsum(n, 0) + carry
        below = (o_s[None, :] < seg[:, None]) & m_s[None, :]
        before = tl.maximum(before, tl.max(tl.where(below, ends[None, :], 0), 1))
        carry += tl.sum(n, 0)
    m_t = slot < NT
    tl.store(idx + slot * 2, seg, mask=m_t)
    tl.store(idx + slot * 2 + 1, slot - before, mask=m_t)


def chunk_table(cu_seqlens: torch.Tensor, NT: int, chunk_size: int):
    """cu_seqlens [S + 1] (S >= 1, on the kernel's device) -> (cu int32 [S + 1], chunk_indices int32
    [NT, 2], chunk_offsets int32 [S]), as `_prepare_varlen_torch` computes them."""
    S = cu_seqlens.numel() - 1
    dev = cu_seqlens.device
    cu32 = torch.empty(S + 1, dtype=torch.int32, device=dev)
    idx = torch.empty(NT, 2, dtype=torch.int32, device=dev)
    offsets = torch.empty(S, dtype=torch.int32, device=dev)
    cfg = launch_cfg("varlen")
    BLOCK, BS = cfg.pop("BLOCK"), cfg.pop("BS")
    _varlen_kernel[(max(triton.cdiv(NT, BLOCK), 1),)](cu_seqlens.contiguous(), cu32, idx, offsets, S, NT,
                                                      C=chunk_size, BS=BS, BLOCK=BLOCK, **cfg)
    return cu32, idx, offsets
