"""A memory layer's decode step in Triton (kernels/triton/decode_step.py: routing choice, conv step,
activation, gates, the chosen memories' update, weighted outputs) against its float64 reference
(kernels/decode_step.py), for every rule and layer variant, in place and not; and MemoryMixer's
fused decode step (one GEMM by the stacked weights into these kernels and the combine-norm kernel)
against its torch decode step. In the interpreter (GPU: tests/gpu/test_generate_gpu.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_common (see test_gates_triton.py)
from triton_common import check_interpreter_case, interp_report, rel  # noqa: E402

# name: (delta, decay, memories, top-k (0: no router), shared, conv (None, "one", "per_memory"), silu, decay bias)
CASES = {
    "gated_delta": (True, "scalar", 5, 2, True, "one", True, False),
    "delta_per_memory_conv_top1": (True, None, 4, 1, False, "per_memory", True, False),
    "gla_bias_no_conv": (False, "vector", 3, 2, True, None, False, True),
    "scalar_decay": (False, "scalar", 4, 3, False, "one", True, False),
    "linear_attn_one_memory": (False, None, 1, 0, True, "one", True, False),
}


def make_case(name, B=3, H=2, K=16, V=32, W=4, seed=0):
    delta, decay, M, topk, shared, conv, silu, bias = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    P = H * (K + V) + (H if delta else 0) + {None: 0, "scalar": H, "vector": H * K}[decay]
    gemm = torch.randn(B, H * K + M * P + 5, generator=gen)  # a GEMM's output: q | rows | more columns
    q_raw, rows = gemm[:, :H * K], gemm[:, H * K:H * K + M * P].view(B, M, P)
    routed = M - int(shared)
    topi = topw = None
    if topk:
        topi = torch.stack([torch.randperm(routed, generator=gen)[:topk] for _ in range(B)])
        topw = torch.rand(B, topk, generator=gen) + 0.1
    kw = dict(head_dim=K, delta=delta, decay=decay, silu=silu, l2=True, scale=K ** -0.5, gla_normalizer=16.0)
    if decay == "scalar":
        kw.update(A_log=torch.rand(H, generator=gen) * 2, dt_bias=torch.randn(H, generator=gen))
    if bias:
        kw["decay_bias"] = torch.randn(M, H * K, generator=gen)
    weights = tails = None
    if conv:
        n = M if conv == "per_memory" else 1
        weights = tuple(torch.randn(n, C, W, generator=gen) * 0.5 for C in (H * K, H * K, H * V))
        tails = tuple(torch.randn(M, B, W - 1, C, generator=gen) for C in (H * K, H * K, H * V))
    state = torch.randn(M, B, H, K, V, generator=gen) * 0.1
    return (q_raw, rows, topi, topw, shared, state, weights, tails), kw


def check_decode_step(device, dtype=torch.float32) -> dict:
    from megamom.kernels.decode_step import memory_decode_step_naive
    from megamom.kernels.triton.decode_step import memory_decode_step

    out = {}
    for name in CASES:
        (q_raw, rows, topi, topw, shared, state, weights, tails), kw = make_case(name)
        d64 = lambda t: None if t is None else t.double()  # noqa: E731
        ref = memory_decode_step_naive(d64(q_raw), d64(rows), topi, d64(topw), shared, d64(state),
                                       None if weights is None else tuple(map(d64, weights)),
                                       None if tails is None else tuple(map(d64, tails)),
                                       **{k: d64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        dev = lambda t: None if t is None else t.to(device)  # noqa: E731
        dv = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        for in_place in (False, True):
            s = state.to(device).clone()
            tl_ = None if tails is None else tuple(t.to(device, dtype).clone() for t in tails)
            args = {k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            o, slot_w, new_s, new_t = memory_decode_step(
                dv(q_raw), dv(rows), dev(topi), dev(topw), shared, s,
                None if weights is None else tuple(map(dv, weights)), tl_, in_place=in_place, out_dtype=torch.float32,
                **args)
            tag = f"{name}_{'in_place' if in_place else 'new'}"
            errs = {"o": rel(o, ref[0]), "slot_w": rel(slot_w, ref[1]), "state": rel(new_s, ref[2])}
            if tails is not None:
                errs.update({f"tail_{n}": rel(a, b) for n, a, b in zip("qkv", new_t, ref[3])})
            if in_place:  # written where they were
                errs["same_state"] = 0.0 if new_s.data_ptr() == s.data_ptr() else 1.0
            else:  # the inputs untouched
                errs["state_kept"] = rel(s, state.to(device))
            out[tag] = errs
    return out


def check_mixer_wiring(device) -> dict:
    """MemoryMixer's fused decode step == its torch decode step (float32), three steps running, for
    every rule and the layer variants (per-memory convs, no shared memory, GLA's low-rank gate)."""
    from megamom.config import ModelConfig
    from megamom.model.cache import MemoryLayerCache
    from megamom.model.memory_mixer import MemoryMixer

    variants = {
        "gated_delta": {}, "delta": dict(update_rule="delta"), "gla": dict(update_rule="gla"),
        "scalar_decay": dict(update_rule="scalar_decay"), "linear_attn": dict(update_rule="linear_attn"),
        "per_memory_conv_top1_no_shared": dict(per_memory_conv=True, topk=1, shared_mem=False),
        "gla_low_rank_no_conv": dict(update_rule="gla", gla_gate_rank=4, use_short_conv=False,
                                     qkv_activation="none"),
        "linear_arch": dict(arch="linear"),
    }
    out = {}
    for name, extra in variants.items():
        cfg = ModelConfig(**{**dict(arch="mom", hidden_size=24, num_heads=2, head_dim=16, num_memories=4, topk=2,
                                    vocab_size=64), **extra})
        torch.manual_seed(3)
        mixer = MemoryMixer(cfg).to(device).eval()
        M, H, K, V = mixer.num_memories, mixer.num_heads, mixer.head_dim, mixer.head_v_dim
        B = 3
        state = torch.randn(M, B, H, K, V, device=device) * 0.1
        conv = None
        if mixer.conv_size:
            conv = {n: torch.randn(M, B, mixer.conv_size - 1, C, device=device)
                    for n, C in (("q", H * K), ("k", H * K), ("v", H * V))}
        caches = [MemoryLayerCache(state.clone(), None if conv is None else {n: t.clone() for n, t in conv.items()})
                  for _ in range(2)]
        errs = {}
        with torch.no_grad():
            for step in range(3):
                x = torch.randn(B, 1, 24, device=device)
                fused = mixer._decode_step_fused(x, caches[0])
                ref = mixer._decode_step_torch(x, caches[1])
                errs[f"out{step}"] = rel(fused[0], ref[0])
                errs[f"state{step}"] = rel(fused[2].state, ref[2].state)
                for n in (conv or {}):
                    errs[f"tail_{n}{step}"] = rel(fused[2].conv[n], ref[2].conv[n])
                caches = [fused[2], ref[2]]
        out[name] = errs
    return out


def run_interp_suite() -> dict:
    out = {}
    for tag, errs in check_decode_step("cpu").items():
        out[f"step_{tag}"] = errs
    for name, errs in check_mixer_wiring("cpu").items():
        out[f"mixer_{name}"] = errs
    return out


def test_in_place_refuses_tails_it_would_copy():
    """In place, non-contiguous conv tails would be copied and the copy updated: refused, naming them."""
    pytest.importorskip("triton")
    from megamom.kernels.triton.decode_step import memory_decode_step
    (q_raw, rows, topi, topw, shared, state, weights, tails), kw = make_case("gated_delta")
    strided = tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in tails)
    with pytest.raises(ValueError, match="contiguous conv tails"):
        memory_decode_step(q_raw, rows, topi, topw, shared, state, weights, strided, in_place=True, **kw)


@pytest.fixture(scope="module")
def interp_results():
    return interp_report(__file__)


STEP_CASES = [f"step_{n}_{m}" for n in CASES for m in ("new", "in_place")]
MIXER_CASES = ["mixer_" + n for n in ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn",
                                      "per_memory_conv_top1_no_shared", "gla_low_rank_no_conv", "linear_arch")]


@pytest.mark.parametrize("case", STEP_CASES + MIXER_CASES)
def test_interpreter(interp_results, case):
    check_interpreter_case(interp_results, case)


if __name__ == "__main__":
    if sys.argv[1:] == ["--interp"]:
        print(json.dumps(run_interp_suite()))
