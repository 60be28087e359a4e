"""The MLP's SwiGLU activation in Triton (kernels/triton/swiglu.py) against float64, in the interpreter
(GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_swiglu(M, D, device, dtype, seed=10):
    """The MLP's fused silu(gate) * up, forward and both gradients, vs float64: on two tensors, and
    packed as [gate | up] in one (the MLP's path: one GEMM, one gradient buffer)."""
    from megamom.kernels.triton.swiglu import swiglu, swiglu_packed

    gen = torch.Generator().manual_seed(seed)
    gate, up, dy = (torch.randn(M, D, generator=gen) * 3 for _ in range(3))
    xs = [t.to(device, dtype).requires_grad_() for t in (gate, up)]
    y = swiglu(*xs)
    y.backward(dy.to(device, dtype))
    ref = [t.to(device, dtype).detach().double().requires_grad_() for t in (gate, up)]
    yr = F.silu(ref[0]) * ref[1]
    yr.backward(dy.to(device, dtype).double())
    gu = torch.cat([gate, up], 1).view(M, 1, 2 * D).to(device, dtype).detach().requires_grad_()  # a batch dim
    yp = swiglu_packed(gu)
    yp.backward(dy.to(device, dtype).view(M, 1, D))
    dgu = gu.grad.view(M, 2 * D)
    return {"y": rel(y, yr), "dgate": rel(xs[0].grad, ref[0].grad), "dup": rel(xs[1].grad, ref[1].grad),
            "packed_y": rel(yp.view(M, D), yr), "packed_dgate": rel(dgu[:, :D], ref[0].grad),
            "packed_dup": rel(dgu[:, D:], ref[1].grad)}


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["swiglu"] = check_swiglu(7, 300, "cpu", torch.float32)
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["swiglu"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
