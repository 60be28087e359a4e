"""Export a sentencepiece model to a Hugging Face tokenizer directory with identical ids.

The `tokenizers` pipeline is built from the model's own settings so that
`AutoTokenizer.from_pretrained(dir)(text)["input_ids"] == SentencePieceProcessor.encode(text)`:
normalizer (precompiled character map, extra-whitespace removal, whitespace escaping, dummy prefix),
the BPE merges ranked by piece score or the unigram scores, byte fallback, user-defined pieces
(always emitted whole), and control pieces (BOS/EOS/PAD: never produced from text, as in
sentencepiece, so `split_special_tokens=True`). The exported tokenizer adds no BOS/EOS: the data
pipeline places them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from megamom.fsutil import check_out, staged_dir

from .base import TokenizerError

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
# Pieces sentencepiece never matches against text get this score in the HF unigram lattice, so
# they are never chosen over real pieces (byte fallback looks them up by name, not by score).
_NEVER = -1e9

def build_hf_tokenizer(proto):
    """sentencepiece ModelProto -> `tokenizers.Tokenizer` that encodes identically."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if ts.model_type == UNIGRAM:
        vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED, UNKNOWN) else _NEVER) for p in pieces]
        model = models.Unigram(vocab, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    elif ts.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
        ranked = []
        for piece, (score, i) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, i, left, right))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[ts.unk_id].piece, fuse_unk=True,
                           byte_fallback=ts.byte_fallback, dropout=None)
    else:
        raise TokenizerError(f"sentencepiece model_type {ts.model_type} (word/char) cannot be exported; "
                             "train with --model-type bpe or unigram")
    tk = Tokenizer(model)

    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    user = [p.piece for p in pieces if p.type == USER_DEFINED]
    pre = []
    if ns.add_dummy_prefix:
        if not user:  # exact: sentencepiece prepends to the normalized text, whatever it starts with
            norm.append(normalizers.Prepend("\u2581"))
        else:
            # User-defined pieces split the text before normalization; the prefix belongs to the
            # first part only. (Metaspace does not prepend when the text already starts with the
            # marker, sentencepiece does: double it.)
            norm.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
            pre.append(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False))
    if norm:
        tk.normalizer = normalizers.Sequence(norm)
    if ts.model_type == UNIGRAM:
        # The HF unigram lattice holds every vocab entry, so a literal "<s>" or "<0x41>" in the text
        # could match a control or byte piece (sentencepiece never matches those). When such a
        # literal contains a character that is no piece of its own, that character can only ever be
        # an unknown token in sentencepiece: isolating runs of such characters makes the literal
        # unmatchable and leaves every other segmentation unchanged. (When all its characters are
        # pieces, the _NEVER score already keeps the literal piece out of the best path.)
        single = {p.piece for p in pieces if p.type in (NORMAL, USER_DEFINED) and len(p.piece) == 1}
        risky = {c for p in pieces if p.type in (CONTROL, BYTE, UNKNOWN, UNUSED) for c in p.piece} - single
        if risky:
            cls = "".join(re.escape(c) for c in sorted(risky))
            pre.append(pre_tokenizers.Split(Regex(f"[{cls}]+"), behavior="isolated"))
    if pre:
        tk.pre_tokenizer = pre[0] if len(pre) == 1 else pre_tokenizers.Sequence(pre)

    dec = [decoders.Replace("\u2581", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)

    # User-defined pieces: matched in the raw text and emitted whole, like sentencepiece does.
    if user:
        tk.add_tokens([AddedToken(u, normalized=False, special=False, single_word=False, lstrip=False,
                                  rstrip=False) for u in user])
    control = [p.piece for p in pieces if p.type == CONTROL]
    if control:
        tk.add_special_tokens([AddedToken(c, normalized=False, special=True) for c in control])
    return tk

def export_hf(model: str | Path | bytes, out_dir: str | Path, *, overwrite: bool = False,
              model_max_length: int | None = None) -> Path:
    """Write a Hugging Face tokenizer directory for a sentencepiece model (a path or its bytes).

    The directory also holds `tokenizer.model` (the source model) and `megamom_tokenizer.json`, so
    `load_tokenizer(dir)` gives back the sentencepiece tokenizer with the same hash. Written to a
    temporary directory and renamed into place: a crash never leaves a half-written export.
    """
    from transformers import PreTrainedTokenizerFast

    from .load import MARKER, SPM_NAME
    from .spm import SentencePieceTokenizer

    sp = SentencePieceTokenizer(model) if isinstance(model, bytes) else SentencePieceTokenizer.from_file(model)
    proto = sp.proto()
    out = check_out(out_dir, overwrite, error=TokenizerError)
    tk = build_hf_tokenizer(proto)

    def piece(i):
        return None if i is None else proto.pieces[i].piece

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=piece(sp.bos_id), eos_token=piece(sp.eos_id),
        unk_token=piece(sp.unk_id), pad_token=piece(sp.pad_id), split_special_tokens=True,
        clean_up_tokenization_spaces=False, model_max_length=model_max_length or int(1e30),
        add_bos_token=False, add_eos_token=False)
    with staged_dir(out) as tmp:
        fast.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        (tmp / SPM_NAME).write_bytes(sp.model_proto)
        (tmp / MARKER).write_text(json.dumps({"format": "megamom-tokenizer", "version": 1, "hash": sp.hash,
                                              "vocab_size": sp.vocab_size, "bos_id": sp.bos_id,
                                              "eos_id": sp.eos_id, "pad_id": sp.pad_id, "unk_id": sp.unk_id,
                                              **_train_meta(proto)}, indent=2) + "\n")
    return out

def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", a class 4.x does not have; the
    fast-tokenizer class both read (into identical ids) is PreTrainedTokenizerFast. Its inputs are
    input_ids and attention_mask (token_type_ids would be rejected by causal LMs' generate())."""
    conf = json.loads(path.read_text())
    if conf.get("tokenizer_class") == "TokenizersBackend":
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf.setdefault("model_input_names", ["input_ids", "attention_mask"])
    path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


def _train_meta(proto) -> dict:
    ts = proto.trainer_spec
    return {"model_type": {UNIGRAM: "unigram", BPE: "bpe"}.get(ts.model_type, str(ts.model_type)),
            "byte_fallback": bool(ts.byte_fallback),
            "user_defined_symbols": [p.piece for p in proto.pieces if p.type == USER_DEFINED],
            "normalization": proto.normalizer_spec.name or "identity",
            "add_dummy_prefix": bool(proto.normalizer_spec.add_dummy_prefix)}

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
