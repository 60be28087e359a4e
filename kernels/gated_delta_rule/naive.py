"""The gated delta rule by its definition, one token at a time (the reference).

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

with alpha_t = exp(g_t). g = None gives the plain delta rule (alpha = 1). States are [K, V] per
head and computed in float32 (float64 when the inputs are float64)."""
from __future__ import annotations

from typing import Optional

import torch

from ..utils import recurrence


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
    return recurrence(gated_delta_rule_step, q, k, v, [g, beta], scale, initial_state, output_final_state,
                      cu_seqlens, use_qk_l2norm)
