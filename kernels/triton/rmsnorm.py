"""RMSNorm y = x / sqrt(mean(x^2) + eps) * weight over the last dim, forward and backward in one
kernel each (the block norms; the torch version is 5 kernels forward and ~8 backward over float32
copies of the residual stream). Output in x's dtype, statistics in float32.

    backward  x_hat = x rstd;  dx = rstd (dy w - x_hat mean(dy w x_hat));  dw = sum_rows dy x_hat
dw is summed per block of rows in the kernel and over blocks in torch (deterministic).
The reference: `megamom.model.layers.RMSNorm` on the torch path."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _rmsnorm_fwd_kernel(x, w, y, rstd, M, eps, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < M - r0
    mask = m_m[:, None] & (o_d < D)[None, :]
    offs = r0 * D + o_m[:, None] * D + o_d[None, :]
    b_x = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / D + eps)
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    tl.store(y + offs, (b_x * b_r[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r0 + o_m, b_r, mask=m_m)


@triton.jit
def _rmsnorm_bwd_kernel(x, w, rstd, dy, dx, dwp, M, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                        RB: tl.constexpr):
    i_p = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i in range(RB):
        r0 = (i_p.to(tl.int64) * RB + i) * BM
        m_m = o_m < M - r0
        mask = m_m[:, None] & m_d[None, :]
        offs = r0 * D + o_m[:, None] * D + o_d[None, :]
        b_r = tl.load(rstd + r0 + o_m, mask=m_m, other=0.0)
        b_xh = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32) * b_r[:, None]
        b_dy = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
        acc += b_dy * b_xh
        b_g = b_dy * b_w[None, :]
        b_dx = b_r[:, None] * (b_g - b_xh * (tl.sum(b_g * b_xh, 1) / D)[:, None])
        tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=mask)
    tl.store(dwp + i_p * D + o_d, tl.sum(acc, 0), mask=m_d)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        cfg = launch_cfg("rmsnorm_fwd")
        BM = cfg.pop("BM")
        if M:
            _rmsnorm_fwd_kernel[(triton.cdiv(M, BM),)](x2, weight, y, rstd, M, eps, D=D,
                                                       BD=triton.next_power_of_2(D), BM=BM, **cfg)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, D = x2.shape
        dx = torch.empty_like(x2)
        cfg = launch_cfg("rmsnorm_bwd")
        BM, RB = cfg.pop("BM"), cfg.pop("RB")
        nprog = triton.cdiv(M, BM * RB)
        dwp = torch.empty(max(nprog, 1), D, dtype=torch.float32, device=x2.device)
        if M:
            _rmsnorm_bwd_kernel[(nprog,)](x2, weight, rstd, dy.reshape(M, D).contiguous(), dx, dwp, M, D=D,
                                          BD=triton.next_power_of_2(D), BM=BM, RB=RB, **cfg)
        else:
            dwp.zero_()
        return dx.view(dy.shape), dwp.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (any float dtype), weight [D]: RMSNorm in float32, output in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)
