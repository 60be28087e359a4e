"""A memory layer's decode step from the projections on (the reference of
kernels/triton/decode_step.py, same arguments): routing choice, short conv step, activation,
gates and the recurrent update of the chosen memories, their outputs and routing weights."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .rules import gated_delta_rule_step, gla_step, l2norm


def memory_decode_step_naive(q_raw: torch.Tensor, rows: torch.Tensor, topk_index: Optional[torch.Tensor],
                             topk_weight: Optional[torch.Tensor], shared: bool, state: torch.Tensor,
                             conv_weights: Optional[tuple] = None, conv_tails: Optional[tuple] = None, *,
                             head_dim: int, delta: bool, decay: Optional[str], A_log=None, dt_bias=None,
                             decay_bias=None, gla_normalizer: float = 1.0, silu: bool = True, l2: bool = True,
                             scale: Optional[float] = None, in_place: bool = False, out_dtype=None):
    """See megamom.kernels.triton.decode_step.memory_decode_step. Computes in the state's dtype
    (float64 for the reference); in_place copies the results into the given state and tails."""
    B, M, _ = rows.shape
    K = head_dim
    H, V = state.shape[2], state.shape[4]
    dt = state.dtype
    weight = torch.zeros(B, M, dtype=dt, device=rows.device)
    if topk_index is not None:
        weight.scatter_(1, topk_index, topk_weight.to(dt))
    chosen = weight != 0
    if topk_index is not None:
        chosen = torch.zeros_like(chosen).scatter_(1, topk_index, True)
    if shared:
        weight[:, -1], chosen[:, -1] = 1.0, True
    k_raw, v_raw, rest = rows.split([H * K, H * V, rows.shape[-1] - H * (K + V)], -1)
    raw = (q_raw[:, None].expand(B, M, -1), k_raw, v_raw)
    new_tails = None
    if conv_weights is not None:
        feats, new_tails = [], []
        for x, w, tails in zip(raw, conv_weights, conv_tails):
            window = torch.cat([tails.transpose(0, 1).to(dt), x[:, :, None].to(dt)], 2)  # [B, M, W, C]
            feats.append((window * w.to(dt).transpose(-1, -2)[None]).sum(2))
            kept = torch.where(chosen[:, :, None, None], window[:, :, 1:], window[:, :, :-1])
            new_tails.append(kept.transpose(0, 1).to(tails.dtype))
    else:
        feats = [x.to(dt) for x in raw]
    q, k, v = (F.silu(f) if silu else f for f in feats)
    q, k = q.reshape(B, M, H, K), k.reshape(B, M, H, K)
    v = v.reshape(B, M, H, V)
    beta = g = None
    if delta:
        beta, rest = rest[..., :H].to(dt).sigmoid(), rest[..., H:]
    if decay == "scalar":
        g = -A_log.to(dt).exp() * F.softplus(rest.to(dt) + dt_bias.to(dt))
    elif decay == "vector":
        a = rest.to(dt) + (0 if decay_bias is None else decay_bias.to(dt)[None])
        g = F.logsigmoid(a).reshape(B, M, H, K) / gla_normalizer
    if l2:
        q, k = l2norm(q), l2norm(k)
    s = state.transpose(0, 1).to(dt).reshape(B * M, H, K, V)
    flat = lambda t: None if t is None else t.reshape(B * M, *t.shape[2:])  # noqa: E731
    scale = K ** -0.5 if scale is None else scale
    if delta:
        o, s_new = gated_delta_rule_step(flat(q), flat(k), flat(v), flat(g), flat(beta), s, scale)
    else:
        o, s_new = gla_step(flat(q), flat(k), flat(v), flat(g), s, scale)
    s_new = torch.where(chosen.reshape(B * M, 1, 1, 1), s_new, s).view(B, M, H, K, V).transpose(0, 1)
    o = (o.view(B, M, H, V) * chosen[:, :, None, None]).transpose(0, 1).to(out_dtype or rows.dtype)
    if in_place:
        state.copy_(s_new)
        for tails, new in zip(conv_tails or (), new_tails or ()):
            tails.copy_(new)
        return o, weight.float(), state, conv_tails
    return o, weight.float(), s_new.to(state.dtype).contiguous(), \
        None if new_tails is None else tuple(t.contiguous() for t in new_tails)
