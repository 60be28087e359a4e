"""The scan's chunk table (`Varlen`) from cu_seqlens in one kernel, on the device, no host sync.

For S segments of lengths L_s, chunks of C rows: n_s = ceil(L_s / C), ends = cumsum(n), offsets =
ends - n; chunk slot t (of NT, an upper bound of sum n_s) belongs to segment seg_t = min(#{s: ends_s
<= t}, S - 1), as chunk t - offsets[seg_t] of it (past its last chunk for the surplus slots, which
every scan kernel masks out). The torch reference (`_prepare_varlen_torch`) takes about 14 small
kernels (a cast, differences, a floor division, a cumsum, arange, searchsorted, a gather, a stack and
casts) per layer; each program here walks the segments in blocks twice (S is small: memories x
documents), counting ends at or below its slots, then taking the largest end before their segment.

`prepare_varlen` builds the table once per call of a chunked kernel (forward and backward share it)
and caches it: dense batches by shape, varlen batches by the cu_seqlens tensor object."""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, launch_cfg


@dataclass
class Varlen:
    cu: torch.Tensor  # [N+1] int32 on the device
    chunk_indices: torch.Tensor  # [NT, 2] int32: (segment, chunk within segment)
    chunk_offsets: torch.Tensor  # [N] int32: global index of each segment's first chunk
    N: int  # segments
    NT: int  # chunk slots: the chunk count, or (varlen) an upper bound of it; see prepare_varlen


_LAST: list = [None, None]  # (key, Varlen) of the last varlen call: one entry, no stale reuse


def prepare_varlen(cu_seqlens: Optional[torch.Tensor], B: int, T: int, chunk_size: int,
                   device: torch.device) -> Varlen:
    """Chunk bookkeeping, computed on the device WITHOUT a host sync (a sync per layer would stall
    the GPU while the CPU catches up). With cu_seqlens the chunk count is not known on the host,
    so NT is its upper bound T // chunk_size + N; the surplus slots are empty chunks past the end
    of the last segment (every kernel masks them out: no valid row).

    Cached: dense batches by shape; varlen by the identity (and version) of the cu_seqlens
    tensor object, so a repeated call with the same tensor reuses it. A new tensor, even at a
    reused address, is a new object and recomputes. cu_seqlens must be non-decreasing with
    cu[-1] <= T (checked when it lives on the CPU)."""
    if cu_seqlens is None:
        return _prepare_dense(B, T, chunk_size, torch.device(device))
    key = (weakref.ref(cu_seqlens), cu_seqlens._version, chunk_size, T, torch.device(device))
    last_key, last = _LAST
    if last_key is not None and last_key[0]() is cu_seqlens and last_key[1:] == key[1:]:
        return last
    vl = _prepare_varlen(cu_seqlens, B * T, chunk_size, torch.device(device))
    _LAST[0], _LAST[1] = key, vl
    return vl


@functools.lru_cache(maxsize=64)
def _prepare_dense(B: int, T: int, chunk_size: int, device: torch.device) -> Varlen:
    n_chunks = (T + chunk_size - 1) // chunk_size
    seg = torch.arange(B).repeat_interleave(n_chunks)
    within = torch.arange(n_chunks).repeat(B)
    cu = torch.arange(0, B * T + 1, T) if T > 0 else torch.zeros(B + 1, dtype=torch.int64)
    return Varlen(cu.to(device=device, dtype=torch.int32), torch.stack([seg, within], 1).to(device, torch.int32),
                  (torch.arange(B) * n_chunks).to(device=device, dtype=torch.int32), B, B * n_chunks)


def _prepare_varlen(cu_seqlens: torch.Tensor, total: int, chunk_size: int, device: torch.device) -> Varlen:
    N = cu_seqlens.numel() - 1
    if cu_seqlens.device.type == "cpu":  # free to check here; on the GPU it would cost a sync
        lens_cpu = cu_seqlens[1:] - cu_seqlens[:-1]
        if (lens_cpu < 0).any() or (N > 0 and int(cu_seqlens[-1]) > total):
            raise ValueError(f"cu_seqlens must be non-decreasing and end at most at {total} rows")
    NT = total // chunk_size + N if (N > 0 and total > 0) else 0
    cu = cu_seqlens.detach().to(device=device)
    if N > 0 and (cu.is_cuda or INTERPRET):  # one kernel (varlen.py) instead of ~14 small ones
        return Varlen(*chunk_table(cu, NT, chunk_size), N, NT)
    return _prepare_varlen_torch(cu, NT, chunk_size)


def _prepare_varlen_torch(cu: torch.Tensor, NT: int, chunk_size: int) -> Varlen:
    """The reference of varlen.chunk_table (and the path for CPU tensors outside the interpreter)."""
    cu = cu.to(torch.int64)
    N = cu.numel() - 1
    device = cu.device
    lens = cu[1:] - cu[:-1]
    n_chunks = (lens + chunk_size - 1) // chunk_size
    ends = n_chunks.cumsum(0)
    offsets = ends - n_chunks
    slot = torch.arange(NT, device=device)
    seg = torch.searchsorted(ends, slot, right=True).clamp_(max=max(N - 1, 0))
    idx = torch.stack([seg, slot - offsets[seg]], 1).to(torch.int32)
    return Varlen(cu.to(torch.int32), idx, offsets.to(torch.int32), N, NT)


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
