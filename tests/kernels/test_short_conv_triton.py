"""The short conv's Triton kernels (kernels/short_conv/conv_triton.py: causal conv + SiLU + the q / k
L2 norm over varlen rows, column blocks, rows read through the packing) against the float64 torch
path, in the interpreter (tiers, bounds: triton_common.py; GPU: tests/gpu/), and its input checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_conv(lens, D, W, device, dtype, per_memory, silu, strided=True, G=3, seed=5, l2norm_group=None, gather=0):
    """Triton short conv (+ SiLU, + per-group L2 norm) over varlen rows vs the float64 torch path:
    y, dx, dW. The input is a column slice of a wider tensor (as the k / v slices of the projection
    output). gather = R > 0: the input is N / R source rows, each packed R times at random rows (a
    token's q for each of its memories), read through the index; dx is the source rows' gradient."""
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen
    from megamom.kernels.short_conv.conv_triton import causal_conv1d_varlen_triton

    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    N = int(cu[-1])
    T = N // gather if gather else N
    wide = torch.randn(T, D + 8, generator=gen).to(device, dtype).requires_grad_()
    x = wide[:, 3:3 + D] if strided else wide[:, :D].contiguous()
    w = (torch.randn(G, D, W, generator=gen) if per_memory else torch.randn(D, W, generator=gen)) / W ** 0.5
    ridx = (torch.randint(0, G, (len(lens),), generator=gen).repeat_interleave(torch.tensor(lens)).to(device)
            if per_memory else None)
    wl = w.to(device).clone().requires_grad_()  # float32 weight, as the model's parameters
    packing = None
    if gather:  # slot j of source row t sits at packed row dest[t * R + j]
        assert N % gather == 0, "gather: the rows must be a multiple of R"
        dest = torch.randperm(N, generator=gen)
        slot_row = dest.view(T, gather)
        row_source = torch.empty(N, dtype=torch.long)
        row_source[dest] = torch.arange(N) // gather
        packing = (row_source.to(device), slot_row.to(device))
    (y,), _ = causal_conv1d_varlen_triton(x, [wl], cu.to(device), ridx, silu=silu, l2norm_groups=[l2norm_group],
                                          gather=packing)
    dy = torch.randn(N, D, generator=gen).to(device, dtype)
    (y.float() * dy.float()).sum().backward()
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().to(device).requires_grad_()
    yr, _ = causal_conv1d_varlen(xr[packing[0]] if gather else xr, wr, cu.to(device), ridx,
                                 activation="silu" if silu else None, backend="torch", l2norm_group=l2norm_group)
    (yr * dy.double()).sum().backward()
    dx = wide.grad[:, 3:3 + D] if strided else wide.grad[:, :D]
    return {"y": rel(y, yr), "dx": rel(dx, xr.grad), "dw": rel(wl.grad, wr.grad)}


def check_conv_split(lens, widths, groups, extra, W, device, dtype, per_memory, G=3, seed=7):
    """Column blocks of one rows tensor through their own convs (+ SiLU, + L2 norm per block), the
    last `extra` columns passed through (k | v | beta | decay of the projection output), vs the
    float64 torch path: every y, the passed-through columns, the rows' gradient (written by the
    Triton backward into one buffer) and every dW."""
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen_split
    from megamom.kernels.short_conv.conv_triton import causal_conv1d_varlen_triton

    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32).to(device)
    N = int(cu[-1])
    rows = torch.randn(N, sum(widths) + extra, generator=gen).to(device, dtype).requires_grad_()
    ws = [(torch.randn(G, C, W, generator=gen) if per_memory else torch.randn(C, W, generator=gen)) / W ** 0.5
          for C in widths]
    ridx = (torch.randint(0, G, (len(lens),), generator=gen).repeat_interleave(torch.tensor(lens)).to(device)
            if per_memory else None)
    dys = [torch.randn(N, C, generator=gen).to(device, dtype) for C in widths + [extra]]

    def run(x, weights, backend):
        if backend == "triton":  # the kernels' own entry (the dispatch refuses Triton on CPU, the interpreter)
            ys, rest = causal_conv1d_varlen_triton(x, weights, cu, ridx, silu=True, l2norm_groups=groups)
        else:
            ys, rest, _ = causal_conv1d_varlen_split(x, weights, cu, ridx, activation="silu", backend=backend,
                                                     l2norm_groups=groups)
        sum((y.double() * dy.double()).sum() for y, dy in zip(ys + [rest], dys)).backward()
        return ys + [rest]
    wl = [w.to(device).clone().requires_grad_() for w in ws]
    out = run(rows, wl, "triton")
    rr = rows.detach().double().requires_grad_()
    wr = [w.detach().double().to(device).requires_grad_() for w in ws]
    ref = run(rr, wr, "torch")
    errs = {f"y{i}": rel(a, b) for i, (a, b) in enumerate(zip(out[:-1], ref[:-1]))}
    errs |= {"rest": rel(out[-1], ref[-1]), "drows": rel(rows.grad, rr.grad)}
    return errs | {f"dw{i}": rel(a.grad, b.grad) for i, (a, b) in enumerate(zip(wl, wr))}


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    for per_memory in (False, True):
        for silu in (False, True):
            out[f"conv_{'per_memory' if per_memory else 'shared'}{'_silu' if silu else ''}"] = check_conv(
                [0, 1, 2, 5, 37, 0, 3, 20], 40, 4, "cpu", torch.float32, per_memory, silu)
    for per_memory in (False, True):  # + the q / k L2 norm: groups of 8 (BD 8) and 20 (a masked BD of 32)
        for silu, group in ((True, 8), (True, 20), (False, 20)):
            out[f"conv_{'per_memory' if per_memory else 'shared'}{'_silu' if silu else ''}_norm{group}"] = check_conv(
                [0, 1, 2, 5, 37, 0, 3, 20], 40, 4, "cpu", torch.float32, per_memory, silu, l2norm_group=group)
    for per_memory in (False, True):  # k | v | gates: normalised keys, plain values, 5 columns passed through
        out[f"conv_split_{'per_memory' if per_memory else 'shared'}"] = check_conv_split(
            [0, 1, 2, 5, 37, 0, 3, 20], [32, 24], [16, None], 5, 4, "cpu", torch.float32, per_memory)
    for per_memory, silu, group in ((False, True, 8), (False, True, None), (True, True, 8), (True, False, None)):
        # q read through the packing (2 rows per source row): every conv kernel's gathered loads
        out[f"conv_gather_{'per_memory' if per_memory else 'shared'}{'_silu' if silu else ''}_norm{group}"] = \
            check_conv([0, 1, 2, 5, 37, 0, 3, 20], 40, 4, "cpu", torch.float32, per_memory, silu,
                       l2norm_group=group, gather=2)
    for W in (2, 3, 5):  # the shared-weight backward kernel covers W <= 4; W = 5 takes the general one
        out[f"conv_shared_silu_w{W}"] = check_conv([0, 1, 2, 5, 37, 0, 3, 20], 40, W, "cpu", torch.float32,
                                                   False, True)
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["conv_shared", "conv_shared_silu", "conv_per_memory", "conv_per_memory_silu",
                                  "conv_shared_silu_w2", "conv_shared_silu_w3", "conv_shared_silu_w5",
                                  "conv_shared_silu_norm8", "conv_shared_silu_norm20", "conv_shared_norm20",
                                  "conv_per_memory_silu_norm8", "conv_per_memory_silu_norm20",
                                  "conv_gather_shared_silu_norm8", "conv_gather_shared_silu_normNone",
                                  "conv_gather_per_memory_silu_norm8", "conv_gather_per_memory_normNone",
                                  "conv_per_memory_norm20", "conv_split_shared", "conv_split_per_memory"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


def test_short_conv_refuses_bad_blocks():
    """causal_conv1d_varlen(_split) refuses, before any work and naming the problem: weights wider
    than the rows, an x / weight channel mismatch, norm groups that do not tile their block, a
    groups list of the wrong length, per-row weights without row indices (and the reverse), a
    gathered conv whose weights leave source columns uncovered."""
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen, causal_conv1d_varlen_split

    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    rows, w = torch.zeros(9, 12), torch.zeros(8, 4)
    with pytest.raises(ValueError, match=r"weights have 16 channels \(\[8, 8\]\), more than the input's 12"):
        causal_conv1d_varlen_split(rows, [w, w], cu)
    with pytest.raises(ValueError, match="x has 12 channels, the weight 8"):
        causal_conv1d_varlen(rows, w, cu)
    with pytest.raises(ValueError, match="l2norm_group 3 must divide the 8 channels"):
        causal_conv1d_varlen_split(rows, [w], cu, l2norm_groups=[3])
    with pytest.raises(ValueError, match="2 l2norm_groups for 1 weights"):
        causal_conv1d_varlen_split(rows, [w], cu, l2norm_groups=[4, 4])
    with pytest.raises(ValueError, match=r"\[G, D, W\] weight needs row_weight_index"):
        causal_conv1d_varlen_split(rows, [torch.zeros(2, 8, 4)], cu)
    with pytest.raises(ValueError, match=r"\[G, D, W\] weight needs row_weight_index"):
        causal_conv1d_varlen_split(rows, [w], cu, row_weight_index=torch.zeros(9, dtype=torch.long))
    gather = (torch.arange(9) % 3, torch.arange(9).view(3, 3))
    with pytest.raises(ValueError, match="with gather the weights must cover all 12 columns of the source rows, "
                                         "they cover 8"):
        causal_conv1d_varlen_split(rows[:3], [w], cu, gather=gather)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
