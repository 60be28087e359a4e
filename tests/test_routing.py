"""Routing: the packed layout (memory-major, stable, dropless, cu_seqlens incl. empty segments),
pack / combine as exact inverses with correct gradients (gradcheck in float64), and the custom
backward of the token gather against plain indexing."""
import itertools

import pytest
import torch

from megamom.model.dispatch import build_packing, combine, pack, pack_per_memory

from megamom.model.router import route

DT = torch.float64


def random_topk(N, E, k, seed):
    """Distinct memories per token, in a random (not sorted) order, as topk returns them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])


# 3 samples of 6 tokens; sample 1 holds 3 documents (one of a single token)
DOC_IDS = torch.tensor([0] * 6 + [1, 1, 2, 3, 3, 3] + [4] * 6)
NUM_DOCS = 5


def expected_layout(topk_index, doc_ids, num_docs, E, shared):
    """The packed order by hand: for each memory, each document, the routed tokens in time order."""
    N = doc_ids.numel()
    M = E + int(shared)
    chosen = [set(topk_index[n].tolist()) if topk_index is not None else set() for n in range(N)]
    if shared:
        for c in chosen:
            c.add(E)
    rows, lens = [], []
    for m in range(M):
        for d in range(num_docs):
            seg = [n for n in range(N) if doc_ids[n] == d and m in chosen[n]]
            rows += [(n, m, m * num_docs + d) for n in seg]
            lens.append(len(seg))
    cu = [0] + list(itertools.accumulate(lens))
    return rows, cu


@pytest.mark.parametrize("E,k,shared", [(4, 2, True), (4, 1, False), (3, 3, True), (5, 1, True), (0, 0, True)])
def test_packing_layout(E, k, shared):
    N = DOC_IDS.numel()
    topk_index = random_topk(N, E, k, seed=E * 10 + k) if E else None
    p = build_packing(topk_index, DOC_IDS, NUM_DOCS, E, shared)
    M = E + int(shared)
    R = k + int(shared)
    rows, cu = expected_layout(topk_index, DOC_IDS, NUM_DOCS, E, shared)

    # memory-major, then document, then position: exactly the hand-made order
    assert p.row_token.tolist() == [r[0] for r in rows]
    assert p.row_memory.tolist() == [r[1] for r in rows]
    assert p.row_segment.tolist() == [r[2] for r in rows]
    assert p.cu_seqlens.tolist() == cu
    assert p.cu_seqlens.numel() == M * NUM_DOCS + 1
    assert p.num_memories == M and p.num_docs == NUM_DOCS and p.num_tokens == N
    # dropless: every token exactly R times, each (token, memory) pair once
    assert p.row_token.numel() == N * R
    assert torch.bincount(p.row_token, minlength=N).tolist() == [R] * N
    pairs = set(zip(p.row_token.tolist(), p.row_memory.tolist()))
    assert len(pairs) == N * R
    # stable: time order kept inside every segment
    for s in range(M * NUM_DOCS):
        toks = p.row_token[cu[s]:cu[s + 1]]
        assert torch.all(toks[1:] > toks[:-1])
    # slot_row: the packed row of (token, j-th choice); last column = shared memory
    assert p.slot_row.shape == (N, R)
    for n in range(N):
        for j in range(R):
            row = int(p.slot_row[n, j])
            assert int(p.row_token[row]) == n
            want = int(topk_index[n, j]) if j < k else E
            assert int(p.row_memory[row]) == want
    assert sorted(p.slot_row.flatten().tolist()) == list(range(N * R))


def test_packing_has_empty_segments_and_they_are_counted():
    """topk=1 over 5 memories and short documents: some (memory, document) segments are empty and
    still get their (zero-length) place in cu_seqlens, so segment m*D+d is always (m, d)."""
    N = DOC_IDS.numel()
    topk_index = random_topk(N, 5, 1, seed=3)
    p = build_packing(topk_index, DOC_IDS, NUM_DOCS, 5, True)
    lens = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).view(6, NUM_DOCS)
    assert (lens == 0).any()
    for m in range(5):
        for d in range(NUM_DOCS):
            assert int(lens[m, d]) == int(((topk_index[:, 0] == m) & (DOC_IDS == d)).sum())
    assert lens[5].tolist() == torch.bincount(DOC_IDS).tolist()  # shared memory: every token


def test_pack_combine_round_trip_values():
    N, E, k = DOC_IDS.numel(), 4, 2
    p = build_packing(random_topk(N, E, k, 1), DOC_IDS, NUM_DOCS, E, True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 3, generator=gen, dtype=DT)
    w = torch.rand(N, k + 1, generator=gen, dtype=DT)
    rows = pack(x, p)
    assert torch.equal(rows, x[p.row_token])
    torch.testing.assert_close(combine(rows, p, w), x * w.sum(1)[:, None, None], atol=1e-14, rtol=0)
    # combine is a weighted sum of each token's own rows: mark the rows by their memory
    marked = rows * (1 + p.row_memory.to(DT))[:, None, None]
    choice = torch.cat([p.row_memory[p.slot_row[:, :k]], torch.full((N, 1), E)], 1).to(DT)
    torch.testing.assert_close(combine(marked, p, w), x * (w * (1 + choice)).sum(1)[:, None, None],
                               atol=1e-14, rtol=0)


def test_pack_per_memory_picks_the_rows_memory():
    N, E, k = DOC_IDS.numel(), 3, 2
    p = build_packing(random_topk(N, E, k, 2), DOC_IDS, NUM_DOCS, E, True)
    y = torch.randn(N, E + 1, 5, dtype=DT)
    out = pack_per_memory(y, p)
    for a in range(out.shape[0]):
        assert torch.equal(out[a], y[p.row_token[a], p.row_memory[a]])


@pytest.mark.parametrize("E,k,shared", [(4, 2, True), (3, 1, False), (0, 0, True)])
def test_pack_combine_gradcheck(E, k, shared):
    N = 9
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    topk_index = random_topk(N, E, k, 5) if E else None
    p = build_packing(topk_index, doc, 3, E, shared)
    R = k + int(shared)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=gen, dtype=DT, requires_grad=True)
    w = torch.rand(N, R, generator=gen, dtype=DT, requires_grad=True)
    y = torch.randn(N, E + int(shared), 3, generator=gen, dtype=DT, requires_grad=True)
    row_scale = torch.randn(p.row_token.numel(), 1, generator=gen, dtype=DT)

    def f(x, w, y):  # a row-dependent op between pack and combine, as the scan is
        rows = pack(x, p).tanh() * row_scale + pack_per_memory(y, p) * pack(x, p)
        return combine(rows, p, w)

    assert torch.autograd.gradcheck(f, (x, w, y))
    assert torch.autograd.gradcheck(lambda x: pack(x, p), (x,))


def test_gather_backward_matches_plain_indexing():
    N, E, k = DOC_IDS.numel(), 4, 2
    p = build_packing(random_topk(N, E, k, 7), DOC_IDS, NUM_DOCS, E, True)
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(N, 2, 3, generator=gen, dtype=DT, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    up = torch.randn(p.row_token.numel(), 2, 3, generator=gen, dtype=DT)
    (pack(x1, p) * up).sum().backward()
    (x2[p.row_token] * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-14, rtol=0)


def test_route_topk_and_renormalisation():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 6, generator=gen, dtype=DT)
    w = torch.randn(5, 6, generator=gen, dtype=DT)
    r = route(x, w, 3)
    logits = x @ w.t()
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(r.logits, logits, atol=1e-13, rtol=0)
    torch.testing.assert_close(r.probs, probs, atol=1e-13, rtol=0)
    for n in range(10):
        best = sorted(range(5), key=lambda e: -float(probs[n, e]))[:3]
        assert sorted(r.topk_index[n].tolist()) == sorted(best)
        sel = probs[n, r.topk_index[n]]
        torch.testing.assert_close(r.topk_weight[n], sel / sel.sum(), atol=1e-14, rtol=0)
    torch.testing.assert_close(r.topk_weight.sum(-1), torch.ones(10, dtype=DT), atol=1e-14, rtol=0)


def test_router_stays_float32_under_autocast():
    """Autocast runs linears in bf16 whatever their inputs; the router must not (spec: float32
    softmax): bf16 logits flip near-tied top-k choices and change which memories a token updates."""
    from megamom.model.router import route
    torch.manual_seed(0)
    x, w = torch.randn(512, 64), torch.randn(8, 64)
    ref = route(x, w, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = route(x, w, 2)
    assert got.logits.dtype == torch.float32
    assert torch.equal(got.topk_index, ref.topk_index)
    assert torch.allclose(got.probs, ref.probs, rtol=0, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                    reason="torch._grouped_mm is missing before torch 2.8 (pyproject allows torch >= 2.4; the "
                           "projection then takes the dense path, tested above); goes away when the floor is 2.8")
@pytest.mark.parametrize("keep_rows,narrow", [(False, True), (True, True), (False, False)])
def test_grouped_projection_regathers_rows_in_backward(keep_rows, narrow):
    """The grouped-GEMM projection (the GPU bf16 path; float32 runs it on CPU) saves x, not the packed
    rows, and gathers them again in its backward: outputs (the grouped rows and the narrow ones
    projected apart), dx and both weights' gradients equal the dense float64 projection of every
    token by every memory (pack_per_memory), with one memory left empty (an exact zero gradient).
    keep_rows (model.scan_keep=all) saves the packed rows instead, with the same results. Without
    narrow weights (None: GLA, linear attention) the narrow output is empty [A, 0]."""
    from megamom.model.dispatch import memory_row_ends
    from megamom.model.grouped_experts import _GroupedProjection

    N, E, k, d, P = DOC_IDS.numel(), 4, 2, 16, 24
    topk = torch.tensor([0, 2, 3])[random_topk(N, 3, k, 9)]  # memory 1 gets no rows
    p = build_packing(topk, DOC_IDS, NUM_DOCS, E, True)
    assert (p.row_memory == 1).sum() == 0 and (p.row_memory == 2).sum() > 0
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, d, generator=gen)
    w = torch.randn(E + 1, P, d, generator=gen)
    up = torch.randn(p.row_token.numel(), P, generator=gen)
    nw = torch.randn(E + 1, 3, d, generator=gen)  # the narrow weights (beta / decay), projected apart
    nup = torch.randn(p.row_token.numel(), 3, generator=gen)
    offs = memory_row_ends(p)

    xf, wf, nwf = x.clone().requires_grad_(), w.clone().requires_grad_(), nw.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out, nout = _GroupedProjection.apply(xf, wf, p.row_token, p.slot_row, offs, False,
                                             nwf if narrow else None, p.row_memory, keep_rows)
    assert (N, d) in saved and ((p.row_token.numel(), d) in saved) == keep_rows  # the packed rows: keep_rows only
    if not narrow:
        assert nout.shape == (p.row_token.numel(), 0)
        (out * up).sum().backward()
        xd, wd = (t.double().requires_grad_() for t in (x, w))
        ref = pack_per_memory(torch.einsum("nd,mpd->nmp", xd, wd), p)
        (ref * up.double()).sum().backward()
        for got, want in ((out, ref), (xf.grad, xd.grad), (wf.grad, wd.grad)):
            assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
        assert nwf.grad is None
        return
    ((out * up).sum() + (nout * nup).sum()).backward()
    xd, wd, nwd = (t.double().requires_grad_() for t in (x, w, nw))
    ref = pack_per_memory(torch.einsum("nd,mpd->nmp", xd, wd), p)
    nref = pack_per_memory(torch.einsum("nd,mpd->nmp", xd, nwd), p)
    ((ref * up.double()).sum() + (nref * nup.double()).sum()).backward()
    for got, want in ((out, ref), (nout, nref), (xf.grad, xd.grad), (wf.grad, wd.grad), (nwf.grad, nwd.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    # the empty memory's weights get a zero gradient (sm90 and CPU; see _grouped_mm_dtype for the cards
    # without it)
    assert wf.grad[1].abs().max() == 0 and nwf.grad[1].abs().max() == 0


@pytest.mark.parametrize("routed, shared", [(3, True), (3, False), (0, True)])
def test_stacked_projection_weights_cast_and_gradients(routed, shared):
    """_StackWeights (the grouped projection's k | v | beta | decay weights: the routed memories'
    stacks [E, P, d] and the shared memory's [P, d], cast for the GEMM): the forward is
    stack_memories cast, and each weight's gradient is contiguous in its own dtype and equal to its
    block of the stacked gradient (what cat + cast would give)."""
    from megamom.model.grouped_experts import _stack_cast, stack_memories

    gen = torch.Generator().manual_seed(5)
    widths = (6, 4, 2)
    families = [(torch.randn(routed, n, 8, generator=gen, dtype=torch.float64).requires_grad_() if routed else None,
                 torch.randn(n, 8, generator=gen, dtype=torch.float64).requires_grad_() if shared else None)
                for n in widths]
    out = _stack_cast(torch.float32, families)
    ref = stack_memories(families)
    M = routed + int(shared)
    assert out.shape == ref.shape == (M, sum(widths), 8)
    assert out.dtype == torch.float32 and torch.equal(out, ref.float())
    if routed and shared:  # the shared memory is the last row
        assert torch.equal(ref[routed, :6], families[0][1]) and torch.equal(ref[:routed, 6:10], families[1][0])
    grad = torch.randn(M, sum(widths), 8, generator=gen)
    out.backward(grad)
    for (r, sh), want in zip(families, grad.split(list(widths), 1)):
        for p, block in ((r, want[:routed]), (sh, want[routed] if shared else None)):
            if p is not None:
                assert p.grad.dtype == torch.float64 and p.grad.is_contiguous() and torch.equal(p.grad, block.double())
