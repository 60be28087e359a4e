"""Additive (non-delta) memory updates by their definition, one token at a time:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale * q_t)

g: [B, T, H, K] per-key log-decay (GLA), [B, T, H] one scalar per head (RetNet / Mamba2 /
Lightning style) or None (plain linear attention)."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import check_varlen, compute_dtype, l2norm, segment_bounds


def gla_step(q, k, v, g, state, scale: float):
    """q, k: [N, H, K]; v: [N, H, V]; g: [N, H, K], [N, H] or None; state [N, H, K, V]."""
    if g is not None:
        decay = g.exp()
        state = state * (decay[..., None] if decay.dim() == 3 else decay[..., None, None])
    state = state + torch.einsum("nhk,nhv->nhkv", k, v)
    o = torch.einsum("nhk,nhkv->nhv", q * scale, state)
    return o, state


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
):
    check_varlen(q, cu_seqlens, initial_state)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v)
    if use_qk_l2norm:
        q, k = l2norm(q.to(dt)), l2norm(k.to(dt))
    o = torch.zeros(*v.shape, dtype=dt, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(segment_bounds(q, cu_seqlens)):
        S = (initial_state[n].to(dt) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dt, device=q.device))[None]
        for t in range(start, end):
            gt = None if g is None else g[b, t][None].to(dt)
            ot, S = gla_step(q[b, t][None].to(dt), k[b, t][None].to(dt), v[b, t][None].to(dt), gt, S, scale)
            o[b, t] = ot[0]
        finals.append(S[0])
    final = None
    if output_final_state:
        final = torch.stack(finals) if finals else torch.zeros(0, H, K, V, dtype=dt, device=q.device)
    return o.to(v.dtype), final
