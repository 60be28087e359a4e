"""Registry of memory update rules (the paper's Table 1) and one entry point per use:
`memory_scan` (training / prefill, chunked), `memory_step` (decoding), `memory_scan_naive`
(the definition, for tests).

Every rule is one of two families:
  delta rules     S_t = alpha_t (I - beta_t k k^T) S_{t-1} + beta_t k v^T   (gated_delta, delta)
  additive rules  S_t = diag(a_t) S_{t-1} + k v^T           (gla: per key, scalar_decay, linear_attn)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .gated_delta_rule import chunk_gated_delta_rule_torch, gated_delta_rule_step, naive_recurrent_gated_delta_rule
from .gla import chunk_gla_torch, gla_step, naive_recurrent_gla
from .utils import SCAN_KEEPS, l2norm


@dataclass(frozen=True)
class UpdateRule:
    name: str
    delta: bool  # uses beta (the delta rule)
    decay: Optional[str]  # None, "scalar" (one per head) or "vector" (one per key dim)
    summary: str


RULES = {
    "gated_delta": UpdateRule("gated_delta", True, "scalar", "Gated DeltaNet: S = a(I - b k k^T)S + b k v^T"),
    "delta": UpdateRule("delta", True, None, "DeltaNet: S = (I - b k k^T)S + b k v^T"),
    "gla": UpdateRule("gla", False, "vector", "GLA: S = diag(a)S + k v^T"),
    "scalar_decay": UpdateRule("scalar_decay", False, "scalar", "RetNet/Mamba2/Lightning: S = a S + k v^T"),
    "linear_attn": UpdateRule("linear_attn", False, None, "linear attention: S = S + k v^T"),
}


def get_rule(name: str) -> UpdateRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; known: {sorted(RULES)}") from None


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA when the Triton kernels import, else torch. MEGAMOM_KERNELS=torch
    forces the reference path (debugging on GPU)."""
    forced = os.environ.get("MEGAMOM_KERNELS")
    if forced:
        backend = forced
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend {backend!r} is not one of auto, torch, triton")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not (device.type == "cuda" and triton_available()):
        raise RuntimeError("kernel backend 'triton' needs a CUDA device and the Triton kernels "
                           "(pip install 'megamom[gpu]'); use kernel_backend=torch on CPU")
    return backend


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether an op with a Triton kernel runs it on x: the backend resolves to triton (CUDA, Triton
    importable) and x is not float64, the reference precision, which always takes the torch path.
    The one rule every GPU kernel entry point (scan step, conv, norms, MLP, packing) asks."""
    return x.dtype != torch.float64 and resolve_backend(backend, x.device) == "triton"


@functools.cache
def triton_available() -> bool:
    try:
        from . import triton_ops  # noqa: F401
    except Exception:
        return False
    return True


def _check_args(rule: UpdateRule, g, beta):
    if rule.delta and beta is None:
        raise ValueError(f"rule {rule.name!r} needs beta")
    if rule.decay is None and g is not None:
        raise ValueError(f"rule {rule.name!r} has no decay; pass g=None")
    if rule.decay is not None and g is None:
        raise ValueError(f"rule {rule.name!r} needs the log-decay g")
    if rule.decay == "vector" and g.dim() != 4:
        raise ValueError(f"rule {rule.name!r} needs a per-key log-decay g of shape [B, T, H, K]")
    if rule.decay == "scalar" and g.dim() != 3:
        raise ValueError(f"rule {rule.name!r} needs a per-head log-decay g of shape [B, T, H]")


def memory_scan(rule: str | UpdateRule, q, k, v, g=None, beta=None, scale=None, initial_state=None,
                output_final_state=False, cu_seqlens=None, chunk_size=64, use_qk_l2norm=False,
                backend: str = "auto", keep: str = "none"):
    """Chunked scan over [B, T, H, *] (or varlen with cu_seqlens). Returns (o, final_state).
    keep: what the Triton scan's backward takes from its forward instead of recomputing it (more
    memory, less time; see chunk_scan_triton); the torch path has nothing to recompute."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    _check_args(rule, g, beta)
    if keep not in SCAN_KEEPS:
        raise ValueError(f"keep={keep!r} is not one of {SCAN_KEEPS}")
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        from . import triton_ops  # Triton is optional (resolve_backend found it importable)
        reason = triton_ops.fallback_reason(rule, q, v.shape[-1])
        if reason is None:
            return triton_ops.memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state,
                                          cu_seqlens, chunk_size, use_qk_l2norm, keep)
        triton_ops.log_fallback(reason)  # inputs the Triton kernels do not take: the PyTorch path
    return torch_memory_scan(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                             chunk_size, use_qk_l2norm)


def torch_memory_scan(rule: UpdateRule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                      chunk_size, use_qk_l2norm):
    """The PyTorch chunked scan (any device; also where the Triton kernels fall back)."""
    if rule.delta:
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state,
                                            cu_seqlens, chunk_size, use_qk_l2norm)
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                           use_qk_l2norm)


def memory_scan_naive(rule: str | UpdateRule, q, k, v, g=None, beta=None, scale=None, initial_state=None,
                      output_final_state=False, cu_seqlens=None, use_qk_l2norm=False):
    rule = get_rule(rule) if isinstance(rule, str) else rule
    _check_args(rule, g, beta)
    if rule.delta:
        return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                cu_seqlens, use_qk_l2norm)
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)


def memory_step(rule: str | UpdateRule, q, k, v, g, beta, state, scale=None, use_qk_l2norm=False,
                backend: str = "auto"):
    """One decoding step for N independent memories: q, k [N, H, K]; v [N, H, V]; g [N, H] or
    [N, H, K]; beta [N, H]; state [N, H, K, V] (float32). Returns (o [N, H, V], new state)."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(state, backend):
        from . import triton_ops
        return triton_ops.memory_step(rule, q, k, v, g, beta, state, scale, use_qk_l2norm)
    dt = state.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    g = None if g is None else g.to(dt)
    if rule.delta:
        o, state = gated_delta_rule_step(q, k, v, g, beta.to(dt), state, scale)
    else:
        o, state = gla_step(q, k, v, g, state, scale)
    return o, state
