"""Hugging Face weight files: safetensors, one file or shards with an index (the layout
`save_pretrained` writes and `from_pretrained` reads), and reading them back."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .. import fsutil
from .errors import ConvertError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'5GB' (10^9, as transformers), '500MiB', '1000000' -> bytes."""
    return fsutil.parse_size(text, error=ConvertError, what="shard size")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_safetensors(sd: dict, out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write the tensors (in natural name order: layer 2 before layer 10); shards of at most
    max_shard_bytes (a bigger tensor gets a shard of its own) plus an index when more than one."""
    from safetensors.torch import save_file
    names = sorted(sd, key=_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = sd[n].numel() * sd[n].element_size()
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({n: sd[n].contiguous() for n in names}, str(out_dir / SINGLE), metadata=meta)
        return [SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in shard}, str(out_dir / fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
    return files + [INDEX]


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: safetensors (single or sharded), else
    pytorch_model.bin (read with weights_only=True: no code from the file runs)."""
    from safetensors.torch import load_file
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ConvertError(f"{str(model_dir)!r}: shards listed in {INDEX} are missing: {', '.join(missing)}")
        sd = {}
        for f in files:
            sd.update(load_file(str(model_dir / f)))
        absent = sorted(set(index["weight_map"]) - set(sd))
        if absent:
            raise ConvertError(f"{str(model_dir)!r}: tensors listed in {INDEX} are not in the shards: "
                               + ", ".join(absent[:8]))
        return sd
    if (model_dir / SINGLE).is_file():
        return load_file(str(model_dir / SINGLE))
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise ConvertError(f"{str(model_dir)!r} holds no weights ({SINGLE}, {INDEX} or pytorch_model.bin)")
