"""The scan's chunk table (kernels/triton/varlen.py: `prepare_varlen`, the `chunk_table` kernel) against its
torch reference, in the interpreter (GPU: tests/gpu/), and its cache."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report  # noqa: E402


def check_varlen(lens, total, chunk_size, device):
    """The chunk table kernel (varlen.chunk_table) against its torch reference: every entry equal
    (-> mismatching entries per field, all 0)."""
    from megamom.kernels.triton import _prepare_varlen_torch
    from megamom.kernels.triton.varlen import chunk_table

    cu = torch.tensor([0] + list(lens)).cumsum(0).to(device)
    NT = total // chunk_size + len(lens) if total > 0 else 0
    ref = _prepare_varlen_torch(cu, NT, chunk_size)
    out = {}
    for name, got, want in zip(("cu", "chunk_indices", "chunk_offsets"), chunk_table(cu, NT, chunk_size),
                               (ref.cu, ref.chunk_indices, ref.chunk_offsets)):
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape)
        out[name] = float((got != want).sum())
    return out


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    # chunks of 4, segment blocks of 4, slot blocks of 8: empty segments first, between and last
    out["varlen"] = check_varlen([0, 5, 0, 1, 9, 4, 0, 13, 3, 0], 40, 4, "cpu")
    out["varlen_one_segment"] = check_varlen([7], 9, 4, "cpu")  # surplus slots past its end
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["varlen", "varlen_one_segment"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


def test_varlen_bookkeeping_cache():
    """prepare_varlen: real chunks first, then empty surplus slots (the count is bounded on the
    device, no host sync); reused only for the same cu_seqlens object, unmodified."""
    mt = pytest.importorskip("megamom.kernels.triton")
    cu = torch.tensor([0, 3, 3, 70], dtype=torch.int32)
    a = mt.prepare_varlen(cu, 1, 70, 64, "cpu")
    assert mt.prepare_varlen(cu, 1, 70, 64, "cpu") is a
    assert a.N == 3 and a.NT == 70 // 64 + 3
    assert a.chunk_indices.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2]]  # [2, 2]: past the end of segment 2
    assert a.chunk_offsets.tolist() == [0, 1, 1]
    cu[2] = 5  # in-place change bumps the version: recomputed
    b = mt.prepare_varlen(cu, 1, 70, 64, "cpu")
    assert b is not a and b.chunk_indices.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1]]
    c = mt.prepare_varlen(cu.clone(), 1, 70, 64, "cpu")  # equal values, new object: recomputed
    assert c is not b and c.chunk_indices.tolist() == b.chunk_indices.tolist()
    d = mt.prepare_varlen(None, 2, 65, 64, "cpu")
    assert d.cu.tolist() == [0, 65, 130] and d.NT == 4 and mt.prepare_varlen(None, 2, 65, 64, "cpu") is d
    assert d.chunk_indices.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and d.chunk_offsets.tolist() == [0, 2]
    with pytest.raises(ValueError, match="non-decreasing"):
        mt.prepare_varlen(torch.tensor([0, 5, 3]), 1, 5, 64, "cpu")
    e = mt.prepare_varlen(torch.tensor([0, 0, 0]), 1, 0, 64, "cpu")  # no rows at all: no chunk slots
    assert e.NT == 0 and e.N == 2


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
