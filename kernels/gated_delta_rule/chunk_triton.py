"""Chunked gated delta rule (and the delta rule, scalar decay, linear attention) in Triton:
forward and backward over varlen-packed segments, one launch set for all segments.

Notation per chunk of C tokens (C = BT = 64 by default), all quantities of one head: G = in-chunk
cumulative log-decay (float32), gl = G at the chunk's last valid token, Q = scale * q,
E_ij = exp(G_i - G_j) (j <= i), S = state at the chunk start ([K, V], float32 in registers).

  forward   L = tril_strict(beta K K^T * E);  X = (I + L)^-1 (in-register block doubling)
            w = X (beta exp(G) K),  u = X (beta V)                      [_prep_kernel]
            vn = u - w S;  S <- exp(gl) S + K^T (exp(gl - G) vn)         [_fwd_h_kernel]
            O = exp(G) Q S + (Q K^T * E)_causal vn                       [_fwd_o_kernel]
  backward  recompute w, u, S, vn (or take S, vn and w from the forward: keep); dv_local = (Q K^T * E)_causal^T dO,
            dOV = dO vn^T                                                 [_bwd_local_kernel]
            reverse over chunks: dvn = dv_local + exp(gl - G) K dS';
            dS = exp(gl) dS' + (exp(G) Q)^T dO - w^T dvn                  [_bwd_dhu_kernel]
            dq, dk (direct), dw = -dvn S^T, dG partials                  [_bwd_dqkwg_kernel]
            WY backward (dX = dw Kb^T + dvn Vb^T, dL = -X^T dX X^T; (dL * E)^T via a store and a transposed load),
            dk, dv, dbeta, dg = reverse in-chunk cumsum of dG             [_bwd_wy_kernel]

Non-delta rules (S <- exp(g) S + k v^T) skip the WY parts: vn = v, w = 0 (DELTA=False).

Padded rows of a partial chunk are masked inside every exp(G_i - G_j): their G is not defined
and an overflow there would leak 0 * inf = NaN into valid rows through a dot.

No kernel transposes a register tile with tl.trans: Triton 3.4-3.7.0 miscompiles tl.trans of
tl.dot results on Hopper (fla issues #640, #984). Where a transposed operand is needed it is
loaded transposed from memory, or the transposed product is computed directly (e.g. both
dX and dX^T are accumulated in _bwd_wy_kernel)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton import Varlen, launch_cfg, next_pow2, prepare_varlen
from ..triton.l2norm import l2norm_bwd, l2norm_fwd
from ..utils import SCAN_KEEPS


# ----------------------------------------------------------------------------------------------
# Indexing: tensors are packed [T, H, D]. Each program forms int64 scalar base pointers once
# (token t0 of its chunk, head i_h) and int32 tile offsets relative to them: int64 offset tiles
# would double the registers spent on address math (they spilled at K = 256).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chunk_coords(cu, cidx, i_c, BT: tl.constexpr):
    """-> (t0: first token of chunk i_c (int64), nt: its number of valid tokens (int32); 0 for the
    surplus slots past the last segment's end, see prepare_varlen: every access is then masked)."""
    i_n = tl.load(cidx + 2 * i_c).to(tl.int64)
    i_t = tl.load(cidx + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT
    nt = tl.maximum(tl.minimum(eos - t0, BT), 0).to(tl.int32)
    return t0, nt


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------
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


@triton.jit
def _segment_layout(cu, coff, i_n, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """Per-segment recurrences: the segment's rows [bos, eos), its chunk count NT and first chunk
    boh, and the tile offsets / masks of a [BK, BV] state block and [BT, *] token tiles."""
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    boh = tl.load(coff + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    p_tk = o_t[:, None] * (H * K) + o_k[None, :]
    p_kt = o_t[None, :] * (H * K) + o_k[:, None]
    p_tv = o_t[:, None] * (H * V) + o_v[None, :]
    return bos, eos, NT, boh, o_t, m_k, m_v, m_kv, p_kv, p_tk, p_kt, p_tv


@triton.jit
def _segment_chunk(bos, eos, i_t, i_h, o_t, m_v, H: tl.constexpr, BT: tl.constexpr):
    """Chunk i_t of a segment: (valid rows nt, row mask, row x value mask, base offset of head i_h)."""
    t0 = bos + i_t * BT
    nt = tl.minimum(eos - t0, BT).to(tl.int32)
    m_t = o_t < nt
    return nt, m_t, m_t[:, None] & m_v[None, :], t0 * H + i_h


@triton.jit
def _fwd_h_kernel(k, u, w, G, h, vnew, h0, ht, cu, coff,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  SAVE_VNEW: tl.constexpr, DELTA: tl.constexpr):
    """One program per (value block, segment, head): the sequential recurrence over the segment's
    chunks. Stores h[c] = state at the start of chunk c (dtype of k) and vn = u - w h (DELTA) or v."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    bos, eos, NT, boh, o_t, m_k, m_v, m_kv, p_kv, p_tk, p_kt, p_tv = _segment_layout(
        cu, coff, i_n, i_v, H, K, V, BT, BK, BV)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (i_n * H + i_h) * (K * V) + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(NT):
        nt, m_t, m_tv, s_t = _segment_chunk(bos, eos, i_t, i_h, o_t, m_v, H, BT)
        tl.store(h + ((boh + i_t) * H + i_h) * (K * V) + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        b_vn = tl.load(u + s_t * V + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        if DELTA:
            b_w = tl.load(w + s_t * K + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_vn = b_vn - tl.dot(b_w, b_h.to(b_w.dtype))
            if SAVE_VNEW:
                tl.store(vnew + s_t * V + p_tv, b_vn.to(vnew.dtype.element_ty), mask=m_tv)
        b_kt = tl.load(k + s_t * K + p_kt, mask=m_k[:, None] & m_t[None, :], other=0.0)
        if USE_G:
            b_gl = tl.load(G + s_t + (nt - 1) * H)
            b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
            b_vn = b_vn * tl.where(m_t, tl.exp(b_gl - b_G), 0.0)[:, None]
            b_h = b_h * tl.exp(b_gl)
        b_h += tl.dot(b_kt, b_vn.to(b_kt.dtype))
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * (K * V) + p_kv, b_h, mask=m_kv)


@triton.jit
def _fwd_o_kernel(q, k, vn, h, G, o, cu, cidx, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr):
    """One program per (value block, chunk, head): O = scale (exp(G) q S + (q k^T * E)_causal vn)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    s_t = t0 * H + i_h
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    r = o_t[:, None]
    c = o_t[None, :]
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    hb = h + (i_c * H + i_h).to(tl.int64) * (K * V)

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + s_t * K + r * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kt = tl.load(k + s_t * K + c * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(hb + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h.to(b_q.dtype))
        b_s += tl.dot(b_q, b_kt)
    if USE_G:
        b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
        b_o = b_o * tl.exp(b_G)[:, None]
        b_s = b_s * tl.exp(tl.where((r >= c) & m_t[:, None] & m_t[None, :], b_G[:, None] - b_G[None, :], 0.0))
    b_s = tl.where(r >= c, b_s, 0.0)
    b_vn = tl.load(vn + s_t * V + r * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
    b_o = (b_o + tl.dot(b_s.to(b_vn.dtype), b_vn)) * scale
    tl.store(o + s_t * V + r * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_local_kernel(q, k, vn, do, G, dv, dov, cu, cidx, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, USE_G: tl.constexpr):
    """The in-chunk products of dO, once per (chunk, head):
        dv_local = (Q K^T * E)_causal^T dO, computed as (K Q^T * E^T)_anticausal dO (no transpose);
        dOV = dO vn^T (raw, [T, H, BT] rows like Ainv), which _bwd_dqkwg_kernel would otherwise
        recompute in every one of its key blocks."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    s_t = t0 * H + i_h
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    r = o_t[:, None]
    c = o_t[None, :]

    b_st = tl.zeros([BT, BT], dtype=tl.float32)  # st_ij = k_i . q_j
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + s_t * K + r * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_qt = tl.load(q + s_t * K + c * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_st += tl.dot(b_k, b_qt)
    if USE_G:
        b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
        b_st = b_st * tl.exp(tl.where((r <= c) & m_t[:, None] & m_t[None, :], b_G[None, :] - b_G[:, None], 0.0))
    b_st = tl.where(r <= c, b_st * scale, 0.0)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + s_t * V + r * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
        b_dv = tl.dot(b_st.to(b_do.dtype), b_do)
        tl.store(dv + s_t * V + r * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_vnt = tl.load(vn + s_t * V + c * (H * V) + o_v[:, None], mask=m_v[:, None] & m_t[None, :], other=0.0)
        b_ds += tl.dot(b_do, b_vnt.to(b_do.dtype))
    tl.store(dov + s_t * BT + r * (H * BT) + c, b_ds, mask=m_t[:, None])


@triton.jit
def _bwd_dhu_kernel(q, k, w, G, do, dv, dh, dv2, dht, dh0, cu, coff, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr, USE_DH0: tl.constexpr,
                    DELTA: tl.constexpr):
    """Reverse recurrence over a segment's chunks. dh[c] = gradient of the state at the END of
    chunk c; dv2 = dv_local + exp(gl - G) K dh[c] (the full gradient of vn); dh0 = gradient of the
    initial state."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    bos, eos, NT, boh, o_t, m_k, m_v, m_kv, p_kv, p_tk, p_kt, p_tv = _segment_layout(
        cu, coff, i_n, i_v, H, K, V, BT, BK, BV)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + (i_n * H + i_h) * (K * V) + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        nt, m_t, m_tv, s_t = _segment_chunk(bos, eos, i_t, i_h, o_t, m_v, H, BT)
        tl.store(dh + ((boh + i_t) * H + i_h) * (K * V) + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        b_k = tl.load(k + s_t * K + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kdh = tl.dot(b_k, b_dh.to(b_k.dtype))
        b_do = tl.load(do + s_t * V + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        if USE_G:
            b_gl = tl.load(G + s_t + (nt - 1) * H)
            b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
            b_kdh = b_kdh * tl.where(m_t, tl.exp(b_gl - b_G), 0.0)[:, None]
            b_do = b_do * (tl.exp(b_G) * scale)[:, None]
            b_dh = b_dh * tl.exp(b_gl)
        else:
            b_do = b_do * scale
        b_dv = tl.load(dv + s_t * V + p_tv, mask=m_tv, other=0.0).to(tl.float32) + b_kdh
        tl.store(dv2 + s_t * V + p_tv, b_dv.to(dv2.dtype.element_ty), mask=m_tv)
        b_qt = tl.load(q + s_t * K + p_kt, mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_dh += tl.dot(b_qt, b_do.to(b_qt.dtype))
        if DELTA:
            b_wt = tl.load(w + s_t * K + p_kt, mask=m_k[:, None] & m_t[None, :], other=0.0)
            b_dh -= tl.dot(b_wt, b_dv.to(b_wt.dtype))
    if USE_DH0:
        tl.store(dh0 + (i_n * H + i_h) * (K * V) + p_kv, b_dh, mask=m_kv)


@triton.jit
def _tk_offsets(s_t, r, o_k, H: tl.constexpr, K: tl.constexpr):
    """Offsets of a [BT, BK] tile of a [T, H, K] tensor: rows r of the chunk at s_t, keys o_k."""
    return s_t * K + r * (H * K) + o_k[None, :]


@triton.jit
def _dqkwg_value_tiles(h, dh, do, vn, dv2, hb, s_t, r, o_k, m_t, m_k, i_v, H: tl.constexpr, V: tl.constexpr,
                       BV: tl.constexpr, DELTA: tl.constexpr):
    """Value block i_v of _bwd_dqkwg_kernel's loop: S^T and dS'^T blocks [BV, BK], dO, vn, dvn [BT, BV]
    (dvn = dO without DELTA: unused). i_v past the last block loads nothing (every mask is off)."""
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    m_vk = m_v[:, None] & m_k[None, :]
    p_tv = s_t * V + r * (H * V) + o_v[None, :]
    p_vk = hb + o_v[:, None] + o_k[None, :] * V
    b_ht = tl.load(h + p_vk, mask=m_vk, other=0.0)
    b_dht = tl.load(dh + p_vk, mask=m_vk, other=0.0)
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
    b_vn = tl.load(vn + p_tv, mask=m_tv, other=0.0)
    if DELTA:
        b_dv = tl.load(dv2 + p_tv, mask=m_tv, other=0.0)
    else:
        b_dv = b_do
    return b_ht, b_dht, b_do, b_vn, b_dv


@triton.jit
def _bwd_dqkwg_kernel(q, k, vn, h, G, do, dh, dv2, dov, dq, dk, dw, dGp, cu, cidx, scale, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr, PREFETCH: tl.constexpr):
    """One program per (key block, chunk, head):
        dQ = exp(G) dO S^T + (dO vn^T * E)_causal K
        dK = (dO vn^T * E)_causal^T Q + exp(gl - G) vn dS'^T      (direct terms)
        dw = -dvn S^T
    and this key block's share of dG (written to dGp[i_k]; summed in _bwd_wy_kernel). dO vn^T and its
    transpose are read from dov (_bwd_local_kernel), not recomputed per key block.
    PREFETCH: the value loop loads block i_v + 1 before its products on block i_v, by hand (Triton's
    own pipelining, num_stages >= 2, compiles this kernel wrong on Hopper: see the launch table)."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    s_t = t0 * H + i_h
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    r = o_t[:, None]
    c = o_t[None, :]
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    hb = (i_c * H + i_h).to(tl.int64) * (K * V)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    if PREFETCH:
        n_ht, n_dht, n_do, n_vn, n_dv = _dqkwg_value_tiles(h, dh, do, vn, dv2, hb, s_t, r, o_k, m_t, m_k, 0,
                                                           H, V, BV, DELTA)
    for i_v in range(tl.cdiv(V, BV)):
        if PREFETCH:
            b_ht, b_dht, b_do, b_vn, b_dv = n_ht, n_dht, n_do, n_vn, n_dv
            n_ht, n_dht, n_do, n_vn, n_dv = _dqkwg_value_tiles(h, dh, do, vn, dv2, hb, s_t, r, o_k, m_t, m_k,
                                                               i_v + 1, H, V, BV, DELTA)
        else:
            b_ht, b_dht, b_do, b_vn, b_dv = _dqkwg_value_tiles(h, dh, do, vn, dv2, hb, s_t, r, o_k, m_t, m_k,
                                                               i_v, H, V, BV, DELTA)
        b_dq += tl.dot(b_do, b_ht.to(b_do.dtype))
        b_dk += tl.dot(b_vn, b_dht.to(b_vn.dtype))
        if DELTA:
            b_dw += tl.dot(b_dv.to(b_ht.dtype), b_ht)
        if USE_G:
            b_hdh += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), 0)

    # The epilogue in an order that lets each accumulator die early (stored as soon as it is final):
    # all of them live next to the [BT, BT] tiles spilled registers. Same operations as before.
    if DELTA:
        tl.store(dw + _tk_offsets(s_t, r, o_k, H, K), (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    m_tt = m_t[:, None] & m_t[None, :]
    p_tk = _tk_offsets(s_t, r, o_k, H, K)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
    b_ds = tl.load(dov + s_t * BT + r * (H * BT) + c, mask=m_tt, other=0.0)  # dO vn^T
    if USE_G:
        b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
        b_gl = tl.load(G + s_t + tl.maximum(nt - 1, 0) * H, mask=nt > 0, other=0.0)  # nt = 0: surplus slot
        b_eG = tl.where(m_t, tl.exp(b_G), 0.0)
        b_e = tl.where(m_t, tl.exp(b_gl - b_G), 0.0)
        # Terms that cancel exactly (the diagonal of P in its row and column sums; the last row's
        # t3 in dG_last and dgl) are left out: with strong decay the true dG is ~exp(g) << 1 and
        # those O(1) pairs would leave rounding noise far above it.
        b_t1 = tl.sum(b_q.to(tl.float32) * b_dq, 1) * b_eG * scale
        b_t3 = tl.where(o_t < nt - 1, tl.sum(b_k.to(tl.float32) * b_dk, 1) * b_e, 0.0)
        b_dq = b_dq * b_eG[:, None]
        b_dk = b_dk * b_e[:, None]
        b_ds = tl.where(r >= c, b_ds * tl.exp(tl.where((r >= c) & m_t[:, None] & m_t[None, :],
                                                       b_G[:, None] - b_G[None, :], 0.0)), 0.0)
        b_kt = tl.load(k + s_t * K + c * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_P = tl.where(r > c, b_ds * tl.dot(b_q, b_kt) * scale, 0.0)  # q k^T: this key block's share
        b_dgl = tl.sum(b_hdh, 0) * tl.exp(b_gl) + tl.sum(b_t3, 0)
        b_dG = b_t1 + tl.sum(b_P, 1) - tl.sum(b_P, 0) - b_t3 + tl.where(o_t == nt - 1, b_dgl, 0.0)
        tl.store(dGp + i_k.to(tl.int64) * T * H + s_t + o_t * H, b_dG, mask=m_t)
    else:
        b_ds = tl.where(r >= c, b_ds, 0.0)
    b_dq = (b_dq + tl.dot(b_ds.to(b_k.dtype), b_k)) * scale
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_dst = tl.load(dov + s_t * BT + c * (H * BT) + r, mask=m_tt, other=0.0)  # (dO vn^T)^T
    if USE_G:
        b_dst = tl.where(r <= c, b_dst * tl.exp(tl.where((r <= c) & m_t[:, None] & m_t[None, :],
                                                         b_G[None, :] - b_G[:, None], 0.0)), 0.0)
    else:
        b_dst = tl.where(r <= c, b_dst, 0.0)
    b_dk = b_dk + tl.dot(b_dst.to(b_q.dtype), b_q) * scale
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def _load_in(ptr, mask, LOWP: tl.constexpr):
    """k / v tiles for the WY backward: as stored for LOWP (every product then takes them as bf16
    operands, and bf16 -> float32 in elementwise math is exact), float32 otherwise. Upcasting them
    all at the load kept float32 copies live next to the bf16 ones: 255 registers and spills."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_wy(ptr, mask, LOWP: tl.constexpr):
    """dw / dvn for the WY products: as stored for bf16 inputs (the products take bf16 operands),
    float32 otherwise (fp16 inputs store fp16; their products take float32 operands)."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _mm(a, b, PREC: tl.constexpr, LOWP: tl.constexpr):
    """a @ b with float32 accumulation: on bf16 operands (LOWP) or at input precision PREC."""
    if LOWP:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _bwd_wy_kernel(k, v, beta, G, Ainv, dw, dv2, dkd, dGp, scr, dk, dv, dbeta, dg, cu, cidx, T,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, NKP: tl.constexpr, USE_G: tl.constexpr, DELTA: tl.constexpr,
                   PREC: tl.constexpr, LOWP: tl.constexpr):
    """One program per (chunk, head). DELTA: backward of w = X (beta exp(G) K), u = X (beta V)
    with X = (I + L)^-1, L = tril_strict(beta K K^T * E); adds the direct dk; then sums the dG
    partials and turns dG into dg (reverse in-chunk cumsum). Not DELTA: only the dg part.
    The transpose of dL * E (for dk's K^T-side term) goes through `scr` ([T, H, BT] float32 rows,
    this chunk's own rows: no other program touches them): stored, then loaded transposed. Computing
    it as a second product chain (dX^T accumulated from the transposed operands) cost 10 more dots,
    two more loads per block and an accumulator that made the kernel spill; tl.trans of the dot
    result is what Triton 3.6 miscompiles on Hopper.
    PREC: tf32x3 for float32 inputs: tf32 rounding of float32 operands here, amplified by the
    cancellation in dk (and the L2-norm backward's projection), gave 1.5e-2 relative error on an
    H100; 16-bit inputs are exact in tf32. LOWP: every product on bf16 operands (float32
    accumulation), twice tf32's rate; see _wy_lowp."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    s_t = t0 * H + i_h
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    r = o_t[:, None]
    c = o_t[None, :]
    b_dG = tl.zeros([BT], dtype=tl.float32)
    if USE_G:
        b_G = tl.load(G + s_t + o_t * H, mask=m_t, other=0.0)
    if DELTA:
        # Tiles are loaded / formed where first needed to keep few [BT, BT] tiles alive at once.
        b_b = tl.load(beta + s_t + o_t * H, mask=m_t, other=0.0).to(tl.float32)
        if USE_G:
            b_eG = tl.where(m_t, tl.exp(b_G), 0.0)
        else:
            b_eG = tl.where(m_t, 1.0, 0.0)
        b_bg = b_b * b_eG
        b_Xt = tl.load(Ainv + s_t * BT + c * (H * BT) + r, mask=m_t[None, :], other=0.0)
        b_dX = tl.zeros([BT, BT], dtype=tl.float32)
        b_kk = tl.zeros([BT, BT], dtype=tl.float32)
        b_db = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            m_kt = m_k[:, None] & m_t[None, :]
            p_tk = s_t * K + r * (H * K) + o_k[None, :]
            p_kt = s_t * K + c * (H * K) + o_k[:, None]
            b_k = _load_in(k + p_tk, m_tk, LOWP)
            b_kt = _load_in(k + p_kt, m_kt, LOWP)
            b_dw = _load_wy(dw + p_tk, m_tk, LOWP)
            b_kk += _mm(b_k, b_kt, PREC, LOWP)
            b_dX += _mm(b_dw, b_kt * b_bg[None, :], PREC, LOWP)
            b_tk = tl.sum(_mm(b_Xt, b_dw, PREC, LOWP) * b_k, 1)
            b_db += b_tk * b_eG
            b_dG += b_tk * b_bg
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            m_vt = m_v[:, None] & m_t[None, :]
            p_tv = s_t * V + r * (H * V) + o_v[None, :]
            p_vt = s_t * V + c * (H * V) + o_v[:, None]
            b_v = _load_in(v + p_tv, m_tv, LOWP)
            b_vt = _load_in(v + p_vt, m_vt, LOWP)
            b_du = _load_wy(dv2 + p_tv, m_tv, LOWP)
            b_dX += _mm(b_du, b_vt * b_b[None, :], PREC, LOWP)
            b_dvb = _mm(b_Xt, b_du, PREC, LOWP)
            tl.store(dv + p_tv, (b_dvb * b_b[:, None]).to(dv.dtype.element_ty), mask=m_tv)
            b_db += tl.sum(b_dvb * b_v, 1)
        # dL = tril_strict(-X^T dX X^T) * E, and its transpose through scr
        b_dL = tl.where(r > c, -_mm(b_Xt, _mm(b_dX, b_Xt, PREC, LOWP), PREC, LOWP), 0.0)
        if USE_G:
            b_dL = b_dL * tl.exp(tl.where((r > c) & m_t[:, None] & m_t[None, :], b_G[:, None] - b_G[None, :], 0.0))
        m_tt = m_t[:, None] & m_t[None, :]
        tl.store(scr + s_t * BT + r * (H * BT) + c, b_dL, mask=m_tt)
        tl.debug_barrier()  # this program's stores are visible to all of its threads
        b_dLt = tl.load(scr + s_t * BT + c * (H * BT) + r, mask=m_tt, other=0.0)
        b_db += tl.sum(b_dL * b_kk, 1)
        if USE_G:
            b_P = b_dL * b_kk * b_b[:, None]  # dL * L
            b_dG += tl.sum(b_P, 1) - tl.sum(b_P, 0)
        b_R = b_dL * b_b[:, None]
        b_Rt = b_dLt * b_b[None, :]
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            p_tk = s_t * K + r * (H * K) + o_k[None, :]
            b_k = _load_in(k + p_tk, m_tk, LOWP)
            b_dw = _load_wy(dw + p_tk, m_tk, LOWP)
            b_dk = tl.load(dkd + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_dk += _mm(b_Xt, b_dw, PREC, LOWP) * b_bg[:, None]
            b_dk += _mm(b_R, b_k, PREC, LOWP) + _mm(b_Rt, b_k, PREC, LOWP)
            tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(dbeta + s_t + o_t * H, b_db.to(dbeta.dtype.element_ty), mask=m_t)
    if USE_G:
        for j in range(NKP):
            b_dG += tl.load(dGp + j * T * H + s_t + o_t * H, mask=m_t, other=0.0)
        b_dG = tl.where(m_t, b_dG, 0.0)
        tl.store(dg + s_t + o_t * H, tl.cumsum(b_dG, 0, reverse=True).to(dg.dtype.element_ty), mask=m_t)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
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


def _check_dims(K: int, V: int):
    if K > 256:
        raise NotImplementedError(f"Triton chunk kernels support head dim K <= 256, got {K}")


def _fwd(q, k, v, g, beta, scale, h0, vl: Varlen, BT: int, delta: bool, need_o: bool = True,
         store_ht: bool = True, keep: Optional[dict] = None):
    """Packed [T, H, D] inputs (contiguous). Returns (o, ht, G, Ainv); `keep`: a dict that receives
    w, the chunk states h and v_new, for a backward that then need not recompute them."""
    T, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    BK = next_pow2(K)
    use_g = g is not None
    G = torch.empty(T, H, dtype=torch.float32, device=dev) if use_g else None
    Ainv = w = None
    u = v
    if delta:
        Ainv = torch.empty(T, H, BT, dtype=_ainv_dtype(k.dtype), device=dev)
        w = torch.empty_like(k)
        u = torch.empty_like(v)
        if vl.NT:
            cfg = launch_cfg("prep", BK=BK, BV=next_pow2(V))
            _prep_kernel[(vl.NT, H)](k, v, beta, g, G, Ainv, w, u, vl.cu, vl.chunk_indices, H=H, K=K, V=V, BT=BT,
                                     LOG2_BT=int(math.log2(BT)), USE_G=use_g, COMPUTE_A=True,
                                     INV_PREC=_inv_prec(k.dtype), STORE_U=True, **cfg)
    elif use_g and vl.NT:
        _cumsum(g, G, vl, BT)
    h, vn, ht = _fwd_h(k, u, w, G, h0, vl, BT, delta, store_ht)
    o = None
    if need_o:
        o = torch.empty_like(v)
        if vl.NT:
            cfg = launch_cfg("fwd_o", BK=BK, BV=next_pow2(V))
            grid = (triton.cdiv(V, cfg["BV"]), vl.NT, H)
            _fwd_o_kernel[grid](q, k, vn, h, G, o, vl.cu, vl.chunk_indices, scale, H=H, K=K, V=V, BT=BT,
                                USE_G=use_g, **cfg)
    if keep is not None:
        keep.update(w=w, h=h, vn=vn)
    return o, ht, G, Ainv


def _fwd_h(k, u, w, G, h0, vl: Varlen, BT, delta, store_ht, save_vnew=True):
    T, H, K = k.shape
    V = u.shape[-1]
    h = torch.empty(vl.NT, H, K, V, dtype=k.dtype, device=k.device)
    vn = torch.empty_like(u) if (delta and save_vnew) else u
    ht = torch.empty(vl.N, H, K, V, dtype=torch.float32, device=k.device) if store_ht else None
    if vl.N:
        cfg = launch_cfg("fwd_h", BV=next_pow2(V))
        grid = (triton.cdiv(V, cfg["BV"]), vl.N, H)
        _fwd_h_kernel[grid](k, u, w, G, h, vn, h0, ht, vl.cu, vl.chunk_offsets, H=H, K=K, V=V, BT=BT,
                            BK=next_pow2(K), USE_G=G is not None, USE_H0=h0 is not None, STORE_HT=store_ht,
                            SAVE_VNEW=delta and save_vnew, DELTA=delta, **cfg)
    return h, vn, ht


@triton.jit
def _cumsum_kernel(g, G, cu, cidx, H: tl.constexpr, BT: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, nt = _chunk_coords(cu, cidx, i_c, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < nt
    b_g = tl.load(g + t0 * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    tl.store(G + t0 * H + i_h + o_t * H, tl.cumsum(b_g, 0), mask=m_t)


def _cumsum(g, G, vl, BT):
    _cumsum_kernel[(vl.NT, g.shape[1])](g, G, vl.cu, vl.chunk_indices, H=g.shape[1], BT=BT)


def _bwd(q, k, v, G, beta, Ainv, scale, h0, do, dht, vl: Varlen, BT: int, delta: bool,
         debug: Optional[dict] = None, dqk_dtype: Optional[torch.dtype] = None, kept: Optional[dict] = None):
    """Returns (dq, dk, dv, dbeta, dg, dh0) on packed layouts; dq and dk in dqk_dtype (default: the
    inputs' dtype; float32 when an L2-norm backward still follows). `kept`: {w, h, vn} from the
    forward's `keep` (h and vn together; w may be None); what is missing, or all without `kept`, is
    recomputed here. `debug`: a dict that receives every intermediate (stage-by-stage checks)."""
    T, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    BK = next_pow2(K)
    use_g = G is not None
    dtype = k.dtype
    w, h, vn = (kept["w"], kept["h"], kept["vn"]) if kept is not None else (None, None, None)
    if (h is None) != (vn is None):
        raise ValueError("kept chunk states need both h and vn")
    u = v
    if delta and (w is None or h is None):  # w (for dh) and u (for the states) from the forward's A^-1
        w = torch.empty_like(k)
        u = torch.empty_like(v) if h is None else None  # kept states: no u to recompute
        if vl.NT:
            cfg = launch_cfg("prep", BK=BK, BV=next_pow2(V))
            _prep_kernel[(vl.NT, H)](k, v, beta, None, G, Ainv, w, u, vl.cu, vl.chunk_indices, H=H, K=K, V=V, BT=BT,
                                     LOG2_BT=int(math.log2(BT)), USE_G=use_g, COMPUTE_A=False,
                                     INV_PREC=_inv_prec(dtype), STORE_U=u is not None, **cfg)
    if h is None:
        h, vn, _ = _fwd_h(k, u, w, G, h0, vl, BT, delta, store_ht=False)

    # dv_local, dvn (dv2) and dw in the inputs' dtype, as fla's. For bf16, dvn and dw only enter bf16
    # products, so storing them rounds nothing further; dv_local adds one rounding to dvn.
    dv_local = torch.empty(T, H, V, dtype=dtype, device=dev)
    dov = torch.empty(T, H, BT, dtype=torch.float32, device=dev)
    if vl.NT:
        cfg = launch_cfg("bwd_local", BK=BK, BV=next_pow2(V))
        _bwd_local_kernel[(vl.NT, H)](q, k, vn, do, G, dv_local, dov, vl.cu, vl.chunk_indices, scale, H=H, K=K, V=V,
                                      BT=BT, USE_G=use_g, **cfg)

    dh = torch.empty(vl.NT, H, K, V, dtype=dtype, device=dev)
    dv2 = torch.empty(T, H, V, dtype=dtype, device=dev)
    dh0 = torch.empty(vl.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    if vl.N:
        # float32 tiles: two stages would exceed sm_90's shared memory (kernels/triton/aot_check.py)
        cfg = launch_cfg("bwd_dhu", BV=next_pow2(V), **({"num_stages": 1} if dtype == torch.float32 else {}))
        _bwd_dhu_kernel[(triton.cdiv(V, cfg["BV"]), vl.N, H)](
            q, k, w, G, do, dv_local, dh, dv2, dht, dh0, vl.cu, vl.chunk_offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK,
            USE_G=use_g, USE_DHT=dht is not None, USE_DH0=h0 is not None, DELTA=delta, **cfg)
    if debug is None:
        del dv_local

    cfg = launch_cfg("bwd_dqkwg", BK=BK, BV=next_pow2(V))
    NKP = triton.cdiv(K, cfg["BK"])
    dqk_dtype = dqk_dtype or dtype
    dq = torch.empty(T, H, K, dtype=dqk_dtype, device=dev)
    dkd = torch.empty(T, H, K, dtype=torch.float32, device=dev)
    dw = torch.empty(T, H, K, dtype=dtype, device=dev) if delta else None
    dGp = torch.empty(NKP, T, H, dtype=torch.float32, device=dev) if use_g else None
    if vl.NT:
        _bwd_dqkwg_kernel[(NKP, vl.NT, H)](q, k, vn, h, G, do, dh, dv2, dov, dq, dkd, dw, dGp, vl.cu, vl.chunk_indices,
                                           scale, T, H=H, K=K, V=V, BT=BT, USE_G=use_g, DELTA=delta, **cfg)
    if debug is not None:
        debug.update(w=w, u=u, h=h, vn=vn, dv_local=dv_local, dov=dov, dh=dh, dv2=dv2, dh0=dh0, dq=dq, dkd=dkd, dw=dw,
                     dGp=dGp)
    del h, dh
    scratch = dov if debug is None else torch.empty_like(dov)  # dov is dead after _bwd_dqkwg_kernel
    dg = torch.empty(T, H, dtype=torch.float32, device=dev) if use_g else None
    if delta:
        dk = torch.empty(T, H, K, dtype=dqk_dtype, device=dev)
        dv = torch.empty_like(v)
        dbeta = torch.empty(T, H, dtype=torch.float32, device=dev)
    else:
        dk, dv, dbeta = dkd, dv2, None
    if vl.NT and (delta or use_g):
        cfg = launch_cfg("bwd_wy", BK=BK, BV=next_pow2(V))
        _bwd_wy_kernel[(vl.NT, H)](k, v, beta, G, Ainv, dw, dv2, dkd, dGp, scratch, dk, dv, dbeta, dg, vl.cu,
                                   vl.chunk_indices, T, H=H, K=K, V=V, BT=BT, NKP=NKP, USE_G=use_g, DELTA=delta,
                                   PREC=_inv_prec(dtype), LOWP=_wy_lowp(dtype), **cfg)
    if debug is not None:
        debug.update(dk=dk, dv=dv, dbeta=dbeta, dg=dg)
    return dq, dk, dv, dbeta, dg, dh0


class ChunkScanFunction(torch.autograd.Function):
    """Autograd wrapper. Inputs in the public layout [B, T, H, D] (B = 1 with cu_seqlens)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
                chunk_size, delta, keep):
        B, T, H, K = k.shape
        V = v.shape[-1]
        _check_dims(K, V)
        dtype = q.dtype
        flat = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
        qf, kf, vf = flat(q), flat(k.to(dtype)), flat(v.to(dtype))
        gf, bf = flat(g), flat(beta)
        vl = prepare_varlen(cu_seqlens, B, T, chunk_size, q.device)
        rq = rk = None
        if use_qk_l2norm:
            qf, rq = l2norm_fwd(qf)
            kf, rk = l2norm_fwd(kf)
        h0 = initial_state.contiguous() if initial_state is not None else None
        from_fwd = {} if keep != "none" else None
        o, ht, G, Ainv = _fwd(qf, kf, vf, gf, bf, scale, h0, vl, chunk_size, delta, store_ht=output_final_state,
                              keep=from_fwd)
        saved = [from_fwd["w"] if keep == "all" else None, from_fwd["h"], from_fwd["vn"]] if from_fwd else []
        ctx.save_for_backward(qf, kf, vf, G, bf, Ainv, h0, rq, rk, *saved)
        ctx.vl, ctx.scale, ctx.chunk_size, ctx.delta = vl, scale, chunk_size, delta
        ctx.shape = (B, T, H, K, V)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if g is None else g.dtype,
                      None if beta is None else beta.dtype)
        ctx.has_g = g is not None
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o.view(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, G, bf, Ainv, h0, rq, rk, *kept = ctx.saved_tensors
        B, T, H, K, V = ctx.shape
        if do is None:  # only the final state was used
            do = torch.zeros(B, T, H, V, dtype=qf.dtype, device=qf.device)
        dof = do.reshape(B * T, H, V).to(qf.dtype).contiguous()
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dbeta, dg, dh0 = _bwd(qf, kf, vf, G, bf, Ainv, ctx.scale, h0, dof, dht, ctx.vl,
                                          ctx.chunk_size, ctx.delta,
                                          dqk_dtype=torch.float32 if rq is not None else None,
                                          kept=dict(zip(("w", "h", "vn"), kept)) if kept else None)
        tq, tk, tv, tg, tb = ctx.dtypes
        if rq is not None:
            dq = l2norm_bwd(qf, rq, dq, tq)
            dk = l2norm_bwd(kf, rk, dk, tk)
        dq = dq.to(tq).view(B, T, H, K)
        dk = dk.to(tk).view(B, T, H, K)
        dv = dv.to(tv).view(B, T, H, V)
        dg = dg.to(tg).view(B, T, H) if ctx.has_g else None
        dbeta = dbeta.to(tb).view(B, T, H) if dbeta is not None else None
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def chunk_scan_triton(q, k, v, g=None, beta=None, scale: Optional[float] = None, initial_state=None,
                      output_final_state: bool = False, cu_seqlens=None, chunk_size: int = 64,
                      use_qk_l2norm: bool = False, delta: bool = True, keep: str = "none"):
    """Gated delta rule (delta=True; g None = DeltaNet) or additive scalar-decay / linear attention
    (delta=False, beta unused). q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] float32 log-decay;
    beta [B, T, H]; states [N, H, K, V] float32. Returns (o [B, T, H, V], final state or None).
    keep: what the backward takes from the forward instead of recomputing it, at the cost of its
    memory (bf16: 2 bytes an element): "none"; "states" the chunk states h and v_new (skips the
    backward's state recurrence: K V per chunk and head, V per token and head); "all" w as well
    (skips its WY recomputation too: K more per token and head)."""
    if keep not in SCAN_KEEPS:
        raise ValueError(f"keep={keep!r} is not one of {SCAN_KEEPS}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got {q.shape[0]}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not delta:
        beta = None
    o, ht = ChunkScanFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                    use_qk_l2norm, chunk_size, delta, keep)
    return o, (ht if output_final_state else None)
