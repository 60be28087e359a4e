"""Small building blocks shared by every architecture."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamom.kernels import resolve_backend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend  # model.kernel_backend: auto = Triton on CUDA
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float64 and resolve_backend(self.backend, x.device) == "triton":
            from megamom.kernels.triton.rmsnorm import rms_norm  # one kernel each way
            return rms_norm(x, self.weight, self.eps)
        # Normalise in float32 at least (bf16 variance loses too much).
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Per-head output norm of the memory layers: RMSNorm(o) * weight * swish(gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        return y if gate is None else y * F.silu(gate.to(y.dtype))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
