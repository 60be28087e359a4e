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
