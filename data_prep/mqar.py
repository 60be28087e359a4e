"""MQAR as a training dataset (`megamom prep-mqar`): multi-query associative recall examples
(megamom.data.mqar) written as mosaicml-streaming shards with a per-token loss mask, so `megamom
train` learns the task through its main path (streaming loader, checkpoints, resume, logs) with the
loss on the answers only. One sample is one example of seq_len + 1 ids; the numbers of pairs are
mixed (an equal share each); the tokenizer is the ids vocabulary `ids:<vocab>` (tokenizer/ids.py).

    megamom prep-mqar --out data/mqar --vocab 512 --seq-len 64 --pairs 4 8 --train-examples 20000
    megamom train --config configs/mom-340m.yaml data.paths=[data/mqar] data.tokenizer=ids:512 \\
        data.seq_len=64 model.vocab_size=512"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from megamom.fsutil import check_out, publish_modes, replace_dir

from .errors import PrepError
from .prep import FORMAT, MANIFEST, VERSION
from .worker import token_dtype, write_json_atomic

COLUMNS = {"input_ids": "ndarray:{dtype}", "loss_mask": "ndarray:uint8"}


def prepare_mqar(out: str | Path, *, vocab_size: int, seq_len: int, pairs: list[int], train_examples: int,
                 val_examples: int = 0, seed: int = 0, overwrite: bool = False) -> dict:
    """Write the dataset to `out` (all or nothing) and return its manifest."""
    import megamom
    from megamom.data.mqar import check_mqar, mqar_sequences
    from megamom.data.streaming_compat import MDSWriter, streaming_version
    from megamom.tokenizer.ids import IdsTokenizer

    if not pairs:
        raise PrepError("--pairs: give at least one number of key-value pairs, e.g. --pairs 4 8")
    for n in pairs:
        try:
            check_mqar(n, seq_len, vocab_size)
        except ValueError as e:
            raise PrepError(f"--pairs {n} --seq-len {seq_len} --vocab {vocab_size}: {e}") from None
    if train_examples < len(pairs) or val_examples < 0:
        raise PrepError(f"--train-examples {train_examples} --val-examples {val_examples}: at least one training "
                        f"example per number of pairs ({len(pairs)}), and no negative count")
    out = check_out(out, overwrite, error=PrepError)
    tok = IdsTokenizer(vocab_size)
    dtype = token_dtype(vocab_size)
    settings = {"task": "mqar", "vocab_size": vocab_size, "seq_len": seq_len, "pairs": list(pairs),
                "train_examples": train_examples, "val_examples": val_examples, "seed": seed}
    fingerprint = "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        splits, counts = {}, {}
        for split, total, offset in (("train", train_examples, 0), ("val", val_examples, 1_000_000)):
            if not total:
                splits[split] = None
                counts[split] = {"documents": 0, "tokens": 0, "samples": 0, "padding_tokens": 0}
                continue
            columns = {k: v.format(dtype=np.dtype(dtype).name) for k, v in COLUMNS.items()}
            with MDSWriter(out=str(tmp / split), columns=columns, compression="zstd", hashes=["sha1", "xxh64"],
                           max_workers=1) as w:
                shares = [total // len(pairs) + (i < total % len(pairs)) for i in range(len(pairs))]
                order = np.random.default_rng(seed + offset).permutation(total)  # pairs mixed over the shards
                rows = []
                for i, (n, count) in enumerate(zip(pairs, shares)):
                    seq, answer = mqar_sequences(count, n, seq_len, vocab_size, seed=seed + offset + 1000 * i + n)
                    rows += list(zip(seq.astype(dtype), answer.astype(np.uint8)))
                for j in order:
                    w.write({"input_ids": rows[j][0], "loss_mask": rows[j][1]})
            splits[split] = split
            counts[split] = {"documents": total, "tokens": total * (seq_len + 1), "samples": total,
                             "padding_tokens": 0}
        manifest = {
            "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "layout": "concat",
            "seq_len": seq_len, "dtype": np.dtype(dtype).name, "tokenizer": tok.info(), "settings": settings,
            "inputs": [], "skipped_files": [], "splits": splits,
            "counts": {"files": {"read": 0, "rejected": {}, "skipped_unsupported": 0},
                       "documents": {"read": train_examples + val_examples,
                                     "written": train_examples + val_examples, "rejected": {}, "utf8_replaced": 0},
                       "blank_lines": 0, "splits": counts, "bad_total": 0},
            "errors": [], "errors_file": None, "units": 1,
            "software": {"megamom": megamom.__version__, "mosaicml-streaming": streaming_version},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        publish_modes(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest



def add_arguments(p) -> None:
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    p.add_argument("--out", required=True, help="dataset directory to write (all or nothing)")
    p.add_argument("--vocab", type=int, default=512, help="ids 0 .. vocab-1: keys the lower half, values the upper")
    p.add_argument("--seq-len", type=int, default=64, help="model positions per example (data.seq_len)")
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8], help="numbers of key-value pairs, mixed")
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--val-examples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    import sys
    try:
        m = prepare_mqar(args.out, vocab_size=args.vocab, seq_len=args.seq_len, pairs=args.pairs,
                         train_examples=args.train_examples, val_examples=args.val_examples, seed=args.seed,
                         overwrite=args.overwrite)
    except PrepError as e:
        print(f"megamom prep-mqar: error: {e}", file=sys.stderr)
        return 2
    c = m["counts"]["splits"]
    print(f"wrote {c['train']['samples']} training and {c['val']['samples']} validation examples to {args.out} "
          f"(pairs {args.pairs}, seq_len {args.seq_len}, vocabulary ids:{args.vocab})")
    print(f"train on it: megamom train data.paths=[{args.out}] data.tokenizer=ids:{args.vocab} "
          f"data.seq_len={args.seq_len} model.vocab_size={args.vocab} ...")
    return 0
