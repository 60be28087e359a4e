"""GPU benchmark of the chunked LM loss (megamom.model.loss) at mom-340m's shape (B8 T2048 = 16384
rows, d 1024, vocab 32000, chunks of 4096 rows, bf16 autocast, fp32 weights): the fused Triton cross
entropy against the torch ops of the same loss, forward + backward, in the same run. Also checks
that both give the same loss and gradients (relative error).

    python benchmarks/bench_loss.py"""
from __future__ import annotations

import json

import torch
from triton.testing import do_bench

from megamom.model.loss import linear_cross_entropy


def main():
    torch.manual_seed(0)
    N, d, V, chunk = 8 * 2048, 1024, 32000, 4096
    x = (torch.randn(N, d, device="cuda") * 0.5).requires_grad_()
    w = (torch.randn(V, d, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::97] = -100

    def run(backend):
        x.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(x, w, labels, chunk, backend)
        loss.backward()
        return loss

    out, times = {}, {}
    for backend in ("torch", "triton"):
        loss = run(backend)
        out[backend] = (loss.detach(), x.grad.clone(), w.grad.clone())
        times[backend] = do_bench(lambda: run(backend), warmup=5, rep=50, return_mode="median")
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    errs = {n: rel(a, b) for n, a, b in zip(("loss", "dx", "dw"), out["triton"], out["torch"])}
    print(json.dumps({"ms": times, "triton_vs_torch": errs}))
    print("| path | fwd+bwd ms |\n|---|---|")
    for k, t in times.items():
        print(f"| {k} | {t:.2f} |")
    print(f"triton / torch: {times['triton'] / times['torch']:.2f}x time; rel. difference {errs}")


if __name__ == "__main__":
    main()
