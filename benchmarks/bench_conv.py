"""GPU benchmark of the varlen short conv + SiLU (Triton) against the PyTorch path (one cuDNN
depthwise conv1d over zero-separated segments), at the MoM layer's shape: A = 3 * 8 * 2048 packed
rows (top-2 + shared), 1024 channels read as a column slice of the projection output.

    python benchmarks/bench_conv.py [--sweep]
--sweep times block configurations (MEGAMOM_TRITON_CFG style) for the two backward kernels."""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen
    from megamom.kernels import triton as mt

    torch.manual_seed(0)
    segs, D, W = 3 * 8 * 4, 1024, 4  # (memory, document) segments of uneven length
    lens = torch.randint(200, 824, (segs,))
    lens[-1] = 3 * 8 * 2048 - int(lens[:-1].sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).cuda().int()
    N = int(lens.sum())
    wide = torch.randn(N, 2056, device="cuda", dtype=torch.bfloat16)
    x = wide[:, 1024:2048].requires_grad_(False)
    w = torch.randn(D, W, device="cuda", requires_grad=True)
    xg = x.clone().requires_grad_()
    dy = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)

    def run(backend, bwd):
        def f():
            y, _ = causal_conv1d_varlen(xg, w, cu, activation="silu", backend=backend)
            if bwd:
                y.backward(dy)
        return do_bench(f, warmup=5, rep=50, return_mode="median")

    rows = {}
    for backend in ("torch", "triton"):
        rows[backend] = (run(backend, False), run(backend, True))
    gb = N * D * 2 * 2 / 1e9  # read x + write y
    print(json.dumps({"rows": N, "channels": D, "ms": rows}))
    print("| path | fwd ms | fwd+bwd ms | fwd GB/s |\n|---|---|---|---|")
    for k, (f, fb) in rows.items():
        print(f"| {k} | {f:.3f} | {fb:.3f} | {gb / f * 1e3:.0f} |")
    print(f"triton / torch fwd+bwd: {rows['triton'][1] / rows['torch'][1]:.2f}x time")
    if a.sweep:  # one kernel at a time, the others at their defaults
        import itertools
        grids = {
            "conv_fwd": (False, [dict(BR=br, BD=bd, num_warps=nw) for br, bd, nw in
                                 itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]),
            "conv_bwd_shared": (True, [dict(BR=br, BD=bd, RB=rb, num_warps=nw) for br, bd, rb, nw in
                                       itertools.product((16, 32), (64, 128), (8, 16, 32), (4, 8))]),
            "conv_bwd_dx": (True, [dict(BR=br, BD=bd, num_warps=nw) for br, bd, nw in
                                   itertools.product((16, 32, 64), (64, 128, 256), (4,))]),
        }
        for name, (bwd, cfgs) in grids.items():
            best = None
            for c in cfgs:
                mt._ENV_CFG.clear()
                mt._ENV_CFG[name] = c
                try:
                    t = run("triton", bwd)
                except Exception as e:  # e.g. out of registers / shared memory
                    print("sweep", name, c, "failed:", str(e)[:100])
                    continue
                print("sweep", name, json.dumps(c), f"{t:.3f} ms", flush=True)
                best = min(best or (t, c), (t, c), key=lambda tc: tc[0])
            print("best", name, json.dumps(best[1]), f"{best[0]:.3f} ms", flush=True)
        mt._ENV_CFG.clear()

if __name__ == "__main__":
    main()
