"""The training / evaluation loader over prepared datasets (mosaicml-streaming underneath).

`build_loader(...)` -> `ShardLoader`: iterating it yields batches forever (epoch after epoch), each a
dict of int64 tensors `input_ids` [B, T], `labels` [B, T] (next tokens; -100 where there is no
target: padding, and for packed data the last position of each document) and, for packed data,
`segment_ids` [B, T] (document number within the row, from 0, non-decreasing; padding gets a
segment of its own).

Partitioning: the samples of an epoch are split disjointly across data-parallel ranks and cover the
epoch (streaming pads the last partition by repeating a few samples so all ranks take the same
number of steps). Ranks that share a sequence (tensor / sequence parallel groups) pass the same
`dp_rank` and get identical batches: streaming's `replication`, with the process layout handed to
it explicitly, so any placement of the groups works as long as a group does not span nodes.

Resume: `state_dict()` is (epoch, samples of the epoch consumed by all ranks, shuffle state);
`load_state_dict()` before iterating continues with exactly the batch that would have come next.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import numpy as np
import torch

from ..config import ConfigError, DataConfig

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Datasets: local directories and remote paths with a local cache
# ---------------------------------------------------------------------------------------------

class Source:
    """One prepared dataset: where streaming reads it (`remote`, `local`) and its manifest."""

    def __init__(self, path: str, cache_dir: Optional[str], download_timeout: float):
        self.path = str(path)
        scheme = urlparse(self.path).scheme
        if scheme == "file":  # a local directory used as a remote (e.g. a slow shared filesystem)
            remote = urlparse(self.path).path
        elif scheme and len(scheme) > 1:  # s3://, gs://, oci://, hf://, ... (one letter: a drive)
            remote = self.path
        else:
            remote = None
        self.remote = remote
        if remote is None:
            self.local = os.path.abspath(os.path.expanduser(self.path))
            manifest_dir = self.local
        else:
            root = Path(cache_dir or os.environ.get("MEGAMOM_CACHE", Path.home() / ".cache" / "megamom")) / "streaming"
            self.local = str(root / hashlib.sha1(remote.encode()).hexdigest()[:16])
            manifest_dir = self.local
            self._fetch_manifest(download_timeout)
        from megamom.data_prep import PrepError, read_manifest

        try:
            self.manifest = read_manifest(manifest_dir)
        except PrepError as e:
            raise ConfigError(f"data.paths entry {self.path!r}: {e}") from None

    def _fetch_manifest(self, timeout: float) -> None:
        from megamom.data_prep import MANIFEST

        from .streaming_compat import download_file

        os.makedirs(self.local, exist_ok=True)
        dst = os.path.join(self.local, MANIFEST)
        src = f"{self.remote.rstrip('/')}/{MANIFEST}"
        tmp = f"{dst}.{os.getpid()}.part"
        try:
            download_file(src, tmp, timeout)
            os.replace(tmp, dst)
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not os.path.exists(dst):
                raise ConfigError(f"data.paths entry {self.path!r}: cannot fetch {src} ({e}); check the path "
                                  "and credentials") from None


def _sources(cfg: DataConfig, split: str) -> list[Source]:
    if not cfg.paths:
        raise ConfigError("data.paths is empty: set it to prepared dataset directories (`megamom prep ... "
                          "--out DIR`), or leave it empty in `megamom train` to use the shipped corpus")
    sources = [Source(p, cfg.cache_dir, cfg.download_timeout) for p in cfg.paths]
    first = sources[0].manifest
    for s in sources:
        m = s.manifest
        if m["seq_len"] != cfg.seq_len:
            raise ConfigError(f"data.seq_len={cfg.seq_len} but {s.path!r} was prepared with seq_len={m['seq_len']}; "
                              f"set data.seq_len={m['seq_len']} or prepare it again with --seq-len {cfg.seq_len}")
        if m["tokenizer"]["hash"] != first["tokenizer"]["hash"]:
            raise ConfigError(f"{s.path!r} and {sources[0].path!r} were tokenized with different tokenizers "
                              f"({m['tokenizer']['hash'][:19]}... vs {first['tokenizer']['hash'][:19]}...); "
                              "prepare all datasets of a mixture with the same tokenizer")
        if m["layout"] != first["layout"]:
            raise ConfigError(f"{s.path!r} has layout {m['layout']} but {sources[0].path!r} has {first['layout']}; "
                              "prepare all datasets of a mixture with the same --layout")
        if not m["splits"].get(split):
            fix = ("it was prepared with --val-fraction 0; prepare it again with `megamom prep ... --val-fraction "
                   "0.01`" if split == "val" else "every document went to the validation split; prepare it again "
                   "with a lower --val-fraction or more documents (a .txt file is one document)")
            raise ConfigError(f"{s.path!r} has no {split!r} split ({fix}), or point data.paths elsewhere")
    if cfg.tokenizer:
        from megamom.tokenizer import load_tokenizer

        tok_hash = load_tokenizer(cfg.tokenizer).hash
        if tok_hash != first["tokenizer"]["hash"]:
            raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} ({tok_hash[:19]}...) is not the tokenizer "
                              f"{sources[0].path!r} was prepared with ({first['tokenizer']['hash'][:19]}..., "
                              f"{first['tokenizer']['path']!r}); use that one or prepare the data again")
    return sources


# ---------------------------------------------------------------------------------------------
# Process layout handed to streaming
# ---------------------------------------------------------------------------------------------

def _process_world() -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from the launcher's environment, else from
    torch.distributed (local ranks then found by host name), else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        lws = int(env.get("LOCAL_WORLD_SIZE", world))
        return rank, world, int(env.get("LOCAL_RANK", rank % lws)), lws
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        hosts: list = [None] * world
        torch.distributed.all_gather_object(hosts, socket.gethostname())
        mine = [r for r in range(world) if hosts[r] == hosts[rank]]
        return rank, world, mine.index(rank), len(mine)
    return 0, 1, 0, 1


def _streaming_layout(dp_rank: int, dp_size: int) -> tuple[dict, Optional[int]]:
    """The RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE streaming should see, and its
    `replication`: streaming gives consecutive ranks [k*r, (k+1)*r) the same samples, so each
    process is presented at position dp_rank * r + (its index in its group)."""
    rank, world, local_rank, lws = _process_world()
    if not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if world % dp_size:
        raise ConfigError(f"dp_size={dp_size} does not divide the {world} processes")
    rep = world // dp_size
    if rep == 1:
        index = 0
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks: list = [None] * world
        torch.distributed.all_gather_object(ranks, dp_rank)
        members = [r for r in range(world) if ranks[r] == dp_rank]
        sizes = {d: ranks.count(d) for d in range(dp_size)}
        if any(n != rep for n in sizes.values()):
            raise ConfigError(f"every dp_rank must be shared by {rep} processes (world {world} / dp_size "
                              f"{dp_size}); got {sizes}")
        index = members.index(rank)
    else:
        if dp_rank != rank // rep:
            raise ConfigError(f"rank {rank} got dp_rank={dp_rank}; without torch.distributed only consecutive "
                              f"groups are known (dp_rank = rank // {rep}); initialise torch.distributed first")
        index = rank % rep
    presented = dp_rank * rep + index
    if presented // lws != rank // lws:
        raise ConfigError(f"rank {rank}'s sequence-parallel group spans nodes (it would read as rank {presented}); "
                          "streaming shares its cache per node: keep each group on one node")
    env = {"RANK": presented, "WORLD_SIZE": world, "LOCAL_RANK": presented % lws, "LOCAL_WORLD_SIZE": lws}
    return {k: str(v) for k, v in env.items()}, (rep if rep > 1 else None)


@contextlib.contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

class Collate:
    """Samples -> padded int64 tensors with labels (and segment ids for packed rows). A sample with a
    `loss_mask` (megamom prep-mqar) has a label only where its mask marks the token to predict."""

    def __init__(self, seq_len: int, packed: bool, pad_id: int):
        self.C, self.packed, self.pad = seq_len + 1, packed, pad_id

    def __call__(self, samples: list[dict]) -> dict:
        B, C = len(samples), self.C
        tokens = np.full((B, C), self.pad, dtype=np.int64)
        valid = np.zeros((B, C), dtype=bool)
        seg = np.zeros((B, C), dtype=np.int64)
        for i, s in enumerate(samples):
            ids = s["input_ids"]
            n = min(len(ids), C)
            tokens[i, :n] = ids[:n]
            valid[i, :n] = s["loss_mask"][:n].astype(bool) if "loss_mask" in s else True
            if self.packed:
                lens = np.asarray(s["doc_lens"], dtype=np.int64)
                seg[i, :n] = np.repeat(np.arange(len(lens)), lens)[:n]
                seg[i, n:] = len(lens)
        labels = tokens[:, 1:].copy()
        labels[~valid[:, 1:]] = -100
        out = {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))}
        if self.packed:
            labels[seg[:, 1:] != seg[:, :-1]] = -100  # no target across a document boundary
            out["segment_ids"] = torch.from_numpy(np.ascontiguousarray(seg[:, :-1]))
        out["labels"] = torch.from_numpy(labels)
        return out


class ShardLoader:
    """Iterates batches over epochs; `state_dict()` / `load_state_dict()` resume exactly.

    The epoch number counts from 0; after the last full batch of an epoch the next epoch starts
    with a new shuffle (seeded by `seed` and the epoch). Stop by breaking out of the loop.
    """

    def __init__(self, dataset, *, batch_size: int, dp_size: int, collate: Collate, num_workers: int,
                 fingerprints: list, split: str):
        self.dataset = dataset
        self.batch_size, self.dp_size = batch_size, dp_size
        self.collate, self.num_workers = collate, num_workers
        self.fingerprints, self.split = fingerprints, split
        self.epoch = 0
        self._offset = 0  # samples of this epoch (all ranks) consumed before this iteration began
        self._yielded = 0  # batches this rank yielded in this epoch since then
        self._iterating = False

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers, drop_last=True,
                          persistent_workers=False, prefetch_factor=2 if self.num_workers else None)

    def __iter__(self) -> Iterator[dict]:
        if self._iterating:
            raise RuntimeError("this loader is being iterated already; build another for a second pass")
        self._iterating = True
        try:
            while True:
                resumed = self._offset > 0
                any_batch = False
                for batch in self._dataloader():
                    any_batch = True
                    self._yielded += 1
                    yield batch
                if not any_batch and not resumed:
                    raise ConfigError(f"the {self.split!r} split has {len(self.dataset) * self.dp_size} samples per "
                                      f"epoch after partitioning, fewer than one batch ({self.batch_size} per rank x "
                                      f"{self.dp_size} ranks); lower the batch size or prepare more data")
                self.epoch += 1
                self._offset, self._yielded = 0, 0
        finally:
            self._iterating = False
            it = getattr(self.dataset, "_iterator", None)
            if it is not None:  # stop streaming's download / ready threads of an abandoned epoch
                it.exit()

    def state_dict(self) -> dict:
        ds = self.dataset
        nodes = ds._parallel_rank_world.num_nodes
        # Before the first epoch starts streaming has not fixed these yet: use what it will pick.
        ncn = ds.num_canonical_nodes or (64 * nodes if ds.shuffle_algo in ("py1s", "py2s") else nodes)
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch,
                "sample_in_epoch": self._offset + self._yielded * self.batch_size * self.dp_size,
                "num_canonical_nodes": ncn, "shuffle_seed": ds.shuffle_seed,
                "initial_physical_nodes": getattr(ds, "initial_physical_nodes", None) or nodes,
                "batch_size": self.batch_size, "dp_size": self.dp_size, "datasets": self.fingerprints}

    def load_state_dict(self, sd: dict) -> None:
        if self._iterating:
            raise RuntimeError("load_state_dict() must be called before iterating the loader")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')} is not {STATE_VERSION}")
        if sd.get("datasets") != self.fingerprints:
            raise ConfigError("the checkpoint's loader state is for other datasets (data.paths or their contents "
                              "changed): resuming would not continue the same sample order; restore the datasets "
                              "or start the data from scratch")
        self.epoch, self._offset, self._yielded = int(sd["epoch"]), int(sd["sample_in_epoch"]), 0
        self.dataset.load_state_dict({k: sd[k] for k in ("epoch", "sample_in_epoch", "num_canonical_nodes",
                                                        "shuffle_seed", "initial_physical_nodes")})


def build_loader(data_cfg: DataConfig, *, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: Optional[bool] = None) -> ShardLoader:
    """A loader over `data_cfg.paths` (mixed by `data_cfg.weights`) for one data-parallel rank."""
    from .streaming_compat import Stream, StreamingDataset, clean_stale_filelocks

    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r} must be 'train' or 'val'")
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size={micro_batch_size} must be >= 1")
    data_cfg.validate()
    sources = _sources(data_cfg, split)
    weights = data_cfg.weights
    if weights is not None and sum(float(w) for w in weights) <= 0:
        raise ConfigError("data.weights must not all be zero")
    streams = []
    for i, s in enumerate(sources):
        kw = {}
        if weights is not None:
            if float(weights[i]) == 0:
                continue
            kw["proportion"] = float(weights[i]) / sum(float(w) for w in weights)
        streams.append(Stream(remote=s.remote, local=s.local, split=split, **kw))
    if shuffle is None:
        shuffle = data_cfg.shuffle and split == "train"
    env, replication = _streaming_layout(dp_rank, dp_size)
    if env["LOCAL_RANK"] == "0":
        clean_stale_filelocks()
    m = sources[0].manifest
    tok = m["tokenizer"]
    pad = next(i for i in (tok.get("pad_id"), tok.get("eos_id"), 0) if i is not None)
    with _env(env):
        dataset = StreamingDataset(
            streams=streams, batch_size=micro_batch_size, shuffle=shuffle, shuffle_seed=seed,
            shuffle_algo=data_cfg.shuffle_algo, shuffle_block_size=data_cfg.shuffle_block_size,
            num_canonical_nodes=data_cfg.num_canonical_nodes, replication=replication,
            cache_limit=data_cfg.cache_limit, predownload=data_cfg.predownload,
            download_timeout=data_cfg.download_timeout, allow_unsafe_types=False)
    collate = Collate(data_cfg.seq_len, m["layout"] == "packed", pad)
    return ShardLoader(dataset, batch_size=micro_batch_size, dp_size=dp_size, collate=collate,
                       num_workers=data_cfg.num_workers, split=split,
                       fingerprints=[s.manifest["fingerprint"] for s in sources])


def datasets_without_split(data_cfg: DataConfig, split: str) -> list[str]:
    """The data.paths entries that hold no `split` (e.g. prepared with --val-fraction 0)."""
    return [p for p in data_cfg.paths
            if not Source(p, data_cfg.cache_dir, data_cfg.download_timeout).manifest["splits"].get(split)]

