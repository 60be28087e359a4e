"""Tokenizer: sentencepiece training (BPE / unigram), lossless round trip, special tokens, loading
(.model, megamom directory, Hugging Face directory), content hash, and Hugging Face export with
identical ids (AutoTokenizer) on adversarial text."""
import gzip
import json
import random
import shutil

import pytest

from megamom.assets import corpus_path
from megamom.tokenizer import TokenizerError, TrainSpec, export_hf, load_tokenizer, train_tokenizer
from megamom.tokenizer.cli import run as cli_run  # noqa: F401  (the CLI module must import)

CHAPTERS = [json.loads(line)["text"] for line in gzip.open(corpus_path(), "rt", encoding="utf-8")]

ODD = ["", " ", "  ", "\n", "\n\n", "a", " a", "a ", "Hello  world\n\n  spaced\ttab 12345 émoji 😀 end \n",
       "<s>hi</s>", "x<0x41>y", "<unk><pad>", "\u2581start", " \u2581x", "\r\n", "ﬁ ｆｕｌｌ \u00a0 \u3000 日本語",
       "<|user|>hello<|end|>", "tab\tand\u200bzero width", "1234567890 3.14159", "\x01\x7f"]


def adversarial(n=1500, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdefghij ABC  \n\t0123456789.,;:!?'\"<>/()[]") + [
        "é", "ü", "ß", "日本", "😀", "\u00a0", "\u3000", "ｆｕｌｌ", "<s>", "</s>", "<unk>", "<pad>", "<0x41>",
        "\u2581", "\r\n", "ﬁ", "<|user|>", "<|end|>"]
    out = list(ODD)
    out += [rng.choice(CHAPTERS)[rng.randrange(0, 300):rng.randrange(300, 2000)] for _ in range(100)]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 50))) for _ in range(n)]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    p = d / "kjv.jsonl"
    with open(p, "w") as f:
        for t in CHAPTERS[:300]:
            f.write(json.dumps({"text": t}) + "\n")
    return p


@pytest.fixture(scope="module")
def toks(tmp_path_factory, corpus):
    out = {}
    root = tmp_path_factory.mktemp("toks")
    for mt in ("bpe", "unigram"):
        spec = TrainSpec(vocab_size=800, model_type=mt, special_tokens=["<|user|>", "<|end|>"], seed=1)
        out[mt] = train_tokenizer([str(corpus)], root / mt, spec, log=lambda m: None)
    spec = TrainSpec(vocab_size=800, model_type="unigram", normalization="nmt_nfkc", add_dummy_prefix=True,
                     newline_token=False, seed=1)
    out["llama_style"] = train_tokenizer([str(corpus)], root / "llama", spec, log=lambda m: None)
    return out


@pytest.mark.parametrize("mt", ["bpe", "unigram"])
def test_round_trip_and_specials(toks, mt):
    tok = load_tokenizer(toks[mt])
    assert tok.kind == "sentencepiece" and tok.vocab_size == 800
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    for text in adversarial(300):
        if "\u2581" in text:  # sentencepiece's own whitespace marker decodes to a space (documented)
            continue
        assert tok.decode(tok.encode(text)) == text, repr(text)  # lossless: identity + byte fallback
    # user-defined tokens and the newline are single pieces; control tokens are never made from text
    ids = tok.encode("<|user|>hi\n<|end|>")
    assert [tok.id_to_piece(i) for i in (ids[0], ids[-1])] == ["<|user|>", "<|end|>"]
    assert "\n" in [tok.id_to_piece(i) for i in ids]
    assert tok.eos_id not in tok.encode("</s>") and tok.bos_id not in tok.encode("<s>")
    assert tok.unk_id not in tok.encode("日本語 😀")  # byte fallback, no <unk>
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


@pytest.mark.parametrize("mt", ["bpe", "unigram", "llama_style"])
def test_hf_export_identical_ids(toks, mt, tmp_path):
    from transformers import AutoTokenizer

    sp = load_tokenizer(toks[mt] / "tokenizer.model")
    out = export_hf(toks[mt] / "tokenizer.model", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == sp.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        sp.bos_id, sp.eos_id, sp.pad_id, sp.unk_id)
    mismatch = []
    for text in adversarial():
        a = sp.encode(text)
        if hf(text)["input_ids"] != a or hf.encode(text) != a or hf.decode(a) != sp.decode(a):
            mismatch.append(text)
    assert not mismatch, f"{len(mismatch)} texts differ, e.g. {mismatch[:3]!r}"
    # the trained directory is itself an HF directory with the same ids
    hf2 = AutoTokenizer.from_pretrained(str(toks[mt]))
    assert all(hf2(t)["input_ids"] == sp.encode(t) for t in ODD)


def test_load_paths_and_hash(toks, tmp_path):
    d = toks["bpe"]
    a, b = load_tokenizer(d / "tokenizer.model"), load_tokenizer(d)
    assert a.hash == b.hash and a.hash.startswith("sha256:") and b.kind == "sentencepiece"
    assert load_tokenizer(toks["unigram"]).hash != a.hash
    # a plain Hugging Face directory (no sentencepiece model) goes through AutoTokenizer
    hf_dir = tmp_path / "hf_only"
    shutil.copytree(d, hf_dir)
    (hf_dir / "tokenizer.model").unlink()
    (hf_dir / "megamom_tokenizer.json").unlink()
    h = load_tokenizer(hf_dir)
    assert h.kind == "hf" and h.vocab_size == a.vocab_size and (h.bos_id, h.eos_id, h.pad_id) == (1, 2, 3)
    for t in ODD:
        assert h.encode(t) == a.encode(t) and h.decode(a.encode(t)) == a.decode(a.encode(t))
    assert h.hash == load_tokenizer(hf_dir).hash  # stable
    import pickle

    assert pickle.loads(pickle.dumps(a)).encode("abc def") == a.encode("abc def")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        load_tokenizer(bad)


def test_training_is_deterministic_and_capped(corpus, tmp_path):
    spec = TrainSpec(vocab_size=600, max_sentences=2000, seed=3)
    a = load_tokenizer(train_tokenizer([str(corpus)], tmp_path / "a", spec, log=lambda m: None))
    b = load_tokenizer(train_tokenizer([str(corpus)], tmp_path / "b", spec, log=lambda m: None))
    assert a.hash == b.hash
    meta = json.loads((tmp_path / "a" / "megamom_tokenizer.json").read_text())
    assert meta["train"]["sentences_sampled"] == 2000 < meta["train"]["sentences_seen"]
    with pytest.raises(TokenizerError, match="exists and is not empty"):
        train_tokenizer([str(corpus)], tmp_path / "a", spec)
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([str(corpus)], tmp_path / "c", TrainSpec(vocab_size=100))


def test_cli(corpus, tmp_path, capsys):
    from megamom.cli import main

    assert main(["tokenizer", "train", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "600",
                 "--model-type", "unigram", "--max-sentences", "3000"]) == 0
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "t"), "In the beginning", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out.strip())
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "t"), " ".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "In the beginning\n"
    assert main(["tokenizer", "export", str(tmp_path / "t"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["tokenizer", "info", str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 600
    assert main(["tokenizer", "encode", "hi"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err


def test_out_that_is_a_file_is_a_clear_error(corpus, toks, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    with pytest.raises(TokenizerError, match=r"file\.txt.*exists and is a file"):
        train_tokenizer([str(corpus)], f, TrainSpec(vocab_size=600), log=lambda m: None)
    with pytest.raises(TokenizerError, match=r"file\.txt.*exists and is a file"):
        export_hf(toks["bpe"] / "tokenizer.model", f)
    assert f.read_text() == "keep"
    # a non-empty directory still needs overwrite; with it, the export replaces it whole
    d = tmp_path / "hf"
    (d / "old").mkdir(parents=True)
    with pytest.raises(TokenizerError, match="exists and is not empty"):
        export_hf(toks["bpe"] / "tokenizer.model", d)
    export_hf(toks["bpe"] / "tokenizer.model", d, overwrite=True)
    assert not (d / "old").exists() and (d / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
