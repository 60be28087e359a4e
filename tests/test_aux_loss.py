"""Router losses (/work/shared/docs/mom-spec.md, "Load-balancing loss"): the switch loss
E * sum_e f_e P_e with f_e = count_e / (k N) and P_e = mean_t p_te (1 at perfect balance), its
gradient, the z-loss mean_t logsumexp(logits_t)^2, how CausalLM folds them into its loss, and the
MoM authors' form (per sequence, P the softmax over the top-k logits, k at balance)."""
import math

import pytest
import torch
import torch.nn.functional as F

from megamom.config import ModelConfig
from megamom.model import CausalLM, MemoryMixer
from megamom.model.router import load_balancing_loss, route, router_z_loss

DT = torch.float64


def hand_softmax(logits):
    z = logits - logits.max(-1, keepdim=True).values
    return z.exp() / z.exp().sum(-1, keepdim=True)


def hand_aux(logits, k):
    """Switch loss by loops: counts of the top-k choices, mean full-softmax probabilities."""
    N, E = logits.shape
    p = hand_softmax(logits)
    counts = [0] * E
    for n in range(N):
        for e in sorted(range(E), key=lambda e: -float(p[n, e]))[:k]:
            counts[e] += 1
    f = torch.tensor(counts, dtype=DT) / (k * N)
    P = p.sum(0) / N
    return E * (f * P).sum(), f


def hand_aux_grad_logits(logits, k):
    """d aux / d logit_tj = (E/N) p_tj (f_j - sum_e f_e p_te)   (f is a count: no gradient)."""
    N, E = logits.shape
    p = hand_softmax(logits)
    _, f = hand_aux(logits, k)
    return (E / N) * p * (f[None, :] - (p * f[None, :]).sum(-1, keepdim=True))


def hand_z(logits):
    m = logits.max(-1, keepdim=True).values
    lse = m[:, 0] + (logits - m).exp().sum(-1).log()
    return (lse ** 2).mean(), lse


def data(N=24, d=6, E=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=gen, dtype=DT), torch.randn(E, d, generator=gen, dtype=DT)


@pytest.mark.parametrize("E,k", [(4, 2), (4, 1), (5, 3), (3, 3)])
def test_switch_loss_equals_hand_computation(E, k):
    x, w = data(E=E, seed=E + k)
    r = route(x, w, k)
    aux, f = load_balancing_loss(r.probs, r.topk_index, E)
    ref, ref_f = hand_aux(x @ w.t(), k)
    torch.testing.assert_close(aux, ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(f, ref_f, atol=1e-15, rtol=0)
    torch.testing.assert_close(f.sum(), torch.tensor(1.0, dtype=DT), atol=1e-15, rtol=0)


def balanced_tokens(E, reps=2):
    """Logits of every token = a cyclic shift of one vector: each memory sees every logit value
    equally often (P_e = 1/E) and is among the top-k of exactly k/E of the tokens (f_e = 1/E)."""
    base = torch.tensor([2.0, 0.7, -0.4, -1.5, 1.3][:E], dtype=DT)
    return torch.stack([base.roll(s) for s in range(E)] * reps)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_perfect_balance_gives_one_through_the_layer(k):
    E, d = 4, 8
    cfg = ModelConfig(arch="mom", hidden_size=d, num_heads=2, head_dim=4, num_memories=E, topk=k,
                      num_layers=1, vocab_size=16, chunk_size=4)
    mixer = MemoryMixer(cfg).to(DT)
    with torch.no_grad():
        mixer.router.weight.zero_()
        mixer.router.weight[:, :E] = torch.eye(E, dtype=DT)  # logits = first E features
    logits = balanced_tokens(E)
    x = torch.cat([logits, torch.randn(logits.shape[0], d - E, dtype=DT)], 1)[None]
    _, stats, _ = mixer(x, torch.zeros(x.shape[1], dtype=torch.long), 1)
    torch.testing.assert_close(stats.aux_loss, torch.tensor(1.0, dtype=DT), atol=1e-14, rtol=0)
    torch.testing.assert_close(stats.token_fraction, torch.full((E,), 1 / E, dtype=DT), atol=1e-15, rtol=0)


def test_collapsed_routing_is_penalised():
    """Every token sure of memory 0 (k=1): f = (1, 0, ...), P_0 -> 1, aux -> E (not k, not 1)."""
    E = 4
    logits = torch.tensor([[30.0, 0, 0, 0]] * 8, dtype=DT)
    r = route(logits, torch.eye(E, dtype=DT), 1)
    aux, f = load_balancing_loss(r.probs, r.topk_index, E)
    assert f.tolist() == [1.0, 0, 0, 0]
    assert abs(float(aux) - E) < 1e-10
    # fla's variant (divide by N, not k N) would give k at balance: ours is 1 for every k
    r = route(balanced_tokens(E), torch.eye(E, dtype=DT), 2)
    aux2, _ = load_balancing_loss(r.probs, r.topk_index, E)
    assert abs(float(aux2) - 1) < 1e-14


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_gradient(k):
    x, w = data(seed=10 + k)
    w = w.requires_grad_()
    r = route(x, w, k)
    aux, _ = load_balancing_loss(r.probs, r.topk_index, w.shape[0])
    aux.backward()
    # hand-written gradient: through P only, d/dW = (d/dlogits)^T x
    want = hand_aux_grad_logits(x @ w.detach().t(), k).t() @ x
    torch.testing.assert_close(w.grad, want, atol=1e-13, rtol=0)
    # finite differences (the top-k choice does not flip for tiny steps)
    def aux_of(w):
        r = route(x, w, k)
        return load_balancing_loss(r.probs, r.topk_index, w.shape[0])[0]

    assert torch.autograd.gradcheck(aux_of, (w.detach().clone().requires_grad_(),))


def test_z_loss_value_and_gradient():
    x, w = data(seed=3)
    w = w.requires_grad_()
    logits = F.linear(x, w)
    z = router_z_loss(logits)
    ref, lse = hand_z(logits.detach())
    torch.testing.assert_close(z, ref, atol=1e-13, rtol=0)
    z.backward()
    dlogits = 2 * lse[:, None] * hand_softmax(logits.detach()) / x.shape[0]
    torch.testing.assert_close(w.grad, dlogits.t() @ x, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(lambda w: router_z_loss(F.linear(x, w)), (w.detach().clone().requires_grad_(),))


def test_counts_reduce_splits_the_loss_over_ranks():
    """Two ranks holding halves of one sequence, with counts and token totals all-reduced: the
    per-rank losses add up to the single-process loss, and so do their gradients."""
    x, w = data(N=20, seed=4)
    k, E = 2, w.shape[0]
    w1 = w.clone().requires_grad_()
    r = route(x, w1, k)
    full, f_full = load_balancing_loss(r.probs, r.topk_index, E)
    full.backward()

    w2 = w.clone().requires_grad_()
    parts = [route(x[:11], w2, k), route(x[11:], w2, k)]
    all_counts = sum(torch.bincount(p.topk_index.reshape(-1), minlength=E).to(DT) for p in parts)

    def reduce(counts, total):  # what an all-reduce over the two ranks returns
        return all_counts, torch.tensor(20.0, dtype=DT)

    losses = [load_balancing_loss(p.probs, p.topk_index, E, reduce) for p in parts]
    total = losses[0][0] + losses[1][0]
    torch.testing.assert_close(total, full, atol=1e-14, rtol=0)
    torch.testing.assert_close(losses[0][1], f_full, atol=1e-15, rtol=0)
    total.backward()
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------------------------
# CausalLM
# ------------------------------------------------------------------------------------------------

def tiny_model(**kw):
    base = dict(arch="mom", vocab_size=40, hidden_size=16, num_layers=3, num_heads=2, head_dim=4,
                num_memories=4, topk=2, chunk_size=4, aux_loss_coef=0.01, z_loss_coef=1e-3)
    base.update(kw)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**base)).to(DT)
    with torch.no_grad():
        for layer in model.model.layers:
            if getattr(layer.attn, "router", None) is not None:
                layer.attn.router.weight.normal_(0, 2.0)  # routing far from uniform
    return model


def batch(model, B=2, T=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100
    return ids, labels


def test_model_losses_fold_router_losses_per_spec():
    model = tiny_model()
    ids, labels = batch(model)
    inputs = []
    hooks = [layer.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for layer in model.model.layers]
    out = model(ids, labels=labels)
    for h in hooks:
        h.remove()
    L, k = len(model.model.layers), model.config.topk
    assert len(out.router_stats) == L == len(inputs)

    auxes, zs = [], []
    for layer, x, st in zip(model.model.layers, inputs, out.router_stats):
        logits = x.reshape(-1, x.shape[-1]) @ layer.attn.router.weight.detach().t()
        aux, f = hand_aux(logits, k)
        z, _ = hand_z(logits)
        torch.testing.assert_close(st.aux_loss, aux, atol=1e-13, rtol=0)
        torch.testing.assert_close(st.z_loss, z, atol=1e-12, rtol=0)
        torch.testing.assert_close(st.token_fraction, f, atol=1e-15, rtol=0)
        torch.testing.assert_close(st.token_fraction.sum(), torch.tensor(1.0, dtype=DT), atol=1e-15, rtol=0)
        assert not st.token_fraction.requires_grad
        auxes.append(aux)
        zs.append(z)
    assert max(auxes) > 1.01  # the routing is unbalanced, so the loss is informative
    torch.testing.assert_close(out.aux_loss, torch.stack(auxes).mean(), atol=1e-13, rtol=0)
    torch.testing.assert_close(out.z_loss, torch.stack(zs).mean(), atol=1e-12, rtol=0)

    keep = labels.reshape(-1) != -100
    logp = torch.log_softmax(out.logits.reshape(-1, out.logits.shape[-1]).double(), -1)
    lm = -logp[keep, labels.reshape(-1)[keep]].mean()
    assert out.lm_loss.dtype == DT  # float64 logits keep float64 in the loss
    torch.testing.assert_close(out.lm_loss, lm, atol=1e-13, rtol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss + 1e-3 * out.z_loss,
                               atol=1e-12, rtol=0)


def test_model_aux_gradient_reaches_the_router():
    """d(mean aux)/d(router of the last layer) = (1/L) * the hand gradient at that layer's input."""
    model = tiny_model()
    ids, _ = batch(model, seed=1)
    inputs = []
    last = model.model.layers[-1].attn
    hook = last.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    out = model(ids, labels=ids)
    hook.remove()
    out.aux_loss.backward()
    x = inputs[0].reshape(-1, inputs[0].shape[-1])
    w = last.router.weight.detach()
    want = hand_aux_grad_logits(x @ w.t(), model.config.topk).t() @ x / len(model.model.layers)
    torch.testing.assert_close(last.router.weight.grad, want, atol=1e-13, rtol=0)


def test_model_loss_without_coefficients_or_router():
    model = tiny_model(aux_loss_coef=0.0, z_loss_coef=0.0)
    ids, labels = batch(model)
    out = model(ids, labels=labels)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss, atol=0, rtol=0)

    linear = tiny_model(arch="linear")
    out = linear(ids, labels=labels)
    assert out.router_stats == [] and out.aux_loss is None and out.z_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss, atol=0, rtol=0)
    assert math.isfinite(float(out.loss.detach()))


# ------------------------------------------------------------------------------------------------
# The MoM authors' form (model.aux_loss_form=paper)
# ------------------------------------------------------------------------------------------------

def hand_paper_aux(logits, k, rows):
    """The authors' loss by loops: per sequence, the share of its tokens choosing e and the mean of
    the softmax over each token's top-k logits; E * mean over sequences of sum_e f_be P_be."""
    N, E = logits.shape
    T = N // rows
    total = 0.0
    for b in range(rows):
        f, P = [0.0] * E, [0.0] * E
        for t in range(b * T, (b + 1) * T):
            top = sorted(range(E), key=lambda e: -float(logits[t, e]))[:k]
            z = [math.exp(float(logits[t, e])) for e in top]
            for e, w in zip(top, z):
                f[e] += 1 / T
                P[e] += w / sum(z) / T
        total += E * sum(fe * pe for fe, pe in zip(f, P))
    return total / rows


@pytest.mark.parametrize("k", [1, 2])
def test_paper_form_is_k_when_balanced_and_E_when_collapsed(k):
    from megamom.model.router import paper_balance_loss
    E, T = 4, 8
    # balanced: each sequence's tokens choose every memory equally often, with equal weights
    idx = torch.stack([(torch.arange(k) + t * k) % E for t in range(T)])
    w = torch.full((T, k), 1 / k, dtype=DT)
    loss, f, _ = paper_balance_loss(w, idx, E, rows=1)
    assert loss.item() == pytest.approx(k, abs=1e-12)
    torch.testing.assert_close(f, torch.full((E,), 1 / E, dtype=DT))
    # collapsed: every token chooses memories 0..k-1
    idx = torch.arange(k).expand(2 * T, k)
    loss, f, _ = paper_balance_loss(torch.full((2 * T, k), 1 / k, dtype=DT), idx, E, rows=2)
    assert loss.item() == pytest.approx(E, abs=1e-12)


@pytest.mark.parametrize("k,rows", [(1, 1), (2, 3), (3, 2)])
def test_paper_form_equals_the_definition_and_its_gradient_a_finite_difference(k, rows):
    from megamom.model.router import paper_balance_loss
    g = torch.Generator().manual_seed(k * 10 + rows)
    E, N, d = 5, 12 * rows, 6
    x = torch.randn(N, d, generator=g, dtype=DT)
    w = torch.randn(E, d, generator=g, dtype=DT)
    r = route(x, w, k)
    loss, _, _ = paper_balance_loss(r.topk_weight, r.topk_index, E, rows)
    assert loss.item() == pytest.approx(hand_paper_aux(r.logits.detach(), k, rows), abs=1e-12)

    def of_weight(weight):  # the top-k choice is piecewise constant: a finite difference sees P alone
        rr = route(x, weight, k)
        return paper_balance_loss(rr.topk_weight, rr.topk_index, E, rows)[0]
    assert torch.autograd.gradcheck(of_weight, (w.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def test_paper_form_split_over_ranks_adds_up_to_the_whole_sequences():
    """Two ranks holding the halves of each sequence, per-sequence counts and totals all-reduced: the
    ranks' losses add up to the single-process loss, and so do their gradients."""
    from megamom.model.router import paper_balance_loss
    g = torch.Generator().manual_seed(3)
    E, k, B, T, d = 4, 2, 2, 10, 6
    x = torch.randn(B, T, d, generator=g, dtype=DT)
    w = torch.randn(E, d, generator=g, dtype=DT)
    w1 = w.clone().requires_grad_()
    r = route(x.reshape(-1, d), w1, k)
    full = paper_balance_loss(r.topk_weight, r.topk_index, E, B)[0]
    full.backward()
    w2 = w.clone().requires_grad_()
    halves = [route(x[:, s].reshape(-1, d), w2, k) for s in (slice(0, 4), slice(4, T))]
    counts = sum(torch.zeros(B, E, dtype=DT).scatter_add_(
        1, h.topk_index.view(B, -1), torch.ones(B, h.topk_index.view(B, -1).shape[1], dtype=DT)) for h in halves)

    def reduce(c, t):  # what an all-reduce over the two ranks returns
        return counts, torch.full((B,), float(T), dtype=DT)
    parts = [paper_balance_loss(h.topk_weight, h.topk_index, E, B, reduce)[0] for h in halves]
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-14, rtol=0)
    (parts[0] + parts[1]).backward()
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-14, rtol=0)


def test_the_model_takes_the_paper_form():
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                      num_memories=4, topk=2, aux_loss_form="paper")
    torch.manual_seed(0)
    model = CausalLM(cfg).double()
    ids = torch.randint(0, 64, (3, 10))
    seen = []
    for block in model.model.layers:  # each layer's routing of its 3 sequences
        block.attn.router.register_forward_hook(lambda mod, inp, out: seen.append(out.logits.detach()))
    out = model(ids, labels=ids)
    want = sum(hand_paper_aux(logits, 2, 3) for logits in seen) / len(seen)  # the mean over layers
    assert len(seen) == 2 and out.aux_loss.item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(Exception, match="model.aux_loss_form"):
        ModelConfig(aux_loss_form="fla").validate()
