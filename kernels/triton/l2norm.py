"""Row-wise L2 normalisation x / sqrt(sum x^2 + eps) over the last dim, forward and backward
(the q/k normalisation of the MoM spec). The forward keeps 1/norm (float32) for the backward:
dx = r * (dy - y * <dy, y>) with y = x * r."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import L2NORM_EPS
from . import launch_cfg, next_pow2


@triton.jit
def _l2norm_fwd_kernel(x, y, rstd, M, eps, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + rows[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) + eps)
    tl.store(y + rows[:, None] * D + o_d[None, :], (b_x * b_r[:, None]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, b_r, mask=rows < M)


@triton.jit
def _l2norm_bwd_kernel(y, rstd, dy, dx, M, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (o_d < D)[None, :]
    b_y = tl.load(y + rows[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + rows[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    b_r = tl.load(rstd + rows, mask=rows < M, other=0.0)
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_dy * b_y, 1)[:, None])
    tl.store(dx + rows[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=mask)


def l2norm_fwd(x: torch.Tensor, eps: float = L2NORM_EPS):
    """x: [..., D] contiguous -> (y same dtype, rstd float32 [...])."""
    D = x.shape[-1]
    M = x.numel() // D
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    cfg = launch_cfg("l2norm")
    BM = cfg.pop("BM")
    if M:
        _l2norm_fwd_kernel[(triton.cdiv(M, BM),)](x, y, rstd, M, eps, D=D, BD=next_pow2(D, 1), BM=BM, **cfg)
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, out_dtype: torch.dtype):
    D = y.shape[-1]
    M = y.numel() // D
    dx = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    cfg = launch_cfg("l2norm")
    BM = cfg.pop("BM")
    if M:
        _l2norm_bwd_kernel[(triton.cdiv(M, BM),)](y, rstd, dy.contiguous(), dx, M, D=D, BD=next_pow2(D, 1), BM=BM,
                                                 **cfg)
    return dx
