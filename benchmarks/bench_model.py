"""GPU benchmark: the MoM layer and whole-model training steps of megamom against the anchors
(flash-linear-attention's MoM, HF Llama with SDPA) measured in the same run.

Usage on a CUDA machine (benchmarks/README.md: what to install):
    python benchmarks/bench_model.py [stages] [--backends torch,triton]
stages (comma-separated): check, layer, train, long, profile, profile_train   (default: layer,train)
Prints a table last; writes JSON to $OUT (or /tmp).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback

import torch
from triton.testing import do_bench

from megamom.config import SCAN_KEEPS, load_config
from megamom.model import MemoryMixer, build_model
from megamom.model.counting import flops_per_token

DEV = "cuda"
PEAK = 989e12  # H100/H200 SXM dense bf16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS: dict = {}
ROWS: list = []


def log(key, value):
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_model.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)  # after every result: a run cut by its time limit keeps them


def ms(fn, rep=100):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


KEEPS = ["none"]  # --keep: the model.scan_keep values megamom's layer and training runs are timed with
NO_LLAMA = False


def cfg_of(name, **overrides):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml")).model
    cfg.scan_keep = KEEPS[0]  # the check and profile stages take the first --keep value
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def fla_available():
    try:
        import fla.ops.common.chunk_o as co
        co.TRITON_ABOVE_3_7_1 = True  # timing only: fla refuses Triton 3.4-3.7.0 on Hopper (fla #640)
        return True
    except Exception as e:
        print("fla not importable:", e)
        return False


# ------------------------------------------------------------------------------------------- layer
def issue_ms(fn, n=3):
    """Host time to issue one call, the GPU idle at the start (few calls: the launch queue must not
    fill, or this waits on the GPU). Near the eager time, the eager layer is bound by the host. For
    code that syncs with the host (fla's MoM layer reads segment sizes with .item()) this is wall
    time, GPU waits included, not issue time."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def graph_ms(fn, tensors):
    """fn (forward + backward) replayed from one CUDA graph: the GPU's time without the host's
    issue time. Gradients are set to None first, so the graph owns (and overwrites) them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in tensors:
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = ms(g.replay)
    for t_ in tensors:
        t_.grad = None
    del g
    return t


def bench_layer(backends):
    B, T = 8, 2048
    x0 = torch.randn(B, T, 1024, device=DEV, dtype=torch.bfloat16)
    doc_ids = torch.arange(B, device=DEV).repeat_interleave(T)
    for backend, keep in [(b, k) for b in backends for k in KEEPS]:
        cfg = cfg_of("mom-340m", kernel_backend=backend, scan_keep=keep)
        layer = MemoryMixer(cfg).to(DEV, torch.bfloat16)
        x = x0.clone().requires_grad_()
        name = f"layer_megamom_{backend}" + ("" if keep == "none" else "_keep_" + keep)

        def fb():
            out = layer(x, doc_ids, B)[0]
            out.float().pow(2).mean().backward()
        try:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time(); fb(); torch.cuda.synchronize()
            first = time.time() - t0
            t = ms(fb)
            issue = issue_ms(fb)
            log(name, {"fwdbwd_ms": round(t, 3), "issue_ms": round(issue, 3), "first_s": round(first, 1),
                       "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1)})
            what = f"MoM layer fwd+bwd, megamom ({backend}{'' if keep == 'none' else ', keep ' + keep})"
            ROWS.append((what, f"{t:.2f} ms (host issue time {issue:.2f} ms)"))
            try:  # its own failure (a capture error) must not drop the eager result
                graph = graph_ms(fb, [x, *layer.parameters()])
                log(name + "_graph", {"fwdbwd_ms": round(graph, 3)})
                ROWS.append((what + ", one CUDA graph", f"{graph:.2f} ms"))
            except Exception as e:
                log(name + "_graph", f"failed: {type(e).__name__}: {str(e)[:300]}")
        except Exception as e:
            log(name, f"failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        del layer, x
        torch.cuda.empty_cache()
    if fla_available():
        from fla.layers.mom import MomAttention
        layer = MomAttention(hidden_size=1024, head_dim=256, num_heads=4, expand_v=1, num_memories=4, topk=2,
                             shared_mem=True, layer_idx=0).to(DEV, torch.bfloat16)
        x = x0.clone().requires_grad_()

        def fb():
            out = layer(x)[0]
            out.float().pow(2).mean().backward()
        fb(); torch.cuda.synchronize()
        t = ms(fb)
        issue = issue_ms(fb)
        log("layer_fla", {"fwdbwd_ms": round(t, 3), "issue_ms": round(issue, 3)})
        ROWS.append(("MoM layer fwd+bwd, fla (anchor 29.6 ms)", f"{t:.2f} ms (host issue time {issue:.2f} ms)"))
        del layer, x
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- check
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_layer(B=2, T=1024):
    """The MoM layer on the GPU path (Triton scan, grouped GEMM) against the same weights in float64
    on the torch reference path: output, input gradient and every parameter gradient."""
    cfg = cfg_of("mom-340m", kernel_backend="auto")
    torch.manual_seed(0)
    base = MemoryMixer(cfg).to(DEV)
    x = torch.randn(B, T, 1024, device=DEV)
    doc_ids = torch.arange(B, device=DEV).repeat_interleave(T)
    dout = torch.randn(B, T, 1024, device=DEV)
    results = {}
    for name, dtype, amp in (("bf16 weights", torch.bfloat16, False), ("fp32 weights + bf16 autocast", torch.float32, True)):
        layer = MemoryMixer(cfg).to(DEV, dtype)
        layer.load_state_dict(base.state_dict())
        ref = MemoryMixer(cfg_of("mom-340m", kernel_backend="torch")).to(DEV, torch.float64)
        ref.load_state_dict({k: v.to(dtype).double() for k, v in base.state_dict().items()})  # same rounded weights
        xs = x.to(dtype).detach().clone().requires_grad_()
        xr = x.to(dtype).double().detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = layer(xs, doc_ids, B)[0]
        out.float().backward(dout)
        out_ref = ref(xr, doc_ids, B)[0]
        out_ref.backward(dout.double())
        errs = {"out": rel(out, out_ref), "dx": rel(xs.grad, xr.grad)}
        for (n, p), (_, pr) in zip(layer.named_parameters(), ref.named_parameters()):
            errs[f"d{n}"] = rel(p.grad, pr.grad)
        worst = max(errs, key=errs.get)
        results[name] = {k: float(f"{v:.2e}") for k, v in errs.items()}
        ROWS.append((f"MoM layer {name} GPU vs float64: out / dx / worst grad",
                     f"{errs['out']:.1e} / {errs['dx']:.1e} / {worst} {errs[worst]:.1e}"))
        del layer, ref
    log("check_layer", results)
    torch.cuda.empty_cache()


def check_decode():
    """Greedy decoding with the recurrent cache (Triton step) reproduces the parallel forward."""
    cfg = cfg_of("mom-340m", num_layers=2, kernel_backend="auto")
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV).eval()
    ids = torch.randint(0, 32000, (2, 96), device=DEV)
    with torch.no_grad():
        full = model(ids).logits.float()
        out = model(ids[:, :64], use_cache=True)
        steps = [out.logits[:, -1].float()]
        cache = out.cache
        for t in range(64, 96):
            out = model(ids[:, t:t + 1], cache=cache)
            cache = out.cache
            steps.append(out.logits[:, -1].float())
    err = rel(torch.stack(steps[:-1], 1), full[:, 63:95])
    log("check_decode_rel_err_fp32", float(f"{err:.2e}"))
    ROWS.append(("decode (cache, Triton step) vs parallel forward, fp32 logits", f"{err:.1e}"))


# ------------------------------------------------------------------------------------------- train
STEPS = 10


def train_bench(name, model, flops_tok, B=8, T=2048, steps=None, ours=True, graph=False):
    """Tokens/s of `steps` back-to-back training steps (the CPU may run ahead of the GPU), then of
    as many steps that each wait for the loss on the host (as a loop that logs every step does).
    graph: megamom's forward + backward replayed from CUDA graphs (train.cuda_graph)."""
    assert ours or not graph, "graphs: megamom's GraphedLoss only"
    steps = steps or STEPS
    model = model.to(DEV)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (B, T + 1), device=DEV)
    if graph:
        from megamom.train.cuda_graph import GraphedLoss
        graphed = GraphedLoss(model, autocast_dtype=torch.bfloat16)

    def step():
        if graph:
            out = graphed(ids[:, :T], ids[:, 1:])
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if ours:
                    out = model(ids[:, :T], labels=ids[:, 1:], return_logits=False)
                else:
                    out = model(input_ids=ids[:, :T], labels=ids[:, :T])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    def timed(sync):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(steps):
            loss = step()
            if sync:
                loss.item()
        ev[1].record(); torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / steps / 1e3, loss
    try:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time(); step(); step(); torch.cuda.synchronize(); first = time.time() - t0
        dt, loss = timed(False)
        dt_sync, _ = timed(True)
        tok_s = B * T / dt
        res = {"params_M": round(n / 1e6, 1), "tok_per_s": round(tok_s), "step_ms": round(dt * 1e3, 1),
               "mfu": round(flops_tok * tok_s / PEAK, 3),
               "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1),
               "warm_s": round(first, 1), "loss": round(loss.item(), 3),
               "tok_per_s_sync_each_step": round(B * T / dt_sync), "step_ms_sync_each_step": round(dt_sync * 1e3, 1)}
        log(f"train_{name}_B{B}_T{T}", res)
        ROWS.append((f"train {name} B{B} T{T}", f"{res['tok_per_s']:,} tok/s, MFU {res['mfu']:.1%}, {res['peak_GiB']} "
                     f"GiB; syncing every step {res['tok_per_s_sync_each_step']:,} tok/s"))
    except Exception as e:
        log(f"train_{name}_B{B}_T{T}", f"failed: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    del model, opt
    if graph:
        graphed.close()
    gc.collect()  # the graphs' memory pool goes back only once nothing references the graphs
    torch.cuda.empty_cache()
    return RESULTS.get(f"train_{name}_B{B}_T{T}")


def bench_train(backends, long=False, graphs=("eager", "graph")):
    shapes = [(8, 2048)] if not long else [(2, 8192), (1, 32768)]
    mom = cfg_of("mom-340m")
    fast = [b for b in backends if b != "torch"]
    for backend, keep in [(b, k) for b in fast for k in KEEPS]:
        for B, T in shapes:
            for mode in graphs:
                cfg = cfg_of("mom-340m", kernel_backend=backend, scan_keep=keep)
                torch.manual_seed(0)
                name = f"megamom_mom_{backend}" + ("_graph" if mode == "graph" else "")
                name += "" if keep == "none" else "_keep_" + keep
                train_bench(name, build_model(cfg), flops_per_token(cfg, T), B, T, graph=mode == "graph")
    if long:
        return
    if not NO_LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM
        lcfg = LlamaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                           intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096,
                           tie_word_embeddings=True)
        lcfg._attn_implementation = "sdpa"
        train_bench("hf_llama_sdpa", LlamaForCausalLM(lcfg), flops_per_token(cfg_of("transformer-340m"), 2048),
                    ours=False)
    if fla_available():
        from fla.models import MomConfig, MomForCausalLM
        fcfg = MomConfig(hidden_size=1024, num_hidden_layers=24, num_heads=4, head_dim=256, expand_v=1,
                         num_memories=4, topk=2, shared_mem=True, vocab_size=32000, hidden_ratio=3,
                         tie_word_embeddings=True)
        train_bench("fla_mom", MomForCausalLM(fcfg), flops_per_token(mom, 2048), ours=False)
    if "torch" in backends:  # the reference path last: slow, and may run out of memory
        cfg = cfg_of("mom-340m", kernel_backend="torch")
        torch.manual_seed(0)
        train_bench("megamom_mom_torch", build_model(cfg), flops_per_token(cfg, 2048), 8, 2048, steps=2)


def bench_profile(backend):
    from torch.profiler import ProfilerActivity, profile
    B, T = 8, 2048
    cfg = cfg_of("mom-340m", kernel_backend=backend)
    layer = MemoryMixer(cfg).to(DEV, torch.bfloat16)
    x = torch.randn(B, T, 1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    doc_ids = torch.arange(B, device=DEV).repeat_interleave(T)

    def fb():
        layer(x, doc_ids, B)[0].float().pow(2).mean().backward()
    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
    table += "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)
    # the eager layer is bound by the host: where its CPU time goes
    table += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
    print(table)
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, f"profile_layer_{backend}.txt"), "w") as f:
        f.write(table)


def bench_profile_train(backend):
    """Where a whole mom-340m training step (B8 T2048) spends its GPU time, by op."""
    from torch.profiler import ProfilerActivity, profile
    cfg = cfg_of("mom-340m", kernel_backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (8, 2049), device=DEV)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
    print(table)
    # the same GPU time by op and input shapes (which cast / gather / copy costs what)
    table += "\n" + prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=40, max_shapes_column_width=90)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"profile_train_{backend}.txt"), "w") as f:
        f.write(table)
    del model, opt
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="?", default="layer,train")
    ap.add_argument("--backends", default="torch,triton")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per model (6 varied by ~5%%)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="skip the HF Llama anchor (A/B calls of megamom only)")
    ap.add_argument("--graphs", default="eager,graph",
                    help="megamom's training runs: eager, graph (train.cuda_graph) or both, comma-separated")
    ap.add_argument("--keep", default="none",
                    help="model.scan_keep of megamom (none, states, all), or several comma-separated: the layer "
                         "and training stages time each, check and profile take the first")
    a = ap.parse_args()
    global STEPS, KEEPS, NO_LLAMA
    KEEPS = list(dict.fromkeys(a.keep.split(",")))
    bad = set(KEEPS) - set(SCAN_KEEPS)
    if bad:
        ap.error(f"--keep: unknown {sorted(bad)}; use {', '.join(SCAN_KEEPS)}")
    STEPS = a.steps
    if a.no_fla:
        globals()["fla_available"] = lambda: False
    NO_LLAMA = a.no_llama
    stages = set(a.stages.split(","))
    backends = [b for b in a.backends.split(",") if b]
    log("device", torch.cuda.get_device_name())
    log("torch", torch.__version__)
    from megamom.kernels import resolve_backend
    try:
        log("triton_backend_available", resolve_backend("auto", torch.device("cuda")) == "triton")
    except Exception as e:
        log("triton_backend_available", f"no: {e}")
    if "check" in stages:
        check_layer()
        check_decode()
    if "train" in stages:
        bench_train(backends, graphs=a.graphs.split(","))
    if "layer" in stages:
        bench_layer(backends)
    if "profile" in stages:
        bench_profile(backends[0])
    if "profile_train" in stages:
        bench_profile_train(backends[0])
    if "long" in stages:
        bench_train(backends, long=True, graphs=a.graphs.split(","))
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, "bench_model.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    print("\n| what | result |\n|---|---|")
    for what, res in ROWS:
        print(f"| {what} | {res} |")


if __name__ == "__main__":
    main()
