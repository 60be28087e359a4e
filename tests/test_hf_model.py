"""The Hugging Face classes (megamom.hf) against megamom's own CausalLM, float64, every architecture:
same logits, Hugging Face label shifting, generate() with the recurrent cache (greedy = the parallel
forward's argmax, constant cache size, continuation from a returned cache, beam search, sampling),
left padding (exact) and the refusals, hidden states, save/load, init."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from megamom.config import ModelConfig
from megamom.hf.configuration_megamom import MegaMoMConfig
from megamom.hf.modeling_megamom import MegaMoMCache, MegaMoMForCausalLM
from megamom.model import CausalLM

DT = torch.float64
V = 48
CASES = {
    "mom": dict(arch="mom"),
    "mom-gla-per-memory-conv": dict(arch="mom", update_rule="gla", per_memory_conv=True, shared_mem=False, topk=1),
    "linear-gated_delta": dict(arch="linear"),
    "transformer": dict(arch="transformer", num_kv_heads=1, tie_word_embeddings=False),
}


def build(**kw) -> MegaMoMForCausalLM:
    base = dict(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, head_dim=4, num_memories=4, topk=2,
                chunk_size=4, kernel_backend="torch", max_position_embeddings=256)
    base.update(kw)
    torch.manual_seed(0)
    hf = MegaMoMForCausalLM(MegaMoMConfig.from_model_config(ModelConfig(**base), eos_token_id=None,
                                                            pad_token_id=0)).to(DT).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights big enough that routing, gates and attention all vary
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) / math.sqrt(p.shape[-1]))
            if name.endswith("router.weight"):
                p.mul_(3.0)
    return hf


def reference(hf) -> CausalLM:
    core = CausalLM(hf.config.to_model_config()).to(DT).eval()
    core.load_state_dict(hf.state_dict(), strict=True)
    return core


def ids(B=2, T=9, seed=0):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_equal_megamom(case):
    hf = build(**CASES[case])
    core = reference(hf)
    x = ids()
    with torch.no_grad():
        out = hf(x, labels=x)
        ref = core(x, labels=F.pad(x[:, 1:], (0, 1), value=-100))
    assert torch.equal(out.logits, ref.logits)
    assert out.logits.std() > 0.1
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, manual, rtol=1e-12, atol=1e-12)  # HF shift convention
    if case.startswith("mom"):
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generate_equals_parallel_argmax(case):
    hf = build(**CASES[case])
    x = ids()
    with torch.no_grad():
        out = hf.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
        full = hf(out.sequences).logits
    seq, T = out.sequences, x.shape[1]
    assert seq.shape == (2, T + 12)
    assert torch.equal(seq[:, T:], full[:, T - 1:-1].argmax(-1))
    step_logits = torch.stack(out.logits, 1)  # logits of every decoding step (recurrent path)
    torch.testing.assert_close(step_logits, full[:, T - 1:-1].to(step_logits.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", ["mom", "linear-gated_delta", "transformer"])
def test_cache_size_does_not_grow_with_context(case):
    hf = build(**CASES[case])
    sizes = []
    for T in (8, 64):
        with torch.no_grad():
            out = hf(ids(T=T), use_cache=True)
        cache = out[1]  # the cache field: `cache` in transformers 5, `past_key_values` in 4
        assert isinstance(cache, MegaMoMCache) and cache.get_seq_length() == T
        sizes.append(cache.nbytes())
    if case == "transformer":
        assert sizes[1] == 8 * sizes[0]  # K/V grow with the context
    else:
        assert sizes[0] == sizes[1] > 0


def test_continue_from_returned_cache():
    hf = build(arch="mom")
    x = ids()
    with torch.no_grad():
        straight = hf.generate(x, max_new_tokens=10, do_sample=False)
        first = hf.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = first.get("cache", first.get("past_key_values"))
        assert isinstance(cache, MegaMoMCache)
        kwarg = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        resumed = hf.generate(first.sequences, max_new_tokens=6, do_sample=False, **{kwarg: cache})
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("case", ["mom", "linear-gated_delta"])
def test_left_padded_batch_equals_each_prompt_alone(case):
    hf = build(**CASES[case])
    a, b = ids(1, 5, seed=3), ids(1, 9, seed=4)
    x = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1),
                      torch.ones(1, 9, dtype=torch.long)])
    with torch.no_grad():
        logits = hf(x, attention_mask=mask).logits
        torch.testing.assert_close(logits[0, 4:], hf(a).logits[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(logits[1], hf(b).logits[0], rtol=0, atol=1e-12)
        batch = hf.generate(x, attention_mask=mask, max_new_tokens=7, do_sample=False)
        alone_a = hf.generate(a, max_new_tokens=7, do_sample=False)
        alone_b = hf.generate(b, max_new_tokens=7, do_sample=False)
        assert torch.equal(batch[0, 4:], alone_a[0]) and torch.equal(batch[1], alone_b[0])
        # loss of a left-padded batch = token-weighted loss of its rows
        labels = x.masked_fill(mask == 0, -100)
        loss = hf(x, attention_mask=mask, labels=labels).lm_loss
        la, lb = hf(a, labels=a).lm_loss, hf(b, labels=b).lm_loss
        torch.testing.assert_close(loss, (4 * la + 8 * lb) / 12, rtol=1e-12, atol=1e-12)


def test_padding_that_would_corrupt_a_state_is_refused():
    hf = build(arch="mom")
    x = ids(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        # right padding without a cache: causal, so the real tokens are exact
        out = hf(x, attention_mask=right, use_cache=False).logits
        torch.testing.assert_close(out[0, :4], hf(x[:1, :4]).logits[0], rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="left padding"):
            hf(x, attention_mask=right, use_cache=True)
        with pytest.raises(ValueError, match="left padding"):
            hf(x, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]))
    tr = build(**CASES["transformer"])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad(), pytest.raises(ValueError, match="arch=transformer"):
        tr.generate(x, attention_mask=left, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("case", ["mom", "linear-gated_delta"])
def test_fast_generate_equals_the_transformers_loop(case, monkeypatch):
    """generate() of a memory model runs megamom's generation (megamom.generate.generate_batch) and
    gives what transformers' own loop over forward() gives: a left-padded batch, greedy, stopping
    at EOS (rows that stop are padded), and with max_length instead of max_new_tokens."""
    import megamom.generate as generation
    calls = []
    real = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    hf = build(**CASES[case])
    a, b = ids(1, 5, seed=3), ids(1, 9, seed=4)
    x = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        slow_free = None
        for kwargs in (dict(max_new_tokens=7), dict(max_length=14)):
            hf.fast_generate = False
            slow = hf.generate(x, attention_mask=mask, do_sample=False, **kwargs)
            hf.fast_generate = True
            fast = hf.generate(x, attention_mask=mask, do_sample=False, **kwargs)
            assert torch.equal(fast, slow), (fast, slow)
            slow_free = slow
        eos = int(slow_free[0, 11])  # a token the first row emits early: it stops there
        hf.fast_generate = False
        slow = hf.generate(x, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=eos, pad_token_id=0)
        hf.fast_generate = True
        fast = hf.generate(x, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(fast, slow), (fast, slow)
    assert len(calls) == 3


def test_remote_code_generates_through_an_installed_megamom(tmp_path, monkeypatch):
    """An export loaded as remote code uses the installed megamom's generation on its own weights
    (no copy) where megamom is importable, with the tokens of transformers' loop."""
    from transformers import AutoModelForCausalLM

    import megamom.generate as generation
    from megamom.convert.to_hf import write_export
    calls = []
    real = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    hf = build(arch="mom")
    write_export(tmp_path, hf.config.to_model_config(), {k: v.float() for k, v in hf.state_dict().items()})
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    assert not type(remote).__module__.startswith("megamom.")
    x = ids()
    with torch.no_grad():
        fast = remote.generate(x, max_new_tokens=6, do_sample=False)
        remote.fast_generate = False
        slow = remote.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast, slow)
    (core,) = calls
    assert type(core).__module__ == "megamom.model.lm"
    assert core.model.embeddings.weight.data_ptr() == remote.model.embeddings.weight.data_ptr()


def test_beam_search_sampling_and_cache_reorder():
    hf = build(arch="mom")
    x = ids()
    with torch.no_grad():
        beams = hf.generate(x, max_new_tokens=5, num_beams=3, do_sample=False)
        assert beams.shape == (2, x.shape[1] + 5)
        torch.manual_seed(0)
        s1 = hf.generate(x, max_new_tokens=5, do_sample=True, top_k=5)
        torch.manual_seed(0)
        s2 = hf.generate(x, max_new_tokens=5, do_sample=True, top_k=5)
        assert torch.equal(s1, s2)
        logits, cache = hf(x, use_cache=True, return_dict=False)
    before = [layer.state.clone() for layer in cache.inner.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    for old, layer in zip(before, cache.inner.layers):
        assert torch.equal(layer.state, old[:, [1, 0]])
    with pytest.raises(NotImplementedError):
        cache.crop(3)


def test_hidden_states_follow_the_hf_convention():
    hf = build(arch="mom")
    x = ids()
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], hf.model.embeddings(x))
    torch.testing.assert_close(F.linear(out.hidden_states[-1], hf.model.embeddings.weight), out.logits)


def test_num_items_in_batch_gives_a_sum_over_tokens():
    hf = build(arch="linear")
    x = ids()
    with torch.no_grad():
        mean = hf(x, labels=x).loss
        summed = hf(x, labels=x, num_items_in_batch=32).loss
    n = x[:, 1:].numel()
    torch.testing.assert_close(summed, mean * n / 32)


def test_save_and_load_with_the_installed_classes(tmp_path):
    hf = build(**CASES["transformer"])
    hf.save_pretrained(tmp_path)
    back = MegaMoMForCausalLM.from_pretrained(tmp_path).to(DT).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, rtol=0, atol=0)
    assert back.config.to_model_config() == hf.config.to_model_config()
    # saved from the installed megamom, the directory ships the model code as an export does
    assert (tmp_path / "modeling_megamom.py").is_file() and (tmp_path / "megamom_model_lm.py").is_file()
    assert back.config.auto_map["AutoModelForCausalLM"] == "modeling_megamom.MegaMoMForCausalLM"


def test_fresh_model_uses_megamom_initialisation():
    hf = MegaMoMForCausalLM(MegaMoMConfig.from_model_config(ModelConfig(
        vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, head_dim=4, kernel_backend="torch")))
    attn = hf.model.layers[0].attn
    assert torch.all(attn.A_log.exp() <= 16) and torch.all(hf.model.norm.weight == 1)
    hf._init_weights(attn)  # re-initialising a MemoryMixer keeps megamom's (xavier) scale
    bound = math.sqrt(6 / (16 + 8)) * 2 ** -2.5
    assert attn.q_proj.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="model.topk"):
        MegaMoMConfig(arch="mom", num_memories=2, topk=3)


def test_gradient_checkpointing_switch_keeps_gradients():
    hf = build(arch="mom").train()
    x = ids()
    hf(x, labels=x).loss.backward()
    g0 = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()
    hf.gradient_checkpointing_enable()
    assert hf.is_gradient_checkpointing
    hf(x, labels=x).loss.backward()
    for n, p in hf.named_parameters():
        if n in g0:
            torch.testing.assert_close(p.grad, g0[n], rtol=1e-10, atol=1e-12)
