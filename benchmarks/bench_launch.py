"""Is a mom-340m training step (B8 T2048, Triton path) bound by its kernels or by their launches?

    python benchmarks/bench_launch.py

For one step: the host syncs it makes (CUDA sync debug mode), the CPU time to issue each phase,
and each phase's GPU span (CUDA events) twice: started cold (the GPU idle, as after a host sync:
the GPU waits for every launch) and started with the CPU far ahead (a long GPU sleep queued
first: the GPU starts the step with a full launch queue). The difference is the time the GPU waits
for the CPU. Prints a table last."""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import cfg_of  # noqa: E402

from megamom.model import build_model  # noqa: E402


def main():
    cfg = cfg_of("mom-340m", kernel_backend="triton")
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (8, 2049), device="cuda")

    def step(ev=None):
        """One step; ev: 4 CUDA events around forward / backward / optimizer. -> CPU ms per phase."""
        marks = []

        def mark(i):
            if ev:
                ev[i].record()
            marks.append(time.perf_counter())
        mark(0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
        mark(1)
        out.loss.backward()
        mark(2)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(3)
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"host syncs in one step: {len(syncs)}", *{f"{w.filename}:{w.lineno}" for w in syncs})

    rows = []
    for ahead in (False, True, False, True):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize()
        if ahead:
            # ~0.4 s at ~2 GHz. The CPU fills CUDA's launch queue meanwhile (it then blocks, so its
            # issue time includes the wait) and the GPU starts the step with that backlog.
            torch.cuda._sleep(int(8e8))
        cpu = step(ev)
        torch.cuda.synchronize()
        gpu = [ev[i].elapsed_time(ev[i + 1]) for i in range(3)]
        rows.append(("CPU ahead" if ahead else "cold start", gpu, cpu))
        print(rows[-1][0], "GPU ms", [round(g, 1) for g in gpu], "CPU issue ms", [round(c, 1) for c in cpu], flush=True)
    print("\n| start | GPU fwd ms | GPU bwd ms | GPU opt ms | GPU step ms | CPU issue fwd / bwd ms |")
    print("|---|---|---|---|---|---|")
    for name, gpu, cpu in rows:
        print(f"| {name} | {gpu[0]:.1f} | {gpu[1]:.1f} | {gpu[2]:.1f} | {sum(gpu):.1f} | {cpu[0]:.1f} / {cpu[1]:.1f} |")


if __name__ == "__main__":
    main()
