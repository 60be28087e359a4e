"""The gated delta rule by its definition, one token at a time (the reference).

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

with alpha_t = exp(g_t). g = None gives the plain delta rule (alpha = 1). States are [K, V] per
head and computed in float32 (float64 when the inputs are float64)."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import check_varlen, compute_dtype, l2norm, segment_bounds


def gated_delta_rule_step(q, k, v, g, beta, state, scale: float):
    """One step for a batch of independent sequences.

    q, k: [N, H, K]; v: [N, H, V]; g, beta: [N, H] (g may be None); state: [N, H, K, V].
    Returns (o [N, H, V], new state)."""
    if g is not None:
        state = state * g.exp()[..., None, None]
    kv_mem = torch.einsum("nhk,nhkv->nhv", k, state)
    delta = (v - kv_mem) * beta[..., None]
    state = state + torch.einsum("nhk,nhv->nhkv", k, delta)
    o = torch.einsum("nhk,nhkv->nhv", q * scale, state)
    return o, state


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
):
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; states [N, H, K, V]."""
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
            ot, S = gated_delta_rule_step(q[b, t][None].to(dt), k[b, t][None].to(dt), v[b, t][None].to(dt),
                                          gt, beta[b, t][None].to(dt), S, scale)
            o[b, t] = ot[0]
        finals.append(S[0])
    final = None
    if output_final_state:
        final = torch.stack(finals) if finals else torch.zeros(0, H, K, V, dtype=dt, device=q.device)
    return o.to(v.dtype), final
