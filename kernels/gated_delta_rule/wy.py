"""The WY representation of the delta rules' chunks [_prep_kernel], per (chunk, head): G = in-chunk
cumulative log-decay, L = tril_strict(beta K K^T * E), X = (I + L)^-1 by in-register block doubling,
w = X (beta exp(G) K) and u = X (beta V); with the chunk's incoming state S the corrected values are
vn = u - w S (chunk_h.py). Its backward is `_bwd_wy_kernel` (chunk_bwd.py). Additive rules
(DELTA=False) have no WY factors: vn = v."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_index import _chunk_coords


@triton.jit
def _prep_kernel(k, v, beta, g, G, Ainv, w, u, cu, cidx,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, LOG2_BT: tl.constexpr, USE_G: tl.constexpr, COMPUTE_A: tl.constexpr,
                 INV_PREC: tl.constexpr, STORE_U: tl.constexpr):
    """One program per (chunk, head). COMPUTE_A: in-chunk cumsum of g -> G, L, X = (I+L)^-1 (stored
    in Ainv's dtype, [T, H, BT] rows); else X and G are loaded (backward recompute). Then w, and u
    if STORE_U (a backward that has the forward's chunk states needs no u)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    s_t = t0 * H + i_h
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    r = o_t[:, None]
    c = o_t[None, :]

    b_b = tl.load(beta + s_t + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    if USE_G:
        if COMPUTE_A:
            b_g = tl.load(g + s_t + o_t * H, mask=m_t, other=0.0).to(tl.float32)
            b_G = tl.cumsum(b_g, 0)
            tl.store(G + s_t + o_t * H, b_G, mask=m_t)
        else:
            b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
        b_bg = b_b * tl.exp(b_G)
    else:
        b_bg = b_b

    kb = k + s_t * K
    p_X = Ainv + s_t * BT + r * (H * BT) + c
    if COMPUTE_A:
        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_k = tl.load(kb + r * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_kt = tl.load(kb + c * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            b_A += tl.dot(b_k, b_kt, input_precision=INV_PREC)
        b_A = b_A * b_b[:, None]
        if USE_G:
            b_A = b_A * tl.exp(tl.where((r > c) & m_t[:, None] & m_t[None, :], b_G[:, None] - b_G[None, :], 0.0))
        b_L = tl.where(r > c, b_A, 0.0)
        # (I + L)^-1 by doubling: with X_b the inverse of the b x b diagonal blocks,
        # X_2b = X_b - X_b L_b X_b where L_b keeps L's blocks below the b-blocks inside 2b-blocks.
        b_X = tl.where(r == c, 1.0, 0.0)
        for s in tl.static_range(LOG2_BT):
            bs = 1 << s
            band = ((r // (2 * bs)) == (c // (2 * bs))) & ((r // bs) != (c // bs))
            b_X = b_X - tl.dot(b_X, tl.dot(tl.where(band, b_L, 0.0), b_X, input_precision=INV_PREC),
                               input_precision=INV_PREC)
        tl.store(p_X, b_X.to(Ainv.dtype.element_ty), mask=m_t[:, None])
    else:
        b_X = tl.load(p_X, mask=m_t[:, None], other=0.0).to(tl.float32)

    dt = k.dtype.element_ty
    b_Xd = b_X.to(dt)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(kb + r * (H * K) + o_k[None, :], mask=m_tk, other=0.0)
        b_w = tl.dot(b_Xd, (b_k * b_bg[:, None]).to(dt))
        tl.store(w + s_t * K + r * (H * K) + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_tk)
    if STORE_U:
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            b_v = tl.load(v + s_t * V + r * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
            b_u = tl.dot(b_Xd, (b_v * b_b[:, None]).to(dt))
            tl.store(u + s_t * V + r * (H * V) + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)


def _inv_prec(dtype: torch.dtype) -> str:
    # The (I+L)^-1 doubling and beta K K^T run on float32 tiles; tf32x3 keeps float32 accuracy for
    # float32 inputs; with 16-bit inputs the results are rounded to 16 bits anyway.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _wy_lowp(dtype: torch.dtype) -> bool:
    # bf16 inputs: the WY backward's products on bf16 operands (float32 accumulation), as fla's; the
    # nested X^T (dX X^T) also rounds its float32 intermediate to bf16. Measured
    # on an H200 (2026-11-26): 1.5% off the MoM-shaped scan's forward + backward; end-to-end errors vs
    # float64 unchanged (K = V = 256: dk 3.33e-3 vs 3.31e-3, dbeta 3.19e-3 vs 3.08e-3 with tf32 products).
    return dtype == torch.bfloat16


def _ainv_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 inputs: X = (I + L)^-1 enters only bf16 products after its float32 construction (w, u
    # and the LOWP WY backward), so storing it in bf16 rounds nothing further and halves it.
    return dtype if _wy_lowp(dtype) else torch.float32
