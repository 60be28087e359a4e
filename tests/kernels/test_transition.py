"""Per-segment transition summaries (T_r, S_r) of the gated delta rule (sequence parallelism):
the torch reference against composing the naive recurrence, float64, CPU. The Triton version is
checked against this reference in test_gated_delta_rule_triton.py (GPU: tests/gpu/test_kernels_gpu.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamom.kernels.gated_delta_rule import naive_recurrent_gated_delta_rule
from megamom.kernels.gated_delta_rule.transition import (apply_transition, chunk_transition,
                                                         chunk_transition_torch, compose_transitions)

H, K, V = 2, 8, 6


def _inputs(lens, g_mode="normal", seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    k = torch.randn(1, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    g = {"normal": F.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=torch.float64)),
         "strong": torch.full((1, T, H), -20.0, dtype=torch.float64),
         "weak": -1e-4 * torch.rand(1, T, H, generator=gen, dtype=torch.float64),
         "none": None}[g_mode]
    beta = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return k, v, g, beta, cu


@pytest.mark.parametrize("g_mode", ["normal", "strong", "weak", "none"])
@pytest.mark.parametrize("l2", [True, False])
def test_affine_in_initial_state(g_mode, l2):
    """S_out(naive, S_in) == T_r S_in + S_r for every segment (empty, length 1, several chunks)."""
    lens = [0, 1, 7, 16, 37]
    k, v, g, beta, cu = _inputs(lens, g_mode)
    if not l2:
        k = k / K ** 0.5
    Tr, Sr = chunk_transition_torch(k, v, g, beta, cu, chunk_size=8, use_qk_l2norm=l2)
    assert Tr.shape == (len(lens), H, K, K) and Sr.shape == (len(lens), H, K, V)
    s_in = torch.randn(len(lens), H, K, V, dtype=torch.float64)
    q = torch.zeros_like(k)
    _, s_out = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, s_in, True, cu, l2)
    torch.testing.assert_close(apply_transition(Tr, Sr, s_in), s_out, rtol=1e-10, atol=1e-10)
    _, s_zero = naive_recurrent_gated_delta_rule(q, k, v, g, beta, None, None, True, cu, l2)
    torch.testing.assert_close(Sr, s_zero, rtol=1e-10, atol=1e-10)
    # empty segment: identity transition, zero state
    torch.testing.assert_close(Tr[0], torch.eye(K, dtype=torch.float64).expand(H, K, K))
    assert Sr[0].abs().max() == 0


def test_composition_of_two_halves():
    """Splitting a sequence at any point (mid-chunk or aligned) and composing the two summaries
    gives the summary of the whole: what SP ranks do."""
    k, v, g, beta, _ = _inputs([45])
    T_all, S_all = chunk_transition_torch(k, v, g, beta, None, 8, True)
    for cut in (8, 13, 44):
        a = chunk_transition_torch(k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], None, 8, True)
        b = chunk_transition_torch(k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], None, 8, True)
        Tc, Sc = compose_transitions(*a, *b)
        torch.testing.assert_close(Tc, T_all, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Sc, S_all, rtol=1e-10, atol=1e-10)


def test_gradients_match_naive_composition():
    """d<R, T_r S_in + S_r> through the chunked reference == through the naive recurrence."""
    k, v, g, beta, cu = _inputs([0, 5, 19])
    s_in = torch.randn(3, H, K, V, dtype=torch.float64)
    R = torch.randn(3, H, K, V, dtype=torch.float64)
    grads = []
    for use_chunk in (True, False):
        xs = [t.clone().requires_grad_() for t in (k, v, g, beta)]
        if use_chunk:
            Tr, Sr = chunk_transition_torch(*xs, cu, 8, True)
            out = apply_transition(Tr, Sr, s_in)
        else:
            _, out = naive_recurrent_gated_delta_rule(torch.zeros_like(k), *xs, None, s_in, True, cu, True)
        (out * R).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dispatch_falls_back_on_cpu():
    """chunk_transition uses the reference on CPU (or raises ImportError without Triton)."""
    k, v, g, beta, cu = _inputs([3, 9])
    try:
        Tr, Sr = chunk_transition(k, v, g, beta, cu, 8, True)
    except ImportError:
        pytest.skip("Triton is not installed (it comes with the dev extra, so `make test` always runs this)")
    Tr0, Sr0 = chunk_transition_torch(k, v, g, beta, cu, 8, True)
    torch.testing.assert_close(Tr, Tr0)
    torch.testing.assert_close(Sr, Sr0)
