"""The delta rules' Triton kernels (kernels/gated_delta_rule/: the chunked scan of chunk_triton.py
and its parts, the decode step, the SP transition summary) against the float64 PyTorch definition,
in the interpreter (tiers, bounds: triton_common.py; the GPU tier: tests/gpu/test_kernels_gpu.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (next to this file; the
# interpreter subprocess runs this file as a script, pytest imports it with --import-mode=importlib)
from triton_common import (LENS, check_interpreter_case, check_keep_equal, check_scan, check_scan_cases,  # noqa: E402
                           check_step, interp_report, make_inputs, rel)


def check_transition(lens, H, K, V, device, dtype, chunk_size, seed=3):
    """Triton transition (T_r, S_r) and its gradients vs the float64 torch reference."""
    from megamom.kernels.gated_delta_rule.transition import chunk_transition, chunk_transition_torch

    ins, cu = make_inputs(lens, H, K, V, dtype, device, h0=False, seed=seed)
    names = ("k", "v", "g", "beta")
    leaf = {n: ins[n].clone().requires_grad_() for n in names}
    Tr, Sr = chunk_transition(leaf["k"], leaf["v"], leaf["g"], leaf["beta"], cu, chunk_size, True)
    gen = torch.Generator().manual_seed(seed + 1)
    dT = torch.randn(Tr.shape, generator=gen).to(device)
    dS = torch.randn(Sr.shape, generator=gen).to(device)
    ((Tr * dT).sum() + (Sr * dS).sum()).backward()
    ref = {n: ins[n].double().clone().requires_grad_() for n in names}
    rT, rS = chunk_transition_torch(ref["k"], ref["v"], ref["g"], ref["beta"], cu, chunk_size, True)
    ((rT * dT.double()).sum() + (rS * dS.double()).sum()).backward()
    err = {"T_r": rel(Tr, rT), "S_r": rel(Sr, rS)}
    for n in names:
        err["d" + n] = rel(leaf[n].grad, ref[n].grad)
    return err


def check_stages(ins, cu, chunk_size=64, seed=4):
    """Backward kernel by kernel: recompute the outputs of _bwd_local_kernel, _bwd_dqkwg_kernel and
    _bwd_wy_kernel in float64 from the kernels' OWN inputs (the intermediates of one backward),
    chunk by chunk. Tells a miscompiled kernel from accumulated rounding. Gated delta rule with L2
    norm."""
    from megamom.kernels.gated_delta_rule import chunk_triton as ct
    from megamom.kernels.triton import prepare_varlen
    from megamom.kernels.triton.l2norm import l2norm_fwd

    q, k, v, g, beta, h0 = (ins[n] for n in ("q", "k", "v", "g", "beta", "initial_state"))
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()  # noqa: E731
    qf, _ = l2norm_fwd(flat(q))
    kf, _ = l2norm_fwd(flat(k))
    vf, gf, bf = flat(v), flat(g), flat(beta)
    vl = prepare_varlen(cu, B, T, chunk_size, k.device)
    _, _, G, X = ct._fwd(qf, kf, vf, gf, bf, scale, h0, vl, chunk_size, True, store_ht=False)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B * T, H, V, generator=gen).to(k.device, k.dtype)
    dht = torch.randn(vl.N, H, K, V, generator=gen).to(k.device)
    d = {}
    ct._bwd(qf, kf, vf, G, bf, X, scale, h0, do, dht, vl, chunk_size, True, debug=d)
    f = lambda x: x.double().cpu()  # noqa: E731
    qd, kd, vd, Gd, bd, Xd, dod = map(f, (qf, kf, vf, G, bf, X, do))
    D = {n: f(t) for n, t in d.items() if t is not None}
    stages = ("dv_local", "dov", "dq", "dkd", "dw", "dk", "dv", "dbeta", "dg")
    ref = {n: torch.zeros_like(D[n]) for n in stages}
    ref["dGq"] = torch.zeros(T * B, H, dtype=torch.float64)
    cuh = vl.cu.cpu().tolist()
    for c, (n, i_t) in enumerate(vl.chunk_indices.cpu().tolist()):
        t0 = cuh[n] + i_t * chunk_size
        if t0 >= cuh[n + 1]:
            continue  # an empty surplus slot (prepare_varlen bounds the chunk count on the device)
        t1 = min(t0 + chunk_size, cuh[n + 1])
        C = t1 - t0
        tri = torch.ones(C, C, dtype=torch.bool).tril()
        for hh in range(H):
            Q, Kc, Vc, Gc, bc = qd[t0:t1, hh] * scale, kd[t0:t1, hh], vd[t0:t1, hh], Gd[t0:t1, hh], bd[t0:t1, hh]
            S, dS = D["h"][c, hh], D["dh"][c, hh]
            vn, dv2, dO = D["vn"][t0:t1, hh], D["dv2"][t0:t1, hh], dod[t0:t1, hh]
            E = torch.where(tri, (Gc[:, None] - Gc[None, :]).clamp(max=0).exp(), torch.zeros(()))
            e = (Gc[-1] - Gc).exp()
            ref["dov"][t0:t1, hh, :C] = dO @ vn.T  # padded columns stay 0
            ref["dv_local"][t0:t1, hh] = ((Q @ Kc.T) * E).T @ dO
            ds = (dO @ vn.T) * E
            ref["dq"][t0:t1, hh] = (Gc.exp()[:, None] * (dO @ S.T) + ds @ Kc) * scale
            ref["dkd"][t0:t1, hh] = e[:, None] * (vn @ dS.T) + ds.T @ Q
            ref["dw"][t0:t1, hh] = -(dv2 @ S.T)
            P = ds * (Q @ Kc.T) * (1 - torch.eye(C, dtype=torch.float64))
            t1v = (Q * (dO @ S.T)).sum(1) * Gc.exp()
            t3 = (Kc * (vn @ dS.T)).sum(1) * e
            dG = t1v + P.sum(1) - P.sum(0) - t3
            dG[-1] += (S * dS).sum() * Gc[-1].exp() + t3.sum()
            ref["dGq"][t0:t1, hh] = dG
            # WY backward from the kernel's own dw / dv2 / dkd / dGp
            dw, dkd = D["dw"][t0:t1, hh], D["dkd"][t0:t1, hh]
            Xc = Xd[t0:t1, hh, :C]
            L = torch.where(tri.tril(-1), bc[:, None] * (Kc @ Kc.T) * E, torch.zeros(()))
            kb, vb = Kc * (bc * Gc.exp())[:, None], Vc * bc[:, None]
            dX = dw @ kb.T + dv2 @ vb.T
            dL = (-Xc.T @ dX @ Xc.T).tril(-1)
            dkb, dvb = Xc.T @ dw, Xc.T @ dv2
            R = dL * E * bc[:, None]
            ref["dk"][t0:t1, hh] = dkd + dkb * (bc * Gc.exp())[:, None] + R @ Kc + R.T @ Kc
            ref["dv"][t0:t1, hh] = dvb * bc[:, None]
            ref["dbeta"][t0:t1, hh] = ((dkb * Kc).sum(1) * Gc.exp() + (dvb * Vc).sum(1)
                                       + (dL * E * (Kc @ Kc.T)).sum(1))
            dGw = (dkb * Kc).sum(1) * bc * Gc.exp() + (dL * L).sum(1) - (dL * L).sum(0)
            dGw = dGw + D["dGp"][:, t0:t1, hh].sum(0)
            ref["dg"][t0:t1, hh] = dGw.flip(0).cumsum(0).flip(0)
    err = {n: rel(D[n], ref[n]) for n in stages}
    err["dGp"] = rel(D["dGp"].sum(0), ref["dGq"])
    return err


# ------------------------------------------------------------------------------------ cases
INTERP_CASES = {
    "gdr_varlen_h0_l2": dict(lens=LENS),
    "gdr_varlen_nol2_noh0": dict(lens=LENS, l2=False, h0=False),
    "gdr_strong_decay": dict(lens=[50, 13], g_mode="strong"),  # 13 padded-chunk rows: exp overflow if unmasked
    "gdr_weak_decay": dict(lens=[50, 3], g_mode="weak"),
    "delta_nogate": dict(lens=[37, 0, 1, 40], rule="delta"),
    "gdr_dense_batch": dict(lens=None, dense_batch=(2, 21)),
    # the backward on what the forward kept (model.scan_keep)
    "gdr_keep_states": dict(lens=LENS, keep="states"),
    "gdr_keep_all": dict(lens=LENS, keep="all"),
}


def run_interp_suite() -> dict:
    """Every case of this file in one interpreter process (see triton_common.interp_report)."""
    out = check_scan_cases(INTERP_CASES)
    # fp16 inputs: the backward keeps float32 intermediates where bf16 inputs store bf16, and must
    # type its products consistently (an fp16 x float32 dot does not compile). bf16 is checked on
    # the GPU only: the interpreter's bf16 arithmetic is not faithful.
    ins, cu = make_inputs(LENS, 2, 16, 32, torch.float16, "cpu")
    out["scan_fp16"] = check_scan("gated_delta", ins, cu, True, 16)
    for rule in ("gated_delta",):
        ins, cu = make_inputs([37, 0, 1, 40], 2, 16, 32, torch.float32, "cpu", rule=rule)
        out["scan_keep_equal_" + rule] = check_keep_equal(rule, ins, cu, 16)
    for rule in ("gated_delta", "delta"):
        out["step_" + rule] = check_step(rule, 3, 2, 16, 32, "cpu", torch.float32, l2=True)
    out["transition"] = check_transition([37, 0, 1, 40], 2, 16, 32, "cpu", torch.float32, 16)
    ins, cu = make_inputs([37, 0, 1, 40, 5], 2, 16, 32, torch.float32, "cpu")
    out["stages"] = check_stages(ins, cu, 16)
    return out


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


@pytest.mark.parametrize("case", ["gdr_varlen_h0_l2", "gdr_varlen_nol2_noh0", "gdr_strong_decay", "gdr_weak_decay",
                                  "delta_nogate", "gdr_dense_batch", "gdr_keep_states", "gdr_keep_all", "scan_fp16",
                                  "scan_keep_equal_gated_delta", "step_gated_delta", "step_delta", "transition",
                                  "stages"])
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
