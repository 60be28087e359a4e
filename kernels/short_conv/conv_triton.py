"""Causal depthwise short convolution (+ optional SiLU) over varlen packed rows, in Triton.

Same contract as `conv.causal_conv1d_varlen` without initial tails: rows are packed [N, D], a
segment never sees the rows of another (the row's position in its segment, `pos`, masks the taps),
and the per-row weight index picks one of G weights (per-memory convolutions).

  forward   z_t = sum_s W[W-1-s] x_{t-s} (s <= pos_t);  y_t = silu(z_t) or z_t;
            with NORM, out_t = y_t / sqrt(|y_t|^2 + eps) per group of channels (a head: the q / k
            L2 norm of the scan, fused here so q and k make one round trip through memory less)
  backward  dy_t = r_t (dout_t - out_t <out_t, dout_t>) with NORM (r_t = 1 / norm, recomputed),
            dz_t = dy_t silu'(z_t)  (z recomputed from x: nothing but x is saved), and
            dW[W-1-s] = sum_t dz_t x_{t-s}   (per block of rows, summed in torch: deterministic)
            dx_t = sum_s W[W-1-s] dz_{t+s}  over rows t+s of t's segment      (a second kernel; or,
            for one weight without the norm, the same pass: `_conv_bwd_slide_kernel`, dz never stored)

One program per (block of BR rows, block of CS channels: BD = next power of two >= CS); the kernels
are memory-bound, the shifted loads of a tile hit the cache. x's row stride is rounded down to its
known alignment SA in-kernel (identity at run time): Triton only specialises strides divisible by 16,
and without the hint the k / v slices of the projection output (stride 2056) load 2 bytes at a time."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton import INTERPRET, launch_cfg  # noqa: F401  (ImportError without Triton)
from ..triton.gather_sum import gather_sum
from ..utils import L2NORM_EPS, row_positions


# Addressing: each program forms int64 scalar base pointers for its first row once; tile offsets
# relative to them are int32 (int64 offset tiles cost registers and integer throughput).
@triton.jit
def _cols(BD: tl.constexpr, CS: tl.constexpr, D: tl.constexpr):
    """-> (this program's channels, their mask): CS channels from program_id(1) * CS."""
    o_d = tl.arange(0, BD)
    cols = tl.program_id(1) * CS + o_d
    return cols, (o_d < CS) & (cols < D)


@triton.jit
def _row_tile(pos, N, i_r, BR: tl.constexpr, BD: tl.constexpr, CS: tl.constexpr, D: tl.constexpr):
    """-> (r0: first row (int64), o_r: row offsets, cols, row mask, column mask, segment positions)."""
    r0 = i_r.to(tl.int64) * BR
    o_r = tl.arange(0, BR)
    cols, m_d = _cols(BD, CS, D)
    m_r = o_r < N - r0
    p = tl.load(pos + r0 + o_r, mask=m_r, other=0)
    return r0, o_r, cols, m_r, m_d, p


@triton.jit
def _x_tile(x, xb, src, r0, o_r, s, m_row, cols, m_d, stride_x, GATHER: tl.constexpr):
    """x's rows r0 + o_r - s as float32 ([BR, BD], 0 where m_row is off): the packed rows themselves
    (xb: x's row r0), or with GATHER the source rows src[r] they stand for (the q projection of the
    token a memory's row belongs to: read through the index, never copied into packed rows)."""
    m = m_row[:, None] & m_d[None, :]
    if GATHER:
        rs = tl.load(src + r0 + o_r - s, mask=m_row, other=0)
        return tl.load(x + rs[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.load(xb + (o_r - s)[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _rnorm(y, eps):
    """1 / L2 norm of each row of y ([BR, 1]; masked entries of y are 0)."""
    return (1.0 / tl.sqrt(tl.sum(y * y, 1) + eps))[:, None]


@triton.jit
def _weight_rows(w, widx, r0, o_r, m_r, cols, D: tl.constexpr, W: tl.constexpr, PER_ROW_W: tl.constexpr):
    """-> (pointers to tap 0 of each (row, channel)'s weight: [BR, BD] with per-row weights, [1, BD] for
    one shared weight; the rows' weight indices, or 0)."""
    if PER_ROW_W:
        gi = tl.load(widx + r0 + o_r, mask=m_r, other=0)
        w_row = w + gi[:, None] * (D * W) + cols[None, :] * W
    else:
        gi = 0
        w_row = w + cols[None, :] * W
    return w_row, gi


@triton.jit
def _tap(w_row, j, m_rd, m_d, PER_ROW_W: tl.constexpr):
    """Tap j of the weights (float32): [BR, BD] per-row weights, or one [1, BD] row for all rows
    (masked by the columns only: a [BR, BD] mask would load the shared row once per row)."""
    if PER_ROW_W:
        w = tl.load(w_row + j, mask=m_rd, other=0.0)
    else:
        w = tl.load(w_row + j, mask=m_d[None, :], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _act_bwd(z, dout, eps, SILU: tl.constexpr, NORM: tl.constexpr):
    """dz from the gradient of out = norm(act(z)): through the row L2 norm (NORM), then SiLU."""
    if SILU:
        sig = tl.sigmoid(z)
        y = z * sig
    else:
        y = z
    if NORM:
        r = _rnorm(y, eps)
        out = y * r
        dout = r * (dout - out * tl.sum(out * dout, 1)[:, None])
    if SILU:
        dout = dout * sig * (1.0 + z * (1.0 - sig))
    return dout


@triton.jit
def _conv_fwd_kernel(x, src, w, widx, pos, y, N, stride_x, eps, D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
                     BD: tl.constexpr, CS: tl.constexpr, SA: tl.constexpr, PER_ROW_W: tl.constexpr,
                     SILU: tl.constexpr, NORM: tl.constexpr, GATHER: tl.constexpr):
    stride_x = stride_x // SA * SA
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, tl.program_id(0), BR, BD, CS, D)
    xb = x + r0 * stride_x
    m_rd = m_r[:, None] & m_d[None, :]
    w_row, gi = _weight_rows(w, widx, r0, o_r, m_r, cols, D, W, PER_ROW_W)
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        xs = _x_tile(x, xb, src, r0, o_r, s, m_r & (p >= s), cols, m_d, stride_x, GATHER)
        acc += xs * _tap(w_row, W - 1 - s, m_rd, m_d, PER_ROW_W)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if NORM:
        acc = acc * _rnorm(acc, eps)
    tl.store(y + r0 * D + o_r[:, None] * D + cols[None, :], acc.to(y.dtype.element_ty), mask=m_rd)


@triton.jit
def _conv_bwd_dz_kernel(x, src, w, widx, pos, dy, dz, dwp, N, stride_x, eps, D: tl.constexpr, W: tl.constexpr,
                        G: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, CS: tl.constexpr, SA: tl.constexpr,
                        PER_ROW_W: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr, GATHER: tl.constexpr):
    """dz = the gradient through the norm (NORM) and SiLU of z (recomputed; stored in dy's dtype),
    and this block's partial dW = sum_t dz_t x_{t-s} from the float32 dz."""
    stride_x = stride_x // SA * SA
    i_r = tl.program_id(0)
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, i_r, BR, BD, CS, D)
    m_rd = m_r[:, None] & m_d[None, :]
    xb = x + r0 * stride_x
    p_rd = r0 * D + o_r[:, None] * D + cols[None, :]
    w_row, gi = _weight_rows(w, widx, r0, o_r, m_r, cols, D, W, PER_ROW_W)
    b_dz = tl.load(dy + p_rd, mask=m_rd, other=0.0).to(tl.float32)
    if SILU or NORM:
        z = tl.zeros([BR, BD], dtype=tl.float32)
        for s in tl.static_range(W):
            xs = _x_tile(x, xb, src, r0, o_r, s, m_r & (p >= s), cols, m_d, stride_x, GATHER)
            z += xs * _tap(w_row, W - 1 - s, m_rd, m_d, PER_ROW_W)
        b_dz = _act_bwd(z, b_dz, eps, SILU, NORM)
    tl.store(dz + p_rd, b_dz.to(dz.dtype.element_ty), mask=m_rd)
    for s in tl.static_range(W):
        prod = b_dz * _x_tile(x, xb, src, r0, o_r, s, m_r & (p >= s), cols, m_d, stride_x, GATHER)
        for g in tl.static_range(G):
            if PER_ROW_W:
                part = tl.sum(tl.where((gi == g)[:, None], prod, 0.0), 0)
            else:
                part = tl.sum(prod, 0)
            tl.store(dwp + ((i_r * G + g) * D + cols) * W + (W - 1 - s), part, mask=m_d)


@triton.jit
def _shared_taps(w, cols, m_d, W: tl.constexpr):
    """The one weight's taps as [1, BD] float32 rows, w0 multiplying x_t, w1 x_{t-1}, ... (zero past W)."""
    w0 = tl.load(w + cols * W + (W - 1), mask=m_d, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w + cols * W + (W - 2), mask=m_d & (W > 1), other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w + cols * W + (W - 3), mask=m_d & (W > 2), other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w + cols * W + (W - 4), mask=m_d & (W > 3), other=0.0).to(tl.float32)[None, :]
    return w0, w1, w2, w3


@triton.jit
def _store_shared_dw(p_w, acc0, acc1, acc2, acc3, m_d, W: tl.constexpr):
    """This program's partial dW of the one weight (W <= 4): acc_s ([rows, BD]: dz_t x_{t-s} summed
    elementwise) reduced over its rows, stored at tap W-1-s of p_w (its [BD, W] block)."""
    tl.store(p_w + (W - 1), tl.sum(acc0, 0), mask=m_d)
    if W > 1:
        tl.store(p_w + (W - 2), tl.sum(acc1, 0), mask=m_d)
    if W > 2:
        tl.store(p_w + (W - 3), tl.sum(acc2, 0), mask=m_d)
    if W > 3:
        tl.store(p_w + (W - 4), tl.sum(acc3, 0), mask=m_d)


@triton.jit
def _conv_bwd_dz_shared_kernel(x, src, w, pos, dy, dz, dwp, N, stride_x, eps, D: tl.constexpr, W: tl.constexpr,
                               BR: tl.constexpr, BD: tl.constexpr, CS: tl.constexpr, SA: tl.constexpr,
                               RB: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr, GATHER: tl.constexpr):
    """_conv_bwd_dz_kernel for one weight shared by all rows, W <= 4 and the L2 norm: each program walks RB row
    tiles, keeps the shifted x tiles of a tile for dW, and accumulates dz * x per tap elementwise,
    reducing over rows once at the end (a reduction per tile made this kernel 4x slower than its
    memory traffic)."""
    stride_x = stride_x // SA * SA
    i_r = tl.program_id(0)
    cols, m_d = _cols(BD, CS, D)
    o_r = tl.arange(0, BR)
    w0, w1, w2, w3 = _shared_taps(w, cols, m_d, W)
    acc0 = tl.zeros([BR, BD], dtype=tl.float32)
    acc1 = tl.zeros([BR, BD], dtype=tl.float32)
    acc2 = tl.zeros([BR, BD], dtype=tl.float32)
    acc3 = tl.zeros([BR, BD], dtype=tl.float32)
    for i in range(RB):
        r0 = (i_r.to(tl.int64) * RB + i) * BR
        m_r = o_r < N - r0
        m_rd = m_r[:, None] & m_d[None, :]
        p = tl.load(pos + r0 + o_r, mask=m_r, other=0)
        xb = x + r0 * stride_x
        x0 = _x_tile(x, xb, src, r0, o_r, 0, m_r, cols, m_d, stride_x, GATHER)
        x1 = _x_tile(x, xb, src, r0, o_r, 1, m_r & (p >= 1) & (W > 1), cols, m_d, stride_x, GATHER)
        x2 = _x_tile(x, xb, src, r0, o_r, 2, m_r & (p >= 2) & (W > 2), cols, m_d, stride_x, GATHER)
        x3 = _x_tile(x, xb, src, r0, o_r, 3, m_r & (p >= 3) & (W > 3), cols, m_d, stride_x, GATHER)
        p_rd = r0 * D + o_r[:, None] * D + cols[None, :]
        b_dz = tl.load(dy + p_rd, mask=m_rd, other=0.0).to(tl.float32)
        if SILU or NORM:
            b_dz = _act_bwd(x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3, b_dz, eps, SILU, NORM)
        tl.store(dz + p_rd, b_dz.to(dz.dtype.element_ty), mask=m_rd)
        acc0 += b_dz * x0
        acc1 += b_dz * x1
        acc2 += b_dz * x2
        acc3 += b_dz * x3
    _store_shared_dw(dwp + (i_r * D + cols) * W, acc0, acc1, acc2, acc3, m_d, W)


@triton.jit
def _conv_bwd_dx_kernel(w, widx, pos, dz, dx, N, stride_dx, D: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
                        BD: tl.constexpr, SA: tl.constexpr, PER_ROW_W: tl.constexpr):
    """dx_t = sum_s W[W-1-s] dz_{t+s} over the rows t+s of t's segment (which share t's weight);
    dx may be a column slice of a wider gradient (row stride stride_dx)."""
    stride_dx = stride_dx // SA * SA
    r0, o_r, cols, m_r, m_d, p = _row_tile(pos, N, tl.program_id(0), BR, BD, BD, D)
    m_rd = m_r[:, None] & m_d[None, :]
    w_row, gi = _weight_rows(w, widx, r0, o_r, m_r, cols, D, W, PER_ROW_W)
    zb = dz + r0 * D
    b_dx = tl.zeros([BR, BD], dtype=tl.float32)
    for s in tl.static_range(W):
        inside = o_r + s < N - r0
        same = m_r & inside & (tl.load(pos + r0 + o_r + s, mask=m_r & inside, other=-1) == p + s)
        b_dz = tl.load(zb + (o_r + s)[:, None] * D + cols[None, :], mask=same[:, None] & m_d[None, :], other=0.0)
        b_dx += b_dz.to(tl.float32) * _tap(w_row, W - 1 - s, m_rd, m_d, PER_ROW_W)
    tl.store(dx + r0 * stride_dx + o_r[:, None] * stride_dx + cols[None, :], b_dx.to(dx.dtype.element_ty), mask=m_rd)


@triton.jit
def _slide_rows(t, N, c0, o_c, pos):
    """Row t of each of a program's R chunks (offsets o_c from its first row c0): -> (offsets from c0,
    in-range mask, segment positions; 0 out of range, which reads as a segment start)."""
    o_t = o_c + t
    m_t = (o_t >= -c0) & (o_t < N - c0)
    return o_t, m_t, tl.load(pos + c0 + o_t, mask=m_t, other=0)


@triton.jit
def _conv_bwd_slide_kernel(x, src, w, pos, dy, dx, dwp, N, stride_x, stride_dx, eps, D: tl.constexpr,
                           W: tl.constexpr, R: tl.constexpr, L: tl.constexpr, BD: tl.constexpr, CS: tl.constexpr,
                           SA: tl.constexpr, SAX: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr,
                           GATHER: tl.constexpr):
    """The whole backward for one weight shared by all rows, W <= 4, in one pass (dz never leaves
    registers): walking R chunks of L rows as the forward does, step t recomputes z_t from the x
    window, forms dz_t, adds dz_t x_{t-s} to this program's dW, and emits dx_{t-3} =
    sum_s W[W-1-s] dz_{t-3+s} from the window of the last four dz (dz_{t-3+s} counts if row t-3+s
    is s or more rows into its segment). Steps t < 0 fill the x window, steps t >= L the dz window."""
    tl.static_assert(not NORM, "the sliding backward has no L2 norm (a head would span programs' tiles)")
    stride_x = stride_x // SA * SA
    stride_dx = stride_dx // SAX * SAX
    i_r = tl.program_id(0)
    cols, m_d = _cols(BD, CS, D)
    c0 = i_r.to(tl.int64) * (R * L)
    o_c = tl.arange(0, R) * L
    xb, dyb, dxb = x + c0 * stride_x, dy + c0 * D + cols[None, :], dx + c0 * stride_dx + cols[None, :]
    w0, w1, w2, w3 = _shared_taps(w, cols, m_d, W)
    x0 = tl.zeros([R, BD], dtype=tl.float32)
    x1 = tl.zeros([R, BD], dtype=tl.float32)
    x2 = tl.zeros([R, BD], dtype=tl.float32)
    e0 = tl.zeros([R, BD], dtype=tl.float32)  # dz_t, dz_{t-1}, dz_{t-2}, dz_{t-3}
    e1 = tl.zeros([R, BD], dtype=tl.float32)
    e2 = tl.zeros([R, BD], dtype=tl.float32)
    p0 = tl.zeros([R], dtype=tl.int32)  # positions of rows t, t-1, t-2
    p1 = tl.zeros([R], dtype=tl.int32)
    acc0 = tl.zeros([R, BD], dtype=tl.float32)
    acc1 = tl.zeros([R, BD], dtype=tl.float32)
    acc2 = tl.zeros([R, BD], dtype=tl.float32)
    acc3 = tl.zeros([R, BD], dtype=tl.float32)
    for t in range(1 - W, L + 3):
        o_t, m_t, p = _slide_rows(t, N, c0, o_c, pos)
        m_td = m_t[:, None] & m_d[None, :]
        keep = (p > 0)[:, None]
        x3 = tl.where(keep, x2, 0.0)
        x2 = tl.where(keep, x1, 0.0)
        x1 = tl.where(keep, x0, 0.0)
        x0 = _x_tile(x, xb, src, c0, o_t, 0, m_t, cols, m_d, stride_x, GATHER)
        b_dz = tl.load(dyb + o_t[:, None] * D, mask=m_td & (o_t >= o_c)[:, None], other=0.0).to(tl.float32)
        if SILU or NORM:
            b_dz = _act_bwd(x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3, b_dz, eps, SILU, NORM)
        e3, e2, e1, e0 = e2, e1, e0, b_dz
        p2, p1, p0 = p1, p0, p
        dz_w = tl.where((o_t - o_c < L)[:, None], b_dz, 0.0)  # rows past the chunk feed dx only
        acc0 += dz_w * x0
        acc1 += dz_w * x1
        acc2 += dz_w * x2
        acc3 += dz_w * x3
        b_dx = (e3 * w0 + tl.where((p2 >= 1)[:, None], e2, 0.0) * w1 + tl.where((p1 >= 2)[:, None], e1, 0.0) * w2
                + tl.where((p0 >= 3)[:, None], e0, 0.0) * w3)
        o_e = o_t - 3
        m_e = (o_e >= -c0) & (o_e < N - c0) & (o_e >= o_c)
        tl.store(dxb + o_e[:, None] * stride_dx, b_dx.to(dx.dtype.element_ty), mask=m_e[:, None] & m_d[None, :])
    _store_shared_dw(dwp + (i_r * D + cols) * W, acc0, acc1, acc2, acc3, m_d, W)


def _blocks(name: str, D: int, group: int) -> tuple[dict, int, int, int]:
    """-> (the rest of the launch config, BR, BD, CS) of conv kernel `name`. With an L2-norm group a
    program covers one group (BD = next_pow2(group)), with the launch config of `name`_norm."""
    if group:
        cfg = launch_cfg(name + "_norm")
        cfg.pop("BD", None)  # set by the group
        return cfg, cfg.pop("BR"), triton.next_power_of_2(group), group
    cfg = launch_cfg(name)
    BR, BD = cfg.pop("BR"), min(cfg.pop("BD"), triton.next_power_of_2(D))
    return cfg, BR, BD, BD


def _slides(weight: torch.Tensor, group: int) -> bool:
    """The one-pass sliding-window backward: one weight for all rows, at most 4 taps, no L2 norm.
    (H200, 2026-11-27, bench_conv.py: 0.50 vs 0.57 ms for the v slice's backward. A sliding forward
    was slower than the tile kernel, 0.105-0.112 vs 0.095 ms, and so was the sliding backward with the
    norm, 1.42 vs 1.37 ms for the layer's q / k / v step: both dropped.)"""
    return weight.dim() == 2 and weight.shape[-1] <= 4 and not group


def _stride_alignment(x: torch.Tensor) -> int:
    """The largest power of two (at most 16 bytes' worth of elements) dividing x's row stride."""
    return math.gcd(x.stride(0), 16 // x.element_size()) if x.shape[0] > 1 else 1


def _launch_fwd(x, weight, widx, pos, silu: bool, group: int, src=None):
    """-> y [N, D] for the N packed rows of `pos`: x's rows, or with src the rows x[src]."""
    N, D = pos.shape[0], x.shape[1]
    W = weight.shape[-1]
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return y
    cfg, BR, BD, CS = _blocks("conv_fwd", D, group)
    _conv_fwd_kernel[(triton.cdiv(N, BR), triton.cdiv(D, CS))](
        x, src if src is not None else pos, weight, widx if widx is not None else pos, pos, y, N, x.stride(0),
        L2NORM_EPS, D=D, W=W, BR=BR, BD=BD, CS=CS, SA=_stride_alignment(x), PER_ROW_W=weight.dim() == 3, SILU=silu,
        NORM=group > 0, GATHER=src is not None, **cfg)
    return y


def _launch_bwd(x, weight, widx, pos, dy, silu: bool, group: int, dx: torch.Tensor, src=None):
    """Writes the packed rows' gradient into dx ([N, D], rows may be strided); returns dW (float32).
    src: x's rows are read through it, as in _launch_fwd."""
    N, D = pos.shape[0], x.shape[1]
    W = weight.shape[-1]
    G = weight.shape[0] if weight.dim() == 3 else 1
    if N == 0 or D == 0:
        return torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    common = dict(D=D, W=W, SA=_stride_alignment(x), SILU=silu, NORM=group > 0, GATHER=src is not None)
    src = src if src is not None else pos
    if _slides(weight, group):
        cfg = launch_cfg("conv_bwd_slide")
        R, L, BD = cfg.pop("R"), cfg.pop("L"), min(cfg.pop("BD"), triton.next_power_of_2(D))
        CS = BD
        nb = triton.cdiv(N, R * L)
        dwp = torch.empty(nb, D, W, dtype=torch.float32, device=x.device)
        _conv_bwd_slide_kernel[(nb, triton.cdiv(D, CS))](
            x, src, weight, pos, dy, dx, dwp, N, x.stride(0), dx.stride(0), L2NORM_EPS, R=R, L=L, BD=BD, CS=CS,
            SAX=_stride_alignment(dx), **common, **cfg)
        return dwp.sum(0).view(weight.shape)
    dz = torch.empty(N, D, dtype=dy.dtype, device=x.device)  # dW is summed from float32 dz in-kernel
    widx = widx if widx is not None else pos
    if weight.dim() == 2 and W <= 4 and group:  # one weight with the L2 norm (the q / k convs)
        cfg, BR, BD, CS = _blocks("conv_bwd_shared", D, group)
        RB = cfg.pop("RB")
        nb = triton.cdiv(N, BR * RB)
        dwp = torch.empty(nb, G, D, W, dtype=torch.float32, device=x.device)
        _conv_bwd_dz_shared_kernel[(nb, triton.cdiv(D, CS))](
            x, src, weight, pos, dy, dz, dwp, N, x.stride(0), L2NORM_EPS, BR=BR, BD=BD, CS=CS, RB=RB, **common, **cfg)
    else:
        cfg, BR, BD, CS = _blocks("conv_bwd", D, group)
        nb = triton.cdiv(N, BR)
        dwp = torch.empty(nb, G, D, W, dtype=torch.float32, device=x.device)
        _conv_bwd_dz_kernel[(nb, triton.cdiv(D, CS))](
            x, src, weight, widx, pos, dy, dz, dwp, N, x.stride(0), L2NORM_EPS, G=G, BR=BR, BD=BD, CS=CS,
            PER_ROW_W=weight.dim() == 3, **common, **cfg)
    cfg, BR, BD, _ = _blocks("conv_bwd_dx", D, 0)
    _conv_bwd_dx_kernel[(triton.cdiv(N, BR), triton.cdiv(D, BD))](
        weight, widx, pos, dz, dx, N, dx.stride(0), D=D, W=W, BR=BR, BD=BD, SA=_stride_alignment(dx),
        PER_ROW_W=weight.dim() == 3, **cfg)
    return dwp.sum(0).view(weight.shape)


class ShortConvFunction(torch.autograd.Function):
    """Column blocks of rows [N, D], from column 0, each through its own conv (+ SiLU, + L2 norm of
    its groups of `groups[i]` channels if non-zero), the columns after them passed through as a
    copy: the k / v / beta / decay columns of the projection output take ONE autograd node, whose
    backward writes the whole input gradient into one buffer (a split's backward would concatenate
    the pieces: one more pass over them). Outputs: (y_1, ..., y_n, rest).
    With src (and slot_row): rows are source rows, packed row i reads rows[src[i]] (no packed copy
    is made or saved); the backward sums each source row's packed-row gradients in slot_row order
    (the packing's own backward: deterministic)."""

    @staticmethod
    def forward(ctx, rows, pos, row_weight_index, silu, groups, src, slot_row, *weights):
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        weights = [w.contiguous() for w in weights]
        ys, c0 = [], 0
        for w, group in zip(weights, groups):
            ys.append(_launch_fwd(rows[:, c0:c0 + w.shape[-2]], w, row_weight_index, pos, silu, group, src))
            c0 += w.shape[-2]
        ctx.save_for_backward(rows, pos, row_weight_index, src, slot_row, *weights)
        ctx.silu, ctx.groups = silu, groups
        return (*ys, rows[:, c0:].clone() if src is None else rows.new_empty(pos.shape[0], 0))

    @staticmethod
    def backward(ctx, *grads):
        rows, pos, widx, src, slot_row, *weights = ctx.saved_tensors
        drows = torch.empty(pos.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
        dws, c0 = [], 0
        for w, group, dy in zip(weights, ctx.groups, grads):  # unused outputs get zero gradients (autograd)
            C = w.shape[-2]
            dws.append(_launch_bwd(rows[:, c0:c0 + C], w, widx, pos, dy.contiguous(), ctx.silu, group,
                                   drows[:, c0:c0 + C], src).to(w.dtype))
            c0 += C
        if src is None:
            drows[:, c0:] = grads[-1]
        else:
            drows = gather_sum(drows, slot_row)
        return (drows, None, None, None, None, None, None, *dws)


def causal_conv1d_varlen_triton(rows: torch.Tensor, weights: list, cu_seqlens: torch.Tensor,
                                row_weight_index: Optional[torch.Tensor] = None, silu: bool = False,
                                pos: Optional[torch.Tensor] = None, l2norm_groups: Optional[list] = None,
                                gather: Optional[tuple] = None):
    """rows [N, D] (rows may be strided, channels contiguous); weights: [C_i, W] or [G, C_i, W] with
    row_weight_index [N], for consecutive column blocks from column 0 (sum C_i <= D);
    l2norm_groups[i]: L2-normalise block i's output per group of that many channels (a head), or
    None. gather (row_source [N], slot_row [T, R]): rows are T source rows and packed row i is
    rows[row_source[i]]; the blocks must cover all columns. -> ([y_i [N, C_i] in rows' dtype],
    rows[:, sum C_i:] as a copy, empty with gather); float32 accumulation whatever the weight dtype.
    Arguments as checked by conv.causal_conv1d_varlen_split."""
    groups = l2norm_groups if l2norm_groups is not None else [None] * len(weights)
    src, slot_row = gather if gather is not None else (None, None)
    N = src.numel() if src is not None else rows.shape[0]
    pos = row_positions(cu_seqlens, N) if pos is None else pos
    widx = row_weight_index.to(torch.int32).contiguous() if row_weight_index is not None else None
    *ys, rest = ShortConvFunction.apply(rows, pos, widx, silu, tuple(g or 0 for g in groups),
                                        src.contiguous() if src is not None else None,
                                        slot_row.contiguous() if slot_row is not None else None, *weights)
    return ys, rest
