"""Data prep: exact counts, decoded samples reproduce the input in order, layouts (concat / packed
with document lengths), input formats (txt modes, jsonl, .gz, .zst, parquet, dirs, globs, byte-range
units), small files grouped into units, idempotent rerun, crash + resume == uninterrupted (byte for
byte), job-array tasks + merge == one run (byte for byte), and every kind of bad input with its
message and count (and --strict)."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megamom.assets import corpus_path
from megamom.data_prep import PrepError, PrepSettings, StrictStop, prepare, read_manifest
from megamom.data.streaming_compat import StreamingDataset
from megamom.tokenizer import TrainSpec, load_tokenizer, train_tokenizer

CHAPTERS = [json.loads(line)["text"] for line in gzip.open(corpus_path(), "rt", encoding="utf-8")]
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    src = root / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CHAPTERS[:200]))
    d = train_tokenizer([str(src)], root / "tok", TrainSpec(vocab_size=700, seed=0), log=lambda m: None)
    return load_tokenizer(d)


def jsonl(path: Path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def samples(out: Path, split="train"):
    """Decoded MDS samples of a split, in stored order (StreamingDataset over the local dir)."""
    ds = StreamingDataset(local=str(out / split), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def tree(root: Path) -> dict:
    """Every file under root, by relative path: datasets compared byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def stream_of(rows, seq_len):
    """Concat layout: undo the one-token overlap of consecutive samples."""
    toks = []
    for i, r in enumerate(rows):
        ids = r["input_ids"].tolist()
        toks += ids if i == 0 else ids[1:]
    return toks


def split_docs(ids, eos):
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    assert not cur
    return docs


def test_concat_reproduces_text_in_order_with_exact_counts(tok, tmp_path):
    texts = CHAPTERS[:40]
    src = jsonl(tmp_path / "a.jsonl", texts)
    st = PrepSettings(seq_len=64, layout="concat")
    m = prepare([str(src)], tmp_path / "out", tok, st, **QUIET)
    c = m["counts"]
    n_tokens = sum(len(tok.encode(t)) + 1 for t in texts)
    assert c["documents"] == {"read": 40, "written": 40, "rejected": {}, "utf8_replaced": 0}
    assert c["splits"]["train"]["tokens"] == n_tokens and c["splits"]["val"]["samples"] == 0
    rows = samples(tmp_path / "out")
    assert len(rows) == c["splits"]["train"]["samples"] == -(-(n_tokens - 1) // 64)
    assert all(len(r["input_ids"]) == 65 for r in rows[:-1]) and 2 <= len(rows[-1]["input_ids"]) <= 65
    assert [tok.decode(d) for d in split_docs(stream_of(rows, 64), tok.eos_id)] == texts
    assert m["tokenizer"]["hash"] == tok.hash and m["layout"] == "concat" and m["dtype"] == "uint16"
    assert m["splits"] == {"train": "train", "val": None}


@pytest.mark.parametrize("bins", [1, 8])
def test_packed_keeps_documents_whole(tok, tmp_path, bins):
    rng = np.random.default_rng(0)
    # short documents of varied length, one long one (split into rows), all distinct
    texts = [" ".join(CHAPTERS[i].split()[: int(rng.integers(2, 12))]) + f" #{i}" for i in range(60)]
    texts[30] = CHAPTERS[5]
    src = jsonl(tmp_path / "p.jsonl", texts)
    L = 48
    m = prepare([str(src)], tmp_path / "out", tok, PrepSettings(seq_len=L, layout="packed", pack_bins=bins), **QUIET)
    rows = samples(tmp_path / "out")
    assert m["counts"]["splits"]["train"]["samples"] == len(rows)
    segs = []
    for r in rows:
        ids, lens = r["input_ids"].tolist(), r["doc_lens"].tolist()
        assert sum(lens) == len(ids) <= L + 1 and all(n > 0 for n in lens)
        pos = 0
        for n in lens:
            segs.append(ids[pos:pos + n])
            pos += n
    assert m["counts"]["splits"]["train"]["padding_tokens"] == sum(L + 1 - len(r["input_ids"]) for r in rows)
    assert all(len(tok.encode(t)) < L for i, t in enumerate(texts) if i != 30)
    long_ids = tok.encode(texts[30]) + [tok.eos_id]
    # the long document: full rows of L+1 tokens sharing one token, then its remainder
    pieces = [s for s in segs if s and set(s) <= set(long_ids) and len(s) > 1 and
              any(s == long_ids[k:k + len(s)] for k in range(0, len(long_ids), L))]
    rebuilt = pieces[0] + sum((p[1:] for p in pieces[1:]), [])
    assert rebuilt == long_ids
    short = [s for s in segs if s not in pieces]
    want = [tok.encode(t) + [tok.eos_id] for i, t in enumerate(texts) if i != 30]
    if bins == 1:  # next-fit keeps document order
        assert short == want
    else:
        assert sorted(map(tuple, short)) == sorted(map(tuple, want))
        assert m["counts"]["splits"]["train"]["padding_tokens"] < 0.1 * len(rows) * (L + 1)  # tight packing


def test_formats_dirs_globs_units_and_split(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    texts = CHAPTERS[:24]
    jsonl(d / "a.jsonl", texts[:6])
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"meta": {"body": t}}) + "\n" for t in texts[6:9]))
    (d / "sub" / "c.txt").write_text(texts[9])  # one document per file
    (d / "sub" / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[10].encode()))
    pq.write_table(pa.table({"meta": [None] * 3, "text": texts[11:14]}), d / "e.parquet", row_group_size=1)
    (d / "notes.md").write_text("skipped")
    (d / ".hidden.txt").write_text("hidden")
    # the gz file uses another field: a first run reports it, with the fix
    m = prepare([str(d)], tmp_path / "o1", tok, PrepSettings(seq_len=32, layout="concat"), **QUIET)
    assert m["counts"]["documents"]["rejected"] == {"missing_field": 3}
    assert "pass --text-field" in m["errors"][0]["message"] and "b.jsonl.gz:1" in m["errors"][0]["message"]
    assert m["counts"]["files"]["read"] == 5 and m["skipped_files"] == [str(d / "notes.md")]
    assert m["counts"]["documents"]["written"] == 6 + 2 + 3
    # byte-range units give the same documents as whole files; val split by document with a seed
    big = jsonl(tmp_path / "big.jsonl", texts)
    kw = dict(seq_len=32, layout="concat", val_fraction=0.3, seed=7)
    a = prepare([str(big)], tmp_path / "o2", tok, PrepSettings(**kw), workers=2, **QUIET)
    b = prepare([str(tmp_path / "big.*")], tmp_path / "o3", tok, PrepSettings(unit_bytes=3000, **kw), workers=2, **QUIET)
    assert b["units"] > 5 and a["units"] == 1
    for split in ("train", "val"):
        assert a["counts"]["splits"][split]["documents"] == b["counts"]["splits"][split]["documents"]
        assert a["counts"]["splits"][split]["tokens"] == b["counts"]["splits"][split]["tokens"]
    assert 0 < a["counts"]["splits"]["val"]["documents"] < 24
    # each sample stays within one unit, so the documents come out whole and in order per split
    for out, m2 in ((tmp_path / "o2", a),):
        docs = [tok.decode(x) for s in ("train", "val") for x in split_docs(stream_of(samples(out, s), 32), tok.eos_id)]
        assert sorted(docs) == sorted(texts)


def test_txt_modes_and_huge_documents(tok, tmp_path):
    lines = ["first line", "", "second paragraph", "still second", "", "", "third"]
    p = tmp_path / "x.txt"
    p.write_text("\n".join(lines) + "\n")
    for mode, n in (("line", 4), ("paragraph", 3), ("file", 1)):
        m = prepare([str(p)], tmp_path / mode, tok, PrepSettings(seq_len=16, layout="concat", txt_mode=mode), **QUIET)
        assert m["counts"]["documents"]["written"] == n
    docs = split_docs(stream_of(samples(tmp_path / "paragraph"), 16), tok.eos_id)
    assert [tok.decode(x) for x in docs] == ["first line", "second paragraph\nstill second", "third"]
    # a document larger than the read chunk is streamed in pieces, with exactly the ids of the whole
    text = " ".join(CHAPTERS[:20])
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "h.txt").write_text(text)
    m = prepare([str(tmp_path / "huge")], tmp_path / "hout", tok,
                PrepSettings(seq_len=64, layout="concat", chunk_chars=4096), **QUIET)
    assert m["counts"]["documents"] == {"read": 1, "written": 1, "rejected": {}, "utf8_replaced": 0}
    assert stream_of(samples(tmp_path / "hout"), 64) == tok.encode(text) + [tok.eos_id]


def test_bad_input_messages_and_counts(tok, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = CHAPTERS[0]
    with open(d / "a.jsonl", "wb") as f:
        f.write((json.dumps({"text": good}) + "\n").encode())  # line 1 ok
        f.write(b'{"text": "broken\n')  # line 2 malformed
        f.write((json.dumps({"body": "x"}) + "\n").encode())  # line 3 missing field
        f.write((json.dumps({"text": "   "}) + "\n").encode())  # line 4 empty
        f.write(b'{"text": "caf\xe9 latin-1"}\n')  # line 5 invalid utf-8
        f.write((json.dumps({"text": 5}) + "\n").encode())  # line 6 wrong type
        f.write(b"[1, 2]\n")  # line 7 not an object
        f.write(b"\n")  # blank line: no document
        f.write((json.dumps({"text": good}) + "\n").encode())  # line 9 ok
    (d / "b.txt").write_bytes(b"\x00\x01binary\x00data")
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in CHAPTERS[:600]).encode())
    (d / "c.jsonl.gz").write_bytes(whole[:-3000])  # truncated archive
    for mode, want_written in (("replace", 3 + 1), ("reject", 2 + 1)):
        out = tmp_path / f"out-{mode}"
        m = prepare([str(d)], out, tok, PrepSettings(seq_len=64, invalid_utf8=mode), **QUIET)
        c = m["counts"]
        rejected = {"malformed_json": 2, "missing_field": 1, "empty": 1, "bad_field_type": 1}
        if mode == "reject":
            rejected["invalid_utf8"] = 1
        assert c["documents"]["rejected"] == rejected
        assert c["documents"]["utf8_replaced"] == (mode == "replace")
        gz_docs = c["documents"]["read"] - 8
        assert 0 < gz_docs < 600  # the truncated archive: documents before the damage are kept
        assert c["documents"]["written"] == want_written + gz_docs - 1
        assert c["documents"]["read"] == c["documents"]["written"] + sum(rejected.values())
        assert c["files"]["rejected"] == {"binary": 1, "unreadable": 1}
        msgs = [json.loads(line)["message"] for line in open(out / "errors.jsonl")]
        a = str(d / "a.jsonl")
        assert any(s.startswith(f"{a}:2: document rejected [malformed_json]") and "fix or remove the line" in s for s in msgs)
        assert any(s.startswith(f"{a}:3: document rejected [missing_field]") and "keys: body" in s for s in msgs)
        assert any(s.startswith(f"{a}:4: document rejected [empty]") for s in msgs)
        assert any(s.startswith(f"{a}:6: document rejected [bad_field_type]") for s in msgs)
        assert any(s.startswith(f"{a}:7: document rejected [malformed_json]") and "not an object" in s for s in msgs)
        assert any(s.startswith(f"{d / 'b.txt'}: file rejected [binary]") for s in msgs)
        assert any(s.startswith(f"{d / 'c.jsonl.gz'}: file rejected [unreadable]") for s in msgs)
        if mode == "reject":
            assert any(s.startswith(f"{a}:5: document rejected [invalid_utf8]") and "--invalid-utf8 replace" in s
                       for s in msgs)
    # --strict: the first bad input stops the run, naming file:line and the fix; nothing looks complete
    with pytest.raises(StrictStop, match=r"a\.jsonl:2: document rejected \[malformed_json\].*--strict"):
        prepare([str(d / "a.jsonl")], tmp_path / "strict", tok, PrepSettings(seq_len=64), strict=True, **QUIET)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    # line numbers are exact in later byte ranges of a file too
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(300)]
    lines[250] = "{oops"
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    m = prepare([str(tmp_path / "many.jsonl")], tmp_path / "many", tok,
                PrepSettings(seq_len=64, unit_bytes=1000), workers=2, **QUIET)
    assert m["units"] > 3 and m["errors"][0]["line"] == 251
    r = subprocess.run([sys.executable, "-m", "megamom.cli", "prep", str(tmp_path / "many.jsonl"), "--out",
                        str(tmp_path / "many2"), "--tokenizer", tok.path, "--strict", "--unit-size", "1000",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "many.jsonl:251: document rejected [malformed_json]" in r.stderr
    with pytest.raises(PrepError, match="does not exist"):
        prepare([str(tmp_path / "nope.jsonl")], tmp_path / "x", tok, **QUIET)
    with pytest.raises(PrepError, match="unsupported file type"):
        prepare([str(tmp_path / "bad" / "a.jsonl"), str(corpus_path().parent / "__init__.py")], tmp_path / "x", tok,
                **QUIET)


def test_idempotent_and_refuses_other_settings(tok, tmp_path):
    src = jsonl(tmp_path / "a.jsonl", CHAPTERS[:10])
    out = tmp_path / "out"
    m1 = prepare([str(src)], out, tok, PrepSettings(seq_len=32), **QUIET)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    m2 = prepare([str(src)], out, tok, PrepSettings(seq_len=32), **QUIET)
    assert m1 == m2 and before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PrepError, match="other inputs or settings.*seq_len: 32 -> 64.*--overwrite"):
        prepare([str(src)], out, tok, PrepSettings(seq_len=64), **QUIET)
    m3 = prepare([str(src)], out, tok, PrepSettings(seq_len=64), overwrite=True, **QUIET)
    assert m3["seq_len"] == 64 and read_manifest(out)["seq_len"] == 64
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(PrepError, match="is no prep output"):
        prepare([str(src)], tmp_path / "other", tok, overwrite=True, **QUIET)
    assert (tmp_path / "other" / "keep.txt").exists()


def test_kill_midway_then_resume_equals_uninterrupted(tok, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(12):
        jsonl(d / f"part{i:02d}.jsonl", CHAPTERS[i * 40:(i + 1) * 40])
    # files of 91-221 kB: units of 230 kB hold one file each (no two fit), 12 units
    args = [d.as_posix(), "--tokenizer", tok.path, "--seq-len", "64", "--val-fraction", "0.1", "--workers", "1",
            "--unit-size", "230000", "--no-progress"]
    cmd = [sys.executable, "-m", "megamom.cli", "prep"]
    ref = tmp_path / "ref"
    assert subprocess.run(cmd + args + ["--out", str(ref)], capture_output=True).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    units = out / ".prep" / "units"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(units.glob("*.json")) if units.is_dir() else []) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 3 <= done < 12, done
    with pytest.raises(PrepError, match="no manifest.json.*unfinished run"):
        read_manifest(out)
    r = subprocess.run(cmd + args + ["--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and f"resuming: {done} of 12 units finished already" in r.stderr
    assert tree(out) == tree(ref)  # byte for byte, manifest included


def test_lone_surrogate_escape_is_replaced_or_rejected_like_invalid_utf8(tok, tmp_path):
    src = tmp_path / "s.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"text": "hello \\ud800 world"}\n')  # line 2: a lone surrogate escape
        f.write(b'{"text": "pair \\ud83d\\ude00 ok"}\n')  # a valid pair: an emoji, untouched
    m = prepare([str(src)], tmp_path / "rep", tok, PrepSettings(seq_len=64, layout="concat"), **QUIET)
    assert m["counts"]["documents"] == {"read": 3, "written": 3, "rejected": {}, "utf8_replaced": 1}
    docs = [tok.decode(x) for x in split_docs(stream_of(samples(tmp_path / "rep"), 64), tok.eos_id)]
    assert docs == ["good one", "hello \ufffd world", "pair \U0001F600 ok"]
    m = prepare([str(src)], tmp_path / "rej", tok, PrepSettings(seq_len=64, invalid_utf8="reject"), **QUIET)
    assert m["counts"]["documents"] == {"read": 3, "written": 2, "rejected": {"invalid_utf8": 1}, "utf8_replaced": 0}
    msg = m["errors"][0]["message"]
    assert msg.startswith(f"{src}:2: document rejected [invalid_utf8]") and "lone surrogate" in msg


def test_truncated_archive_rejects_the_document_it_cut(tok, tmp_path):
    import random

    d = tmp_path / "in"
    d.mkdir()
    # one document per file: the archive ends inside it
    whole = gzip.compress(" ".join(CHAPTERS[:40]).encode())
    (d / "t.txt.gz").write_bytes(whole[: len(whole) // 2])
    jsonl(d / "ok.jsonl", CHAPTERS[:2])
    for chunk in (1 << 20, 4096):  # whole in memory / streamed in pieces
        m = prepare([str(d)], tmp_path / f"o{chunk}", tok,
                    PrepSettings(seq_len=64, chunk_chars=chunk), **QUIET)
        c = m["counts"]
        assert c["documents"] == {"read": 3, "written": 2, "rejected": {"truncated": 1}, "utf8_replaced": 0}
        assert c["files"]["rejected"] == {"unreadable": 1}
        msgs = [b["message"] for b in m["errors"]]
        assert any(s.startswith(f"{d / 't.txt.gz'}: file rejected [unreadable]") for s in msgs)
        assert any(s.startswith(f"{d / 't.txt.gz'}") and "[truncated]" in s for s in msgs)
    # line mode: short lines, then a long line (streamed in pieces) that the archive cuts
    rng = random.Random(0)
    words = " ".join(CHAPTERS[:50]).split()
    lines = [f"line {i}" for i in range(30)] + [" ".join(rng.choice(words) for _ in range(500000))]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp_path / "l.txt.gz").write_bytes(whole[: int(len(whole) * 0.9)])
    m = prepare([str(tmp_path / "l.txt.gz")], tmp_path / "lines", tok,
                PrepSettings(seq_len=64, txt_mode="line", chunk_chars=4096), **QUIET)
    c = m["counts"]["documents"]
    assert c["rejected"] == {"truncated": 1} and c["read"] == c["written"] + 1 == 31
    bad = [b for b in m["errors"] if b["reason"] == "truncated"][0]
    assert bad["line"] == 31 and bad["message"].startswith(f"{tmp_path / 'l.txt.gz'}:31: document rejected")


def test_line_numbers_of_compressed_files_count_decompressed_lines(tmp_path):
    import zstandard

    from megamom.data_prep.errors import BadInput
    from megamom.data_prep.prep import _resolve_lines

    text = "".join(json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) + "\n" for i in range(500)).encode()
    starts = [0] + [i + 1 for i, b in enumerate(text) if b == ord("\n")][:-1]
    for name, data in (("a.jsonl", text), ("b.jsonl.gz", gzip.compress(text)),
                       ("c.jsonl.zst", zstandard.ZstdCompressor().compress(text))):
        (tmp_path / name).write_bytes(data)
        bads = [BadInput("document", "malformed_json", str(tmp_path / name), None, starts[k]) for k in (0, 249, 499)]
        assert [b.line for b in _resolve_lines(bads)] == [1, 250, 500], name


def test_binary_file_split_into_units_is_rejected_once(tok, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "bin.jsonl").write_bytes(b"\x00\x01" * 20000)  # 40 kB, many units of 1000 bytes
    jsonl(d / "ok.jsonl", ["fine text"])
    m = prepare([str(d)], tmp_path / "out", tok, PrepSettings(seq_len=64, unit_bytes=1000), workers=2, **QUIET)
    c = m["counts"]
    assert c["files"]["rejected"] == {"binary": 1} and c["bad_total"] == 1
    assert c["documents"] == {"read": 1, "written": 1, "rejected": {}, "utf8_replaced": 0}
    assert [b["message"].split(":")[0] for b in m["errors"]] == [str(d / "bin.jsonl")]


def test_compression_none_and_out_that_is_a_file(tok, tmp_path):
    from megamom.cli import main

    src = jsonl(tmp_path / "a.jsonl", CHAPTERS[:3])
    m = prepare([str(src)], tmp_path / "out", tok, PrepSettings(seq_len=64, compression="none"), **QUIET)
    assert m["settings"]["compression"] is None and m["counts"]["documents"]["written"] == 3
    shards = sorted(p.name for p in (tmp_path / "out" / "train").rglob("shard.*"))
    assert shards and all(s.endswith(".mds") for s in shards)
    assert PrepSettings(compression="none") == PrepSettings(compression=None)
    assert main(["prep", str(src), "--out", str(tmp_path / "cli"), "--tokenizer", tok.path, "--seq-len", "64",
                 "--compression", "none", "--workers", "1", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "cli")["settings"]["compression"] is None
    # an --out that is a regular file: a clear error naming it, the file untouched
    f = tmp_path / "file.txt"
    f.write_text("keep")
    with pytest.raises(PrepError, match=r"file\.txt.*exists and is a file"):
        prepare([str(src)], f, tok, **QUIET)
    assert f.read_text() == "keep"
    from megamom.convert.errors import ConvertError
    from megamom.convert.outdir import check_out

    with pytest.raises(ConvertError, match="exists and is a file"):
        check_out(f, overwrite=True)


def test_sizes_parse_once_and_bad_ones_are_usage_errors(capsys):
    import argparse

    from megamom.convert.errors import ConvertError
    from megamom.convert.hf_io import parse_size
    from megamom.data_prep.cli import add_arguments

    parser = argparse.ArgumentParser(prog="prep")
    add_arguments(parser)
    base = ["x.jsonl", "--out", "o", "--tokenizer", "t"]
    a = parser.parse_args(base + ["--unit-size", "64MiB", "--shard-size", "500MB", "--max-line-bytes", "64k"])
    assert (a.unit_size, a.shard_size, a.max_line_bytes) == (64 << 20, 500 * 10**6, 64000)
    assert parser.parse_args(base).unit_size == 64 << 20  # defaults go through the same parser
    for bad in ("5ib", "lots", "0"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(base + ["--unit-size", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--unit-size" in err and repr(bad) in err
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size(123) == 123
    with pytest.raises(ConvertError, match="shard size '5ib'"):
        parse_size("5ib")


def test_small_files_are_grouped_into_units_of_about_unit_size(tok, tmp_path):
    from megamom.data_prep.inputs import discover, plan_units

    d = tmp_path / "in"
    d.mkdir()
    for i in range(60):  # 60 one-document files of 1-8 kB
        (d / f"f{i:02d}.txt").write_text(CHAPTERS[i])
    files, _ = discover([str(d)])
    biggest, unit = max(f.size for f in files), 40_000
    plan = plan_units(files, "file", unit)
    # consecutive files, each once, in order; every unit but the last holds more than
    # unit_bytes - (the largest file) and at most unit_bytes
    assert [p.file.path for u in plan for p in u.parts] == [f.path for f in files]
    assert all(unit - biggest < u.size <= unit for u in plan[:-1]) and len(plan) < 60 // 4
    m = prepare([str(d)], tmp_path / "out", tok, PrepSettings(seq_len=4096, unit_bytes=unit), workers=2, **QUIET)
    assert m["units"] == len(plan) and m["counts"]["documents"]["written"] == 60
    assert sorted(x.name for x in (tmp_path / "out" / "train").iterdir()) == sorted(
        [u.uid for u in plan] + ["index.json"])  # one sub-dataset (and here one shard) per unit
    docs = []
    for r in samples(tmp_path / "out"):
        ids, s = r["input_ids"].tolist(), 0
        for n in r["doc_lens"].tolist():
            assert ids[s + n - 1] == tok.eos_id
            docs.append(tok.decode(ids[s:s + n - 1]))
            s += n
    assert sorted(docs) == sorted(CHAPTERS[:60])


def test_job_array_tasks_and_merge_equal_one_run(tok, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(30):
        jsonl(d / f"p{i:02d}.jsonl", CHAPTERS[i * 10:(i + 1) * 10])
    kw = dict(seq_len=64, val_fraction=0.2, unit_bytes=60_000)
    ref = prepare([str(d)], tmp_path / "ref", tok, PrepSettings(**kw), workers=2, **QUIET)
    assert ref["units"] >= 5
    out = tmp_path / "arr"
    # task 1 of 3 "fails" (never runs): the merge names it and writes nothing
    for i in (0, 2):
        assert prepare([str(d)], out, tok, PrepSettings(**kw), workers=1, task=i, tasks=3, **QUIET) is None
    with pytest.raises(PrepError, match=r"not finished.*array task\(s\) 1 of 3.*--array=1"):
        prepare([str(d)], out, tok, PrepSettings(**kw), merge=True, tasks=3, **QUIET)
    assert not (out / "manifest.json").exists()
    prepare([str(d)], out, tok, PrepSettings(**kw), workers=1, task=1, tasks=3, **QUIET)  # rerun alone
    m = prepare([str(d)], out, tok, PrepSettings(**kw), merge=True, tasks=3, **QUIET)
    assert m == ref and tree(out) == tree(tmp_path / "ref")
    # a rerun of a task or of the merge changes nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    prepare([str(d)], out, tok, PrepSettings(**kw), task=2, tasks=3, **QUIET)
    prepare([str(d)], out, tok, PrepSettings(**kw), merge=True, tasks=3, **QUIET)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for bad, match in ((dict(task=3, tasks=3), r"--task 3 is not in \[0, 3\).*--array=0-2"),
                       (dict(task=0), "needs --tasks N"), (dict(task=0, tasks=2, merge=True), "two steps"),
                       (dict(task=0, tasks=2, overwrite=True), "--overwrite cannot be used in a job array")):
        with pytest.raises(PrepError, match=match):
            prepare([str(d)], tmp_path / "never", tok, PrepSettings(**kw), **bad, **QUIET)
        assert not (tmp_path / "never").exists()
