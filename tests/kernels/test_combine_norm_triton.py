"""The combine + gated RMSNorm Triton kernel (kernels/triton/combine_norm.py) against dispatch.combine and
GatedRMSNorm in float64, in the interpreter (GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_combine_norm(N, R, H, V, device, dtype, gate=True, seed=6):
    """Fused combine + gated RMSNorm (Triton) vs dispatch.combine + GatedRMSNorm in float64: y and
    the gradients of the rows, slot weights, gate and norm weight."""
    from megamom.kernels.triton.combine_norm import combine_gated_rmsnorm
    from megamom.model.layers import GatedRMSNorm
    from megamom.model.dispatch import Packing, combine

    gen = torch.Generator().manual_seed(seed)
    A = N * R
    slot_row = torch.randperm(A, generator=gen).view(N, R)
    row_slot = torch.empty(A, dtype=torch.long)
    row_slot[slot_row.view(-1)] = torch.arange(A)
    pk = Packing(None, None, None, slot_row.to(device), row_slot.to(device), None, None, R, 1, N)
    rows = torch.randn(A, H * V, generator=gen)
    w = torch.rand(N, R, generator=gen)
    g = torch.randn(N, H * V, generator=gen) if gate else None
    nw = 1 + 0.1 * torch.randn(V, generator=gen)
    dy = torch.randn(N, H * V, generator=gen)
    leaf = lambda t, dt: None if t is None else t.to(device, dt).requires_grad_()  # noqa: E731
    xs = [leaf(rows, dtype), leaf(w, torch.float32), leaf(g, dtype), leaf(nw, torch.float32)]
    y = combine_gated_rmsnorm(xs[0], slot_row.to(device), xs[1], xs[2], xs[3], 1e-6, H)
    (y.float() * dy.to(device)).sum().backward()
    rs = [None if t is None else t.detach().double().requires_grad_() for t in xs]
    norm = GatedRMSNorm(V, eps=1e-6).double().to(device)
    norm.weight = torch.nn.Parameter(rs[3])
    o = combine(rs[0].view(A, H, V), pk, rs[1])
    yr = norm(o, None if rs[2] is None else rs[2].view(N, H, V)).reshape(N, H * V)
    (yr * dy.double().to(device)).sum().backward()
    err = {"y": rel(y, yr), "drows": rel(xs[0].grad, rs[0].grad), "dslot_w": rel(xs[1].grad, rs[1].grad),
           "dweight": rel(xs[3].grad, norm.weight.grad)}
    if gate:
        err["dgate"] = rel(xs[2].grad, rs[2].grad)
    return err


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["combine_norm_gate"] = check_combine_norm(19, 3, 2, 24, "cpu", torch.float32)
    out["combine_norm_nogate"] = check_combine_norm(19, 2, 2, 24, "cpu", torch.float32, gate=False)
    # one slot (arch linear): the norm makes y independent of the slot weight (true dslot_w = 0)
    out["combine_norm_r1"] = {k: v for k, v in check_combine_norm(19, 1, 2, 24, "cpu", torch.float32).items()
                              if k != "dslot_w"}
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["combine_norm_gate", "combine_norm_nogate", "combine_norm_r1"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
