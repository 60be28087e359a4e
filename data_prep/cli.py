"""`megamom prep INPUTS... --out DIR --tokenizer TOK`: raw text -> tokenized MDS shards."""
from __future__ import annotations

import argparse
import sys

from .errors import PrepError


def _size(text: str) -> int:
    """argparse type for sizes (64MiB, 500MB, 64k, 1048576): a bad value is a usage error naming it."""
    from megamom.fsutil import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("inputs", nargs="+",
                        help="files, directories (recursive) or globs: .txt .jsonl .ndjson (also .gz / .zst), .parquet")
    parser.add_argument("--out", required=True, help="output directory (manifest.json, train/, val/)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model or tokenizer directory")
    parser.add_argument("--seq-len", type=int, default=2048, help="samples hold seq_len + 1 tokens")
    parser.add_argument("--layout", choices=("concat", "packed"), default="packed",
                        help="concat: cut the token stream into samples; packed: keep documents whole in rows, "
                             "with their lengths (for memory resets at document boundaries)")
    parser.add_argument("--text-field", default="text", help="JSON field (dotted for nested) / parquet column")
    parser.add_argument("--txt-mode", choices=("file", "line", "paragraph"), default="file",
                        help="what one document is in a .txt file")
    parser.add_argument("--bos", action="store_true", help="put BOS at the start of each document")
    parser.add_argument("--no-eos", dest="eos", action="store_false", help="no EOS at the end of each document")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="fraction of documents for the validation split (by document, seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--invalid-utf8", choices=("replace", "reject"), default="replace",
                        help="documents with invalid UTF-8: keep them with U+FFFD (counted) or reject them")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--pack-bins", type=int, default=64,
                        help="packed layout: rows kept open for best-fit packing (1 keeps document order)")
    parser.add_argument("--unit-size", type=_size, default="64MiB",
                        help="work unit: small files are grouped and uncompressed .jsonl / line-mode .txt files cut "
                             "into units of about this size (lower it to keep all cores busy on a small corpus)")
    parser.add_argument("--shard-size", type=_size, default="64MiB", help="MDS shard size limit (uncompressed)")
    parser.add_argument("--compression", default="zstd", help="shard compression: zstd, zstd:LEVEL or none")
    parser.add_argument("--max-line-bytes", type=_size, default="256MiB",
                        help=".jsonl lines longer than this are rejected (bounded memory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output made with other inputs or settings")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--tasks", type=int, default=None,
                        help="job array: the number of tasks (the same in every task and in the merge)")
    parser.add_argument("--task", type=int, default=None,
                        help="job array: do only this task's share of the work units (0 .. tasks-1), no manifest")
    parser.add_argument("--merge", action="store_true",
                        help="job array: after the tasks, write the index and manifest (fails naming unfinished tasks)")


def run(args) -> int:
    from .prep import prepare
    from .worker import PrepSettings

    st = PrepSettings(seq_len=args.seq_len, layout=args.layout, text_field=args.text_field,
                      txt_mode=args.txt_mode, add_bos=args.bos, add_eos=args.eos,
                      val_fraction=args.val_fraction, seed=args.seed, invalid_utf8=args.invalid_utf8,
                      pack_bins=args.pack_bins, unit_bytes=args.unit_size, shard_bytes=args.shard_size,
                      compression=args.compression,
                      max_line_bytes=args.max_line_bytes)
    try:
        prepare(args.inputs, args.out, args.tokenizer, st, workers=args.workers, strict=args.strict,
                overwrite=args.overwrite, progress=args.progress, task=args.task, tasks=args.tasks,
                merge=args.merge)
    except PrepError as e:
        print(f"megamom prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megamom prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        from megamom.tokenizer import TokenizerError

        if isinstance(e, TokenizerError):
            print(f"megamom prep: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
