"""`megamom plan`'s memory estimate against the measured peak of real training steps on one GPU:
the trainer's DeepSpeed engine (ZeRO-1, bf16; megamom.train.engine.build_engine), three steps on
random tokens, torch.cuda.max_memory_allocated, for each (config, micro-batch, scan_keep).

    python benchmarks/bench_memory.py [--cases mom-340m:8:all,mom-340m:4:all,...]

Prints a table: estimate, measured, estimate / measured (the planner aims within 20%)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = ("mom-340m:8:all,mom-340m:4:all,mom-340m:8:none,transformer-340m:8:none,transformer-340m:4:none,"
           "mom-1.3b:4:none,mom-1.3b:2:none")


def measure(name: str, micro: int, keep: str, T: int) -> dict:
    from megamom.config import load_config
    from megamom.model import build_model
    from megamom.parallel import planner
    from megamom.train.engine import build_engine
    from megamom.train.trainer import Batching
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [f"train.micro_batch_size={micro}", f"data.seq_len={T}",
                                                     "train.zero_stage=1", "train.grad_accum=1",
                                                     "train.global_batch_size=null", f"model.scan_keep={keep}"])
    _, local = planner.parameter_counts(cfg, 1)
    estimate = (sum(planner.state_bytes(local, 1, 1, "bf16"))
                + micro * T * planner.activation_bytes_per_token(cfg, 1, False, keep, False))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine, _ = build_engine(cfg, model, Batching(micro, 1, 1), "bf16", torch.device("cuda"))
    ids = torch.randint(0, cfg.model.vocab_size, (micro, T + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(3):
            out = engine(ids[:, :T], labels=ids[:, 1:], return_logits=False)
            engine.backward(out.loss)
            engine.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result = {"estimate_GiB": round(estimate / 2**30, 1), "measured_GiB": round(peak / 2**30, 1),
                  "ratio": round(estimate / peak, 3)}
    except torch.cuda.OutOfMemoryError:
        result = {"estimate_GiB": round(estimate / 2**30, 1), "measured_GiB": "out of memory", "ratio": None}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT, help="config:micro_batch:scan_keep, comma-separated")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--one", help="measure this one case in this process (the driver runs each in its own: "
                                  "a DeepSpeed engine's memory is not all returned when it is dropped)")
    a = ap.parse_args()
    if a.one:
        from megamom.train.distributed import init_distributed
        init_distributed("cuda")
        name, micro, keep = a.one.split(":")
        print("RESULT " + json.dumps(measure(name, int(micro), keep, a.seq_len)), flush=True)
        return
    import subprocess
    import sys
    rows = {}
    for case in a.cases.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", case, "--seq-len", str(a.seq_len)],
                           capture_output=True, text=True)
        lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        rows[case] = json.loads(lines[-1][7:]) if lines else {"estimate_GiB": None, "measured_GiB": f"failed "
                                                                f"({r.stderr.strip().splitlines()[-1:]})", "ratio": None}
        print(case, rows[case], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "bench_memory.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "seq_len": a.seq_len, "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, T={a.seq_len}, ZeRO-1 bf16\n| config B keep | estimate GiB | measured GiB | "
          "estimate / measured |\n|---|---|---|---|")
    for case, r in rows.items():
        print(f"| {case} | {r['estimate_GiB']} | {r['measured_GiB']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
