"""Launch parameters of the Triton kernels (block sizes, warps, stages per kernel; overrides from
MEGAMOM_TRITON_CFG) and the interpreter switch (TRITON_INTERPRET=1: kernels run on CPU tensors)."""
from __future__ import annotations

import json
import os

import triton  # ImportError here means: no Triton kernels

# Decorated kernels are interpreted (numpy, CPU tensors) when TRITON_INTERPRET=1 at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a 1-element numpy array and converts it with
    int(array) for `range(n)` over a runtime n; numpy >= 2.3 refuses that conversion. Re-set
    __index__ right after the interpreter installs its own (restored with it after each launch)."""
    from triton.runtime import interpreter as _interp

    if getattr(_interp, "_megamom_index_patch", False) or not hasattr(_interp, "_patch_lang_tensor"):
        return
    original = _interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = patched
    _interp._megamom_index_patch = True


if INTERPRET:
    _patch_interpreter_index()


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


# Launch parameters per kernel: at most 227 KB of shared memory for sm_90 at K = V = 256
# (kernels/triton/aot_check.py), then by timing on an H100 / H200 (benchmarks/bench_kernels.py
# --sweep; the scan's kernels only among configurations benchmarks/validate_configs.py passes).
# MEGAMOM_TRITON_CFG='{"fwd_h": {"BV": 64, "num_warps": 4}}' overrides them (benchmark sweeps).
_DEFAULT_CFG = {
    # The scan's kernels: the fastest at the MoM layer's shape (40 varlen segments, 49152 rows,
    # K = V = 256) on an H200 among the candidates checked against float64 and run to run first
    # (benchmarks/validate_configs.py; timings in benchmarks/RESULTS.md). Triton 3.6 compiles some
    # configurations wrong on Hopper: _bwd_dqkwg_kernel with num_stages >= 2 gives a wrong dw
    # (BV = 64) or dw / dk / dg that change from run to run (BV = 32); one stage is reproducible.
    # Re-validate before changing any of these (tests: test_gpu_mom_head_size).
    "prep": dict(BK=64, BV=64, num_warps=4, num_stages=2),
    "fwd_h": dict(BV=32, num_warps=4, num_stages=2),
    # BV 128 / 8 warps: q k^T is recomputed per value block, half as often as at BV 64
    "fwd_o": dict(BK=64, BV=128, num_warps=8, num_stages=2),
    "bwd_local": dict(BK=64, BV=64, num_warps=4, num_stages=2),
    # BV 32 so that 2 stages fit: BV 64 with 2 stages needs more shared memory than sm_90 has, BV 32 with
    # 3 stages failed validation; float32 tiles run at one stage (chunk_triton._bwd)
    "bwd_dhu": dict(BV=32, num_warps=8, num_stages=2),
    # One stage: 2+ stages miscompile (above). PREFETCH loads the next value block by hand before this
    # one's products, standing in for the pipelining; the epilogue stores each accumulator once final
    # (fewer spills), which lets BK 64 / 4 warps beat BK 128 / 8 warps. BK 32 / 4 warps crashed the
    # process's CUDA context (not examined).
    "bwd_dqkwg": dict(BK=64, BV=64, num_warps=4, num_stages=1, PREFETCH=True),
    "bwd_wy": dict(BK=64, BV=64, num_warps=4, num_stages=1),
    "l2norm": dict(BM=16, num_warps=4, num_stages=1),
    "step": dict(BV=32, num_warps=4, num_stages=1),
    "conv_fwd": dict(BR=16, BD=128, num_warps=4, num_stages=1),  # conv kernels: bench_conv.py --sweep, H200
    "conv_bwd": dict(BR=32, BD=64, num_warps=4, num_stages=1),  # dz + partial dW, per-row weights (or W > 4)
    "conv_bwd_dx": dict(BR=32, BD=128, num_warps=4, num_stages=1),
    # with the q / k L2 norm a program covers one head (BD = next_pow2(head dim)): rows only
    "conv_fwd_norm": dict(BR=32, num_warps=4, num_stages=1),
    "conv_bwd_norm": dict(BR=8, num_warps=4, num_stages=1),
    "conv_bwd_shared_norm": dict(BR=4, RB=64, num_warps=4, num_stages=3),
    # one-pass backward, one weight, no norm: R chunks of L rows side by side per program
    "conv_bwd_slide": dict(R=8, L=128, BD=128, num_warps=4, num_stages=2),
    "combine_norm": dict(BN=8, num_warps=4, num_stages=1),
    "swiglu": dict(BLOCK=2048, num_warps=8, num_stages=1),
    "cross_entropy": dict(BLOCK_V=4096, num_warps=8, num_stages=1),
    "gather_sum": dict(BN=4, BD=1024, num_warps=4, num_stages=1),
    "packing": dict(BLOCK=1024, num_warps=4, num_stages=1),  # the dispatch's counting sort (packing.py)
    # small ops fused into one launch each (varlen.py, router_loss.py, gates.py): not swept
    # (varlen: a [BLOCK, BS] comparison tile, kept small: BLOCK 1024 x BS 64 spills registers)
    "varlen": dict(BLOCK=256, BS=16, num_warps=4, num_stages=1),
    "router_loss_fwd": dict(BM=512, BP=64, num_warps=4, num_stages=1),
    "router_loss_bwd": dict(BM=512, num_warps=4, num_stages=1),
    "gates_fwd": dict(BM=256, num_warps=4, num_stages=1),
    "gates_bwd": dict(BM=256, RB=2, num_warps=4, num_stages=1),
    # bench_router.py --sweep, H200 (a tile that reduced over the columns at every step was several times slower)
    "router_fwd": dict(BM=16, BD=64, num_warps=4, num_stages=3),
    # bench_router.py --sweep (fwd+bwd), H200
    "router_bwd": dict(BM=16, BD=256, RB=16, num_warps=4, num_stages=1),
    "router_dlogits": dict(BM=64, num_warps=4, num_stages=1),
    "rmsnorm_fwd": dict(BM=4, num_warps=4, num_stages=1),
    "rmsnorm_bwd": dict(BM=4, RB=16, num_warps=8, num_stages=1),
}
_ENV_CFG = json.loads(os.environ.get("MEGAMOM_TRITON_CFG", "{}") or "{}")
if set(_ENV_CFG) - set(_DEFAULT_CFG):  # a stale or misspelt override would otherwise do nothing
    raise ValueError(f"MEGAMOM_TRITON_CFG names unknown kernels {sorted(set(_ENV_CFG) - set(_DEFAULT_CFG))}; "
                     f"known: {sorted(_DEFAULT_CFG)}")


def launch_cfg(name: str, **limits) -> dict:
    """Launch parameters of kernel `name`; block sizes are clipped to `limits` (e.g. BV=next_pow2(V)).
    Under the interpreter: the smallest legal blocks and no warps/stages."""
    cfg = dict(_DEFAULT_CFG[name])
    cfg.update(_ENV_CFG.get(name, {}))
    for key, lim in limits.items():
        if key in cfg:
            cfg[key] = min(cfg[key], lim)
    if INTERPRET:
        cfg.pop("num_warps", None)
        cfg.pop("num_stages", None)
    return cfg
