"""`megamom launch [OPTIONS] [TRAIN ARGS]`: `megamom train` under torchrun on one node, or on one
node of a multi-node job (what `launchers/slurm/train.sbatch` runs on each node).

Unlike bare torchrun it keeps the trainer's exit codes: 0 finished, 2 bad config or input (checked
here before any process starts), 75 stopped by a signal after a checkpoint (run again or requeue to
resume); torchrun itself turns every worker failure into 1. SIGTERM, SIGUSR1 and SIGINT sent to
this process are handed to the training processes, which checkpoint and stop; this process waits
for them (torchrun's own handling would kill them 30 s later, maybe in the middle of a save)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

from megamom.errors import EXIT_STOPPED  # (torch-free: a usage error here does not wait for torch)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # a prefix of a train option must not be taken for a launch option
    p.usage = "megamom launch [--nproc-per-node N] [multi-node options] [megamom train options and overrides]"
    p.epilog = ("every other argument goes to `megamom train` (e.g. --config configs/mom-340m.yaml "
                "train.out_dir=runs/x); exit codes are the trainer's: 0 finished, 2 bad config or input, "
                f"{EXIT_STOPPED} stopped after a checkpoint")
    p.add_argument("--nproc-per-node", default="auto",
                   help="training processes on this node: a number, or auto (one per visible GPU, 1 without GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: $SLURM_NODEID, else 0)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (needed with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None,
                   help="port on node 0 (needed with --nnodes > 1; one node picks a free one)")
    p.add_argument("--status-file", default=None,
                   help="write this node's outcome there as JSON ({node} is replaced by the node rank)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Launch options are ours; everything else is handed to `megamom train` unchanged."""
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    args.train_args = rest
    return args


class LaunchError(ValueError):
    pass


def positive(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise LaunchError(f"{name} {value!r}: give a number >= 1")
    return n


def nproc_from(value: str) -> int:
    if value == "auto":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    return positive("--nproc-per-node", value)


def check_train_args(train_args: list[str]):
    """Parse and validate what `megamom train` will get, once here rather than in every process."""
    from megamom.config import load_config
    from megamom.train.cli import add_arguments as add_train_arguments
    from megamom.train.cli import default_config_path

    p = argparse.ArgumentParser(prog="megamom train (via megamom launch)")
    add_train_arguments(p)
    targs = p.parse_intermixed_args(train_args)  # a bad option exits 2 with argparse's message
    return load_config(targs.config or default_config_path(), targs.overrides)  # ConfigError: exit 2


def torchrun_argv(nproc: int, nnodes: int, node_rank: int, addr, port, train_args: list[str]) -> list[str]:
    argv = [f"--nproc-per-node={nproc}", "--max-restarts=0",
            # SIGTERM / SIGUSR1 / SIGINT are ours (forwarded, then waited for); torchrun handles the rest
            "--signals-to-handle=SIGHUP,SIGQUIT"]
    if nnodes == 1 and port is None:
        argv.append("--standalone")  # a free port, chosen by torchrun at bind time (no race)
    else:
        # static rendezvous: node ranks as given, so global rank 0 is on node 0
        argv += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={addr or '127.0.0.1'}",
                 f"--master-port={port}", "--rdzv-backend=static"]
    return argv + ["--module", "megamom.cli", "train", *train_args]


def _children() -> list[int]:
    """Our direct child processes (the training processes torchrun started)."""
    me, kids = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                kids.append(int(d.name))
    return kids


def _forward(signum, frame) -> None:
    # Training processes run in sessions of their own (torchrun starts them so): a Ctrl-C or a
    # scheduler's signal to this process reaches them only this way.
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    print(f"megamom launch: {signal.Signals(signum).name} handed to the training processes; waiting for "
          "their checkpoint", file=sys.stderr, flush=True)


def exit_code(failures: dict) -> int:
    """One exit code for a node from its failed processes' (rank -> ProcessFailure)."""
    codes = sorted({f.exitcode for f in failures.values()})
    if codes in ([EXIT_STOPPED], [2]):
        return codes[0]
    # torchrun ends the others with SIGTERM once one process exits. A process exits 75 only after
    # the barrier that follows every rank's checkpoint, so the ones it ended were past their save.
    if set(codes) == {EXIT_STOPPED, -signal.SIGTERM}:
        return EXIT_STOPPED
    bad = next((c for c in codes if c not in (0, EXIT_STOPPED)), 1)
    return bad if bad > 0 else 128 - bad  # killed by signal N: 128 + N, as a shell reports it


def write_status(path: str, node_rank: int, code: int) -> None:
    p = Path(path.replace("{node}", str(node_rank)))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"node_rank": node_rank, "host": socket.gethostname(), "exit_code": code}) + "\n")
    os.replace(tmp, p)


def launch(args) -> int:
    nproc = nproc_from(args.nproc_per_node)
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes {args.nnodes} must be >= 1")
    node_rank = _node_rank(args)
    if not 0 <= node_rank < args.nnodes:
        raise LaunchError(f"node rank {node_rank} is not in [0, {args.nnodes}) (--node-rank / $SLURM_NODEID)")
    if args.nnodes > 1 and (not args.master_addr or args.master_port is None):
        raise LaunchError(f"--nnodes {args.nnodes} needs --master-addr and --master-port (node 0's address "
                          "and a free port there; launchers/slurm/train.sbatch sets them)")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise LaunchError(f"--master-port {args.master_port} is not a TCP port (1-65535)")
    check_train_args(args.train_args)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    targs = get_args_parser().parse_args(torchrun_argv(nproc, args.nnodes, node_rank, args.master_addr,
                                                       args.master_port, args.train_args))
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    try:
        torchrun(targs)
    except ChildFailedError as e:
        return exit_code(e.failures)
    return 0


def run(args) -> int:
    from megamom.config import ConfigError

    code = 1  # anything unforeseen (a rendezvous timeout, ...) is a failure, never a stop
    try:
        code = launch(args)
    except (LaunchError, ConfigError) as e:
        print(f"megamom launch: error: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:  # argparse's usage error in the train arguments (it printed why)
        code = e.code if isinstance(e.code, int) else 2
    finally:
        if args.status_file:
            write_status(args.status_file, _node_rank(args), code)
    return code


def _node_rank(args) -> int:
    return args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", "0"))
