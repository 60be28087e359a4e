"""The packing's Triton kernels (kernels/triton/packing.py: the counting sort of dispatch.build_packing;
kernels/triton/gather_sum.py: pack's backward) against the torch path, in the interpreter (GPU: tests/gpu/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402


def check_gather_sum(N, R, D, device, dtype, seed=8):
    """dispatch.pack's fused backward (sum of each token's R packed rows) vs float64 and vs the
    torch path of the same backward."""
    from megamom.kernels.triton.gather_sum import gather_sum
    from megamom.model.dispatch import _GatherTokens

    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(N * R, D, generator=gen).to(device, dtype)
    index = torch.randperm(N * R, generator=gen).view(N, R).to(device)
    out = gather_sum(src, index)
    ref = src.double()[index.reshape(-1)].view(N, R, D).sum(1)
    x = torch.zeros(N, D, device=device, dtype=dtype, requires_grad=True)
    row_token = torch.empty(N * R, dtype=torch.long, device=device)
    row_token[index.reshape(-1)] = torch.arange(N, device=device).repeat_interleave(R)
    grads = []
    for fused in (False, True):
        x.grad = None
        (_GatherTokens.apply(x, row_token, index, fused) * src).sum().backward()
        grads.append(x.grad.clone())
    return {"out": rel(out, ref), "fused_vs_torch": rel(grads[1], grads[0].double())}


def check_packing(N, E, k, shared, num_docs, device, seed=11):
    """The counting-sort packing (Triton) against dispatch.build_packing's torch path: every field
    equal (-> mismatching entries per field, all 0). num_docs >= 5: the first, the last and every
    third document are empty, document 1 has one token, the others random lengths; the last routed
    memory is chosen only by the second half of the tokens (token blocks that no token of a memory
    selects)."""
    from megamom.model.dispatch import build_packing

    gen = torch.Generator().manual_seed(seed)
    filled = [d for d in range(2, num_docs - 1) if d % 3 != 0]
    doc_ids = torch.tensor(filled)[torch.randint(0, len(filled), (N - 1,), generator=gen)]
    doc_ids = torch.cat([torch.tensor([1]), doc_ids]).sort().values
    topk = None
    if E:
        late = torch.arange(N) >= N // 2
        topk = torch.stack([torch.randperm(E if late[n] or k == E else E - 1, generator=gen)[:k] for n in range(N)])
    args = (doc_ids.to(device), num_docs, E, shared)
    ref = build_packing(topk.to(device) if E else None, *args)
    got = build_packing(topk.to(device) if E else None, *args, fused=True)
    out = {}
    for f in ("row_token", "row_memory", "row_segment", "slot_row", "row_slot", "row_position", "cu_seqlens"):
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.dtype, b.dtype, a.shape, b.shape)
        out[f] = float((a != b).sum())
    assert (got.num_memories, got.num_docs, got.num_tokens) == (ref.num_memories, ref.num_docs, ref.num_tokens)
    return out


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = {}
    out["gather_sum"] = check_gather_sum(19, 3, 40, "cpu", torch.float32)
    # token blocks of 8: partial blocks, blocks where a memory is chosen by no token
    out["packing_e4k2_shared"] = check_packing(37, 4, 2, True, 8, "cpu")
    out["packing_e5k3"] = check_packing(21, 5, 3, False, 6, "cpu")
    out["packing_e3k3_shared"] = check_packing(16, 3, 3, True, 5, "cpu")
    out["packing_shared_only"] = check_packing(13, 0, 0, True, 7, "cpu")
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["gather_sum", "packing_e4k2_shared", "packing_e5k3", "packing_e3k3_shared",
                                  "packing_shared_only"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
