"""Causal depthwise short convolution (+ optional SiLU) over varlen packed rows, in Triton.

Same contract as `conv.causal_conv1d_varlen` without initial tails: rows are packed [N, D], a
segment never sees the rows of another (the row's position in its segment, `pos`, masks the taps),
and the per-row weight index picks one of G weights (per-memory convolutions).

  forward   z_t = sum_s W[W-1-s] x_{t-s} (s <= pos_t);  y_t = silu(z_t) or z_t
  backward  dz_t = dy_t silu'(z_t)  (z recomputed from x: nothing but x is saved), and
            dW[W-1-s] = sum_t dz_t x_{t-s}   (per block of rows, summed in torch: deterministic)
            dx_t = sum_s W[W-1-s] dz_{t+s}  over rows t+s of t's segment      (a second kernel)

One program per (block of BR rows, block of BD channels); the kernels are memory-bound, the
shifted loads of a tile hit the cache."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton import INTERPRET, launch_cfg  # noqa: F401  (ImportError without Triton)


# Addressing: each program forms int64 scalar base pointers for its first row once; tile offsets
# relative to them are int32 (int64 offset tiles cost registers and integer throughput).
@triton.jit
def _row_tile(pos, N, i_r, BR: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    """-> (r0: first row (int64), o_r: row offsets, cols, row mask, column mask, segment positions)."""
    r0 = i_r.to(tl.int64) * BR
    o_r = tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    m_r = o_r < N - r0
    p = tl.load(pos + r0 + o_r, mask=m_r, other=0)
    return r0, o_r, cols, m_r, cols < D, p


@triton.jit
def _conv_fwd_kernel(x, w, widx, pos, y, N, stride_x, D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
                     BD: tl.constexpr, PER_ROW_W: tl.constexpr, SILU: tl.constexpr):
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, tl.program_id(0), BR, BD, D)
    xb = x + r0 * stride_x
    if PER_ROW_W:
        gi = tl.load(widx + r0 + o_r, mask=m_r, other=0)
        w_row = w + gi[:, None] * (D * W) + cols[None, :] * W
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        m = (m_r & (p >= s))[:, None] & m_d[None, :]
        xs = tl.load(xb + (o_r - s)[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        if PER_ROW_W:
            ws = tl.load(w_row + (W - 1 - s), mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        else:
            ws = tl.load(w + cols * W + (W - 1 - s), mask=m_d, other=0.0).to(tl.float32)[None, :]
        acc += xs.to(tl.float32) * ws
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + r0 * D + o_r[:, None] * D + cols[None, :], acc.to(y.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _conv_bwd_dz_kernel(x, w, widx, pos, dy, dz, dwp, N, stride_x, D: tl.constexpr, W: tl.constexpr,
                        G: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, PER_ROW_W: tl.constexpr,
                        SILU: tl.constexpr):
    """dz = dy * silu'(z) (z recomputed; stored in dy's dtype), and this block's partial
    dW = sum_t dz_t x_{t-s} from the float32 dz."""
    i_r = tl.program_id(0)
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, i_r, BR, BD, D)
    m_rd = m_r[:, None] & m_d[None, :]
    xb = x + r0 * stride_x
    p_rd = r0 * D + o_r[:, None] * D + cols[None, :]
    if PER_ROW_W:
        gi = tl.load(widx + r0 + o_r, mask=m_r, other=0)
        w_row = w + gi[:, None] * (D * W) + cols[None, :] * W
    else:
        w_row = w + cols[None, :] * W
    b_dz = tl.load(dy + p_rd, mask=m_rd, other=0.0).to(tl.float32)
    if SILU:
        z = tl.zeros([BR, BD], dtype=tl.float32)
        for s in tl.static_range(W):
            xs = tl.load(xb + (o_r - s)[:, None] * stride_x + cols[None, :],
                         mask=(m_r & (p >= s))[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            z += xs * tl.load(w_row + (W - 1 - s), mask=m_rd, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        b_dz = b_dz * sig * (1.0 + z * (1.0 - sig))
    tl.store(dz + p_rd, b_dz.to(dz.dtype.element_ty), mask=m_rd)
    for s in tl.static_range(W):
        xs = tl.load(xb + (o_r - s)[:, None] * stride_x + cols[None, :],
                     mask=(m_r & (p >= s))[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        prod = b_dz * xs
        for g in tl.static_range(G):
            if PER_ROW_W:
                part = tl.sum(tl.where((gi == g)[:, None], prod, 0.0), 0)
            else:
                part = tl.sum(prod, 0)
            tl.store(dwp + ((i_r * G + g) * D + cols) * W + (W - 1 - s), part, mask=m_d)


@triton.jit
def _conv_bwd_dz_shared_kernel(x, w, pos, dy, dz, dwp, N, stride_x, D: tl.constexpr, W: tl.constexpr,
                               BR: tl.constexpr, BD: tl.constexpr, RB: tl.constexpr, SILU: tl.constexpr):
    """_conv_bwd_dz_kernel for one weight shared by all rows and W <= 4: each program walks RB row
    tiles, keeps the shifted x tiles of a tile for dW, and accumulates dz * x per tap elementwise,
    reducing over rows once at the end (a reduction per tile made this kernel 4x slower than its
    memory traffic)."""
    i_r = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = cols < D
    o_r = tl.arange(0, BR)
    w0 = tl.load(w + cols * W + (W - 1), mask=m_d, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w + cols * W + (W - 2), mask=m_d & (W > 1), other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w + cols * W + (W - 3), mask=m_d & (W > 2), other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w + cols * W + (W - 4), mask=m_d & (W > 3), other=0.0).to(tl.float32)[None, :]
    acc0 = tl.zeros([BR, BD], dtype=tl.float32)
    acc1 = tl.zeros([BR, BD], dtype=tl.float32)
    acc2 = tl.zeros([BR, BD], dtype=tl.float32)
    acc3 = tl.zeros([BR, BD], dtype=tl.float32)
    for i in range(RB):
        r0 = (i_r.to(tl.int64) * RB + i) * BR
        m_r = o_r < N - r0
        m_rd = m_r[:, None] & m_d[None, :]
        p = tl.load(pos + r0 + o_r, mask=m_r, other=0)
        p_x = x + r0 * stride_x + o_r[:, None] * stride_x + cols[None, :]
        x0 = tl.load(p_x, mask=m_rd, other=0.0).to(tl.float32)
        x1 = tl.load(p_x - stride_x, mask=(m_r & (p >= 1) & (W > 1))[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        x2 = tl.load(p_x - 2 * stride_x, mask=(m_r & (p >= 2) & (W > 2))[:, None] & m_d[None, :],
                     other=0.0).to(tl.float32)
        x3 = tl.load(p_x - 3 * stride_x, mask=(m_r & (p >= 3) & (W > 3))[:, None] & m_d[None, :],
                     other=0.0).to(tl.float32)
        p_rd = r0 * D + o_r[:, None] * D + cols[None, :]
        b_dz = tl.load(dy + p_rd, mask=m_rd, other=0.0).to(tl.float32)
        if SILU:
            z = x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3
            sig = tl.sigmoid(z)
            b_dz = b_dz * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz + p_rd, b_dz.to(dz.dtype.element_ty), mask=m_rd)
        acc0 += b_dz * x0
        acc1 += b_dz * x1
        acc2 += b_dz * x2
        acc3 += b_dz * x3
    p_w = dwp + (i_r * D + cols) * W
    tl.store(p_w + (W - 1), tl.sum(acc0, 0), mask=m_d)
    if W > 1:
        tl.store(p_w + (W - 2), tl.sum(acc1, 0), mask=m_d)
    if W > 2:
        tl.store(p_w + (W - 3), tl.sum(acc2, 0), mask=m_d)
    if W > 3:
        tl.store(p_w + (W - 4), tl.sum(acc3, 0), mask=m_d)


@triton.jit
def _conv_bwd_dx_kernel(w, widx, pos, dz, dx, N, D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
                        BD: tl.constexpr, PER_ROW_W: tl.constexpr):
    """dx_t = sum_s W[W-1-s] dz_{t+s} over the rows t+s of t's segment (which share t's weight)."""
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, tl.program_id(0), BR, BD, D)
    m_rd = m_r[:, None] & m_d[None, :]
    if PER_ROW_W:
        gi = tl.load(widx + r0 + o_r, mask=m_r, other=0)
        w_row = w + gi[:, None] * (D * W) + cols[None, :] * W
    else:
        w_row = w + cols[None, :] * W
    zb = dz + r0 * D
    b_dx = tl.zeros([BR, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        inside = o_r + s < N - r0
        same = m_r & inside & (tl.load(pos + r0 + o_r + s, mask=m_r & inside, other=-1) == p + s)
        b_dz = tl.load(zb + (o_r + s)[:, None] * D + cols[None, :], mask=same[:, None] & m_d[None, :], other=0.0)
        b_dx += b_dz.to(tl.float32) * tl.load(w_row + (W - 1 - s), mask=m_rd, other=0.0).to(tl.float32)
    tl.store(dx + r0 * D + o_r[:, None] * D + cols[None, :], b_dx.to(dx.dtype.element_ty), mask=m_rd)


def _launch_fwd(x, weight, widx, pos, silu: bool):
    N, D = x.shape
    W = weight.shape[-1]
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return y
    cfg = launch_cfg("conv_fwd")
    BR, BD = cfg.pop("BR"), min(cfg.pop("BD"), triton.next_power_of_2(D))
    _conv_fwd_kernel[(triton.cdiv(N, BR), triton.cdiv(D, BD))](
        x, weight, widx if widx is not None else pos, pos, y, N, x.stride(0), D=D, W=W, BR=BR, BD=BD,
        PER_ROW_W=weight.dim() == 3, SILU=silu, **cfg)
    return y


def _launch_bwd(x, weight, widx, pos, dy, silu: bool):
    N, D = x.shape
    W = weight.shape[-1]
    G = weight.shape[0] if weight.dim() == 3 else 1
    dx = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return dx, torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    dz = torch.empty(N, D, dtype=dy.dtype, device=x.device)  # dW is summed from float32 dz in-kernel
    widx = widx if widx is not None else pos
    if weight.dim() == 2 and W <= 4:
        cfg = launch_cfg("conv_bwd_shared")
        BR, BD, RB = cfg.pop("BR"), min(cfg.pop("BD"), triton.next_power_of_2(D)), cfg.pop("RB")
        nb = triton.cdiv(N, BR * RB)
        dwp = torch.empty(nb, G, D, W, dtype=torch.float32, device=x.device)
        _conv_bwd_dz_shared_kernel[(nb, triton.cdiv(D, BD))](
            x, weight, pos, dy, dz, dwp, N, x.stride(0), D=D, W=W, BR=BR, BD=BD, RB=RB, SILU=silu, **cfg)
    else:
        cfg = launch_cfg("conv_bwd")
        BR, BD = cfg.pop("BR"), min(cfg.pop("BD"), triton.next_power_of_2(D))
        nb = triton.cdiv(N, BR)
        dwp = torch.empty(nb, G, D, W, dtype=torch.float32, device=x.device)
        _conv_bwd_dz_kernel[(nb, triton.cdiv(D, BD))](
            x, weight, widx, pos, dy, dz, dwp, N, x.stride(0), D=D, W=W, G=G, BR=BR, BD=BD,
            PER_ROW_W=weight.dim() == 3, SILU=silu, **cfg)
    cfg = launch_cfg("conv_bwd_dx")
    BR, BD = cfg.pop("BR"), min(cfg.pop("BD"), triton.next_power_of_2(D))
    _conv_bwd_dx_kernel[(triton.cdiv(N, BR), triton.cdiv(D, BD))](
        weight, widx, pos, dz, dx, N, D=D, W=W, BR=BR, BD=BD, PER_ROW_W=weight.dim() == 3, **cfg)
    dw = dwp.sum(0)
    return dx, dw.view(weight.shape)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, pos, row_weight_index, silu):
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        y = _launch_fwd(x, weight, row_weight_index, pos, silu)
        ctx.save_for_backward(x, weight, pos, row_weight_index)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, pos, widx = ctx.saved_tensors
        dx, dw = _launch_bwd(x, weight, widx, pos, dy.contiguous(), ctx.silu)
        return dx, dw.to(weight.dtype), None, None, None


def row_positions(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """Position of each packed row in its segment (int32), without a host sync."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=N)
    return (torch.arange(N, device=cu.device) - cu[seg]).to(torch.int32)


def causal_conv1d_varlen_triton(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                                row_weight_index: Optional[torch.Tensor] = None, silu: bool = False,
                                pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, D] (rows may be strided, channels contiguous); weight [D, W] or [G, D, W] with
    row_weight_index [N]. Output in x's dtype; float32 accumulation whatever the weight dtype."""
    if (weight.dim() == 3) != (row_weight_index is not None):
        raise ValueError("a [G, D, W] weight needs row_weight_index (and a [D, W] weight none)")
    pos = row_positions(cu_seqlens, x.shape[0]) if pos is None else pos
    widx = row_weight_index.to(torch.int32).contiguous() if row_weight_index is not None else None
    return ShortConvFunction.apply(x, weight, pos, widx, silu)
