"""The MoM layer on the GPU fast path (Triton scan and conv, grouped GEMM): no host sync in
forward + backward (a sync per layer stalls the GPU while the CPU catches up).
Accuracy of the whole layer against float64 is measured by benchmarks/bench_model.py check."""
import pytest
import torch

from megamom.config import ModelConfig
from megamom.model import MemoryMixer

gpu = pytest.mark.gpu  # skipped without CUDA by tests/conftest.py


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("per_memory_conv", [False, True])
def test_mom_layer_forward_backward_has_no_host_sync(per_memory_conv):
    cfg = ModelConfig(arch="mom", hidden_size=256, num_heads=2, head_dim=64, num_memories=4, topk=2,
                      per_memory_conv=per_memory_conv, vocab_size=128, num_layers=1)
    cfg.validate()
    layer = MemoryMixer(cfg).cuda()
    B, T = 2, 300
    x = torch.randn(B, T, 256, device="cuda", requires_grad=True)
    doc_ids = torch.tensor([0] * 100 + [1] * 200 + [2] * 300, device="cuda")  # uneven documents

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, stats, _ = layer(x, doc_ids, 3)
        (out.float().square().mean() + stats.aux_loss + stats.z_loss).backward()

    step()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all()
