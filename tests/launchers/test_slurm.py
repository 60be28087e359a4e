"""The Slurm launchers on a real Slurm (controller + two emulated nodes on this machine, CPU, gloo):
train.sbatch trains across 2 nodes and checkpoints; a preemption notice (the USR1 of
--signal=B:USR1@N) checkpoints, requeues, and the requeued job's losses continue the uninterrupted
run's exactly; a failure is not requeued; the prep job array, with a task that did not run and is
rerun alone, writes the dataset a single `megamom prep` writes."""
import gzip
import json
import shutil
import time
from pathlib import Path

import pytest

from megamom.assets import corpus_path
from megamom.launchers.hostlist import expand
from megamom.launchers.slurm import script_path

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16",
        "model.chunk_size=16", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
        "train.eval_every=0", "train.log_every=1", "--sample-prompt="]
STEPS = 24
# CPU nodes: no GPUs, one core per node for the node's one training process
CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def data(cluster, megamom_cache):
    """The default dataset where jobs see it, read as a remote (file://) through a node-local cache:
    nodes must not decompress shards into one shared directory at once."""
    src = megamom_cache / "default-data"
    dst = cluster.work / "data"
    shutil.copytree(src, dst)
    shards = next(dst.glob("kjv-*"))
    tok = next(dst.glob("tokenizer-*"))
    return [f"data.paths=[file://{shards}]", f"data.tokenizer={tok}", "data.cache_dir=/tmp/megamom-node-cache"]


def submit(cluster, *args, wait=False) -> str:
    r = cluster.run("sbatch", "--parsable", *(["--wait"] if wait else []), *args, timeout=400, check=not wait)
    return r.stdout.strip().split(";")[0]


def train_job(cluster, data, out: Path, *extra, wait=True, env=None):
    """Submit the shipped train.sbatch as a user would (only the #SBATCH lines set for CPU nodes)."""
    args = [f"--chdir={out.parent}", *CPU_NODES, script_path("train.sbatch"), *TINY, *data,
            f"train.out_dir={out}", f"train.max_steps={STEPS}", *extra]
    if env:
        args.insert(0, "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()))
    return submit(cluster, *args, wait=wait)


def losses(out: Path) -> dict:
    got = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train" and "loss" in rec:
            got[rec["step"]] = rec["loss"]
    return got


def status(logs: Path) -> dict:
    return {p.stem: json.loads(p.read_text())["exit_code"] for p in sorted(logs.glob("*.status"))}


@pytest.fixture(scope="module")
def straight(cluster, data):
    """The uninterrupted 2-node run, the reference of the preempted one."""
    work = cluster.work / "straight"
    work.mkdir()
    job = train_job(cluster, data, work / "out")
    return {"job": job, "work": work, "out": work / "out", "logs": work / "logs" / f"megamom-{job}"}


def test_node_list_expansion_matches_scontrol(cluster):
    lists = ["node[1-2]", "gpu[01-03,10],login1", "a[1-2]b[7,9]", "n[098-101]"]
    for nodelist in lists:
        want = cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        assert expand(nodelist) == want, nodelist
    out = cluster.work / "hostfile"
    submit(cluster, "-N2", f"--output={cluster.work}/hostfile.log", "--wrap",
           f"python3 -m megamom.launchers.slurm hostfile --slots 4 --out {out}", wait=True)
    assert out.read_text() == "node1 slots=4\nnode2 slots=4\n"


def test_two_node_training_checkpoints(straight):
    assert status(straight["logs"] / "attempt0") == {"node0": 0, "node1": 0}
    log = (straight["work"] / f"megamom-{straight['job']}.out").read_text()
    assert "2 node(s) x 1 process(es) (torchrun)" in log and "finished" in log and "requeue" not in log
    node0 = (straight["logs"] / "attempt0" / "node0.log").read_text()
    assert "2 data-parallel" in node0  # one world of the two nodes' processes
    got = losses(straight["out"])
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1] - 0.5
    ckpt = straight["out"] / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "COMPLETE.json").is_file()
    assert json.loads((straight["out"] / "checkpoints" / "latest").read_text())["step"] == STEPS


def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, data, straight):
    work = cluster.work / "preempted"
    work.mkdir()
    out = work / "out"
    job = train_job(cluster, data, out, wait=False)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    assert metrics.exists(), f"job {job} logged no step: {cluster.job_state(job)}"
    # what Slurm does --signal=B:USR1@N seconds before the time limit: USR1 to the batch step alone
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_gone(job, 300)
    logs = work / "logs" / f"megamom-{job}"
    log = (work / f"megamom-{job}.out").read_text()
    assert status(logs / "attempt0") == {"node0": 75, "node1": 75}, log
    assert status(logs / "attempt1") == {"node0": 0, "node1": 0}, log
    assert "requeueing job" in log and "attempt 1:" in log and "attempt 2:" not in log
    stop = int(next(l for l in (logs / "attempt1" / "node0.log").read_text().splitlines()
                    if "resumed from" in l).split("at step ")[1].split()[0])
    assert 3 <= stop < STEPS
    assert (out / "checkpoints" / f"step_{stop:08d}" / "COMPLETE.json").is_file()
    assert losses(out) == losses(straight["out"])  # every step, bit for bit


def test_bad_config_fails_before_srun_and_a_failure_is_not_requeued(cluster, data):
    work = cluster.work / "failing"
    work.mkdir()
    job = train_job(cluster, data, work / "bad", "model.hidden_sise=64")
    log = (work / f"megamom-{job}.out").read_text()
    assert "model.hidden_sise" in log and "hidden_size" in log and not (work / "logs").exists()
    # every step non-finite: the trainers abort (exit 1): a failure, reported, never requeued
    job = train_job(cluster, data, work / "nan", "train.max_nonfinite_in_row=1",
                    env={"MEGAMOM_FAULT": "nan_loss"})
    log = (work / f"megamom-{job}.out").read_text()
    codes = status(work / "logs" / f"megamom-{job}" / "attempt0")
    # the first node to fail ends the step (srun --kill-on-bad-exit): the other may report its kill
    assert 1 in codes.values() and 0 not in codes.values() and 75 not in codes.values(), log
    assert "failed: not requeued" in log and "attempt 1:" not in log


def test_prep_array_with_a_task_rerun_alone_equals_single_process_prep(cluster, megamom_cache):
    from megamom.data_prep import PrepSettings, prepare

    work = cluster.work / "prep"
    raw = work / "raw"
    raw.mkdir(parents=True)
    chapters = [json.loads(line)["text"] for line in gzip.open(corpus_path(), "rt", encoding="utf-8")]
    for i in range(40):  # 40 small files, grouped into units of ~60 kB
        (raw / f"c{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                    for t in chapters[i * 8:(i + 1) * 8]))
    tok = work / "tok"  # where the jobs see it
    shutil.copytree(next((megamom_cache / "default-data").glob("tokenizer-*")), tok)
    args = [str(raw), "--tokenizer", str(tok), "--seq-len", "128", "--val-fraction", "0.1",
            "--unit-size", "60000", "--tasks", "3"]
    ref = prepare([str(raw)], work / "ref", str(tok),
                  PrepSettings(seq_len=128, val_fraction=0.1, unit_bytes=60000), workers=1,
                  progress=False, log=lambda m: None)
    assert ref["units"] >= 6
    out = work / "out"
    sbatch = [f"--chdir={work}", "--cpus-per-task=1", script_path("prep.sbatch")]
    # tasks 0 and 2 run, task 1 does not (as if it failed): the merge refuses, naming it
    submit(cluster, "--array=0,2", *sbatch, *args, "--out", str(out), wait=True)
    merge = submit(cluster, *sbatch, *args, "--out", str(out), wait=True)
    merge_log = next(work.glob(f"megamom-prep-{merge}_*.out")).read_text()
    assert "array task(s) 1 of 3 failed or did not run" in merge_log and "--array=1" in merge_log
    assert not (out / "manifest.json").exists()
    # task 1 alone, then the merge: the dataset one process writes, byte for byte
    submit(cluster, "--array=1", *sbatch, *args, "--out", str(out), wait=True)
    submit(cluster, *sbatch, *args, "--out", str(out), wait=True)

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(out) == tree(work / "ref") and json.loads((out / "manifest.json").read_text()) == ref
    # the whole array and merge again, submitted in one go: nothing changes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = cluster.run("python3", "-m", "megamom.launchers.slurm", "submit-prep", "--tasks", "3",
                    "--sbatch-args", f"--chdir={work} --cpus-per-task=1", "--", *args[:-2], "--out", str(out))
    merge = r.stdout.split("merge job ")[1].split()[0]
    cluster.wait_gone(merge, 200)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert "complete already" in next(work.glob(f"megamom-prep-{merge}-merge.out")).read_text()
