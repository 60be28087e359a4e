"""Every communication of the parallel layers, as a named autograd function with its forward /
backward pair (Megatron-core's `tensor_parallel/mappings.py` pattern), so the data flow reads:

    copy_to_region        identity          | all-reduce          (enter a tensor region, input replicated)
    reduce_from_region    all-reduce        | identity            (leave it: partial sums -> full)
    gather_along          all-gather dim    | reduce-scatter dim  (enter with TP sequence parallelism)
    reduce_scatter_along  reduce-scatter    | all-gather          (leave with TP sequence parallelism)
    split_along           keep own slice    | all-gather          (replicated -> split, e.g. into the loss)
    gather_from_split     all-gather        | keep own slice      (split -> replicated, downstream replicated)
    all_to_all            all-to-all        | all-to-all, splits swapped (expert dispatch)

`group` is a `megamom.parallel.topology.Group`; a group of one is the identity both ways (no
communication, no copy)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .topology import Group

# torch 2.13 renamed the tensor-in / tensor-out collectives (the old names warn); 2.11 has the old ones only
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous().clone()  # autograd's buffers are not ours to overwrite
    dist.all_reduce(x, group=group.group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, rank order (all ranks' shapes equal)."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty(group.size * x.shape[0], *x.shape[1:])
    _all_gather_single(out, x, group=group.group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over ranks, each keeping its slice of `dim` (equal slices, rank order)."""
    if x.shape[dim] % group.size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {group.size} ranks")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty(x.shape[0] // group.size, *x.shape[1:])
    _reduce_scatter_single(out, x, group=group.group)
    return out.movedim(0, dim)


def _own_slice(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    if x.shape[dim] % group.size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {group.size} ranks")
    n = x.shape[dim] // group.size
    return x.narrow(dim, group.rank * n, n).contiguous()


class CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class SplitAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _own_slice(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class GatherFromSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.dim, ctx.group), None, None


class AllToAll(torch.autograd.Function):
    """Rows of x [sum(send_splits), ...] to the ranks of the group; returns [sum(recv_splits), ...].
    The backward sends the gradients back the same way with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send, recv = ctx.splits
        out = grad.new_empty(sum(send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), list(send), list(recv), group=ctx.group.group)
        return out, None, None, None


# ---- the functions the layers call (a group of one: the identity both ways)

def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else ReduceFromRegion.apply(x, group)


def gather_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group.size == 1 else GatherAlong.apply(x, dim, group)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group.size == 1 else ReduceScatterAlong.apply(x, dim, group)


def split_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group.size == 1 else SplitAlong.apply(x, dim, group)


def gather_from_split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group.size == 1 else GatherFromSplit.apply(x, dim, group)


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group) -> torch.Tensor:
    return x if group.size == 1 else AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place, no autograd (statistics, norms, loss values)."""
    if group.size > 1:
        dist.all_reduce(x, op=op, group=group.group)
    return x


def sum_grad_over(param: torch.nn.Parameter, group: Group) -> Optional[object]:
    """A parameter replicated over `group` whose ranks each compute part of its gradient (a norm
    weight shared by heads split over tensor ranks): its gradient is summed over the group as it is
    computed, before accumulation, so every rank (and ZeRO's hooks) sees the full gradient."""
    if group.size == 1:
        return None
    return param.register_hook(lambda grad: _all_reduce(grad, group))
