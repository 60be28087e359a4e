"""Decoding step of the additive rules (one token per sequence, state in / state out):
S <- diag(exp(g)) S + k v^T, o = S^T (scale q), with g per key (GLA, [N, H, K]), per head
([N, H]) or None. The kernel is the every-rule step of gated_delta_rule/fused_recurrent.py without
its delta term (DELTA=False)."""
from __future__ import annotations

from typing import Optional

import torch

from ..gated_delta_rule.fused_recurrent import fused_recurrent_step


def fused_recurrent_gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                             state: torch.Tensor, scale: Optional[float] = None, use_qk_l2norm: bool = False,
                             out_state: Optional[torch.Tensor] = None):
    """q, k: [N, H, K]; v: [N, H, V]; state [N, H, K, V] float32. Returns (o [N, H, V], new state);
    out_state=state updates in place. No autograd."""
    return fused_recurrent_step(q, k, v, g, None, state, scale, use_qk_l2norm, delta=False, out_state=out_state)
