"""Does mixture-of-memories recall better than one memory? Multi-query associative recall (MQAR,
megamom.data.mqar) on one GPU within a time budget: MoM (4 memories top-2 + shared, gated delta rule)
against a single-memory Gated DeltaNet with MoM's state per memory, one with MoM's total state (5x the
heads), and Transformer++, all two layers of width 128 at the same training budget; a small
learning-rate sweep, 3 seeds; the balance loss off, in the switch form and in the paper's form; the
paper's Table 6 axes (memories, top-k, shared memory) once. Runs in priority order and stops starting
new ones when the budget would run out; every finished run is one JSON line in OUT/mqar.jsonl, the
table last (and OUT/mqar.png when matplotlib is there).

    python scripts/mqar_experiment.py --out results/mqar [--budget-s 480] [--steps 1000] [--smoke]"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from megamom.config import ModelConfig
from megamom.data.mqar import mqar_accuracy, mqar_batch
from megamom.model import build_model

# the task (set from the command line): vocabulary, training length, pairs trained and evaluated on,
# lengths evaluated at LENGTH_PAIRS pairs
V, T_TRAIN, PAIRS, EVAL_LENGTHS, LENGTH_PAIRS = 8192, 256, (8, 16, 32, 64), (128, 256, 512), 16
TRAIN_PAIRS = EVAL_PAIRS = PAIRS
BASE = dict(vocab_size=V, hidden_size=128, num_layers=2, num_heads=2, head_dim=64, hidden_ratio=2,
            max_position_embeddings=512, tie_word_embeddings=True, chunk_size=64,
            aux_loss_coef=0.01, aux_loss_form="switch", z_loss_coef=0.0)


def configure(vocab: int, seq_len: int, pairs: tuple, lengths: tuple, length_pairs: int) -> None:
    global V, T_TRAIN, TRAIN_PAIRS, EVAL_PAIRS, EVAL_LENGTHS, LENGTH_PAIRS
    V, T_TRAIN, EVAL_LENGTHS, LENGTH_PAIRS = vocab, seq_len, lengths, length_pairs
    TRAIN_PAIRS = EVAL_PAIRS = pairs
    BASE.update(vocab_size=vocab, max_position_embeddings=max(lengths + (seq_len,)))
MODELS = {
    "MoM 4x top-2 + shared": dict(arch="mom", update_rule="gated_delta", num_memories=4, topk=2, shared_mem=True),
    "GDN, MoM's state per memory": dict(arch="linear", update_rule="gated_delta"),
    "GDN, MoM's total state": dict(arch="linear", update_rule="gated_delta", num_heads=10),
    "Transformer++": dict(arch="transformer"),
}


GROUPS = {"main": "main", "lr sweep": "lr", "aux off": "aux", "aux paper form": "aux", "table 6": "table6",
          "MoM's parameters": "params"}  # a plan group -> its --groups name


def plan(lr_main: float, seeds: int = 3) -> list[dict]:
    """Every run, most important first."""
    runs = [dict(model=m, lr=lr_main, seed=s, group="main") for s in range(seeds) for m in MODELS]
    runs += [dict(model=m, lr=lr, seed=0, group="lr sweep") for lr in (lr_main / 3, lr_main * 3) for m in MODELS]
    mom = "MoM 4x top-2 + shared"
    runs += [dict(model=mom, lr=lr_main, seed=s, group=g, over=o) for s in range(seeds) for g, o in
             (("aux off", {"aux_loss_coef": 0.0}), ("aux paper form", {"aux_loss_form": "paper"}))]
    runs += [dict(model=mom, lr=lr_main, seed=0, group="table 6", over=o) for o in
             ({"num_memories": 2}, {"num_memories": 8}, {"topk": 1}, {"shared_mem": False})]
    runs += [dict(model=m, lr=lr_main, seed=0, group="MoM's parameters", over={"intermediate_size": matched_mlp(m)})
             for m in ("GDN, MoM's state per memory", "Transformer++")]
    return runs


def parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def matched_mlp(model: str) -> int:
    """The MLP width (a multiple of 16) that gives `model` MoM's parameter count."""
    want = parameters(ModelConfig(**{**BASE, **MODELS["MoM 4x top-2 + shared"]}))
    return min(range(16, 4096, 16), key=lambda f: abs(parameters(ModelConfig(**{**BASE, **MODELS[model],
                                                                                 "intermediate_size": f})) - want))


def model_config(run: dict) -> ModelConfig:
    return ModelConfig(**{**BASE, **MODELS[run["model"]], **run.get("over", {})})


class TrainSet:
    """A fixed training set per number of pairs (as Zoology's), on the device; batches mix the counts."""

    def __init__(self, examples: int, device, seed: int = 0):
        sets = [mqar_batch(examples, n, T_TRAIN, V, seed=seed + n) for n in TRAIN_PAIRS]
        self.ids = torch.cat([s.input_ids for s in sets]).to(device)
        self.labels = torch.cat([s.labels for s in sets]).to(device)

    def batch(self, size: int, generator: torch.Generator):
        i = torch.randint(0, self.ids.shape[0], (size,), generator=generator, device="cpu").to(self.ids.device)
        return self.ids[i], self.labels[i]


def train_one(run: dict, data: TrainSet, evals: dict, steps: int, batch: int, device, precision: str = "fp32",
              model_out: list | None = None) -> dict:
    """One run: -> its JSON row. precision: bf16 (autocast on the GPU) or fp32; model_out: a list the
    trained model is appended to."""
    cfg = model_config(run)
    bf16 = precision == "bf16" and device.type == "cuda"
    torch.manual_seed(run["seed"])
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if n not in model.no_weight_decay_names()]
    rest = [p for n, p in model.named_parameters() if n in model.no_weight_decay_names()]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=run["lr"], betas=(0.9, 0.98))
    warm = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(max(s - warm, 0) / max(steps - warm, 1), 1.0)))))
    g = torch.Generator().manual_seed(1000 + run["seed"])
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        ids, labels = data.batch(batch, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, labels=labels, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(out.lm_loss.item(), 4))
    train_s = time.perf_counter() - t0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        acc = {name: round(mqar_accuracy(model, b, batch_size=128, device=device), 4) for name, b in evals.items()}
    if model_out is not None:
        model_out.append(model)
    params = sum(p.numel() for p in model.parameters())
    state = _state_per_layer(cfg)
    return {**{k: v for k, v in run.items() if k != "over"}, "over": run.get("over", {}), "params": params,
            "state_per_layer": state, "steps": steps, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "train_s": round(train_s, 1),
            "final_loss": losses[-1], "losses": losses, "accuracy": acc}


def _state_per_layer(cfg: ModelConfig) -> int:
    """Memory state elements a layer keeps per sequence (KV cache: per token, reported as 0)."""
    if cfg.arch == "transformer":
        return 0
    memories = (cfg.num_memories + int(cfg.shared_mem)) if cfg.arch == "mom" else 1
    return memories * cfg.num_heads * cfg.head_dim * cfg.head_v_dim


def table(rows: list[dict]) -> str:
    cols = [f"{n} pairs" for n in EVAL_PAIRS] + [f"T{t}" for t in EVAL_LENGTHS]
    out = [f"| group | model | lr | seeds | params | {' | '.join(cols)} |", "|" + "---|" * (5 + len(cols))]
    keys = []
    for r in rows:
        key = (r["group"], r["model"], json.dumps(r["over"], sort_keys=True), r["lr"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        same = [r for r in rows if (r["group"], r["model"], json.dumps(r["over"], sort_keys=True), r["lr"]) == key]
        name = key[1] + (f" {key[2]}" if key[2] != "{}" else "")
        accs = []
        for c in [f"pairs{n}" for n in EVAL_PAIRS] + [f"len{t}" for t in EVAL_LENGTHS]:
            vals = [r["accuracy"][c] for r in same]
            mean = sum(vals) / len(vals)
            spread = (max(vals) - min(vals)) / 2
            accs.append(f"{mean:.3f}" + (f" ± {spread:.3f}" if len(vals) > 1 else ""))
        out.append(f"| {key[0]} | {name} | {key[3]:g} | {len(same)} | {same[0]['params'] / 1e6:.2f}M | "
                   + " | ".join(accs) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    main = [r for r in rows if r["group"] == "main"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in MODELS:
        same = [r for r in main if r["model"] == model]
        if not same:
            continue
        for ax, keys, xs in ((axes[0], [f"pairs{n}" for n in EVAL_PAIRS], EVAL_PAIRS),
                             (axes[1], [f"len{t}" for t in EVAL_LENGTHS], EVAL_LENGTHS)):
            mean = [sum(r["accuracy"][k] for r in same) / len(same) for k in keys]
            ax.plot(xs, mean, marker="o", label=f"{model} ({len(same)} seeds)")
    axes[0].set(xscale="log", xlabel=f"key-value pairs (T={T_TRAIN})", ylabel="MQAR accuracy", ylim=(0, 1.02))
    axes[1].set(xscale="log", xlabel=f"sequence length ({LENGTH_PAIRS} pairs)", ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting runs after this many seconds")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="the main runs' rate; the sweep takes /3 and x3")
    ap.add_argument("--examples", type=int, default=20000, help="training examples per number of pairs")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256, help="training (and pairs-evaluation) length")
    ap.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 32, 64], help="pairs trained and evaluated on")
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--length-pairs", type=int, default=16, help="pairs of the length evaluation")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="fp32",
                    help="fp32 (the default: at these widths bf16 autocast slows or stops learning, docs/mqar.md)")
    ap.add_argument("--groups", nargs="+", choices=sorted(set(GROUPS.values())), help="only these groups of the plan")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the main and balance-loss groups")
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU check of the whole script")
    ap.add_argument("--plot-only", action="store_true", help="table and plot from OUT/mqar.jsonl")
    args = ap.parse_args()
    configure(args.vocab, args.seq_len, tuple(args.pairs), tuple(args.eval_lengths), args.length_pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "mqar.jsonl"
    if not args.plot_only:
        start = time.perf_counter()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        steps, batch, examples, n_eval = args.steps, args.batch, args.examples, 256
        if args.smoke:
            steps, batch, examples, n_eval = 3, 4, 64, 8
        data = TrainSet(examples, device)
        evals = {f"pairs{n}": mqar_batch(n_eval, n, T_TRAIN, V, seed=10_000 + n) for n in EVAL_PAIRS}
        evals.update({f"len{t}": mqar_batch(n_eval, LENGTH_PAIRS, t, V, seed=20_000 + t) for t in EVAL_LENGTHS})
        results.write_text("")
        last = 0.0
        runs = [r for r in plan(args.lr, args.seeds) if not args.groups or GROUPS[r["group"]] in args.groups]
        runs = runs[:5] if args.smoke else runs
        for i, run in enumerate(runs):
            if time.perf_counter() - start + last > args.budget_s:
                print(f"budget reached: {len(runs) - i} of {len(runs)} runs not started")
                break
            t0 = time.perf_counter()
            row = train_one(run, data, evals, steps, batch, device, args.precision)
            last = time.perf_counter() - t0
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i + 1}/{len(runs)}] {run['group']:<14} {run['model']:<28} lr {run['lr']:g} seed {run['seed']} "
                  f"{row.get('over') or ''} loss {row['final_loss']:.3f} acc {row['accuracy']} ({last:.0f} s)",
                  flush=True)
        print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
              f"{steps} steps of batch {batch} at T={T_TRAIN}, vocabulary {V}, pairs {TRAIN_PAIRS}")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print(table(rows))
    if plot(rows, out / "mqar.png"):
        print(f"plot: {out / 'mqar.png'}")


if __name__ == "__main__":
    main()
