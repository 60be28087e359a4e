"""y = silu(gate) * up, one kernel each way (the MLP's activation). torch runs it as 2 kernels
forward and 3 backward and keeps silu(gate) for the backward; this keeps only its two inputs.
Math in float32, outputs in the inputs' dtype. The reference is `F.silu(gate) * up`.

`swiglu_packed` takes both halves from one [..., 2I] tensor (the output of one GEMM by the stacked
gate and up weights) and writes their gradients into one [..., 2I] buffer: the GEMM's backward then
reads it as is (two GEMMs would each read the MLP input and sum their input gradients)."""
from __future__ import annotations

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from . import launch_cfg


# One program per (row, block of columns): gate / up columns of a row are contiguous in either
# layout (separate tensors: row stride I; packed: one tensor passed as both, row stride 2I, up
# starting UP = I elements after gate; a view at that offset would do on the GPU, but the
# interpreter copies each argument by its own extent).
@triton.jit
def _offsets(I: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """-> (offsets of this tile in the [rows, I] output, in the gate / up rows of stride STRIDE, mask)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row * I + cols, row * STRIDE + cols, cols < I


@triton.jit
def _swiglu_fwd_kernel(gate, up, y, I: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr, BLOCK: tl.constexpr):
    out, src, mask = _offsets(I, STRIDE, BLOCK)
    b_g = tl.load(gate + src, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(up + UP + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + out, (b_g * tl.sigmoid(b_g) * b_u).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate, up, dy, dgate, dup, I: tl.constexpr, STRIDE: tl.constexpr, UP: tl.constexpr,
                       BLOCK: tl.constexpr):
    out, src, mask = _offsets(I, STRIDE, BLOCK)
    b_g = tl.load(gate + src, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(up + UP + src, mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + out, mask=mask, other=0.0).to(tl.float32)
    b_s = tl.sigmoid(b_g)
    tl.store(dup + UP + src, (b_dy * b_g * b_s).to(dup.dtype.element_ty), mask=mask)
    tl.store(dgate + src, (b_dy * b_u * b_s * (1.0 + b_g * (1.0 - b_s))).to(dgate.dtype.element_ty), mask=mask)


def _grid(rows: int, I: int):
    cfg = launch_cfg("swiglu")
    BLOCK = min(cfg.pop("BLOCK"), triton.next_power_of_2(I))
    return (rows, triton.cdiv(I, BLOCK)), BLOCK, cfg


class SwiGLUFunction(torch.autograd.Function):
    """packed: inputs = (gu,) of [..., 2I]; else (gate, up) of [..., I]."""

    @staticmethod
    def forward(ctx, *inputs):
        I = inputs[0].shape[-1] // 2 if len(inputs) == 1 else inputs[0].shape[-1]
        flat = [t.reshape(-1, t.shape[-1]).contiguous() for t in inputs]
        rows = flat[0].shape[0]
        gate, up = (flat[0], flat[0]) if len(flat) == 1 else flat
        y = torch.empty(rows, I, dtype=flat[0].dtype, device=flat[0].device)
        grid, BLOCK, cfg = _grid(rows, I)
        if rows and I:
            _swiglu_fwd_kernel[grid](gate, up, y, I=I, STRIDE=flat[0].shape[-1], UP=I if len(flat) == 1 else 0,
                                     BLOCK=BLOCK, **cfg)
        ctx.save_for_backward(*flat)
        ctx.shapes = [t.shape for t in inputs]
        return y.view(*inputs[0].shape[:-1], I)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        flat = ctx.saved_tensors
        I = dy.shape[-1]
        rows = flat[0].shape[0]
        grads = [torch.empty_like(t) for t in flat]
        packed = len(flat) == 1
        gate, up = (flat[0], flat[0]) if packed else flat
        dgate, dup = (grads[0], grads[0]) if packed else grads
        grid, BLOCK, cfg = _grid(rows, I)
        if rows and I:
            _swiglu_bwd_kernel[grid](gate, up, dy.reshape(rows, I).contiguous(), dgate, dup, I=I,
                                     STRIDE=flat[0].shape[-1], UP=I if packed else 0, BLOCK=BLOCK, **cfg)
        return tuple(g.view(s) for g, s in zip(grads, ctx.shapes))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match")
    return SwiGLUFunction.apply(gate, up)


def swiglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] along the last dim ([..., 2I] -> [..., I])."""
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: the last dim {gu.shape[-1]} must be even ([gate | up])")
    return SwiGLUFunction.apply(gu)
