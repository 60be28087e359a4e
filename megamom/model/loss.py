"""Language-model loss without the [tokens, vocab] logits: the output projection and the cross
entropy chunk by chunk of rows, gradients computed in the same pass.

The plain path holds bf16 logits, their float32 copy and the float32 softmax gradient for all
tokens at once (B8 T2048, vocab 32000: ~5 GiB). Here one chunk of rows is live at a time; the
gradients of the hidden states and of the output weight are computed in the forward pass (the
softmax is at hand there) and scaled by the incoming gradient in backward. Same GEMMs, same
rounding points as autocast (bf16 matmuls, float32 softmax), float32 accumulation of dW. On the
GPU (kernel backend auto / triton) the softmax, loss and logit gradient of a chunk are one Triton
kernel (`kernels/triton/cross_entropy.py`) instead of about six torch passes over [chunk, vocab]."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamom.kernels import use_triton

from .layers import compute_dtype

IGNORE_INDEX = -100


def _chunk_logits(xc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = xc @ w.t()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64


def _loss_grad(xc: torch.Tensor, wd: torch.Tensor, lab: torch.Tensor):
    """One chunk of rows: (sum of their losses, d(that sum)/d logits in xc's dtype)."""
    valid = lab != IGNORE_INDEX
    logits = _chunk_logits(xc, wd)
    lse = logits.logsumexp(-1)
    tgt = lab.clamp(min=0)
    loss = ((lse - logits.gather(1, tgt[:, None])[:, 0]) * valid).sum()
    # d(sum of losses)/d logits = softmax - onehot(target), zero for ignored rows; in place of the
    # logits (dead after the gather above): one [chunk, vocab] buffer, not two
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), tgt] -= 1.0
    grad.mul_(valid[:, None])
    return loss, grad.to(xc.dtype)


def _loss_grad_fused(xc: torch.Tensor, wd: torch.Tensor, lab: torch.Tensor):
    """_loss_grad in one Triton kernel, which overwrites the logits (in the matmul's dtype) with
    their gradient."""
    from megamom.kernels.triton.cross_entropy import cross_entropy_loss_grad_
    grad = xc @ wd.t()
    return cross_entropy_loss_grad_(grad, lab, IGNORE_INDEX).sum(), grad


def _loss_sum(xc: torch.Tensor, wd: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """One chunk of rows: the sum of their losses (evaluation)."""
    return F.cross_entropy(_chunk_logits(xc, wd), lab, ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk_rows, dtype, loss_grad):
        xd, wd = x.to(dtype), weight.to(dtype)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device)
        for s in range(0, x.shape[0], chunk_rows):
            xc = xd[s:s + chunk_rows]
            chunk_loss, grad = loss_grad(xc, wd, labels[s:s + chunk_rows])
            loss += chunk_loss
            dx[s:s + chunk_rows] = grad @ wd
            dw += (grad.t() @ xc).to(dw.dtype)
        ctx.save_for_backward(dx, dw, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return (dx * scale).to(dx.dtype), (dw * scale).to(ctx.weight_dtype), None, None, None, None


def chunked_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                                 dtype: torch.dtype, loss_grad=_loss_grad, loss_sum=_loss_sum) -> torch.Tensor:
    """mean over non-ignored rows of CE(x @ weight^T, labels), `chunk_rows` rows at a time, the
    matmuls in `dtype`. With gradients, those of x and weight are computed in the same pass from
    `loss_grad(x chunk, weight, labels chunk) -> (loss sum, logits gradient)`; without, the loss is
    summed by `loss_sum(...)`. The vocabulary-parallel loss (megamom.parallel.tensor_parallel)
    passes its own pair."""
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(x, weight, labels, chunk_rows, dtype, loss_grad)
        with torch.no_grad():  # evaluation: the loss only
            xd, wd = x.to(dtype), weight.to(dtype)
            total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=x.device)
            for s in range(0, x.shape[0], chunk_rows):
                total += loss_sum(xd[s:s + chunk_rows], wd, labels[s:s + chunk_rows])
            return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                         backend: str = "auto") -> torch.Tensor:
    """mean over non-ignored rows of CE(x @ weight^T, labels). x [N, d]; weight [V, d]; labels [N]
    (-100 = ignore). chunk_rows <= 0: the plain path (all logits at once). backend: the model's
    kernel_backend (auto: the fused Triton cross entropy on CUDA)."""
    if chunk_rows <= 0:
        logits = F.linear(x, weight)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels,
                               ignore_index=IGNORE_INDEX)
    return chunked_linear_cross_entropy(x, weight, labels, chunk_rows, compute_dtype(x),
                                        _loss_grad_fused if use_triton(x, backend) else _loss_grad)


class LMLoss(nn.Module):
    """The language-model loss as the model's own stage, so a parallel layout can swap it (a
    vocab-parallel cross entropy under tensor parallelism) without touching the model. Given
    logits (evaluation, generation) it is the plain cross entropy of them; otherwise the chunked
    linear cross entropy above, which never holds the [tokens, vocab] logits."""

    def __init__(self, chunk_rows: int, backend: str = "auto"):
        super().__init__()
        self.chunk_rows, self.backend = chunk_rows, backend

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The output layer: [.., d] -> [.., V] (a vocab-parallel loss gathers its shards)."""
        return F.linear(hidden, weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [.., d], weight [V, d], labels [..] (-100 = ignore), logits [.., V] or None."""
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if logits is not None:
            logits = logits.reshape(-1, logits.shape[-1])
            ce_dtype = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64
            return F.cross_entropy(logits.to(ce_dtype), labels, ignore_index=IGNORE_INDEX)
        return linear_cross_entropy(hidden, weight, labels, self.chunk_rows, self.backend)
