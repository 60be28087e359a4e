"""The loss's cross entropy + logit gradient in Triton (kernels/triton/cross_entropy.py) against float64,
in the interpreter (GPU: tests/gpu/)."""
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


def check_cross_entropy(R, V, device, dtype, seed=11):
    """The loss's fused cross entropy + gradient (one chunk of logit rows, some rows ignored) vs
    float64 log_softmax: the per-row losses and the gradient written over the logits."""
    from megamom.kernels.triton.cross_entropy import cross_entropy_loss_grad_

    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(R, V, generator=gen)).to(device, dtype)
    labels = torch.randint(0, V, (R,), generator=gen)
    labels[::3] = -100
    labels = labels.to(device)
    ref = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref, labels, ignore_index=-100, reduction="none")
    ref_loss.sum().backward()
    work = logits.clone()
    loss = cross_entropy_loss_grad_(work, labels)
    return {"loss": rel(loss, ref_loss), "dlogits": rel(work, ref.grad)}


def check_chunked_loss(N, d, V, chunk, seed=12):
    """The model's chunked linear cross entropy with the fused kernel (megamom.model.loss, the chunk
    loop the vocabulary-parallel loss shares) vs float64: the loss and the gradients of x and W."""
    from megamom.model import loss as L

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen).requires_grad_()
    w = torch.randn(V, d, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::7] = -100
    loss = L.chunked_linear_cross_entropy(x, w, labels, chunk, torch.float32, L._loss_grad_fused)
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(xr @ wr.t(), labels, ignore_index=-100)
    ref.backward()
    return {"loss": rel(loss, ref), "dx": rel(x.grad, xr.grad), "dw": rel(w.grad, wr.grad)}


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["cross_entropy"] = check_cross_entropy(9, 300, "cpu", torch.float32)  # 300: blocks of 256 + a partial one
    out["chunked_loss"] = check_chunked_loss(300, 32, 300, 128)  # chunks of 128 rows + a partial one
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["cross_entropy", "chunked_loss"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
