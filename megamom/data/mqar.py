"""Multi-query associative recall (MQAR, as in the Zoology benchmark: Arora et al. 2023): the
synthetic task on which several routed memories should recall better than one memory.

One example of length T: `num_pairs` key-value pairs first (k1 v1 k2 v2 ...; keys from the lower
half of the vocabulary, values from the upper half, distinct within the example), then every key
queried once in a random order at positions spread by Zoology's power law over the rest of the
sequence, each query followed by its value; the remaining positions hold random tokens. The model
reads input_ids = sequence[:-1]; labels = sequence[1:] with every position but the queries' masked
(-100), so the loss and the accuracy count the answers only.

    batch = mqar_batch(num_examples=256, num_pairs=16, seq_len=256, vocab_size=8192, seed=0)
    accuracy = mqar_accuracy(model, batch)"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.loss import IGNORE_INDEX


@dataclass
class MQARBatch:
    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]: the value after each query key, -100 elsewhere
    num_pairs: int


def check_mqar(num_pairs: int, seq_len: int, vocab_size: int) -> None:
    """A ValueError naming the setting to change when the task cannot be built."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs}: at least one key-value pair")
    if 4 * num_pairs > seq_len + 1:
        raise ValueError(f"num_pairs={num_pairs} does not fit seq_len={seq_len}: the pairs and their queries take "
                         f"4 x num_pairs = {4 * num_pairs} tokens; use seq_len >= {4 * num_pairs - 1}")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"vocab_size={vocab_size} has too few keys for num_pairs={num_pairs} (keys are the "
                         f"lower half of the vocabulary, token 0 excluded): use vocab_size >= {2 * num_pairs + 2}")


def mqar_sequences(num_examples: int, num_pairs: int, seq_len: int, vocab_size: int, seed: int = 0,
                   power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """`num_examples` MQAR sequences of seq_len + 1 tokens: -> (tokens int64 [N, seq_len + 1], answer
    bool [N, seq_len + 1]: the tokens to predict, each a value after its query key). power_a:
    Zoology's spacing of the queries (p(gap g) ~ g^(a - 1): most queries soon after the pairs, some
    far). Deterministic in `seed`."""
    check_mqar(num_pairs, seq_len, vocab_size)
    rng = np.random.default_rng(seed)
    L = seq_len + 1
    context = 2 * num_pairs
    slots = (L - context) // 2  # places for a (query, answer) pair after the context
    half = vocab_size // 2
    seq = rng.integers(1, vocab_size, size=(num_examples, L))  # the filler: random tokens
    answer = np.zeros((num_examples, L), dtype=bool)
    gaps = np.arange(1, slots + 1, dtype=np.float64)
    p = gaps ** (power_a - 1)
    p /= p.sum()
    for n in range(num_examples):
        keys = rng.choice(np.arange(1, half), num_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), num_pairs, replace=False)
        seq[n, 0:context:2], seq[n, 1:context:2] = keys, values
        where = context + 2 * rng.choice(slots, num_pairs, replace=False, p=p)
        order = rng.permutation(num_pairs)
        seq[n, where], seq[n, where + 1] = keys[order], values[order]
        answer[n, where + 1] = True  # the answer is read where the query key is the input
    return seq, answer


def mqar_batch(num_examples: int, num_pairs: int, seq_len: int, vocab_size: int, seed: int = 0,
               power_a: float = 0.01) -> MQARBatch:
    """`num_examples` MQAR examples of `seq_len` model positions (mqar_sequences: inputs are the
    sequences but their last token, labels the next tokens where they are answers)."""
    seq, answer = mqar_sequences(num_examples, num_pairs, seq_len, vocab_size, seed, power_a)
    labels = np.where(answer, seq, IGNORE_INDEX)
    return MQARBatch(torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy()), num_pairs)


@torch.no_grad()
def mqar_accuracy(model, batch: MQARBatch, batch_size: int = 64, device=None) -> float:
    """The share of the answers the model predicts (argmax at the query positions only)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    right = total = 0
    for s in range(0, batch.input_ids.shape[0], batch_size):
        ids = batch.input_ids[s:s + batch_size].to(device)
        labels = batch.labels[s:s + batch_size].to(device)
        logits = model(ids, return_logits=True).logits
        asked = labels != IGNORE_INDEX
        right += int((logits.argmax(-1)[asked] == labels[asked]).sum())
        total += int(asked.sum())
    model.train(was_training)
    return right / max(total, 1)
