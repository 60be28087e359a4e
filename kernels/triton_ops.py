"""Triton entry points behind `megamom.kernels.rules` (backend "triton").

Importing this module raises ImportError where Triton is missing, so `rules.triton_available()`
is False there. Each rule family runs its own op folder's kernels:
  gated_delta, delta            gated_delta_rule/chunk_triton.py (WY form, fused q/k L2 norm)
  scalar_decay, linear_attn     gla/chunk_triton.py (the same chunk kernels with DELTA=False: no WY solve)
  gla (per-key decay)           no Triton chunk kernel
  decode step, every rule       gated_delta_rule/fused_recurrent.py, gla/fused_recurrent.py
Inputs the scan kernels do not take (`fallback_reason`: per-key decay, float64, head dim K > 256,
float32 with K or V > 128 on CUDA) are sent to the PyTorch reference by `rules.memory_scan` (logged
once per reason); chunk sizes other than 16/32/64 run at 64.
"""
from __future__ import annotations

import logging

from .triton import INTERPRET  # noqa: F401  (raises ImportError without Triton)
from .gated_delta_rule.chunk_triton import FP32_MAX_HEAD_DIM, chunk_scan_triton, fallback_reason  # noqa: F401
from .gated_delta_rule.fused_recurrent import fused_recurrent_step
from .gla.chunk_triton import chunk_gla_triton
from .gla.fused_recurrent import fused_recurrent_gla_step

log = logging.getLogger(__name__)
_logged: set[str] = set()
SUPPORTED_CHUNKS = (16, 32, 64)


def log_fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("megamom triton_ops: %s; using the PyTorch reference kernel", reason)


def memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                use_qk_l2norm, keep="none"):
    """Chunked scan of `rule` (a rules.UpdateRule). Returns (o [B, T, H, V], final state or None).
    Inputs with a `fallback_reason` are refused: `rules.memory_scan` runs those on the PyTorch path."""
    reason = fallback_reason(rule, q, v.shape[-1])
    if reason is not None:
        raise ValueError(f"the Triton scan kernels do not take these inputs: {reason} "
                         "(rules.memory_scan runs them on the PyTorch reference)")
    if chunk_size not in SUPPORTED_CHUNKS:
        log_fallback(f"chunk size {chunk_size} (Triton kernels use 16/32/64; the result does not depend on it)")
        chunk_size = 64
    if rule.delta:
        return chunk_scan_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                                 use_qk_l2norm, delta=True, keep=keep)
    return chunk_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                            use_qk_l2norm, keep=keep)


def memory_step(rule, q, k, v, g, beta, state, scale=None, use_qk_l2norm=False, out_state=None):
    """One decoding step for every rule (see gated_delta_rule/fused_recurrent.py); same contract
    as rules.memory_step, plus out_state=state for an in-place update."""
    if rule.delta:
        return fused_recurrent_step(q, k, v, g, beta, state, scale, use_qk_l2norm, delta=True, out_state=out_state)
    return fused_recurrent_gla_step(q, k, v, g, state, scale, use_qk_l2norm, out_state=out_state)


__all__ = ["memory_scan", "memory_step", "chunk_scan_triton", "fused_recurrent_step", "chunk_gla_triton",
           "fused_recurrent_gla_step", "fallback_reason", "FP32_MAX_HEAD_DIM"]
