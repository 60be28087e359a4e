"""Causal depthwise short convolution over varlen packed segments.

Weight convention as torch.nn.Conv1d (depthwise, left padded): y_i = sum_w W[c, w] x_{i-(W-1)+w}.
A segment starts from its own `initial_state` tail (the W-1 inputs before it, oldest first) or
zeros: nothing leaks across segment boundaries (memories or documents)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..rules import use_triton
from ..utils import compute_dtype, l2norm, row_positions


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    row_weight_index: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    activation: Optional[str] = None,
    backend: str = "auto",
    positions: Optional[torch.Tensor] = None,
    l2norm_group: Optional[int] = None,
    gather: Optional[tuple] = None,
):
    """x: [N, D] packed rows (or, with gather, the source rows they copy: see the split);
    weight: [D, W], or [G, D, W] with `row_weight_index` [N] picking
    the weight of each row (per-memory convolutions); cu_seqlens: [S+1]; initial_state [S, W-1, D].
    activation: None or "silu" (applied to the output). positions: [N] int32 position of each row
    in its segment, if the caller has it (saves recomputing it from cu_seqlens). l2norm_group: after
    the activation, L2-normalise each group of that many channels (a head: the scan's q / k norm).
    Returns (y [N, D] in x's dtype, final tails [S, W-1, D] of the inputs, or None).

    On CUDA (backend auto/triton) without initial tails: the fused Triton kernel (conv + SiLU + norm,
    fp32 accumulation, saves only x). Elsewhere: the PyTorch paths below, weight cast to x's dtype."""
    if x.shape[-1] != weight.shape[-2]:
        raise ValueError(f"x has {x.shape[-1]} channels, the weight {weight.shape[-2]} "
                         "(causal_conv1d_varlen_split convolves column blocks of wider rows)")
    ys, _, finals = causal_conv1d_varlen_split(
        x, [weight], cu_seqlens, row_weight_index, None if initial_state is None else [initial_state],
        output_final_state, activation, backend, positions, [l2norm_group], gather)
    return ys[0], (finals[0] if finals is not None else None)


def causal_conv1d_varlen_split(
    rows: torch.Tensor,
    weights: list,
    cu_seqlens: torch.Tensor,
    row_weight_index: Optional[torch.Tensor] = None,
    initial_states: Optional[list] = None,
    output_final_state: bool = False,
    activation: Optional[str] = None,
    backend: str = "auto",
    positions: Optional[torch.Tensor] = None,
    l2norm_groups: Optional[list] = None,
    gather: Optional[tuple] = None,
):
    """causal_conv1d_varlen of consecutive column blocks of rows [N, D] from column 0, block i with
    weights[i] ([C_i, W] or [G, C_i, W]), initial_states[i] and l2norm_groups[i]; the columns after
    them are passed through. -> ([y_i [N, C_i]], rows[:, sum C_i:], [final tails_i] or None).
    On the Triton path all of rows takes one autograd node, so its gradient is written in one buffer
    (a split's backward would concatenate the pieces: one more pass over them).
    gather (row_source [N] long, slot_row [T, R]): rows holds T source rows, packed row i being
    rows[row_source[i]], and slot_row lists each source row's packed rows (every packed row once: the
    MoM packing of a token's q projection). The Triton path reads through the index and sums each
    source row's gradient in slot order; the other paths convolve an explicit copy. With gather the
    weights cover all columns and `rest` is empty ([N, 0])."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation {activation!r} is not one of None, 'silu'")
    groups = check_split(rows, weights, l2norm_groups, row_weight_index)
    if gather is not None and sum(w.shape[-2] for w in weights) != rows.shape[1]:
        raise ValueError(f"with gather the weights must cover all {rows.shape[1]} columns of the source rows, "
                         f"they cover {sum(w.shape[-2] for w in weights)}")
    triton_ok = use_triton(rows, backend)
    if gather is not None and (initial_states is not None or output_final_state or not triton_ok):
        # (index_select's backward is an index_add: atomics on CUDA, so not bitwise reproducible there;
        # the model gathers only on the Triton path and packs q itself otherwise)
        rows, gather = rows.index_select(0, gather[0]), None
    N = rows.shape[0] if gather is None else gather[0].numel()
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[-2])
    xs = [rows[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    on_triton = initial_states is None and triton_ok
    if not on_triton or output_final_state:  # (the Triton kernels need only the positions)
        cu = cu_seqlens.long()
        lens = cu[1:] - cu[:-1]
    if on_triton:
        from .conv_triton import causal_conv1d_varlen_triton
        ys, rest = causal_conv1d_varlen_triton(rows, weights, cu_seqlens, row_weight_index,
                                               silu=activation == "silu", pos=positions, l2norm_groups=groups,
                                               gather=gather)
    else:
        S = lens.numel()
        seg = torch.repeat_interleave(torch.arange(S, device=rows.device), lens, output_size=N)
        pos = positions
        ys = []
        for i, (x, weight, group) in enumerate(zip(xs, weights, groups)):
            init = initial_states[i] if initial_states is not None else None
            weight = weight.to(x.dtype)  # under autocast an fp32 weight would promote the activations
            if weight.dim() == 2 and init is None:
                y = _conv_zero_separated(x, weight, seg, S, weight.shape[-1])
            else:
                pos = row_positions(cu_seqlens, N) if pos is None else pos
                y = _conv_by_shifts(x, weight, row_weight_index, init, seg, pos, weight.shape[-1])
            if activation == "silu":
                y = F.silu(y)
            if group is not None:  # in float32 at least, rounded once (as the Triton kernel)
                y = l2norm(y.view(N, -1, group).to(compute_dtype(y))).view(N, -1).to(y.dtype)
            ys.append(y)
        rest = rows[:, bounds[-1]:]
    finals = None
    if output_final_state:
        finals = [_final_tails(x, cu, lens, w.shape[-1], initial_states[i] if initial_states is not None else None)
                  for i, (x, w) in enumerate(zip(xs, weights))]
    return ys, rest, finals


def check_split(rows: torch.Tensor, weights: list, l2norm_groups: Optional[list],
                row_weight_index: Optional[torch.Tensor]) -> list:
    """Refuse column blocks wider than the rows, norm groups that do not tile their block, per-row
    weights without row indices (or the reverse); -> the norm group of every block (None: no norm)."""
    if any((w.dim() == 3) != (row_weight_index is not None) for w in weights):
        raise ValueError("a [G, D, W] weight needs row_weight_index (and a [D, W] weight none)")
    widths = [w.shape[-2] for w in weights]
    if sum(widths) > rows.shape[1]:
        raise ValueError(f"the weights have {sum(widths)} channels ({widths}), more than the input's {rows.shape[1]}")
    groups = list(l2norm_groups) if l2norm_groups is not None else [None] * len(weights)
    if len(groups) != len(weights):
        raise ValueError(f"{len(groups)} l2norm_groups for {len(weights)} weights")
    for C, g in zip(widths, groups):
        if g is not None and (g <= 0 or C % g):
            raise ValueError(f"l2norm_group {g} must divide the {C} channels of its block (the head dim)")
    return groups


def _conv_zero_separated(x, weight, seg, S: int, W: int):
    """One depthwise conv1d over the packed rows with W-1 zero rows inserted before every segment,
    so no output sees another segment: a scatter, a library conv and a gather (the fast path)."""
    N, D = x.shape
    dest = torch.arange(N, device=x.device) + (seg + 1) * (W - 1)
    buf = x.new_zeros(N + S * (W - 1), D).index_copy(0, dest, x)
    out = F.conv1d(buf.t().unsqueeze(0), weight.unsqueeze(1), groups=D)[0]  # [D, L - W + 1]
    # index_select, not advanced indexing: its backward is an index_add, not a sort-based index_put
    return out.index_select(1, dest - (W - 1)).t().contiguous()


def _conv_by_shifts(x, weight, row_weight_index, initial_state, seg, pos, W: int):
    """Per-row weights (per-memory convs) or initial tails: the sum of W masked shifted copies."""
    N = x.shape[0]
    w_rows = weight if weight.dim() == 2 else weight[row_weight_index]  # [D, W] or [N, D, W]
    y = torch.zeros_like(x)
    for shift in range(W):
        tap = w_rows[..., W - 1 - shift]
        src = torch.arange(N, device=x.device) - shift
        inside = pos >= shift
        xs = torch.where(inside[:, None], x[src.clamp(min=0)], torch.zeros((), dtype=x.dtype, device=x.device))
        if initial_state is not None and shift > 0:
            tail_idx = (W - 1 - shift + pos).clamp(min=0, max=W - 2)
            xs = torch.where(inside[:, None], xs, initial_state[seg, tail_idx])
        y = y + tap * xs
    return y


def _final_tails(x, cu, lens, W, initial_state):
    """The last W-1 inputs of each segment (reaching into its initial tail when it is short)."""
    S = lens.numel()
    r = torch.arange(W - 1, device=x.device)
    ext = lens[:, None] - (W - 1) + r[None, :]  # position in the segment, negative = in the tail
    from_x = ext >= 0
    xi = (cu[:-1, None] + ext).clamp(min=0, max=max(x.shape[0] - 1, 0))
    if x.shape[0]:
        vals = x[xi]
    else:
        vals = x.new_zeros(S, W - 1, x.shape[1])
    if initial_state is not None:
        tails = initial_state[torch.arange(S, device=x.device)[:, None], (ext + W - 1).clamp(min=0, max=W - 2)]
    else:
        tails = torch.zeros_like(vals)
    return torch.where(from_x[..., None], vals, tails)


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor):
    """One decoding step. x: [N, D]; weight [D, W] or [N, D, W]; state [N, W-1, D] (oldest
    first). Returns (y [N, D], new state)."""
    window = torch.cat([state, x[:, None]], 1)  # [N, W, D]
    y = (window * weight.transpose(-1, -2)).sum(1)
    return y, window[:, 1:]


def naive_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, initial_state: Optional[torch.Tensor] = None):
    """Reference for one segment: x [T, D], weight [D, W]; nn.functional.conv1d semantics."""
    T, D = x.shape
    W = weight.shape[-1]
    if T == 0:
        return x.clone()
    prefix = initial_state if initial_state is not None else x.new_zeros(W - 1, D)
    xp = torch.cat([prefix, x], 0).t()[None]  # [1, D, T+W-1]
    y = torch.nn.functional.conv1d(xp, weight[:, None, :], groups=D)
    return y[0].t()
