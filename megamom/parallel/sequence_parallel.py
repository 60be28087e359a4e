"""Sequence parallelism (parallel.sequence = P): each rank of a sequence group holds one contiguous
slice of every sequence of the micro-batch, and the layers that mix along time pass what crosses a
slice edge between the ranks, exactly:

  memory layers   per (memory, sample), the summary of the rank's slice, S_out = T S_in + S (T the
                  slice's transition, S its state from zero; kernels/state_passing.py): rank 0's
                  from its own scan, the others' from a scan of each row's last document alone,
                  with the value dimension extended by K transition columns only where one document
                  covers the slice (a boundary inside it makes T = 0: the state was reset; one
                  ending exactly at the slice edge makes S = T = 0); ONE all-gather of the
                  summaries; each rank folds its predecessors' and scans from the folded state.
  short convs     each memory's last conv_size - 1 inputs before the slice (the "halo"), which may
                  lie on any earlier rank: every rank shares the last rows of its last document per
                  memory, ONE all-gather, and walks back over its predecessors until it has enough
                  rows or meets a document boundary.
  attention       (Transformer++) keys and values all-gathered along the sequence, queries local,
                  with the causal mask shifted by the slice's start and the documents' mask. Chosen
                  over ring attention for exactness and simplicity: the gathered K / V of a GQA model
                  are small next to the activations a long context keeps, and the O(T^2) attention
                  compute is what dominates at the lengths where SP matters for that baseline.
  experts         (SP x EP) an expert group joins data ranks of one sequence index, so the owners
                  of a memory along a sequence group receive the same samples' rows, in the same
                  order: the owner runs the state passing and the halos above over its received
                  rows (SequenceSlice.for_owner), the shared memory included.
  routing         per token, local; the balance loss's counts and token totals are all-reduced
                  over the group (Router.counts_reduce), so each rank's loss is its part of the
                  whole sequence's loss.
  loss            each rank's cross entropy is P x its tokens' sum over the whole sequence's count,
                  and the router losses P x its part of the sequence's: the mean over the sequence
                  ranks is the one-process loss. DeepSpeed counts the sequence ranks as data ranks
                  (Topology.mpu: ZeRO partitions and averages gradients over data x sequence), and
                  its mean is the right one; so is the trainer's mean of the logged losses.

Every exchange is an autograd function of megamom.parallel.mappings (all-gather forward,
reduce-scatter backward), so the backward is the exact mirror image."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.loss import IGNORE_INDEX
from .mappings import all_reduce_, gather_along
from .topology import Group


@dataclass
class SequenceSlice:
    """This rank's slice of the micro-batch's sequences [B, T]: positions start .. start + length."""
    group: Group
    start: int
    length: int
    total: int  # T, the whole sequence
    carry_in: torch.Tensor  # [B] bool: the slice's first document began before it
    carry_out: torch.Tensor  # [B] bool: its last document goes on after it
    first_doc: torch.Tensor  # [B] long: the first / last document of each row, as the layer's doc_ids number them
    last_doc: torch.Tensor
    segment_ids: Optional[torch.Tensor] = None  # [B, T] the whole sequences' document numbers (attention's mask)

    @property
    def passthrough(self) -> torch.Tensor:
        """[B] bool: one document covers the whole slice and began before it (a state passes through)."""
        return self.carry_in & (self.first_doc == self.last_doc)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's slices of x concatenated along `dim` (the whole sequence; the gradient goes back
        to each slice's rank)."""
        return gather_along(x, dim, self.group)

    def for_owner(self, expert: Group, stride: int) -> "SequenceSlice":
        """The slice as a rank of the expert group `expert` sees the rows it receives (expert
        parallelism): the samples of every source rank of the group, source-major, a source's
        documents numbered from source x `stride` (megamom.parallel.expert_parallel). The group's
        ranks hold the same slice of different sequences, and the owners of a memory along this
        slice's sequence group receive the same samples in the same order, so the state passing and
        the halos run over the sequence group as on one rank, with EP x B rows."""
        if expert.size == 1:
            return self
        rows = torch.stack([self.carry_in.long(), self.carry_out.long(), self.first_doc, self.last_doc])
        every = gather_along(rows[None], 0, expert)  # [EP, 4, B] (integers: no gradient)
        offset = torch.arange(expert.size, device=rows.device)[:, None] * stride
        return SequenceSlice(self.group, self.start, self.length, self.total, every[:, 0].bool().reshape(-1),
                             every[:, 1].bool().reshape(-1), (every[:, 2] + offset).reshape(-1),
                             (every[:, 3] + offset).reshape(-1))

    # what the layers call (they know the slice, not the layout)
    def conv_halos(self, raw: dict, packing, width: int) -> dict:
        return conv_halos(raw, packing, self, width)

    def memory_scan(self, rule, q, k, v, g, beta, packing, **scan_args) -> torch.Tensor:
        return scan_slice(rule, q, k, v, g, beta, packing, self, **scan_args)


def split_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor],
                group: Group):
    """The whole micro-batch [B, T] (every rank of the group holds it) -> this rank's input ids and
    labels [B, T / P] and the context the blocks read: documents numbered as on one rank but within
    the slice, positions of the whole sequence (rotary embeddings), and the `SequenceSlice`."""
    from ..model.lm import document_index, document_positions
    B, T = input_ids.shape
    P, r = group.size, group.rank
    if T % P:
        raise ValueError(f"sequence length {T} does not split into {P} equal slices (parallel.sequence={P}): "
                         f"use a data.seq_len divisible by {P}")
    L = T // P
    s = r * L
    device = input_ids.device
    here = slice(s, s + L)
    ids = input_ids[:, here]
    lab = labels[:, here] if labels is not None else None
    if segment_ids is None:
        rows = torch.arange(B, device=device)
        carry_in = torch.full((B,), r > 0, device=device)
        carry_out = torch.full((B,), r < P - 1, device=device)
        doc_ids, num_docs = document_index(None, B, L, device)
        info = SequenceSlice(group, s, L, T, carry_in, carry_out, rows, rows)
        positions = (torch.arange(s, s + L, device=device)).expand(B, L)
        return ids, lab, {"doc_ids": doc_ids, "num_docs": num_docs, "positions": positions, "segment_ids": None,
                          "slice": info}
    seg = segment_ids[:, here]
    local = seg - seg[:, :1]  # documents of the slice numbered from 0 in each row
    carry_in = segment_ids[:, s - 1] == seg[:, 0] if r > 0 else torch.zeros(B, dtype=torch.bool, device=device)
    carry_out = (segment_ids[:, s + L] == seg[:, -1] if r < P - 1
                 else torch.zeros(B, dtype=torch.bool, device=device))
    doc_ids, num_docs = document_index(local, B, L, device)
    per_row = local[:, -1].long() + 1
    first = F.pad(per_row.cumsum(0)[:-1], (1, 0))
    info = SequenceSlice(group, s, L, T, carry_in, carry_out, first, first + per_row - 1, segment_ids)
    positions = document_positions(segment_ids)[:, here]
    return ids, lab, {"doc_ids": doc_ids, "num_docs": num_docs, "positions": positions, "segment_ids": local,
                      "slice": info}


# ---------------------------------------------------------------------------------------------- memories

def _segment_ends(x: torch.Tensor, cu: torch.Tensor, width: int):
    """The last `width` rows of every segment of x [A, C] (cu_seqlens [S+1]), right-aligned and zero
    where the segment is shorter: -> ([S, width, C], rows present [S])."""
    idx = cu[1:, None] - width + torch.arange(width, device=x.device)  # [S, width]
    present = idx >= cu[:-1, None]
    # row 0 of the padded x is the zero of the rows not present (and x may have no row at all)
    padded = torch.cat([x.new_zeros(1, *x.shape[1:]), x])
    rows = padded.index_select(0, torch.where(present, idx + 1, 0).reshape(-1)).view(*idx.shape, *x.shape[1:])
    return rows, present.sum(1)


def _per_row_segments(packing, docs: torch.Tensor) -> torch.Tensor:
    """[M, B] segment index of (memory m, document docs[b])."""
    M, D = packing.num_memories, packing.num_docs
    return torch.arange(M, device=docs.device)[:, None] * D + docs[None, :]


def conv_halos(raw: dict, packing, sl: SequenceSlice, width: int) -> dict:
    """raw: name -> packed rows [A, C] before the short conv (q, k, v). -> name -> the rows before each
    segment [M, D, width, C] (the conv's initial tails, oldest first): for each row's first document,
    when it began on an earlier rank, the last `width` rows of that memory in that document, taken from
    the ranks before this one; zero elsewhere."""
    M, D = packing.num_memories, packing.num_docs
    r = sl.group.rank
    last = _per_row_segments(packing, sl.last_doc).reshape(-1)  # [M * B]
    first = _per_row_segments(packing, sl.first_doc)
    names = list(raw)
    ends, present = zip(*(_segment_ends(raw[n], packing.cu_seqlens, width) for n in names))
    count = present[0].index_select(0, last).view(M, -1)  # [M, B] rows this rank can give
    out_ok = sl.carry_out[None, :].expand_as(count)
    through = sl.passthrough[None, :].expand_as(count)
    # one all-gather of every name's last rows and of (rows given, doc goes on, passes through)
    flags = torch.stack([count * out_ok, out_ok.long(), through.long()])  # [3, M, B]
    all_flags = sl.gather(flags[None], 0)  # [P, 3, M, B] (integers: no gradient)
    halos = {}
    for n, e in zip(names, ends):
        tails = e.index_select(0, last).view(M, -1, width, e.shape[-1])  # [M, B, width, C]
        everyone = sl.gather(tails[None], 0)  # [P, M, B, width, C]
        halo = everyone[r] * 0  # (zero, but keeps the exchange in the graph: its backward runs on every rank)
        filled = torch.zeros_like(count)
        walking = sl.carry_in[None, :].expand_as(count).clone()
        slot = torch.arange(width, device=tails.device)
        for j in range(r - 1, -1, -1):  # predecessors, nearest first
            given, goes_on, passes = all_flags[j]
            walking = walking & goes_on.bool()
            # slot s of the halo takes slot s + filled of rank j's right-aligned tail
            src = (slot[None, None, :] + filled[..., None]).clamp(max=width - 1)
            take = walking[..., None] & (slot[None, None, :] + filled[..., None] < width) & \
                (slot[None, None, :] + filled[..., None] >= width - given[..., None])
            moved = everyone[j].gather(2, src[..., None].expand(*src.shape, tails.shape[-1]))
            halo = torch.where(take[..., None], moved, halo)
            filled = filled + torch.where(walking, given, torch.zeros_like(given))
            walking = walking & passes.bool() & (filled < width)
        full = tails.new_zeros(M * D, width, tails.shape[-1])
        start = (sl.carry_in[None, :].expand_as(count)).reshape(-1, 1, 1).to(halo.dtype)
        full = full.index_copy(0, first.reshape(-1), halo.reshape(-1, width, tails.shape[-1]) * start)
        halos[n] = full.view(M, D, width, -1)
    return halos


def scan_slice(rule, q, k, v, g, beta, packing, sl: SequenceSlice, **scan_args) -> torch.Tensor:
    """memory_scan over this rank's packed rows [1, A, H, ...] (segments packing.cu_seqlens), each
    row's first document continuing from the state the earlier ranks pass it. -> o [1, A, H, V].

    Rank 0: nothing enters, so its scan from zero is its own and the final states of its rows' last
    documents are its summary (T never matters there: the state entering rank 0 is zero). Other ranks:
    the summary of each (memory, row) from a scan of the rows' last documents alone, the value
    dimension extended by K transition columns only when a document covers the whole slice (else
    T = 0: the state was reset inside the slice); one all-gather; the fold; the scan from the folded
    states. The last rank's summary would reach no one: it sends zeros."""
    from megamom.kernels import memory_scan
    from megamom.kernels.state_passing import fold_states
    M, D = packing.num_memories, packing.num_docs
    B = sl.carry_in.shape[0]
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    P, r = sl.group.size, sl.group.rank
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    last = _per_row_segments(packing, sl.last_doc).reshape(-1)  # [M * B]
    going_on = sl.carry_out.view(1, B, 1, 1, 1).to(dt)
    if r == 0:
        o, final = memory_scan(rule, q, k, v, g, beta, output_final_state=True, cu_seqlens=packing.cu_seqlens,
                               **scan_args)
        S = final.index_select(0, last).view(M, B, H, K, V).to(dt) * going_on
        everyone = sl.gather(torch.cat([S, S.new_zeros(M, B, H, K, K)], -1)[None], 0)
        return o + everyone.reshape(-1)[0].to(o.dtype) * 0  # (the exchange stays in the graph: its backward)
    if r < P - 1:
        summary = _last_document_summary(rule, k, v, g, beta, packing, sl, last, dt, scan_args) * going_on
    else:  # (requires_grad as on the other ranks: the exchange's backward then runs here too)
        summary = torch.zeros(M, B, H, K, V + K, dtype=dt, device=k.device, requires_grad=k.requires_grad)
    everyone = sl.gather(summary[None], 0)  # [P, M, B, H, K, V + K]
    T_all = everyone[:r + 1, ..., V:].reshape(r + 1, M * B, H, K, K)
    S_all = everyone[:r + 1, ..., :V].reshape(r + 1, M * B, H, K, V)
    entering = fold_states(T_all, S_all)[r].view(M, B, H, K, V) * sl.carry_in.view(1, B, 1, 1, 1).to(dt)
    first = _per_row_segments(packing, sl.first_doc).reshape(-1)
    initial = torch.zeros(M * D, H, K, V, dtype=dt, device=k.device).index_copy(
        0, first, entering.reshape(M * B, H, K, V))
    o, _ = memory_scan(rule, q, k, v, g, beta, initial_state=initial, cu_seqlens=packing.cu_seqlens, **scan_args)
    return o


def _last_document_summary(rule, k, v, g, beta, packing, sl: SequenceSlice, last, dt, scan_args) -> torch.Tensor:
    """[M, B, H, K, V + K]: per (memory, row), the state from zero after the row's last document
    (S) and, where one document covers the whole slice, its transition (T; zero elsewhere)."""
    from megamom.kernels import memory_scan
    from megamom.kernels.state_passing import slice_summary
    M, D = packing.num_memories, packing.num_docs
    B = sl.carry_in.shape[0]
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    cu = packing.cu_seqlens
    keep = torch.zeros(M * D, dtype=torch.bool, device=k.device)
    keep[last] = True
    rows = keep.index_select(0, packing.row_segment).nonzero().squeeze(1)
    through = sl.passthrough.repeat(M)
    transitions = bool(through.any())  # (a host sync, as the nonzero above)
    sub_cu = F.pad(((cu[1:] - cu[:-1]) * keep).cumsum(0), (1, 0))

    def pick(t):
        return None if t is None else t[0].index_select(0, rows)[None]

    ks, vs, gs, bs = pick(k), pick(v), pick(g), pick(beta)
    args = {n: a for n, a in scan_args.items() if n not in ("scale", "keep")}
    if transitions:  # values [v | 0] from the state [0 | I] where a document covers the slice
        carries = torch.zeros(M * D, dtype=dt, device=k.device)
        carries[last] = through.to(dt)
        T, S = slice_summary(rule, ks, vs, gs, bs, cu_seqlens=sub_cu, carries=carries, **args)
        T = T.index_select(0, last).view(M, B, H, K, K).to(dt)
    else:
        _, S = memory_scan(rule, torch.zeros_like(ks), ks, vs, gs, bs, output_final_state=True, cu_seqlens=sub_cu,
                           **args)
        T = S.new_zeros(M, B, H, K, K, dtype=dt)
    return torch.cat([S.index_select(0, last).view(M, B, H, K, V).to(dt), T], -1)


# ---------------------------------------------------------------------------------------------- model seams

class SequenceSplit:
    """The model's seam for sequence parallelism (CausalLM.sequence_split): the whole micro-batch in,
    this rank's slice and the blocks' context out."""

    def __init__(self, group: Group):
        self.group = group

    def __call__(self, input_ids, labels, segment_ids):
        return split_batch(input_ids, labels, segment_ids, self.group)


class SequenceParallelLoss(nn.Module):
    """The language-model loss of this rank's slice: P x (the sum of its tokens' losses over every
    rank's count of tokens), so that the mean over the sequence ranks, which DeepSpeed takes of the
    gradients (it counts them as data ranks) and the logs of the losses, is the whole sequence's."""

    def __init__(self, inner: nn.Module, group: Group):
        super().__init__()
        self.inner, self.group = inner, group

    @property
    def chunk_rows(self) -> int:
        return self.inner.chunk_rows

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(hidden, weight)

    def forward(self, hidden, weight, labels, logits=None):
        here = (labels != IGNORE_INDEX).sum()
        everywhere = all_reduce_(here.clone(), self.group)
        return self.inner(hidden, weight, labels, logits) * (here.clamp(min=1) * self.group.size
                                                             / everywhere.clamp(min=1))


def counts_reduce(group: Group):
    """Router.counts_reduce over the sequence group: slot counts and token totals (of any shapes: per
    sequence for the paper's form) summed, in one all-reduce, without gradient."""
    def reduce(counts: torch.Tensor, total: torch.Tensor):
        flat = torch.cat([counts.detach().reshape(-1), total.detach().reshape(-1).to(counts.dtype)])
        flat = all_reduce_(flat, group)
        return flat[:counts.numel()].view(counts.shape), flat[counts.numel():].view(total.shape).to(total.dtype)
    return reduce


def split_sequence(model, group: Group) -> None:
    """Apply sequence parallelism over `group` to a megamom CausalLM (after any tensor / expert sharding)."""
    from ..model.memory_mixer import MemoryMixer
    model.sequence_split = SequenceSplit(group)
    model.loss_fn = SequenceParallelLoss(model.loss_fn, group)
    for module in model.modules():
        if isinstance(module, MemoryMixer) and module.router is not None:
            module.router.counts_reduce = counts_reduce(group)
            module.router.part_scale = float(group.size)  # (as the loss: the ranks' mean is the sequence's)


@contextmanager
def whole_sequences(model):
    """Within it every rank runs whole sequences, each alone (generation: a sequence rank holds every
    parameter of its tensor shard). The routers still sum their counts over the group, so every rank
    of it must run the same calls."""
    saved = model.sequence_split
    model.sequence_split = None
    try:
        yield model
    finally:
        model.sequence_split = saved
