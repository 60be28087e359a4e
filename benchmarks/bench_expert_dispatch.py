"""The expert-parallel path of a MoM layer on one GPU: the layer's memories run through the
expert-parallel dispatcher over an expert group of one (every routing step of EP: the block sizes
read on the host, the rows gathered for the all-to-all, one packing over the received rows and the
shared memory's tokens, the q projection of every received row, the reverse permutation; the
all-to-alls themselves are the identity here), against the same layer with its one-rank
dispatcher. Checks both against float64 (outputs and input / weight gradients), counts the host
syncs of one forward + backward, and times them interleaved (mom-340m shape, bf16, Triton kernels).

    python benchmarks/bench_expert_dispatch.py [--batch 8] [--seq 2048]"""
import argparse
import copy
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import cfg_of  # noqa: E402

from megamom.model.memory_mixer import MemoryMixer  # noqa: E402
from megamom.parallel.expert_parallel import ExpertParallelDispatcher  # noqa: E402
from megamom.parallel.topology import Group  # noqa: E402


def forward_backward(layer, x, doc_ids, num_docs):
    o, stats, _ = layer(x, doc_ids, num_docs)
    (o.float().pow(2).mean() + 0.01 * stats.aux_loss + 0.001 * stats.z_loss).backward()
    return o


def grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def syncs_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def kernel_times(layer, x, doc_ids, num_docs, iters: int = 3) -> dict:
    """GPU time per kernel name of one forward + backward (profiler, mean over iters)."""
    import collections

    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward_backward(layer, x, doc_ids, num_docs)
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:70]] += e.device_time_total / iters
    return per


def print_kernel_differences(one, ep, x, doc_ids, num_docs, rows: int) -> None:
    a, b = kernel_times(one, x, doc_ids, num_docs), kernel_times(ep, x, doc_ids, num_docs)
    print(f"\nGPU time per fwd+bwd: one rank {sum(a.values()):.0f} us, expert-parallel {sum(b.values()):.0f} us; "
          f"the largest differences (us, expert-parallel minus one rank):")
    for name in sorted(set(a) | set(b), key=lambda n: -abs(b.get(n, 0) - a.get(n, 0)))[:rows]:
        print(f"{b.get(n := name, 0) - a.get(n, 0):+9.1f}  {a.get(n, 0):8.1f} -> {b.get(n, 0):8.1f}  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also list the ROWS kernels whose GPU time differs most between the two paths")
    args = ap.parse_args()
    B, T = args.batch, args.seq
    torch.manual_seed(0)
    cfg = cfg_of("mom-340m", kernel_backend="triton", scan_keep="all")
    one = MemoryMixer(cfg).cuda()
    ep = copy.deepcopy(one)
    ep.dispatcher = ExpertParallelDispatcher(cfg.num_memories, ep.shared, Group(None, (0,), 0))
    ref = copy.deepcopy(one).double()
    ref.cfg = copy.copy(cfg)
    ref.cfg.kernel_backend = "torch"
    for m in ref.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    one, ep = one.to(torch.bfloat16), ep.to(torch.bfloat16)
    x0 = torch.randn(B, T, cfg.hidden_size, device="cuda")
    seg = torch.cumsum((torch.rand(B, T, device="cuda") < 1 / 512).long(), 1)  # documents of ~512 tokens
    from megamom.model.lm import document_index
    doc_ids, num_docs = document_index(seg, B, T, "cuda")

    results = {}
    xr = x0.double().requires_grad_()
    o_ref = forward_backward(ref, xr, doc_ids, num_docs)
    g_ref = grads(ref, xr)
    for name, layer in (("one rank", one), ("expert-parallel", ep)):
        x = x0.to(torch.bfloat16).requires_grad_()
        o = forward_backward(layer, x, doc_ids, num_docs)
        g = grads(layer, x)
        assert len(g) == len(g_ref)
        results[name] = {"out": rel(o, o_ref), "dx": rel(g[0], g_ref[0]),
                         "dW (worst)": max(rel(a, b) for a, b in zip(g[1:], g_ref[1:]))}
        layer.zero_grad(set_to_none=True)

    xs = x0.to(torch.bfloat16).requires_grad_()
    times = {"one rank": [], "expert-parallel": []}
    for layer in (one, ep):
        for _ in range(3):
            forward_backward(layer, xs, doc_ids, num_docs)
        results["one rank" if layer is one else "expert-parallel"]["host syncs"] = syncs_of(
            lambda: forward_backward(layer, xs, doc_ids, num_docs))
    for _ in range(args.iters):  # interleaved
        for name, layer in (("one rank", one), ("expert-parallel", ep)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward_backward(layer, xs, doc_ids, num_docs)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    if args.profile:
        print_kernel_differences(one, ep, xs, doc_ids, num_docs, args.profile)
    base = statistics.median(times["one rank"])
    print(f"\n{torch.cuda.get_device_name()}, B{B} T{T}, {num_docs} documents, mom-340m layer, bf16, fwd+bwd")
    print(f"{'path':<16} {'ms':>8} {'ratio':>6} {'syncs':>6} {'out err':>9} {'dx err':>9} {'dW err':>9}  (vs float64)")
    for name, r in results.items():
        t = statistics.median(times[name])
        print(f"{name:<16} {t:8.3f} {t / base:6.3f} {r['host syncs']:6d} {r['out']:9.2e} {r['dx']:9.2e} "
              f"{r['dW (worst)']:9.2e}")


if __name__ == "__main__":
    main()
