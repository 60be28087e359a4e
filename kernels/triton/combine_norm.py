"""The end of the memory layer in one kernel each way: the weighted sum of each token's memory
rows (the inverse of the memory-major packing), per-head RMSNorm, and the swish output gate.

    o_n   = sum_r w[n, r] rows[slot_row[n, r]]                 (float32, per head h)
    y_n   = o_n * rstd_n * weight * silu(gate_n)               rstd_n = 1 / sqrt(mean(o_n^2) + eps)

Backward (o recomputed from the rows: nothing [N, R, H*V]-sized is stored):
    dgate = dy * o rstd weight * silu'(gate);   do_hat = dy * weight * silu(gate)
    do    = rstd (do_hat - o_hat mean(do_hat o_hat))
    drows[slot_row[n, r]] = w[n, r] do_n   (each row is the slot of exactly one token: no atomics)
    dw[n, r] = <do_n, rows[slot_row[n, r]]>  (per head, summed over heads in torch)
    dweight  = sum_n dy * o_hat * silu(gate)  (per block of tokens, summed in torch)
The reference (CPU, float64 tests) is `megamom.model.dispatch.combine` + `GatedRMSNorm`."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _combined(rows, slot_row, slot_w, N, i_n, i_h, H: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
              BN: tl.constexpr, BV: tl.constexpr):
    """The tile of tokens [i_n * BN, +BN) x head i_h: (tokens, value offsets, token mask, tile mask,
    columns, o = sum_r w[n, r] rows[slot_row[n, r]] in float32 [BN, BV])."""
    toks = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    o_v = tl.arange(0, BV)
    m_n = toks < N
    m = m_n[:, None] & (o_v < V)[None, :]
    col = i_h * V + o_v[None, :]
    b_o = tl.zeros([BN, BV], dtype=tl.float32)
    for r in tl.static_range(R):
        src = tl.load(slot_row + toks * R + r, mask=m_n, other=0).to(tl.int64)
        wr = tl.load(slot_w + toks * R + r, mask=m_n, other=0.0).to(tl.float32)
        b_o += wr[:, None] * tl.load(rows + src[:, None] * (H * V) + col, mask=m, other=0.0).to(tl.float32)
    return toks, o_v, m_n, m, col, b_o


@triton.jit
def _combine_norm_fwd_kernel(rows, slot_row, slot_w, gate, weight, y, rstd, N, eps,
                             H: tl.constexpr, V: tl.constexpr, R: tl.constexpr, BN: tl.constexpr,
                             BV: tl.constexpr, HAS_GATE: tl.constexpr):
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    toks, o_v, m_n, m, col, b_o = _combined(rows, slot_row, slot_w, N, i_n, i_h, H, V, R, BN, BV)
    b_r = 1.0 / tl.sqrt(tl.sum(b_o * b_o, 1) / V + eps)
    b_y = b_o * b_r[:, None] * tl.load(weight + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        b_g = tl.load(gate + toks[:, None] * (H * V) + col, mask=m, other=0.0).to(tl.float32)
        b_y = b_y * b_g * tl.sigmoid(b_g)
    tl.store(y + toks[:, None] * (H * V) + col, b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + toks * H + i_h, b_r, mask=m_n)


@triton.jit
def _combine_norm_bwd_kernel(rows, slot_row, slot_w, gate, weight, rstd, dy, drows, dslot_w, dgate, dweight_p,
                             N, H: tl.constexpr, V: tl.constexpr, R: tl.constexpr, BN: tl.constexpr,
                             BV: tl.constexpr, HAS_GATE: tl.constexpr):
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    toks, o_v, m_n, m, col, b_o = _combined(rows, slot_row, slot_w, N, i_n, i_h, H, V, R, BN, BV)
    b_r = tl.load(rstd + toks * H + i_h, mask=m_n, other=0.0)
    b_xh = b_o * b_r[:, None]
    b_wt = tl.load(weight + o_v, mask=o_v < V, other=0.0).to(tl.float32)[None, :]
    b_dy = tl.load(dy + toks[:, None] * (H * V) + col, mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        b_g = tl.load(gate + toks[:, None] * (H * V) + col, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(b_g)
        b_sg = b_g * sig
        b_dg = b_dy * b_xh * b_wt * sig * (1.0 + b_g * (1.0 - sig))
        tl.store(dgate + toks[:, None] * (H * V) + col, b_dg.to(dgate.dtype.element_ty), mask=m)
        b_dy = b_dy * b_sg
    tl.store(dweight_p + (i_n * H + i_h) * V + o_v, tl.sum(b_dy * b_xh, 0), mask=o_v < V)
    b_dxh = b_dy * b_wt
    b_do = b_r[:, None] * (b_dxh - b_xh * (tl.sum(b_dxh * b_xh, 1) / V)[:, None])
    for r in tl.static_range(R):
        src = tl.load(slot_row + toks * R + r, mask=m_n, other=0).to(tl.int64)
        wr = tl.load(slot_w + toks * R + r, mask=m_n, other=0.0).to(tl.float32)
        b_row = tl.load(rows + src[:, None] * (H * V) + col, mask=m, other=0.0).to(tl.float32)
        tl.store(dslot_w + (toks * H + i_h) * R + r, tl.sum(b_do * b_row, 1), mask=m_n)
        tl.store(drows + src[:, None] * (H * V) + col, (wr[:, None] * b_do).to(drows.dtype.element_ty), mask=m)


class CombineNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, slot_row, slot_w, gate, weight, eps, num_heads):
        A, HV = rows.shape
        N, R = slot_row.shape
        H = num_heads
        V = HV // H
        rows = rows.contiguous()
        gate = gate.contiguous() if gate is not None else None
        y = torch.empty(N, HV, dtype=rows.dtype, device=rows.device)
        rstd = torch.empty(N, H, dtype=torch.float32, device=rows.device)
        cfg = launch_cfg("combine_norm")
        BN = cfg.pop("BN")
        if N:
            _combine_norm_fwd_kernel[(triton.cdiv(N, BN), H)](
                rows, slot_row, slot_w, gate if gate is not None else rows, weight, y, rstd, N, eps,
                H=H, V=V, R=R, BN=BN, BV=triton.next_power_of_2(V), HAS_GATE=gate is not None, **cfg)
        ctx.save_for_backward(rows, slot_row, slot_w, gate, weight, rstd)
        ctx.shape = (N, R, H, V)
        return y

    @staticmethod
    def backward(ctx, dy):
        rows, slot_row, slot_w, gate, weight, rstd = ctx.saved_tensors
        N, R, H, V = ctx.shape
        drows = torch.empty_like(rows)  # every row is written: slot_row is a permutation of the rows
        dslot = torch.empty(N, H, R, dtype=torch.float32, device=rows.device)
        dgate = torch.empty_like(gate) if gate is not None else None
        cfg = launch_cfg("combine_norm")
        BN = cfg.pop("BN")
        nb = triton.cdiv(N, BN)
        dweight_p = torch.empty(nb, H, V, dtype=torch.float32, device=rows.device)
        if N:
            _combine_norm_bwd_kernel[(nb, H)](
                rows, slot_row, slot_w, gate if gate is not None else rows, weight, rstd, dy.contiguous(), drows,
                dslot, dgate if gate is not None else drows, dweight_p, N, H=H, V=V, R=R, BN=BN,
                BV=triton.next_power_of_2(V), HAS_GATE=gate is not None, **cfg)
        dweight = dweight_p.sum((0, 1)).to(weight.dtype)
        return drows, None, dslot.sum(1).to(slot_w.dtype), dgate, dweight, None, None


def combine_gated_rmsnorm(rows: torch.Tensor, slot_row: torch.Tensor, slot_w: torch.Tensor,
                          gate: Optional[torch.Tensor], weight: torch.Tensor, eps: float, num_heads: int):
    """rows [A, H*V] (packed memory outputs); slot_row [N, R] (a permutation of the A rows);
    slot_w [N, R] float32; gate [N, H*V] or None; weight [V]. Returns [N, H*V] in rows' dtype."""
    return CombineNormFunction.apply(rows, slot_row.contiguous(), slot_w.float().contiguous(), gate, weight, eps,
                                     num_heads)
