"""Training a sentencepiece tokenizer from txt / jsonl / parquet inputs.

Sentences (the non-empty lines of the documents; very long lines cut at spaces) are sampled
uniformly with a seeded reservoir of `max_sentences`, so the sample, and the model, are the same
for the same inputs and seed, and memory stays bounded however large the inputs are.

Defaults make a lossless tokenizer for pretraining: no normalization (`identity`), whitespace kept
as is (no dummy prefix, no collapsing of spaces), byte fallback (no unknown tokens), digits split,
a newline piece, ids unk=0, bos=1, eos=2, pad=3. `decode(encode(text)) == text` for any text.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .base import TokenizerError

MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


@dataclass
class TrainSpec:
    vocab_size: int = 32000
    model_type: str = "bpe"
    byte_fallback: bool = True
    bos: bool = True
    eos: bool = True
    pad: bool = True
    special_tokens: list = field(default_factory=list)  # user-defined: always one piece, matched in text
    newline_token: bool = True  # "\n" as a user-defined piece (else byte fallback)
    character_coverage: float = 0.9995
    split_digits: bool = True
    normalization: str = "identity"
    add_dummy_prefix: bool = False
    max_sentences: int = 2_000_000
    max_sentence_chars: int = 4096
    max_read_bytes: Optional[int] = None  # stop reading inputs after this many bytes of text
    seed: int = 0
    text_field: str = "text"
    txt_mode: str = "file"
    threads: Optional[int] = None

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise TokenizerError(f"model type {self.model_type!r} must be one of {list(MODEL_TYPES)}")
        if self.normalization not in NORMALIZATIONS:
            raise TokenizerError(f"normalization {self.normalization!r} must be one of {list(NORMALIZATIONS)}")
        n_special = 1 + self.bos + self.eos + self.pad + len(self.special_tokens) + self.newline_token
        floor = n_special + (256 if self.byte_fallback else 0) + 2
        if self.vocab_size < floor:
            raise TokenizerError(f"vocab_size={self.vocab_size} is too small: {n_special} special pieces"
                                 + (" + 256 byte pieces" if self.byte_fallback else "")
                                 + f" need at least {floor}")
        if not 0 < self.character_coverage <= 1:
            raise TokenizerError(f"character_coverage={self.character_coverage} must be in (0, 1]")
        if self.max_sentences < 1:
            raise TokenizerError(f"max_sentences={self.max_sentences} must be >= 1")
        dup = {t for t in self.special_tokens if self.special_tokens.count(t) > 1}
        if dup or any(not t for t in self.special_tokens):
            raise TokenizerError(f"special tokens must be distinct and non-empty (got {self.special_tokens})")


def _cut_long(line: str, n: int) -> Iterator[str]:
    while len(line) > n:
        i = line.rfind(" ", n // 2, n)
        i = n if i <= 0 else i
        yield line[:i]
        line = line[i:]
    if line:
        yield line


def sample_sentences(inputs: list[str], spec: TrainSpec, log=print) -> tuple[list[str], dict]:
    """Reservoir sample of sentences from the inputs (read with the data-prep readers, so the same
    formats, bad-input handling and counts apply)."""
    from megamom.data_prep.inputs import discover, plan_units
    from megamom.data_prep.readers import ReadOptions, Recorder, read_unit

    files, _ = discover(inputs)
    rng = random.Random(spec.seed)
    sample: list[str] = []
    seen = 0
    read = 0
    rec = Recorder(strict=False, max_listed=20)
    opt = ReadOptions(text_field=spec.text_field, txt_mode=spec.txt_mode, chunk_chars=1 << 20)
    stop = False
    for unit in plan_units(files, spec.txt_mode, 1 << 62):
        for piece in read_unit(unit, opt, rec):
            read += len(piece.text)
            for line in piece.text.split("\n"):
                if not line.strip():
                    continue
                for s in _cut_long(line, spec.max_sentence_chars):
                    seen += 1
                    if len(sample) < spec.max_sentences:
                        sample.append(s)
                    else:
                        j = rng.randrange(seen)
                        if j < spec.max_sentences:
                            sample[j] = s
            if spec.max_read_bytes and read >= spec.max_read_bytes:
                stop = True
                break
        if stop:
            break
    for b in rec.bad[:5]:
        log(f"tokenizer: {b.message()}")
    stats = {"files": len(files), "documents_read": rec.docs_read, "documents_rejected": sum(rec.rejected.values()),
             "sentences_seen": seen, "sentences_sampled": len(sample), "chars_read": read}
    if not sample:
        raise TokenizerError(f"no text found in {inputs} to train on (documents read: {rec.docs_read}, "
                             f"rejected: {rec.rejected}); check the paths and --text-field")
    return sample, stats


def train_tokenizer(inputs: list[str], out_dir: str | Path, spec: Optional[TrainSpec] = None, *,
                    overwrite: bool = False, export: bool = True, log=print) -> Path:
    """Train and write `out_dir/tokenizer.model` (+ `tokenizer.vocab`, and the Hugging Face files
    when `export`). Written to a temporary directory and renamed into place."""
    import io

    import sentencepiece as spm

    from megamom.fsutil import check_out, staged_dir

    from .export import export_hf
    from .load import MARKER, SPM_NAME
    from .spm import SentencePieceTokenizer

    spec = spec or TrainSpec()
    spec.validate()
    out = check_out(out_dir, overwrite, error=TokenizerError)
    sentences, stats = sample_sentences(inputs, spec, log)
    user = (["\n"] if spec.newline_token else []) + list(spec.special_tokens)
    ids = {"unk_id": 0}
    nxt = 1
    for name, on in (("bos_id", spec.bos), ("eos_id", spec.eos), ("pad_id", spec.pad)):
        ids[name] = nxt if on else -1
        nxt += on
    spm.set_random_generator_seed(spec.seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=spec.vocab_size,
            model_type=spec.model_type, byte_fallback=spec.byte_fallback,
            character_coverage=spec.character_coverage, normalization_rule_name=spec.normalization,
            remove_extra_whitespaces=spec.normalization != "identity", add_dummy_prefix=spec.add_dummy_prefix,
            split_digits=spec.split_digits, allow_whitespace_only_pieces=True, user_defined_symbols=user,
            input_sentence_size=0, max_sentence_length=4 * spec.max_sentence_chars + 16,
            num_threads=spec.threads or os.cpu_count() or 1, minloglevel=2, hard_vocab_limit=True,
            **ids)
    except RuntimeError as e:
        msg = str(e)
        hint = ("; lower --vocab-size or give more text" if "Vocabulary size" in msg or "vocab_size" in msg else "")
        raise TokenizerError(f"sentencepiece training failed: {msg}{hint}") from None
    tok = SentencePieceTokenizer(buf.getvalue(), str(out / SPM_NAME))
    with staged_dir(out) as tmp:
        if export:
            export_hf(tok.model_proto, tmp / "hf")
            for f in (tmp / "hf").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "hf").rmdir()
        (tmp / SPM_NAME).write_bytes(tok.model_proto)
        with open(tmp / "tokenizer.vocab", "w", encoding="utf-8") as f:
            for p in tok.proto().pieces:
                f.write(f"{json.dumps(p.piece)}\t{p.score}\n")
        meta = json.loads((tmp / MARKER).read_text()) if (tmp / MARKER).is_file() else {
            "format": "megamom-tokenizer", "version": 1, **tok.info()}
        meta["hash"] = tok.hash
        meta["train"] = {**asdict(spec), **stats, "inputs": [str(i) for i in inputs]}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"tokenizer: {spec.model_type} vocab {tok.vocab_size} from {stats['sentences_sampled']} of "
        f"{stats['sentences_seen']} sentences ({stats['documents_read']} documents) -> {out} "
        f"[{tok.hash[:19]}...]")
    return out
