"""Tensor parallelism through the CLI (torchrun, real DeepSpeed, real shards): TP=2 trains with the
losses of one process, resumes bitwise after kill -9, and its checkpoint consolidates to the
single-process weights (convert / eval read it; a new run at another TP size starts from it)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import losses, train  # noqa: E402

from megamom.train import checkpoint as ckpt  # noqa: E402


def test_tp2_trains_like_one_process_and_consolidates_to_its_weights(tmp_path, megamom_env, megamom_exe):
    one, tp = tmp_path / "one", tmp_path / "tp"
    common = ["train.max_steps=3", "train.zero_stage=1", "train.precision=fp32"]
    train(megamom_exe, megamom_env, one, *common)
    r = train(megamom_exe, megamom_env, tp, *common, "parallel.tensor=2", "--sample-prompt=And God said",
              "--sample-tokens=4", nproc=2, timeout=400)
    assert "1 data-parallel x 1 sequence-parallel x 2 tensor-parallel ranks" in r.stderr + r.stdout
    assert r.stdout.count("sample: ") == 1, r.stdout[-2000:]
    a, b = losses(one), losses(tp)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), f"step {s}: 1 process {a[s]} vs TP=2 {b[s]}"
    final = tp / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in final.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    whole, ref = ckpt.load_model_state_dict(final), ckpt.load_model_state_dict(one / "checkpoints" / "step_00000003")
    assert whole.keys() == ref.keys()
    for n in ref:
        assert whole[n].shape == ref[n].shape, n
        # (three fp32 Adam steps: an element with a near-zero gradient may differ by ~lr x 1e-3; a shard
        # in the wrong place would differ by the weights' own size, ~1e-2)
        torch.testing.assert_close(whole[n], ref[n], rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_tp2_exact_resume_after_kill_9_then_a_tp1_run_from_its_weights(tmp_path, megamom_env, megamom_exe):
    straight, crashed, again = tmp_path / "straight", tmp_path / "crashed", tmp_path / "tp1"
    common = ["train.max_steps=4", "train.save_every=2", "train.zero_stage=0", "parallel.tensor=2"]
    train(megamom_exe, megamom_env, straight, *common, nproc=2)
    env = dict(megamom_env, MEGAMOM_FAULT="ckpt_after_commit:2")  # SIGKILL right after saving step 2
    r = train(megamom_exe, env, crashed, *common, nproc=2, check=False)
    assert r.returncode != 0 and max(losses(crashed)) == 2
    # ZeRO-0 keeps no re-splittable optimizer state: a resume at another tensor size is refused before
    # any work, with the ways out
    r = train(megamom_exe, megamom_env, crashed, *common[:-1], check=False)
    assert r.returncode == 2 and "at parallel.tensor=2" in r.stderr and "train.init_from=" in r.stderr
    r = train(megamom_exe, megamom_env, crashed, *common, nproc=2)
    assert "resumed from" in r.stderr + r.stdout
    a, b = losses(straight), losses(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    # weights resharded on load: a TP=1 run from the TP=2 checkpoint starts where it ended
    start = crashed / "checkpoints" / "step_00000004"
    train(megamom_exe, megamom_env, again, "train.max_steps=1", "train.warmup_steps=0", "train.zero_stage=0",
          "train.lr=1e-12", "train.weight_decay=0", f"train.init_from={start}")
    moved = ckpt.load_model_state_dict(again / "checkpoints" / "step_00000001")
    for n, t in ckpt.load_model_state_dict(start).items():  # (one Adam step of 1e-12 apart)
        torch.testing.assert_close(moved[n], t, rtol=0, atol=1e-10, msg=lambda m: f"{n}: {m}")


def test_a_zero1_tp2_run_resumes_at_tp1_on_two_data_ranks(tmp_path, megamom_env, megamom_exe):
    """Weights and optimizer state re-split through DeepSpeed's universal checkpoint: the steps after
    the resume at DP=2 x TP=1 continue the TP=2 run's losses (fp32: to 1e-4)."""
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    common = ["train.max_steps=4", "train.save_every=2", "train.zero_stage=1", "train.precision=fp32"]
    train(megamom_exe, megamom_env, straight, *common, "parallel.tensor=2", nproc=2)
    train(megamom_exe, megamom_env, moved, *common[1:], "train.max_steps=2", "parallel.tensor=2", nproc=2)
    r = train(megamom_exe, megamom_env, moved, *common, "train.micro_batch_size=2", nproc=2)
    assert "re-splitting weights and optimizer state" in r.stderr + r.stdout
    assert not (moved / "universal").exists()  # the conversion is removed once loaded
    a, b = losses(straight), losses(moved)
    assert sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), f"step {s}: TP=2 {a[s]} vs resumed at TP=1 {b[s]}"
