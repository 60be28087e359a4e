"""Cross entropy of a chunk of logit rows and its gradient, one kernel: per row the loss
lse - logit[target] and, written over the logits, softmax - onehot(target) (zero for ignored
rows). torch runs the same as a float32 copy, logsumexp, sub, exp, mul and a cast back (plus a
gather and an index-put of one element per row): about six full passes over [rows, vocab]; this
reads the row twice and writes it once. Labels outside [0, V) other than ignore_index are not
checked here (no host sync): they are never read out of the row, their loss is the logsumexp and
their gradient the softmax (in the model the embedding lookup of the same token ids fails first). Math in
float32 whatever the logits' dtype (as the torch path, which casts to float32 first). The
reference is `megamom.model.loss` on float64 / CPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _ce_loss_grad_kernel(logits, labels, loss, stride, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    label = tl.load(labels + row).to(tl.int64)
    valid = label != ignore_index
    # online logsumexp over blocks of the row (block max, rescaled running sum)
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    in_vocab = valid & (label >= 0) & (label < V)  # never read out of the row (see the module docstring)
    x_t = tl.load(base + label, mask=in_vocab, other=0.0).to(tl.float32)
    tl.store(loss + row, tl.where(valid, lse - x_t, 0.0))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(base + cols, g.to(logits.dtype.element_ty), mask=mask)


def cross_entropy_loss_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [R, V] (row-contiguous; bf16 / fp16 / fp32), labels [R]. Returns the per-row loss
    [R] float32 (0 for ignored rows) and overwrites logits with d(sum of losses)/d logits."""
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"cross_entropy_loss_grad_: logits in {logits.dtype}; float64 takes the torch path")
    if logits.dim() != 2 or logits.stride(-1) != 1 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_loss_grad_: logits {tuple(logits.shape)} (rows contiguous) and labels "
                         f"{tuple(labels.shape)} must be [R, V] and [R]")
    R, V = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return loss
    cfg = launch_cfg("cross_entropy", BLOCK_V=triton.next_power_of_2(V))
    BLOCK_V = cfg.pop("BLOCK_V")
    _ce_loss_grad_kernel[(R,)](logits, labels.contiguous(), loss, logits.stride(0), V, ignore_index,
                               BLOCK_V=BLOCK_V, **cfg)
    return loss
