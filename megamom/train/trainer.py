"""The training loop on a DeepSpeed engine (ZeRO 0-3), with logging, checkpoints, exact resume,
preemption handling and non-finite-step skipping."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import IMPLEMENTATION_ONLY_KEYS, Config, ConfigError, dump_config
from ..model import build_model
from ..model.counting import count_parameters, flops_per_token
from ..parallel import ParallelLayout, check_supported
from ..parallel.parallelize import parallelize
from ..parallel.topology import Topology
from . import checkpoint as ckpt
from . import run_dir
from .distributed import DistInfo, all_reduce_max_flag, barrier, decide_on_main, init_distributed
from .cuda_graph import GraphedLoss, engine_forward
from .cuda_graph import check_setup as check_cuda_graph_setup
from .engine import build_engine
from .metrics import MetricsLogger, peak_flops

log = logging.getLogger("megamom.train")


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class Batching:
    micro: int
    accum: int
    dp_size: int
    sequence: int = 1  # sequence ranks per data rank (slices of the same sequences)

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.dp_size


def resolve_batching(cfg: Config, world_size: int, layout: Optional[ParallelLayout] = None) -> Batching:
    """Validate micro x accumulation x data-parallel = global batch (derive accumulation when only
    the global batch is given). layout: the run's, else built (and checked) here."""
    t = cfg.train
    if layout is None:
        layout = ParallelLayout.build(cfg, world_size)
        check_supported(layout, cfg)
    dp = layout.data
    accum = t.grad_accum
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; "
                              f"choose a global batch that is a multiple of {per_step}")
        derived = t.global_batch_size // per_step
        if accum not in (1, derived):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} needs grad_accum={derived} with "
                              f"micro_batch_size={t.micro_batch_size} on {dp} data-parallel ranks, "
                              f"but train.grad_accum={accum}; drop one of them")
        accum = derived
    return Batching(t.micro_batch_size, accum, dp, layout.sequence)


def _resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    return p


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", device: str = "auto", quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        t = cfg.train
        self.out_dir = Path(t.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.dist: DistInfo = init_distributed(device)
        layout = ParallelLayout.build(cfg, self.dist.world_size)
        check_supported(layout, cfg)
        self.batching = resolve_batching(cfg, self.dist.world_size, layout)
        self.topology = Topology(layout, self.dist.rank)
        self.precision = _resolve_precision(cfg, self.dist.device)
        check_cuda_graph_setup(t, self.dist.device, self.precision)
        run_dir.check_writable(self.out_dir)
        # (tensor size, expert size, world size) of a checkpoint of another layout
        self.reshard: Optional[tuple[int, int, int]] = None
        self.resume_from = self._find_resume(resume)

        self._prepare_data()
        self.train_loader = self._loader("train")
        self.val_missing = self._check_val_split()
        if len(self.train_loader) < self.batching.accum:
            raise ConfigError(f"the training data ({', '.join(cfg.data.paths)}) holds {len(self.train_loader)} "
                              f"micro-batches of {self.batching.micro} per rank, fewer than one optimizer step "
                              f"({self.batching.accum} micro-batches x {self.batching.dp_size} ranks); lower "
                              f"train.micro_batch_size / grad_accum or prepare more data")
        self._build_engine()
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_in_row = 0
        self._low_share: dict = {}  # (layer, memory) -> logged steps in a row under the collapse floor
        self.skipped_steps = 0
        self._last_saved: Optional[tuple[int, Path]] = None  # (step, directory) of the newest save
        self.run_id: Optional[str] = None
        if self.resume_from is not None:
            self._load(self.resume_from)
        else:
            self._start_new_run()
        self.metrics = MetricsLogger(self.out_dir, self.dist.is_main, self.step)
        self._stop_signal: Optional[int] = None
        self._install_signal_handlers()

    # ---------------------------------------------------------------------------------- setup
    def _find_resume(self, resume: str) -> Optional[Path]:
        """auto: the run that train.out_dir's `latest` names, from its newest intact checkpoint (see
        checkpoint.choose_resume); a run directory: the same there; a step directory: that one."""
        if resume in ("none", "", None):
            return None
        given = None if resume == "auto" else Path(resume).expanduser()
        if given is not None and not given.exists():
            raise ConfigError(f"--resume {resume!r} does not exist; pass a checkpoint (…/checkpoints/step_XXXXXXXX), "
                              "a run directory (a train.out_dir), auto (the newest checkpoint in train.out_dir) "
                              "or none (start over)")
        is_step_dir = given is not None and ((given / ckpt.MARKER).exists() or (given / ckpt.STATE).exists())
        if given is None:
            root = self.ckpt_root
        elif (given / "checkpoints").is_dir():  # a run directory
            root = given / "checkpoints"
        else:  # a checkpoints/ directory (or a step directory: taken as it is below)
            root = given

        def decide() -> Optional[Path]:  # rank 0 reads and hashes the files once for every rank
            if is_step_dir:
                ckpt.verify_checkpoint(given)
                return given
            removed = ckpt.remove_leftovers(root)
            if removed:
                log.info("removed what interrupted saves left in %s: %s", root, ", ".join(removed))
            path = ckpt.choose_resume(root, log.warning)
            if path is None and given is not None:
                raise ConfigError(f"--resume {resume!r} holds no complete checkpoint; pass a step_* directory, a "
                                  "run directory with checkpoints/, or --resume none to start over")
            return path

        try:
            path = decide_on_main(decide, self.dist.device)
        except ckpt.CheckpointError as e:
            raise ConfigError(str(e)) from None
        if path is None:
            return None
        state = ckpt.read_trainer_state(path)
        if state.get("weights_only"):
            raise ConfigError(f"{str(path)!r} holds weights only (no optimizer, schedule or data position), "
                              f"so it cannot be resumed; start a new run from it with train.init_from={path}")
        self._check_config_compatible(state, path)
        return path

    def _start_new_run(self) -> None:
        """A new run id; an earlier run's records in train.out_dir move to archive/ first."""
        def start() -> str:
            moved = run_dir.archive_previous_run(self.out_dir)
            if moved is not None:
                log.warning("train.out_dir %s held an earlier run: its checkpoints and logs moved to %s "
                            "(starting over; --resume auto continues a run instead)", self.out_dir, moved)
            return ckpt.new_run_id()
        self.run_id = decide_on_main(start, self.dist.device)
        if self.dist.is_main and not self.quiet:
            log.info("run %s in %s", self.run_id, self.out_dir)

    def _model_config_diff(self, state: dict) -> list[str]:
        """Model settings that differ between a checkpoint and this run (kernel choices aside: they
        do not change the function the model computes)."""
        saved = state.get("config", {}).get("model", {})
        ours = dataclasses.asdict(self.cfg.model)
        return [f"model.{k}: checkpoint {saved.get(k)!r} vs config {ours[k]!r}" for k in sorted(ours)
                if k not in IMPLEMENTATION_ONLY_KEYS and saved.get(k) != ours[k]]

    def _check_config_compatible(self, state: dict, path: Path) -> None:
        diff = self._model_config_diff(state)
        if diff and not self.cfg.train.allow_config_change_on_resume:
            raise ConfigError(f"checkpoint {str(path)!r} was trained with a different model config: "
                              + "; ".join(diff) + ". Pass train.allow_config_change_on_resume=true to load "
                              "it anyway (tensors must still fit), or --resume none to start over")
        saved_tp = (state.get("parallel") or {}).get("tensor", 1)
        saved_ep = (state.get("parallel") or {}).get("expert", 1)
        saved_zero = ((state.get("config") or {}).get("train") or {}).get("zero_stage", self.cfg.train.zero_stage)
        ours_tp, zero = self.topology.tensor.size, self.cfg.train.zero_stage
        ours_ep = self.topology.expert.size
        saved_world = state.get("world_size") or self.dist.world_size
        same_world = saved_world == self.dist.world_size
        # under expert parallelism which memories a rank holds depends on the sequence size too
        saved_sp = (state.get("parallel") or {}).get("sequence", 1)
        same_sp = saved_sp == self.topology.sequence.size or (saved_ep == 1 and ours_ep == 1)
        if (saved_tp == ours_tp and saved_ep == ours_ep and same_sp
                and (same_world or (zero == 0 and saved_zero == 0))):
            return  # the same layout (ZeRO-0 files hold no data-parallel partition: any data size)
        if saved_zero in (1, 2) and zero in (1, 2):
            # DeepSpeed's universal form re-splits the weights and the optimizer state (checkpoint.to_universal)
            self.reshard = (saved_tp, saved_ep, saved_world)
            return
        raise ConfigError(f"checkpoint {str(path)!r} was saved by {saved_world} processes at "
                          f"parallel.tensor={saved_tp}, parallel.expert={saved_ep}, ZeRO-{saved_zero}; this run has "
                          f"{self.dist.world_size} at parallel.tensor={ours_tp}, parallel.expert={ours_ep}, "
                          f"ZeRO-{zero}. Another layout resumes from ZeRO-1/2 checkpoints with train.zero_stage=1 or 2 "
                          f"(re-split through DeepSpeed's universal checkpoint); else resume with the same layout, or "
                          f"start a new run from its weights (resharded on load) with train.init_from={path}")

    def _prepare_data(self) -> None:
        from ..data import ensure_default_dataset, load_tokenizer
        d = self.cfg.data
        if not d.paths:
            cache = Path(d.cache_dir or os.environ.get("MEGAMOM_CACHE", Path.home() / ".cache" / "megamom"))
            if self.dist.is_main:
                say = (lambda m: None) if self.quiet else log.info
                default = ensure_default_dataset(cache / "default-data", seq_len=d.seq_len, log=say)
            barrier()
            if not self.dist.is_main:
                default = ensure_default_dataset(cache / "default-data", seq_len=d.seq_len)
            d.paths = [str(p) for p in default.paths]
            d.tokenizer = str(default.tokenizer_path)
            if self.dist.is_main and not self.quiet:
                log.info("data: the shipped corpus, tokenizer %s, shards %s (cached; MEGAMOM_CACHE moves the "
                         "cache)", d.tokenizer, d.paths[0])
        if not d.tokenizer:
            raise ConfigError("data.tokenizer is not set: give the sentencepiece .model (or HF tokenizer dir) "
                              "the data was prepared with")
        self.tokenizer = load_tokenizer(d.tokenizer)
        from ..data_prep.prep import documents_start_with_bos
        # what a prompt starts with at generation: what the training documents started with
        self.documents_start_with_bos = documents_start_with_bos(d.paths)
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {d.tokenizer!r} has {self.tokenizer.vocab_size} tokens but "
                              f"model.vocab_size={self.cfg.model.vocab_size}; raise model.vocab_size")

    def _check_val_split(self) -> list[str]:
        """Datasets without a validation split: evaluation is then skipped, said once here."""
        from ..data.loader import datasets_without_split
        missing = datasets_without_split(self.cfg.data, "val")
        if missing and self.dist.is_main and not self.quiet:
            log.warning("no validation split in %s: evaluation is skipped (prepare the data with "
                        "`megamom prep ... --val-fraction 0.01` to evaluate)", ", ".join(missing))
        return missing

    def _loader(self, split: str):
        from ..data import build_loader
        return build_loader(self.cfg.data, split=split, micro_batch_size=self.batching.micro,
                            dp_rank=self.topology.data.rank,
                            dp_size=self.batching.dp_size, seed=self.cfg.train.seed)

    def _resolve_scan_keep(self) -> None:
        """model.scan_keep=auto: by the planner's estimate for this GPU and layout (none on CPU)."""
        m = self.cfg.model
        if m.scan_keep != "auto":
            return
        keep = "none"
        if self.dist.device.type == "cuda" and m.arch != "transformer":
            from ..parallel.planner import choose_scan_keep
            total = torch.cuda.get_device_properties(self.dist.device).total_memory
            keep = choose_scan_keep(self.cfg, self.topology.tensor.size, self.topology.data.size, total,
                                    self.precision)
        m.scan_keep = keep
        if self.dist.is_main and not self.quiet:
            log.info("model.scan_keep=auto: %s", keep)

    def _build_engine(self) -> None:
        cfg = self.cfg
        self._resolve_scan_keep()
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        if cfg.train.init_from and self.resume_from is None:
            self._init_weights_from(model, Path(cfg.train.init_from))
        model.activation_checkpointing = cfg.train.activation_checkpointing
        if self.dist.is_main and not self.quiet:
            pc = count_parameters(model)
            experts = self.topology.expert.size
            log.info("model: %s, %.1fM parameters (%.1fM activated per token), %s, ZeRO-%d, %d data-parallel x %d "
                     "sequence-parallel x %d tensor-parallel ranks%s", cfg.model.arch, pc.total / 1e6,
                     pc.activated / 1e6, self.precision, cfg.train.zero_stage, self.batching.dp_size,
                     self.topology.sequence.size, self.topology.tensor.size,
                     f", memories split over {experts} expert-parallel ranks" if experts > 1 else "")
        # built whole on every rank (same seed), this rank's shard kept
        model = parallelize(model, self.topology, cfg.parallel.tensor_sequence_parallel)
        mpu = self.topology.mpu() if self.topology.tensor.size > 1 or self.topology.sequence.size > 1 else None
        self.engine, self.scheduler = build_engine(cfg, model, self.batching, self.precision, self.dist.device, mpu,
                                                   load_universal=self.reshard is not None)
        self.model = self.engine.module
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, training=True)
        self.peak_flops = peak_flops(self.dist.device)

    def _init_weights_from(self, model, path: Path) -> None:
        """Start a new run from a checkpoint's weights (any ZeRO stage, or `convert from-hf`)."""
        state = ckpt.read_trainer_state(path)
        diff = self._model_config_diff(state)
        if diff:
            raise ConfigError(f"train.init_from={str(path)!r} has another model config: " + "; ".join(diff))
        want = (state.get("tokenizer") or {}).get("hash")
        if want and getattr(self.tokenizer, "hash", None) and want != self.tokenizer.hash:
            raise ConfigError(f"train.init_from={str(path)!r} was trained with tokenizer {want[:19]}… but "
                              f"data.tokenizer is {self.tokenizer.hash[:19]}…; use the model's tokenizer")
        ckpt.check_shapes(path, model)
        model.load_state_dict(ckpt.load_model_state_dict(path), strict=True)
        if self.dist.is_main and not self.quiet:
            log.info("initialised weights from %s", path)

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (a scheduler's preemption notice) and a first Ctrl-C: checkpoint after
        this step and stop; a second Ctrl-C aborts at once."""
        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.dist.is_main:
                again = " (Ctrl-C again aborts without it)" if signum == signal.SIGINT else ""
                log.warning("received %s: will checkpoint and stop after this step%s",
                            signal.Signals(signum).name, again)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. in-process tests)
                pass

    # ---------------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "run_id": self.run_id,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "dp_size": self.batching.dp_size,
            "parallel": {"tensor": self.topology.tensor.size, "sequence": self.topology.sequence.size,
                         "expert": self.topology.expert.size},
            "global_batch": self.batching.global_batch,
            "config": self.cfg.to_dict(),
            "tokenizer": {"path": self.cfg.data.tokenizer, "hash": getattr(self.tokenizer, "hash", None),
                          "documents_start_with_bos": self.documents_start_with_bos},
            "precision": self.precision,
            "megamom_version": __import__("megamom").__version__,
        }

    def save(self) -> Path:
        rank_state = {"loader": self.train_loader.state_dict(), "rng": ckpt.rng_state()}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, self._trainer_state(), rank_state,
                                    self.dist.rank, self.cfg.train.keep_last)
        self._last_saved = (self.step, path)
        if self.dist.is_main and not self.quiet:
            log.info("saved checkpoint %s", path)
        return path

    def _load(self, path: Path) -> None:
        """Resume from `path` (validated by _find_resume before the engine was built)."""
        state = ckpt.read_trainer_state(path)
        try:
            ckpt.check_shapes(path, self.model, upgrade=False)
        except ckpt.CheckpointError as e:  # a checkpoint of another shape or layout: the user's input
            raise ConfigError(str(e)) from None
        load_dir, tag = path.parent, path.name
        if self.reshard is not None:
            load_dir, tag = self._universal(path)
        load_path, _ = ckpt.load_engine_checkpoint(self.engine, load_dir, tag)
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load checkpoint {str(path)!r}")
        rank_state = ckpt.read_rank_state(path, self.dist.rank)
        if rank_state is None and self.reshard is not None:
            # another layout: the loader's position is global (every rank's is the same); rank 0's RNG
            rank_state = ckpt.read_rank_state(path, 0)
        if rank_state is None:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} has no state for rank {self.dist.rank}")
        self.train_loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        # a checkpoint from before run ids: the resumed run gets one from here on
        self.run_id = state.get("run_id") or decide_on_main(ckpt.new_run_id, self.dist.device)
        self._last_saved = (self.step, path)
        if self.reshard is not None:
            barrier()
            if self.dist.is_main:
                shutil.rmtree(load_dir, ignore_errors=True)
        if self.dist.is_main and not self.quiet:
            log.info("resumed from %s at step %d (run %s)", path, self.step, self.run_id)

    def _universal(self, path: Path) -> tuple[Path, str]:
        """Rank 0 writes the universal form of a checkpoint of another layout into
        train.out_dir/universal/ (removed once loaded); every rank loads it from there."""
        tp, ep, world = self.reshard
        root = self.out_dir / "universal"

        def convert() -> None:
            if self.dist.is_main and not self.quiet:
                log.info("resuming %s (%d processes, parallel.tensor=%d, parallel.expert=%d) at %d processes, "
                         "parallel.tensor=%d, parallel.expert=%d: re-splitting weights and optimizer state through "
                         "DeepSpeed's universal checkpoint", path, world, tp, ep, self.dist.world_size,
                         self.topology.tensor.size, self.topology.expert.size)
            try:
                if ep > 1 or self.topology.expert.size > 1:  # (ds_to_universal cannot read split memories)
                    ckpt.to_universal_by_name(path, root / path.name)
                else:
                    ckpt.to_universal(path, root / path.name)
            except AssertionError as e:  # ds_to_universal's checks: a checkpoint without the info it needs
                raise ConfigError(f"checkpoint {str(path)!r} cannot be re-split ({e}); resume it with its own layout "
                                  f"({world} processes, parallel.tensor={tp}, parallel.expert={ep}) or start a new run "
                                  f"from its weights with "
                                  f"train.init_from={path}") from None
        decide_on_main(convert, self.dist.device)
        return root, path.name

    # ---------------------------------------------------------------------------------- loop
    def _to_device(self, batch: dict) -> dict:
        dev = self.dist.device
        keys = ("input_ids", "labels", "segment_ids")
        out = {k: batch[k].to(dev, non_blocking=True) for k in keys if k in batch and batch[k] is not None}
        if not self.cfg.data.reset_at_doc_boundaries:
            out.pop("segment_ids", None)
        return out

    def _memory_shares(self, stats) -> list[list[float]]:
        """Per routed layer, each memory's share of the routed slots of the last micro-batch, over
        every data-parallel rank (the tensor ranks of one data rank routed the same tokens)."""
        shares = torch.stack([s.token_fraction.detach().float() for s in stats])
        if self.topology.data.size > 1:
            dist.all_reduce(shares, group=self.topology.data.group)
            shares /= self.topology.data.size
        return shares.tolist()

    def _watch_collapse(self, shares: list[list[float]]) -> None:
        """Warn once when a memory's share stays under train.collapse_share x its balanced share for
        train.collapse_logs logged steps in a row (a collapsed memory: its router stopped choosing it)."""
        t = self.cfg.train
        floor = t.collapse_share / max(len(shares[0]), 1)
        for i, layer in enumerate(shares):
            for e, share in enumerate(layer):
                key = (i, e)
                low = self._low_share.get(key, 0) + 1 if share < floor else 0
                self._low_share[key] = low
                if low == t.collapse_logs and self.dist.is_main:
                    log.warning("memory %d of layer %d has received %.2g%% of the routed slots (under %.2g%%) for "
                                "%d logged steps in a row: it has collapsed; raise model.aux_loss_coef, or check "
                                "the routing with the router/layer%d/mem* metrics", e, i, 100 * share, 100 * floor,
                                low, i)

    def _reduce_mean(self, values: torch.Tensor) -> list[float]:
        t = values.to(self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(t)
            t /= self.dist.world_size
        return t.tolist()

    def fit(self) -> dict:
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():  # log lines above the progress bar, not glued to it
            return self._fit()

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        summary: dict = {"start_step": self.step}
        if self.step >= t.max_steps:
            if self.dist.is_main and not self.quiet:
                print(f"checkpoint at step {self.step} already reached train.max_steps={t.max_steps}; "
                      f"nothing to train (use --resume none or another train.out_dir to start over)")
        if self.dist.is_main and self.step == 0:
            (self.out_dir).mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(cfg))
        self.model.train()
        tokens_per_step = self.batching.global_batch * cfg.data.seq_len
        it = iter(self.train_loader)
        bar = None
        if self.dist.is_main and not self.quiet and self.step < t.max_steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        stopped_by = None
        last_eval = None
        # captured at the first step, after any resume (its parameter addresses are the graph's)
        graphed = GraphedLoss(self.model) if t.cuda_graph else None
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            lr = self.scheduler.lr()  # the rate this step's update uses
            sums = None
            stats = []
            for _ in range(self.batching.accum):
                batch = self._to_device(next(it))
                if graphed is not None:  # no segment_ids: the config refuses them with graphs
                    out = engine_forward(self.engine, graphed, batch["input_ids"], batch["labels"])
                else:
                    out = self.engine(**batch, return_logits=False)
                if ckpt.fault_requested("nan_loss", self.step + 1):  # test hook: a poisoned step
                    out.loss = out.loss * float("nan")
                self.engine.backward(out.loss)
                self.engine.step()
                # kept on the device: a host copy here would sync every micro-batch; _reduce_mean
                # reads them only on logging steps
                zero = out.loss.new_zeros(())
                parts = torch.stack([out.loss, out.lm_loss, zero if out.aux_loss is None else out.aux_loss,
                                     zero if out.z_loss is None else out.z_loss,
                                     *[s.aux_loss for s in out.router_stats]]).detach().float()
                sums = parts if sums is None else sums + parts
                stats = out.router_stats
            applied = self.engine.was_step_applied()
            self.step += 1
            self.tokens_seen += tokens_per_step
            if applied:
                self.nonfinite_in_row = 0
            else:
                self.nonfinite_in_row += 1
                self.skipped_steps += 1
                if self.dist.is_main:
                    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                self.step, self.nonfinite_in_row)
                    self.metrics.log(self.step, {"skipped": 1.0, "skipped_total": self.skipped_steps})
                if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                    raise TrainingError(f"aborting: {self.nonfinite_in_row} steps in a row had a non-finite loss or "
                                        f"gradient (train.max_nonfinite_in_row={t.max_nonfinite_in_row}); lower the "
                                        f"learning rate or check the data")
            dt = time.perf_counter() - t0
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                loss, lm, aux, z, *layer_aux = self._reduce_mean(sums / self.batching.accum)
                values = {"loss": loss, "lm_loss": lm, "lr": lr,
                          "grad_norm": self.engine.get_global_grad_norm(),
                          "tokens_per_s": tokens_per_step / dt, "tokens_seen": self.tokens_seen,
                          "step_time_s": dt}
                achieved = self.flops_per_token * tokens_per_step / dt
                if self.peak_flops:
                    values["mfu"] = achieved / (self.peak_flops * self.dist.world_size)
                    values["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                else:
                    values["achieved_tflops"] = achieved / 1e12
                    values["peak_rss_gib"] = _peak_rss_bytes() / 2**30
                if stats:
                    values["aux_loss"] = aux
                    values["z_loss"] = z
                    shares = self._memory_shares(stats)
                    for i, s in enumerate(stats):
                        values[f"router/layer{i}/aux"] = layer_aux[i]
                        for e, frac in enumerate(shares[i]):
                            values[f"router/layer{i}/mem{e}"] = frac
                    self._watch_collapse(shares)
                self.metrics.log(self.step, values)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if bar is not None:
                bar.update(1)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                last_eval = self.evaluate()
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self.save()
                if ckpt.fault_requested("signal_after_save", self.step):  # test hook: preempted right here
                    self._stop_signal = signal.SIGTERM
            if all_reduce_max_flag(self._stop_signal is not None, self.dist.device):  # no sync in a world of 1
                stopped_by = "signal"
                break
        if bar is not None:
            bar.close()
        if graphed is not None:
            graphed.close()
        if self._last_saved is not None and self._last_saved[0] == self.step:
            # already on disk: a periodic save right before a stop signal, or a resume at max_steps;
            # saving again would rewrite the whole step inside the preemption grace period
            summary["final_checkpoint"] = str(self._last_saved[1])
        else:
            summary["final_checkpoint"] = str(self.save())
        if stopped_by is None:
            last_eval = self.evaluate()
        summary.update(step=self.step, tokens_seen=self.tokens_seen, skipped_steps=self.skipped_steps,
                       stopped_by=stopped_by, eval=last_eval)
        self.metrics.close()
        return summary

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Token-weighted loss over train.eval_steps batches of the validation split."""
        if self.val_missing:
            return None
        loader = self._loader("val")
        if len(loader) == 0:
            return None  # validation split smaller than one batch
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(loader):
            if i >= min(self.cfg.train.eval_steps, len(loader)):  # at most one pass over the split
                break
            batch = self._to_device(batch)
            out = self.model(**batch, return_logits=False)
            n = (batch["labels"] != -100).sum()
            total += torch.tensor([out.lm_loss.double().item() * n.item(), n.item()], dtype=torch.float64)
        self.model.train()
        total = total.to(self.dist.device)
        # (the tensor ranks of a data rank saw the same tokens; its sequence ranks each P x their part of
        # the loss, whose mean is the sequences': megamom.parallel.sequence_parallel)
        if self.topology.data_sequence.size > 1:
            dist.all_reduce(total, group=self.topology.data_sequence.group)
        if total[1] == 0:
            return None
        loss = float(total[0] / total[1])
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": float(total[1])}
        self.metrics.log(self.step, result, kind="val")
        if self.dist.is_main and not self.quiet:
            log.info("step %d: val loss %.4f, ppl %.2f", self.step, loss, result["val_ppl"])
        return result
