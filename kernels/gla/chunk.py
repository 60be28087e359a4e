"""Chunked additive memory updates (GLA per-key decay, scalar decay, plain linear attention) in
plain PyTorch. Within a chunk with cumulative log-decay G (per key, or per head broadcast):

    O   = (Q * exp(G)) S_0 + A V,        A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)   (j <= i)
    S_C = exp(G_C) * S_0 + (K * exp(G_C - G))^T V

All exponents are differences G_i - G_j with j <= i, so they never overflow. For per-key decay the
intra-chunk term materialises a [C, C, K] tensor: keep chunks small (16-64) on this path."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import ChunkLayout, check_varlen, compute_dtype, l2norm


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
    C = chunk_size
    qc, kc, vc = (layout.to_chunks(x).permute(0, 3, 1, 2, 4) for x in (q * scale, k, v))  # [S,H,NC,C,D]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    if g is None:
        per_key = False
        G = torch.zeros(qc.shape[:-1], dtype=dt, device=q.device)
    else:
        per_key = g.dim() == 4
        gc = layout.to_chunks(g.to(dt))
        gc = gc.permute(0, 3, 1, 2, 4) if per_key else gc.permute(0, 3, 1, 2)
        G = gc.cumsum(3)  # cumulative over the chunk positions

    if per_key:  # G: [S, H, NC, C, K]
        diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        attn = torch.einsum("shnik,shnjk,shnijk->shnij", qc, kc, diff.exp())
        q_decayed = qc * G.exp()
        k_to_end = kc * (G[..., -1:, :] - G).exp()
        chunk_decay = G[..., -1, :].exp()[..., None]  # [S, H, NC, K, 1]
    else:  # G: [S, H, NC, C]
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
        attn = (qc @ kc.transpose(-1, -2)) * diff.exp()
        q_decayed = qc * G.exp()[..., None]
        k_to_end = kc * (G[..., -1:] - G).exp()[..., None]
        chunk_decay = G[..., -1].exp()[..., None, None]  # [S, H, NC, 1, 1]

    intra = attn @ vc
    state = (initial_state.to(dt) if initial_state is not None
             else q.new_zeros(layout.S, H, K, V, dtype=dt))
    outs = []
    for n in range(layout.NC):
        outs.append(q_decayed[:, :, n] @ state + intra[:, :, n])
        state = chunk_decay[:, :, n] * state + k_to_end[:, :, n].transpose(-1, -2) @ vc[:, :, n]
    o = layout.from_chunks(torch.stack(outs, 2).permute(0, 2, 3, 1, 4))
    return o.to(out_dtype), (state if output_final_state else None)
