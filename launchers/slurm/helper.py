"""`python -m megamom.launchers.slurm COMMAND`: what the batch scripts run.

  train [TRAIN ARGS]   in train.sbatch's batch step: one `megamom launch` per node through srun (or,
                       with MEGAMOM_LAUNCHER=srun, one `megamom train` per GPU), the stop signal
                       passed on, then the nodes' outcomes read back: all finished -> exit 0; all
                       stopped after their checkpoint -> `scontrol requeue` (MEGAMOM_REQUEUE=0: exit 0,
                       for chained jobs); anything else -> a failure, never requeued.
  task [TRAIN ARGS]    one training process of the srun launcher, its exit code recorded.
  hostfile             a DeepSpeed hostfile from $SLURM_JOB_NODELIST.
  submit-prep          the prep job array and its merge job, in one go.
  path NAME            where the installed train.sbatch / prep.sbatch is.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from megamom.errors import ConfigError
from megamom.launchers.cli import EXIT_STOPPED, LaunchError, positive
from megamom.launchers.hostlist import HostlistError, deepspeed_hostfile, expand

from . import script_path

LAUNCHERS = ("torchrun", "srun")


class SlurmError(ValueError):
    pass


def _env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name, "")
    return v if v.strip() else default


def _in_job() -> str:
    job = _env("SLURM_JOB_ID")
    if not job or not _env("SLURM_JOB_NODELIST"):
        raise SlurmError("not inside a Slurm job (no SLURM_JOB_ID / SLURM_JOB_NODELIST): submit the batch "
                         "script with sbatch, e.g. `sbatch launchers/slurm/train.sbatch --config ...`")
    return job


def node_addr(node: str) -> str:
    """The address Slurm reaches a node at (NodeAddr); node names do not always resolve."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return node
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


def gpus_on_node() -> int | None:
    """GPUs Slurm gave each node (SLURM_GPUS_ON_NODE, or the count in SLURM_GPUS_PER_NODE like gpu:a100:4)."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        v = _env(name)
        if v:
            tail = v.split(":")[-1].split("(")[0]
            if tail.isdigit() and int(tail) > 0:
                return int(tail)
    return None


def default_port(job_id: int, attempt: int) -> int:
    # Below Linux's ephemeral range (32768+); a requeued attempt takes the next port, since the
    # previous attempt's may still be held by a socket in TIME_WAIT.
    return 15000 + (job_id % 1000) * 16 + attempt % 16


def plan_train(train_args: list[str]) -> dict:
    """Everything the srun command needs, checked before any node does work."""
    job = _in_job()
    try:
        nodes = expand(os.environ["SLURM_JOB_NODELIST"])
    except HostlistError as e:
        raise SlurmError(str(e)) from None
    launcher = _env("MEGAMOM_LAUNCHER", "torchrun")
    if launcher not in LAUNCHERS:
        raise SlurmError(f"MEGAMOM_LAUNCHER={launcher!r}: use torchrun (one srun task per node, the default) "
                         "or srun (one srun task per GPU)")
    nproc = _env("MEGAMOM_NPROC_PER_NODE")
    nproc = positive("MEGAMOM_NPROC_PER_NODE", nproc) if nproc else (gpus_on_node() or 1)
    attempt = int(_env("SLURM_RESTART_COUNT", "0"))
    port = _env("MEGAMOM_MASTER_PORT")
    port = positive("MEGAMOM_MASTER_PORT", port) if port else default_port(int(job.split("_")[0]), attempt)
    name = _env("SLURM_JOB_NAME", "megamom")
    logs = Path(_env("MEGAMOM_LOG_DIR", f"logs/{name}-{job}")) / f"attempt{attempt}"
    return {"job": job, "nodes": nodes, "nnodes": len(nodes), "nproc": nproc, "launcher": launcher,
            "addr": _env("MEGAMOM_MASTER_ADDR") or node_addr(nodes[0]), "port": port,
            "attempt": attempt, "logs": logs, "cpus": _env("SLURM_CPUS_PER_TASK")}


def srun_command(plan: dict, train_args: list[str]) -> list[str]:
    nn, g = plan["nnodes"], plan["nproc"]
    srun = ["srun", f"--nodes={nn}", "--kill-on-bad-exit=1", "--open-mode=append"]
    if plan["cpus"]:  # since Slurm 22.05 srun does not take the job's --cpus-per-task by itself
        srun.append(f"--cpus-per-task={plan['cpus']}")
    logs, py = plan["logs"], sys.executable
    if plan["launcher"] == "torchrun":
        return srun + [f"--ntasks={nn}", "--ntasks-per-node=1", f"--output={logs}/node%n.log",
                       py, "-m", "megamom.cli", "launch", f"--nproc-per-node={g}", f"--nnodes={nn}",
                       f"--master-addr={plan['addr']}", f"--master-port={plan['port']}",
                       f"--status-file={logs}/node{{node}}.status", "--", *train_args]
    return srun + [f"--ntasks={nn * g}", f"--ntasks-per-node={g}", f"--output={logs}/task%t.log",
                   py, "-m", "megamom.launchers.slurm", "task", f"--status-file={logs}/task{{rank}}.status",
                   "--", *train_args]


def child_env(plan: dict) -> dict:
    env = dict(os.environ, MASTER_ADDR=plan["addr"], MASTER_PORT=str(plan["port"]), PYTHONUNBUFFERED="1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink SHARP needs fabric support many clusters lack
    if plan["cpus"]:  # a task's cores: shared by torchrun's processes, or one srun task's own
        share = plan["nproc"] if plan["launcher"] == "torchrun" else 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(plan["cpus"]) // share)))
    return env


def read_outcomes(plan: dict) -> dict[str, int | None]:
    """Exit code each node (or task) reported; None where it reported nothing (killed, died)."""
    if plan["launcher"] == "torchrun":
        names = [f"node{i}" for i in range(plan["nnodes"])]
    else:
        names = [f"task{i}" for i in range(plan["nnodes"] * plan["nproc"])]
    out = {}
    for n in names:
        try:
            out[n] = int(json.loads((plan["logs"] / f"{n}.status").read_text())["exit_code"])
        except (OSError, ValueError, KeyError):
            out[n] = None
    return out


TERMINATED = {-signal.SIGTERM, 128 + signal.SIGTERM}


def decide(outcomes: dict[str, int | None]) -> str:
    codes = set(outcomes.values())
    if codes == {0}:
        return "finished"
    # srun --kill-on-bad-exit ends the others with SIGTERM once one exits 75; a process exits 75 only
    # after the barrier that follows every rank's checkpoint, so the ones it ended were past theirs
    if EXIT_STOPPED in codes and codes <= {EXIT_STOPPED, *TERMINATED}:
        return "stopped"
    return "failed"


def train(train_args: list[str]) -> int:
    plan = plan_train(train_args)
    from megamom.launchers.cli import check_train_args

    check_train_args(train_args)  # bad config or arguments: exit 2 here, not once per node
    plan["logs"].mkdir(parents=True, exist_ok=True)
    for old in plan["logs"].glob("*.status"):  # a rerun of this attempt number must not read stale ones
        old.unlink()
    cmd = srun_command(plan, train_args)
    say(f"job {plan['job']} attempt {plan['attempt']}: {plan['nnodes']} node(s) x {plan['nproc']} process(es) "
        f"({plan['launcher']}), rendezvous {plan['addr']}:{plan['port']}, logs {plan['logs']}/")
    proc = subprocess.Popen(cmd, env=child_env(plan))

    def forward(signum, frame):
        # train.sbatch's --signal=B:USR1@N reaches this batch step only; srun hands it to every process
        # of the training step, and the trainers checkpoint and stop.
        if proc.poll() is not None:  # Slurm ending this attempt (a requeue under way): nothing to pass on
            return
        say(f"{signal.Signals(signum).name}: passing it to the training processes (they checkpoint, then stop)")
        proc.send_signal(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    rc = proc.wait()
    outcomes = read_outcomes(plan)
    what = decide(outcomes)
    say(f"srun exited {rc}; " + ", ".join(f"{n}: {'no status (died or killed)' if c is None else c}"
                                          for n, c in outcomes.items()))
    if what == "finished":
        say("finished")
        return 0
    if what == "failed":
        bad = next((c for c in outcomes.values() if c not in (None, 0, EXIT_STOPPED)), None)
        say(f"failed: not requeued; see the logs in {plan['logs']}/")
        return bad or rc or 1
    if _env("MEGAMOM_REQUEUE", "1") == "0":
        say("stopped after a checkpoint; MEGAMOM_REQUEUE=0: not requeued (a chained job resumes the run)")
        return 0
    say(f"stopped after a checkpoint: requeueing job {plan['job']} (it resumes from that checkpoint)")
    r = subprocess.run(["scontrol", "requeue", plan["job"]], capture_output=True, text=True)
    if r.returncode != 0:
        say(f"`scontrol requeue {plan['job']}` failed: {r.stderr.strip()}; resubmit the same command to resume")
        return EXIT_STOPPED
    return EXIT_STOPPED  # Slurm ends this attempt itself once the requeue is under way


def task(status_file: str, train_args: list[str]) -> int:
    """One `megamom train` process of the srun launcher (rank from SLURM_PROCID), its exit code
    recorded. Slurm signals every process of the step, the trainer included: nothing to pass on."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # torchrun's variables from Slurm's: streaming (the loader) picks each node's leader by
    # LOCAL_RANK / LOCAL_WORLD_SIZE, which bare srun does not set
    per_node = _env("SLURM_STEP_TASKS_PER_NODE", "1").split(",")[0].split("(")[0]
    env = dict(os.environ)
    for name, value in (("RANK", _env("SLURM_PROCID")), ("WORLD_SIZE", _env("SLURM_NTASKS")),
                        ("LOCAL_RANK", _env("SLURM_LOCALID")), ("LOCAL_WORLD_SIZE", per_node),
                        ("GROUP_RANK", _env("SLURM_NODEID"))):
        if value is not None:
            env.setdefault(name, value)
    rc = subprocess.call([sys.executable, "-m", "megamom.cli", "train", *train_args], env=env)
    rank = _env("SLURM_PROCID", "0")
    p = Path(status_file.replace("{rank}", rank))
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps({"rank": int(rank), "exit_code": rc}) + "\n")
    os.replace(tmp, p)
    return rc


def hostfile(slots: int | None, out: str | None) -> int:
    _in_job()
    slots = slots or gpus_on_node()
    if not slots:
        raise SlurmError("GPUs per node unknown (no SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE): pass --slots N")
    text = deepspeed_hostfile(expand(os.environ["SLURM_JOB_NODELIST"]), slots)
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def submit_prep(tasks: int, sbatch_args: list[str], prep_args: list[str]) -> int:
    """`sbatch --array=0-(N-1) prep.sbatch --tasks N ARGS`, then the merge job after it (afterany:
    the merge runs even when a task failed, and names the tasks to rerun)."""
    script = script_path("prep.sbatch")
    common = ["sbatch", "--parsable", *sbatch_args]
    args = [f"--tasks={tasks}", *prep_args]
    r = subprocess.run([*common, f"--array=0-{tasks - 1}", script, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmError(f"sbatch of the prep array failed: {r.stderr.strip()}")
    array = r.stdout.strip().split(";")[0]
    r = subprocess.run([*common, f"--dependency=afterany:{array}", "--output=%x-%j-merge.out", script, *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmError(f"sbatch of the merge job failed: {r.stderr.strip()} (the array {array} is submitted)")
    merge = r.stdout.strip().split(";")[0]
    print(f"prep array job {array} ({tasks} tasks), merge job {merge}")
    print(f"a failed task i is rerun alone with: sbatch --array=i {' '.join(map(shlex.quote, sbatch_args))} "
          f"{script} {' '.join(map(shlex.quote, args))}  (then the merge, the same way without --array)")
    return 0


def say(msg: str) -> None:
    print(f"megamom slurm: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megamom.launchers.slurm", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="run in train.sbatch's batch step (the rest: megamom train arguments)")
    t = sub.add_parser("task", help="one training process of the srun launcher")
    t.add_argument("--status-file", required=True)
    h = sub.add_parser("hostfile", help="DeepSpeed hostfile of this job's nodes")
    h.add_argument("--slots", type=int, default=None, help="processes per node (default: GPUs per node)")
    h.add_argument("--out", default=None, help="file to write (default: stdout)")
    s = sub.add_parser("submit-prep", help="submit the prep job array and its merge job")
    s.add_argument("--tasks", type=int, required=True, help="array tasks")
    s.add_argument("--sbatch-args", default="", help="extra sbatch options for both jobs (quoted, one string)")
    p = sub.add_parser("path", help="where an installed batch script is")
    p.add_argument("name", choices=("train.sbatch", "prep.sbatch"))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:  # everything after it is megamom train's, unparsed here
            return train(argv[1:])
        # train / prep arguments pass through in order; after `--` even those that look like ours
        cut = argv.index("--") if "--" in argv else len(argv)
        args, unknown = ap.parse_known_args(argv[:cut])
        rest = unknown + argv[cut + 1:]
        if args.cmd == "task":
            return task(args.status_file, rest)
        if args.cmd == "submit-prep":
            if args.tasks < 1:
                raise SlurmError(f"--tasks {args.tasks} must be >= 1")
            return submit_prep(args.tasks, shlex.split(args.sbatch_args), rest)
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "hostfile":
            return hostfile(args.slots, args.out)
        print(script_path(args.name))
        return 0
    except (SlurmError, HostlistError, LaunchError) as e:
        print(f"megamom slurm: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"megamom slurm: config error: {e}", file=sys.stderr)
        return 2
