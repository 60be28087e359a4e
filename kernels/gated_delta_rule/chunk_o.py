"""The output of each chunk [_fwd_o_kernel]: O = scale (exp(G) q S + (q k^T * E)_causal vn), with S
the chunk's incoming state and vn its corrected values (chunk_h.py)."""
import triton
import triton.language as tl

from .chunk_index import _chunk_coords


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
