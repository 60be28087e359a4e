"""out[n] = sum_j src[index[n, j]] in float32, one kernel: the backward of `dispatch.pack` (each
token's gradient is the sum of its R packed rows). The torch version is a gather of all A rows, a
float32 reduction and a cast (three passes over [A, D]); this reads each row once. Deterministic
(no atomics); the float32 sum runs over j = 0..R-1 in order. Indices are not bounds-checked (that
would cost a host sync): the caller's packing guarantees them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _gather_sum_kernel(src, index, out, N, D: tl.constexpr, R: tl.constexpr, BN: tl.constexpr,
                       BD: tl.constexpr):
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_n = o_n < N
    mask = m_n[:, None] & (o_d < D)[None, :]
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    for j in tl.static_range(R):
        rows = tl.load(index + o_n * R + j, mask=m_n, other=0).to(tl.int64)
        acc += tl.load(src + rows[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + o_n[:, None] * D + o_d[None, :], acc.to(out.dtype.element_ty), mask=mask)


def gather_sum(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src [A, ...], index [N, R] (int) -> [N, ...] in src's dtype, summed in float32."""
    if index.dim() != 2 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_sum: index must be a 2-D integer tensor [N, R], got {tuple(index.shape)} "
                         f"{index.dtype}")
    N, R = index.shape
    src2 = src.reshape(src.shape[0], -1).contiguous()
    D = src2.shape[1]
    out = torch.empty(N, D, dtype=src.dtype, device=src.device)
    cfg = launch_cfg("gather_sum", BD=triton.next_power_of_2(max(D, 1)))
    BN, BD = cfg.pop("BN"), cfg.pop("BD")
    if N and D:
        _gather_sum_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](src2, index.contiguous(), out, N, D=D, R=R,
                                                                      BN=BN, BD=BD, **cfg)
    return out.view(N, *src.shape[1:])
