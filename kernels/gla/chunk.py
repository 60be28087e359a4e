"""Chunked additive memory updates (GLA per-key decay, scalar decay, plain linear attention) in
plain PyTorch. Within a chunk with cumulative log-decay G (per key, or per head broadcast):

    O   = (Q * exp(G)) S_0 + A V,        A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)   (j <= i)
    S_C = exp(G_C) * S_0 + (K * exp(G_C - G))^T V

All exponents are differences G_i - G_j with j <= i, so they never overflow. For per-key decay the
intra-chunk term is built from sub-chunks of 16 (see `_per_key_intra_chunk`)."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import ChunkLayout, check_varlen, compute_dtype, cumulative_decay, l2norm


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
):
    check_varlen(q, cu_seqlens, initial_state)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v)
    out_dtype = v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    layout = ChunkLayout(q, cu_seqlens, chunk_size)
    qc, kc, vc = (layout.to_chunks(x).permute(0, 3, 1, 2, 4) for x in (q * scale, k, v))  # [S,H,NC,C,D]

    per_key = g is not None and g.dim() == 4
    if g is None:
        gc = torch.zeros(qc.shape[:-1], dtype=dt, device=q.device)
    else:
        gc = layout.to_chunks(g.to(dt))
        gc = gc.permute(0, 3, 1, 2, 4) if per_key else gc.permute(0, 3, 1, 2)

    if per_key:  # G: [S, H, NC, C, K]
        G = gc.cumsum(3)  # cumulative over the chunk positions
        attn = _per_key_intra_chunk(qc, kc, G)
        q_decayed = qc * G.exp()
        k_to_end = kc * (G[..., -1:, :] - G).exp()
        chunk_decay = G[..., -1, :].exp()[..., None]  # [S, H, NC, K, 1]
    else:  # G: [S, H, NC, C], float64 (see cumulative_decay)
        G, Gamma = cumulative_decay(gc, dt)
        attn = (qc @ kc.transpose(-1, -2)) * Gamma
        q_decayed = qc * G.exp().to(dt)[..., None]
        k_to_end = kc * (G[..., -1:] - G).exp().to(dt)[..., None]
        chunk_decay = G[..., -1].exp().to(dt)[..., None, None]  # [S, H, NC, 1, 1]

    intra = attn @ vc
    state = (initial_state.to(dt) if initial_state is not None
             else q.new_zeros(layout.S, H, K, V, dtype=dt))
    outs = []
    # unbind once (see the gated delta rule's chunk loop)
    for q_n, intra_n, decay_n, k_n, v_n in zip(q_decayed.unbind(2), intra.unbind(2), chunk_decay.unbind(2),
                                              k_to_end.unbind(2), vc.unbind(2)):
        outs.append(q_n @ state + intra_n)
        state = decay_n * state + k_n.transpose(-1, -2) @ v_n
    o = layout.from_chunks(torch.stack(outs, 2).permute(0, 2, 3, 1, 4))
    return o.to(out_dtype), (state if output_final_state else None)


def _per_key_intra_chunk(qc, kc, G, sub: int = 16):
    """A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i within each chunk, for per-key decay.

    Inside a sub-chunk the [sub, sub, K] decay tensor is materialised; between sub-chunks a < b
    the product factorises through the end of sub-chunk b: q_i exp(G_i - G_e) . k_j exp(G_e - G_j),
    both exponents <= 0, so nothing overflows (the secondary chunking of fla's GLA)."""
    *lead, C, K = qc.shape
    sub = min(sub, C)
    ns = C // sub
    qs, ks, Gs = (t.reshape(*lead, ns, sub, K) for t in (qc, kc, G))
    causal = torch.ones(sub, sub, dtype=torch.bool, device=qc.device).tril()
    diff = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    intra = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, diff.exp())  # [..., ns, sub, sub]
    ref = Gs[..., -1, :]  # [..., ns, K] end of each sub-chunk
    below = torch.ones(ns, ns, dtype=torch.bool, device=qc.device).tril(-1)  # a > b
    q_exp = (Gs[..., :, None, :, :] - ref[..., None, :, None, :])  # [..., a, b, sub, K]
    q_exp = q_exp.masked_fill(~below[:, :, None, None], float("-inf"))
    k_scaled = ks * (ref[..., None, :] - Gs).exp()  # [..., b, sub, K]
    inter = (qs[..., :, None, :, :] * q_exp.exp()) @ k_scaled[..., None, :, :, :].transpose(-1, -2)
    eye = torch.eye(ns, dtype=torch.bool, device=qc.device)
    blocks = torch.where(eye[:, :, None, None], intra[..., :, None, :, :], inter)  # [..., a, b, sub, sub]
    return blocks.transpose(-3, -2).reshape(*lead, C, C)
