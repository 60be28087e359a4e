"""Loader: batches (labels, segment ids, padding), determinism per seed, exact mid-epoch resume (also
across epochs), epochs looping, mixture weights, remote path with a local cache, clear config errors,
and with 2 and 4 gloo processes: data-parallel ranks disjoint and complete, ranks of one sequence
group identical. Also the default dataset (shipped corpus)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megamom.config import ConfigError, DataConfig
from megamom.data import build_loader, ensure_default_dataset, load_tokenizer
from megamom.data_prep import PrepSettings, prepare
from megamom.tokenizer import TrainSpec, train_tokenizer

QUIET = dict(progress=False, log=lambda m: None)


def docs(n, tag):
    # every word names its document, so every sample's tokens are unique (samples are told apart by them)
    return [f"{tag} document {i} " + " ".join(f"w{i}.{k}" for k in range(3 + i % 23)) for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = root / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(400, "alpha")))
    src_b = root / "b.jsonl"
    src_b.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(200, "beta")))
    tok = train_tokenizer([str(src), str(src_b)], root / "tok", TrainSpec(vocab_size=300), log=lambda m: None)
    out = {"tok": tok, "root": root}
    for name, s, layout in (("packed", src, "packed"), ("concat", src, "concat"), ("beta", src_b, "packed")):
        prepare([str(s)], root / name, str(tok), PrepSettings(seq_len=32, layout=layout, val_fraction=0.1),
                **QUIET)
        out[name] = root / name
    return out


def cfg(*paths, **kw):
    return DataConfig(paths=[str(p) for p in paths], seq_len=32, **kw)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_packed_and_concat(data):
    tok = load_tokenizer(data["tok"])
    b = take(build_loader(cfg(data["packed"]), split="train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=0), 1)[0]
    assert set(b) == {"input_ids", "labels", "segment_ids"}
    for v in b.values():
        assert v.shape == (4, 32) and v.dtype == torch.int64
    ids, lab, seg = b["input_ids"], b["labels"], b["segment_ids"]
    assert (seg[:, 1:] >= seg[:, :-1]).all() and (seg[:, 0] == 0).all()
    same_doc = seg[:, 1:] == seg[:, :-1]
    # the label is the next token inside a document, -100 at its last position
    assert torch.equal(lab[:, :-1][same_doc], ids[:, 1:][same_doc])
    assert (lab[:, :-1][~same_doc] == -100).all()
    ends = (ids == tok.eos_id)
    assert (lab[ends] == -100).all()  # after EOS comes another document (or padding): no target
    c = take(build_loader(cfg(data["concat"]), split="train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=0), 1)[0]
    assert set(c) == {"input_ids", "labels"} and torch.equal(c["labels"][:, :-1], c["input_ids"][:, 1:])
    # the short last sample of a unit is padded and masked
    ld = build_loader(cfg(data["concat"]), split="train", micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                      shuffle=False)
    rows = take(ld, len(ld))
    assert rows[-1]["labels"][0, -1] == -100 and all(r["labels"][0, -1] != -100 for r in rows[:-1])


def test_determinism_resume_and_epochs(data):
    def mk(seed=0):
        return build_loader(cfg(data["packed"]), split="train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=seed)

    ld = mk()
    per_epoch = len(ld)
    assert per_epoch > 5
    ref = take(ld, 2 * per_epoch + 3)  # loops over epochs
    assert same(take(mk(), 7), ref[:7]) and not same(take(mk(seed=1), 7), ref[:7])
    assert not same(ref[:per_epoch], ref[per_epoch:2 * per_epoch])  # each epoch reshuffles
    for stop in (3, per_epoch, per_epoch + 2):  # mid-epoch, at the end of an epoch, into the second
        a = mk()
        it = iter(a)
        got = [next(it) for _ in range(stop)]
        sd = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoints)
        assert sd["epoch"] == (stop - 1) // per_epoch
        b = mk()
        b.load_state_dict(sd)
        got += take(b, 6)
        assert same(got, ref[:stop + 6]), stop
    with pytest.raises(ConfigError, match="other datasets"):
        c = build_loader(cfg(data["concat"]), split="train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
        c.load_state_dict(sd)


def test_mixture_remote_cache_and_errors(data, tmp_path):
    # mixture weights 3:1 over two datasets of 400 / 200 documents
    ld = build_loader(cfg(data["packed"], data["beta"], weights=[3, 1]), split="train", micro_batch_size=8,
                      dp_rank=0, dp_size=1, seed=0)
    tok = load_tokenizer(data["tok"])
    rows = [tok.decode(r.tolist()) for b in take(ld, len(ld)) for r in b["input_ids"]]
    assert not any("alpha" in r and "beta" in r for r in rows)  # a packed row holds one dataset's documents
    tagged = [r for r in rows if "alpha" in r or "beta" in r]
    share = sum("alpha" in r for r in tagged) / len(tagged)
    assert 0.65 < share < 0.85
    # a second local directory as the remote, read through a local cache
    remote = f"file://{data['packed']}"
    rc = build_loader(cfg(remote, cache_dir=str(tmp_path / "cache")), split="train", micro_batch_size=4,
                      dp_rank=0, dp_size=1, seed=0)
    lc = build_loader(cfg(data["packed"]), split="train", micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    assert same(take(rc, 5), take(lc, 5))
    cached = list((tmp_path / "cache").rglob("shard.*.mds*"))
    assert cached and (tmp_path / "cache").rglob("manifest.json")
    with pytest.raises(ConfigError, match="data.seq_len=64 but .* seq_len=32"):
        build_loader(DataConfig(paths=[str(data["packed"])], seq_len=64), split="train", micro_batch_size=2,
                     dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        build_loader(cfg(tmp_path), split="train", micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ConfigError, match="layout"):
        build_loader(cfg(data["packed"], data["concat"]), split="train", micro_batch_size=2, dp_rank=0, dp_size=1,
                     seed=0)
    with pytest.raises(ConfigError, match="data.paths is empty"):
        build_loader(cfg(), split="train", micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    other = train_tokenizer([str(data["root"] / "b.jsonl")], tmp_path / "t2", TrainSpec(vocab_size=290), log=lambda m: None)
    with pytest.raises(ConfigError, match="is not the tokenizer"):
        build_loader(cfg(data["packed"], tokenizer=str(other)), split="train", micro_batch_size=2, dp_rank=0,
                     dp_size=1, seed=0)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        take(build_loader(cfg(data["packed"]), split="val", micro_batch_size=10000, dp_rank=0, dp_size=1, seed=0), 1)


WORKER = r"""
import json, os, sys, torch, torch.distributed as dist
from megamom.config import DataConfig
from megamom.data import build_loader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dp_size = int(sys.argv[2])
dp_rank = rank // (world // dp_size)
cfg = DataConfig(paths=[sys.argv[1]], seq_len=32, num_workers=int(sys.argv[3]))
ld = build_loader(cfg, split="train", micro_batch_size=4, dp_rank=dp_rank, dp_size=dp_size, seed=5)
n = len(ld)
it = iter(ld)
rows = [r.tolist() for _ in range(n) for r in next(it)["input_ids"]]
sd = ld.state_dict()
json.dump({"rows": rows, "state": sd, "per_epoch": n, "samples": ld.dataset.num_samples},
          open(os.path.join(sys.argv[4], f"rank{rank}.json"), "w"))
dist.barrier()
dist.destroy_process_group()
"""


def run_ranks(tmp_path, world, dp_size, dataset, workers=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(dataset), str(dp_size), str(workers),
                                       str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_disjoint_and_complete(data, tmp_path, workers):
    res = run_ranks(tmp_path, 2, 2, data["packed"], workers)
    a, b = (set(map(tuple, r["rows"])) for r in res)
    total = res[0]["samples"]
    assert len(res[0]["rows"]) == len(res[1]["rows"]) == res[0]["per_epoch"] * 4
    assert not a & b  # disjoint
    single = build_loader(cfg(data["packed"]), split="train", micro_batch_size=1, dp_rank=0, dp_size=1, seed=5,
                          shuffle=False)
    every = {tuple(x["input_ids"][0].tolist()) for x in take(single, total)}
    assert len(every) == total
    # complete: all samples but the few that did not fill a last batch of 4 per rank
    assert a | b <= every and len(every - (a | b)) < 2 * 4
    assert res[0]["state"]["sample_in_epoch"] == res[0]["per_epoch"] * 4 * 2


def test_sequence_group_ranks_see_identical_samples(data, tmp_path):
    res = run_ranks(tmp_path, 4, 2, data["packed"])  # groups {0, 1} and {2, 3}
    assert res[0]["rows"] == res[1]["rows"] and res[2]["rows"] == res[3]["rows"]
    assert not set(map(tuple, res[0]["rows"])) & set(map(tuple, res[2]["rows"]))
    # the same data parallel partition as 2 plain ranks
    (tmp_path / "plain").mkdir()
    res2 = run_ranks(tmp_path / "plain", 2, 2, data["packed"])
    assert res2[0]["rows"] == res[0]["rows"] and res2[1]["rows"] == res[2]["rows"]


def test_default_dataset(tmp_path):
    t = time.perf_counter()
    d = ensure_default_dataset(tmp_path / "cache", seq_len=128)
    first = time.perf_counter() - t
    t = time.perf_counter()
    d2 = ensure_default_dataset(tmp_path / "cache", seq_len=128)
    assert time.perf_counter() - t < 0.5 and d2.paths == d.paths
    assert first < 60
    tok = load_tokenizer(d.tokenizer_path)
    assert tok.vocab_size == 4096
    m = d.manifest
    assert m["counts"]["documents"]["read"] == m["counts"]["documents"]["written"] == 1189
    assert m["tokenizer"]["hash"] == tok.hash and m["seq_len"] == 128 and m["layout"] == "packed"
    c = DataConfig(paths=[str(p) for p in d.paths], seq_len=128, tokenizer=str(d.tokenizer_path))
    b = take(build_loader(c, split="val", micro_batch_size=8, dp_rank=0, dp_size=1, seed=0), 1)[0]
    assert b["input_ids"].shape == (8, 128) and int(b["input_ids"].max()) < 4096
    assert len(list(Path(tmp_path / "cache").iterdir())) == 3  # tokenizer, dataset, lock file
