"""The process groups of a layout, built once and handed to the model, the loss, the loader and
the trainer (no module globals).

Rank order: TP innermost (a tensor group is neighbouring ranks, the fastest link), then SP, then
DP. With 8 ranks at DP=2 x SP=2 x TP=2:

    rank:     0  1  2  3  4  5  6  7
    tensor:   0  1  0  1  0  1  0  1     tensor groups  {0,1} {2,3} {4,5} {6,7}
    sequence: 0  0  1  1  0  0  1  1     sequence groups {0,2} {1,3} {4,6} {5,7}
    data:     0  0  0  0  1  1  1  1     data groups    {0,4} {1,5} {2,6} {3,7}

Expert groups (EP ranks) are formed among the data ranks of one sequence and tensor index:
consecutive blocks of EP data ranks (expert rank = data index mod EP), so an expert group's ranks
hold the same slice of different sequences and the owners of a memory in the sequence ranks of one
data index pass its states along the sequence group (megamom.parallel.sequence_parallel); the
expert-data groups join the ranks of one expert index across the blocks and the sequence ranks.
At DP=4, EP=2 (TP=SP=1): expert groups {0,1} {2,3}, expert-data groups {0,2} {1,3}. At DP=2 x
SP=2, EP=2: expert groups {0,2} {1,3} (data ranks 0 and 1 of sequence index 0, of index 1),
expert-data groups {0,1} {2,3}.
`Topology.mpu()` is the adapter DeepSpeed takes (`deepspeed.initialize(mpu=...)`): ZeRO then
partitions and reduces over the data group only, and its gradient norm counts a parameter sharded
over the tensor group once per shard and a replicated one once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from .layout import ParallelLayout


@dataclass(frozen=True)
class Group:
    """One process group as this rank sees it. `group` None: a group of one (no communication)."""
    group: Optional[object]
    ranks: tuple[int, ...]
    rank: int  # this rank's index in `ranks`

    @property
    def size(self) -> int:
        return len(self.ranks)


def _solo(rank: int) -> Group:
    return Group(None, (rank,), 0)


class Topology:
    """The groups of a `ParallelLayout` for this rank. Collective: every rank of the world builds it,
    in the same order (torch.distributed.new_group is collective)."""

    def __init__(self, layout: ParallelLayout, rank: int):
        self.layout = layout
        self.global_rank = rank
        L = layout
        if L.sequence > 1 and L.data % L.expert:  # (ParallelLayout.build refuses it with the fix)
            raise ValueError(f"expert size {L.expert} does not divide the {L.data} data ranks: with sequence "
                             f"parallelism an expert group joins data ranks of one slice")
        self.coordinates = L.coordinates(rank)

        def rank_of(dp: int, sp: int, tp: int) -> int:
            return (dp * L.sequence + sp) * L.tensor + tp

        groups = {
            "tensor": [[rank_of(dp, sp, t) for t in range(L.tensor)]
                       for dp in range(L.data) for sp in range(L.sequence)],
            "sequence": [[rank_of(dp, s, tp) for s in range(L.sequence)]
                         for dp in range(L.data) for tp in range(L.tensor)],
            "data": [[rank_of(d, sp, tp) for d in range(L.data)] for sp in range(L.sequence) for tp in range(L.tensor)],
            # the ranks holding the same tensor shard: data x sequence (what ZeRO partitions and averages over)
            "data_sequence": [[rank_of(d, s, tp) for d in range(L.data) for s in range(L.sequence)]
                              for tp in range(L.tensor)],
            # the ranks that hold one copy of every parameter: a data rank's whole tensor x sequence block
            "model": [[rank_of(dp, s, t) for s in range(L.sequence) for t in range(L.tensor)] for dp in range(L.data)],
        }
        # expert groups: consecutive blocks of EP in the sequence-major order of the DP x SP ranks of one
        # tensor index (i = sp * DP + dp; EP divides DP when SP > 1, so a block is data ranks of one slice)
        dpsp = L.data * L.sequence
        groups["expert"] = [[rank_of(i % L.data, i // L.data, tp) for i in range(b, b + L.expert)]
                            for tp in range(L.tensor) for b in range(0, dpsp, L.expert)]
        # expert-data groups: the ranks holding the same memories (the same expert index), whose
        # copies of those memories' gradients are reduced together
        groups["expert_data"] = [sorted(rank_of(i % L.data, i // L.data, tp) for i in range(e, dpsp, L.expert))
                                 for tp in range(L.tensor) for e in range(L.expert)]
        # (every list ascending: a process group's ranks are numbered in ascending order (new_group
        # sorts them), and Group.rank must be the index the collectives and DeepSpeed's partitions use)
        assert all(ranks == sorted(ranks) for lists in groups.values() for ranks in lists)
        self._groups: dict[str, Group] = {}
        for name, lists in groups.items():
            mine = None
            for ranks in lists:
                # every rank creates every group (new_group is collective over the world), groups of
                # one too: DeepSpeed takes a group of None for the whole world
                handle = dist.new_group(ranks) if L.world > 1 else None
                if rank in ranks:
                    mine = Group(handle, tuple(ranks), ranks.index(rank))
            self._groups[name] = mine or _solo(rank)

    @classmethod
    def single(cls) -> "Topology":
        """A world of one: every group is this rank alone."""
        return cls(ParallelLayout(1, 1), 0)

    @property
    def tensor(self) -> Group:
        return self._groups["tensor"]

    @property
    def sequence(self) -> Group:
        return self._groups["sequence"]

    @property
    def data(self) -> Group:
        return self._groups["data"]

    @property
    def data_sequence(self) -> Group:
        """The data x sequence ranks of one tensor index: they hold the same parameters, and each
        computes a part of their gradient (another batch, or another slice of the same sequences)."""
        return self._groups["data_sequence"]

    @property
    def expert(self) -> Group:
        return self._groups["expert"]

    @property
    def expert_data(self) -> Group:
        """The ranks that hold the same routed memories as this one (one per expert group)."""
        return self._groups["expert_data"]

    @property
    def model(self) -> Group:
        """The tensor x sequence ranks of one data rank: together they hold one copy of the model."""
        return self._groups["model"]

    def mpu(self) -> "DeepSpeedMPU":
        return DeepSpeedMPU(self)

    def __repr__(self) -> str:
        L = self.layout
        return (f"Topology(world={L.world}, data={L.data}, sequence={L.sequence}, tensor={L.tensor}, "
                f"expert={L.expert}, rank={self.global_rank} at {self.coordinates})")


class DeepSpeedMPU:
    """DeepSpeed's model-parallel-unit interface over a Topology. Its "model parallel" group is the
    tensor group: the gradient norm sums the squares of parameters marked `tensor_model_parallel` on
    every tensor rank and of the others on tensor rank 0 only, then all-reduces over the tensor
    group. Its "data parallel" group is data x sequence: ZeRO partitions the optimizer state and
    averages the gradients over every rank that holds the same parameters; a sequence rank's loss is
    scaled so that this mean is right (megamom.parallel.sequence_parallel)."""

    def __init__(self, topology: Topology):
        self.topology = topology

    def get_model_parallel_rank(self) -> int:
        return self.topology.tensor.rank

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tensor.size

    def get_model_parallel_group(self):
        return self.topology.tensor.group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.topology.data_sequence.rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.data_sequence.size

    def get_data_parallel_group(self):
        return self.topology.data_sequence.group

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
