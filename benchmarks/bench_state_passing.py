"""Sequence parallelism's state passing on one GPU (kernels/state_passing.py), gated delta rule,
mom-340m heads (4 x 256): P slices of each sequence emulated in one process (summaries, fold,
rerun) against the whole-sequence scan, both with the Triton kernels; errors of both against the
float64 scan (outputs and input gradients, float32 and bf16 inputs); then the cost one rank pays
for its slice as the memory layers do it (megamom.parallel.sequence_parallel.scan_slice), against
the scan of its slice alone (forward + backward, B1, --tokens per rank): the first rank, a middle
rank when one document covers its slice (a summary with K transition columns), a middle rank with
documents (a summary of the last document only).

    python benchmarks/bench_state_passing.py [--tokens 65536] [--slices 2] [--doc-tokens 2048]"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from megamom.kernels import memory_scan
from megamom.kernels.state_passing import fold_states, scan_in_slices, slice_summary

H, K, V = 4, 256, 256


def inputs(B, T, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = {"q": torch.randn(B, T, H, K, device="cuda", generator=g),
         "k": torch.randn(B, T, H, K, device="cuda", generator=g),
         "v": torch.randn(B, T, H, V, device="cuda", generator=g),
         "g": F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g)) * 0.1,
         "beta": torch.rand(B, T, H, device="cuda", generator=g)}
    return {n: x.to(dtype) if n in "qkv" else x for n, x in t.items()}


def run(fn, t):
    leaves = {n: x.detach().requires_grad_() for n, x in t.items()}
    o, s = fn(leaves)
    (o.float().pow(2).mean() + s.float().pow(2).mean()).backward()
    return o.detach(), {n: x.grad for n, x in leaves.items()}


def whole(backend):
    return lambda t: memory_scan("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True,
                                 use_qk_l2norm=True, backend=backend)


def sliced(P, backend):
    return lambda t: scan_in_slices("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], slices=P,
                                    use_qk_l2norm=True, backend=backend)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def timed(fn, iters=10):
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per rank")
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--check-tokens", type=int, default=4096, help="sequence length of the float64 checks")
    ap.add_argument("--doc-tokens", type=int, default=2048, help="document length of the documents case")
    args = ap.parse_args()
    P = args.slices
    print(f"{torch.cuda.get_device_name()}, gated delta rule, H{H} K{K} V{V}, {P} slices")
    print(f"{'inputs':<8} {'path':<14} {'out err':>9} {'dq err':>9} {'dk err':>9} {'dv err':>9} {'dg err':>9}"
          "  (vs float64, T=%d)" % args.check_tokens)
    for dtype in (torch.float32, torch.bfloat16):
        t = inputs(1, args.check_tokens, dtype)
        ref_o, ref_g = run(whole("torch"), {n: x.double() for n, x in t.items()})
        for name, fn in (("whole", whole("triton")), (f"{P} slices", sliced(P, "triton"))):
            o, g = run(fn, t)
            errs = [rel(o, ref_o)] + [rel(g[n], ref_g[n]) for n in ("q", "k", "v", "g")]
            print(f"{str(dtype)[6:]:<8} {name:<14} " + " ".join(f"{e:9.2e}" for e in errs))

    # one rank's cost, as the memory layers pay it (megamom.parallel.sequence_parallel.scan_slice):
    #   first rank         its scan from zero gives its outputs and its summary at once
    #   middle, one doc    a document across the whole slice: summary with K transition columns + the scan
    #                      from the folded state
    #   middle, documents  documents of --doc-tokens: summary of the last document only (no transition:
    #                      a reset inside the slice) + the scan from the folded state
    T, n_doc = args.tokens, args.doc_tokens
    t = {n: x.requires_grad_() for n, x in inputs(1, T, torch.bfloat16).items()}
    entering = torch.randn(1, H, K, V, device="cuda") * 0.01

    def loss_of(o, *rest):
        return o.float().pow(2).mean() + sum(x.float().sum() * 0 for x in rest)

    def scan_alone():
        o, _ = memory_scan("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], use_qk_l2norm=True)
        loss_of(o).backward()

    def first_rank():
        o, final = memory_scan("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True,
                               use_qk_l2norm=True)
        loss_of(o, final).backward()

    def middle_rank_one_document():
        Tr, Sr = slice_summary("gated_delta", t["k"], t["v"], t["g"], t["beta"], use_qk_l2norm=True)
        folded = fold_states(torch.stack([Tr, Tr]), torch.stack([Sr, entering]))[-1]  # (a predecessor's fold)
        o, _ = memory_scan("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=folded,
                           use_qk_l2norm=True)
        loss_of(o, Tr, Sr).backward()

    def middle_rank_documents():
        last = slice(T - n_doc, T)
        _, Sr = memory_scan("gated_delta", torch.zeros_like(t["q"][:, last]), t["k"][:, last], t["v"][:, last],
                            t["g"][:, last], t["beta"][:, last], output_final_state=True, use_qk_l2norm=True)
        o, _ = memory_scan("gated_delta", t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=entering + Sr * 0,
                           use_qk_l2norm=True)  # (the first document's entering state; the rest reset)
        loss_of(o, Sr).backward()

    base = timed(scan_alone)
    print(f"\nper rank, B1 T{T}, bf16, fwd+bwd, against the scan alone ({base:.2f} ms):")
    for name, fn in (("first rank", first_rank), ("middle rank, one document", middle_rank_one_document),
                     (f"middle rank, documents of {n_doc}", middle_rank_documents)):
        ms = timed(fn)
        print(f"  {name:<34} {ms:7.2f} ms  {100 * (ms / base - 1):+4.0f}%")

if __name__ == "__main__":
    main()
