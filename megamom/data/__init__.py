"""Data for training: the streaming loader, the default dataset, tokenizers (docs/data.md).

    build_loader(data_cfg, split=, micro_batch_size=, dp_rank=, dp_size=, seed=, shuffle=None)
    ensure_default_dataset(cache_dir, seq_len=128) -> DefaultData(paths, tokenizer_path)
    load_tokenizer(path) -> Tokenizer (encode, decode, vocab_size, bos_id, eos_id, pad_id, hash)

mosaicml-streaming is imported only when a loader is built (through `streaming_compat`).
"""
from megamom.tokenizer import Tokenizer, load_tokenizer

from .default import DefaultData, ensure_default_dataset

__all__ = ["build_loader", "ensure_default_dataset", "DefaultData", "load_tokenizer", "Tokenizer",
           "ShardLoader", "read_manifest"]


def build_loader(data_cfg, *, split, micro_batch_size, dp_rank, dp_size, seed, shuffle=None):
    """See `megamom.data.loader.build_loader`."""
    from .loader import build_loader as _build

    return _build(data_cfg, split=split, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                  dp_size=dp_size, seed=seed, shuffle=shuffle)


def __getattr__(name):
    if name == "ShardLoader":
        from .loader import ShardLoader

        return ShardLoader
    if name == "read_manifest":
        from megamom.data_prep import read_manifest

        return read_manifest
    raise AttributeError(name)
