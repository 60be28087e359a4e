"""GPU benchmark of the varlen short conv + SiLU (Triton) against the PyTorch path (one cuDNN
depthwise conv1d over zero-separated segments), at the MoM layer's shape: A = 3 * 8 * 2048 packed
rows (top-2 + shared), 1024 channels read as a column slice of the projection output.

    python benchmarks/bench_conv.py [--sweep [KERNEL,...]]
Also the layer's whole q / k / v step both ways: separate (three convs, the scan's separate q / k
L2-norm kernels, a split backward concatenating the k / v / gate gradients) and the fused one
(the norm inside the conv, k | v | gates through one autograd node writing one gradient buffer).
Times are GPU kernel time from the profiler (the sum of a pass's kernels, per pass): wall-clock
timing of one conv is dominated by the CPU's launch and autograd overhead at this size and varied
2x between identical runs (H200, 2026-11-26).
--sweep times block configurations (MEGAMOM_TRITON_CFG style) for the kernels of the pass (all, or
those named)."""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_ms(fn, reps=20) -> tuple[float, dict]:
    """Mean GPU kernel time of one call of fn (ms), and per kernel name."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.key] = t / reps / 1e3
    return sum(per.values()), per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", nargs="?", const="all", default=None,
                    help="time launch configurations of all kernels, or of the comma-separated ones named")
    a = ap.parse_args()
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen
    from megamom.kernels import triton as mt

    torch.manual_seed(0)
    segs, D, W = 3 * 8 * 4, 1024, 4  # (memory, document) segments of uneven length
    lens = torch.randint(200, 824, (segs,))
    lens[-1] = 3 * 8 * 2048 - int(lens[:-1].sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).cuda().int()
    N = int(lens.sum())
    # the input is a strided column slice of the projection output (row stride 2056), as in the
    # layer: a contiguous copy measures a different (faster, vectorised) load pattern
    wide = torch.randn(N, 2056, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, W, device="cuda", requires_grad=True)
    dy = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)

    def run(backend, bwd):
        def f():
            y, _ = causal_conv1d_varlen(wide[:, 1024:2048], w, cu, activation="silu", backend=backend)
            if bwd:
                y.backward(dy)
        return kernel_ms(f)[0]

    rows = {}
    for backend in ("torch", "triton"):
        rows[backend] = (run(backend, False), run(backend, True))
    print("triton kernels, fwd+bwd:", json.dumps({k: round(v, 4) for k, v in kernel_ms(
        lambda: causal_conv1d_varlen(wide[:, 1024:2048], w, cu, activation="silu",
                                     backend="triton")[0].backward(dy))[1].items()}))
    gb = N * D * 2 * 2 / 1e9  # read x + write y
    print(json.dumps({"rows": N, "channels": D, "ms": rows}))
    print("| path | fwd ms (GPU) | fwd+bwd ms (GPU) | fwd GB/s |\n|---|---|---|---|")
    for k, (f, fb) in rows.items():
        print(f"| {k} | {f:.3f} | {fb:.3f} | {gb / f * 1e3:.0f} |")
    # the memory roofline at this shape: a contiguous copy moves the forward's bytes (a copy of the
    # strided slice itself runs torch's slower non-contiguous kernel: 1.7 TB/s on an H200)
    flat = wide[:, 1024:2048].contiguous()
    copy = kernel_ms(lambda: flat.clone())[0]
    print(f"| contiguous copy of the same bytes (roofline) | {copy:.3f} | - | {gb / copy * 1e3:.0f} |")
    print(f"triton / torch fwd+bwd: {rows['triton'][1] / rows['torch'][1]:.2f}x time")
    print(f"triton fwd / copy: {rows['triton'][0] / copy:.2f}x time")
    fused_fwd, fused_fb = layer_step(N, cu)
    if a.sweep:  # one kernel at a time, the others at their defaults
        import itertools
        plain = lambda bwd: lambda: run("triton", bwd)  # noqa: E731
        grids = {
            "conv_fwd": (plain(False), [dict(BR=br, BD=bd, num_warps=nw) for br, bd, nw in
                                        itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]),
            # the normalised q / k convs, timed as the layer's fused q / k / v step
            "conv_fwd_norm": (lambda: kernel_ms(fused_fwd)[0], [dict(BR=br, num_warps=nw) for br, nw in
                                                                itertools.product((4, 8, 16, 32), (4, 8))]),
            "conv_bwd_shared_norm": (lambda: kernel_ms(fused_fb)[0], [
                dict(BR=br, RB=rb, num_warps=nw, num_stages=ns) for br, rb, nw, ns in
                itertools.product((2, 4, 8), (16, 32, 64), (4, 8), (1, 2, 3)) if br * rb >= 64]),
        }
        grids["conv_bwd_slide"] = (plain(True), [  # the one-pass backward (one weight, no norm: the v conv)
            dict(R=r, L=l, BD=bd, num_warps=nw, num_stages=2)
            for r, l, bd, nw in itertools.product((2, 4, 8), (32, 128), (64, 128), (4, 8))])
        unknown = set(a.sweep.split(",")) - set(grids) - {"all"}
        if unknown:
            raise SystemExit(f"--sweep names unknown kernels {sorted(unknown)}; known: {sorted(grids)}")
        for name, (timed, cfgs) in grids.items():
            if a.sweep != "all" and name not in a.sweep.split(","):
                continue
            best = None
            for c in cfgs:
                mt._ENV_CFG.clear()
                mt._ENV_CFG[name] = c
                try:
                    t = timed()
                except Exception as e:  # e.g. out of registers / shared memory
                    print("sweep", name, c, "failed:", str(e)[:100])
                    continue
                print("sweep", name, json.dumps(c), f"{t:.3f} ms", flush=True)
                best = min(best or (t, c), (t, c), key=lambda tc: tc[0])
            print("best", name, json.dumps(best[1]), f"{best[0]:.3f} ms", flush=True)
        mt._ENV_CFG.clear()


HEAD = 256  # mom-340m's head dim: the q / k norm groups


class _L2Norm(torch.autograd.Function):
    """The scan's former q / k L2 norm: its own Triton kernels, one pass each way."""
    @staticmethod
    def forward(ctx, x):
        from megamom.kernels.triton.l2norm import l2norm_fwd
        y, r = l2norm_fwd(x.view(-1, HEAD))
        ctx.save_for_backward(y, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from megamom.kernels.triton.l2norm import l2norm_bwd
        y, r = ctx.saved_tensors
        return l2norm_bwd(y, r, dy.reshape(-1, HEAD), dy.dtype).view(dy.shape)


def layer_step(N, cu, K=1024):
    """q [N, K] and projection rows [N, k K | v K | 8 gates] -> normalised q, k and v, fwd + bwd; both
    layouts run the current conv kernels (the vector loads help both)."""
    from megamom.kernels.short_conv.conv import causal_conv1d_varlen, causal_conv1d_varlen_split
    q = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = torch.randn(N, 2 * K + 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(K, 4, device="cuda", requires_grad=True) for _ in range(3)]
    dys = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def separate():  # three convs, then the scan's own L2-norm kernels
        k, v, gates = rows.split([K, K, 8], -1)
        outs = [causal_conv1d_varlen(x, w, cu, activation="silu", backend="triton")[0] for x, w in zip((q, k, v), ws)]
        outs[0], outs[1] = _L2Norm.apply(outs[0]), _L2Norm.apply(outs[1])
        torch.autograd.backward(outs + [gates], dys + [torch.ones_like(gates)])

    def fused():
        (qn,), _, _ = causal_conv1d_varlen_split(q, ws[:1], cu, activation="silu", backend="triton",
                                                 l2norm_groups=[HEAD])
        (kn, v), gates, _ = causal_conv1d_varlen_split(rows, ws[1:], cu, activation="silu", backend="triton",
                                                       l2norm_groups=[HEAD, None])
        torch.autograd.backward([qn, kn, v, gates], dys + [torch.ones_like(gates)])

    def fused_fwd():
        with torch.no_grad():
            causal_conv1d_varlen_split(q, ws[:1], cu, activation="silu", backend="triton", l2norm_groups=[HEAD])
            causal_conv1d_varlen_split(rows, ws[1:], cu, activation="silu", backend="triton",
                                       l2norm_groups=[HEAD, None])
    t_sep, per_sep = kernel_ms(separate)
    t_fus, per_fus = kernel_ms(fused)
    short = lambda per: {k[:40]: round(v, 4) for k, v in per.items() if v > 0.005}  # noqa: E731
    print("layer q/k/v step, separate:", json.dumps(short(per_sep)))
    print("layer q/k/v step, fused:", json.dumps(short(per_fus)))
    print("| layer q / k / v step (conv + SiLU + q/k L2 norm), fwd+bwd | GPU ms |\n|---|---|")
    print(f"| separate: 3 convs, the scan's L2-norm kernels, the split's concat | {t_sep:.3f} |")
    print(f"| fused | {t_fus:.3f} |")
    print(f"fused / separate: {t_fus / t_sep:.2f}x time")
    return fused_fwd, fused


if __name__ == "__main__":
    main()
