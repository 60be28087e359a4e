"""Causal short conv over varlen segments == torch conv1d per segment; no leak across segments;
initial / final tails; the decoding step."""
import torch

from megamom.kernels import causal_conv1d_step, causal_conv1d_varlen
from megamom.kernels.short_conv import naive_causal_conv1d

DT = torch.float64


def test_varlen_equals_conv1d_per_segment_with_tails():
    torch.manual_seed(0)
    lens = [0, 1, 2, 5, 9, 0, 3]
    D, W = 6, 4
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x = torch.randn(sum(lens), D, dtype=DT)
    w = torch.randn(D, W, dtype=DT)
    tails = torch.randn(len(lens), W - 1, D, dtype=DT)
    y, final = causal_conv1d_varlen(x, w, cu, initial_state=tails, output_final_state=True)
    for i, n in enumerate(lens):
        seg = x[cu[i]:cu[i + 1]]
        ref = naive_causal_conv1d(seg, w, tails[i])
        assert torch.allclose(y[cu[i]:cu[i + 1]], ref, atol=1e-12)
        ext = torch.cat([tails[i], seg])
        assert torch.allclose(final[i], ext[-(W - 1):], atol=0), f"segment {i} final tail"
    y0, _ = causal_conv1d_varlen(x, w, cu)
    for i in range(len(lens)):
        seg = x[cu[i]:cu[i + 1]]
        assert torch.allclose(y0[cu[i]:cu[i + 1]], naive_causal_conv1d(seg, w), atol=1e-12)


def test_per_row_weights_and_gradients():
    torch.manual_seed(1)
    cu = torch.tensor([0, 4, 10])
    x = torch.randn(10, 3, dtype=DT, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    rows = torch.tensor([0] * 4 + [1] * 6)
    torch.autograd.gradcheck(lambda x, w: causal_conv1d_varlen(x, w, cu, rows)[0], (x, w))
    y, _ = causal_conv1d_varlen(x, w, cu, rows)
    assert torch.allclose(y[:4], naive_causal_conv1d(x[:4], w[0]))
    assert torch.allclose(y[4:], naive_causal_conv1d(x[4:], w[1]))


def test_step_matches_full_conv():
    torch.manual_seed(2)
    T, D, W = 7, 5, 4
    x = torch.randn(T, D, dtype=DT)
    w = torch.randn(D, W, dtype=DT)
    ref = naive_causal_conv1d(x, w)
    state = torch.zeros(1, W - 1, D, dtype=DT)
    for t in range(T):
        y, state = causal_conv1d_step(x[t:t + 1], w, state)
        assert torch.allclose(y[0], ref[t], atol=1e-12)


def test_shared_weight_fast_path_gradients_and_equivalence():
    """The zero-separated conv1d path (shared weights, no tails) == the shifted-sum path, with
    gradients (gradcheck), incl. empty and length-1 segments."""
    from megamom.kernels.short_conv.conv import _conv_by_shifts
    torch.manual_seed(3)
    cu = torch.tensor([0, 0, 1, 5, 5, 12])
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(5), lens)
    pos = torch.arange(12) - cu[seg]
    x = torch.randn(12, 3, dtype=DT, requires_grad=True)
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    fast, _ = causal_conv1d_varlen(x, w, cu)
    slow = _conv_by_shifts(x, w, None, None, seg, pos, 4)
    assert torch.allclose(fast, slow, atol=1e-12)
    torch.autograd.gradcheck(lambda x, w: causal_conv1d_varlen(x, w, cu)[0], (x, w))
