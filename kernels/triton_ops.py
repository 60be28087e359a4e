"""Triton entry points behind `megamom.kernels.rules` (backend "triton").

Importing this module raises ImportError where Triton is missing, so `rules.triton_available()`
is False there. Rules and inputs the Triton kernels do not cover fall back to the PyTorch
reference (logged once per reason):
  gated_delta, delta            chunk_triton (WY form, fused q/k L2 norm)
  scalar_decay, linear_attn     chunk_triton with DELTA=False (no WY solve)
  gla (per-key decay)           torch reference
  float64 inputs, head dim K > 256, float32 with K or V > 128 on CUDA   torch reference
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


FP32_MAX_HEAD_DIM = 128


def fallback_reason(rule, q: torch.Tensor, v_dim: int) -> Optional[str]:
    """Why the Triton scan kernels cannot take these inputs (None: they can); v_dim is the value
    head dim the scan runs at. The one place that decides it: the scan and the SP transition
    summary both ask here."""
    if rule.decay == "vector":
        return f"rule {rule.name!r} (per-key decay) has no Triton kernel yet"
    if q.dtype == torch.float64:
        return "float64 inputs"
    if q.dtype == torch.float32 and q.is_cuda and max(q.shape[-1], v_dim) > FP32_MAX_HEAD_DIM:
        # float32 tiles are twice bf16's: at K = V = 256 _fwd_h_kernel needs 320 KB of shared memory
        # (sm_90 has 227 KB); at 128 it needs 172 KB (kernels/triton/aot_check.py). float32 through
        # the Triton scan is checked against float64 on the GPU at K = 64, V = 128 (test_gpu_scan).
        return (f"float32 inputs with head dims ({q.shape[-1]}, {v_dim}) above {FP32_MAX_HEAD_DIM} on CUDA "
                "(the float32 tiles exceed shared memory; bf16 / autocast takes the fast path)")
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                use_qk_l2norm, keep="none"):
    """Chunked scan of `rule` (a rules.UpdateRule). Returns (o [B, T, H, V], final state or None)."""
    reason = fallback_reason(rule, q, v.shape[-1])
    if reason is not None:
        _fallback(reason)
        return torch_memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size, use_qk_l2norm)
    if chunk_size not in SUPPORTED_CHUNKS:
        _fallback(f"chunk size {chunk_size} (Triton kernels use 16/32/64; the result does not depend on it)")
        chunk_size = 64
    return chunk_scan_triton(q, k, v, g, beta if rule.delta else None, scale, initial_state, output_final_state,
                             cu_seqlens, chunk_size, use_qk_l2norm, delta=rule.delta, keep=keep)


def memory_step(rule, q, k, v, g, beta, state, scale=None, use_qk_l2norm=False, out_state=None):
    """One decoding step for every rule (see gated_delta_rule/fused_recurrent.py); same contract
    as rules.memory_step, plus out_state=state for an in-place update."""
    return fused_recurrent_step(q, k, v, g, beta if rule.delta else None, state, scale, use_qk_l2norm,
                                delta=rule.delta, out_state=out_state)


__all__ = ["memory_scan", "memory_step", "chunk_scan_triton", "fused_recurrent_step", "chunk_transition"]
