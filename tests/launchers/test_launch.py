"""`megamom launch` (torchrun on one node, the trainer's exit codes kept) and the pieces of the
Slurm launcher that need no cluster: node lists, DeepSpeed hostfiles, bad input refused before any
process starts, the stop / failure / finish decision."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from megamom.launchers import cli as launch_cli
from megamom.launchers.hostlist import HostlistError, deepspeed_hostfile, expand
from megamom.launchers.slurm import helper, script_path
from megamom.train.cli import EXIT_STOPPED

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16",
        "model.chunk_size=16", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
        "train.eval_every=0", "train.log_every=1", "--sample-prompt="]


def test_node_lists_and_hostfile():
    assert expand("node[1-3,7],login1") == ["node1", "node2", "node3", "node7", "login1"]
    assert expand("gpu[08-11]") == ["gpu08", "gpu09", "gpu10", "gpu11"]
    assert expand("r[1-2]n[3,5]") == ["r1n3", "r1n5", "r2n3", "r2n5"]
    assert deepspeed_hostfile(["a", "b"], 8) == "a slots=8\nb slots=8\n"
    for bad, match in (("node[1-", "'\\[' without '\\]'"), ("n[3-1]", "runs backwards"), ("n[a-b]", "bad range"),
                       ("", "names no host")):
        with pytest.raises(HostlistError, match=match):
            expand(bad)


def test_stop_code_and_outcomes():
    assert helper.EXIT_STOPPED == launch_cli.EXIT_STOPPED == EXIT_STOPPED == 75

    def fail(*codes):
        return {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=c, error_file="") for r, c in enumerate(codes)}

    assert launch_cli.exit_code(fail(75, 75)) == 75
    assert launch_cli.exit_code(fail(2, 2)) == 2
    assert launch_cli.exit_code(fail(75, -15)) == 75  # torchrun's SIGTERM to the others after the first exit
    assert launch_cli.exit_code(fail(75, 1)) == 1  # a stop on one rank, a crash on another: a failure
    assert launch_cli.exit_code(fail(-15)) == 143
    assert launch_cli.exit_code(fail(-9)) == 137
    assert helper.decide({"node0": 75, "node1": 75}) == "stopped"
    assert helper.decide({"node0": 0, "node1": 0}) == "finished"
    assert helper.decide({"node0": 75, "node1": None}) == "failed"  # a node that died reported nothing
    assert helper.decide({"node0": 75, "node1": 1}) == "failed"
    assert helper.decide({"task0": 75, "task1": -15}) == "stopped"  # ended by srun after the other's stop
    assert helper.decide({"node0": 143, "node1": 143}) == "failed"  # nobody stopped after a checkpoint


def test_batch_scripts_ship_with_preemption_settings():
    text = Path(script_path("train.sbatch")).read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
        assert line in text
    assert 'exec "$PYTHON" -m megamom.launchers.slurm train "$@"' in text
    assert "--task \"$SLURM_ARRAY_TASK_ID\"" in Path(script_path("prep.sbatch")).read_text()


def run(exe, *args, env, timeout=120):
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_input_is_refused_before_any_process_starts(tmp_path, megamom_env, megamom_exe):
    out = tmp_path / "never"
    cases = [
        (["launch", "--nproc-per-node", "0", f"train.out_dir={out}"], "--nproc-per-node '0'"),
        (["launch", "--nnodes", "2", f"train.out_dir={out}"], "needs --master-addr and --master-port"),
        (["launch", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1234"],
         "node rank 2 is not in [0, 2)"),
        (["launch", "--nproc-per-node", "2", f"train.out_dir={out}", "model.num_memoirs=4"], "model.num_memories"),
    ]
    for args, message in cases:
        t = time.time()
        r = run(megamom_exe, *args, env=megamom_env)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
        assert time.time() - t < 60
    assert not out.exists()
    env = {k: v for k, v in megamom_env.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "megamom.launchers.slurm", "train"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr and "sbatch" in r.stderr


def test_launch_one_node_two_processes_stops_on_a_signal_to_it_alone(tmp_path, megamom_env, megamom_exe):
    """A signal to the launcher alone (the training processes run in sessions of their own) reaches
    the trainers: they checkpoint, and the launcher exits with their 75, not torchrun's 1. (That the
    same command then resumes exactly is the trainer's, tested with it and through Slurm.)"""
    out = tmp_path / "run"
    status = tmp_path / "status-{node}.json"
    cmd = [megamom_exe, "launch", "--nproc-per-node", "2", "--status-file", str(status), *TINY,
           f"train.out_dir={out}", "train.max_steps=100000"]
    p = subprocess.Popen(cmd, env=megamom_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == EXIT_STOPPED, stderr[-4000:]
    assert json.loads((tmp_path / "status-0.json").read_text())["exit_code"] == EXIT_STOPPED
    assert "2 data-parallel" in stderr and "stopped early by a signal" in stdout
    stop = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (out / "checkpoints" / f"step_{stop:08d}" / "COMPLETE.json").is_file()
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == stop
