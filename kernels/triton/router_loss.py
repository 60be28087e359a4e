"""The router's two auxiliary losses in one kernel each way (float32, the routing precision):

    forward   f_e = #{(t, j): topi_tj = e} / (k N)          (the share of routed slots, detached)
              P_e = sum_t p_te / N
              aux = E sum_e f_e P_e                           (Switch balance loss, 1 when balanced)
              z   = sum_t lse_t^2 / N,  lse_t = logsumexp_e logits_te
    backward  dp_te      = daux E f_e / N
              dlogits_te = dz 2 lse_t softmax(logits_t)_e / N

The reference is `megamom.model.router.load_balancing_loss` + `router_z_loss`: in torch they take
about 25 small kernels a layer forward and backward (a count scatter, sums, divisions, logsumexp,
pow, mean and their gradients), each a launch of a few microseconds over a [N, E] array of a few
hundred KB. The forward here is one launch of partial sums per block of rows and one program that
adds them in block order (deterministic, no atomics; a single program walking all 16k rows took
81 us on an H100), the backward one launch over row blocks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg


@triton.jit
def _lse_rows(logits, r0, o_m, m_m, o_e, m_e, E: tl.constexpr):
    """-> (logsumexp of rows r0 + o_m ([BM], 0 on masked rows), their softmax ([BM, EP], 0 where masked))."""
    m = m_m[:, None] & m_e[None, :]
    lg = tl.load(logits + r0 * E + o_m[:, None] * E + o_e[None, :], mask=m, other=float("-inf"))
    mx = tl.where(m_m, tl.max(lg, 1), 0.0)
    ex = tl.where(m, tl.exp(lg - mx[:, None]), 0.0)
    s = tl.where(m_m, tl.sum(ex, 1), 1.0)
    return tl.where(m_m, mx + tl.log(s), 0.0), ex / s[:, None]


@triton.jit
def _router_loss_partial_kernel(logits, probs, topi, partial, N, E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr,
                                KP: tl.constexpr, BM: tl.constexpr):
    """Rows [pid BM, (pid + 1) BM): partial[pid] = (slot counts [EP], probability sums [EP], sum of lse^2)."""
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    m_m = o_m < N - r0
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    o_k = tl.arange(0, KP)
    p = tl.load(probs + r0 * E + o_m[:, None] * E + o_e[None, :], mask=m_m[:, None] & m_e[None, :], other=0.0)
    lse, _ = _lse_rows(logits, r0, o_m, m_m, o_e, m_e, E)
    ti = tl.load(topi + r0 * K + o_m[:, None] * K + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :],
                 other=-1).to(tl.int32)
    counts = tl.zeros([EP], dtype=tl.float32)
    for j in tl.static_range(K):
        t_j = tl.sum(tl.where(o_k[None, :] == j, ti, 0), 1)  # -1 on masked rows: counts nothing
        counts += tl.sum((o_e[None, :] == t_j[:, None]).to(tl.float32), 0)
    base = partial + tl.program_id(0) * (2 * EP + 1)
    tl.store(base + o_e, counts)
    tl.store(base + EP + o_e, tl.sum(p, 0))
    tl.store(base + 2 * EP, tl.sum(lse * lse, 0))


@triton.jit
def _router_loss_finish_kernel(partial, aux, z, frac, NP, N, E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr,
                               BP: tl.constexpr):
    """Sums the NP partials in program order (deterministic) -> aux, z, frac."""
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    counts = tl.zeros([EP], dtype=tl.float32)
    prob_sum = tl.zeros([EP], dtype=tl.float32)
    z_sum = tl.zeros([BP], dtype=tl.float32)
    for p0 in range(0, NP, BP):
        o_p = p0 + tl.arange(0, BP)
        m_p = o_p < NP
        row = partial + o_p[:, None] * (2 * EP + 1) + o_e[None, :]
        counts += tl.sum(tl.load(row, mask=m_p[:, None], other=0.0), 0)
        prob_sum += tl.sum(tl.load(row + EP, mask=m_p[:, None], other=0.0), 0)
        z_sum += tl.load(partial + o_p * (2 * EP + 1) + 2 * EP, mask=m_p, other=0.0)
    f = counts / (K * N)
    tl.store(frac + o_e, f, mask=m_e)
    tl.store(aux, E * tl.sum(f * (prob_sum / N), 0))
    tl.store(z, tl.sum(z_sum, 0) / N)


@triton.jit
def _router_loss_bwd_kernel(logits, frac, daux, dz, dprobs, dlogits, total, N, E: tl.constexpr, EP: tl.constexpr,
                            BM: tl.constexpr, HAS_AUX: tl.constexpr, HAS_Z: tl.constexpr, REDUCED: tl.constexpr):
    """REDUCED: the balance loss's token count is `total` (a device scalar: the tokens of every rank
    whose counts were summed), not this rank's N, for the z loss too (this rank's part of the group's mean)."""
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    m_m = o_m < N - r0
    o_e = tl.arange(0, EP)
    m_e = o_e < E
    m = m_m[:, None] & m_e[None, :]
    p_me = r0 * E + o_m[:, None] * E + o_e[None, :]
    if HAS_AUX:
        n_aux = tl.load(total) if REDUCED else N
        dp = tl.load(daux) * E * tl.load(frac + o_e, mask=m_e, other=0.0) / n_aux
        tl.store(dprobs + p_me, tl.zeros([BM, EP], dtype=tl.float32) + dp[None, :], mask=m)
    if HAS_Z:
        lse, sm = _lse_rows(logits, r0, o_m, m_m, o_e, m_e, E)
        n_z = tl.load(total) if REDUCED else N
        tl.store(dlogits + p_me, (tl.load(dz) * 2.0 / n_z) * lse[:, None] * sm, mask=m)


def _partials(logits, probs, topi):
    """-> (partial sums [NP, 2 EP + 1], EP): per block of rows (counts, probability sums, sum of lse^2)."""
    N, E = probs.shape
    EP = triton.next_power_of_2(E)
    cfg = launch_cfg("router_loss_fwd")
    BM, BP = cfg.pop("BM"), cfg.pop("BP")
    NP = triton.cdiv(N, BM)
    partial = torch.empty(NP, 2 * EP + 1, dtype=torch.float32, device=probs.device)
    _router_loss_partial_kernel[(NP,)](logits, probs, topi, partial, N, E=E, K=topi.shape[1], EP=EP,
                                       KP=triton.next_power_of_2(topi.shape[1]), BM=BM, **cfg)
    return partial, EP, BP


def _backward(logits, frac, daux, dz, total=None):
    N, E = logits.shape
    dprobs = torch.empty(N, E, dtype=torch.float32, device=logits.device) if daux is not None else None
    dlogits = torch.empty_like(logits) if dz is not None else None
    if N and (daux is not None or dz is not None):
        cfg = launch_cfg("router_loss_bwd")
        BM = cfg.pop("BM")
        _router_loss_bwd_kernel[(triton.cdiv(N, BM),)](
            logits, frac, daux.float() if daux is not None else frac, dz.float() if dz is not None else frac,
            dprobs if dprobs is not None else logits, dlogits if dlogits is not None else logits,
            total if total is not None else frac, N, E=E, EP=triton.next_power_of_2(E), BM=BM,
            HAS_AUX=daux is not None, HAS_Z=dz is not None, REDUCED=total is not None, **cfg)
    return dlogits, dprobs


class RouterLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, probs, topi):
        N, E = probs.shape
        K = topi.shape[1]
        logits, probs, topi = logits.float().contiguous(), probs.float().contiguous(), topi.contiguous()
        aux = torch.empty((), dtype=torch.float32, device=probs.device)
        z = torch.empty_like(aux)
        frac = torch.empty(E, dtype=torch.float32, device=probs.device)
        partial, EP, BP = _partials(logits, probs, topi)
        _router_loss_finish_kernel[(1,)](partial, aux, z, frac, partial.shape[0], N, E=E, K=K, EP=EP, BP=BP)
        ctx.save_for_backward(logits, frac)
        ctx.mark_non_differentiable(frac)
        ctx.set_materialize_grads(False)
        return aux, z, frac

    @staticmethod
    def backward(ctx, daux, dz, _):
        logits, frac = ctx.saved_tensors
        dlogits, dprobs = _backward(logits, frac, daux, dz)
        return dlogits, dprobs, None


class ReducedRouterLossFunction(torch.autograd.Function):
    """The same losses with the slot counts and the token count summed over ranks by `counts_reduce`
    ((counts [E], total) -> (counts, total), e.g. an all-reduce over the ranks of a sequence): f and
    the token count of both losses are the group's, the probability and lse^2 sums this rank's.
    The partial sums are added in block order by torch (deterministic), then reduced."""

    @staticmethod
    def forward(ctx, logits, probs, topi, counts_reduce):
        N, E = probs.shape
        K = topi.shape[1]
        logits, probs, topi = logits.float().contiguous(), probs.float().contiguous(), topi.contiguous()
        partial, EP, _ = _partials(logits, probs, topi)
        sums = partial.sum(0)
        counts, total = counts_reduce(sums[:E].contiguous(), probs.new_full((), float(N)))
        frac = counts / (K * total)
        aux = E * (frac * (sums[EP:EP + E] / total)).sum()
        z = sums[2 * EP] / total
        ctx.save_for_backward(logits, frac, total.reshape(1))
        ctx.mark_non_differentiable(frac)
        ctx.set_materialize_grads(False)
        return aux, z, frac

    @staticmethod
    def backward(ctx, daux, dz, _):
        logits, frac, total = ctx.saved_tensors
        dlogits, dprobs = _backward(logits, frac, daux, dz, total)
        return dlogits, dprobs, None, None


def router_losses_fused(logits: torch.Tensor, probs: torch.Tensor, topk_index: torch.Tensor, counts_reduce=None):
    """logits, probs [N, E] (the router's, float32), topk_index [N, k] -> (balance loss, z loss, token
    fraction per memory [E] (detached)), float32. N must be > 0 (the means divide by it).
    counts_reduce: see ReducedRouterLossFunction (None: this rank's tokens alone)."""
    if probs.shape[0] == 0:
        raise ValueError("router_losses_fused: no tokens (the losses are means over tokens)")
    if counts_reduce is not None:
        return ReducedRouterLossFunction.apply(logits, probs, topk_index, counts_reduce)
    return RouterLossFunction.apply(logits, probs, topk_index)
