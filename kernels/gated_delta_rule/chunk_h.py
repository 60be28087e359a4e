"""The state recurrence across chunks [_fwd_h_kernel, `_fwd_h`]: one program per (value block,
segment, head) walks the segment's chunks in order with the [K, BV] state block in registers,
stores each chunk's incoming state h[c] and its corrected values vn = u - w h[c] (delta rules;
additive rules: vn = v), S <- exp(gl) S + K^T (exp(gl - G) vn), and the final states. Sequence
parallelism needs this part alone. `_cumsum`: the in-chunk cumulative log-decay G where no WY step
computes it (additive rules)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton import Varlen, launch_cfg, next_pow2
from .chunk_index import _chunk_coords, _segment_chunk, _segment_layout


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
