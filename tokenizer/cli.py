"""`megamom tokenizer train|encode|decode|export|info`."""
from __future__ import annotations

import argparse
import json
import sys

from .base import TokenizerError


ACTIONS = ("train", "encode", "decode", "export", "info")
USAGE = """megamom tokenizer ACTION ...
  train INPUTS... --out DIR [--vocab-size N --model-type bpe|unigram ...]
  encode --tokenizer TOK [TEXT ...]          (default: each line of stdin)
  decode --tokenizer TOK [IDS ...]           (default: each line of stdin)
  export MODEL --out DIR                     (Hugging Face tokenizer directory)
  info TOK"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One flat parser (ACTION + its arguments) rather than sub-parsers: the megamom CLI parses
    # options and positionals intermixed, which argparse does not allow with sub-parsers.
    parser.usage = USAGE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=ACTIONS, metavar="ACTION", help=", ".join(ACTIONS))
    parser.add_argument("items", nargs="*", metavar="ARG",
                        help="train: inputs (files, dirs, globs); encode: texts; decode: id sequences; "
                             "export: the sentencepiece model; info: the tokenizer")
    parser.add_argument("--out", help="train / export: output directory")
    parser.add_argument("--overwrite", action="store_true", help="train / export: replace --out")
    parser.add_argument("--tokenizer", help="encode / decode: sentencepiece .model or tokenizer directory")
    t = parser.add_argument_group("train")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="unknown characters become <unk> instead of byte pieces")
    t.add_argument("--no-bos", dest="bos", action="store_false")
    t.add_argument("--no-eos", dest="eos", action="store_false")
    t.add_argument("--no-pad", dest="pad", action="store_false")
    t.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                   help="user-defined tokens, always one piece (e.g. '<|im_start|>' '<|im_end|>')")
    t.add_argument("--no-newline-token", dest="newline_token", action="store_false",
                   help="do not make '\\n' a piece of its own (it then goes through byte fallback)")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--no-split-digits", dest="split_digits", action="store_false")
    t.add_argument("--normalization", default="identity",
                   choices=("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"),
                   help="identity (default) keeps text exactly; the others also collapse extra spaces")
    t.add_argument("--dummy-prefix", action="store_true", help="prepend a space to every text (Llama style)")
    t.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="cap on sentences (lines) sampled uniformly from the inputs (default 2M)")
    t.add_argument("--max-read-mb", type=float, default=None, help="stop reading inputs after this much text")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--text-field", default="text", help="field of .jsonl / column of .parquet with the text")
    t.add_argument("--txt-mode", choices=("file", "line", "paragraph"), default="file",
                   help="what one document is in a .txt file")
    t.add_argument("--threads", type=int, default=None, help="trainer threads (default: cores)")
    t.add_argument("--no-hf", dest="export", action="store_false", help="skip the Hugging Face export")
    e = parser.add_argument_group("encode")
    e.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    e.add_argument("--json", action="store_true", help="one JSON list per text")
    x = parser.add_argument_group("export")
    x.add_argument("--model-max-length", type=int, default=None)


def _need(args, *names) -> None:
    for n in names:
        if not getattr(args, n.strip("-").replace("-", "_")):
            raise TokenizerError(f"`megamom tokenizer {args.action}` needs {n}")


def run(args) -> int:
    try:
        return _run(args)
    except TokenizerError as e:
        print(f"megamom tokenizer: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # bad input paths surface as PrepError from the shared readers
        from megamom.data_prep.errors import PrepError

        if isinstance(e, PrepError):
            print(f"megamom tokenizer: error: {e}", file=sys.stderr)
            return 2
        raise


def _run(args) -> int:
    from .load import load_tokenizer

    if args.action == "train":
        _need(args, "--out")
        if not args.items:
            raise TokenizerError("`megamom tokenizer train` needs inputs: files, directories or globs")
        from .train import TrainSpec, train_tokenizer

        spec = TrainSpec(vocab_size=args.vocab_size, model_type=args.model_type, byte_fallback=args.byte_fallback,
                         bos=args.bos, eos=args.eos, pad=args.pad, special_tokens=list(args.special_tokens),
                         newline_token=args.newline_token, character_coverage=args.character_coverage,
                         split_digits=args.split_digits, normalization=args.normalization,
                         add_dummy_prefix=args.dummy_prefix, max_sentences=args.max_sentences,
                         max_read_bytes=int(args.max_read_mb * 1e6) if args.max_read_mb else None,
                         seed=args.seed, text_field=args.text_field, txt_mode=args.txt_mode, threads=args.threads)
        train_tokenizer(args.items, args.out, spec, overwrite=args.overwrite, export=args.export,
                        log=lambda m: print(m, file=sys.stderr))
        return 0
    if args.action == "export":
        _need(args, "--out")
        if len(args.items) != 1:
            raise TokenizerError("`megamom tokenizer export MODEL --out DIR` takes one model")
        from pathlib import Path

        from .export import export_hf
        from .load import MARKER, SPM_NAME

        model = Path(args.items[0])
        if model.is_dir() and (model / SPM_NAME).is_file() and (model / MARKER).is_file():
            model = model / SPM_NAME
        out = export_hf(model, args.out, overwrite=args.overwrite, model_max_length=args.model_max_length)
        print(f"exported {model} -> {out} (AutoTokenizer.from_pretrained({str(out)!r}))", file=sys.stderr)
        return 0
    if args.action == "info":
        path = args.tokenizer or (args.items[0] if len(args.items) == 1 else None)
        if path is None:
            raise TokenizerError("`megamom tokenizer info TOKENIZER` takes one tokenizer")
        print(json.dumps(load_tokenizer(path).info(), indent=2))
        return 0
    _need(args, "--tokenizer")
    tok = load_tokenizer(args.tokenizer)
    if args.action == "encode":
        texts = args.items or (line.rstrip("\n") for line in sys.stdin)
        for text in texts:
            ids = tok.encode(text)
            out = [tok.id_to_piece(i) for i in ids] if args.pieces else ids
            print(json.dumps(out, ensure_ascii=False) if args.json else " ".join(map(str, out)))
        return 0
    seqs = args.items or (line for line in sys.stdin)
    for s in seqs:
        try:
            ids = [int(x) for x in s.replace(",", " ").replace("[", " ").replace("]", " ").split()]
        except ValueError:
            raise TokenizerError(f"cannot decode {s!r}: expected integers separated by spaces") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise TokenizerError(f"ids {bad[:5]} are outside the vocabulary [0, {tok.vocab_size})")
        print(tok.decode(ids))
    return 0
