"""Megatron-style tensor-parallel layers: the linears holding a shard of their weight, the
vocabulary-parallel embedding, and the vocabulary-parallel cross entropy (chunked like
`megamom.model.loss`: no rank ever holds the [tokens, vocab] logits, nor the full vocabulary).

The column- / row-parallel linears compute on their shard only; the communication sits at the
sublayer's region boundary (`ParallelRegion.enter_region` / `exit_region`, set by `parallelize`),
so a sublayer with several column-parallel projections (q, gate, the memories' k / v / beta /
decay) pays one all-reduce of its input gradient, not one per projection."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.layers import compute_dtype
from ..model.loss import IGNORE_INDEX, _chunk_logits, chunked_linear_cross_entropy
from .mappings import (all_reduce_, copy_to_region, gather_along, gather_from_split, reduce_from_region,
                       reduce_scatter_along)
from .topology import Group


def shard(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's contiguous block of `t` along `dim` (a copy)."""
    n = t.shape[dim] // group.size
    return t.narrow(dim, group.rank * n, n).clone()


def mark_sharded(p: torch.nn.Parameter, dim: int) -> None:
    """DeepSpeed's gradient norm counts a parameter with `tensor_model_parallel` on every tensor rank
    (a shard) and the others on tensor rank 0 only (replicas); `partition_dim` is where it splits."""
    p.tensor_model_parallel = True
    p.partition_dim = dim


class _ShardedLinear(nn.Linear):
    split_dim = 0

    @classmethod
    def adopt(cls, linear: nn.Linear, group: Group) -> nn.Linear:
        """Turn `linear` (bias-free, full weight) into this rank's shard, in place: the same module
        and Parameter objects (optimizer groups and tied weights keep them), the weight narrowed."""
        linear.weight.data = shard(linear.weight.data, cls.split_dim, group)
        mark_sharded(linear.weight, cls.split_dim)
        linear.out_features, linear.in_features = linear.weight.shape
        linear.__class__ = cls
        return linear


class ColumnParallelLinear(_ShardedLinear):
    """y[:, this rank's rows] = x W_shard^T: the output features (its heads / MLP columns) split over
    the tensor group. Its input is the region's entered, replicated activation."""
    split_dim = 0


class RowParallelLinear(_ShardedLinear):
    """A partial y = x_shard W_shard^T over this rank's input features; the region's exit sums the
    partials over the tensor group."""
    split_dim = 1


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V / TP) of the embedding on each tensor rank: a token outside
    them looks up zeros, and the all-reduce over the group fills in every token (with TP sequence
    parallelism a reduce-scatter along the sequence: each rank its slice)."""

    def __init__(self, embedding: nn.Embedding, group: Group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings = embedding.num_embeddings
        self.per_rank = self.num_embeddings // group.size
        self.vocab_start = group.rank * self.per_rank
        self.weight = embedding.weight  # the same Parameter: a tied output layer stays tied
        self.weight.data = shard(embedding.weight.data, 0, group)
        mark_sharded(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_along(x, 1, self.group)
        return reduce_from_region(x, self.group)


def _vocab_parallel_rows(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Group):
    """Cross entropy of rows whose logits [n, V / TP] are split over the tensor group: -> (loss per
    row, zero for ignored rows; the log-sum-exp per row; the local target column, -1 outside). Two
    all-reduces: the row maxima, then the sums of exponentials with the target logits."""
    valid = labels != IGNORE_INDEX
    local = labels - vocab_start
    mine = valid & (local >= 0) & (local < logits.shape[1])
    col = torch.where(mine, local, torch.zeros_like(local))
    row_max = all_reduce_(logits.max(-1).values, group, torch.distributed.ReduceOp.MAX)
    sums = torch.stack([(logits - row_max[:, None]).exp().sum(-1),
                        logits.gather(1, col[:, None])[:, 0] * mine])
    all_reduce_(sums, group)
    lse = row_max + sums[0].log()
    return (lse - sums[1]) * valid, lse, torch.where(mine, local, torch.full_like(local, -1))


def _vocab_parallel_loss_grad(xc: torch.Tensor, wd: torch.Tensor, lab: torch.Tensor, vocab_start: int, group: Group):
    """megamom.model.loss._loss_grad over this rank's vocabulary columns: the loss sum of the chunk
    (the same on every tensor rank) and the gradient of its logit columns (softmax - onehot, the
    onehot where the target is one of them)."""
    logits = _chunk_logits(xc, wd)
    rows, lse, col = _vocab_parallel_rows(logits, lab, vocab_start, group)
    grad = logits.sub_(lse[:, None]).exp_()  # softmax of this rank's columns, in place
    # -1 at the local target column (a scatter, not boolean indexing: no read of the count to the host)
    hit = (col >= 0).to(grad.dtype)
    grad.scatter_add_(1, col.clamp(min=0)[:, None], -hit[:, None])
    grad.mul_((lab != IGNORE_INDEX)[:, None])
    return rows.sum(), grad.to(xc.dtype)


def _vocab_parallel_loss_sum(xc: torch.Tensor, wd: torch.Tensor, lab: torch.Tensor, vocab_start: int,
                             group: Group) -> torch.Tensor:
    return _vocab_parallel_rows(_chunk_logits(xc, wd), lab, vocab_start, group)[0].sum()


class VocabParallelLMLoss(nn.Module):
    """`megamom.model.loss.LMLoss` under tensor parallelism: the output weight is this rank's
    vocabulary rows. The hidden states [B, T, d] enter the region (their gradient summed over the
    group; with TP sequence parallelism this rank's slice of T, all-gathered); the loss is the same
    number on every tensor rank."""

    def __init__(self, chunk_rows: int, group: Group, vocab_start: int, sequence_parallel: bool = False):
        super().__init__()
        self.chunk_rows, self.group, self.vocab_start = chunk_rows, group, vocab_start
        self.sequence_parallel = sequence_parallel

    def _enter(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return gather_along(hidden, 1, self.group)
        return copy_to_region(hidden, self.group)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The full logits (evaluation, generation): every rank's columns gathered."""
        return gather_from_split(F.linear(self._enter(hidden), weight), -1, self.group)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, d] (or this rank's slice of T), labels [B, T], logits [B, T, V] or None."""
        labels = labels.reshape(-1)
        if logits is not None:  # gathered by `logits`
            ce_dtype = torch.promote_types(logits.dtype, torch.float32)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(ce_dtype), labels,
                                   ignore_index=IGNORE_INDEX)
        dtype = compute_dtype(hidden)
        hidden = self._enter(hidden)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        chunk = self.chunk_rows if self.chunk_rows > 0 else max(hidden.shape[0], 1)
        where = dict(vocab_start=self.vocab_start, group=self.group)
        return chunked_linear_cross_entropy(hidden, weight, labels, chunk, dtype,
                                            partial(_vocab_parallel_loss_grad, **where),
                                            partial(_vocab_parallel_loss_sum, **where))
