"""Sequence parallelism on the GPU path (Triton scan with the folded initial states, the summaries,
the halos through the torch conv): four sequence ranks on one GPU are as close to the float64
reference as the whole model on the same kernels (tests/gpu/sequence_parallel_check.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["mom_gated_delta", "gated_deltanet", "transformer"])
def test_four_sequence_ranks_are_as_accurate_as_one_process(tmp_path, name):
    out = tmp_path / "rows.jsonl"
    script = Path(__file__).with_name("sequence_parallel_check.py")
    r = subprocess.run([sys.executable, str(script), str(out), name], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[0])
    for what in ("loss", "logits", "grads"):
        whole, sp = row[f"{what} whole"], row[f"{what} SP"]
        assert sp <= 1.5 * whole + 1e-6, (what, sp, whole)
