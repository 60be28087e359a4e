"""Fused recurrent step for decoding (one token per sequence, state in / state out), every rule:

    S <- decay * S;  S <- S + k (beta (v - S^T k))^T  (delta rules)  or  S + k v^T  (additive);
    o = S^T (scale q)

decay: exp(g) per head (g [N, H]), per key (g [N, H, K], GLA) or none. One program per (value
block, sequence * head); the [K, BV] state block stays in registers (float32). The update may be
done in place (out_state=state): each program reads its block before writing it. The additive
rules call it through gla/fused_recurrent.py (DELTA=False).

With `select` (a MoM layer's decode step, kernels/triton/decode_step.py) each sequence row is one
memory of one token: only rows marked chosen are updated (in place, the others are neither read
nor written) and the outputs of the others are 0."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton import launch_cfg, next_pow2


@triton.jit
def _step_kernel(q, k, v, g, beta, s_in, s_out, o, scale, eps, chosen,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DECAY: tl.constexpr, DELTA: tl.constexpr, L2: tl.constexpr, SELECT: tl.constexpr,
                 IN_PLACE: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    on = True
    if SELECT:
        on = tl.load(chosen + i_nh // H) != 0
        if IN_PLACE:  # an unchosen memory's state is left where it is: no traffic
            m_kv = m_kv & on
    p_s = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    b_q = tl.load(q + i_nh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_nh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_nh * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    if L2:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + eps)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + eps)
    b_s = tl.load(s_in + p_s, mask=m_kv, other=0.0).to(tl.float32)
    b_old = b_s
    if DECAY == 1:
        b_s = b_s * tl.exp(tl.load(g + i_nh).to(tl.float32))
    if DECAY == 2:
        b_s = b_s * tl.exp(tl.load(g + i_nh * K + o_k, mask=m_k, other=0.0).to(tl.float32))[:, None]
    if DELTA:
        b_b = tl.load(beta + i_nh).to(tl.float32)
        b_v = (b_v - tl.sum(b_k[:, None] * b_s, 0)) * b_b
    b_new = b_s + b_k[:, None] * b_v[None, :]
    b_o = tl.sum(b_q[:, None] * b_new, 0) * scale
    if SELECT:
        b_o = tl.where(on, b_o, 0.0)
        if not IN_PLACE:  # an unchosen memory's state is copied unchanged
            b_new = tl.where(on, b_new, b_old)
    tl.store(o + i_nh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(s_out + p_s, b_new.to(s_out.dtype.element_ty), mask=m_kv)


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                         beta: Optional[torch.Tensor], state: torch.Tensor, scale: Optional[float] = None,
                         use_qk_l2norm: bool = False, delta: bool = True,
                         out_state: Optional[torch.Tensor] = None):
    """q, k: [N, H, K]; v: [N, H, V]; g: [N, H] (scalar decay), [N, H, K] (per key) or None;
    beta: [N, H] (delta rules); state [N, H, K, V] float32. Returns (o [N, H, V] in the state's
    dtype, like `rules.memory_step`, new state). out_state=state updates in place. No autograd."""
    N, H, K = k.shape
    V = v.shape[-1]
    if delta and beta is None:
        raise ValueError("the delta rule step needs beta")
    scale = K ** -0.5 if scale is None else float(scale)
    decay = 0 if g is None else (2 if g.dim() == 3 else 1)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.contiguous() if g is not None else None
    beta = beta.contiguous() if (delta and beta is not None) else None
    state = state.contiguous()
    new = torch.empty_like(state) if out_state is None else out_state
    o = torch.empty(N, H, V, dtype=state.dtype, device=v.device)
    if N * H:
        cfg = launch_cfg("step", BV=next_pow2(V))
        _step_kernel[(triton.cdiv(V, cfg["BV"]), N * H)](q, k, v, g, beta, state, new, o, scale, 1e-6, None,
                                                          H=H, K=K, V=V, BK=next_pow2(K), DECAY=decay, DELTA=delta,
                                                          L2=use_qk_l2norm, SELECT=False, IN_PLACE=False, **cfg)
    return o, new
