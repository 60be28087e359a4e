"""Shared machinery of the Triton kernels (imported as `megamom.kernels.triton`).

Importing this package raises ImportError where Triton is missing, which is what
`megamom.kernels.rules.triton_available()` relies on.

Conventions of every chunked kernel: tokens are packed [T_total, H, D] (B=1 plus cu_seqlens; a
dense [B, T] batch is turned into B segments of length T), one program per (chunk, head) or per
(segment, head, value block). `Varlen` holds the chunk bookkeeping, built on the device (no host
sync), computed once in forward and reused by backward."""
from __future__ import annotations

import functools
import json
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here means: no Triton kernels)
import triton.language as tl  # noqa: F401

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


@dataclass
class Varlen:
    cu: torch.Tensor  # [N+1] int32 on the device
    chunk_indices: torch.Tensor  # [NT, 2] int32: (segment, chunk within segment)
    chunk_offsets: torch.Tensor  # [N] int32: global index of each segment's first chunk
    N: int  # segments
    NT: int  # chunk slots: the chunk count, or (varlen) an upper bound of it; see prepare_varlen


_LAST: list = [None, None]  # (key, Varlen) of the last varlen call: one entry, no stale reuse


def prepare_varlen(cu_seqlens: Optional[torch.Tensor], B: int, T: int, chunk_size: int,
                   device: torch.device) -> Varlen:
    """Chunk bookkeeping, computed on the device WITHOUT a host sync (a sync per layer would stall
    the GPU while the CPU catches up). With cu_seqlens the chunk count is not known on the host,
    so NT is its upper bound T // chunk_size + N; the surplus slots are empty chunks past the end
    of the last segment (every kernel masks them out: no valid row).

    Cached: dense batches by shape; varlen by the identity (and version) of the cu_seqlens
    tensor object, so a repeated call with the same tensor reuses it. A new tensor, even at a
    reused address, is a new object and recomputes. cu_seqlens must be non-decreasing with
    cu[-1] <= T (checked when it lives on the CPU)."""
    if cu_seqlens is None:
        return _prepare_dense(B, T, chunk_size, torch.device(device))
    key = (weakref.ref(cu_seqlens), cu_seqlens._version, chunk_size, T, torch.device(device))
    last_key, last = _LAST
    if last_key is not None and last_key[0]() is cu_seqlens and last_key[1:] == key[1:]:
        return last
    vl = _prepare_varlen(cu_seqlens, B * T, chunk_size, torch.device(device))
    _LAST[0], _LAST[1] = key, vl
    return vl


@functools.lru_cache(maxsize=64)
def _prepare_dense(B: int, T: int, chunk_size: int, device: torch.device) -> Varlen:
    n_chunks = (T + chunk_size - 1) // chunk_size
    seg = torch.arange(B).repeat_interleave(n_chunks)
    within = torch.arange(n_chunks).repeat(B)
    cu = torch.arange(0, B * T + 1, T) if T > 0 else torch.zeros(B + 1, dtype=torch.int64)
    return Varlen(cu.to(device=device, dtype=torch.int32), torch.stack([seg, within], 1).to(device, torch.int32),
                  (torch.arange(B) * n_chunks).to(device=device, dtype=torch.int32), B, B * n_chunks)


def _prepare_varlen(cu_seqlens: torch.Tensor, total: int, chunk_size: int, device: torch.device) -> Varlen:
    N = cu_seqlens.numel() - 1
    if cu_seqlens.device.type == "cpu":  # free to check here; on the GPU it would cost a sync
        lens_cpu = cu_seqlens[1:] - cu_seqlens[:-1]
        if (lens_cpu < 0).any() or (N > 0 and int(cu_seqlens[-1]) > total):
            raise ValueError(f"cu_seqlens must be non-decreasing and end at most at {total} rows")
    NT = total // chunk_size + N if (N > 0 and total > 0) else 0
    cu = cu_seqlens.detach().to(device=device)
    if N > 0 and (cu.is_cuda or INTERPRET):  # one kernel (varlen.py) instead of ~14 small ones
        from .varlen import chunk_table
        return Varlen(*chunk_table(cu, NT, chunk_size), N, NT)
    return _prepare_varlen_torch(cu, NT, chunk_size)


def _prepare_varlen_torch(cu: torch.Tensor, NT: int, chunk_size: int) -> Varlen:
    """The reference of varlen.chunk_table (and the path for CPU tensors outside the interpreter)."""
    cu = cu.to(torch.int64)
    N = cu.numel() - 1
    device = cu.device
    lens = cu[1:] - cu[:-1]
    n_chunks = (lens + chunk_size - 1) // chunk_size
    ends = n_chunks.cumsum(0)
    offsets = ends - n_chunks
    slot = torch.arange(NT, device=device)
    seg = torch.searchsorted(ends, slot, right=True).clamp_(max=max(N - 1, 0))
    idx = torch.stack([seg, slot - offsets[seg]], 1).to(torch.int32)
    return Varlen(cu.to(torch.int32), idx, offsets.to(torch.int32), N, NT)


# Launch parameters per kernel: at most 227 KB of shared memory for sm_90 at K = V = 256
# (kernels/triton/aot_check.py), then by timing on an H100 / H200 (benchmarks/bench_kernels.py
# --sweep; the scan's kernels only among configurations benchmarks/validate_configs.py passes).
# MEGAMOM_TRITON_CFG='{"fwd_h": {"BV": 64, "num_warps": 4}}' overrides them (benchmark sweeps).
_DEFAULT_CFG = {
    # The scan's kernels: H200 sweep at the MoM layer's shape (40 varlen segments, 49152 rows,
    # K = V = 256), 2026-11-26, every candidate checked against float64 and run to run first
    # (benchmarks/validate_configs.py). Triton 3.6 compiles some configurations wrong on Hopper:
    # _bwd_dqkwg_kernel with num_stages >= 2 gave a wrong dw (BV = 64) or dw / dk / dg that changed
    # from run to run (BV = 32; also the session-8 default, 8 warps / 2 stages); one stage is
    # reproducible. Re-validate before changing any of these (tests: test_gpu_mom_head_size).
    "prep": dict(BK=64, BV=64, num_warps=4, num_stages=2),
    "fwd_h": dict(BV=32, num_warps=4, num_stages=2),
    # BV 128 / 8 warps (q k^T recomputed per value block half as often): 3.643 vs 3.695 ms MoM fwd+bwd,
    # keep=all (BV 256 / 8 warps 3.671, BV 128 / 4 warps 3.658; H200, session 14, each 12 runs bitwise equal)
    "fwd_o": dict(BK=64, BV=128, num_warps=8, num_stages=2),
    "bwd_local": dict(BK=64, BV=64, num_warps=4, num_stages=2),
    # BV 32 / 2 stages: 4.60 vs 4.80-4.82 ms MoM fwd+bwd, 6 runs bitwise equal, 4.06e-3 vs float64 (H200,
    # 2026-11-26); BV 64 with 2 stages and BV 32 with 3 stages fail (shared memory / NaN)
    "bwd_dhu": dict(BV=32, num_warps=8, num_stages=2),
    # BK 64 / 4 warps with PREFETCH (the next value block loaded by hand before this one's products) and
    # the epilogue storing each accumulator once final (fewer spills): 3.770-3.789 vs 3.924-3.963 ms at
    # session 11's BK 128 / 8 warps (H200, session 14, MoM fwd+bwd with keep=all, each 12 runs bitwise
    # equal, 4.06e-3 vs float64); without PREFETCH 3.845, BV 32 3.997, 8 warps 4.200. 2+ stages: wrong /
    # irreproducible dw (session 9). History: BK 128 (two key blocks: dO, vn, dvn read twice, not 4x) beat
    # BK 64 / 8 warps, 4.99 vs 5.18 ms, before the epilogue change (session 11). BK 32 / 4 warps failed with an
    # error that left the process's CUDA context unusable (not examined; the candidates after it in that
    # run, BK 128 / 4 warps, BV 128, 2 stages, could not be judged)
    "bwd_dqkwg": dict(BK=64, BV=64, num_warps=4, num_stages=1, PREFETCH=True),
    "bwd_wy": dict(BK=64, BV=64, num_warps=4, num_stages=1),
    "l2norm": dict(BM=16, num_warps=4, num_stages=1),
    "step": dict(BV=32, num_warps=4, num_stages=1),
    "conv_fwd": dict(BR=16, BD=128, num_warps=4, num_stages=1),  # H200 sweeps 2026-11-26 (bench_conv.py --sweep)
    "conv_bwd": dict(BR=32, BD=64, num_warps=4, num_stages=1),  # dz + partial dW, per-row weights (or W > 4)
    "conv_bwd_dx": dict(BR=32, BD=128, num_warps=4, num_stages=1),
    # with the q / k L2 norm a program covers one head (BD = next_pow2(head dim)): rows only
    "conv_fwd_norm": dict(BR=32, num_warps=4, num_stages=1),
    "conv_bwd_norm": dict(BR=8, num_warps=4, num_stages=1),
    "conv_bwd_shared_norm": dict(BR=4, RB=64, num_warps=4, num_stages=3),
    # one-pass backward, one weight, no norm: H200 sweep 2026-11-27 (0.610 ms v-slice fwd+bwd; R 4 / L 32 0.633)
    "conv_bwd_slide": dict(R=8, L=128, BD=128, num_warps=4, num_stages=2),
    "combine_norm": dict(BN=8, num_warps=4, num_stages=1),
    "swiglu": dict(BLOCK=2048, num_warps=8, num_stages=1),
    "cross_entropy": dict(BLOCK_V=4096, num_warps=8, num_stages=1),
    "gather_sum": dict(BN=4, BD=1024, num_warps=4, num_stages=1),
    "packing": dict(BLOCK=1024, num_warps=4, num_stages=1),  # routing's counting sort (packing.py)
    # small ops fused into one launch each (varlen.py, router_loss.py, gates.py): not swept
    # (varlen: a [BLOCK, BS] comparison tile; BLOCK 1024 x BS 64 spilled registers, 292 us on an H100)
    "varlen": dict(BLOCK=256, BS=16, num_warps=4, num_stages=1),
    "router_loss_fwd": dict(BM=512, BP=64, num_warps=4, num_stages=1),
    "router_loss_bwd": dict(BM=512, num_warps=4, num_stages=1),
    "gates_fwd": dict(BM=256, num_warps=4, num_stages=1),
    "gates_bwd": dict(BM=256, RB=2, num_warps=4, num_stages=1),
    # bench_router.py --sweep (H200, 2026-11-27): 0.024 ms vs 0.086 (in the step's profile) for the tile that
    # reduced over the columns at every step
    "router_fwd": dict(BM=16, BD=64, num_warps=4, num_stages=3),
    # bench_router.py --sweep (fwd+bwd, H200, 2026-11-27): 0.1065 ms; the previous RB 8 0.1135 (same call)
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
