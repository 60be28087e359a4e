"""The layer's gates in Triton (kernels/triton/gates.py: beta, the scalar decay, dA_log, ddt_bias) against
float64 torch and MemoryMixer's torch gates, in the interpreter (GPU: tests/gpu/)."""
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


def check_gates(N, H, device, dtype, seed=14):
    """The fused gates (gates.py) vs float64 torch (MemoryMixer._gates' formulas) on narrow rows
    [beta | decay] with decay pre-activations from -40 to 40 (softplus' tails; g also element by
    element, where a log(1 + u) softplus loses digits near -9): g, beta and the gradients of the
    rows, A_log and dt_bias; also beta alone and decay alone."""
    from megamom.kernels.triton.gates import gates_fused

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, has_beta, has_decay in (("both", True, True), ("beta", True, False), ("decay", False, True)):
        cols = H * (int(has_beta) + int(has_decay))
        rows = torch.randn(N, cols + 3, generator=gen) * 3  # 3 extra columns: strided rows are read too
        if has_decay:
            rows[:, cols - H:cols] += torch.linspace(-40, 40, N)[:, None]
        A_log = torch.empty(H).uniform_(0, 16, generator=gen).log()
        dt_bias = torch.randn(H, generator=gen)
        dg, db = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
        r = rows.to(device, dtype)[:, :cols].requires_grad_()
        A, dt = A_log.to(device).clone().requires_grad_(), dt_bias.to(device).clone().requires_grad_()
        g, beta = gates_fused(r, H, has_beta, A if has_decay else None, dt if has_decay else None)
        rr = rows[:, :cols].to(dtype).double().to(device).requires_grad_()
        Ar, dtr = A_log.double().to(device).requires_grad_(), dt_bias.double().to(device).requires_grad_()
        loss, loss_r = 0.0, 0.0
        if has_beta:
            beta_r = rr[:, :H].sigmoid()
            loss, loss_r = loss + (beta * db.to(device)).sum(), loss_r + (beta_r * db.double().to(device)).sum()
            out[f"beta_{name}"] = rel(beta, beta_r)
        if has_decay:
            g_r = -Ar.exp() * F.softplus(rr[:, -H:] + dtr)
            loss, loss_r = loss + (g * dg.to(device)).sum(), loss_r + (g_r * dg.double().to(device)).sum()
            out[f"g_{name}"] = rel(g, g_r)
            out[f"g_elementwise_{name}"] = ((g.double() - g_r) / g_r).abs().max().item()
        loss.backward()
        loss_r.backward()
        out[f"drows_{name}"] = rel(r.grad, rr.grad)
        if has_decay:
            out[f"dA_log_{name}"], out[f"ddt_bias_{name}"] = rel(A.grad, Ar.grad), rel(dt.grad, dtr.grad)
    return out


def check_gates_wiring(device, seed=15):
    """MemoryMixer's fused gates (the narrow projection rows straight into gates.py) against its torch
    gates (the rows split into beta / decay first), for every rule with narrow rows: g, beta and the
    gradients of the rows, A_log and dt_bias (-> largest relative difference per rule)."""
    from megamom.config import ModelConfig
    from megamom.model.memory_mixer import MemoryMixer

    out = {}
    for rule in ("gated_delta", "delta", "scalar_decay", "linear_attn"):
        torch.manual_seed(seed)
        mixer = MemoryMixer(ModelConfig(arch="mom", update_rule=rule, hidden_size=32, num_heads=3, head_dim=8,
                                        num_memories=2, topk=1, vocab_size=64)).to(device)
        narrow = mixer._projection_groups()[1]
        if not narrow:
            out[rule] = 0.0 if mixer._fused_gates(None) == (None, None) else 1.0
            continue
        rows = torch.randn(29, sum(mixer._width(n) for n in ("b_proj", "a_proj")), device=device)
        got, want = [], []
        for fused in (True, False):
            mixer.zero_grad()
            r = rows.clone().requires_grad_()
            g, beta = mixer._fused_gates(r) if fused else mixer._gates(*mixer._gate_rows(r, r[:, :0]))
            loss = sum((t * torch.linspace(-1, 1, t.numel(), device=device).view_as(t)).sum()
                       for t in (g, beta) if t is not None)
            loss.backward()
            params = [p.grad for p in (getattr(mixer, "A_log", None), getattr(mixer, "dt_bias", None))
                      if p is not None]
            (got if fused else want).append([t for t in (g, beta, r.grad, *params) if t is not None])
        out[rule] = max(rel(a, b) for a, b in zip(got[0], want[0]))
    return out


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["gates"] = check_gates(37, 3, "cpu", torch.float32)
    out["gates_wiring"] = check_gates_wiring("cpu")
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["gates", "gates_wiring"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
