"""Training engine end to end on CPU (real DeepSpeed, real streaming shards, real tensorboard):
ZeRO stages vs one process, exact resume after kill -9, kills during checkpoint saves, SIGTERM,
non-finite steps, bad input, logging read back, the default main job, eval."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# A small model on the default dataset (seq_len 128, so the session's shards are reused).
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.head_dim=16",
        "model.chunk_size=16", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
        "train.eval_every=0", "train.log_every=1", "--sample-prompt="]


def train(exe, env, out_dir, *overrides, nproc=1, check=True, timeout=600):
    args = ["train", *TINY, f"train.out_dir={out_dir}", *overrides]
    if nproc == 1:
        cmd = [exe, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megamom.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def losses(out_dir) -> dict:
    """step -> loss (the last record of a step wins: a resumed run replays steps after its checkpoint)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train" and "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_processes_match_one(stage, tmp_path, megamom_env, megamom_exe):
    """Same global batch (4 per rank x 2 ranks vs 8 in one process): same loss curve. The
    two-process run also prints the end-of-run sample, which every rank computes (ZeRO-3 gathers
    parameters from all ranks in each forward) and rank 0 alone prints."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = ["train.max_steps=4", f"train.zero_stage={stage}"]
    train(megamom_exe, megamom_env, one, *common, "train.micro_batch_size=8")
    r = train(megamom_exe, megamom_env, two, *common, "train.micro_batch_size=4", "--sample-prompt=And God said",
              "--sample-tokens=4", nproc=2, timeout=300)
    assert r.stdout.count("sample: ") == 1, r.stdout[-2000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), f"step {s}: 1 process {a[s]} vs 2 processes {b[s]}"
    assert a[4] < a[1]


@pytest.mark.parametrize("nproc,stage", [(1, 1), (2, 1), (2, 3)])
def test_exact_resume_after_kill_9(nproc, stage, tmp_path, megamom_env, megamom_exe):
    """2N steps straight == N steps, SIGKILL, resume to 2N: bitwise the same loss at every step
    (ZeRO-3 too: its partitioned parameters must pass the checkpoint's shape check)."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ["train.max_steps=6", "train.save_every=3", f"train.zero_stage={stage}"]
    train(megamom_exe, megamom_env, straight, *common, nproc=nproc)
    env = dict(megamom_env, MEGAMOM_FAULT="ckpt_after_commit:3")  # SIGKILL right after saving step 3
    r = train(megamom_exe, env, crashed, *common, nproc=nproc, check=False)
    assert r.returncode != 0
    assert (crashed / "checkpoints" / "step_00000003" / "COMPLETE.json").is_file()
    assert max(losses(crashed)) == 3
    r = train(megamom_exe, megamom_env, crashed, *common, nproc=nproc)
    assert "resumed from" in r.stderr + r.stdout
    a, b = losses(straight), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path, megamom_env, megamom_exe):
    out = tmp_path / "run"
    common = ["train.max_steps=6", "train.save_every=2"]
    env = dict(megamom_env, MEGAMOM_FAULT="ckpt_before_commit:4")  # killed while writing step 4
    r = train(megamom_exe, env, out, *common, check=False)
    assert r.returncode != 0
    root = out / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()  # the half-written save ...
    assert not (root / "step_00000004").exists()  # ... never looks complete
    assert json.loads((root / "latest").read_text())["checkpoint"] == "step_00000002"
    r = train(megamom_exe, megamom_env, out, *common)
    assert "resumed from" in r.stderr + r.stdout and "step_00000002" in r.stderr + r.stdout
    assert not (root / ".tmp-step_00000004").exists()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"][-3:] or \
        (root / "step_00000006" / "COMPLETE.json").is_file()
    straight = tmp_path / "straight"
    train(megamom_exe, megamom_env, straight, *common)
    assert losses(straight) == losses(out)


def _start_and_signal(out, env, exe, *signals, records=3):
    """Start a long run, wait for its first logged steps, send the signals; returns the process."""
    cmd = [exe, "train", *TINY, f"train.out_dir={out}", "train.max_steps=100000"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= records):
        time.sleep(0.2)
    for sig in signals:
        p.send_signal(sig)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_exits_75_and_resumes(sig, tmp_path, megamom_env, megamom_exe):
    """SIGTERM / SIGUSR1 (a scheduler's notice) and a first Ctrl-C: checkpoint, then exit 75 (not 0,
    which reads as finished), so a launcher requeues."""
    out = tmp_path / "run"
    p = _start_and_signal(out, megamom_env, megamom_exe, sig)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 75, stderr[-3000:]
    assert "stopped early by a signal (exit code 75)" in stdout
    step = max(losses(out))
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == f"step_{step:08d}" and (ckpts[-1] / "COMPLETE.json").is_file()
    r = train(megamom_exe, megamom_env, out, f"train.max_steps={step + 2}")
    assert f"at step {step}" in r.stderr + r.stdout
    assert max(losses(out)) == step + 2


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT asks for a checkpoint at the end of the step; a second one raises
    KeyboardInterrupt where the program is (signals coalesce when sent together, so this is
    checked on the handler itself rather than on a racing subprocess)."""
    from megamom.train.distributed import DistInfo
    from megamom.train.trainer import Trainer
    t = Trainer.__new__(Trainer)
    t._stop_signal, t.dist = None, DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        t._install_signal_handlers()
        signal.raise_signal(signal.SIGINT)
        assert t._stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, megamom_env, megamom_exe):
    """ZeRO-0 fp32 skips through AdamWSkipNonFinite; ZeRO-1 and ZeRO-0 bf16 through DeepSpeed's own
    optimizer wrappers (plain AdamW inside)."""
    out = tmp_path / "skip"
    env = dict(megamom_env, MEGAMOM_FAULT="nan_loss:2")
    for stage, precision in ((0, "fp32"), (1, "fp32"), (0, "bf16")):
        run_dir = out / f"{stage}-{precision}"
        train(megamom_exe, env, run_dir, "train.max_steps=4", f"train.zero_stage={stage}",
              f"train.precision={precision}")
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r.get("skipped")] == [2], f"ZeRO-{stage} {precision}"
        good = [r for r in recs if r["kind"] == "train" and "loss" in r and r["step"] != 2]
        assert all(isinstance(r["loss"], float) for r in good)  # parameters stayed finite
    env = dict(megamom_env, MEGAMOM_FAULT="nan_loss:2,3,4")
    r = train(megamom_exe, env, out / "abort", "train.max_steps=6", "train.max_nonfinite_in_row=3", check=False)
    assert r.returncode != 0
    assert "3 steps in a row had a non-finite loss or gradient" in r.stderr


def test_nonfinite_guard_only_where_deepspeed_has_none():
    """The per-step isfinite check (a host sync) only where DeepSpeed steps the optimizer directly."""
    import types

    import torch

    from megamom.train.optim import AdamWSkipNonFinite, build_optimizer, needs_nonfinite_guard

    assert needs_nonfinite_guard(0, "fp32")
    assert not any(needs_nonfinite_guard(0, p) for p in ("bf16", "fp16"))
    assert not any(needs_nonfinite_guard(s, p) for s in (1, 2, 3) for p in ("fp32", "bf16", "fp16"))
    p = torch.nn.Parameter(torch.zeros(2))
    t = types.SimpleNamespace(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1,
                              zero_stage=0)
    assert type(build_optimizer([{"params": [p]}], t, "fp32")) is AdamWSkipNonFinite
    assert type(build_optimizer([{"params": [p]}], t, "bf16")) is torch.optim.AdamW
    t.zero_stage = 1
    assert type(build_optimizer([{"params": [p]}], t, "fp32")) is torch.optim.AdamW


def test_stop_flag_needs_no_collective_or_sync_in_a_world_of_one():
    """One process: the stop flag is returned as is (a tensor on the meta device cannot be read back,
    so this fails if a tensor is made and .item() called)."""
    import torch

    from megamom.train.distributed import all_reduce_max_flag

    assert all_reduce_max_flag(True, torch.device("meta")) is True
    assert all_reduce_max_flag(False, torch.device("meta")) is False


def test_stop_signal_right_after_a_periodic_save_saves_once(tmp_path, megamom_env, megamom_exe):
    """Preempted right after the periodic save of step 2: the run stops without saving step 2 again."""
    out = tmp_path / "run"
    env = dict(megamom_env, MEGAMOM_FAULT="signal_after_save:2")
    r = train(megamom_exe, env, out, "train.max_steps=50", "train.save_every=2", check=False)
    assert r.returncode == 75 and "stopped early by a signal" in r.stdout, r.stderr[-3000:]
    assert max(losses(out)) == 2
    saves = [line for line in r.stderr.splitlines() if "saved checkpoint" in line]
    assert len(saves) == 1 and saves[0].endswith("step_00000002"), saves
    assert f"checkpoint: {out / 'checkpoints' / 'step_00000002'}" in r.stdout
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()


def test_eval_uses_the_training_data_config(tmp_path, megamom_env, megamom_exe):
    """`megamom eval` reads the data the way training did (here: reset_at_doc_boundaries=false), so
    it reproduces the training run's own val loss on the same batches."""
    out = tmp_path / "nodocreset"
    train(megamom_exe, megamom_env, out, "train.max_steps=1", "train.warmup_steps=1", "data.reset_at_doc_boundaries=false",
          "train.eval_steps=1000")  # the whole val split: few of its rows hold a document boundary
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == "val"]
    ckpt = out / "checkpoints" / "step_00000001"
    data = json.loads((ckpt / "trainer_state.json").read_text())["config"]["data"]["paths"]
    r = subprocess.run([megamom_exe, "eval", "--checkpoint", str(ckpt), "--data", *data, "--batch-size", "4"],
                       env=megamom_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] == val[-1]["val_tokens"]
    assert abs(res["loss"] - val[-1]["val_loss"]) < 1e-5 * val[-1]["val_loss"], (res, val[-1])


def test_eval_data_config_comes_from_the_checkpoint():
    """Only the paths come from the command line; the rest is the training run's data config."""
    from megamom.config import DataConfig
    from megamom.train.eval_cli import _data_config

    saved = dict(vars(DataConfig(paths=["/train/a"], seq_len=64, reset_at_doc_boundaries=False,
                                 shuffle_algo="py1s", num_canonical_nodes=2, weights=[1.0], tokenizer="/tok")))
    saved["removed_in_a_later_version"] = 1
    cfg = _data_config({"config": {"data": saved}, "tokenizer": {"path": "/tok"}}, ["/eval/a"])
    assert cfg.paths == ["/eval/a"] and cfg.seq_len == 64 and cfg.reset_at_doc_boundaries is False
    assert cfg.shuffle_algo == "py1s" and cfg.num_canonical_nodes == 2 and cfg.weights == [1.0]
    assert cfg.tokenizer == "/tok"
    assert _data_config({"config": {"data": saved}}, ["/x", "/y"]).weights is None  # no longer one per path


def test_tensorboard_and_jsonl_read_back(tmp_path, megamom_env, megamom_exe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    train(megamom_exe, megamom_env, out, "train.max_steps=3", "train.eval_every=2", "train.eval_steps=2")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/achieved_tflops", "train/peak_rss_gib",
                "train/router/layer0/mem0", "train/router/layer1/aux", "val/val_loss", "val/val_ppl"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    jl = losses(out)
    assert [round(e.value, 5) for e in acc.Scalars("train/loss")] == [round(jl[s], 5) for s in (1, 2, 3)]
    fractions = [acc.Scalars(f"train/router/layer0/mem{e}")[-1].value for e in range(4)]
    assert abs(sum(fractions) - 1) < 1e-5
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] < lr[1]  # warmup


def test_bad_input_errors_before_work(tmp_path, megamom_env, megamom_exe):
    def fails(*overrides, resume=None):
        args = [megamom_exe, "train", *TINY, f"train.out_dir={tmp_path / 'bad'}", *overrides]
        if resume:
            args += ["--resume", resume]
        r = subprocess.run(args, env=megamom_env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        return r.stderr
    assert "train.global_batch_size=10 is not divisible" in fails("train.global_batch_size=10")
    assert "needs grad_accum=2" in fails("train.global_batch_size=8", "train.grad_accum=3")
    assert "fewer than one optimizer step" in fails("train.micro_batch_size=100000")
    assert "needs a CUDA device" in fails("train.cuda_graph=true", "train.zero_stage=0",
                                          "data.reset_at_doc_boundaries=false")
    assert "does not exist" in fails(resume=str(tmp_path / "nope"))
    # a checkpoint of another model: refused (names the keys), or with the override, names tensors
    good = tmp_path / "good"
    train(megamom_exe, megamom_env, good, "train.max_steps=1", "train.warmup_steps=1")
    ckpt = str(good / "checkpoints" / "step_00000001")
    err = fails("model.num_memories=8", resume=ckpt)
    assert "different model config" in err and "model.num_memories: checkpoint 4 vs config 8" in err
    err = fails("model.num_memories=8", "train.allow_config_change_on_resume=true", resume=ckpt)
    assert "does not fit the model" in err and "model.layers.0.attn.k_proj" in err
    assert "--resume" in fails(resume=str(tmp_path / "nope")) and "auto" in fails(resume=str(tmp_path / "nope"))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = fails(f"train.out_dir={a_file / 'run'}")
    assert f"train.out_dir={str(a_file / 'run')!r} is not writable" in err and "Traceback" not in err
    incomplete = tmp_path / "good" / "checkpoints" / "step_00000001"
    (incomplete / "COMPLETE.json").unlink()
    assert "is incomplete" in fails(resume=ckpt)


def test_training_on_data_without_a_validation_split(tmp_path, megamom_env, megamom_exe, megamom_cache):
    """Evaluation is skipped with one warning (it used to exit 2 at the first evaluation, after
    saving, and again on every resume)."""
    from megamom.data import ensure_default_dataset
    data = ensure_default_dataset(megamom_cache / "default-data", seq_len=128, val_fraction=0.0)
    assert not data.manifest["splits"].get("val")
    args = [f"data.paths=[{data.paths[0]}]", f"data.tokenizer={data.tokenizer_path}", "train.eval_every=2",
            "train.save_every=2"]
    out = tmp_path / "run"
    r = train(megamom_exe, megamom_env, out, "train.max_steps=4", *args)
    assert r.stderr.count("no validation split") == 1 and "--val-fraction" in r.stderr
    assert "val loss" not in r.stdout and (out / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file()
    r = train(megamom_exe, megamom_env, out, "train.max_steps=6", *args)
    assert "at step 4" in r.stderr and max(losses(out)) == 6


def test_default_main_job_and_eval(tmp_path, megamom_env, megamom_exe):
    """`megamom train` with no arguments (shortened) builds/reuses the data, trains, evaluates,
    checkpoints and prints a sample; `megamom eval` reads the checkpoint back."""
    env = dict(megamom_env)
    r = subprocess.run([megamom_exe, "train", "train.max_steps=20", "train.warmup_steps=10",
                        f"train.out_dir={tmp_path / 'main'}"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val ppl" in r.stdout and "sample: " in r.stdout
    ckpt = tmp_path / "main" / "checkpoints" / "step_00000020"
    assert (ckpt / "COMPLETE.json").is_file()
    val = [json.loads(x) for x in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "val"]
    assert val and val[-1]["val_ppl"] < 4096  # better than uniform over the vocabulary
    data_dir = json.loads((ckpt / "trainer_state.json").read_text())["config"]["data"]["paths"][0]
    r = subprocess.run([megamom_exe, "eval", "--checkpoint", str(ckpt), "--data", data_dir, "--max-batches", "4"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["step"] == 20 and res["tokens"] > 0 and abs(res["ppl"] - pow(2.718281828459045, res["loss"])) < 1e-3 * res["ppl"]


def test_deepspeed_launcher(tmp_path, megamom_env):
    """`deepspeed --num_gpus 2 --module megamom.cli train ...` (it inserts --local_rank=N)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    launcher = str(Path(sys.executable).parent / "deepspeed")
    r = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "megamom.cli", "train",
                        *TINY, f"train.out_dir={out}", "train.max_steps=2"],
                       env=megamom_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2]
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_init_from_starts_a_new_run_from_weights(tmp_path, megamom_env, megamom_exe):
    """train.init_from loads a checkpoint's weights into a fresh run (any ZeRO stage); a
    weights-only checkpoint (convert from-hf) cannot be resumed, only started from."""
    src = tmp_path / "src"
    train(megamom_exe, megamom_env, src, "train.max_steps=3", "train.zero_stage=2")
    ckpt = src / "checkpoints" / "step_00000003"
    new = tmp_path / "new"
    # lr 1e-12: the one step leaves the weights as loaded, so both evaluate the same
    train(megamom_exe, megamom_env, new, "train.max_steps=1", f"train.init_from={ckpt}", "train.lr=1e-12",
          "train.warmup_steps=0", "train.zero_stage=1")
    data = json.loads((ckpt / "trainer_state.json").read_text())["config"]["data"]["paths"][0]

    def evaluate(c):
        r = subprocess.run([megamom_exe, "eval", "--checkpoint", str(c), "--data", data, "--max-batches", "2"],
                           env=megamom_env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])["loss"]
    assert abs(evaluate(ckpt) - evaluate(new / "checkpoints" / "step_00000001")) < 1e-6
    err = subprocess.run([megamom_exe, "train", *TINY, f"train.out_dir={tmp_path / 'x'}", "model.num_memories=3",
                          f"train.init_from={ckpt}"], env=megamom_env, capture_output=True, text=True, timeout=300)
    assert err.returncode != 0 and "model.num_memories: checkpoint 4 vs config 3" in err.stderr
    hf, back = tmp_path / "hf", tmp_path / "back"
    for args in (["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(hf)],
                 ["convert", "from-hf", "--model", str(hf), "--out", str(back)]):
        r = subprocess.run([megamom_exe, *args], env=megamom_env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([megamom_exe, "train", *TINY, f"train.out_dir={tmp_path / 'y'}", "--resume", str(back)],
                       env=megamom_env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "cannot be resumed" in r.stderr and "train.init_from" in r.stderr


def test_resume_ignores_implementation_only_model_keys():
    """A checkpoint written before a model setting that only picks an implementation existed (or
    with another kernel choice) still resumes; a real architecture change is named."""
    import dataclasses

    from megamom.config import Config
    from megamom.train.trainer import Trainer

    t = Trainer.__new__(Trainer)  # only the config is needed for the comparison
    t.cfg = Config()
    saved = dataclasses.asdict(t.cfg.model)
    del saved["loss_chunk_size"]
    saved.update(kernel_backend="torch", attn_impl="sdpa")
    assert t._model_config_diff({"config": {"model": saved}}) == []
    saved["num_memories"] = 8
    assert t._model_config_diff({"config": {"model": saved}}) == [
        f"model.num_memories: checkpoint 8 vs config {t.cfg.model.num_memories}"]


def test_cuda_graph_setup_is_checked_before_work():
    """train.cuda_graph needs a CUDA device and refuses fp16 (untested); the config refuses ZeRO-3
    (parameters move between steps) before any work; ZeRO-0, 1 and 2 in bf16 and fp32 pass
    (tests/gpu/test_cuda_graph_gpu.py)."""
    from megamom.config import Config, ConfigError, TrainConfig
    from megamom.train.cuda_graph import check_setup
    t = TrainConfig(cuda_graph=True, zero_stage=0)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_setup(t, torch.device("cpu"), "fp32")
    for stage in (0, 1, 2, 3):
        cfg = Config()
        cfg.train.cuda_graph, cfg.train.zero_stage, cfg.data.reset_at_doc_boundaries = True, stage, False
        if stage < 3:
            cfg.validate()
            for precision in ("fp32", "bf16"):
                check_setup(TrainConfig(cuda_graph=True, zero_stage=stage), torch.device("cuda"), precision)
            continue
        with pytest.raises(ConfigError, match="train.zero_stage=3 .*use train.zero_stage=0, 1 or 2"):
            cfg.validate()
    with pytest.raises(ConfigError, match="not tested with train.precision=fp16"):
        check_setup(TrainConfig(cuda_graph=True, zero_stage=0), torch.device("cuda"), "fp16")
    check_setup(TrainConfig(zero_stage=1), torch.device("cpu"), "bf16")  # graphs off: nothing to check


def test_graphed_gradients_that_hold_the_graph_buffers_are_copied_out_before_a_replay():
    """GraphedLoss lets autograd keep the backward graph's gradient buffers as .grad (no copy per
    gradient) and copies out, before the next replay would overwrite it, each .grad that still is one
    of them: accumulated or zeroed-in-place gradients keep their values, other gradients are left
    alone. The replays themselves run on the GPU (tests/gpu/test_cuda_graph_gpu.py); this is the
    bookkeeping, on CPU tensors standing for the graph's buffers."""
    from torch import nn

    from megamom.train.cuda_graph import GraphedLoss
    model = nn.Linear(4, 3)
    g = GraphedLoss(model)
    g._hooks = [p.register_hook(g._note_buffer) for p in model.parameters()]  # as the capture leaves them
    buffers = [torch.randn(3, 4), torch.randn(3)]
    model.weight.backward(buffers[0])  # a backward over a subset: the hooks stay for the rest
    g._release_grads()
    assert len(g._hooks) == 2
    for p, b in zip(model.parameters(), buffers):  # a replay's backward hands out its buffers
        p.backward(b)
    assert g._grad_buffers == {b.data_ptr() for b in buffers}
    for p in model.parameters():
        p.grad = None
    model.weight.grad = buffers[0]  # as autograd leaves them after a replay (.grad was None)
    own_bias_grad = torch.randn(3)
    model.bias.grad = own_bias_grad  # not a graph buffer (e.g. copied out before)
    g._release_grads()
    assert model.weight.grad.data_ptr() != buffers[0].data_ptr() and torch.equal(model.weight.grad, buffers[0])
    assert model.bias.grad is own_bias_grad
    assert not g._hooks  # the buffers are noted: no hook runs on later backwards
    model.weight.backward(torch.randn(3, 4))
    assert len(g._grad_buffers) == 2
    buffers[0].fill_(7.0)  # the next replay overwrites its buffer: the caller's gradient keeps its values
    assert not torch.equal(model.weight.grad, buffers[0])
    model.weight.grad = buffers[0]
    g.close()  # closing hands back no graph buffer as a gradient either
    assert model.weight.grad.data_ptr() != buffers[0].data_ptr() and not g._grad_buffers


def test_the_papers_recipe_trains_through_the_main_path(tmp_path, megamom_env, megamom_exe):
    """configs/mom-340m-paper.yaml (the authors' balance-loss form, init, no resets) at a tiny width
    on the shipped corpus: it trains, its losses fall, and the run records the recipe."""
    import yaml
    cfg = Path(__file__).resolve().parents[1] / "configs" / "mom-340m-paper.yaml"
    out = tmp_path / "paper"
    train(megamom_exe, megamom_env, out, "--config", str(cfg), "data.seq_len=128", "train.max_steps=6",
          "train.global_batch_size=4", "model.num_layers=2", "train.save_every=0")
    got = losses(out)
    assert sorted(got) == list(range(1, 7)) and all(v == v for v in got.values())
    assert got[6] < got[1]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["aux_loss_form"] == "paper" and saved["model"]["rescale_residual_init"] is True
    assert saved["data"]["reset_at_doc_boundaries"] is False
