"""The chunked output projection + cross entropy (megamom.model.loss) == logits + F.cross_entropy:
loss and gradients, ignored rows, chunk sizes that do not divide the rows, evaluation (no grad),
bf16 autocast, and the whole model's training loss."""
import pytest
import torch
import torch.nn.functional as F

from megamom.config import ModelConfig
from megamom.model import build_model
from megamom.model.loss import linear_cross_entropy


def _inputs(N=37, d=16, V=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) / d ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return x, w, labels


@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
def test_chunked_equals_plain_loss_and_gradients(chunk):
    x, w, labels = _inputs()
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, labels, chunk)
    (loss * 1.7).backward()  # a non-unit incoming gradient
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(xr @ wr.t(), labels, ignore_index=-100)
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ws.grad, wr.grad, rtol=1e-10, atol=1e-12)


def test_eval_path_and_all_ignored():
    x, w, labels = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, labels, 8)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), labels, ignore_index=-100), rtol=1e-12, atol=0)
    xs = x.clone().requires_grad_()
    zero = linear_cross_entropy(xs, w, torch.full_like(labels, -100), 8)
    zero.backward()
    assert zero.item() == 0.0 and xs.grad.abs().max().item() == 0.0


def test_bf16_autocast_matches_plain_autocast():
    x, w, labels = _inputs(N=64, d=32, V=300, dtype=torch.float32)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(xs, ws, labels, 10)
        ref = linear_cross_entropy(xr, wr, labels, 0)
    loss.backward()
    ref.backward()
    assert xs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    for a, b in ((xs.grad, xr.grad), (ws.grad, wr.grad)):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_model_training_loss_equals_logits_loss():
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                      num_memories=3, topk=2, loss_chunk_size=5)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    a = model(ids, labels=labels, return_logits=False)
    a.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    b = model(ids, labels=labels, return_logits=True)
    b.loss.backward()
    torch.testing.assert_close(a.lm_loss, b.lm_loss, rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
