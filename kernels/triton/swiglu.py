"""y = silu(gate) * up, one kernel each way (the MLP's activation). torch runs it as 2 kernels
forward and 3 backward and keeps silu(gate) for the backward; this keeps only its two inputs.
Math in float32, outputs in the inputs' dtype. The reference is `F.silu(gate) * up`."""
from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from . import launch_cfg


@triton.jit
def _swiglu_fwd_kernel(gate, up, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b_g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(up + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + offs, (b_g * tl.sigmoid(b_g) * b_u).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate, up, dy, dgate, dup, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b_g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(up + offs, mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    b_s = tl.sigmoid(b_g)
    tl.store(dup + offs, (b_dy * b_g * b_s).to(dup.dtype.element_ty), mask=mask)
    tl.store(dgate + offs, (b_dy * b_u * b_s * (1.0 + b_g * (1.0 - b_s))).to(dgate.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        cfg = launch_cfg("swiglu")
        BLOCK = cfg.pop("BLOCK")
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, **cfg)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        cfg = launch_cfg("swiglu")
        BLOCK = cfg.pop("BLOCK")
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, dy.contiguous(), dgate, dup, n, BLOCK=BLOCK, **cfg)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match")
    return SwiGLUFunction.apply(gate, up)
