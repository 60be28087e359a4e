"""Inference with a cache equals the parallel forward: prefill through the chunk path, then
token-by-token decoding (and a prefill in two pieces, the second continuing from the cache), for
every memory update rule, the one-memory linear model and the transformer; batch > 1, float64.
The memory cache keeps a constant size whatever the context length."""
import math

import pytest
import torch

from megamom.config import ModelConfig
from megamom.model import CausalLM, MemoryLayerCache

DT = torch.float64
ATOL = 1e-9
B, T, V = 3, 14, 48


def build(**kw) -> CausalLM:
    base = dict(arch="mom", vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, head_dim=4,
                num_memories=4, topk=2, chunk_size=4, kernel_backend="torch", max_position_embeddings=128)
    base.update(kw)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**base)).to(DT).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights big enough that routing, gates and attention all vary
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) / math.sqrt(p.shape[-1]))
            if name.endswith("router.weight"):
                p.mul_(3.0)
    return model


CASES = {
    **{f"mom-{r}": dict(update_rule=r) for r in ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn")},
    # the learned feature map after the conv, the q / k norm after the map (in the scan)
    "mom-linear_attn-feature-map": dict(update_rule="linear_attn", feature_map="hadamard"),
    "mom-gla-low-rank-gate": dict(update_rule="gla", gla_gate_rank=3),
    "mom-per-memory-conv-no-shared-top1": dict(per_memory_conv=True, shared_mem=False, topk=1),
    "mom-no-conv-topall": dict(use_short_conv=False, topk=4),
    "linear-gated_delta": dict(arch="linear"),
    "linear-gla": dict(arch="linear", update_rule="gla", per_memory_conv=True),
    "transformer": dict(arch="transformer", num_kv_heads=1),
}


def tokens(seed=0, length=T):
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def decode(model, ids, cache, start):
    """Feed ids[:, start:] one token at a time; returns the logits [B, n, V] and the cache."""
    out = []
    for t in range(start, ids.shape[1]):
        step = model(ids[:, t:t + 1], cache=cache)
        assert step.logits.shape == (B, 1, V)
        out.append(step.logits[:, 0])
        cache = step.cache
        assert cache.seen_tokens == t + 1
    return torch.stack(out, 1), cache


def assert_caches_equal(a, b):
    for la, lb in zip(a.layers, b.layers):
        if isinstance(la, MemoryLayerCache):
            torch.testing.assert_close(la.state, lb.state, atol=ATOL, rtol=0)
            assert (la.conv is None) == (lb.conv is None)
            for name in la.conv or {}:
                torch.testing.assert_close(la.conv[name], lb.conv[name], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(la.k, lb.k, atol=ATOL, rtol=0)
            torch.testing.assert_close(la.v, lb.v, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_parallel_forward(case):
    model = build(**CASES[case])
    ids = tokens()
    with torch.no_grad():
        full = model(ids).logits
        assert full.std() > 0.1  # logits vary: the comparison means something
        pre = model(ids[:, :5], use_cache=True)
        torch.testing.assert_close(pre.logits, full[:, :5], atol=ATOL, rtol=0)
        assert pre.cache.seen_tokens == 5
        steps, cache = decode(model, ids, pre.cache, 5)
        torch.testing.assert_close(steps, full[:, 5:], atol=ATOL, rtol=0)
        # the cache after decoding is the cache a prefill of the whole sequence leaves
        assert_caches_equal(cache, model(ids, use_cache=True).cache)


@pytest.mark.parametrize("case", ["mom-gated_delta", "mom-gla", "mom-per-memory-conv-no-shared-top1",
                                  "linear-gated_delta", "transformer"])
def test_prefill_in_two_pieces(case):
    """The second piece (T > 1) continues from the cache through the chunk path, then decoding."""
    model = build(**CASES[case])
    ids = tokens(seed=1)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :3], use_cache=True)
        second = model(ids[:, 3:10], cache=first.cache)
        assert second.cache.seen_tokens == 10
        torch.testing.assert_close(first.logits, full[:, :3], atol=ATOL, rtol=0)
        torch.testing.assert_close(second.logits, full[:, 3:10], atol=ATOL, rtol=0)
        steps, _ = decode(model, ids, second.cache, 10)
        torch.testing.assert_close(steps, full[:, 10:], atol=ATOL, rtol=0)
        # a one-token first piece works too (no cache yet: the chunk path with T = 1)
        one = model(ids[:, :1], use_cache=True)
        rest = model(ids[:, 1:], cache=one.cache)
        torch.testing.assert_close(torch.cat([one.logits, rest.logits], 1), full, atol=ATOL, rtol=0)


def test_decode_updates_only_selected_memories():
    """A decoding step leaves the state and conv tails of unselected memories untouched."""
    model = build(per_memory_conv=True, topk=1, num_memories=4)
    ids = tokens(seed=2)
    with torch.no_grad():
        pre = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:7], cache=pre.cache)
    layer = pre.cache.layers[0]
    new = step.cache.layers[0]
    changed = (new.state - layer.state).flatten(2).abs().amax(-1) > 0  # [M, B]
    assert changed[-1].all()  # the shared memory takes every token
    assert (changed[:-1].sum(0) == 1).all()  # exactly one routed memory per sample (topk=1)
    conv_changed = (new.conv["k"] - layer.conv["k"]).flatten(2).abs().amax(-1) > 0
    assert torch.equal(conv_changed, changed)


@pytest.mark.parametrize("case", ["mom-gated_delta", "mom-gla", "linear-gated_delta"])
def test_memory_cache_size_is_constant(case):
    model = build(**CASES[case])
    with torch.no_grad():
        short = model(tokens(length=8), use_cache=True).cache
        long = model(tokens(length=64), use_cache=True).cache
        stepped = model(tokens(length=1), cache=long).cache
    assert short.nbytes() == long.nbytes() == stepped.nbytes() > 0
    cfg = model.config
    M = cfg.memories_total
    per_layer = M * B * cfg.num_heads * cfg.head_dim * cfg.head_v_dim
    per_layer += M * B * (cfg.conv_size - 1) * (2 * cfg.key_dim + cfg.value_dim)
    assert short.nbytes() == cfg.num_layers * per_layer * 8  # float64 states and tails


def test_attention_cache_grows_with_context():
    """The contrast: the transformer's K/V cache is linear in the context length."""
    model = build(**CASES["transformer"])
    with torch.no_grad():
        short = model(tokens(length=8), use_cache=True).cache
        long = model(tokens(length=64), use_cache=True).cache
    assert long.nbytes() == 8 * short.nbytes()


def test_logits_to_keep_and_float32_decoding():
    """logits_to_keep=1 (what generation asks for) = the last position; and the float32 model
    (router and gates in float32, states float32) decodes consistently with its own forward."""
    model = build()
    ids = tokens(seed=3)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)
        model = model.float()
        full32 = model(ids).logits
        pre = model(ids[:, :6], use_cache=True, logits_to_keep=1)
        assert pre.cache.layers[0].state.dtype == torch.float32
        steps, _ = decode(model, ids, pre.cache, 6)
    assert full32.dtype == steps.dtype == torch.float32
    torch.testing.assert_close(pre.logits[:, 0], full32[:, 5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps, full32[:, 6:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full32.double(), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["mom-gated_delta", "transformer"])
def test_cache_with_packed_documents_is_refused(case):
    """A cache continues one sequence per row: packed documents (segment_ids) cannot continue one,
    and cannot fill an attention cache (they would mix silently), so the model refuses up front."""
    model = build(**CASES[case])
    seg = torch.tensor([[0, 0, 1, 1]] * B)
    if case == "transformer":
        with torch.no_grad(), pytest.raises(ValueError, match="segment_ids"):
            model(tokens(length=4), segment_ids=seg, use_cache=True)
    with torch.no_grad():
        cache = model(tokens(length=4), use_cache=True).cache
        with pytest.raises(ValueError, match="segment_ids"):
            model(tokens(length=4), segment_ids=seg, cache=cache)


@pytest.mark.parametrize("case", [c for c in CASES if c != "transformer"])
def test_packed_prefill_caches_one_row_per_document(case):
    """Documents packed in rows (segment_ids) prefill a cache with one row per document, in order,
    equal to each document's own cache: decoding then continues every document at once."""
    model = build(**CASES[case])
    ids = tokens(length=12)
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]])
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, use_cache=True).cache
        alone, nxt = [], []
        for b in range(B):
            for d in seg[b].unique().tolist():
                doc = ids[b:b + 1, seg[b] == d]
                alone.append(model(doc, use_cache=True).cache)
                nxt.append(doc[:, -1])
        for i, layer in enumerate(packed.layers):
            assert layer.state.shape[1] == len(alone)
            for j, c in enumerate(alone):
                torch.testing.assert_close(layer.state[:, j], c.layers[i].state[:, 0], atol=ATOL, rtol=0)
                for n in layer.conv or {}:
                    torch.testing.assert_close(layer.conv[n][:, j], c.layers[i].conv[n][:, 0], atol=ATOL, rtol=0)
        step = model(torch.stack(nxt), cache=packed).logits[:, 0]
        for j, c in enumerate(alone):
            torch.testing.assert_close(step[j], model(nxt[j][:, None], cache=c).logits[0, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mom-gated_delta", "mom-gla", "linear-gated_delta", "mom-no-conv-topall",
                                  "transformer"])
def test_generate_batch_of_prompts_of_any_lengths_equals_one_at_a_time(case):
    from megamom.generate import generate, generate_batch
    model = build(**CASES[case])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 1, 12, 3)]
    eos = 7
    batch = generate_batch(model, prompts, 9, eos_id=eos, check_every=2)
    for p, new in zip(prompts, batch):
        alone = generate(model, torch.tensor([p]), 9, eos_id=eos)[0, len(p):].tolist()
        want = alone[:alone.index(eos) + 1] if eos in alone else alone
        assert new == want, (p, new, want)
    assert any(len(new) < 9 for new in batch) or all(eos not in new for new in batch)
    streamed = []
    assert generate_batch(model, prompts[:1], 4, on_tokens=lambda t: streamed.append(t.tolist())) == [
        [s[0] for s in streamed]]


@pytest.mark.parametrize("case", ["mom-gated_delta", "mom-gla", "linear-gated_delta"])
def test_prefill_budget_packs_rows_and_splits_long_prompts(case):
    """A prefill budget smaller than the prompts (prompts packed into several rows, a longer prompt
    prefilled in pieces that continue its cache) leaves the cache and logits of one packed prefill."""
    from megamom.generate import prefill
    model = build(**CASES[case]).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 1, 23, 3, 4)]
    with torch.no_grad():
        whole, logits = prefill(model, prompts)
        pieces, logits_pieces = prefill(model, prompts, prefill_tokens=7)  # rows [5, 1], [23] in 4 pieces, [3, 4]
    torch.testing.assert_close(logits_pieces, logits, atol=ATOL, rtol=0)
    for a, b in zip(pieces.layers, whole.layers):
        torch.testing.assert_close(a.state, b.state, atol=ATOL, rtol=0)
        for n in a.conv or {}:
            torch.testing.assert_close(a.conv[n], b.conv[n], atol=ATOL, rtol=0)


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    from megamom.generate import _sample, generate_batch
    model = build(**CASES["mom-gated_delta"])
    prompts = [[1, 2, 3], [4]]

    def sample(seed, **kw):
        return generate_batch(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                              **kw)
    assert sample(0) == sample(0) and sample(0) != sample(1)
    # a nucleus smaller than the top token's probability is the top token: greedy
    assert sample(0, top_p=1e-6) == generate_batch(model, prompts, 12)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {_sample(logits, 1.0, None, torch.Generator().manual_seed(s), top_p=0.75).item() for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reach 0.75: the third and fourth tokens are cut
    with pytest.raises(ValueError, match="top_p"):
        generate_batch(model, prompts, 2, top_p=0.0)


def test_autocast_routes_in_the_norm_for_sequences_and_in_the_mixer_for_decode_steps(monkeypatch):
    """Under autocast the MoM block routes inside its attention norm (`lm.norm_and_route`) for a whole
    sequence; a decode step (cache, one token) must route in the mixer's own decode path instead,
    on the float32 norm output (the routed norm hands the mixer only the bf16 copy, which the decode
    step would route on)."""
    from megamom.model import lm

    model = build().float()
    calls = []
    real = lm.norm_and_route
    monkeypatch.setattr(lm, "norm_and_route", lambda *a, **k: calls.append(a[1].shape[1]) or real(*a, **k))
    ids = tokens()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pre = model(ids[:, :5], use_cache=True)
        assert calls == [5] * model.config.num_layers
        model(ids[:, 5:6], cache=pre.cache)
    assert calls == [5] * model.config.num_layers  # the decode step did not take the routed norm


def test_generation_without_a_cache_equals_with_one():
    """use_cache=False (for models whose memories are split over expert ranks) reruns the sequence
    for every token and picks the same greedy tokens."""
    from megamom.generate import generate
    model = build()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, 6)
    assert torch.equal(generate(model, prompt, 6, use_cache=False), cached)


def test_streaming_stops_at_the_first_eos():
    """After EOS the batch keeps emitting it until the host looks; the stream must show none of it."""
    from megamom.generate_cli import _generate_megamom
    model = build(**CASES["mom-gated_delta"])
    with torch.no_grad():
        first = model(torch.tensor([[1, 2, 3]]), logits_to_keep=1).logits[0, -1].argmax().item()

    class Tok:
        eos_id, bos_id = first, None

        def decode(self, ids):
            return "".join("<eos>" if i == first else f"[{i}]" for i in ids)
    pieces = []
    out = _generate_megamom(model, Tok(), ["p"], [[1, 2, 3]], 6, 0.0, 0, 1.0, True, 0, pieces.append)
    assert out[0]["new_token_ids"] == [] and pieces == []
