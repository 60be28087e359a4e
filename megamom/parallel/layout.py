"""The layout of a world of ranks: world = DP x SP x TP, with TP innermost (the ranks of a tensor
group are neighbours, on the fastest link), then SP, then DP; expert-parallel groups of EP ranks
are formed inside DP x SP (they hold whole tokens, so the routed all-to-all never crosses a tensor
group), from data ranks of one sequence slice when SP > 1. Every size is checked against the
model and the data here, before any group or any work."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# (megamom.config.Config is not imported: Config.validate calls check_config, and the exported
# Hugging Face code must import its modules without a cycle)

# The parallel modes this version trains with; the others are refused before any work.
SUPPORTED = {"tensor": True, "sequence": True, "expert": True}


def check_config(cfg) -> None:
    """The divisibility rules that need no world size, for a megamom.config.Config: each sharded
    dimension splits evenly."""
    m, p = cfg.model, cfg.parallel
    rules = []  # (value, parallel mode that splits it, what it is, why it must split evenly)
    if p.tensor > 1:
        tp = p.tensor
        rules.append((m.num_heads, "tensor", "model.num_heads", "tensor parallelism shards whole heads"))
        if m.arch == "transformer":
            rules.append((m.num_kv_heads or m.num_heads, "tensor", "model.num_kv_heads",
                          "each tensor rank holds whole key / value heads"))
        rules.append((m.mlp_hidden_size, "tensor", "the MLP width (model.intermediate_size)",
                      "the MLP's gate / up columns and down rows split over the tensor ranks"))
        rules.append((m.vocab_size, "tensor", "model.vocab_size",
                      f"the embedding and output layer split the vocabulary; pad it, e.g. to "
                      f"{-(-m.vocab_size // (128 * tp)) * 128 * tp} (a multiple of 128 x parallel.tensor)"))
        if p.tensor_sequence_parallel:
            rules.append((cfg.data.seq_len, "tensor", "data.seq_len",
                          "parallel.tensor_sequence_parallel splits the sequence over the tensor ranks"))
    if p.sequence > 1:
        rules.append((cfg.data.seq_len, "sequence", "data.seq_len", "each sequence rank holds an equal slice"))
    if p.expert > 1:
        if m.arch != "mom":
            raise ConfigError(f"parallel.expert={p.expert} needs model.arch=mom (routed memories to shard); "
                              f"model.arch={m.arch} has none")
        rules.append((m.num_memories, "expert", "model.num_memories", "each expert rank holds whole memories"))
    for value, mode, what, why in rules:
        size = getattr(p, mode)
        if value % size:
            raise ConfigError(f"{what}={value} is not divisible by parallel.{mode}={size}: {why}")


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    data: int
    sequence: int = 1
    tensor: int = 1
    expert: int = 1

    @classmethod
    def build(cls, cfg, world_size: int) -> "ParallelLayout":
        """The layout of `world_size` ranks for a megamom.config.Config, or a ConfigError saying
        what to change."""
        check_config(cfg)
        p = cfg.parallel
        model_parallel = p.tensor * p.sequence
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.sequence = "
                              f"{p.tensor} x {p.sequence}; launch a multiple of {model_parallel} processes")
        data = world_size // model_parallel
        if p.sequence > 1 and data % p.expert:
            raise ConfigError(f"parallel.expert={p.expert} does not divide the {data} data-parallel ranks (world "
                              f"{world_size} / (parallel.tensor x parallel.sequence = {p.tensor} x {p.sequence})): "
                              f"with sequence parallelism an expert group joins data ranks of one sequence slice; "
                              f"launch a multiple of {p.expert * model_parallel} processes or change parallel.expert")
        if (data * p.sequence) % p.expert:
            raise ConfigError(f"parallel.expert={p.expert} does not divide data x sequence parallel = {data} x "
                              f"{p.sequence} ranks (expert groups are formed inside them); change parallel.expert "
                              f"or the number of processes")
        return cls(world_size, data, p.sequence, p.tensor, p.expert)

    def coordinates(self, rank: int) -> dict:
        """Where a rank sits: its data, sequence and tensor indices (TP fastest), and its expert
        index (megamom.parallel.topology: blocks of EP in the sequence-major order of DP x SP)."""
        tp = rank % self.tensor
        sp = rank // self.tensor % self.sequence
        dp = rank // (self.tensor * self.sequence)
        return {"data": dp, "sequence": sp, "tensor": tp, "expert": (sp * self.data + dp) % self.expert}


def check_supported(layout: ParallelLayout, cfg=None) -> None:
    """Refuse, before any work, the parallel modes this version does not train yet, and (given the
    run's megamom.config.Config) the training settings not combined with them yet."""
    asked = {"tensor": layout.tensor, "sequence": layout.sequence, "expert": layout.expert}
    missing = [f"parallel.{mode}={size}" for mode, size in asked.items() if size > 1 and not SUPPORTED[mode]]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not available in this version of megamom train yet; use data "
                          f"parallelism (more processes) for now")
    if cfg is None:
        return
    t = cfg.train
    if layout.tensor > 1:
        _refuse(f"parallel.tensor={layout.tensor}", {
            "train.zero_stage=3": (t.zero_stage == 3, "ZeRO-3 would partition the tensor shards once more and gather "
                                   "them around each module; its consolidation of tensor-parallel checkpoints is not "
                                   "written: use train.zero_stage=1 or 2 (the optimizer state is sharded over the data "
                                   "group either way)"),
            "train.cuda_graph=true": (t.cuda_graph, "the tensor group's collectives are not captured in the graphs "
                                      "yet: set train.cuda_graph=false"),
            "train.compile=true": (t.compile, "torch.compile is not tested with the tensor group's autograd "
                                   "collectives: set train.compile=false"),
            "train.offload_optimizer=true": (t.offload_optimizer, "DeepSpeed's CPU Adam is not tested with tensor "
                                             "parallelism here: set train.offload_optimizer=false"),
        })
    if layout.sequence > 1:
        _refuse(f"parallel.sequence={layout.sequence}", {
            "train.zero_stage=3": (t.zero_stage == 3, "not tested with the sequence ranks counted as data ranks: use "
                                   "train.zero_stage=1 or 2"),
            "train.cuda_graph=true": (t.cuda_graph, "the state passing reads row counts on the host, which a CUDA "
                                      "graph cannot replay: set train.cuda_graph=false"),
            "train.compile=true": (t.compile, "torch.compile is not tested with the sequence group's exchanges: set "
                                   "train.compile=false"),
            "train.offload_optimizer=true": (t.offload_optimizer, "DeepSpeed's CPU Adam is not tested with sequence "
                                             "parallelism here: set train.offload_optimizer=false"),
        })
    if layout.expert > 1:
        _refuse(f"parallel.expert={layout.expert}", {
            "train.zero_stage=3": (t.zero_stage == 3, "DeepSpeed's ZeRO-3 refuses its expert (MoE) parameter groups, "
                                   "which hold the memories split over expert ranks: use train.zero_stage=1 or 2"),
            "train.zero_stage=0": (t.zero_stage == 0, "a ZeRO-0 checkpoint keeps data rank 0's module weights only, "
                                   "so the other expert ranks' memories would not be saved: use train.zero_stage=1 "
                                   "or 2 (their optimizer partitions hold every memory)"),
            "train.cuda_graph=true": (t.cuda_graph, "the memories' all-to-all has sizes that change every step (read "
                                      "on the host), which a CUDA graph cannot replay: set train.cuda_graph=false"),
            "train.compile=true": (t.compile, "the all-to-all's host-side sizes would break the compiled graph every "
                                   "layer: set train.compile=false"),
            "train.offload_optimizer=true": (t.offload_optimizer, "DeepSpeed's CPU Adam is not tested with expert "
                                             "parallelism here: set train.offload_optimizer=false"),
        })


def _refuse(mode: str, refused: dict) -> None:
    bad = [f"{what} ({why})" for what, (on, why) in refused.items() if on]
    if bad:
        raise ConfigError(f"{mode} cannot be combined with " + "; ".join(bad))
