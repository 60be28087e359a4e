"""GPU benchmark of the MoM router at mom-340m's shape (16384 tokens, d 1024 in float32: the layer's
norm output, 4 memories, top-2): the fused Triton kernels (kernels/triton/router.py) against the
torch ops of `megamom.model.router.route`, forward and forward + backward, in the same run, plus
the largest difference between the two. GPU kernel time from the profiler, as bench_conv.py.

    python benchmarks/bench_router.py [--sweep [router_fwd,router_bwd]]
--sweep times block configurations (MEGAMOM_TRITON_CFG style) of the kernels named (default both)."""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench_conv import kernel_ms
from megamom.kernels import triton as mt
from megamom.model.router import route

N, D, E, K = 8 * 2048, 1024, 4, 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", nargs="?", const="router_fwd,router_bwd", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    w = (torch.randn(E, D, device="cuda") * 0.02).requires_grad_()
    dw, dp = torch.randn(N, K, device="cuda"), torch.randn(N, E, device="cuda")

    def run(fused, bwd):
        def f():
            x.grad = w.grad = None  # (an accumulating x.grad would add a [N, D] add to each backward)
            r = route(x, w, K, fused=fused)
            if bwd:
                torch.autograd.backward([r.topk_weight, r.probs], [dw, dp])
        return f

    outs = {}
    for fused in (False, True):
        x.grad = w.grad = None
        r = route(x, w, K, fused=fused)
        torch.autograd.backward([r.topk_weight, r.probs], [dw, dp])
        outs[fused] = (r.probs.detach(), r.topk_weight.detach(), x.grad.clone(), w.grad.clone())
    diff = {n: (a_ - b).abs().max().item() for n, a_, b in zip(("probs", "topw", "dx", "dw"), outs[True], outs[False])}
    times = {name: (kernel_ms(run(fused, False))[0], kernel_ms(run(fused, True))[0])
             for name, fused in (("torch", False), ("triton", True))}
    print(json.dumps({"ms": times, "max_abs_diff_triton_vs_torch": diff}))
    print("| path | fwd ms (GPU) | fwd+bwd ms (GPU) |\n|---|---|---|")
    for name, (f, fb) in times.items():
        print(f"| {name} | {f:.4f} | {fb:.4f} |")
    if a.sweep:
        grids = {"router_fwd": (run(True, False), [dict(BM=bm, BD=bd, num_warps=nw, num_stages=ns) for bm, bd, nw, ns
                                                   in itertools.product((8, 16, 32), (64, 128), (4, 8), (1, 2, 3))]),
                 "router_bwd": (run(True, True), [dict(BM=bm, BD=bd, RB=rb, num_warps=nw, num_stages=ns)
                                                  for bm, bd, rb, nw, ns in itertools.product(
                                                      (8, 16), (64, 128, 256), (2, 4, 16), (4, 8), (1, 2))])}
        for name in a.sweep.split(","):
            best = None
            for c in grids[name][1]:
                mt._ENV_CFG.clear()
                mt._ENV_CFG[name] = c
                try:
                    t = kernel_ms(grids[name][0])[0]
                except Exception as e:  # e.g. out of registers / shared memory
                    print("sweep", name, c, "failed:", str(e)[:100])
                    continue
                print("sweep", name, json.dumps(c), f"{t:.4f} ms", flush=True)
                best = min(best or (t, c), (t, c), key=lambda tc: tc[0])
            if best is not None:
                print("best", name, json.dumps(best[1]), f"{best[0]:.4f} ms", flush=True)
        mt._ENV_CFG.clear()


if __name__ == "__main__":
    main()
