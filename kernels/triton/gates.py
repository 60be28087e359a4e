"""The memory layer's per-head gates in one kernel each way (float32 out):

    beta = sigmoid(b)                                  (delta rules' write strength)
    g    = -exp(A_log) softplus(a + dt_bias)          (scalar log-decay, Mamba2 / Gated DeltaNet)

from the narrow projection's rows [A, beta | decay] (either part may be absent). Backward:

    db = dbeta beta (1 - beta);   da = ddt_bias_t = dg (-exp(A_log) sigmoid(a + dt_bias));   dA_log_t = dg g

with dA_log and ddt_bias summed over rows per block of rows, the blocks summed in torch (deterministic).
The reference is `MemoryMixer._gates` (torch): about 14 small kernels a layer forward and backward
(casts, sigmoid, exp, softplus, products, the splits' gradient assembly and two reductions) over
[A, H] arrays of a few hundred KB, each a few microseconds of launch."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _softplus_sigmoid(x):
    """-> (softplus(x), sigmoid(x)) in float32 = max(x, 0) + log1p(exp(-|x|)), with log1p(u) as
    log(w) u / (w - 1), w = 1 + u (exact to rounding for any u >= 0, where log(1 + u) alone loses
    digits once u is small: 5.8e-4 relative at x = -9.2; dt_bias starts in [-6.9, -2.3])."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    sig = tl.where(x >= 0, 1.0 / (1.0 + u), u / (1.0 + u))
    return tl.maximum(x, 0.0) + log1p_u, sig


@triton.jit
def _gates_fwd_kernel(rows, A_log, dt_bias, g, beta, N, stride, H: tl.constexpr, HP: tl.constexpr,
                      BM: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DECAY: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    o_h = tl.arange(0, HP)
    m_h = o_h < H
    m = (o_m < N - r0)[:, None] & m_h[None, :]
    p_in = rows + r0 * stride + o_m[:, None] * stride + o_h[None, :]
    p_out = r0 * H + o_m[:, None] * H + o_h[None, :]
    if HAS_BETA:
        b = tl.load(p_in, mask=m, other=0.0).to(tl.float32)
        tl.store(beta + p_out, tl.sigmoid(b), mask=m)
        p_in += H
    if HAS_DECAY:
        a = tl.load(p_in, mask=m, other=0.0).to(tl.float32)
        x = a + tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        sp, _ = _softplus_sigmoid(x)
        tl.store(g + p_out, -tl.exp(tl.load(A_log + o_h, mask=m_h, other=0.0).to(tl.float32))[None, :] * sp, mask=m)


@triton.jit
def _gates_bwd_kernel(rows, A_log, dt_bias, dg, dbeta, drows, partial, N, stride, stride_d, H: tl.constexpr,
                      HP: tl.constexpr, BM: tl.constexpr, RB: tl.constexpr, HAS_BETA: tl.constexpr,
                      HAS_DECAY: tl.constexpr):
    """One program per RB blocks of BM rows: their row gradients, and its partial sums of dA_log and
    ddt_bias at partial[pid, 0:H] and [pid, H:2H]."""
    i_p = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_h = tl.arange(0, HP)
    m_h = o_h < H
    if HAS_DECAY:
        w = -tl.exp(tl.load(A_log + o_h, mask=m_h, other=0.0).to(tl.float32))[None, :]
        bias = tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    acc_A = tl.zeros([BM, HP], dtype=tl.float32)
    acc_dt = tl.zeros([BM, HP], dtype=tl.float32)
    for i in range(RB):
        r0 = (i_p.to(tl.int64) * RB + i) * BM
        m = (o_m < N - r0)[:, None] & m_h[None, :]
        p_in = rows + r0 * stride + o_m[:, None] * stride + o_h[None, :]
        p_d = drows + r0 * stride_d + o_m[:, None] * stride_d + o_h[None, :]
        p_g = r0 * H + o_m[:, None] * H + o_h[None, :]
        if HAS_BETA:
            bt = tl.sigmoid(tl.load(p_in, mask=m, other=0.0).to(tl.float32))
            d = tl.load(dbeta + p_g, mask=m, other=0.0) * bt * (1.0 - bt)
            tl.store(p_d, d.to(drows.dtype.element_ty), mask=m)
            p_in += H
            p_d += H
        if HAS_DECAY:
            x = tl.load(p_in, mask=m, other=0.0).to(tl.float32) + bias
            sp, sig = _softplus_sigmoid(x)
            b_dg = tl.load(dg + p_g, mask=m, other=0.0)
            da = b_dg * w * sig
            tl.store(p_d, da.to(drows.dtype.element_ty), mask=m)
            acc_dt += tl.where(m, da, 0.0)
            acc_A += tl.where(m, b_dg * w * sp, 0.0)
    if HAS_DECAY:
        tl.store(partial + i_p * (2 * H) + o_h, tl.sum(acc_A, 0), mask=m_h)
        tl.store(partial + i_p * (2 * H) + H + o_h, tl.sum(acc_dt, 0), mask=m_h)


class GatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, A_log, dt_bias, has_beta, H):
        N = rows.shape[0]
        has_decay = A_log is not None
        g = torch.empty(N, H, dtype=torch.float32, device=rows.device) if has_decay else None
        beta = torch.empty(N, H, dtype=torch.float32, device=rows.device) if has_beta else None
        cfg = launch_cfg("gates_fwd")
        BM = cfg.pop("BM")
        if N:
            _gates_fwd_kernel[(triton.cdiv(N, BM),)](
                rows, A_log if has_decay else rows, dt_bias if has_decay else rows, g if has_decay else rows,
                beta if has_beta else rows, N, rows.stride(0), H=H, HP=triton.next_power_of_2(H), BM=BM,
                HAS_BETA=has_beta, HAS_DECAY=has_decay, **cfg)
        ctx.save_for_backward(rows, A_log, dt_bias)
        ctx.has_beta, ctx.H = has_beta, H
        ctx.set_materialize_grads(False)
        return g, beta

    @staticmethod
    def backward(ctx, dg, dbeta):
        rows, A_log, dt_bias = ctx.saved_tensors
        has_beta, H = ctx.has_beta, ctx.H
        has_decay = A_log is not None
        N = rows.shape[0]
        # a gate without gradient (unused) is a zero gradient: rows' columns must still be written
        if has_decay and dg is None:
            dg = torch.zeros(N, H, dtype=torch.float32, device=rows.device)
        if has_beta and dbeta is None:
            dbeta = torch.zeros(N, H, dtype=torch.float32, device=rows.device)
        drows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        cfg = launch_cfg("gates_bwd")
        BM, RB = cfg.pop("BM"), cfg.pop("RB")
        nprog = max(triton.cdiv(N, BM * RB), 1)
        partial = torch.zeros(nprog, 2 * H, dtype=torch.float32, device=rows.device) if has_decay else None
        if N:
            _gates_bwd_kernel[(nprog,)](
                rows, A_log if has_decay else rows, dt_bias if has_decay else rows,
                dg.contiguous() if has_decay else rows, dbeta.contiguous() if has_beta else rows, drows,
                partial if has_decay else rows, N, rows.stride(0), drows.stride(0), H=H,
                HP=triton.next_power_of_2(H), BM=BM, RB=RB, HAS_BETA=has_beta, HAS_DECAY=has_decay, **cfg)
        dA = ddt = None
        if has_decay:
            sums = partial.sum(0)
            dA, ddt = sums[:H].to(A_log.dtype), sums[H:].to(dt_bias.dtype)
        return drows, dA, ddt, None, None


def gates_fused(rows: torch.Tensor, num_heads: int, has_beta: bool, A_log: Optional[torch.Tensor] = None,
                dt_bias: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """rows [N, beta (H, if has_beta) | decay (H, with A_log and dt_bias)] (columns contiguous) ->
    (g [N, H] or None, beta [N, H] or None), float32."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    expect = num_heads * (int(has_beta) + int(A_log is not None))
    if rows.shape[1] != expect:
        raise ValueError(f"gates_fused: rows have {rows.shape[1]} columns, expected {expect}")
    return GatesFunction.apply(rows, A_log, dt_bias, has_beta, num_heads)
