"""Small building blocks shared by every architecture."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamom.kernels import use_triton


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def autocast_target_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would cast x to before a matmul: the compute dtype for float32 x, x's own
    otherwise (autocast leaves float64 alone)."""
    return compute_dtype(x) if x.dtype == torch.float32 else x.dtype


def cast_for_autocast(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast compute dtype when autocast is on, so that several linears reading the
    same activation share one cast (autocast casts each linear's input separately: one copy per
    linear, and one float32 gradient add per linear in the backward). Trade-off: the consumers'
    input gradients are then summed in that dtype before the single cast's backward (the MoM
    layer's dx vs float64 under bf16 autocast: 9.1e-3 instead of 8.8e-3, H200). Only float32 is
    cast (autocast leaves float64 alone)."""
    return x.to(autocast_target_dtype(x))


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ParallelRegion:
    """The seams of a sublayer whose weights a tensor-parallel layout splits (attention / memory
    heads, MLP columns). On one rank each is the identity; `megamom.parallel.parallelize` sets them
    to the tensor group's communications, so every projection inside reads one entered input and
    the sublayer pays one communication each way, as Megatron's column-parallel linears followed by
    a row-parallel one:
      enter_region      activations [B, T, d] in: copy (its gradient summed), or with TP sequence
                        parallelism all-gather along T (reduce-scatter back)
      exit_region       partial outputs [B, T, d] out: all-reduce, or reduce-scatter along T
      enter_replicated  a tensor every rank holds alike (the routing weights) read inside: copy
      gather_tokens     per-token values [B, T, ...] computed outside the region on this rank's
                        slice of the sequence (the router's) -> the whole sequence; the identity
                        without TP sequence parallelism"""
    enter_region = staticmethod(identity)
    exit_region = staticmethod(identity)
    enter_replicated = staticmethod(identity)
    gather_tokens = staticmethod(identity)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend  # model.kernel_backend: auto = Triton on CUDA
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None):
        """RMSNorm(x) in out_dtype (default: x's). With `residual`: (s = x + residual, RMSNorm(s)), in one
        Triton kernel each way on the GPU: a pre-norm model's residual add fused with the next norm,
        so each residual tensor has one consumer (no separate add, no gradient accumulation)."""
        if residual is not None:
            if use_triton(x, self.backend):
                from megamom.kernels.triton.rmsnorm import add_rms_norm
                return add_rms_norm(x, residual, self.weight, self.eps, out_dtype or x.dtype)
            s = x + residual
            return s, self._norm(s).to(out_dtype or s.dtype)
        return self._norm(x).to(out_dtype or x.dtype)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x, self.backend):
            from megamom.kernels.triton.rmsnorm import rms_norm  # one kernel each way
            return rms_norm(x, self.weight, self.eps)
        # Normalise in float32 at least (bf16 variance loses too much).
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Per-head output norm of the memory layers: RMSNorm(o) * weight * swish(gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = self._norm(x)
        return y if gate is None else y * F.silu(gate.to(y.dtype))


_INFERENCE_CACHE = "_inference_cache"
_inference_depth = 0  # open `inference_weights` contexts


@contextlib.contextmanager
def inference_weights(model: nn.Module):
    """Within it, weights stacked outside autograd (`cached_for_inference`) are kept between calls
    instead of being stacked at every decode step; when the outermost context exits they are
    dropped (a CUDA graph captured inside holds its own references: `held_inference_weights`).
    Elsewhere (an evaluation pass during training, say) nothing is kept."""
    global _inference_depth
    _inference_depth += 1
    try:
        yield
    finally:
        _inference_depth -= 1
        if not _inference_depth:
            for module in model.modules():
                module.__dict__.pop(_INFERENCE_CACHE, None)


def cached_for_inference(owner: nn.Module, name: str, build: Callable[[], Any]) -> Any:
    """build() (weights stacked for one GEMM, say), kept on `owner` inside `inference_weights`
    outside autograd while none of its parameters changes (same storage, no in-place update).
    Elsewhere build() runs every time (under autograd inside the graph)."""
    if torch.is_grad_enabled() or not _inference_depth:
        return build()
    key = tuple((p.data_ptr(), p._version) for p in owner.parameters())
    store = owner.__dict__.setdefault(_INFERENCE_CACHE, {})
    hit = store.get(name)
    if hit is None or hit[0] != key:
        hit = store[name] = (key, build())
    return hit[1]


def held_inference_weights(model: nn.Module) -> list:
    """What `cached_for_inference` keeps for the model's modules now (for a CUDA graph that reads it
    to keep alive after the context drops it)."""
    return [value for module in model.modules() for _, value in module.__dict__.get(_INFERENCE_CACHE, {}).values()]


class SwiGLU(nn.Module, ParallelRegion):
    def __init__(self, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend  # model.kernel_backend: auto = the fused Triton activation on CUDA
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter_region(cast_for_autocast(x))
        if use_triton(x, self.backend):
            # one GEMM by the stacked weights: the input is read once and its gradient comes out of
            # one GEMM (two would be summed); the fused activation writes [dgate | dup] in one buffer
            from megamom.kernels.triton.swiglu import swiglu_packed
            stacked = cached_for_inference(self, "gate_up", lambda: torch.cat([self.gate_proj.weight,
                                                                                 self.up_proj.weight]))
            gate_up = F.linear(x, stacked)
            return self.exit_region(self.down_proj(swiglu_packed(gate_up)))
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.exit_region(self.down_proj(F.silu(gate) * up))
