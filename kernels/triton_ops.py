"""Triton entry points behind `megamom.kernels.rules` (backend "triton").

Importing this module raises ImportError where Triton is missing, so `rules.triton_available()`
is False there. Rules and inputs the Triton kernels do not cover fall back to the PyTorch
reference (logged once per reason):
  gated_delta, delta            chunk_triton (WY form, fused q/k L2 norm)
  scalar_decay, linear_attn     chunk_triton with DELTA=False (no WY solve)
  gla (per-key decay)           torch reference
  float64 inputs, float32 inputs on CUDA, head dim K > 256             torch reference
  chunk sizes other than 16/32/64                                       run at 64
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .triton import INTERPRET  # noqa: F401  (raises ImportError without Triton)
from .gated_delta_rule.chunk_triton import chunk_scan_triton
from .gated_delta_rule.fused_recurrent import fused_recurrent_step
from .gated_delta_rule.transition import chunk_transition
from .rules import torch_memory_scan

log = logging.getLogger(__name__)
_logged: set[str] = set()
SUPPORTED_CHUNKS = (16, 32, 64)


def _fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning("megamom triton_ops: %s; using the PyTorch reference kernel", reason)


def fallback_reason(rule, q: torch.Tensor) -> Optional[str]:
    """Why the Triton scan kernels cannot take these inputs (None: they can). The one place that
    decides it: the scan and the SP transition summary both ask here."""
    if rule.decay == "vector":
        return f"rule {rule.name!r} (per-key decay) has no Triton kernel yet"
    if q.dtype == torch.float64:
        return "float64 inputs"
    if q.dtype == torch.float32 and q.is_cuda:
        # Seen on H100/H200 with Triton 3.6 (2026-11-26): dw of the backward wrong by ~1e-2 in fp32.
        # Session 9 traced it to _bwd_dqkwg_kernel's software pipelining (num_stages >= 2, which
        # also gave bf16 a wrong or irreproducible dw); with one stage the fp32 stage check passes
        # (dq 1.2e-3 worst, tf32), but fp32 end to end through Triton is not validated yet.
        return "float32 inputs on CUDA (not validated on the Triton kernels yet; cast to bf16 for the fast path)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                use_qk_l2norm):
    """Chunked scan of `rule` (a rules.UpdateRule). Returns (o [B, T, H, V], final state or None)."""
    reason = fallback_reason(rule, q)
    if reason is not None:
        _fallback(reason)
        return torch_memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size, use_qk_l2norm)
    if chunk_size not in SUPPORTED_CHUNKS:
        _fallback(f"chunk size {chunk_size} (Triton kernels use 16/32/64; the result does not depend on it)")
        chunk_size = 64
    return chunk_scan_triton(q, k, v, g, beta if rule.delta else None, scale, initial_state, output_final_state,
                             cu_seqlens, chunk_size, use_qk_l2norm, delta=rule.delta)


def memory_step(rule, q, k, v, g, beta, state, scale=None, use_qk_l2norm=False, out_state=None):
    """One decoding step for every rule (see gated_delta_rule/fused_recurrent.py); same contract
    as rules.memory_step, plus out_state=state for an in-place update."""
    return fused_recurrent_step(q, k, v, g, beta if rule.delta else None, state, scale, use_qk_l2norm,
                                delta=rule.delta, out_state=out_state)


__all__ = ["memory_scan", "memory_step", "chunk_scan_triton", "fused_recurrent_step", "chunk_transition"]
