"""Multi-query associative recall (megamom.data.mqar): the examples are what the task says (pairs,
every key queried once, answers labelled and nothing else), reproducible, refused with the setting to
change when they cannot be built; the accuracy counts the answers only; `megamom eval --task mqar`."""
import json
import sys
from pathlib import Path

import pytest
import torch

from megamom.data.mqar import check_mqar, mqar_accuracy, mqar_batch
from megamom.model.loss import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_user_errors import cli, made  # noqa: E402, F401  (the fixture: a checkpoint of a tiny model)


@pytest.mark.parametrize("pairs,T", [(1, 8), (4, 64), (16, 64), (8, 255)])
def test_every_key_is_queried_once_and_only_its_answer_is_labelled(pairs, T):
    V = 64
    b = mqar_batch(16, pairs, T, V, seed=3)
    assert b.input_ids.shape == b.labels.shape == (16, T)
    seq = torch.cat([b.input_ids, b.labels.clamp(min=0)[:, -1:]], 1)  # (the last token when it is an answer)
    for n in range(16):
        ids, labels = b.input_ids[n], b.labels[n]
        keys, values = ids[0:2 * pairs:2], ids[1:2 * pairs:2]
        assert (keys >= 1).all() and (keys < V // 2).all() and (values >= V // 2).all()
        assert len(set(keys.tolist())) == len(set(values.tolist())) == pairs
        pair = dict(zip(keys.tolist(), values.tolist()))
        asked = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        assert len(asked) == pairs and (asked >= 2 * pairs).all()
        assert sorted(ids[asked].tolist()) == sorted(keys.tolist())  # each key once
        for t in asked.tolist():
            assert labels[t].item() == pair[ids[t].item()]  # its value
            if t + 1 < T:
                assert ids[t + 1].item() == labels[t].item()  # and the value follows the query
        assert seq.shape[1] == T + 1


def test_examples_are_reproducible_and_seeds_differ():
    a, b, c = (mqar_batch(8, 4, 32, 64, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_queries_spread_by_the_power_law_mostly_near_the_pairs():
    b = mqar_batch(200, 4, 512, 64, seed=0)
    first = (b.labels != IGNORE_INDEX).float().argmax(1)  # the first query of each example
    assert first.float().median() < 64 < first.max()  # most soon after the pairs, some far


@pytest.mark.parametrize("args,fragment", [((0, 16, 64), "at least one"), ((8, 16, 64), "use seq_len >= 31"),
                                           ((8, 64, 16), "use vocab_size >= 18")])
def test_impossible_tasks_name_the_setting_to_change(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_mqar(*args)


class Oracle(torch.nn.Module):
    """Reads the pairs and answers each query (or always a wrong token): accuracy 1 (or 0)."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, return_logits=True):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for n in range(B):
            pair = {}
            for t in range(T):
                if t % 2 == 0 and t + 1 < T and ids[n, t].item() not in pair and len(pair) < 4:
                    pair[ids[n, t].item()] = ids[n, t + 1].item()
                answer = pair.get(ids[n, t].item(), 0)
                logits[n, t, 0 if self.wrong else answer] = 1.0
        return type("Out", (), {"logits": logits})()


def test_accuracy_counts_the_answers_only():
    b = mqar_batch(6, 4, 40, 64, seed=0)
    assert mqar_accuracy(Oracle(64), b, batch_size=4) == 1.0
    assert mqar_accuracy(Oracle(64, wrong=True), b) == 0.0


def test_eval_task_mqar_reports_accuracy_per_number_of_pairs(made, capsys):  # noqa: F811
    code, stdout, stderr = cli(capsys, "eval", "--checkpoint", made["run"], "--task", "mqar", "--num-pairs", "2",
                               "4", "--seq-len", "32", "--examples", "8")
    assert code == 0, stderr
    res = json.loads(stdout)
    assert res["task"] == "mqar" and set(res["accuracy"]) == {"2", "4"}
    assert all(0.0 <= a <= 0.2 for a in res["accuracy"].values())  # an untrained model: about chance
    code, stdout, stderr = cli(capsys, "eval", "--checkpoint", made["run"], "--task", "mqar", "--num-pairs", "20",
                               "--seq-len", "32")
    assert (code, stdout) == (2, "") and "use seq_len >= 79" in stderr
    code, _, stderr = cli(capsys, "eval", "--checkpoint", made["run"], "--task", "mqar", "--data", made["data"])
    assert code == 2 and "drop --data" in stderr


# ------------------------------------------------------------------------------ MQAR as a training dataset
def test_prep_mqar_writes_shards_whose_labels_are_the_answers_only(tmp_path, capsys):
    from megamom.config import DataConfig
    from megamom.data.loader import build_loader
    from megamom.data_prep import read_manifest
    out = tmp_path / "mqar"
    code, stdout, stderr = cli(capsys, "prep-mqar", "--out", out, "--vocab", "64", "--seq-len", "32", "--pairs", "2",
                               "4", "--train-examples", "40", "--val-examples", "8")
    assert code == 0, stderr
    assert "data.tokenizer=ids:64" in stdout
    m = read_manifest(out)
    assert m["tokenizer"]["path"] == "ids:64" and m["seq_len"] == 32
    docs = m["counts"]["documents"]
    assert docs["read"] == docs["written"] == 48 and docs["rejected"] == {}
    assert [m["counts"]["splits"][s]["samples"] for s in ("train", "val")] == [40, 8]
    loader = build_loader(DataConfig(paths=[str(out)], seq_len=32, tokenizer="ids:64"), split="train",
                          micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
    answers = {2: 0, 4: 0}
    batches = iter(loader)
    for _ in range(5):  # one epoch: every example once
        batch = next(batches)
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape == (8, 32) and "segment_ids" not in batch
        for n in range(8):
            asked = (labels[n] != IGNORE_INDEX).nonzero().squeeze(1)
            pairs = len(asked)
            answers[pairs] += 1
            pair = dict(zip(ids[n, 0:2 * pairs:2].tolist(), ids[n, 1:2 * pairs:2].tolist()))
            # the label at a query is the value its key was paired with, and nothing else is labelled
            assert all(pair[ids[n, t].item()] == labels[n, t].item() for t in asked.tolist())
    batches.close()  # (the loader lets streaming's epoch go)
    assert answers == {2: 20, 4: 20}  # the numbers of pairs in equal shares


def test_prep_mqar_refuses_a_task_that_cannot_be_built_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "mqar"
    code, stdout, stderr = cli(capsys, "prep-mqar", "--out", out, "--seq-len", "16", "--pairs", "8")
    assert code == 2 and "--pairs 8 --seq-len 16" in stderr and "use seq_len >= 31" in stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ids_tokenizer_reads_and_writes_ids():
    from megamom.tokenizer import TokenizerError, load_tokenizer
    tok = load_tokenizer("ids:64")
    assert tok.vocab_size == 64 and tok.encode(" 3 17\n5 ") == [3, 17, 5] and tok.decode([3, 17]) == "3 17"
    assert tok.hash == load_tokenizer("ids:64").hash != load_tokenizer("ids:65").hash
    with pytest.raises(TokenizerError, match="'64' is not an id of the ids:64 vocabulary"):
        tok.encode("1 64")
    with pytest.raises(TokenizerError, match="ids:<size>"):
        load_tokenizer("ids:many")
    with pytest.raises(TokenizerError, match="is not an id"):
        tok.encode("3 \u00b2")  # (a digit to str.isdigit, not to int)


def test_megamom_train_learns_mqar_through_the_main_path(tmp_path, capsys, megamom_env, megamom_exe):
    import subprocess
    out, run = tmp_path / "mqar", tmp_path / "run"
    assert cli(capsys, "prep-mqar", "--out", out, "--vocab", "64", "--seq-len", "32", "--pairs", "2",
               "--train-examples", "256", "--val-examples", "32")[0] == 0
    # (in its own process, as a run is: a trainer's streaming datasets hold process-wide shared memory)
    r = subprocess.run([megamom_exe, "train", "--config", "configs/tiny.yaml", f"data.paths=[{out}]",
                        "data.tokenizer=ids:64", "data.seq_len=32", "model.vocab_size=64", "train.max_steps=3",
                        "train.warmup_steps=1", f"train.out_dir={run}", "--sample-prompt", "3 40 3",
                        "--sample-tokens", "1"], env=megamom_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: step 3" in r.stdout and "sample: '" in r.stdout
