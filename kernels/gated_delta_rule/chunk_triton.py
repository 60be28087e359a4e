"""Chunked gated delta rule (and the delta rule, scalar decay, linear attention) in Triton:
forward and backward over varlen-packed segments, one launch set for all segments. This module
composes the parts (`_fwd`, `_bwd`, the autograd Function, `chunk_scan_triton`):
  wy.py           the WY representation (w, u, X = (I + L)^-1)               [_prep_kernel]
  chunk_h.py      the state recurrence across chunks (SP runs it alone)       [_fwd_h_kernel]
  chunk_o.py      the output of each chunk                                    [_fwd_o_kernel]
  chunk_bwd.py    the backward                                                [_bwd_*_kernel]
  chunk_index.py  where a chunk / segment lies in the packed layout
The additive rules enter through gla/chunk_triton.py (DELTA=False).

Notation per chunk of C tokens (C = BT = 64 by default), all quantities of one head: G = in-chunk
cumulative log-decay (float32), gl = G at the chunk's last valid token, Q = scale * q,
E_ij = exp(G_i - G_j) (j <= i), S = state at the chunk start ([K, V], float32 in registers).

  forward   L = tril_strict(beta K K^T * E);  X = (I + L)^-1 (in-register block doubling)
            w = X (beta exp(G) K),  u = X (beta V)                      [_prep_kernel]
            vn = u - w S;  S <- exp(gl) S + K^T (exp(gl - G) vn)         [_fwd_h_kernel]
            O = exp(G) Q S + (Q K^T * E)_causal vn                       [_fwd_o_kernel]
  backward  recompute w, u, S, vn (or take S, vn and w from the forward: keep); dv_local = (Q K^T * E)_causal^T dO,
            dOV = dO vn^T                                                 [_bwd_local_kernel]
            reverse over chunks: dvn = dv_local + exp(gl - G) K dS';
            dS = exp(gl) dS' + (exp(G) Q)^T dO - w^T dvn                  [_bwd_dhu_kernel]
            dq, dk (direct), dw = -dvn S^T, dG partials                  [_bwd_dqkwg_kernel]
            WY backward (dX = dw Kb^T + dvn Vb^T, dL = -X^T dX X^T; (dL * E)^T via a store and a transposed load),
            dk, dv, dbeta, dg = reverse in-chunk cumsum of dG             [_bwd_wy_kernel]

Non-delta rules (S <- exp(g) S + k v^T) skip the WY parts: vn = v, w = 0 (DELTA=False).

Padded rows of a partial chunk are masked inside every exp(G_i - G_j): their G is not defined
and an overflow there would leak 0 * inf = NaN into valid rows through a dot.

No kernel transposes a register tile with tl.trans: Triton 3.4-3.7.0 miscompiles tl.trans of
tl.dot results on Hopper (fla issues #640, #984). Where a transposed operand is needed it is
loaded transposed from memory, or the transposed product is computed directly (e.g. both
dX and dX^T are accumulated in _bwd_wy_kernel)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ..triton import Varlen, launch_cfg, next_pow2, prepare_varlen
from ..triton.l2norm import l2norm_bwd, l2norm_fwd
from ..utils import SCAN_KEEPS
from .chunk_bwd import _bwd_dhu_kernel, _bwd_dqkwg_kernel, _bwd_local_kernel, _bwd_wy_kernel
from .chunk_h import _cumsum, _fwd_h
from .chunk_o import _fwd_o_kernel
from .wy import _ainv_dtype, _inv_prec, _prep_kernel, _wy_lowp


FP32_MAX_HEAD_DIM = 128


def fallback_reason(rule, q: torch.Tensor, v_dim: int) -> Optional[str]:
    """Why the Triton scan kernels cannot take these inputs (None: they can); v_dim is the value
    head dim the scan runs at. The one place that decides it: the scan's dispatch (rules.memory_scan)
    and the SP transition summary both ask here."""
    if rule.decay == "vector":
        return f"rule {rule.name!r} (per-key decay) has no Triton kernel yet"
    if q.dtype == torch.float64:
        return "float64 inputs"
    if q.dtype == torch.float32 and q.is_cuda and max(q.shape[-1], v_dim) > FP32_MAX_HEAD_DIM:
        # float32 tiles are twice bf16's: at K = V = 256 _fwd_h_kernel needs 320 KB of shared memory
        # (sm_90 has 227 KB); at 128 it needs 172 KB (kernels/triton/aot_check.py). float32 through
        # the Triton scan is checked against float64 on the GPU at K = 64, V = 128 (test_gpu_scan).
        return (f"float32 inputs with head dims ({q.shape[-1]}, {v_dim}) above {FP32_MAX_HEAD_DIM} on CUDA "
                "(the float32 tiles exceed shared memory; bf16 / autocast takes the fast path)")
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def _check_dims(K: int, V: int):
    if K > 256:
        raise NotImplementedError(f"Triton chunk kernels support head dim K <= 256, got {K}")


def _fwd(q, k, v, g, beta, scale, h0, vl: Varlen, BT: int, delta: bool, need_o: bool = True,
         store_ht: bool = True, keep: Optional[dict] = None):
    """Packed [T, H, D] inputs (contiguous). Returns (o, ht, G, Ainv); `keep`: a dict that receives
    w, the chunk states h and v_new, for a backward that then need not recompute them."""
    T, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    BK = next_pow2(K)
    use_g = g is not None
    G = torch.empty(T, H, dtype=torch.float32, device=dev) if use_g else None
    Ainv = w = None
    u = v
    if delta:
        Ainv = torch.empty(T, H, BT, dtype=_ainv_dtype(k.dtype), device=dev)
        w = torch.empty_like(k)
        u = torch.empty_like(v)
        if vl.NT:
            cfg = launch_cfg("prep", BK=BK, BV=next_pow2(V))
            _prep_kernel[(vl.NT, H)](k, v, beta, g, G, Ainv, w, u, vl.cu, vl.chunk_indices, H=H, K=K, V=V, BT=BT,
                                     LOG2_BT=int(math.log2(BT)), USE_G=use_g, COMPUTE_A=True,
                                     INV_PREC=_inv_prec(k.dtype), STORE_U=True, **cfg)
    elif use_g and vl.NT:
        _cumsum(g, G, vl, BT)
    h, vn, ht = _fwd_h(k, u, w, G, h0, vl, BT, delta, store_ht)
    o = None
    if need_o:
        o = torch.empty_like(v)
        if vl.NT:
            cfg = launch_cfg("fwd_o", BK=BK, BV=next_pow2(V))
            grid = (triton.cdiv(V, cfg["BV"]), vl.NT, H)
            _fwd_o_kernel[grid](q, k, vn, h, G, o, vl.cu, vl.chunk_indices, scale, H=H, K=K, V=V, BT=BT,
                                USE_G=use_g, **cfg)
    if keep is not None:
        keep.update(w=w, h=h, vn=vn)
    return o, ht, G, Ainv


def _bwd(q, k, v, G, beta, Ainv, scale, h0, do, dht, vl: Varlen, BT: int, delta: bool,
         debug: Optional[dict] = None, dqk_dtype: Optional[torch.dtype] = None, kept: Optional[dict] = None):
    """Returns (dq, dk, dv, dbeta, dg, dh0) on packed layouts; dq and dk in dqk_dtype (default: the
    inputs' dtype; float32 when an L2-norm backward still follows). `kept`: {w, h, vn} from the
    forward's `keep` (h and vn together; w may be None); what is missing, or all without `kept`, is
    recomputed here. `debug`: a dict that receives every intermediate (stage-by-stage checks)."""
    T, H, K = k.shape
    V = v.shape[-1]
    dev = k.device
    BK = next_pow2(K)
    use_g = G is not None
    dtype = k.dtype
    w, h, vn = (kept["w"], kept["h"], kept["vn"]) if kept is not None else (None, None, None)
    if (h is None) != (vn is None):
        raise ValueError("kept chunk states need both h and vn")
    u = v
    if delta and (w is None or h is None):  # w (for dh) and u (for the states) from the forward's A^-1
        w = torch.empty_like(k)
        u = torch.empty_like(v) if h is None else None  # kept states: no u to recompute
        if vl.NT:
            cfg = launch_cfg("prep", BK=BK, BV=next_pow2(V))
            _prep_kernel[(vl.NT, H)](k, v, beta, None, G, Ainv, w, u, vl.cu, vl.chunk_indices, H=H, K=K, V=V, BT=BT,
                                     LOG2_BT=int(math.log2(BT)), USE_G=use_g, COMPUTE_A=False,
                                     INV_PREC=_inv_prec(dtype), STORE_U=u is not None, **cfg)
    if h is None:
        h, vn, _ = _fwd_h(k, u, w, G, h0, vl, BT, delta, store_ht=False)

    # dv_local, dvn (dv2) and dw in the inputs' dtype, as fla's. For bf16, dvn and dw only enter bf16
    # products, so storing them rounds nothing further; dv_local adds one rounding to dvn.
    dv_local = torch.empty(T, H, V, dtype=dtype, device=dev)
    dov = torch.empty(T, H, BT, dtype=torch.float32, device=dev)
    if vl.NT:
        cfg = launch_cfg("bwd_local", BK=BK, BV=next_pow2(V))
        _bwd_local_kernel[(vl.NT, H)](q, k, vn, do, G, dv_local, dov, vl.cu, vl.chunk_indices, scale, H=H, K=K, V=V,
                                      BT=BT, USE_G=use_g, **cfg)

    dh = torch.empty(vl.NT, H, K, V, dtype=dtype, device=dev)
    dv2 = torch.empty(T, H, V, dtype=dtype, device=dev)
    dh0 = torch.empty(vl.N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else None
    if vl.N:
        # float32 tiles: two stages would exceed sm_90's shared memory (kernels/triton/aot_check.py)
        cfg = launch_cfg("bwd_dhu", BV=next_pow2(V), **({"num_stages": 1} if dtype == torch.float32 else {}))
        _bwd_dhu_kernel[(triton.cdiv(V, cfg["BV"]), vl.N, H)](
            q, k, w, G, do, dv_local, dh, dv2, dht, dh0, vl.cu, vl.chunk_offsets, scale, H=H, K=K, V=V, BT=BT, BK=BK,
            USE_G=use_g, USE_DHT=dht is not None, USE_DH0=h0 is not None, DELTA=delta, **cfg)
    if debug is None:
        del dv_local

    cfg = launch_cfg("bwd_dqkwg", BK=BK, BV=next_pow2(V))
    NKP = triton.cdiv(K, cfg["BK"])
    dqk_dtype = dqk_dtype or dtype
    dq = torch.empty(T, H, K, dtype=dqk_dtype, device=dev)
    dkd = torch.empty(T, H, K, dtype=torch.float32, device=dev)
    dw = torch.empty(T, H, K, dtype=dtype, device=dev) if delta else None
    dGp = torch.empty(NKP, T, H, dtype=torch.float32, device=dev) if use_g else None
    if vl.NT:
        _bwd_dqkwg_kernel[(NKP, vl.NT, H)](q, k, vn, h, G, do, dh, dv2, dov, dq, dkd, dw, dGp, vl.cu, vl.chunk_indices,
                                           scale, T, H=H, K=K, V=V, BT=BT, USE_G=use_g, DELTA=delta, **cfg)
    if debug is not None:
        debug.update(w=w, u=u, h=h, vn=vn, dv_local=dv_local, dov=dov, dh=dh, dv2=dv2, dh0=dh0, dq=dq, dkd=dkd, dw=dw,
                     dGp=dGp)
    del h, dh
    scratch = dov if debug is None else torch.empty_like(dov)  # dov is dead after _bwd_dqkwg_kernel
    dg = torch.empty(T, H, dtype=torch.float32, device=dev) if use_g else None
    if delta:
        dk = torch.empty(T, H, K, dtype=dqk_dtype, device=dev)
        dv = torch.empty_like(v)
        dbeta = torch.empty(T, H, dtype=torch.float32, device=dev)
    else:
        dk, dv, dbeta = dkd, dv2, None
    if vl.NT and (delta or use_g):
        cfg = launch_cfg("bwd_wy", BK=BK, BV=next_pow2(V))
        _bwd_wy_kernel[(vl.NT, H)](k, v, beta, G, Ainv, dw, dv2, dkd, dGp, scratch, dk, dv, dbeta, dg, vl.cu,
                                   vl.chunk_indices, T, H=H, K=K, V=V, BT=BT, NKP=NKP, USE_G=use_g, DELTA=delta,
                                   PREC=_inv_prec(dtype), LOWP=_wy_lowp(dtype), **cfg)
    if debug is not None:
        debug.update(dk=dk, dv=dv, dbeta=dbeta, dg=dg)
    return dq, dk, dv, dbeta, dg, dh0


class ChunkScanFunction(torch.autograd.Function):
    """Autograd wrapper. Inputs in the public layout [B, T, H, D] (B = 1 with cu_seqlens)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
                chunk_size, delta, keep):
        B, T, H, K = k.shape
        V = v.shape[-1]
        _check_dims(K, V)
        dtype = q.dtype
        flat = lambda x: None if x is None else x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
        qf, kf, vf = flat(q), flat(k.to(dtype)), flat(v.to(dtype))
        gf, bf = flat(g), flat(beta)
        vl = prepare_varlen(cu_seqlens, B, T, chunk_size, q.device)
        rq = rk = None
        if use_qk_l2norm:
            qf, rq = l2norm_fwd(qf)
            kf, rk = l2norm_fwd(kf)
        h0 = initial_state.contiguous() if initial_state is not None else None
        from_fwd = {} if keep != "none" else None
        o, ht, G, Ainv = _fwd(qf, kf, vf, gf, bf, scale, h0, vl, chunk_size, delta, store_ht=output_final_state,
                              keep=from_fwd)
        saved = [from_fwd["w"] if keep == "all" else None, from_fwd["h"], from_fwd["vn"]] if from_fwd else []
        ctx.save_for_backward(qf, kf, vf, G, bf, Ainv, h0, rq, rk, *saved)
        ctx.vl, ctx.scale, ctx.chunk_size, ctx.delta = vl, scale, chunk_size, delta
        ctx.shape = (B, T, H, K, V)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if g is None else g.dtype,
                      None if beta is None else beta.dtype)
        ctx.has_g = g is not None
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return o.view(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        qf, kf, vf, G, bf, Ainv, h0, rq, rk, *kept = ctx.saved_tensors
        B, T, H, K, V = ctx.shape
        if do is None:  # only the final state was used
            do = torch.zeros(B, T, H, V, dtype=qf.dtype, device=qf.device)
        dof = do.reshape(B * T, H, V).to(qf.dtype).contiguous()
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dbeta, dg, dh0 = _bwd(qf, kf, vf, G, bf, Ainv, ctx.scale, h0, dof, dht, ctx.vl,
                                          ctx.chunk_size, ctx.delta,
                                          dqk_dtype=torch.float32 if rq is not None else None,
                                          kept=dict(zip(("w", "h", "vn"), kept)) if kept else None)
        tq, tk, tv, tg, tb = ctx.dtypes
        if rq is not None:
            dq = l2norm_bwd(qf, rq, dq, tq)
            dk = l2norm_bwd(kf, rk, dk, tk)
        dq = dq.to(tq).view(B, T, H, K)
        dk = dk.to(tk).view(B, T, H, K)
        dv = dv.to(tv).view(B, T, H, V)
        dg = dg.to(tg).view(B, T, H) if ctx.has_g else None
        dbeta = dbeta.to(tb).view(B, T, H) if dbeta is not None else None
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def chunk_scan_triton(q, k, v, g=None, beta=None, scale: Optional[float] = None, initial_state=None,
                      output_final_state: bool = False, cu_seqlens=None, chunk_size: int = 64,
                      use_qk_l2norm: bool = False, delta: bool = True, keep: str = "none"):
    """Gated delta rule (delta=True; g None = DeltaNet) or additive scalar-decay / linear attention
    (delta=False, beta unused). q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] float32 log-decay;
    beta [B, T, H]; states [N, H, K, V] float32. Returns (o [B, T, H, V], final state or None).
    keep: what the backward takes from the forward instead of recomputing it, at the cost of its
    memory (bf16: 2 bytes an element): "none"; "states" the chunk states h and v_new (skips the
    backward's state recurrence: K V per chunk and head, V per token and head); "all" w as well
    (skips its WY recomputation too: K more per token and head)."""
    if keep not in SCAN_KEEPS:
        raise ValueError(f"keep={keep!r} is not one of {SCAN_KEEPS}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got {q.shape[0]}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size must be 16, 32 or 64, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not delta:
        beta = None
    o, ht = ChunkScanFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                    use_qk_l2norm, chunk_size, delta, keep)
    return o, (ht if output_final_state else None)
