"""Slurm node lists (`gpu[01-03,07],login1`) expanded into host names, and the DeepSpeed hostfile
made from them. Expanded here rather than by `scontrol show hostnames`, which is missing inside
many containers."""
from __future__ import annotations

import re


class HostlistError(ValueError):
    pass


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"node list {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise HostlistError(f"node list {text!r}: '[' without ']'")
    parts.append(cur)
    return [p for p in parts if p]


def _range(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostlistError(f"node list {whole!r}: bad range {item!r} (want N or N-M)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostlistError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(lo)  # zero padding of the first number, as Slurm writes it: 01-10
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order (`node[1-2],gpu[01,03]b` -> node1 node2 gpu01b gpu03b)."""
    hosts = []
    for part in _split_top(nodelist.strip()):
        names = [""]
        for text, rng in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            names = [n + text for n in names]
            if rng:
                names = [n + r for n in names for r in _range(rng, nodelist)]
        hosts += [n for n in names if n]
    if not hosts:
        raise HostlistError(f"node list {nodelist!r} names no host")
    return hosts


def deepspeed_hostfile(hosts: list[str], slots: int) -> str:
    """The `deepspeed --hostfile` format: one `host slots=N` line per node."""
    if slots < 1:
        raise HostlistError(f"slots={slots} must be >= 1 (GPUs per node)")
    return "".join(f"{h} slots={slots}\n" for h in hosts)
