"""The additive rules with a per-head decay or none (scalar_decay, linear_attn) on the Triton chunk
kernels: S_C = exp(G_C) S_0 + (K * exp(G_C - G))^T V, O = exp(G) Q S_0 + (Q K^T * E)_causal V. They are
the chunked scan of gated_delta_rule/chunk_triton.py with its delta term off (DELTA=False: no WY
factors, vn = v; the same state recurrence, output and backward kernels). Per-key decay (GLA) has no
Triton chunk kernel: `rules.memory_scan` runs it on the PyTorch path (chunk.py)."""
from __future__ import annotations

from typing import Optional

from ..gated_delta_rule.chunk_triton import chunk_scan_triton


def chunk_gla_triton(q, k, v, g=None, scale: Optional[float] = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, chunk_size: int = 64,
                     use_qk_l2norm: bool = False, keep: str = "none"):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] float32 log-decay or None; states [N, H, K, V]
    float32. Returns (o [B, T, H, V], final state or None); keep as in `chunk_scan_triton`."""
    if g is not None and g.dim() != 3:
        raise ValueError(f"the Triton chunk kernels take one log-decay per head ([B, T, H]), got g {tuple(g.shape)}")
    return chunk_scan_triton(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                             use_qk_l2norm, delta=False, keep=keep)
