"""The block RMSNorms' Triton kernels (kernels/triton/rmsnorm.py: RMSNorm, residual add + RMSNorm, the
attention norm with the MoM router) against float64 torch, in the interpreter (GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_rmsnorm(M, D, device, dtype, seed=7):
    """Triton RMSNorm vs the torch RMSNorm in float64: y, dx, dweight (x in `dtype`, weight fp32)."""
    from megamom.kernels.triton.rmsnorm import rms_norm
    from megamom.model.layers import RMSNorm

    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(M, D, generator=gen)).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(M, D, generator=gen).to(device)
    y = rms_norm(x, w, 1e-6)
    (y.float() * dy).sum().backward()
    ref = RMSNorm(D, eps=1e-6).double().to(device)
    ref.weight = torch.nn.Parameter(w.detach().double())
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    (yr * dy.double()).sum().backward()
    return {"y": rel(y, yr), "dx": rel(x.grad, xr.grad), "dweight": rel(w.grad, ref.weight.grad)}


def check_add_rmsnorm(M, D, device, dtype, seed=12):
    """Residual add + RMSNorm (Triton) vs x + h and the torch RMSNorm in float64: the sum, the norm
    (in bf16 for the matmuls, as under autocast) and the gradients of x (float32 residual stream),
    h (in `dtype`, the layer output) and the weight, with gradients arriving at both outputs."""
    from megamom.kernels.triton.rmsnorm import add_rms_norm
    from megamom.model.layers import RMSNorm

    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(M, D, generator=gen)).to(device).requires_grad_()
    h = torch.randn(M, D, generator=gen).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_()
    ds, dy = torch.randn(M, D, generator=gen).to(device), torch.randn(M, D, generator=gen).to(device)
    s, y = add_rms_norm(x, h, w, 1e-6, dtype)
    assert s.dtype == torch.float32 and y.dtype == dtype
    ((s * ds).sum() + (y.float() * dy).sum()).backward()
    ref = RMSNorm(D, eps=1e-6).double().to(device)
    ref.weight = torch.nn.Parameter(w.detach().double())
    xr, hr = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    sr = xr + hr
    ((sr * ds.double()).sum() + (ref(sr) * dy.double()).sum()).backward()
    return {"s": rel(s, sr), "y": rel(y, ref(sr)), "dx": rel(x.grad, xr.grad), "dh": rel(h.grad, hr.grad),
            "dweight": rel(w.grad, ref.weight.grad)}


def check_rmsnorm_route(M, D, E, K, device, dtype, seed=13, add=True):
    """RMSNorm in `dtype` (the MoM layer's projections) and the router on its float32 value, after an
    optional residual add, in one kernel each way, vs float64 (the torch norm, then `router.route`):
    s, y, the router's outputs (the same memories chosen) and the gradients of x, h, the norm weight
    and the router weight, with gradients arriving at every output."""
    from megamom.kernels.triton.rmsnorm import rms_norm_route
    from megamom.model.layers import RMSNorm
    from megamom.model.router import route

    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(M, D, generator=gen)).to(device).requires_grad_()
    h = torch.randn(M, D, generator=gen).to(device, dtype).requires_grad_() if add else None
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_()
    wr = (torch.randn(E, D, generator=gen) * 0.3).to(device).requires_grad_()
    ds, dy = (torch.randn(M, D, generator=gen).to(device) for _ in range(2))
    dl, dp, dtw = (torch.randn(M, n, generator=gen).to(device) for n in (E, E, K))
    out = rms_norm_route(x, h, w, 1e-6, dtype, wr, K)
    s, y, logits, probs, topw, topi = out if add else (x, *out)
    assert y.dtype == dtype and logits.dtype == probs.dtype == topw.dtype == torch.float32
    ((s * ds).sum() * add + (y.float() * dy).sum() + (logits * dl).sum() + (probs * dp).sum()
     + (topw * dtw).sum()).backward()
    ref = RMSNorm(D, eps=1e-6).double().to(device)
    ref.weight = torch.nn.Parameter(w.detach().double())
    xr, wrr = x.detach().double().requires_grad_(), wr.detach().double().requires_grad_()
    hr = h.detach().double().requires_grad_() if add else None
    sr = xr + hr if add else xr
    yr = ref(sr)
    r = route(yr, wrr, K)
    ((sr * ds.double()).sum() * add + (yr * dy.double()).sum() + (r.logits * dl.double()).sum()
     + (r.probs * dp.double()).sum() + (r.topk_weight * dtw.double()).sum()).backward()
    assert torch.equal(topi, r.topk_index), "the fused router chose other memories than torch.topk"
    errs = {"s": rel(s, sr), "y": rel(y, yr), "logits": rel(logits, r.logits), "probs": rel(probs, r.probs),
            "topw": rel(topw, r.topk_weight), "dx": rel(x.grad, xr.grad), "dweight": rel(w.grad, ref.weight.grad),
            "drouter": rel(wr.grad, wrr.grad)}
    if add:
        errs["dh"] = rel(h.grad, hr.grad)
    return errs


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["rmsnorm"] = check_rmsnorm(37, 40, "cpu", torch.float32)
    out["add_rmsnorm"] = check_add_rmsnorm(37, 40, "cpu", torch.float32)
    out["rmsnorm_route_add"] = check_rmsnorm_route(37, 40, 4, 2, "cpu", torch.float32)  # (interpreter: float32 only)
    out["rmsnorm_route_e5k3"] = check_rmsnorm_route(19, 24, 5, 3, "cpu", torch.float32, add=False)
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["rmsnorm", "add_rmsnorm", "rmsnorm_route_add", "rmsnorm_route_e5k3"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
