"""Shared pieces of the Triton kernel tests (tests/kernels/test_*_triton.py and their GPU tier,
tests/gpu/test_kernels_gpu.py): relative errors and bounds, the interpreter runner, the rule-generic
scan and decode-step checks. Kernels are checked against the float64 PyTorch definition.

Two tiers:
  * CPU (CI): the real kernel code under TRITON_INTERPRET=1, fp32, tiny shapes (K=16, V=32,
    chunk 16, blocks of 16 so every block loop runs more than once). The interpreter must be
    switched on before Triton kernels are decorated, so the cases of each test file run in ONE
    subprocess (the file run as a script with --interp) and its tests read the JSON report.
  * GPU (@pytest.mark.gpu, tests/gpu/, skipped without CUDA): bf16 and fp32 at chunk 64 against float64.

Every check is a relative error ||x - ref|| / ||ref|| over one output or gradient. Bounds:
interpreter 5e-5 (fp32 arithmetic); GPU fp32 (tf32 dots) 5e-3; GPU bf16 2e-2 (bf16 operands and
bf16 intermediates h, w, u, v_new, as in flash-linear-attention). Measured values: docs/kernels.md.
Set MEGAMOM_ERRLOG=path to append every measured error (JSON lines) for the results table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamom.kernels.rules import get_rule, memory_scan_naive, memory_step

INTERP_BLOCKS = {"fwd_h": {"BV": 16}, "fwd_o": {"BV": 16}, "bwd_local": {"BK": 16, "BV": 16}, "bwd_dhu": {"BV": 16},
                 "prep": {"BV": 16}, "bwd_dqkwg": {"BK": 16, "BV": 16}, "bwd_wy": {"BK": 16, "BV": 16},
                 "step": {"BV": 16}, "conv_fwd": {"BR": 16, "BD": 16}, "conv_bwd": {"BR": 16, "BD": 16},
                 "conv_bwd_dx": {"BR": 16, "BD": 16},
                 "conv_fwd_norm": {"BR": 16}, "conv_bwd_norm": {"BR": 16}, "conv_bwd_shared_norm": {"BR": 16, "RB": 2},
                 "conv_bwd_slide": {"R": 4, "L": 4, "BD": 16},
                 "combine_norm": {"BN": 4}, "gather_sum": {"BN": 4, "BD": 16}, "swiglu": {"BLOCK": 256},
                 "cross_entropy": {"BLOCK_V": 256}, "rmsnorm_fwd": {"BM": 4}, "rmsnorm_bwd": {"BM": 4, "RB": 3},
                 "router_fwd": {"BM": 4, "BD": 16}, "router_bwd": {"BM": 4, "BD": 16, "RB": 2},
                 "router_dlogits": {"BM": 4}, "packing": {"BLOCK": 8}, "varlen": {"BLOCK": 8, "BS": 4},
                 "router_loss_fwd": {"BM": 8, "BP": 2}, "router_loss_bwd": {"BM": 8}, "gates_fwd": {"BM": 8},
                 "gates_bwd": {"BM": 8, "RB": 2}}
BOUND = {"interp": 5e-5, torch.float32: 5e-3, torch.bfloat16: 2e-2, "interp_fp16": 5e-3}

LENS = [37, 0, 1, 40, 16, 5]  # empty, length-1, not multiples of the chunk, multi-chunk


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def interp_report(test_file: str) -> dict:
    """Runs `test_file` as a script with --interp under the interpreter, with small blocks: its
    run_interp_suite() -> {case: {name: relative error}} (one subprocess per test file)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", MEGAMOM_TRITON_CFG=json.dumps(INTERP_BLOCKS))
    p = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--interp"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_interpreter_case(interp_results, case):
    """The errors of one interpreter case within its bound (NaN fails too)."""
    errs = interp_results[case]
    assert errs, case
    bound = BOUND["interp_fp16"] if case == "scan_fp16" else 0.0 if case.startswith("scan_keep_equal") \
        else BOUND["interp"]
    bad = {k: v for k, v in errs.items() if not v <= bound}  # NaN fails too
    assert not bad, f"{case}: {bad}"


def _log(kind, case, dtype, errs):
    path = os.environ.get("MEGAMOM_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "case": case, "dtype": str(dtype), "errors": errs}) + "\n")


def _assert(errs, bound, what):
    bad = {k: v for k, v in errs.items() if not v <= bound}
    assert not bad, f"{what}: {bad} (bound {bound})"


def make_inputs(lens, H, K, V, dtype, device, rule="gated_delta", g_mode="normal", h0=True, l2=True,
                dense_batch=None, seed=0):
    """Packed varlen inputs (or a dense [B, T] batch). g_mode: normal (logsigmoid of N(0,1)),
    strong (g ~ -20: decay to ~0 in one step), weak (g ~ -1e-4: decay ~1)."""
    gen = torch.Generator().manual_seed(seed)
    r = get_rule(rule)
    if dense_batch is not None:
        B, T = dense_batch
        cu = None
    else:
        B, T = 1, sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    N = B if cu is None else len(lens)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2:  # keep |k| ~ 1 so the delta rule stays contractive
        q, k = q / K ** 0.5, k / K ** 0.5
    v = torch.randn(B, T, H, V, generator=gen)
    g = None
    if r.decay == "scalar":
        g = {"normal": F.logsigmoid(torch.randn(B, T, H, generator=gen)),
             "strong": -20.0 * (1 + 0.1 * torch.rand(B, T, H, generator=gen)),
             "weak": -1e-4 * torch.rand(B, T, H, generator=gen)}[g_mode]
    beta = torch.rand(B, T, H, generator=gen) if r.delta else None
    s0 = torch.randn(N, H, K, V, generator=gen) if h0 else None
    cast = lambda x, dt: None if x is None else x.to(device=device, dtype=dt)  # noqa: E731
    ins = dict(q=cast(q, dtype), k=cast(k, dtype), v=cast(v, dtype), g=cast(g, torch.float32),
               beta=cast(beta, dtype), initial_state=cast(s0, torch.float32))
    return ins, (None if cu is None else cu.to(device))


def check_scan(rule, ins, cu, l2, chunk_size, seed=1, keep="none"):
    """Forward + backward (through o AND the final state) of triton_ops.memory_scan vs the float64
    naive recurrence; returns {name: relative error}. keep: what the backward takes from the
    forward instead of recomputing it (chunk_scan_triton)."""
    from megamom.kernels import triton_ops

    r = get_rule(rule)
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if ins[n] is not None]
    leaf = {n: (ins[n].clone().requires_grad_() if n in names else None) for n in ins}
    o, ht = triton_ops.memory_scan(r, leaf["q"], leaf["k"], leaf["v"], leaf["g"], leaf["beta"], None,
                                   leaf["initial_state"], True, cu, chunk_size, l2, keep)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    ref = {n: (ins[n].double().clone().requires_grad_() if n in names else None) for n in ins}
    ro, rht = memory_scan_naive(r, ref["q"], ref["k"], ref["v"], ref["g"], ref["beta"], None, ref["initial_state"],
                                True, cu, l2)
    ((ro * do.double()).sum() + (rht * dht.double()).sum()).backward()
    err = {"o": rel(o, ro), "final_state": rel(ht, rht)}
    for n in names:
        err["d" + n] = rel(leaf[n].grad, ref[n].grad)
    return err


def check_scan_cases(cases: dict) -> dict:
    """Each interpreter scan case ({name: dict(lens, rule, l2, keep, make_inputs' options)}) at
    H 2, K 16, V 32, chunk 16 in float32 -> {name: relative errors}."""
    out = {}
    for name, c in cases.items():
        c = dict(c)
        rule, l2, keep = c.pop("rule", "gated_delta"), c.pop("l2", True), c.pop("keep", "none")
        ins, cu = make_inputs(c.pop("lens"), 2, 16, 32, torch.float32, "cpu", rule=rule, l2=l2, **c)
        out[name] = check_scan(rule, ins, cu, l2, 16, keep=keep)
    return out


def check_keep_equal(rule, ins, cu, chunk_size) -> dict:
    """The scan with keep = states / all against keep = none on the same inputs: the kept states are
    the recomputed ones, so outputs and every gradient agree bit for bit (max |difference|), and the
    backward with kept states never runs the state recurrence again (its _fwd_h calls)."""
    from megamom.kernels import triton_ops
    from megamom.kernels.gated_delta_rule import chunk_triton as ct

    r = get_rule(rule)
    names = [n for n in ("q", "k", "v", "g", "beta", "initial_state") if ins[n] is not None]
    runs, calls = {}, []
    fwd_h = ct._fwd_h
    for keep in ("none", "states", "all"):
        leaf = {n: (ins[n].clone().requires_grad_() if n in names else None) for n in ins}
        o, ht = triton_ops.memory_scan(r, leaf["q"], leaf["k"], leaf["v"], leaf["g"], leaf["beta"], None,
                                       leaf["initial_state"], True, cu, chunk_size, True, keep)
        ct._fwd_h = lambda *a, **kw: calls.append(keep) or fwd_h(*a, **kw)
        try:
            (o.float().sum() + ht.square().sum()).backward()
        finally:
            ct._fwd_h = fwd_h
        runs[keep] = [o, ht] + [leaf[n].grad for n in names]
    diff = {keep: max((a - b).abs().max().item() for a, b in zip(runs[keep], runs["none"]))
            for keep in ("states", "all")}
    return {"diff_states": diff["states"], "diff_all": diff["all"],
            "bwd_state_passes_kept": float(sum(c != "none" for c in calls)),
            "bwd_state_passes_none_minus_1": float(calls.count("none") - 1)}


def check_step(rule, N, H, K, V, device, dtype, l2, seed=2):
    from megamom.kernels import triton_ops

    gen = torch.Generator().manual_seed(seed)
    r = get_rule(rule)
    q, k = torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen)
    v = torch.randn(N, H, V, generator=gen)
    g = {"scalar": F.logsigmoid(torch.randn(N, H, generator=gen)),
         "vector": F.logsigmoid(torch.randn(N, H, K, generator=gen)), None: None}[r.decay]
    beta = torch.rand(N, H, generator=gen) if r.delta else None
    s = torch.randn(N, H, K, V, generator=gen)
    dev = lambda x, dt=dtype: None if x is None else x.to(device=device, dtype=dt)  # noqa: E731
    o, s1 = triton_ops.memory_step(r, dev(q), dev(k), dev(v), dev(g, torch.float32), dev(beta), dev(s, torch.float32),
                                   use_qk_l2norm=l2)
    # in place must give the same
    s_inplace = dev(s, torch.float32).clone()
    o2, _ = triton_ops.memory_step(r, dev(q), dev(k), dev(v), dev(g, torch.float32), dev(beta), s_inplace,
                                   use_qk_l2norm=l2, out_state=s_inplace)
    dd = lambda x, dt=dtype: None if x is None else dev(x, dt).double()  # noqa: E731  (same rounding)
    ro, rs = memory_step(r, dd(q), dd(k), dd(v), dd(g, torch.float32), dd(beta), s.double().to(device),
                         use_qk_l2norm=l2)
    return {"o": rel(o, ro), "state": rel(s1, rs), "o_inplace": rel(o2, ro), "state_inplace": rel(s_inplace, rs)}

