"""Fast decoding on the GPU: for every update rule (a MoM model, a one-memory model, per-memory convs
without a shared memory, GLA's low-rank gate without conv), the fused Triton decode step
(kernels/triton/decode_step.py) gives the torch decode step's logits, the CUDA-graphed step
(megamom.generate.GraphedDecodeStep) the eager one's, and greedy generation of prompts of different
lengths gives the same tokens eagerly, graphed, on the torch kernels and through the Hugging Face
export's own code (float32)."""

import pytest
import torch

from megamom.config import ModelConfig
from megamom.generate import GraphedDecodeStep, _sample, generate_batch
from megamom.model import CausalLM

pytestmark = pytest.mark.gpu

CASES = {**{f"mom-{r}": dict(update_rule=r) for r in ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn")},
         "mom-per-memory-conv-top1": dict(per_memory_conv=True, topk=1, shared_mem=False),
         "mom-gla-low-rank-no-conv": dict(update_rule="gla", gla_gate_rank=8, use_short_conv=False,
                                          qkv_activation="none"),
         "linear-gated_delta": dict(arch="linear")}
PROMPT_LENGTHS = (7, 1, 30)


def build(case, backend="auto"):
    cfg = ModelConfig(**{**dict(arch="mom", vocab_size=96, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
                                num_memories=4, topk=2, kernel_backend=backend), **CASES[case]})
    torch.manual_seed(0)
    return CausalLM(cfg).cuda().eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def prefill(model, ps):
    ids = torch.tensor([t for p in ps for t in p], device="cuda")[None]
    lengths = torch.tensor([len(p) for p in ps], device="cuda")
    seg = torch.repeat_interleave(torch.arange(len(ps), device="cuda"), lengths)[None]
    out = model(ids, segment_ids=seg, use_cache=True, logits_at=lengths.cumsum(0) - 1)
    return out.cache, out.logits[0]


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_fused_decode_equals_torch_decode(case):
    """The Triton decode step (five kernels a layer) == the torch ops, float32, six steps running."""
    fused, ref = build(case), build(case, "torch")
    ps = prompts()
    c1, l2 = prefill(ref, ps)  # one prefill (the chunked Triton scan's tf32 dots would differ by ~1e-3)
    c2 = c1
    for _ in range(6):
        nxt = _sample(l2, 0.0, None, None)
        a, b = fused(nxt[:, None], cache=c1, logits_to_keep=1), ref(nxt[:, None], cache=c2, logits_to_keep=1)
        (c1, l1), (c2, l2) = (a.cache, a.logits[:, -1]), (b.cache, b.logits[:, -1])
        torch.testing.assert_close(l1, l2, atol=2e-5, rtol=1e-4)
        for x, y in zip(c1.layers, c2.layers):
            torch.testing.assert_close(x.state, y.state, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_graphed_decode_equals_eager(case):
    model = build(case)
    ps = prompts()
    cache, logits = prefill(model, ps)
    graphed = GraphedDecodeStep(model, prefill(model, ps)[0])
    for _ in range(6):
        nxt = _sample(logits, 0.0, None, None)
        eager = model(nxt[:, None], cache=cache, logits_to_keep=1)
        cache, logits = eager.cache, eager.logits[:, -1]
        torch.testing.assert_close(graphed.step(nxt).clone(), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mom-gated_delta", "mom-gla", "linear-gated_delta"])
def test_greedy_equal_across_paths(case, tmp_path):
    from transformers import AutoModelForCausalLM

    from megamom.convert.to_hf import write_export
    model, ref = build(case), build(case, "torch")
    ps = prompts()
    graphed = generate_batch(model, ps, 12)  # (the default on CUDA)
    assert graphed == generate_batch(model, ps, 12, cuda_graph=False)
    assert graphed == generate_batch(ref, ps, 12, cuda_graph=False)
    write_export(tmp_path, model.config, {k: v.cpu() for k, v in model.state_dict().items()})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).cuda().eval()
    for p, new in zip(ps, graphed):
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert out[0, len(p):].tolist() == new


@torch.no_grad()
def test_prefill_in_pieces_equals_one_prefill():
    """generate_batch with a prefill budget smaller than the prompts (pieces continuing the cache,
    prompts in several packed rows) gives the tokens of one packed prefill."""
    model = build("mom-gated_delta")
    ps = prompts() + [list(range(40))]
    assert generate_batch(model, ps, 8, prefill_tokens=16) == generate_batch(model, ps, 8)
