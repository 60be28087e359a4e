"""Per-segment transition summary of the (gated) delta rule, for sequence parallelism.

Every segment's update is affine in its incoming state:  S_out = T_r S_in + S_r  with
S_r the segment's final state from zero and T_r [K, K] (float32) the product over its chunks of
exp(G_C) I - (K * exp(G_C - G))^T w  (later chunks on the left).

Both come out of ONE chunked scan with the value dimension extended by K columns: values
[v, 0] and initial state [0, I]. The first V columns of the final state are then S_r, the last K
columns T_r (the zero values add nothing, the identity is carried through the same recurrence).
Gradients flow through the scan's backward like any final-state gradient. The torch reference
uses `chunk_gated_delta_rule_torch`; `chunk_transition` uses the Triton kernels on CUDA (or under
TRITON_INTERPRET=1) and the reference elsewhere."""
from __future__ import annotations

from typing import Optional

import torch

from ..rules import get_rule
from ..utils import num_segments
from .chunk import chunk_gated_delta_rule_torch


def _extended(k: torch.Tensor, v: torch.Tensor, N: int):
    K, V = k.shape[-1], v.shape[-1]
    H = k.shape[2]
    v_ext = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1)
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    eye = torch.eye(K, dtype=dt, device=k.device).expand(N, H, K, K)
    h0 = torch.cat([torch.zeros(N, H, K, V, dtype=dt, device=k.device), eye], -1)
    return v_ext, h0


def chunk_transition_torch(k, v, g: Optional[torch.Tensor], beta, cu_seqlens=None, chunk_size: int = 64,
                           use_qk_l2norm: bool = False):
    """k [B, T, H, K], v [B, T, H, V], g [B, T, H] or None, beta [B, T, H] (varlen: B = 1 and
    cu_seqlens). Returns (T_r [N, H, K, K], S_r [N, H, K, V]), differentiable by autograd."""
    V = v.shape[-1]
    v_ext, h0 = _extended(k, v, num_segments(k, cu_seqlens))
    _, final = chunk_gated_delta_rule_torch(torch.zeros_like(k), k, v_ext, g, beta, None, h0, True, cu_seqlens,
                                            chunk_size, use_qk_l2norm)
    return final[..., V:], final[..., :V]


def chunk_transition(k, v, g, beta, cu_seqlens=None, chunk_size: int = 64, use_qk_l2norm: bool = False):
    """Same contract as `chunk_transition_torch`, with the Triton kernels where they run."""
    from ..triton import INTERPRET  # ImportError: no Triton
    from .chunk_triton import chunk_scan_triton, fallback_reason
    v_ext_dim = v.shape[-1] + k.shape[-1]  # the scan below runs on [v | identity columns]
    if not (k.is_cuda or INTERPRET) or fallback_reason(get_rule("gated_delta"), k, v_ext_dim) is not None:
        return chunk_transition_torch(k, v, g, beta, cu_seqlens, chunk_size, use_qk_l2norm)

    V = v.shape[-1]
    v_ext, h0 = _extended(k, v, num_segments(k, cu_seqlens))
    _, final = chunk_scan_triton(torch.zeros_like(k), k, v_ext, g, beta, None, h0, True, cu_seqlens, chunk_size,
                                 use_qk_l2norm, delta=True)
    return final[..., V:], final[..., :V]


def apply_transition(T_r: torch.Tensor, S_r: torch.Tensor, S_in: torch.Tensor) -> torch.Tensor:
    """S_out = T_r S_in + S_r, all [N, H, K, *]."""
    return torch.einsum("nhij,nhjv->nhiv", T_r, S_in.to(T_r.dtype)) + S_r


def compose_transitions(T_a, S_a, T_b, S_b):
    """Summary of segment a followed by segment b: (T_b T_a, T_b S_a + S_b)."""
    return torch.einsum("nhij,nhjk->nhik", T_b, T_a), apply_transition(T_b, S_b, S_a)
