"""Additive (non-delta) memory updates by their definition, one token at a time:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T (scale * q_t)

g: [B, T, H, K] per-key log-decay (GLA), [B, T, H] one scalar per head (RetNet / Mamba2 /
Lightning style) or None (plain linear attention)."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import recurrence


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
    return recurrence(gla_step, q, k, v, [g], scale, initial_state, output_final_state, cu_seqlens,
                      use_qk_l2norm)
