"""Expert parallelism for the memories: each rank of an expert group holds `num_memories / EP` routed
memories (their k / v / beta / decay rows and convs); the shared memory and everything else stay
dense. A MoM layer's dispatcher then moves the rows of the other ranks' memories there and back:

  1. route and pack locally (dispatch.build_packing over every memory): the routed rows are sorted
     by (memory, document, position), so the rows of an owner's memories are one contiguous block
  2. exchange the block sizes and document counts (one small all-to-all), read them on the host (the
     one host sync of the layer: an uneven all-to-all needs its sizes there)
  3. all-to-all the hidden-state rows [d] of the routed slots, each with its (local memory, document)
  4. on the owner: one packing over the received rows and this rank's own tokens for the shared
     memory, segments (memory, source rank, document), and ONE run of the memory experts (projections,
     conv, scan) over all of it
  5. the routed output rows [H * Vh] go back by the reverse all-to-all and are combined with the
     routing weights on the rank that owns the token, as on one rank

Hidden states travel (d values a row) rather than projected rows: the per-memory projections need
the owner's weights, and the q projection (replicated) is cheap enough to repeat on the owner for
the rows it receives. Dropless and order-preserving: no capacity factor, no token dropped, each
memory's rows keep their time order, so the layer equals one process exactly."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..model.dispatch import Dispatcher, Packing, _GatherTokens, _Permute, build_packing
from .mappings import all_to_all
from .topology import Group


class ExpertParallelDispatcher(Dispatcher):
    """The dispatcher of a MoM layer whose routed memories are split over `group`: this rank holds
    memories [rank * local, (rank + 1) * local). Routing and packing cover every memory, as on one
    rank; `run` exchanges the routed rows with their owners."""

    def __init__(self, num_routed: int, shared: bool, group: Group):
        super().__init__(num_routed, shared)
        if num_routed % group.size:
            raise ValueError(f"{num_routed} memories do not split over {group.size} expert ranks")
        self.group = group
        self.local = num_routed // group.size
        self.last_exchange: Optional[dict] = None  # rows sent / received by the last forward (for logs)

    def run(self, x: torch.Tensor, doc_ids: torch.Tensor, packing: Packing, experts: Callable, row_shape: tuple,
            fused: bool = False, seq_slice=None):
        """x [N, d]: this rank's tokens; doc_ids [N] their documents; packing: their rows over every
        memory (dispatch.build_packing); experts(rows [A', d], packing', slice') -> (output rows
        [A', *row_shape] in packing' order, ...) for the memories held here. seq_slice: under
        sequence parallelism this rank's SequenceSlice; the experts get it as the owner sees its
        rows (SequenceSlice.for_owner: every source's samples). -> output rows [A, *row_shape] in
        `packing`'s order, None, None (no decode state under expert parallelism)."""
        P, E_loc, D, N = self.group.size, self.local, packing.num_docs, packing.num_tokens
        k = packing.slot_row.shape[1] - int(self.shared)
        routed_rows = N * k
        device = x.device

        # 2. block sizes per owner (rows are memory-major, owners hold consecutive memories)
        bounds = packing.cu_seqlens[torch.arange(P + 1, device=device) * (E_loc * D)]
        send_counts = bounds.diff()
        header = torch.stack([send_counts, torch.full_like(send_counts, D)], 1)  # [P, (rows, documents)]
        received_header = torch.empty_like(header)
        if P > 1:
            dist.all_to_all_single(received_header, header, group=self.group.group)
        else:
            received_header.copy_(header)
        sizes = torch.cat([send_counts, received_header.reshape(-1)]).tolist()  # the layer's one host sync
        send, recv, docs_from = sizes[:P], sizes[P::2], sizes[P + 1::2]
        self.last_exchange = {"sent": send, "received": recv}

        # 3. the hidden states of the routed rows, and where each belongs on its owner
        x_send = _GatherTokens.apply(x, packing.row_token[:routed_rows], packing.slot_row[:, :k], fused)
        memory = packing.row_memory[:routed_rows]
        key = (memory % E_loc) * D + (packing.row_segment[:routed_rows] - memory * D)  # (local memory, document)
        x_recv = all_to_all(x_send, send, recv, self.group)
        key_recv = all_to_all(key, send, recv, self.group)

        # 4. one packing of the received rows (+ this rank's tokens for the shared memory), segments
        # (memory, source, document): within a memory the received order is (source, document, position)
        A_recv = sum(recv)
        # (from the received header, on the device: no host-to-device copy)
        source = torch.repeat_interleave(torch.arange(P, device=device), received_header[:, 0], output_size=A_recv)
        docs = received_header[:, 1][source]
        stride = max(docs_from)  # documents per source in the segment numbering
        mem_all, doc_all, x_all = key_recv // docs, source * stride + key_recv % docs, x_recv
        if self.shared:
            mem_all = torch.cat([mem_all, torch.full((N,), E_loc, device=device, dtype=mem_all.dtype)])
            doc_all = torch.cat([doc_all, self.group.rank * stride + doc_ids])
            x_all = torch.cat([x_recv, x])
        # under sequence parallelism an owner with no row still runs the experts (its sequence peers
        # exchange states and halos with it, and the states of documents crossing its slice pass
        # through it): over one zero row of a document of its own, whose output is dropped
        pad = seq_slice is not None and not x_all.shape[0]
        if pad:  # (x_recv, empty, stays in the graph: its all-to-all's backward runs on every rank)
            mem_all, doc_all = mem_all.new_zeros(1), mem_all.new_full((1,), P * stride)
            x_all = torch.cat([x_recv, x.new_zeros(1, x.shape[1])])
        # (the Triton packing wants documents non-decreasing over all rows: the torch one sorts)
        local = build_packing(mem_all[:, None], doc_all, P * stride + int(pad), E_loc + int(self.shared), False,
                              fused=False)
        owner_slice = seq_slice.for_owner(self.group, stride) if seq_slice is not None else None
        if local.num_tokens:
            o_local = experts(x_all, local, owner_slice)[0]
            o_all = _Permute.apply(o_local, local.slot_row.view(-1), local.row_slot)  # back to x_all's order
        else:  # nothing to run here; the reverse all-to-all still joins in, with a gradient path
            o_all = x_all.new_zeros(0, *row_shape) + x_all.sum()

        # 5. the routed outputs back to the tokens' ranks, in `packing`'s row order
        o_back = all_to_all(o_all[:A_recv].flatten(1), recv, send, self.group).view(-1, *row_shape)
        if self.shared:
            o_back = torch.cat([o_back, o_all[A_recv:]])
        return o_back, None, None


# ------------------------------------------------------------------------------------ DeepSpeed
def _deepspeed_moe_marker(num_experts: int):
    """An empty module DeepSpeed takes for one of its MoE layers. DeepSpeed turns its expert handling
    on (`engine.has_moe_layers`: ZeRO-1/2 reduce and partition the marked memory parameters over the
    expert-data group) only when the model holds a `deepspeed.moe.layer.MoE`; the memories are not
    built from it, so this stands in. No parameters, no state, never called."""
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are the topology's (register_expert_groups), made before the engine

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker()


_registered: set = set()  # DeepSpeed group names registered by this process


def register_expert_groups(model) -> None:
    """Before deepspeed.initialize: give DeepSpeed's group registry (deepspeed.utils.groups) the
    topology's expert and expert-data groups under the name the marked memory parameters carry, and
    mark the model as MoE for the engine; a model without expert parallelism clears what an earlier
    engine of this process registered (DeepSpeed's universal-checkpoint loader splits expert
    parameters by whatever the registry holds)."""
    from deepspeed.utils import groups

    from .parallelize import expert_group_name
    for name in _registered:
        for registry in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                         groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            registry.pop(name, None)
    _registered.clear()
    top = getattr(model, "topology", None)
    if top is None or top.expert.size == 1:
        return
    name = expert_group_name(top.expert.size)
    groups._EXPERT_PARALLEL_GROUP[name] = top.expert.group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(top.expert.ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = top.expert_data.group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(top.expert_data.ranks)
    _registered.add(name)
    if not hasattr(model, "expert_parallel_marker"):
        model.expert_parallel_marker = _deepspeed_moe_marker(model.config.num_memories)
