"""RMSNorm y = x / sqrt(mean(x^2) + eps) * weight over the last dim, forward and backward in one
kernel each (the block norms; the torch version is 5 kernels forward and ~8 backward over float32
copies of the residual stream). Output in x's dtype (add_rms_norm, rms_norm_route: in out_dtype),
statistics in float32.

    backward  x_hat = x rstd;  dx = rstd (dy w - x_hat mean(dy w x_hat));  dw = sum_rows dy x_hat
dw is summed per block of rows in the kernel and over blocks in torch (deterministic).
`add_rms_norm` also does the residual add before the norm (s = x + h), and in backward adds the
residual's own gradient: a pre-norm block's "x = x + h; norm(x)" in one pass each way.
`rms_norm_route` also runs the MoM router (kernels/triton/router.py) on the float32 output, both ways.
The references: `megamom.model.layers.RMSNorm` on the torch path; for rms_norm_route, the torch path of
`megamom.model.lm.norm_and_route` (the norm, then `router.route`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_cfg
from .router import _route_rows, route_buffers, router_dlogits


@triton.jit
def _rmsnorm_fwd_kernel(x, h, s, w, y, rstd, wr, logits, probs, topw, topi, M, eps, D: tl.constexpr,
                        BD: tl.constexpr, BM: tl.constexpr, ADD: tl.constexpr, ROUTE: tl.constexpr,
                        E: tl.constexpr, K: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    """ADD: the input is s = x + h (added in float32, stored in s's dtype: the residual stream).
    ROUTE: the router's logits (float32 output x wr [E, D]^T), softmax and top-k of each row."""
    r0 = tl.program_id(0).to(tl.int64) * BM
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < M - r0
    mask = m_m[:, None] & (o_d < D)[None, :]
    offs = r0 * D + o_m[:, None] * D + o_d[None, :]
    b_x = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        b_x = (b_x + tl.load(h + offs, mask=mask, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + offs, b_x, mask=mask)
        b_x = b_x.to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / D + eps)
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    b_y = b_x * b_r[:, None] * b_w[None, :]
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r0 + o_m, b_r, mask=m_m)
    if ROUTE:
        o_e = tl.arange(0, EP)
        lg = tl.zeros([BM, EP], dtype=tl.float32)
        for e in tl.static_range(E):
            w_e = tl.load(wr + e * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)
            lg = tl.where(o_e[None, :] == e, tl.sum(b_y * w_e[None, :], 1)[:, None], lg)
        _route_rows(lg, r0, M, logits, probs, topw, topi, E, K, EP, KP, BM)


@triton.jit
def _rmsnorm_bwd_kernel(x, w, rstd, dy, ds, dx, dh, dwp, wr, dl, M, D: tl.constexpr, BD: tl.constexpr,
                        BM: tl.constexpr, RB: tl.constexpr, ADD: tl.constexpr, ROUTE: tl.constexpr, E: tl.constexpr):
    """ADD: x is s = x + h; dx = ds + the norm's gradient, also stored as dh in h's dtype.
    ROUTE: the router's share of the output's gradient, dl wr (dl: the logits' gradient [M, E]), is
    added to dy."""
    i_p = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i in range(RB):
        r0 = (i_p.to(tl.int64) * RB + i) * BM
        m_m = o_m < M - r0
        mask = m_m[:, None] & m_d[None, :]
        offs = r0 * D + o_m[:, None] * D + o_d[None, :]
        b_r = tl.load(rstd + r0 + o_m, mask=m_m, other=0.0)
        b_xh = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32) * b_r[:, None]
        b_dy = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
        if ROUTE:  # a rank-E update, each dl column loaded as the row vector it multiplies
            for e in tl.static_range(E):
                dl_e = tl.load(dl + (r0 + o_m) * E + e, mask=m_m, other=0.0)
                b_dy += dl_e[:, None] * tl.load(wr + e * D + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        acc += b_dy * b_xh
        b_g = b_dy * b_w[None, :]
        b_dx = b_r[:, None] * (b_g - b_xh * (tl.sum(b_g * b_xh, 1) / D)[:, None])
        if ADD:
            b_dx += tl.load(ds + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh + offs, b_dx.to(dh.dtype.element_ty), mask=mask)
        tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=mask)
    tl.store(dwp + i_p * D + o_d, tl.sum(acc, 0), mask=m_d)


def _fwd(x2, h2, weight, eps, out_dtype, route=None):
    """route: (router weight [E, D] float32, and the router's outputs to fill: logits, probs, top-k
    weights, top-k indices), or None."""
    M, D = x2.shape
    y = torch.empty(M, D, dtype=out_dtype, device=x2.device)
    s2 = torch.empty_like(x2) if h2 is not None else x2
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    cfg = launch_cfg("rmsnorm_fwd")
    BM = cfg.pop("BM")
    if M:
        E, K = (route[0].shape[0], route[3].shape[1]) if route is not None else (1, 1)
        _rmsnorm_fwd_kernel[(triton.cdiv(M, BM),)](x2, h2 if h2 is not None else x2, s2, weight, y, rstd,
                                                   *(route or (rstd,) * 5), M, eps, D=D, BD=triton.next_power_of_2(D),
                                                   BM=BM, ADD=h2 is not None, ROUTE=route is not None, E=E, K=K,
                                                   EP=triton.next_power_of_2(E), KP=triton.next_power_of_2(K), **cfg)
    return s2, y, rstd


def _bwd(s2, weight, rstd, dy, ds, h_dtype, route=None):
    """-> (dx, dh or None, dweight, the router weight's gradient (float32) or None); ds: the residual's
    own gradient (ADD) or None; dy may be None (the output unused). route: (router weight [E, D]
    float32, the logits' gradient dl [M, E] float32), or None."""
    M, D = s2.shape
    dx = torch.empty_like(s2)
    dh = torch.empty(M, D, dtype=h_dtype, device=s2.device) if h_dtype is not None else None
    cfg = launch_cfg("rmsnorm_bwd")
    BM, RB = cfg.pop("BM"), cfg.pop("RB")
    nprog = triton.cdiv(M, BM * RB)
    dwp = torch.empty(max(nprog, 1), D, dtype=torch.float32, device=s2.device)
    if dy is None:  # only the residual's (and the router's) gradient passes
        dy = torch.zeros(M, D, dtype=s2.dtype, device=s2.device)
    wr, dl = route if route is not None else (rstd, rstd)
    if M:
        add = h_dtype is not None
        _rmsnorm_bwd_kernel[(nprog,)](s2, weight, rstd, dy.reshape(M, D).contiguous(),
                                      ds.reshape(M, D).contiguous() if add else dy, dx, dh if add else dx, dwp,
                                      wr, dl, M, D=D, BD=triton.next_power_of_2(D), BM=BM, RB=RB, ADD=add,
                                      ROUTE=route is not None, E=wr.shape[0] if route is not None else 1, **cfg)
    else:
        dwp.zero_()
    dwr = None
    if route is not None:  # dwr = dl^T y with y = s rstd w: one float32 GEMM reading s (y is not stored)
        with torch.autocast(s2.device.type, enabled=False):
            dwr = (dl * rstd[:, None]).t().mm(s2.float()) * weight.float()[None, :]
    return dx, dh, dwp.sum(0).to(weight.dtype), dwr


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        _, y, rstd = _fwd(x2, None, weight, eps, x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw, _ = _bwd(x2, weight, rstd, dy, None, None)
        return dx.view(dy.shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, weight, eps, out_dtype):
        D = x.shape[-1]
        s2, y, rstd = _fwd(x.reshape(-1, D).contiguous(), h.reshape(-1, D).contiguous(), weight, eps, out_dtype)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.h_dtype, ctx.shape = h.dtype, x.shape
        return s2.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s2, weight, rstd = ctx.saved_tensors  # (autograd passes zeros for an unused output)
        dx, dh, dw, _ = _bwd(s2, weight, rstd, dy, ds, ctx.h_dtype)
        return dx.view(ctx.shape), dh.view(ctx.shape), dw, None, None


class RMSNormRouteFunction(torch.autograd.Function):
    """RMSNorm(s) in out_dtype and the MoM router on its float32 value (logits, softmax, top-k,
    renormalised top-k weights), s = x + h (returned first) or x: one kernel each way. The float32
    output the router reads never leaves registers (no [N, D] float32 write, read, gradient or
    saved copy). Backward: the logits' gradient dl from the router's saved outputs (a small kernel),
    dl wr added to the output's gradient inside the norm's backward, dwr = dl^T y by one GEMM."""

    @staticmethod
    def forward(ctx, x, h, weight, eps, out_dtype, router_weight, topk):
        D = x.shape[-1]
        add = h is not None
        x2 = x.reshape(-1, D).contiguous()
        wr = router_weight.float().contiguous()
        routed = route_buffers(x2.shape[0], wr.shape[0], topk, x.device)
        s2, y, rstd = _fwd(x2, h.reshape(-1, D).contiguous() if add else None, weight, eps, out_dtype,
                           route=(wr, *routed))
        ctx.save_for_backward(s2, weight, rstd, wr, *routed[1:])
        ctx.mark_non_differentiable(routed[3])
        ctx.set_materialize_grads(False)
        ctx.h_dtype, ctx.shape, ctx.wr_dtype = (h.dtype if add else None), x.shape, router_weight.dtype
        return (s2.view(x.shape),) * add + (y.view(x.shape), *routed)

    @staticmethod
    def backward(ctx, *grads):
        s2, weight, rstd, wr, probs, topw, topi = ctx.saved_tensors
        add = ctx.h_dtype is not None
        ds, dy, dl, dp, dtw, _ = grads if add else (None, *grads)
        if add and ds is None:
            ds = torch.zeros_like(s2)
        dl = router_dlogits(probs, topw, topi, dl, dp, dtw)
        dx, dh, dw, dwr = _bwd(s2, weight, rstd, dy, ds, ctx.h_dtype, route=(wr, dl))
        return dx.view(ctx.shape), (dh.view(ctx.shape) if add else None), dw, None, None, dwr.to(ctx.wr_dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (any float dtype), weight [D]: RMSNorm in float32, output in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + h (in x's dtype; h may be lower precision) and RMSNorm(s) in out_dtype, one kernel
    each way: the residual add of a pre-norm block and the next norm. Same rounding as x + h
    followed by rms_norm and a cast to out_dtype, as long as h's dtype does not outrank x's (torch's
    x + h would promote; the model's residual stream is the wider one)."""
    if x.shape != h.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and h {tuple(h.shape)} must have one shape")
    return AddRMSNormFunction.apply(x, h, weight, eps, out_dtype)


def rms_norm_route(x: torch.Tensor, h, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                   router_weight: torch.Tensor, topk: int):
    """(s = x + h, RMSNorm(s) in out_dtype, logits, probs, top-k weights, top-k indices of the router
    [E, D] on RMSNorm(s) in float32), without h the same less s; one kernel each way. The router's
    outputs are those of `router.route_fused` (float32, ties to the lower memory index)."""
    if h is not None and x.shape != h.shape:
        raise ValueError(f"rms_norm_route: x {tuple(x.shape)} and h {tuple(h.shape)} must have one shape")
    if router_weight.dim() != 2 or router_weight.shape[1] != x.shape[-1] or not 1 <= topk <= router_weight.shape[0]:
        raise ValueError(f"rms_norm_route: router weight {tuple(router_weight.shape)} must be [E, {x.shape[-1]}] "
                         f"and topk {topk} in [1, E]")
    return RMSNormRouteFunction.apply(x, h, weight, eps, out_dtype, router_weight, topk)
