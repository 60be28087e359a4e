"""GPU probe: what the MoM layer's GEMM shapes and the small ops around them cost.

    python benchmarks/bench_gemm_shapes.py

- the grouped projection [A, d] x [M, P, d]^T at P = k | v (2048) and with the beta / decay columns
  (2056, 2088), forward, dx and dW GEMMs: does a width that is not a multiple of the tile cost a
  whole extra tile column?
- the router weight gradient [E, N] x [N, d] in float32 (cuBLAS at M = 4);
- the bf16 add autograd makes where several projections read one input, against addmm's beta = 1;
- copying every parameter's gradient (the CUDA-graph hook's clone).
Median GPU times from triton.testing.do_bench; prints a table last."""
from __future__ import annotations

import torch
from triton.testing import do_bench

DEV = "cuda"
ROWS = []


def t(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # us


def main():
    torch.manual_seed(0)
    N, d, M = 16384, 1024, 5
    A = 3 * N
    offs = torch.tensor([8192, 16384, 24576, 32768, 49152], device=DEV, dtype=torch.int32)
    x = torch.randn(A, d, device=DEV, dtype=torch.bfloat16)
    for P in (2048, 2056, 2088, 2176):
        w = torch.randn(M, P, d, device=DEV, dtype=torch.bfloat16)
        g = torch.randn(A, P, device=DEV, dtype=torch.bfloat16)
        fwd = t(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
        dx = t(lambda: torch._grouped_mm(g, w, offs=offs))
        dw = t(lambda: torch._grouped_mm(g.t(), x, offs=offs))
        ROWS.append((f"grouped P={P}: fwd / dx / dW", f"{fwd:.0f} / {dx:.0f} / {dw:.0f} us",
                     f"{2 * A * d * P * 3 / (fwd + dx + dw) / 1e6:.0f} TFLOP/s"))
    xt = x[:N]
    for P in (1024, 1064, 2048, 2088):
        w = torch.randn(P, d, device=DEV, dtype=torch.bfloat16)
        ROWS.append((f"dense [N, d] x [d, {P}]", f"{t(lambda: xt @ w.t()):.0f} us", ""))
    s = torch.randn(N, d, device=DEV)
    dl = torch.randn(N, 4, device=DEV)
    ROWS.append(("router dW fp32 dl^T s (dl [N, 4])", f"{t(lambda: dl.t() @ s):.0f} us", ""))
    dlt = dl.t().contiguous()
    ROWS.append(("router dW fp32 dl^T s (dl^T contiguous)", f"{t(lambda: dlt @ s):.0f} us", ""))
    ROWS.append(("router dW as (s^T dl)^T", f"{t(lambda: s.t() @ dl):.0f} us", ""))
    a, b = torch.randn(N, d, device=DEV, dtype=torch.bfloat16), torch.randn(N, d, device=DEV, dtype=torch.bfloat16)
    dq, wq = torch.randn(N, 1024, device=DEV, dtype=torch.bfloat16), torch.randn(1024, d, device=DEV, dtype=torch.bfloat16)
    ROWS.append(("bf16 add [N, d]", f"{t(lambda: a + b):.0f} us", ""))
    ROWS.append(("mm dq Wq", f"{t(lambda: dq @ wq):.0f} us", ""))
    ROWS.append(("addmm(a, dq, Wq) beta 1", f"{t(lambda: torch.addmm(a, dq, wq)):.0f} us", ""))
    ROWS.append(("a.addmm_(dq, Wq)", f"{t(lambda: a.addmm_(dq, wq)):.0f} us", ""))
    grads = [torch.randn(n, device=DEV) for n in [1024 * 1024] * 200 + [32000 * 1024] + [2816 * 1024] * 72]
    ROWS.append((f"clone {len(grads)} fp32 grads ({sum(g.numel() for g in grads) / 1e6:.0f} M)",
                 f"{t(lambda: [g.clone() for g in grads]):.0f} us", ""))
    print("\n| what | GPU time | |\n|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
