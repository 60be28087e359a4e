"""The backward kernels of the chunked scan, in launch order (`chunk_triton._bwd` launches them after
recomputing w, u, the chunk states and vn, or taking them from the forward):
  dv_local = (Q K^T * E)_causal^T dO, dOV = dO vn^T                       [_bwd_local_kernel]
  reverse over chunks: dvn = dv_local + exp(gl - G) K dS';
  dS = exp(gl) dS' + (exp(G) Q)^T dO - w^T dvn                             [_bwd_dhu_kernel]
  dq, dk (direct), dw = -dvn S^T, dG partials per key block               [_bwd_dqkwg_kernel]
  WY backward (dX = dw Kb^T + dvn Vb^T, dL = -X^T dX X^T): dk, dv, dbeta; then dg = reverse
  in-chunk cumsum of dG (the only part additive rules, DELTA=False, run)  [_bwd_wy_kernel]"""
import triton
import triton.language as tl

from .chunk_index import _chunk_coords, _segment_chunk, _segment_layout


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
