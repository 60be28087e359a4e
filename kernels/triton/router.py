"""The MoM router in one kernel each way (float32 throughout, the routing precision):

    forward   logits = x W^T;  p = softmax(logits);  top-k of p (ties to the lower memory index);
              w = top-k values / their sum
    backward  dv_j = (dw_j - <dw, w>) / S  (S: the sum of the top-k values, from p and the indices);
              dp = dp_in + dv scattered to the chosen memories;  dlogits = p (dp - <dp, p>) + dlogits_in;
              dx = dlogits W;  dW = dlogits^T x  (per block of rows, summed in torch: deterministic)

With E = 4 memories, torch runs this as two float32 GEMMs of 4 columns (~46 us each, memory-bound but
off cuBLAS' fast path), softmax, top-k (~41 us), a sum and a division forward, and more backward; here
x is read once each way. The reference is `megamom.model.router.route` on the torch path."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _router_fwd_kernel(x, w, logits, probs, topw, topi, N, D: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                       EP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    m_m = o_m < N - r0
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    acc3 = tl.zeros([BM, EP, BD], dtype=tl.float32)  # reduced over the columns once, after the loop
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x + r0 * D + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        b_w = tl.load(w + o_e[:, None] * D + o_d[None, :], mask=m_e[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        acc3 += b_x[:, None, :] * b_w[None, :, :]
    _route_rows(tl.sum(acc3, 2), r0, N, logits, probs, topw, topi, E, K, EP, KP, BM)


@triton.jit
def _route_rows(acc, r0, N, logits, probs, topw, topi, E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr,
                KP: tl.constexpr, BM: tl.constexpr):
    """From the logits of rows [r0, r0 + BM) ([BM, EP] float32): stores them, the softmax, the
    top-k (ties to the lower index) and the renormalised top-k weights."""
    o_m = tl.arange(0, BM)
    m_m = o_m < N - r0
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    m_me = m_m[:, None] & m_e[None, :]
    p_me = r0 * E + o_m[:, None] * E + o_e[None, :]
    tl.store(logits + p_me, acc, mask=m_me)
    lg = tl.where(m_e[None, :], acc, float("-inf"))
    ex = tl.exp(lg - tl.max(lg, 1)[:, None])
    p = ex / tl.sum(ex, 1)[:, None]
    tl.store(probs + p_me, p, mask=m_me)
    o_k = tl.arange(0, KP)
    rest = tl.where(m_e[None, :], p, -1.0)
    vals = tl.zeros([BM, KP], dtype=tl.float32)
    idx = tl.zeros([BM, KP], dtype=tl.int32)
    for j in tl.static_range(K):
        v_j, i_j = tl.max(rest, 1, return_indices=True, return_indices_tie_break_left=True)
        vals = tl.where(o_k[None, :] == j, v_j[:, None], vals)
        idx = tl.where(o_k[None, :] == j, i_j[:, None], idx)
        rest = tl.where(o_e[None, :] == i_j[:, None], -1.0, rest)
    m_mk = m_m[:, None] & (o_k < K)[None, :]
    p_mk = r0 * K + o_m[:, None] * K + o_k[None, :]
    tl.store(topw + p_mk, vals / tl.sum(vals, 1)[:, None], mask=m_mk)
    tl.store(topi + p_mk, idx.to(tl.int64), mask=m_mk)


@triton.jit
def _dlogits(probs, topw, topi, dlogits, dprobs, dtopw, r0, N, E: tl.constexpr, K: tl.constexpr,
             EP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, HAS_DL: tl.constexpr, HAS_DP: tl.constexpr):
    """The logits' gradient of rows [r0, r0 + BM) ([BM, EP] float32, 0 outside the rows / memories)."""
    o_m = tl.arange(0, BM)
    m_m = o_m < N - r0
    o_e = tl.arange(0, EP)
    o_k = tl.arange(0, KP)
    m_me = m_m[:, None] & (o_e < E)[None, :]
    m_mk = m_m[:, None] & (o_k < K)[None, :]
    p_me = r0 * E + o_m[:, None] * E + o_e[None, :]
    p_mk = r0 * K + o_m[:, None] * K + o_k[None, :]
    p = tl.load(probs + p_me, mask=m_me, other=0.0)
    ti = tl.load(topi + p_mk, mask=m_mk, other=-1).to(tl.int32)
    tw = tl.load(topw + p_mk, mask=m_mk, other=0.0)
    dtw = tl.load(dtopw + p_mk, mask=m_mk, other=0.0)
    chosen = (o_m[:, None] < 0) & (o_e[None, :] < 0)  # all False
    dsel = tl.zeros([BM, EP], dtype=tl.float32)  # dw_j at memory ti_j
    for j in tl.static_range(K):
        hit = o_e[None, :] == tl.sum(tl.where(o_k[None, :] == j, ti, 0), 1)[:, None]
        chosen = chosen | hit
        dsel = tl.where(hit, tl.sum(tl.where(o_k[None, :] == j, dtw, 0.0), 1)[:, None], dsel)
    S = tl.sum(tl.where(chosen, p, 0.0), 1)
    S = tl.where(S > 0, S, 1.0)  # rows past N choose nothing
    dp = tl.where(chosen, (dsel - tl.sum(dtw * tw, 1)[:, None]) / S[:, None], 0.0)
    if HAS_DP:
        dp += tl.load(dprobs + p_me, mask=m_me, other=0.0)
    dl = p * (dp - tl.sum(dp * p, 1)[:, None])
    if HAS_DL:
        dl += tl.load(dlogits + p_me, mask=m_me, other=0.0)
    return tl.where(m_me, dl, 0.0)


@triton.jit
def _router_bwd_kernel(x, w, probs, topw, topi, dlogits, dprobs, dtopw, dx, dwp, N, D: tl.constexpr, E: tl.constexpr,
                       K: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                       RB: tl.constexpr, HAS_DL: tl.constexpr, HAS_DP: tl.constexpr):
    """One program per (RB blocks of BM rows, BD columns): dx of its tile, its rows' share of dW."""
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    o_m = tl.arange(0, BM)
    o_e = tl.arange(0, EP)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    dw3 = tl.zeros([BM, EP, BD], dtype=tl.float32)  # reduced over the rows once, after the loop
    for i in range(RB):
        r0 = (i_p.to(tl.int64) * RB + i) * BM
        m_md = (o_m < N - r0)[:, None] & m_d[None, :]
        dl = _dlogits(probs, topw, topi, dlogits, dprobs, dtopw, r0, N, E, K, EP, KP, BM, HAS_DL, HAS_DP)
        b_x = tl.load(x + r0 * D + o_m[:, None] * D + o_d[None, :], mask=m_md, other=0.0).to(tl.float32)
        # dx per memory: tl.sum(dl[:, :, None] * w[None, :, :], 1) gave wrong dx on the GPU (Triton 3.6,
        # H200; right in the interpreter)
        b_dx = tl.zeros([BM, BD], dtype=tl.float32)
        for e in tl.static_range(E):
            dl_e = tl.sum(tl.where(o_e[None, :] == e, dl, 0.0), 1)
            b_dx += dl_e[:, None] * tl.load(w + e * D + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        tl.store(dx + r0 * D + o_m[:, None] * D + o_d[None, :], b_dx, mask=m_md)
        dw3 += dl[:, :, None] * b_x[:, None, :]
    tl.store(dwp + i_p * (E * D) + o_e[:, None] * D + o_d[None, :], tl.sum(dw3, 0),
             mask=(o_e < E)[:, None] & m_d[None, :])


@triton.jit
def _router_dlogits_kernel(probs, topw, topi, dlogits, dprobs, dtopw, dl, N, E: tl.constexpr, K: tl.constexpr,
                           EP: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, HAS_DL: tl.constexpr,
                           HAS_DP: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    o_e = tl.arange(0, EP)
    b_dl = _dlogits(probs, topw, topi, dlogits, dprobs, dtopw, r0, N, E, K, EP, KP, BM, HAS_DL, HAS_DP)
    tl.store(dl + r0 * E + o_m[:, None] * E + o_e[None, :], b_dl, mask=(o_m < N - r0)[:, None] & (o_e < E)[None, :])


def router_dlogits(probs, topw, topi, dlogits=None, dprobs=None, dtopw=None) -> torch.Tensor:
    """The logits' gradient [N, E] (float32) from the router's outputs and their gradients (each may be
    None: unused), for a caller that has the router's input elsewhere (`rmsnorm.rms_norm_route`)."""
    N, E = probs.shape
    K = topw.shape[1]
    dl = torch.empty(N, E, dtype=torch.float32, device=probs.device)
    cfg = launch_cfg("router_dlogits")
    BM = cfg.pop("BM")
    if N:
        _router_dlogits_kernel[(triton.cdiv(N, BM),)](
            probs, topw, topi, dlogits.contiguous() if dlogits is not None else probs,
            dprobs.contiguous() if dprobs is not None else probs,
            dtopw.contiguous() if dtopw is not None else torch.zeros_like(topw), dl, N, E=E, K=K,
            EP=triton.next_power_of_2(E), KP=triton.next_power_of_2(K), BM=BM, HAS_DL=dlogits is not None,
            HAS_DP=dprobs is not None, **cfg)
    return dl


def route_buffers(N: int, E: int, topk: int, device) -> tuple[torch.Tensor, ...]:
    """The router's outputs to fill: logits, probs [N, E], top-k weights (float32) and indices (int64) [N, k]."""
    logits = torch.empty(N, E, dtype=torch.float32, device=device)
    return (logits, torch.empty_like(logits), torch.empty(N, topk, dtype=torch.float32, device=device),
            torch.empty(N, topk, dtype=torch.int64, device=device))


def route_forward(x: torch.Tensor, weight: torch.Tensor, topk: int):
    """The forward kernel alone, no autograd: x [N, d] and weight [E, d] contiguous, of any float
    dtype (read as float32 in the kernel: a decode step casts nothing) -> route_fused's outputs."""
    N, D = x.shape
    E = weight.shape[0]
    logits, probs, topw, topi = route_buffers(N, E, topk, x.device)
    EP, KP = triton.next_power_of_2(E), triton.next_power_of_2(topk)
    cfg = launch_cfg("router_fwd")
    BM, BD = cfg.pop("BM"), min(cfg.pop("BD"), triton.next_power_of_2(max(D, 1)))
    if N:
        _router_fwd_kernel[(triton.cdiv(N, BM),)](x, weight, logits, probs, topw, topi, N, D=D, E=E, K=topk,
                                                  EP=EP, KP=KP, BM=BM, BD=BD, **cfg)
    return logits, probs, topw, topi


class RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, topk):
        ctx.dtypes = (x.dtype, weight.dtype)
        x, weight = x.float().contiguous(), weight.float().contiguous()
        logits, probs, topw, topi = route_forward(x, weight, topk)
        ctx.save_for_backward(x, weight, probs, topw, topi)
        ctx.mark_non_differentiable(topi)
        ctx.set_materialize_grads(False)
        return logits, probs, topw, topi

    @staticmethod
    def backward(ctx, dlogits, dprobs, dtopw, _):
        x, weight, probs, topw, topi = ctx.saved_tensors
        N, D = x.shape
        E, K = weight.shape[0], topw.shape[1]
        if dtopw is None:
            dtopw = torch.zeros_like(topw)
        cfg = launch_cfg("router_bwd")
        BM, RB, BD = cfg.pop("BM"), cfg.pop("RB"), min(cfg.pop("BD"), triton.next_power_of_2(max(D, 1)))
        nprog = max(triton.cdiv(N, BM * RB), 1)
        dx = torch.empty_like(x)
        dwp = torch.zeros(nprog, E, D, dtype=torch.float32, device=x.device)
        if N:
            _router_bwd_kernel[(nprog, triton.cdiv(D, BD))](
                x, weight, probs, topw, topi, dlogits.contiguous() if dlogits is not None else probs,
                dprobs.contiguous() if dprobs is not None else probs, dtopw.contiguous(), dx, dwp, N, D=D, E=E, K=K,
                EP=triton.next_power_of_2(E), KP=triton.next_power_of_2(K), BM=BM, BD=BD, RB=RB,
                HAS_DL=dlogits is not None, HAS_DP=dprobs is not None, **cfg)
        return dx.to(ctx.dtypes[0]), dwp.sum(0).to(ctx.dtypes[1]), None


def route_fused(x: torch.Tensor, weight: torch.Tensor, topk: int):
    """x [N, d], weight [E, d] -> (logits, probs [N, E], top-k weights [N, k], top-k indices [N, k]),
    all float32 but the int64 indices; gradients for x and weight in float32."""
    if not 1 <= topk <= weight.shape[0]:
        raise ValueError(f"route_fused: topk {topk} must be in [1, {weight.shape[0]}] (the number of memories)")
    return RouterFunction.apply(x, weight, topk)
