"""The router's Triton kernels (kernels/triton/router.py: logits, softmax, top-k; kernels/triton/router_loss.py:
the balance and z losses) against float64 torch, in the interpreter (GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_router(N, D, E, K, device, dtype, seed=12, z_loss=True):
    """The MoM router (logits, softmax, top-k, renormalised weights) forward and backward vs float64
    torch (`router.route`): the same memories chosen, the values, and the gradients of x and W through
    the logits (z loss), the probabilities (balance loss) and the top-k weights."""
    from megamom.kernels.triton.router import route_fused
    from megamom.model.router import route

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(E, D, generator=gen) * 0.3).to(device).requires_grad_()
    dl, dp, dw = torch.randn(N, E, generator=gen), torch.randn(N, E, generator=gen), torch.randn(N, K, generator=gen)
    logits, probs, topw, topi = route_fused(x, w, K)
    loss = (probs * dp.to(device)).sum() + (topw * dw.to(device)).sum()
    if z_loss:
        loss = loss + (logits * dl.to(device)).sum()
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = route(xr, wr, K)
    loss_r = (ref.probs * dp.double().to(device)).sum() + (ref.topk_weight * dw.double().to(device)).sum()
    if z_loss:
        loss_r = loss_r + (ref.logits * dl.double().to(device)).sum()
    loss_r.backward()
    assert torch.equal(topi, ref.topk_index), "the router chose other memories than torch.topk"
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    return {"logits": rel(logits, ref.logits), "probs": rel(probs, ref.probs), "topw": rel(topw, ref.topk_weight),
            "dx": rel(x.grad, xr.grad), "dweight": rel(w.grad, wr.grad)}


def check_router_loss(N, E, K, device, seed=13):
    """The fused balance + z losses (router_loss.py) on random logits, their softmax and random top-k
    choices vs float64 torch (load_balancing_loss, router_z_loss) on the same inputs: the losses, the
    token fractions, and the logits' gradient (through the softmax for the balance loss) for random
    loss weights, also with one loss unused."""
    from megamom.kernels.triton.router_loss import router_losses_fused
    from megamom.model.router import load_balancing_loss, router_z_loss

    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(N, E, generator=gen)).to(device)
    topi = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)]).to(device)
    ca, cz = 0.7, -1.3
    out = {}
    for use in ("both", "aux", "z"):
        lg = logits.clone().requires_grad_()
        probs = lg.softmax(-1)
        aux, z, f = router_losses_fused(lg, probs, topi)
        assert not f.requires_grad
        lr = logits.double().requires_grad_()
        pr = lr.softmax(-1)
        aux_r, f_r = load_balancing_loss(pr, topi, E)
        z_r = router_z_loss(lr)
        loss, loss_r = 0.0, 0.0  # a loss left out gets no gradient (None) in the fused backward
        if use != "z":
            loss, loss_r = loss + ca * aux, loss_r + ca * aux_r
        if use != "aux":
            loss, loss_r = loss + cz * z, loss_r + cz * z_r
        loss.backward()
        loss_r.backward()
        if use == "both":
            out.update(aux=rel(aux, aux_r), z=rel(z, z_r), frac=rel(f, f_r))
        out["dlogits_" + use] = rel(lg.grad, lr.grad)
    return out


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["router_loss_e4k2"] = check_router_loss(37, 4, 2, "cpu")  # rows: partial blocks of 8
    out["router_loss_e5k3"] = check_router_loss(19, 5, 3, "cpu")
    out["router_e4k2"] = check_router(37, 40, 4, 2, "cpu", torch.float32)  # rows / columns: partial blocks
    out["router_e5k3_noz"] = check_router(19, 24, 5, 3, "cpu", torch.float32, z_loss=False)  # E, K not powers of 2
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["router_e4k2", "router_e5k3_noz", "router_loss_e4k2", "router_loss_e5k3"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
