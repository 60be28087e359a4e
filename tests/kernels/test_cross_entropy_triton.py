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


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["cross_entropy"] = check_cross_entropy(9, 300, "cpu", torch.float32)  # 300: blocks of 256 + a partial one
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["cross_entropy"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
