"""A memory layer's decode step (one token per sequence) in two kernels, for every rule:

  1. `_decode_prep_kernel`, one program per (memory, sequence, head): which memories the token
     chose (from the router's top-k, the shared memory always) and their weights; the short conv
     step of q / k / v with its tails updated for chosen memories only; the activation; beta and
     the decay (scalar: -exp(A_log) softplus(a + dt_bias), per key: logsigmoid(a + bias) / n).
  2. the decode step kernel (gated_delta_rule/fused_recurrent.py) with `select`: the chosen
     memories' states updated (in place: the others are not touched), the others' outputs 0.

The layer's sum over memories weighted by the routing weights (the slot weights this step
returns) and its gated norm follow in one kernel (combine_norm.py). The inputs come straight from
one GEMM by the layer's stacked decode weights: q [B, H*K] and the per-memory rows [B, M, P] =
[k | v | beta | decay] are strided views of its output.
The reference is `megamom.kernels.decode_step.memory_decode_step_naive` (float64 on CPU)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import next_pow2
from .gates import _softplus_sigmoid
from ..gated_delta_rule.fused_recurrent import _step_kernel
from . import launch_cfg


@triton.jit
def _conv_step(x, c, m_c, w_ptr, t_in, t_out, C, on, W: tl.constexpr, IN_PLACE: tl.constexpr):
    """Causal conv of this token over its W-1 predecessors (tails, oldest first) for channels c;
    the tails shift by one (the token appended) where the memory is chosen. -> float32 [BC]."""
    acc = x.to(tl.float32) * tl.load(w_ptr + c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)
    prev = tl.load(t_in + c, mask=m_c, other=0.0)
    store = m_c & on if IN_PLACE else m_c
    for j in tl.static_range(W - 1):
        acc += prev.to(tl.float32) * tl.load(w_ptr + c * W + j, mask=m_c, other=0.0).to(tl.float32)
        if j < W - 2:
            nxt = tl.load(t_in + (j + 1) * C + c, mask=m_c, other=0.0)  # (read before slot j is written)
        else:
            nxt = x.to(prev.dtype)
        tl.store(t_out + j * C + c, tl.where(on, nxt, prev).to(t_out.dtype.element_ty), mask=store)
        prev = nxt
    return acc


@triton.jit
def _features(x, c, m_c, w_ptr, w_off, t_in, t_out, t_off, C, on, W: tl.constexpr, CONV: tl.constexpr,
              SILU: tl.constexpr, IN_PLACE: tl.constexpr):
    """One of q / k / v for channels c: conv step (if any; weights at w_ptr + w_off, tails at
    t_in / t_out + t_off) then the activation, float32."""
    if CONV:
        y = _conv_step(x, c, m_c, w_ptr + w_off, t_in + t_off, t_out + t_off, C, on, W, IN_PLACE)
    else:
        y = x.to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _decode_prep_kernel(q_raw, q_stride, rows, rows_stride_b, rows_stride_m, topi, topw,
                        wq, wk, wv, tq, tk, tv, tq_out, tk_out, tv_out, A_log, dt_bias, decay_bias,
                        q_out, k_out, v_out, g_out, beta_out, chosen, slot_w, B, gla_normalizer,
                        M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, TOPK: tl.constexpr, TP: tl.constexpr,
                        ROUTED: tl.constexpr, SHARED: tl.constexpr, CONV: tl.constexpr, W: tl.constexpr,
                        CONV_PER_MEMORY: tl.constexpr, SILU: tl.constexpr, DELTA: tl.constexpr,
                        DECAY: tl.constexpr, DECAY_BIAS: tl.constexpr, IN_PLACE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i_row, h = pid // H, pid % H  # i_row = memory * B + sequence (the cache's memory-major order)
    m, b = i_row // B, i_row % B
    # the token's choice: memory m's routing weight, the shared memory (last) always at 1
    if SHARED:
        on = m == M - 1
    else:
        on = m < 0
    w = tl.where(on, 1.0, 0.0)
    if ROUTED:
        o_t = tl.arange(0, TP)
        idx = tl.load(topi + b * TOPK + o_t, mask=o_t < TOPK, other=-1)
        hit = idx == m
        on = on | (tl.sum(hit.to(tl.int32), 0) > 0)
        w += tl.sum(tl.where(hit, tl.load(topw + b * TOPK + o_t, mask=o_t < TOPK, other=0.0), 0.0), 0)
    tl.store(chosen + i_row, on.to(tl.int8))  # (every head's program stores the same values)
    tl.store(slot_w + b * M + m, w)

    mc = m if CONV_PER_MEMORY else 0
    row = rows + b * rows_stride_b + m * rows_stride_m
    tail = i_row * (W - 1)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    ck = h * K + o_k
    cv = h * V + o_v
    CK = H * K
    CV = H * V
    q = _features(tl.load(q_raw + b * q_stride + ck, mask=m_k, other=0.0), ck, m_k, wq, mc * CK * W,
                  tq, tq_out, tail * CK, CK, on, W, CONV, SILU, IN_PLACE)
    k = _features(tl.load(row + ck, mask=m_k, other=0.0), ck, m_k, wk, mc * CK * W,
                  tk, tk_out, tail * CK, CK, on, W, CONV, SILU, IN_PLACE)
    v = _features(tl.load(row + CK + cv, mask=m_v, other=0.0), cv, m_v, wv, mc * CV * W,
                  tv, tv_out, tail * CV, CV, on, W, CONV, SILU, IN_PLACE)
    out = pid * K + o_k
    tl.store(q_out + out, q, mask=m_k)
    tl.store(k_out + out, k, mask=m_k)
    tl.store(v_out + pid * V + o_v, v, mask=m_v)
    gates = row + CK + CV
    if DELTA:
        tl.store(beta_out + pid, tl.sigmoid(tl.load(gates + h).to(tl.float32)))
        gates += H
    if DECAY == 1:
        a = tl.load(gates + h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        softplus, _ = _softplus_sigmoid(a)
        tl.store(g_out + pid, -tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus)
    if DECAY == 2:
        a = tl.load(gates + ck, mask=m_k, other=0.0).to(tl.float32)
        if DECAY_BIAS:
            a += tl.load(decay_bias + m * CK + ck, mask=m_k, other=0.0).to(tl.float32)
        softplus, _ = _softplus_sigmoid(-a)  # logsigmoid(a) = -softplus(-a)
        tl.store(g_out + out, -softplus / gla_normalizer, mask=m_k)


def memory_decode_step(q_raw: torch.Tensor, rows: torch.Tensor, topk_index: Optional[torch.Tensor],
                       topk_weight: Optional[torch.Tensor], shared: bool, state: torch.Tensor,
                       conv_weights: Optional[tuple] = None, conv_tails: Optional[tuple] = None, *,
                       head_dim: int, delta: bool, decay: Optional[str], A_log=None, dt_bias=None,
                       decay_bias=None, gla_normalizer: float = 1.0, silu: bool = True, l2: bool = True,
                       scale: Optional[float] = None, in_place: bool = False, out_dtype=None):
    """q_raw [B, H*K] (this token's q projection); rows [B, M, P] per memory [k | v | beta (delta
    rules) | decay (H scalar, or H*K per key)] (strided views of one GEMM's output are fine);
    topk_index / topk_weight [B, k] (None: no router); shared: the last memory is the shared one;
    state [M, B, H, K, V] float32; conv_weights (q, k, v) each [M or 1, C, W], conv_tails (q, k, v)
    each [M, B, W-1, C] (None: no short conv). in_place: the states and tails are updated where
    they are (only chosen memories are written); else new ones are returned.
    Returns (o [M, B, H, V] in out_dtype (default rows'), each memory's output (0 where not chosen);
    the routing weights [B, M] float32 (0: not chosen); new state; new tails or None)."""
    B, M, _ = rows.shape
    K = head_dim
    H, V = state.shape[2], state.shape[4]
    if state.shape[:4] != (M, B, H, K) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be contiguous float32 [M={M}, B={B}, H, K={K}, V]; got {tuple(state.shape)} "
                         f"{state.dtype}")
    if q_raw.stride(-1) != 1 or rows.stride(-1) != 1:
        raise ValueError("q_raw and rows need contiguous columns")
    dev = rows.device
    routed = topk_index is not None
    conv = conv_weights is not None
    W = conv_weights[0].shape[-1] if conv else 2
    if conv:
        if in_place and not all(t.is_contiguous() for t in conv_tails):
            raise ValueError("in_place needs contiguous conv tails (a copy would be updated instead)")
        conv_tails = tuple(t.contiguous() for t in conv_tails)
        new_tails = conv_tails if in_place else tuple(torch.empty_like(t) for t in conv_tails)
        conv_weights = tuple(w.contiguous() for w in conv_weights)
    else:
        new_tails = (None, None, None)
        conv_tails = conv_weights = (None, None, None)
    f32 = dict(dtype=torch.float32, device=dev)
    q = torch.empty(M * B, H, K, **f32)
    k = torch.empty(M * B, H, K, **f32)
    v = torch.empty(M * B, H, V, **f32)
    g = None if decay is None else torch.empty(M * B, H, *((K,) if decay == "vector" else ()), **f32)
    beta = torch.empty(M * B, H, **f32) if delta else None
    chosen = torch.empty(M * B, dtype=torch.int8, device=dev)
    slot_w = torch.empty(B, M, **f32)
    topk = topk_index.shape[1] if routed else 1
    decay_code = {None: 0, "scalar": 1, "vector": 2}[decay]
    if M * B * H:
        _decode_prep_kernel[(M * B * H,)](
            q_raw, q_raw.stride(0), rows, rows.stride(0), rows.stride(1),
            topk_index.contiguous() if routed else None, topk_weight.float().contiguous() if routed else None,
            *conv_weights, *conv_tails, *new_tails, A_log, dt_bias, decay_bias, q, k, v, g, beta, chosen, slot_w,
            B, float(gla_normalizer), M=M, H=H, K=K, V=V, BK=next_pow2(K), BV=next_pow2(V), TOPK=topk,
            TP=triton.next_power_of_2(topk), ROUTED=routed, SHARED=shared, CONV=conv, W=W,
            CONV_PER_MEMORY=conv and conv_weights[0].shape[0] > 1, SILU=silu, DELTA=delta,
            DECAY=decay_code, DECAY_BIAS=decay_bias is not None,
            IN_PLACE=in_place, num_warps=4)
    new_state = state if in_place else torch.empty_like(state)
    o = torch.empty(M, B, H, V, dtype=out_dtype or rows.dtype, device=dev)
    if M * B * H:
        cfg = launch_cfg("step", BV=next_pow2(V))
        _step_kernel[(triton.cdiv(V, cfg["BV"]), M * B * H)](
            q, k, v, g, beta, state, new_state, o, K ** -0.5 if scale is None else float(scale), 1e-6, chosen,
            H=H, K=K, V=V, BK=next_pow2(K), DECAY=decay_code, DELTA=delta, L2=l2,
            SELECT=True, IN_PLACE=in_place, **cfg)
    return o, slot_w, new_state, (new_tails if conv else None)
