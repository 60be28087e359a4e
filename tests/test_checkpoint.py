"""Checkpoints that know their run and their bytes: every file's size and hash in COMPLETE.json,
checked on load; a damaged or missing file is named and `--resume auto` falls back to the run's
previous checkpoint; a resume follows `latest` and its run id, never another run's checkpoints;
starting over in a used directory archives the earlier run; metrics.jsonl holds each step once."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamom.train import checkpoint as ckpt
from megamom.train import run_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY, losses, train  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("megamom-cache")
    from megamom.data import ensure_default_dataset
    ensure_default_dataset(cache / "default-data", seq_len=128)
    e = dict(os.environ, MEGAMOM_CACHE=str(cache), OMP_NUM_THREADS="1")
    e.pop("MEGAMOM_FAULT", None)
    return e


@pytest.fixture(scope="module")
def exe() -> str:
    return str(Path(sys.executable).parent / "megamom")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, env, exe) -> Path:
    """A finished run with checkpoints at steps 2 and 4 (read-only for the tests: copy it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train(exe, env, out, "train.max_steps=4", "train.save_every=2", "train.keep_last=3")
    return out


def copy_run(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(saved, dst)
    return dst


def optim_file(step_dir: Path) -> Path:
    return sorted(step_dir.glob("*optim_states.pt"))[0]


def model_file(step_dir: Path) -> Path:
    return ckpt.model_state_file(step_dir)


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_bytes(p: Path):
    """4 KB of random bytes inside the file, its size unchanged (what loaded silently before)."""
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = os.urandom(min(4096, len(data) - mid))
    p.write_bytes(bytes(data))


CORRUPTIONS = {  # name -> (file of a step directory, damage, what the message must say)
    "truncated model": (model_file, _truncate, "bytes"),
    "truncated optimizer": (optim_file, _truncate, "bytes"),
    "flipped optimizer bytes": (optim_file, _flip_bytes, "is damaged"),
    "garbled trainer state": (lambda d: d / ckpt.STATE, lambda p: p.write_text("{not json"), ckpt.STATE),
    "garbled marker": (lambda d: d / ckpt.MARKER, lambda p: p.write_text("{\"step\": 4, "), ckpt.MARKER),
    "missing rank state": (lambda d: d / "rank_00000.json", Path.unlink, "rank_00000.json is missing"),
}


def test_marker_lists_every_file_with_size_and_hash(saved):
    step = saved / "checkpoints" / "step_00000004"
    marker = json.loads((step / ckpt.MARKER).read_text())
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != ckpt.MARKER}
    assert set(marker["files"]) == on_disk and ckpt.STATE in on_disk and "rank_00000.json" in on_disk
    for name, entry in marker["files"].items():
        assert entry["size"] == (step / name).stat().st_size and len(entry[ckpt.HASH]) == 32
    latest = ckpt.read_latest(saved / "checkpoints")
    state = json.loads((step / ckpt.STATE).read_text())
    assert latest == {"checkpoint": "step_00000004", "run_id": marker["run_id"], "step": 4}
    assert state["run_id"] == marker["run_id"] and marker["run_id"]
    assert ckpt.verify_checkpoint(step)["step"] == 4


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_damage_is_named_and_resume_falls_back(name, saved, tmp_path):
    run = copy_run(saved, tmp_path)
    step4 = run / "checkpoints" / "step_00000004"
    pick, damage, said = CORRUPTIONS[name]
    target = pick(step4)
    damage(target)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify_checkpoint(step4)
    assert target.name in str(e.value) and said in str(e.value) and str(step4) in str(e.value)
    warnings = []
    assert ckpt.choose_resume(run / "checkpoints", warnings.append) == run / "checkpoints" / "step_00000002"
    assert len(warnings) == 1 and target.name in warnings[0] and "falling back" in warnings[0]
    # the weights readers (eval, convert) name the file too
    with pytest.raises(ckpt.CheckpointError, match=target.name.replace(".", r"\.")):
        ckpt.load_model_state_dict(step4)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    for step in ("step_00000002", "step_00000004"):
        _flip_bytes(optim_file(run / "checkpoints" / step))
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint to resume") as e:
        ckpt.choose_resume(run / "checkpoints", lambda msg: None)
    assert "step_00000002" in str(e.value) and "step_00000004" in str(e.value) and "--resume none" in str(e.value)


def test_resume_follows_latest_and_its_run_id(saved, tmp_path):
    """A newer complete checkpoint of another run (a foreign copy, a second run writing here) is
    not taken; neither is one past the step `latest` names."""
    run = copy_run(saved, tmp_path)
    root = run / "checkpoints"
    foreign = root / "step_00000009"
    shutil.copytree(root / "step_00000004", foreign)
    marker = json.loads((foreign / ckpt.MARKER).read_text())
    (foreign / ckpt.MARKER).write_text(json.dumps(dict(marker, run_id="another-run")))
    assert ckpt.choose_resume(root, lambda m: None) == root / "step_00000004"
    (root / ckpt.LATEST).write_text(json.dumps({"checkpoint": "step_00000002", "run_id": marker["run_id"],
                                                "step": 2}))
    assert ckpt.choose_resume(root, lambda m: None) == root / "step_00000002"
    (root / ckpt.LATEST).write_text("step_00000004\n")  # an older plain `latest`: any run, up to it
    assert ckpt.choose_resume(root, lambda m: None) == root / "step_00000004"


def test_leftovers_of_a_kill_are_removed_but_never_a_checkpoint(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    root = run / "checkpoints"
    (root / "step_00000001").mkdir()  # pruning removed its marker, then the kill came
    (root / "step_00000003").mkdir()
    (root / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (root / ".step_00000004.old-123").mkdir()
    assert sorted(ckpt.remove_leftovers(root)) == [".step_00000004.old-123", "step_00000001", "step_00000003"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]


def test_damaged_optimizer_falls_back_and_training_resumes_exactly(saved, tmp_path, env, exe):
    """End to end: 4 KB flipped in step 4's optimizer file; --resume auto warns naming it, resumes
    at step 2, and steps 3..6 equal a run that was never interrupted."""
    run = copy_run(saved, tmp_path)
    bad = optim_file(run / "checkpoints" / "step_00000004")
    _flip_bytes(bad)
    r = train(exe, env, run, "train.max_steps=6", "train.save_every=2", "train.keep_last=3")
    log = r.stdout + r.stderr
    assert bad.name in log and "falling back" in log and "at step 2" in log
    straight = tmp_path / "straight"
    train(exe, env, straight, "train.max_steps=6", "train.save_every=2")
    a, b = losses(straight), losses(run)
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in recs]
    assert len(keys) == len(set(keys)), "metrics.jsonl repeats a step"


def test_starting_over_archives_the_earlier_run_and_never_resumes_it(saved, tmp_path, env, exe):
    """--resume none into a used directory, then a crash before the new run's first checkpoint:
    --resume auto must start the new run again, not continue the old one (other learning rate)."""
    run = copy_run(saved, tmp_path)
    old_id = ckpt.read_latest(run / "checkpoints")["run_id"]
    crash = dict(env, MEGAMOM_FAULT="ckpt_before_commit:2")
    args = [exe, "train", *TINY, f"train.out_dir={run}", "train.max_steps=4", "train.save_every=2", "train.lr=1e-3"]
    r = subprocess.run([*args, "--resume", "none"], env=crash, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "held an earlier run" in r.stderr and f"archive/{old_id}" in r.stderr
    archived = run / "archive" / old_id
    assert (archived / "checkpoints" / "step_00000004" / ckpt.MARKER).is_file()
    assert (archived / "metrics.jsonl").is_file() and (archived / "tb").is_dir()
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" not in r.stderr + r.stdout  # nothing of the new run was saved: it starts again
    new_id = ckpt.read_latest(run / "checkpoints")["run_id"]
    assert new_id != old_id
    assert run_dir.previous_run_id(run) == new_id
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]  # no record of the old run
    assert all(r["lr"] <= 1e-3 for r in recs if "lr" in r)


def test_kill_during_pruning_leaves_an_unmarked_step_that_is_cleaned_up(tmp_path, env, exe):
    out = tmp_path / "run"
    crash = dict(env, MEGAMOM_FAULT="ckpt_during_prune:4")
    common = ["train.max_steps=4", "train.save_every=2", "train.keep_last=1"]
    r = train(exe, crash, out, *common, check=False)
    assert r.returncode != 0
    root = out / "checkpoints"
    assert (root / "step_00000002").is_dir() and not (root / "step_00000002" / ckpt.MARKER).exists()
    r = train(exe, env, out, *common)
    assert "removed what interrupted saves left" in r.stderr and "step_00000002" in r.stderr
    assert [p.name for p in root.iterdir() if p.name.startswith("step_")] == ["step_00000004"]


def test_a_checkpoint_from_before_the_shared_memory_parameters_is_refused_for_resume_only(saved, tmp_path):
    """Its shapes put the shared memory in the last row of k_proj, ...: a new run takes its weights
    (init_from: the shapes fit after the key mapping), a resume is refused with that fix named (its
    optimizer state follows the old layout)."""
    import torch
    from megamom.config import model_config_from_dict
    from megamom.model import build_model
    run = copy_run(saved, tmp_path)
    step = run / "checkpoints" / "step_00000004"
    f = ckpt.model_state_file(step)
    sd = torch.load(f, map_location="cpu", weights_only=True)
    groups = sd["param_shapes"]
    for group in groups:  # the layout of before: shared_<name> [P, d] folded into <name> [E + 1, P, d]
        for name in [n for n in group if n.rsplit(".", 1)[-1].startswith("shared_")]:
            prefix, leaf = name.rsplit(".", 1)
            stacked = f"{prefix}.{leaf[len('shared_'):]}"
            e = group[stacked][0] if stacked in group else 0
            group[stacked] = torch.Size((e + 1, *group.pop(name)))
    torch.save(sd, f)
    model = build_model(model_config_from_dict(ckpt.read_trainer_state(step)["config"]["model"]))
    ckpt.check_shapes(step, model)  # init_from: fits
    with pytest.raises(ckpt.CheckpointError, match="cannot be resumed") as e:
        ckpt.check_shapes(step, model, upgrade=False)
    assert f"train.init_from={step}" in str(e.value)
