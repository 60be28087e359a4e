"""Process-group setup. Works as a plain single process (sets the rendezvous variables itself),
under torchrun, the deepspeed launcher or Slurm's srun (SLURM_PROCID / SLURM_NTASKS)."""
from __future__ import annotations

import datetime
import importlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """srun without torchrun: derive the torch variables from Slurm's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU)."""
    _env_from_slurm()
    if "RANK" not in os.environ:  # a plain `python`/`megamom` process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory comm op (~1 min of g++) that
        # gloo does not need; skip it.
        try:
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        except Exception:
            pass
    if not dist.is_initialized() and world == 1:
        # a world of one needs no rendezvous: an in-memory store instead of a TCP port (a port found
        # free, released, then bound again can be taken in between by another process on the host)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed  # (takes over a process group that is already there)
    timeout = datetime.timedelta(minutes=int(os.environ.get("MEGAMOM_DIST_TIMEOUT_MIN", "30")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return DistInfo(rank, world, local_rank, device, backend)


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any. A world of one returns `flag` as is: no
    tensor, no collective and no device-to-host sync."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def decide_on_main(decide, device: torch.device):
    """Run `decide()` on rank 0 alone (e.g. reading and hashing checkpoint files once, not once per
    rank) and give every rank its result; an exception on rank 0 is raised on every rank, with the
    same type when it is one of ours (a ConfigError stays a usage error)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return decide()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised here too
            box[0] = ("error", e)
    # our own ranks' objects (paths, strings, our exception types), not a file read from disk
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    status, value = box[0]
    if status == "error":
        raise value
    return value
