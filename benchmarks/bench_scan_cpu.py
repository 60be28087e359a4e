"""CPU time of the chunked PyTorch scan vs the naive per-token recurrence (the definition), per
update rule, forward and forward+backward. Usage: python benchmarks/bench_scan_cpu.py [--T 2048]"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megamom.kernels import RULES, memory_scan, memory_scan_naive


def inputs(rule, B, T, H, K, V):
    r = RULES[rule]
    q, k, v = (torch.randn(B, T, H, D) for D in (K, K, V))
    g = None
    if r.decay:
        g = F.logsigmoid(torch.randn(B, T, H) if r.decay == "scalar" else torch.randn(B, T, H, K))
    beta = torch.rand(B, T, H) if r.delta else None
    return [None if t is None else t.requires_grad_() for t in (q, k, v, g, beta)]


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"B={a.B} T={a.T} H={a.H} K=V={a.K}, chunk 64")
    print(f"{'rule':14s} {'naive fwd s':>12s} {'chunk fwd s':>12s} {'speedup':>8s} "
          f"{'naive f+b s':>12s} {'chunk f+b s':>12s} {'speedup':>8s}")
    for rule in RULES:
        args = inputs(rule, a.B, a.T, a.H, a.K, a.K)
        with torch.no_grad():
            nf = timeit(lambda: memory_scan_naive(rule, *args, use_qk_l2norm=True), a.reps)
            cf = timeit(lambda: memory_scan(rule, *args, use_qk_l2norm=True, backend="torch"), a.reps)

        def fb(fn):
            return lambda: fn().sum().backward()
        nb = timeit(fb(lambda: memory_scan_naive(rule, *args, use_qk_l2norm=True)[0]), 1)
        cb = timeit(fb(lambda: memory_scan(rule, *args, use_qk_l2norm=True, backend="torch")[0]), a.reps)
        print(f"{rule:14s} {nf:12.3f} {cf:12.3f} {nf / cf:7.1f}x {nb:12.3f} {cb:12.3f} {nb / cb:7.1f}x")


if __name__ == "__main__":
    main()
