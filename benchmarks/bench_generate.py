"""Generation benchmark (the paper's efficiency figure): milliseconds per generated token, time to
the first token and peak GPU memory, at batch sizes 1 / 8 / 64 after prompts of 1K to 128K tokens,
all in one run, random weights, bf16, greedy, no early stop:

  * megamom         megamom.generate.generate_batch as `megamom generate` runs it on CUDA: the
                    prompts prefilled by the chunked Triton scan (up to 64K tokens a forward), then
                    one CUDA graph replay per step (its capture counts in the time to first token);
  * megamom-eager   the same without the CUDA graph (one kernel launch per op from Python);
  * megamom-hf      our `megamom`-format Hugging Face export through transformers' generate() with
                    the shipped remote code (PyTorch kernels, recurrent cache);
  * llama-static    the anchor in its fastest supported mode: HF LlamaForCausalLM of the same
                    width (configs/transformer-340m.yaml), SDPA, generate() with
                    cache_implementation="static" (transformers compiles the decode step:
                    torch.compile, CUDA graphs); the first call per shape compiles, the second is timed;
  * llama-dynamic   the same model with the default dynamic cache, eager.

Time per token is taken on the GPU's timeline: an event recorded at every new token (a logits
processor for HF, `on_tokens` for megamom), ms/token = (last - first) / (tokens - 1). Peak memory
is reported for the whole call and for decoding alone (counters reset at the first new token).
Cells whose Llama K/V cache cannot fit are reported as such without running.

On a CUDA machine with megamom importable (no DeepSpeed needed):
    python benchmarks/bench_generate.py                                   # batch 1, 8, 64; 1K-128K prompts
    python benchmarks/bench_generate.py --batches 1 --prompts 1024,32768
    python benchmarks/bench_generate.py --smoke --device cpu              # tiny shapes, checks the script
Prints a markdown table and writes JSON after every cell (a run stopped at a time limit keeps them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("megamom", "megamom-eager", "megamom-hf", "llama-static", "llama-dynamic")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mom-340m.yaml"), help="megamom model config")
    p.add_argument("--llama-config", default=str(ROOT / "configs" / "transformer-340m.yaml"),
                   help="megamom transformer config giving the Llama anchor's shape")
    p.add_argument("--prompts", default="1024,8192,32768,131072")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="megamom,megamom-eager,llama-static,llama-dynamic")
    p.add_argument("--eager-max-batch", type=int, default=1, help="megamom-eager and megamom-hf: largest batch")
    p.add_argument("--smoke", action="store_true", help="tiny models and lengths (checks the script, e.g. on CPU)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "bench_generate.json"))
    return p.parse_args()


def model_configs(args):
    from megamom.config import load_config
    mom = load_config(args.config).model
    tr = load_config(args.llama_config).model
    if args.smoke:
        small = dict(hidden_size=64, num_layers=2, vocab_size=512, intermediate_size=None)
        mom = dataclasses.replace(mom, **small, num_heads=2, head_dim=32)
        tr = dataclasses.replace(tr, **small, num_heads=4, head_dim=16)
    return dataclasses.replace(mom, kernel_backend="auto"), tr


class Clock:
    """GPU-timeline events (CUDA) or host times (CPU) and peak memory."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


class StepMarks:
    """Called once per new token (HF: a logits processor; megamom: on_tokens): marks the time; at
    the first token it resets the peak memory counter (what follows is decoding)."""

    def __init__(self, clock: Clock):
        self.clock, self.marks = clock, []

    def __call__(self, *args):
        if not self.marks:
            self.prefill_peak = self.clock.peak_gib()
            self.clock.reset_peak()
        self.marks.append(self.clock.mark())
        return args[1] if len(args) == 2 else None  # a logits processor returns the scores


def build_megamom(cfg, dtype, device):
    from megamom.model import CausalLM
    torch.manual_seed(0)
    return CausalLM(cfg).to(device=device, dtype=dtype).eval()


def build_megamom_hf(model, dtype, device, workdir: Path):
    from transformers import AutoModelForCausalLM

    from megamom.convert.to_hf import write_export
    out = workdir / "megamom-export"
    out.mkdir(exist_ok=True)
    write_export(out, model.config, {k: v.float().cpu() for k, v in model.state_dict().items()}, fmt="megamom",
                 dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=dtype).to(device).eval()


def build_llama(tr, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=tr.vocab_size, hidden_size=tr.hidden_size, intermediate_size=tr.mlp_hidden_size,
                         num_hidden_layers=tr.num_layers, num_attention_heads=tr.num_heads,
                         num_key_value_heads=tr.num_kv_heads or tr.num_heads, head_dim=tr.head_dim,
                         max_position_embeddings=1 << 18, rms_norm_eps=tr.norm_eps,
                         tie_word_embeddings=tr.tie_word_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def llama_kv_gib(tr, batch: int, length: int, dtype) -> float:
    per_token = 2 * tr.num_layers * (tr.num_kv_heads or tr.num_heads) * tr.head_dim * torch.finfo(dtype).bits // 8
    return batch * length * per_token / 2**30


def run_megamom(model, ids, new_tokens, marks, cuda_graph):
    from megamom.generate import generate_batch
    return generate_batch(model, ids.tolist(), new_tokens, cuda_graph=cuda_graph, on_tokens=marks)


def run_hf(model, ids, new_tokens, marks, static=False):
    from transformers import LogitsProcessorList
    kwargs = dict(cache_implementation="static") if static else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                         logits_processor=LogitsProcessorList([marks]), **kwargs)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def measure(name, fn, batch, prompt, args, clock, vocab) -> dict:
    g = torch.Generator(device="cpu").manual_seed(prompt + batch)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g).to(args.device_t)
    torch.cuda.empty_cache() if clock.cuda else None
    clock.reset_peak()
    marks = StepMarks(clock)
    start = clock.mark()
    new = fn(ids, args.new_tokens, marks)
    end = clock.mark()
    peak_decode = clock.peak_gib()
    assert len(new) == batch and all(len(r) == args.new_tokens for r in new), "wrong number of tokens"
    n = len(marks.marks)
    per_token = clock.seconds(marks.marks[0], marks.marks[-1]) / max(n - 1, 1)
    return {"model": name, "batch": batch, "prompt": prompt, "new_tokens": args.new_tokens,
            "total_s": clock.seconds(start, end), "first_token_s": clock.seconds(start, marks.marks[0]),
            "ms_per_token": 1e3 * per_token, "tokens_per_s": batch / per_token,
            "prefill_peak_gib": marks.prefill_peak, "decode_peak_gib": peak_decode}


def table(rows: list) -> str:
    best = {}
    for r in rows:
        if r["model"].startswith("llama") and "ms_per_token" in r:
            key = (r["batch"], r["prompt"])
            best[key] = min(best.get(key, float("inf")), r["ms_per_token"])
    lines = ["| model | batch | prompt | first token s | ms / token | tokens / s | prefill / decode peak GiB | "
             "speed vs Llama's best |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['error']} |||||")
            continue
        b = best.get((r["batch"], r["prompt"]))
        ratio = f"{b / r['ms_per_token']:.2f}x" if b else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['first_token_s']:.3f} | "
                     f"{r['ms_per_token']:.2f} | {r['tokens_per_s']:.0f} | {r['prefill_peak_gib']:.2f} / "
                     f"{r['decode_peak_gib']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    args = parse()
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    args.device_t = device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    prompts = [int(x) for x in args.prompts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if args.smoke:
        prompts, batches, args.new_tokens = [16, 64], [1, 3], min(args.new_tokens, 8)
    models = args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    clock = Clock(device)
    mom, tr = model_configs(args)
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if clock.cuda else float("inf")
    info = {"device": torch.cuda.get_device_name() if clock.cuda else "cpu", "torch": torch.__version__,
            "dtype": args.dtype, "argv": sys.argv, "date": time.strftime("%Y-%m-%d"),
            "megamom_config": dataclasses.asdict(mom), "llama_shape": dataclasses.asdict(tr)}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows: list = []

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    torch._dynamo.config.cache_size_limit = 64  # llama-static: a compiled decode step per (batch, cache length)
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        megamom_model = build_megamom(mom, dtype, device) if any(m.startswith("megamom") for m in models) else None
        llama = build_llama(tr, dtype, device) if any(m.startswith("llama") for m in models) else None
        for name in models:
            try:
                if name == "megamom":
                    built[name] = (lambda ids, n, m: run_megamom(megamom_model, ids, n, m, None), mom.vocab_size)
                elif name == "megamom-eager":
                    built[name] = (lambda ids, n, m: run_megamom(megamom_model, ids, n, m, False), mom.vocab_size)
                elif name == "megamom-hf":
                    hf = build_megamom_hf(megamom_model, dtype, device, Path(tmp))
                    built[name] = (lambda ids, n, m, hf=hf: run_hf(hf, ids, n, m), mom.vocab_size)
                elif name == "llama-static":
                    built[name] = (lambda ids, n, m: run_hf(llama, ids, n, m, static=True), tr.vocab_size)
                elif name == "llama-dynamic":
                    built[name] = (lambda ids, n, m: run_hf(llama, ids, n, m), tr.vocab_size)
            except Exception as e:  # keep measuring the others
                rows.append({"model": name, "batch": 0, "prompt": 0, "error": f"build: {type(e).__name__}: {e}"[:200]})
                traceback.print_exc()
        for name, (fn, vocab) in built.items():  # warm-up: kernel compilation, autotuning, the allocator
            if name == "llama-static":
                continue  # (compiled per shape, below)
            measure(name, fn, 1, min(128, prompts[0]), argparse.Namespace(**{**vars(args), "new_tokens": 4}),
                    clock, vocab)
        for batch in batches:
            for prompt in prompts:
                for name, (fn, vocab) in built.items():
                    if name in ("megamom-eager", "megamom-hf") and batch > args.eager_max_batch:
                        continue
                    kv = llama_kv_gib(tr, batch, prompt + args.new_tokens, dtype)
                    if name.startswith("llama") and kv > 0.8 * total_gib:
                        rows.append({"model": name, "batch": batch, "prompt": prompt,
                                     "error": f"K/V cache {kv:.0f} GiB does not fit"})
                        save()
                        continue
                    try:
                        t0 = time.perf_counter()
                        if name == "llama-static":  # the first call at a shape compiles
                            measure(name, fn, batch, prompt, args, clock, vocab)
                        row = measure(name, fn, batch, prompt, args, clock, vocab)
                        row["wall_s"] = time.perf_counter() - t0
                    except torch.cuda.OutOfMemoryError:
                        row = {"model": name, "batch": batch, "prompt": prompt, "error": "out of memory"}
                    torch.cuda.empty_cache() if clock.cuda else None
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save()
    print()
    print(f"device {info['device']}, torch {info['torch']}, transformers {info.get('transformers')}, {args.dtype}, "
          f"{args.new_tokens} new tokens")
    print(table(rows))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
