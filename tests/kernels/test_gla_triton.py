"""The additive rules on the Triton kernels (kernels/gla/chunk_triton.py, fused_recurrent.py: the chunked
scan without its delta term, the decode step with per-key, per-head or no decay) against the float64
PyTorch definition, in the interpreter (tiers, bounds: triton_common.py; GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import (check_interpreter_case, check_keep_equal, check_scan_cases, check_step,  # noqa: E402
                           interp_report, make_inputs)

# ------------------------------------------------------------------------------------ cases
INTERP_CASES = {
    "scalar_decay": dict(lens=[37, 0, 1, 40], rule="scalar_decay"),
    "linear_attn": dict(lens=[37, 0, 1, 40], rule="linear_attn", l2=True),
    # the backward on what the forward kept (model.scan_keep)
    "scalar_decay_keep_all": dict(lens=[37, 0, 1, 40], rule="scalar_decay", keep="all"),
}


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = check_scan_cases(INTERP_CASES)
    for rule in ("scalar_decay",):
        ins, cu = make_inputs([37, 0, 1, 40], 2, 16, 32, torch.float32, "cpu", rule=rule)
        out["scan_keep_equal_" + rule] = check_keep_equal(rule, ins, cu, 16)
    for rule in ("gla", "scalar_decay", "linear_attn"):
        out["step_" + rule] = check_step(rule, 3, 2, 16, 32, "cpu", torch.float32, l2=True)
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["scalar_decay", "linear_attn", "scalar_decay_keep_all",
                                  "scan_keep_equal_scalar_decay", "step_gla", "step_scalar_decay",
                                  "step_linear_attn"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
