"""GPU time of every kernel the MoM layer launches in one forward + backward (mom-340m shape: B8
T2048 d1024, 4 memories top-2 + shared, scan_keep=all, bf16), with the balance and z losses in the
loss, as the model step has them. Run it under two installs (A/B) to see which kernels a change
added, removed or slowed: the first line is the total and the kernel count per iteration.

    python benchmarks/bench_layer_kernels.py [--rows 70]

(The current totals and the largest kernels: benchmarks/RESULTS.md, "The MoM layer".)"""
import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import cfg_of  # noqa: E402

from megamom.model.memory_mixer import MemoryMixer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=70, help="kernels listed, slowest first")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    B, T = 8, 2048
    layer = MemoryMixer(cfg_of("mom-340m", kernel_backend="triton", scan_keep="all")).to("cuda", torch.bfloat16)
    x = torch.randn(B, T, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    doc_ids = torch.arange(B, device="cuda").repeat_interleave(T)

    def forward_backward():
        o, stats, _ = layer(x, doc_ids, B)
        (o.float().pow(2).mean() + 0.01 * stats.aux_loss + 0.001 * stats.z_loss).backward()

    for _ in range(3):  # compile and warm up
        forward_backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            forward_backward()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0, 0.0])  # name -> [launches, us]
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[e.name[:60]]
            entry[0] += 1
            entry[1] += e.device_time_total
    n = args.iters
    total = sum(t for _, t in per_kernel.values())
    print(f"TOTAL {total / n:.0f} us per iteration, {sum(c for c, _ in per_kernel.values()) / n:.0f} kernels "
          f"per iteration ({torch.cuda.get_device_name()})")
    for name, (count, t) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        print(f"{t / n:9.1f} us {count / n:5.1f}x  {name}")


if __name__ == "__main__":
    main()
