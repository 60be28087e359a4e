"""`megamom convert to-hf | from-hf`: checkpoints to and from Hugging Face format.

    megamom convert to-hf --checkpoint runs/tiny --out hf/tiny [--format megamom|fla] [--dtype bf16|fp32]
    megamom convert from-hf --model hf/tiny --out runs/imported/init
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import ConvertError

DIRECTIONS = ("to-hf", "from-hf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # (one flat parser: the megamom CLI parses options and positionals intermixed, which argparse
    # does not support together with sub-parsers)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  megamom convert to-hf --checkpoint runs/tiny --out hf/tiny\n"
                "  megamom convert to-hf --checkpoint runs/mom-340m --out hf/mom-340m-fla --format fla --dtype bf16\n"
                "  megamom convert from-hf --model hf/tiny --out runs/imported/init\n"
                "details: docs/convert.md")
    p.add_argument("direction", choices=DIRECTIONS,
                   help="to-hf: megamom checkpoint -> Hugging Face directory; from-hf: the reverse")
    t = p.add_argument_group("to-hf")
    t.add_argument("--checkpoint", help="checkpoint directory (…/checkpoints/step_XXXXXXXX) or a run directory "
                                        "(its newest complete checkpoint); ZeRO 0-3")
    t.add_argument("--format", default=None, dest="fmt",
                   help="to-hf: megamom (default): own classes shipped as remote code, every architecture; "
                        "fla: flash-linear-attention's `mom` model type (MoM, gated delta rule). from-hf: "
                        "megamom, fla or mom-paper (the MoM authors' `mom_gated_deltanet` checkpoints); read "
                        "off config.json when not given")
    t.add_argument("--dtype", default="fp32", help="weights dtype: fp32 (default, exact) or bf16")
    t.add_argument("--tokenizer", help="tokenizer to ship (default: the one the checkpoint records); it must be "
                                       "the training tokenizer (checked by hash)")
    t.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    t.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    t.add_argument("--verify", action="store_true",
                   help="load the export with transformers and compare its logits with megamom's")
    f = p.add_argument_group("from-hf")
    f.add_argument("--model", help="Hugging Face model directory (megamom, fla `mom` or the MoM authors' format)")
    c = p.add_argument_group("both")
    c.add_argument("--out", required=True, help="output directory (written all-or-nothing)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def echo(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        if args.direction == "to-hf":
            if not args.checkpoint:
                raise ConvertError("to-hf needs --checkpoint DIR")
            from .to_hf import to_hf
            out = to_hf(args.checkpoint, args.out, fmt=args.fmt or "megamom", dtype=args.dtype,
                        tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, verify=args.verify, echo=echo)
        else:
            if not args.model:
                raise ConvertError("from-hf needs --model HFDIR")
            from .from_hf import FORMATS, from_hf
            if args.fmt is not None and args.fmt not in FORMATS:
                raise ConvertError(f"--format {args.fmt!r}: from-hf reads {', '.join(FORMATS)}")
            out = from_hf(args.model, args.out, overwrite=args.overwrite, echo=echo, fmt=args.fmt)
    except ConvertError as e:
        print(f"megamom convert {args.direction}: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
