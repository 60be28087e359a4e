"""State passing across slices (sequence parallelism's algorithm), every update rule, float64, CPU:
a sequence cut into 2 or 4 slices, each summarised (transition, state from zero), the summaries
folded and each slice scanned again from the state entering it, equals the whole-sequence scan in
its outputs, its final state and every input gradient; slice edges mid-chunk and on chunk edges;
decays near 0 and near 1."""
import pytest
import torch
import torch.nn.functional as F

from megamom.kernels import get_rule, memory_scan
from megamom.kernels.state_passing import scan_in_slices, slice_summary

H, K, V = 2, 8, 6
RULES = ["gated_delta", "delta", "gla", "scalar_decay", "linear_attn"]


def inputs(rule, B, T, decay="normal", seed=0):
    r = get_rule(rule)
    gen = torch.Generator().manual_seed(seed)
    f = dict(dtype=torch.float64)
    t = {"q": torch.randn(B, T, H, K, generator=gen, **f), "k": torch.randn(B, T, H, K, generator=gen, **f),
         "v": torch.randn(B, T, H, V, generator=gen, **f)}
    shape = (B, T, H) if r.decay == "scalar" else (B, T, H, K)
    raw = torch.randn(*shape, generator=gen, **f)
    if r.decay:
        t["g"] = {"normal": F.logsigmoid(raw), "near0": torch.full(shape, -30.0, **f),
                  "near1": -1e-5 * raw.abs()}[decay]
    if r.delta:
        t["beta"] = torch.rand(B, T, H, generator=gen, **f)
    return {n: x.requires_grad_() for n, x in t.items()}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("slices,T", [(2, 24), (4, 24), (2, 32), (4, 44)])  # slice edges mid-chunk and aligned
def test_slices_equal_the_whole_sequence(rule, slices, T):
    t = inputs(rule, 2, T)
    args = (t["q"], t["k"], t["v"], t.get("g"), t.get("beta"))
    # (no q / k norm for the delta rules here is only stable with small keys)
    l2 = get_rule(rule).delta
    o, s = memory_scan(rule, *args, output_final_state=True, chunk_size=8, use_qk_l2norm=l2, backend="torch")
    o2, s2 = scan_in_slices(rule, *args, slices=slices, chunk_size=8, use_qk_l2norm=l2, backend="torch")
    torch.testing.assert_close(o2, o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum() + s.sum(), list(t.values()))
    grads2 = torch.autograd.grad((o2 * w).sum() + s2.sum(), list(t.values()))
    for name, a, b in zip(t, grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("rule", ["gated_delta", "gla", "scalar_decay"])
@pytest.mark.parametrize("decay", ["near0", "near1"])
def test_decays_near_zero_and_one(rule, decay):
    t = inputs(rule, 1, 32, decay)
    args = (t["q"], t["k"], t["v"], t.get("g"), t.get("beta"))
    l2 = get_rule(rule).delta
    o, _ = memory_scan(rule, *args, chunk_size=8, use_qk_l2norm=l2, backend="torch")
    o2, _ = scan_in_slices(rule, *args, slices=4, chunk_size=8, use_qk_l2norm=l2, backend="torch")
    torch.testing.assert_close(o2, o, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", RULES)
def test_summary_is_the_affine_map_of_the_slice(rule):
    """S_out(S_in) of the scan == T S_in + S for a random entering state."""
    t = inputs(rule, 2, 20)
    args = (t["k"], t["v"], t.get("g"), t.get("beta"))
    l2 = get_rule(rule).delta
    Tr, Sr = slice_summary(rule, *args, chunk_size=8, use_qk_l2norm=l2, backend="torch")
    s_in = torch.randn(2, H, K, V, dtype=torch.float64)
    _, s_out = memory_scan(rule, t["q"], *args, initial_state=s_in, output_final_state=True, chunk_size=8,
                           use_qk_l2norm=l2, backend="torch")
    torch.testing.assert_close(torch.einsum("nhij,nhjv->nhiv", Tr, s_in) + Sr, s_out, rtol=1e-10, atol=1e-10)
