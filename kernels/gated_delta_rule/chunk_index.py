"""Where a chunk and a segment of the packed varlen layout lie, inside the chunked scan's kernels (read
from the chunk table that `megamom.kernels.triton.varlen` builds): `_chunk_coords` for the per-chunk
kernels, `_segment_layout` / `_segment_chunk` for the recurrences over a segment's chunks."""
import triton
import triton.language as tl


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
