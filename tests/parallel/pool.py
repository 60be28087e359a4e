"""A pool of W gloo processes kept for a whole test session: starting a process that imports torch
and DeepSpeed costs seconds, and the parallel tests run dozens of cases. `Pool.run(fn, *args)` runs
`fn(*args)` on every rank (fn a module-level function of a module in this folder) and returns the
ranks' results; an exception on any rank fails the test with that rank's traceback."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, HERE)
    import importlib

    import torch
    torch.set_num_threads(1)
    from megamom.train.distributed import init_distributed
    init_distributed("cpu")
    while True:
        job = inbox.get()
        if job is None:
            break
        module, name, args = job
        try:
            result = ("ok", getattr(importlib.import_module(module), name)(*args))
        except BaseException:  # noqa: BLE001 - reported to the test
            result = ("error", f"rank {rank}:\n{traceback.format_exc()}")
        outbox.put((rank, result))


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = None

    def run(self, fn, *args, timeout: float = 600):
        if self.broken:
            raise RuntimeError(f"the process pool broke in an earlier test: {self.broken}")
        for box in self.inboxes:
            box.put((fn.__module__, fn.__name__, args))
        results, errors = [None] * self.world, []
        for _ in range(self.world):
            try:
                rank, (status, value) = self.outbox.get(timeout=timeout)
            except queue.Empty:
                self.broken = f"no answer within {timeout} s (a rank died or hangs in a collective)"
                self.close()
                raise RuntimeError(self.broken) from None
            if status == "ok":
                results[rank] = value
            else:
                errors.append(value)
                if len(errors) == 1:  # the other ranks may hang in a collective the failed one skipped
                    timeout = min(timeout, 60)
        if errors:
            raise AssertionError("\n".join(errors))
        return results

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
