"""Sequence parallelism through the CLI (torchrun, real DeepSpeed, real shards): SP=2 trains with the
losses of one process on the same global batch (routing statistics and balance loss of the whole
sequences), resumes bitwise after kill -9 and in one process with the same losses, and its checkpoint
consolidates to the one-process run's weights."""
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import losses, train  # noqa: E402

from megamom.train import checkpoint as ckpt  # noqa: E402


def assert_losses_close(want: dict, got: dict, steps, what: str) -> None:
    """Each step's loss within 1e-4 (relative) of the reference run's (fp32, sums in another order)."""
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-4 * abs(want[s]), f"step {s}: {what}: {want[s]} vs {got[s]}"


def assert_consolidates_to(run: Path, one: Path) -> None:
    """The run's step-4 checkpoint consolidates to the one-process run's weights (bounds: see the
    EP=2 run's test: four fp32 Adam steps on sums in another order)."""
    whole = ckpt.load_model_state_dict(run / "checkpoints" / "step_00000004")
    ref = ckpt.load_model_state_dict(one / "checkpoints" / "step_00000004")
    assert whole.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(whole[n], ref[n], rtol=0, atol=5e-3, msg=lambda m: f"{n}: {m}")
        assert (whole[n] - ref[n]).abs().mean() < 1e-5, n


def test_sp2_trains_like_one_process_resumes_exactly_and_consolidates(tmp_path, megamom_env, megamom_exe):
    one, straight, crashed, moved = (tmp_path / n for n in ("one", "straight", "crashed", "moved"))
    common = ["train.max_steps=4", "train.save_every=2", "train.zero_stage=2", "train.precision=fp32",
              "train.micro_batch_size=4", "model.aux_loss_coef=0.01", "model.z_loss_coef=0.001"]
    train(megamom_exe, megamom_env, one, *common)
    sp = [*common, "parallel.sequence=2"]
    r = train(megamom_exe, megamom_env, straight, *sp, "--sample-prompt=And God said", "--sample-tokens=4", nproc=2,
              timeout=400)
    assert "1 data-parallel x 2 sequence-parallel x 1 tensor-parallel ranks" in r.stderr + r.stdout
    assert r.stdout.count("sample: ") == 1, r.stdout[-2000:]
    a, b = losses(one), losses(straight)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert_losses_close(a, b, a, "1 process vs SP=2")

    env = dict(megamom_env, MEGAMOM_FAULT="ckpt_after_commit:2")  # SIGKILL right after saving step 2
    r = train(megamom_exe, env, crashed, *sp, nproc=2, check=False, timeout=400)
    assert r.returncode != 0 and max(losses(crashed)) == 2
    # the step-2 checkpoint resumed in one process: the optimizer state re-split, the losses go on
    shutil.copytree(crashed, moved)
    train(megamom_exe, megamom_env, moved, *common)
    m = losses(moved)
    assert_losses_close(b, m, (3, 4), "SP=2 vs resumed in one process")
    r = train(megamom_exe, megamom_env, crashed, *sp, nproc=2, timeout=400)
    assert "resumed from" in r.stderr + r.stdout
    c = losses(crashed)
    assert all(b[s] == c[s] for s in b), {s: (b[s], c[s]) for s in b if b[s] != c[s]}

    assert_consolidates_to(straight, one)


def test_sp2_with_ep2_trains_like_one_process_and_resumes_in_one(tmp_path, megamom_env, megamom_exe):
    # 4 ranks: DP 2 x SP 2, the memories over expert groups of the 2 data ranks of each slice. (The
    # balance loss is one micro-batch's, so it is off here, as in the EP=2 run's test.)
    one, straight, crashed = (tmp_path / n for n in ("one", "straight", "crashed"))
    common = ["train.max_steps=4", "train.save_every=2", "train.zero_stage=2", "train.precision=fp32",
              "model.aux_loss_coef=0", "model.z_loss_coef=0.001"]
    train(megamom_exe, megamom_env, one, *common, "train.micro_batch_size=8")
    both = [*common, "train.micro_batch_size=4", "parallel.sequence=2", "parallel.expert=2"]
    r = train(megamom_exe, megamom_env, straight, *both, nproc=4, timeout=600)
    assert "2 data-parallel x 2 sequence-parallel x 1 tensor-parallel ranks" in r.stderr + r.stdout
    assert "memories split over 2 expert-parallel ranks" in r.stderr + r.stdout
    a, b = losses(one), losses(straight)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert_losses_close(a, b, a, "1 process vs SP=2 x EP=2")

    env = dict(megamom_env, MEGAMOM_FAULT="ckpt_after_commit:2")  # SIGKILL right after saving step 2
    r = train(megamom_exe, env, crashed, *both, nproc=4, check=False, timeout=600)
    assert r.returncode != 0 and max(losses(crashed)) == 2
    # resumed in one process: memories and optimizer state joined over the expert and sequence ranks
    r = train(megamom_exe, megamom_env, crashed, *common, "train.micro_batch_size=8")
    assert "re-splitting weights and optimizer state" in r.stderr + r.stdout
    m = losses(crashed)
    assert_losses_close(b, m, (3, 4), "SP=2 x EP=2 vs resumed in one process")

    assert_consolidates_to(straight, one)
