#!/usr/bin/env python3
"""Run the MoM-shaped scan (benchmarks/bench_kernels.py's `mom` case) forward + backward a few
times and nothing else: a target for Nsight Compute, e.g.

  ncu --clock-control none -k regex:'_bwd_wy|_bwd_dqkwg|_fwd_h|_bwd_dhu|_prep|_fwd_o' \\
      --launch-skip 8 --launch-count 8 --section SpeedOfLight --section Occupancy \\
      --section LaunchStats --section WarpStateStats python benchmarks/scan_once.py

(8 matching launches per iteration: the first iteration compiles and warms up.)"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import mom_inputs, ours_fn  # noqa: E402

if __name__ == "__main__":
    ins, cu, _ = mom_inputs()
    do = torch.randn_like(ins[2])
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        o, _ = ours_fn(*ins, cu=cu)
        o.backward(do)
    torch.cuda.synchronize()
