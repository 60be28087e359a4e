#!/usr/bin/env python3
"""Validate and time launch configurations of the scan's Triton kernels at the MoM layer's shape.

Triton 3.6 compiles some configurations of these kernels wrong on Hopper (wrong gradients, NaN, or
results that change from run to run; fla #640, #984/#988 report the same class of bug in fla's
kernels). Every configuration in kernels/triton/__init__.py must pass this before it is used:
its forward + backward on varlen segments (empty, length-1 and partial chunks, K = V = 256) is
run --repeats times and must agree bitwise with itself and within 8e-3 of float64; then it is
timed on the MoM-shaped call (benchmarks/bench_kernels.py's `mom` case). Each configuration runs in
a process of its own: a kernel fault leaves its process's CUDA context unusable.

  python benchmarks/validate_configs.py '{"bwd_wy": {"num_warps": 2}}' '{"bwd_wy": {"num_warps": 4}}'
  python benchmarks/validate_configs.py            # the defaults only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help='JSON overrides, e.g. \'{"bwd_wy": {"num_warps": 2}}\'')
    ap.add_argument("--repeats", type=int, default=12, help="runs that must agree bitwise")
    ap.add_argument("--keep", default="none", choices=["none", "states", "all"],
                    help="the scan's keep (training runs use all): validated and timed with it")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: this process runs one
    a = ap.parse_args()
    bk.KEEP = a.keep
    candidates = [] if a.one else [{}]
    for text in a.configs:
        try:
            cand = json.loads(text)
        except json.JSONDecodeError as e:
            ap.error(f"not JSON: {text!r} ({e})")
        unknown = set(cand) - set(bk.mt._DEFAULT_CFG) if isinstance(cand, dict) else set()
        if not isinstance(cand, dict) or unknown:
            ap.error(f"{text!r}: expected {{kernel: {{parameter: value}}}} with kernels from "
                     f"{sorted(bk.mt._DEFAULT_CFG)}; unknown: {sorted(unknown)}")
        candidates.append(cand)
    if not a.one:  # each candidate in its own process: a kernel fault poisons its process's CUDA context
        rows = [_run_one(cand, a) for cand in candidates]
        print(f"\n| configuration | worst error vs float64 ({a.repeats} runs) | verdict | MoM fwd+bwd ms |\n"
              "|---|---|---|---|")
        for name, err, t, verdict in rows:
            print(f"| {name} | {err:.2e} | {verdict} | {t:.3f} |")
        return
    validate = bk.validator()
    ins, cu, _ = bk.mom_inputs()
    do = torch.randn_like(ins[2])

    def fb():
        o, _ = bk.ours_fn(*ins, cu=cu)
        o.backward(do)
    for cand in candidates:
        bk.mt._ENV_CFG.clear()
        bk.mt._ENV_CFG.update(cand)
        try:
            err = validate(a.repeats)
            t = bk.ms(fb) if err <= bk.SWEEP_MAX_ERR else float("nan")
        except Exception as e:  # e.g. out of shared memory
            err, t = float("nan"), float("nan")
            print(f"{cand}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        verdict = "ok" if err <= bk.SWEEP_MAX_ERR else ("NOT REPRODUCIBLE" if err == float("inf") else "WRONG")
        print(json.dumps({"err": err, "ms": t, "verdict": verdict}), flush=True)


def _run_one(cand: dict, a) -> tuple:
    """(name, worst error, ms, verdict) of one candidate, validated and timed in a fresh process."""
    name = json.dumps(cand) if cand else "defaults"
    p = subprocess.run([sys.executable, __file__, json.dumps(cand), "--one", "--repeats", str(a.repeats),
                        "--keep", a.keep], capture_output=True, text=True)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"{name}: the process failed (exit {p.returncode}): {(p.stdout + p.stderr)[-600:]}", flush=True)
        return name, float("nan"), float("nan"), "FAILED"
    print(f"{name}: worst error {res['err']:.2e} over {a.repeats} runs ({res['verdict']}), fwd+bwd {res['ms']:.3f} ms",
          flush=True)
    return name, res["err"], res["ms"], res["verdict"]


if __name__ == "__main__":
    main()
