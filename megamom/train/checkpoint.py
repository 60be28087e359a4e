"""Atomic, resumable checkpoints on top of DeepSpeed's save/load.

Layout under <out_dir>/checkpoints/:
    step_00000100/            DeepSpeed files (+ ours): complete once COMPLETE.json exists
        trainer_state.json    step, tokens, run id, config snapshot, tokenizer reference, world layout
        rank_00000.json       per-rank loader state and RNG states
        COMPLETE.json         written last: step, run id, and the size and hash of every other file;
                              then the directory is renamed into place
    latest                    {"checkpoint": name, "run_id": ..., "step": ...} of the newest complete
                              checkpoint (replaced atomically)
A save first writes `.tmp-step_XXXXXXXX/`; a kill at any point leaves at most a tmp directory,
which is never taken for a checkpoint and is removed by the next save. Every run has an id: a
resume follows `latest` and continues only that run, and falls back to the run's previous checkpoint
when a file of the newest one is missing or damaged (verify_checkpoint). DeepSpeed's own files are
read with torch.load(weights_only=True) (see SafeCheckpointEngine).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import xxhash

from ..fsutil import replace_dir
from .distributed import barrier

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"
LATEST = "latest"
PREFIX = "step_"
HASH = "xxh3_128"  # detects damaged or swapped files (not an adversary); ~10 GB/s, so saves stay cheap
_NAME = re.compile(rf"^{PREFIX}(\d{{8}})$")


class CheckpointError(RuntimeError):
    pass


def fault_requested(point: str, step: int) -> bool:
    """Fault injection for crash tests: MEGAMOM_FAULT=<point>[:<step>[,<step>...]]."""
    spec = os.environ.get("MEGAMOM_FAULT", "")
    name, _, steps = spec.partition(":")
    return name == point and (not steps or str(step) in steps.split(","))


def _fault(point: str, step: int) -> None:
    if fault_requested(point, step):
        os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` or an OOM killer does


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under root, oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def read_latest(root: Path) -> Optional[dict]:
    """`latest` as {"checkpoint", "run_id", "step"}; None if absent or unreadable (the complete
    checkpoints are then the only record). A plain name (older saves) has no run id."""
    path = Path(root) / LATEST
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = {"checkpoint": text, "run_id": None}
    if not isinstance(data, dict) or not _NAME.match(str(data.get("checkpoint", ""))):
        return None
    return data


def checkpoint_run_id(ckpt: Path) -> Optional[str]:
    try:
        return json.loads((Path(ckpt) / MARKER).read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def run_checkpoints(root: Path) -> tuple[Optional[str], list[Path]]:
    """The run that `latest` names (else the newest complete checkpoint's) and its complete
    checkpoints up to that one, newest first: what a resume may continue, in order of preference."""
    complete = complete_checkpoints(root)
    latest = read_latest(root)
    if latest is not None:
        run_id, last_step = latest.get("run_id"), int(latest["checkpoint"][len(PREFIX):])
    elif complete:
        run_id, last_step = checkpoint_run_id(complete[-1][1]), complete[-1][0]
    else:
        return None, []
    # another run's checkpoint is never taken; one whose marker cannot be read stays in, so that
    # verify_checkpoint names what is wrong with it instead of passing over it in silence
    mine = [p for step, p in complete
            if step <= last_step and (run_id is None or checkpoint_run_id(p) in (None, run_id))]
    return run_id, mine[::-1]


def remove_leftovers(root: Path) -> list[str]:
    """Directories a kill can leave behind, never a checkpoint: `step_*` without COMPLETE.json
    (pruning removes the marker first), and the old copy of a step being replaced."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and ((_NAME.match(p.name) and not (p / MARKER).exists())
                               or re.match(rf"^\.{PREFIX}\d{{8}}\.old-\d+$", p.name)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _file_table(ckpt: Path) -> dict:
    """Size and hash of every file of a checkpoint directory except the marker itself."""
    table = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MARKER:
            table[p.relative_to(ckpt).as_posix()] = {"size": p.stat().st_size, HASH: _digest(p)}
    return table


def verify_checkpoint(ckpt: Path) -> dict:
    """The checkpoint's marker, after checking every file it lists (present, same size, same hash)
    and that the trainer state reads. Raises CheckpointError naming the first bad file."""
    ckpt = Path(ckpt)
    read_trainer_state(ckpt)  # exists, complete, its state readable
    try:
        marker = json.loads((ckpt / MARKER).read_text())
        files = marker.get("files", {})
        if not isinstance(files, dict):
            raise ValueError("'files' is not a table")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {MARKER} is unreadable ({e})") from None
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: {name} is missing")
        size = path.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: {name} has {size} bytes, {want.get('size')} were "
                                  f"saved (truncated or overwritten)")
        if HASH in want and _digest(path) != want[HASH]:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: {name} is damaged (its {HASH} hash differs from "
                                  f"the one saved)")
    return marker


def choose_resume(root: Path, warn: Callable[[str], None]) -> Optional[Path]:
    """The newest intact checkpoint of the run `latest` names, falling back (with a warning naming
    the bad file) to that run's earlier ones; None when there is nothing to resume."""
    _, candidates = run_checkpoints(root)
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"{e}; falling back to the previous checkpoint of this run")
            continue
        return path
    if problems:
        raise CheckpointError(f"no intact checkpoint to resume in {str(root)!r}: " + " | ".join(problems)
                              + ". Resume from a copy you trust with --resume PATH, or start over with --resume none")
    return None


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {
        "python": _encode(random.getstate()),
        "numpy": _encode(np.random.get_state()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_decode(state["python"]))
    np.random.set_state(_decode(state["numpy"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _encode(obj):
    """JSON-safe encoding of RNG state tuples (numpy arrays as lists)."""
    if isinstance(obj, tuple):
        return {"tuple": [_encode(o) for o in obj]}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def _decode(obj):
    if isinstance(obj, dict) and "tuple" in obj:
        return tuple(_decode(o) for o in obj["tuple"])
    if isinstance(obj, dict) and "ndarray" in obj:
        return np.array(obj["ndarray"], dtype=obj["dtype"])
    if isinstance(obj, list):
        return [_decode(o) for o in obj]
    return obj


# ------------------------------------------------------------------------------------------ save / load
def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, rank_state: dict, rank: int,
                    keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = Path(root)
    name = f"{PREFIX}{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):  # left by saves that crashed (any step)
            shutil.rmtree(stale)
        remove_leftovers(root)
    barrier()
    with saved_as_dense(engine):
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    _write_json_atomic(tmp / f"rank_{rank:05d}.json", rank_state)
    _fault("ckpt_before_commit", step)
    barrier()
    if rank == 0:
        _write_json_atomic(tmp / STATE, trainer_state)
        run_id = trainer_state.get("run_id")
        _write_json_atomic(tmp / MARKER, {"step": step, "time": time.time(), "run_id": run_id,
                                          "world_size": trainer_state.get("world_size"),
                                          "files": _file_table(tmp)})
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # an older save of the same step (e.g. a rerun) is replaced whole
        _fsync_dir(root)
        _write_json_atomic(root / LATEST, {"checkpoint": name, "run_id": run_id, "step": step})
        for _, old in complete_checkpoints(root)[:-keep_last]:
            (old / MARKER).unlink()  # first: a half-deleted directory must never look complete
            _fault("ckpt_during_prune", step)
            shutil.rmtree(old, ignore_errors=True)
    _fault("ckpt_after_commit", step)
    barrier()
    return final


@contextlib.contextmanager
def saved_as_dense(engine):
    """DeepSpeed saves an MoE model's experts through its own MoE modules (a file per expert, found
    by their module names); the memories split by expert parallelism are stacked parameters, not
    such modules. For the span of a save or load the engine treats the model as dense: data rank 0
    writes the module file and every rank its ZeRO-1/2 partition, which holds its memories' fp32
    master weights and optimizer state (a load restores the module weights from them; the ZeRO
    optimizer keeps its expert groups either way)."""
    moe = getattr(engine, "has_moe_layers", False)
    engine.has_moe_layers = False
    try:
        yield engine
    finally:
        engine.has_moe_layers = moe


def load_engine_checkpoint(engine, load_dir: Path, tag: str):
    """engine.load_checkpoint with the optimizer and lr schedule. Under expert parallelism the
    module file holds data rank 0's memories only (see saved_as_dense): every rank's module weights
    are then set from its fp32 master partitions, as a step sets them."""
    moe = getattr(engine, "has_moe_layers", False)
    with saved_as_dense(engine):
        loaded = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
    if moe and loaded[0] is not None:
        engine.optimizer.update_lp_params()
    return loaded


def read_trainer_state(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not exist")
    if not (ckpt / MARKER).is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete (no {MARKER}: a save was interrupted); "
                              f"pass an earlier step_* directory or the run directory (train.out_dir)")
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: cannot read {STATE}: {e}") from None


def read_rank_state(ckpt: Path, rank: int) -> Optional[dict]:
    p = Path(ckpt) / f"rank_{rank:05d}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def tensor_parallel_size(ckpt: Path) -> int:
    """The parallel.tensor a checkpoint was saved with (1 before tensor parallelism existed)."""
    return int((read_trainer_state(ckpt).get("parallel") or {}).get("tensor", 1))


def expert_parallel_size(ckpt: Path) -> int:
    """The parallel.expert a checkpoint was saved with (1 before expert parallelism existed)."""
    return int((read_trainer_state(ckpt).get("parallel") or {}).get("expert", 1))


def model_state_file(ckpt: Path, tensor_rank: int = 0) -> Path:
    """DeepSpeed's file holding the module weights of a tensor rank (ZeRO-3 shards them into zero_pp_* files)."""
    files = sorted(Path(ckpt).glob(f"mp_rank_{tensor_rank:02d}_model_states.pt"))
    if not files:
        files = sorted(Path(ckpt).glob(f"zero_pp_rank_0_mp_rank_{tensor_rank:02d}_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no DeepSpeed model states file for tensor rank "
                              f"{tensor_rank}")
    return files[0]


def _upgrade(sd: dict, ckpt: Path) -> dict:
    """Weights (or shapes) of a checkpoint under today's parameter names (memory_mixer.upgrade_state_dict)."""
    from ..config import model_config_from_dict
    from ..model.memory_mixer import upgrade_state_dict
    model = (read_trainer_state(ckpt).get("config") or {}).get("model")
    return upgrade_state_dict(sd, model_config_from_dict(model)) if isinstance(model, dict) else sd


def check_shapes(ckpt: Path, model: torch.nn.Module, upgrade: bool = True) -> None:
    """Name the tensors whose shapes differ between a checkpoint and the model (before loading).
    Memory-mapped: only the shapes are read here, the weights are loaded once, later. upgrade:
    a checkpoint with older parameter names fits if its weights do (init_from); a resume cannot
    take it (its optimizer state is laid out by the old names), and says so."""
    from ..parallel.parallelize import whole_shape
    sd = torch.load(model_state_file(ckpt), map_location="cpu", weights_only=True, mmap=True)
    shapes = sd.get("param_shapes")
    # compared as whole parameters: a tensor-parallel model or checkpoint holds shards of them
    model_tp = getattr(getattr(model, "topology", None), "tensor", None)
    model_tp = model_tp.size if model_tp is not None else 1
    # under ZeRO-3 a parameter is a partitioned (0,)-shaped placeholder; ds_shape is its real shape
    model_ep = getattr(getattr(model, "topology", None), "expert", None)
    model_ep = model_ep.size if model_ep is not None else 1
    ours = {n: _whole_over_experts(whole_shape(n, tuple(getattr(p, "ds_shape", p.shape)), model_tp),
                                   model_ep if getattr(p, "allreduce", True) is False else 1)
            for n, p in model.named_parameters()}
    if isinstance(shapes, list):  # ZeRO: one dict per param group
        saved = {n: tuple(s) for group in shapes for n, s in group.items()}
    elif sd.get("module") is not None:
        saved = {n: tuple(t.shape) for n, t in sd["module"].items()}
    else:
        return
    ckpt_tp, ckpt_ep = tensor_parallel_size(ckpt), expert_parallel_size(ckpt)
    if ckpt_tp > 1 or ckpt_ep > 1:
        model_cfg = (read_trainer_state(ckpt).get("config") or {}).get("model") or {}
        try:
            saved = {n: _whole_over_experts(whole_shape(n, s, ckpt_tp), ckpt_ep if _is_memory_stack(n, model_cfg)
                                            else 1) for n, s in saved.items()}
        except KeyError as e:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: {e.args[0]}") from None
    upgraded = _upgrade(saved, ckpt)
    if upgraded != saved:
        if not upgrade:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} was saved while the shared memory was the last row of "
                                  "the stacked memory weights; it cannot be resumed (its optimizer state follows "
                                  f"that layout): start a new run from its weights with train.init_from={ckpt}")
        saved = upgraded
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    mismatched = [f"{n}: checkpoint {saved[n]} vs model {ours[n]}" for n in sorted(set(ours) & set(saved))
                  if saved[n] != ours[n]]
    if missing or unexpected or mismatched:
        lines = []
        if mismatched:
            lines.append("shape mismatch: " + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""))
        if missing:
            lines.append("missing in checkpoint: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            lines.append("not in model: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not fit the model: " + " | ".join(lines))


def _whole_over_experts(shape: tuple, expert_size: int) -> tuple:
    """The shape of a memory stack whole over `expert_size` expert ranks (memories along dim 0)."""
    return (shape[0] * expert_size, *shape[1:]) if expert_size > 1 else tuple(shape)


def deepspeed_safe_globals() -> list:
    """The plain data classes DeepSpeed pickles into its optimizer-state files; allowing exactly
    these keeps weights_only=True loading (no arbitrary code) while reading DeepSpeed checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def install_safe_loader(engine) -> None:
    """Make DeepSpeed read checkpoint files with torch.load(weights_only=True)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False); make it safe for its span."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def to_universal(ckpt: Path, out: Path) -> Path:
    """DeepSpeed's universal form of a ZeRO-1/2 checkpoint (every parameter's fp32 weights and Adam
    moments whole, per parameter name: deepspeed.checkpoint.ds_to_universal), which an engine of
    any tensor / data-parallel size loads (`checkpoint.load_universal`). Written to `out` through a
    temporary directory; the files are read with torch.load(weights_only=True)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with _weights_only_torch_load(), contextlib.redirect_stdout(None):
        ds_to_universal.main(args)
    replace_dir(tmp, out)
    return out


def load_model_state_dict(ckpt: Path) -> dict:
    """Full model weights of a checkpoint, whatever its ZeRO stage, without DeepSpeed's engine:
    the fp32 master weights from the optimizer partitions (ZeRO 1-3), else the module weights,
    under today's parameter names.
    This is the one place that reads checkpoint layouts (conversion and eval call it)."""
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)  # complete, every file as saved, or a clear error naming the file
    tp = tensor_parallel_size(ckpt)
    if expert_parallel_size(ckpt) > 1:
        from ..parallel.parallelize import unshard
        shards = [_expert_parallel_state_dict(ckpt, r) for r in range(tp)]
        return _upgrade({n: unshard(n, [s[n] for s in shards]) for n in shards[0]}, ckpt)
    if tp > 1:  # each tensor rank's weights, then the whole parameters
        from ..parallel.parallelize import unshard
        shards = [_tensor_rank_state_dict(ckpt, r) for r in range(tp)]
        return _upgrade({n: unshard(n, [s[n] for s in shards]) for n in shards[0]}, ckpt)
    return _upgrade(_tensor_rank_state_dict(ckpt, 0), ckpt)


def _tensor_rank_state_dict(ckpt: Path, tensor_rank: int) -> dict:
    """The weights of one tensor rank: its fp32 master weights from the ZeRO partitions, else its
    module weights. DeepSpeed's zero_to_fp32 takes every optimizer file of a directory as one tensor
    rank's, so under tensor parallelism each rank's files are linked under rank 0's names in a
    scratch directory of their own."""
    if list(ckpt.glob(f"*zero_pp_rank_*_mp_rank_{tensor_rank:02d}_optim_states.pt")):
        if not list(ckpt.glob("*zero_pp_rank_*_mp_rank_01_optim_states.pt")):  # one tensor rank
            return _zero_fp32_state_dict(ckpt)
        with tempfile.TemporaryDirectory(prefix="megamom-tp-") as scratch:
            view = Path(scratch) / ckpt.name
            view.mkdir()
            for f in ckpt.iterdir():
                if f"mp_rank_{tensor_rank:02d}_" in f.name:
                    (view / f.name.replace(f"mp_rank_{tensor_rank:02d}_", "mp_rank_00_")).symlink_to(f.resolve())
            return _zero_fp32_state_dict(view)
    sd = torch.load(model_state_file(ckpt, tensor_rank), map_location="cpu", weights_only=True)
    if not sd.get("module"):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds no module weights")
    return dict(sd["module"])


def _zero_fp32_state_dict(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with _weights_only_torch_load():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _expert_parallel_state_dict(ckpt: Path, tensor_rank: int) -> dict:
    """The fp32 master weights of one tensor rank of an expert-parallel ZeRO-1/2 checkpoint, whole
    over the expert ranks (see _merged_zero_states)."""
    return {n: states["fp32"] for n, states in _merged_zero_states(ckpt, tensor_rank).items()}


def _merged_zero_states(ckpt: Path, tensor_rank: int) -> dict:
    """name -> {"fp32", "exp_avg", "exp_avg_sq": float32 tensors, "step"}: one tensor rank's parameters
    and Adam state from a ZeRO-1/2 checkpoint, whole over data and expert ranks. Each data rank's
    optimizer file holds its partition of every parameter group, and where each parameter's pieces
    lie in it (`param_slice_mappings`); a dense group is partitioned over the data (x sequence) ranks,
    a group of memories over the ranks holding the same memories (the expert-data group; its ranks
    are numbered in ascending global order, as the files). A parameter is its pieces in file order; a
    memory stack is then its expert shards joined along the memories."""
    from ..parallel.plan import placement
    state = read_trainer_state(ckpt)
    ep = expert_parallel_size(ckpt)
    files = sorted(ckpt.glob(f"*zero_pp_rank_*_mp_rank_{tensor_rank:02d}_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    if not files:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no ZeRO-1/2 optimizer files for tensor rank "
                              f"{tensor_rank} (expert-parallel checkpoints are ZeRO-1/2)")
    shapes = torch.load(model_state_file(ckpt, tensor_rank), map_location="cpu", weights_only=True,
                        mmap=True)["param_shapes"]
    shapes = {n: s for group in shapes for n, s in group.items()}
    model_cfg = (state.get("config") or {}).get("model") or {}
    sp = int((state.get("parallel") or {}).get("sequence", 1))
    pieces: dict = {}  # (name, expert shard or None, state) -> [flat pieces in data-rank order]
    steps: dict = {}
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for d, f in enumerate(files):  # d: the rank in the data x sequence group (data-major)
            # its expert shard: the data index mod EP (megamom.parallel.topology)
            expert_index = d // sp % ep
            osd = torch.load(f, map_location="cpu", weights_only=True)["optimizer_state_dict"]
            adam = osd["base_optimizer_state"]["state"]
            for i, (flat, mapping) in enumerate(zip(osd["single_partition_of_fp32_groups"],
                                                    osd["param_slice_mappings"])):
                flats = {"fp32": flat, **{k: adam[i][k] for k in ("exp_avg", "exp_avg_sq") if i in adam}}
                for name, frag in mapping.items():
                    expert = expert_index if _is_memory_stack(name, model_cfg) else None
                    for key, t in flats.items():
                        pieces.setdefault((name, expert, key), []).append(t.narrow(0, frag.start, frag.numel))
                    if i in adam:
                        steps[name] = adam[i]["step"]
    out = {}
    for name, shape in shapes.items():
        stack = _is_memory_stack(name, model_cfg)
        merged = {}
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if (name, 0 if stack else None, key) not in pieces:
                continue
            if stack:
                shards = [torch.cat(pieces[(name, e, key)]).view(shape) for e in range(ep)]
                merged[key] = torch.cat(shards, placement(name).expert_dim).float()
            else:
                merged[key] = torch.cat(pieces[(name, None, key)]).view(shape).float()
        merged["step"] = steps.get(name)
        out[name] = merged
    return out


def to_universal_by_name(ckpt: Path, out: Path) -> Path:
    """DeepSpeed's universal form of a ZeRO-1/2 checkpoint written here rather than by
    deepspeed.checkpoint.ds_to_universal, which cannot read memories split over expert ranks: per
    parameter the whole fp32 weights and Adam moments (joined over data, expert and tensor ranks)
    with how a loading rank takes its piece (`cat_dim` for its tensor shard; memory stacks marked as
    expert parameters, which DeepSpeed's loader splits over the expert ranks of the new layout);
    the optimizer's global state; the module files. An engine of any data, tensor and expert size
    loads it with `checkpoint.load_universal`."""
    from deepspeed.checkpoint.constants import CAT_DIM, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    from ..parallel.parallelize import unshard
    from ..parallel.plan import placement
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "zero").mkdir(parents=True)
    state = read_trainer_state(ckpt)
    model_cfg = (state.get("config") or {}).get("model") or {}
    tp = tensor_parallel_size(ckpt)
    ranks = [_merged_zero_states(ckpt, t) for t in range(tp)]
    for name in ranks[0]:
        folder = tmp / "zero" / name
        folder.mkdir()
        stack = _is_memory_stack(name, model_cfg)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            if key in ranks[0][name]:
                whole = unshard(name, [r[name][key] for r in ranks])
                entry = {PARAM: whole, CAT_DIM: placement(name).tensor_dim or 0}
                if stack:
                    entry.update({EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: whole.shape[0]})
                torch.save(entry, folder / f"{key}.pt")
        if ranks[0][name]["step"] is not None:
            torch.save(ranks[0][name]["step"], folder / "step.pt")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        first = sorted(ckpt.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))[0]
        osd = torch.load(first, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    sharded = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
    common = {k: v for k, v in osd.items() if k not in sharded}
    # the groups' hyperparameters, without their names: the loading engine's groups keep their own
    # (its expert groups are named by its own expert size)
    groups = osd["base_optimizer_state"]["param_groups"]
    common["param_groups"] = [{k: v for k, v in g.items() if k not in ("name", "moe")} for g in groups]
    if not any(g.get("moe") for g in groups):
        # saved without expert parallelism: a loading engine with it has the memories in groups of
        # their own after its dense ones, one per dense group holding memories (DeepSpeed's
        # split_params_into_different_moe_groups_for_optimizer), and DeepSpeed's loader pairs the
        # saved groups with its own by position: they get their dense group's hyperparameters
        shapes = torch.load(model_state_file(ckpt, 0), map_location="cpu", weights_only=True, mmap=True)
        holding = [i for i, names in enumerate(shapes["param_shapes"]) if any(_is_memory_stack(n, model_cfg)
                                                                               for n in names)]
        common["param_groups"] += [dict(common["param_groups"][i]) for i in holding]
    torch.save(common, tmp / "zero" / "optimizer_state.pt")
    for f in ckpt.glob("mp_rank_*_model_states.pt"):
        shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, out)
    return out


def _is_memory_stack(name: str, model_cfg: dict) -> bool:
    """megamom.parallel.plan.is_memory_stack for a checkpoint's saved model config."""
    from ..parallel.plan import is_memory_stack
    return is_memory_stack(name, model_cfg.get("arch"), model_cfg.get("per_memory_conv"))
