"""The CUDA-graphed decode step (megamom.generate.GraphedDecodeStep) equals the eager one: for every
update rule, a MoM model and a one-memory model on the GPU, the graphed steps' logits equal the eager
steps' and greedy generation of a batch of prompts of different lengths gives the same tokens."""
import pytest
import torch

from megamom.config import ModelConfig
from megamom.generate import GraphedDecodeStep, _sample, generate_batch
from megamom.model import CausalLM

pytestmark = pytest.mark.gpu

CASES = {**{f"mom-{r}": dict(update_rule=r) for r in ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn")},
         "mom-per-memory-conv-top1": dict(per_memory_conv=True, topk=1, shared_mem=False),
         "linear-gated_delta": dict(arch="linear")}


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_decode_equals_eager(case):
    cfg = ModelConfig(**{**dict(arch="mom", vocab_size=96, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
                                num_memories=4, topk=2), **CASES[case]})
    torch.manual_seed(0)
    model = CausalLM(cfg).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (7, 1, 30)]
    with torch.no_grad():
        ids = torch.tensor([t for p in prompts for t in p], device="cuda")[None]
        lengths = torch.tensor([len(p) for p in prompts], device="cuda")
        seg = torch.repeat_interleave(torch.arange(3, device="cuda"), lengths)[None]
        out = model(ids, segment_ids=seg, use_cache=True, logits_at=lengths.cumsum(0) - 1)
        graphed = GraphedDecodeStep(model, out.cache)
        cache, logits = out.cache, out.logits[0]
        for _ in range(6):
            nxt = _sample(logits, 0.0, None, None)
            eager = model(nxt[:, None], cache=cache, logits_to_keep=1)
            cache, logits = eager.cache, eager.logits[:, -1]
            torch.testing.assert_close(graphed.step(nxt).clone(), logits, atol=1e-5, rtol=1e-5)
    assert generate_batch(model, prompts, 12, cuda_graph=True) == generate_batch(model, prompts, 12)
