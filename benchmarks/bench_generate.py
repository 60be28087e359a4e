"""Generation benchmark (the paper's efficiency figure): time and peak GPU memory to generate N new
tokens (default 1024) after prompts of 1K to 32K tokens, for

  * megamom-hf      our `megamom`-format Hugging Face export, loaded with
                    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and run with
                    generate() -- the shipped remote code, PyTorch kernels, recurrent cache;
  * megamom-native  the same weights in megamom's own CausalLM + megamom.generate (Triton kernels
                    on CUDA when they import; --no-native to skip);
  * megamom-graphed the same, decoding through one CUDA graph per step
                    (megamom.generate.generate_batch with cuda_graph=True; its capture counts in
                    the decode time);
  * llama-sdpa      the anchor: HF LlamaForCausalLM with SDPA attention and its KV cache, of the
                    same width (configs/transformer-340m.yaml by default),

all measured in the same run, random weights, bf16, batch 1, greedy, no early stop. The prompt
length axis is where the recurrent cache pays: its size is constant while Llama's K/V grow.

On a CUDA machine with megamom installed:
    python benchmarks/bench_generate.py                       # 1K,2K,4K,8K,16K,32K prompts
    python benchmarks/bench_generate.py --prompts 1024,32768 --new-tokens 256
    python benchmarks/bench_generate.py --smoke --device cpu  # tiny shapes, checks the script
The model needs no DeepSpeed: where only torch and transformers are installed,
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/mm . \
      && PYTHONPATH=/tmp/mm python3 benchmarks/bench_generate.py --out generate.json
Prints a markdown table (ratios against llama-sdpa per prompt length) and writes JSON after every
measurement, so a run stopped at its time limit keeps what it measured.
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


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mom-340m.yaml"), help="megamom model config")
    p.add_argument("--llama-config", default=str(ROOT / "configs" / "transformer-340m.yaml"),
                   help="megamom transformer config giving the Llama anchor's shape")
    p.add_argument("--prompts", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="megamom-hf,megamom-native,llama-sdpa")
    p.add_argument("--no-native", action="store_true", help="skip megamom-native")
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
    return mom, tr


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def now_alloc(self) -> float:
        return torch.cuda.memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")


def build_megamom_hf(cfg, dtype, device, workdir: Path):
    """Random megamom weights -> a `megamom`-format export -> loaded through transformers' remote code."""
    from transformers import AutoModelForCausalLM

    from megamom.convert.to_hf import write_export
    from megamom.model import CausalLM
    torch.manual_seed(0)
    model = CausalLM(cfg)
    out = workdir / "megamom-export"
    out.mkdir()
    write_export(out, cfg, model.state_dict(), fmt="megamom", dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    del model
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=dtype)
    return hf.to(device).eval(), out


def build_megamom_native(export_dir: Path, cfg, dtype, device):
    from megamom.convert.hf_io import read_weights
    from megamom.model import CausalLM
    model = CausalLM(dataclasses.replace(cfg, kernel_backend="auto"))
    model.load_state_dict({k: v.float() for k, v in read_weights(export_dir).items()})
    return model.to(device=device, dtype=dtype).eval()


def build_llama(tr, max_len: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=tr.vocab_size, hidden_size=tr.hidden_size, intermediate_size=tr.mlp_hidden_size,
                         num_hidden_layers=tr.num_layers, num_attention_heads=tr.num_heads,
                         num_key_value_heads=tr.num_kv_heads or tr.num_heads, head_dim=tr.head_dim,
                         max_position_embeddings=max_len, rms_norm_eps=tr.norm_eps,
                         tie_word_embeddings=tr.tie_word_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def run_hf(model, ids, new_tokens):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def run_native(model, ids, new_tokens):
    from megamom.generate import generate
    return generate(model, ids, new_tokens)


def run_graphed(model, ids, new_tokens):
    from megamom.generate import generate_batch
    new = generate_batch(model, ids.tolist(), new_tokens, cuda_graph=True)
    return torch.cat([ids, torch.tensor(new, device=ids.device)], 1)


@torch.no_grad()
def measure(name, model, fn, prompt_len, args, timer, vocab) -> dict:
    device = timer.device
    g = torch.Generator(device="cpu").manual_seed(prompt_len)
    ids = torch.randint(3, vocab, (args.batch, prompt_len), generator=g).to(device)
    base = timer.now_alloc()
    timer.reset_peak()
    timer.sync()
    t0 = time.perf_counter()
    if name in ("megamom-native", "megamom-graphed"):
        pre = model(ids, use_cache=True, logits_to_keep=1)
        cache_bytes = pre.cache.nbytes()
    else:
        pre = model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        cache = pre[1]
        cache_bytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    timer.sync()
    prefill = time.perf_counter() - t0
    del pre
    timer.reset_peak()
    timer.sync()
    t0 = time.perf_counter()
    out = fn(model, ids, args.new_tokens)
    timer.sync()
    total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + args.new_tokens, out.shape
    return {"model": name, "prompt": prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
            "total_s": total, "prefill_s": prefill, "decode_s": max(total - prefill, 0.0),
            "ms_per_new_token": 1e3 * max(total - prefill, 0.0) / args.new_tokens,
            "peak_gib": timer.peak(), "weights_gib": base, "cache_after_prompt_mib": cache_bytes / 2**20}


def table(rows: list) -> str:
    anchor = {r["prompt"]: r for r in rows if r["model"] == "llama-sdpa" and "total_s" in r}
    lines = ["| model | prompt | new | total s | prefill s | ms/new token | peak GiB | cache after prompt MiB | "
             "time vs llama | peak vs llama |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['prompt']} | {r.get('new_tokens', '')} | {r['error']} |||||||")
            continue
        a = anchor.get(r["prompt"])
        ratio_t = f"{r['total_s'] / a['total_s']:.2f}x" if a else "-"
        ratio_m = f"{r['peak_gib'] / a['peak_gib']:.2f}x" if a and a["peak_gib"] == a["peak_gib"] else "-"
        lines.append(f"| {r['model']} | {r['prompt']} | {r['new_tokens']} | {r['total_s']:.2f} | {r['prefill_s']:.2f} "
                     f"| {r['ms_per_new_token']:.1f} | {r['peak_gib']:.2f} | {r['cache_after_prompt_mib']:.1f} | "
                     f"{ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def main() -> int:
    args = parse()
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    prompts = [int(x) for x in args.prompts.split(",")]
    if args.smoke:
        prompts, args.new_tokens = [16, 64], min(args.new_tokens, 8)
    models = [m for m in args.models.split(",") if not (m == "megamom-native" and args.no_native)]
    timer = Timer(device)
    mom, tr = model_configs(args)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
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

    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        export_dir = None
        for name in models:
            try:
                if name == "megamom-hf":
                    built[name], export_dir = build_megamom_hf(mom, dtype, device, Path(tmp))
                    built[name] = (built[name], run_hf, mom.vocab_size)
                elif name == "megamom-native":
                    if export_dir is None:
                        _, export_dir = build_megamom_hf(mom, dtype, device, Path(tmp))
                    built[name] = (build_megamom_native(export_dir, mom, dtype, device), run_native, mom.vocab_size)
                elif name == "megamom-graphed":
                    if export_dir is None:
                        _, export_dir = build_megamom_hf(mom, dtype, device, Path(tmp))
                    built[name] = (build_megamom_native(export_dir, mom, dtype, device), run_graphed, mom.vocab_size)
                elif name == "llama-sdpa":
                    built[name] = (build_llama(tr, max(prompts) + args.new_tokens + 8, dtype, device), run_hf,
                                   tr.vocab_size)
                else:
                    raise SystemExit(f"unknown model {name!r}")
            except Exception as e:  # keep measuring the others
                rows.append({"model": name, "prompt": 0, "error": f"build: {type(e).__name__}: {e}"[:200]})
                traceback.print_exc()
        for name, (model, fn, vocab) in built.items():  # warm-up (compilation, autotuning, allocator)
            measure(name, model, fn, min(128, prompts[0]), argparse.Namespace(**{**vars(args), "new_tokens": 4}),
                    timer, vocab)
        for L in prompts:
            for name, (model, fn, vocab) in built.items():
                try:
                    row = measure(name, model, fn, L, args, timer, vocab)
                except torch.cuda.OutOfMemoryError:
                    row = {"model": name, "prompt": L, "new_tokens": args.new_tokens, "error": "out of memory"}
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()
    print()
    print(f"device {info['device']}, torch {info['torch']}, transformers {info.get('transformers')}, {args.dtype}, "
          f"batch {args.batch}, {args.new_tokens} new tokens")
    print(table(rows))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
