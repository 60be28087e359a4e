"""`megamom train`: with no arguments, trains the tiny MoM on the shipped corpus (CPU is enough)."""
from __future__ import annotations

import argparse
import logging
import os
from importlib import resources

from ..config import load_config
# exit codes: 0 trained to train.max_steps; 2 bad config or input (nothing written); EXIT_STOPPED (75)
# after a checkpoint on SIGTERM / SIGUSR1 / Ctrl-C; anything else: an error
from ..errors import EXIT_STOPPED


def default_config_path() -> str:
    return str(resources.files("megamom.configs") / "tiny.yaml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (f"exit codes: 0 finished, 2 bad config or input, {EXIT_STOPPED} stopped by SIGTERM / SIGUSR1 / Ctrl-C "
                "after a checkpoint (run again or requeue to resume)")
    p.add_argument("--config", help="YAML config (default: the packaged tiny MoM config)")
    p.add_argument("--resume", default="auto",
                   help="auto: continue the run in train.out_dir from its newest intact checkpoint (if any); "
                        "none: start over (an earlier run there moves to train.out_dir/archive/); "
                        "or a checkpoint or run directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sample-prompt", default="And God said",
                   help="prompt for the short sample printed at the end ('' to skip)")
    p.add_argument("--sample-tokens", type=int, default=48)
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args) -> int:
    setup_logging()
    cfg = load_config(args.config or default_config_path(), args.overrides)  # errors before any work
    import torch
    from .trainer import Trainer
    trainer = Trainer(cfg, resume=args.resume, device=args.device)
    summary = trainer.fit()
    if trainer.dist.is_main:
        ev = summary.get("eval") or {}
        print(f"\ndone: step {summary['step']}, {summary['tokens_seen']:,} tokens"
              + (f", val loss {ev['val_loss']:.4f}, val ppl {ev['val_ppl']:.2f}" if ev else "")
              + (f", {summary['skipped_steps']} skipped steps" if summary["skipped_steps"] else ""))
        print(f"checkpoint: {summary['final_checkpoint']}")
        if summary.get("stopped_by"):
            print(f"stopped early by a signal (exit code {EXIT_STOPPED}); rerun the same command to resume")
    if not summary.get("stopped_by") and args.sample_prompt:
        # Every rank runs the sample: under ZeRO-3 each forward gathers parameter shards from all
        # ranks. No eos_id, so every rank runs exactly 1 + sample_tokens forwards; rank 0 prints.
        from ..generate import generate
        tok = trainer.tokenizer
        from ..generate_cli import prompt_bos
        ids = [tok.bos_id] if prompt_bos(tok, trainer.documents_start_with_bos) else []
        ids += tok.encode(args.sample_prompt)
        prompt = torch.tensor([ids], device=trainer.dist.device)
        from ..parallel.sequence_parallel import whole_sequences
        # (memories split over expert ranks keep no decode state: the sample reruns the sequence;
        # sequence ranks each run the whole sample)
        with whole_sequences(trainer.model):
            out = generate(trainer.model, prompt, args.sample_tokens, temperature=0.8, top_k=40,
                           generator=torch.Generator(device=trainer.dist.device).manual_seed(cfg.train.seed),
                           use_cache=trainer.topology.expert.size == 1)
        if trainer.dist.is_main:
            print(f"sample: {tok.decode(out[0, len(ids):].tolist())!r}  (prompt: {args.sample_prompt!r})")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return EXIT_STOPPED if summary.get("stopped_by") else 0
