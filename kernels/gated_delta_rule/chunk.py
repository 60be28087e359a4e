"""Chunked gated delta rule in plain PyTorch (any device; the CPU path and the reference the
Triton kernels are checked against).

Within a chunk of C tokens with cumulative log-decay G_i (G_i = g_1 + ... + g_i), state S_0 at the
chunk start and Gamma_ij = exp(G_i - G_j):

    (I + L) U = beta V - beta exp(G) K S_0,     L_ij = beta_i Gamma_ij k_i.k_j  (j < i)
    O   = exp(G) Q S_0 + (Q K^T * Gamma)_causal U
    S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T U

so with the WY factors u = (I+L)^-1 beta V and w = (I+L)^-1 beta exp(G) K, U = u - w S_0.
Only one triangular solve per chunk; the recurrence over chunks is a short Python loop over
the chunk index, batched over all segments and heads."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import ChunkLayout, check_varlen, compute_dtype, cumulative_decay, l2norm


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = False,
):
    """Same contract as `naive_recurrent_gated_delta_rule`; differentiable by autograd."""
    check_varlen(q, cu_seqlens, initial_state)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v)
    out_dtype = v.dtype
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    g = torch.zeros_like(beta) if g is None else g.to(dt)
    layout = ChunkLayout(q, cu_seqlens, chunk_size)
    C = chunk_size
    # [S, NC, C, H, D] -> [S, H, NC, C, D]
    qc, kc, vc = (layout.to_chunks(x).permute(0, 3, 1, 2, 4) for x in (q * scale, k, v))
    gc, bc = (layout.to_chunks(x).permute(0, 3, 1, 2) for x in (g, beta))

    G, Gamma = cumulative_decay(gc, dt)
    eG = G.exp().to(dt)
    eye = torch.eye(C, dtype=dt, device=q.device)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    L = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * Gamma).masked_fill(~strict, 0)
    rhs = torch.cat([bc[..., None] * vc, (bc * eG)[..., None] * kc], -1)
    wy = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True)
    u, w = wy[..., :V], wy[..., V:]
    attn = (qc @ kc.transpose(-1, -2)) * Gamma
    q_decayed = qc * eG[..., None]
    k_to_end = kc * (G[..., -1:] - G).exp().to(dt)[..., None]
    chunk_decay = G[..., -1].exp().to(dt)  # [S, H, NC]

    S_ = layout.S
    state = (initial_state.to(dt) if initial_state is not None
             else q.new_zeros(S_, H, K, V, dtype=dt))
    outs = []
    # unbind once: indexing [:, :, n] inside the loop would give every chunk a full-size gradient
    # buffer in backward (quadratic in the number of chunks)
    per_chunk = zip(u.unbind(2), w.unbind(2), q_decayed.unbind(2), attn.unbind(2), k_to_end.unbind(2),
                    chunk_decay.unbind(2))
    for u_n, w_n, q_n, attn_n, k_n, decay_n in per_chunk:
        U = u_n - w_n @ state
        outs.append(q_n @ state + attn_n @ U)
        state = decay_n[..., None, None] * state + k_n.transpose(-1, -2) @ U
    o = torch.stack(outs, 2).permute(0, 2, 3, 1, 4)  # [S, NC, C, H, V]
    o = layout.from_chunks(o)
    return o.to(out_dtype), (state if output_final_state else None)
