"""The Mixture-of-Memories layer (arch "mom") and, as its one-memory case, plain linear
recurrent layers (arch "linear": Gated DeltaNet, GLA, ...: only the shared memory, no router).

Forward pass (training / prefill), for N = B*T tokens and M = routed + shared memories:
  1. route (float32 softmax, top-k, renormalise)          -> weights [N, k], memories [N, k]
  2. pack rows memory-major (memory, document, position)  -> A = N*(k+shared) rows
  3. q = x W_q once per token (shared); k, v, beta, decay = x W[m] for the row's memory
  4. short causal conv + SiLU over each memory's own subsequence (cu_seqlens, no leaks), then the
     per-head q / k L2 norm (in the conv's kernel on the GPU; in the scan when there is no conv)
  5. ONE chunked scan over all (memory, document) segments
  6. weighted sum of each token's rows (+ shared memory with weight 1)
  7. per-head RMSNorm * swish(x W_g), then W_o
The routed memories' weights are stacked [E, out, d] and the shared memory, which every token
uses, has parameters of its own `shared_*` [out, d]: the plan for the parallel layouts
(megamom/parallel/plan.py) splits the routed stack over expert ranks and keeps the shared memory
dense, and splits every per-head piece (q/k/v/beta/decay rows, A_log, dt_bias, conv channels) with
the heads over tensor ranks. The layer reads its head and memory counts off its weights.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megamom.kernels import (causal_conv1d_step, causal_conv1d_varlen, causal_conv1d_varlen_split, get_rule,
                             memory_scan, memory_step, resolve_backend, use_triton)

from ..config import ModelConfig
from .cache import MemoryLayerCache
from .layers import GatedRMSNorm, ParallelRegion, cached_for_inference, cast_for_autocast
from .dispatch import Dispatcher
from .grouped_experts import MemoryWeight, grouped_projection, stack_memories
from .router import Router, RouterOutput


log = logging.getLogger(__name__)
_announced: set = set()


def _announce_kernels(rule, backend: str) -> None:
    """Say once per (rule, backend) which implementation the memory layers run on."""
    if (rule.name, backend) in _announced:
        return
    _announced.add((rule.name, backend))
    if backend == "triton":
        scan = "Triton" if rule.decay != "vector" else "PyTorch reference (no Triton GLA chunk kernel yet)"
        log.info("memory layers (%s): scan %s; short conv, combine + norm: Triton; per-memory projections: "
                 "grouped GEMM under bf16 on sm90", rule.name, scan)
    else:
        log.info("memory layers (%s): PyTorch reference kernels (CPU, or kernel_backend / MEGAMOM_KERNELS=torch)",
                 rule.name)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 go up, float64 stays (the reference precision of the tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class HadamardFeatureMap(nn.Module):
    """fla's `elementwise_product` feature map of linear attention: (W1 x + b1) * (W2 x + b2) over
    each head's K features (the MoM authors' linear-attention variant)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(head_dim, head_dim)
        self.layer2 = nn.Linear(head_dim, head_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.layer1, self.layer2):  # (the authors' init of every linear of the layer)
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
            lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x) * self.layer2(x)


class MemoryMixer(nn.Module, ParallelRegion):
    """Stages: Router (each token's memories and weights) -> Dispatcher (the rows of the memories
    held here, packed memory-major) -> memory experts (their projections, conv, gates and one scan
    over every (memory, document) segment: `_memory_experts`) -> combiner (each token's rows summed
    with its routing weights, gated norm, output projection: `_combine_output`). The head and memory
    counts are read off the weights, so a shard of the layer (fewer heads, fewer memories) runs the
    same code."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.rule = get_rule(cfg.update_rule)
        d, H, K, Vh = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.head_v_dim
        self.hidden_size, self.head_dim, self.head_v_dim = d, K, Vh
        E = cfg.num_memories if cfg.routed else 0
        shared = cfg.shared_mem if cfg.routed else True
        Kd, Vd = H * K, H * Vh

        self.router = Router(d, E, cfg.topk, cfg.aux_loss_form) if E else None
        self.dispatcher = Dispatcher(E, shared)
        self.q_proj = nn.Linear(d, Kd, bias=False)
        decay_dim = {"scalar": H, "vector": Kd, None: 0}[self.rule.decay]
        rank = cfg.gla_gate_rank if self.rule.decay == "vector" else 0
        widths = {"k_proj": Kd, "v_proj": Vd, "b_proj": H if self.rule.delta else 0, "a_proj": 0 if rank else decay_dim}
        for name, width in widths.items():  # k_proj [E, Kd, d] routed, shared_k_proj [Kd, d], ...
            self._memory_parameter(name, width, d, E, shared)
        # GLA's low-rank decay gate (a_up a_down x + a_bias); a_proj is then their product (memory_weight)
        self._memory_parameter("a_down", rank, d, E, shared)
        self._memory_parameter("a_up", Kd if rank else 0, rank, E, shared)
        self.a_bias = nn.Parameter(torch.empty(E, Kd)) if rank and E else None
        self.shared_a_bias = nn.Parameter(torch.empty(Kd)) if rank and shared else None
        if self.rule.decay == "scalar":
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
        self.conv_size = cfg.conv_size if cfg.use_short_conv else 0
        for name, width in (("q_conv", Kd), ("k_conv", Kd), ("v_conv", Vd)):
            if not self.conv_size:
                setattr(self, name, None)
            elif cfg.per_memory_conv:  # [E, C, W] routed, shared_q_conv [C, W]
                self._memory_parameter(name, width, self.conv_size, E, shared)
            else:  # one conv [1, C, W] for every memory
                setattr(self, name, nn.Parameter(torch.empty(1, width, self.conv_size)))
        hadamard = cfg.feature_map == "hadamard" and cfg.arch != "transformer"
        self.q_feature = HadamardFeatureMap(K) if hadamard else None
        self.k_feature = HadamardFeatureMap(K) if hadamard else None
        self.g_proj = nn.Linear(d, Vd, bias=False) if cfg.use_output_gate else None
        self.o_norm = GatedRMSNorm(Vh, eps=cfg.norm_eps, backend=cfg.kernel_backend)
        self.o_proj = nn.Linear(Vd, d, bias=False)
        self.reset_parameters()

    def _memory_parameter(self, name: str, width: int, fan_in: int, routed: int, shared: bool) -> None:
        """`name` [routed, width, fan_in] for the routed memories and `shared_<name>` [width, fan_in]
        for the shared one (each None where absent; width 0: neither)."""
        setattr(self, name, nn.Parameter(torch.empty(routed, width, fan_in)) if width and routed else None)
        setattr(self, f"shared_{name}", nn.Parameter(torch.empty(width, fan_in)) if width and shared else None)

    # sizes read off the weights: a shard holds fewer heads (tensor parallel) or memories (expert parallel)
    @property
    def num_heads(self) -> int:
        return self.q_proj.weight.shape[0] // self.head_dim

    @property
    def num_routed(self) -> int:
        """Routed memories held by this layer (all of them on one rank)."""
        return 0 if self.k_proj is None else self.k_proj.shape[0]

    @property
    def shared(self) -> bool:
        return self.shared_k_proj is not None

    @property
    def num_memories(self) -> int:
        return self.num_routed + int(self.shared)

    @property
    def scan_keep(self) -> str:
        """model.scan_keep; `auto` left unresolved (the trainer resolves it) keeps the least."""
        return "none" if self.cfg.scan_keep == "auto" else self.cfg.scan_keep

    @property
    def topk(self) -> int:
        return self.router.topk if self.router is not None else 0

    def memory_weight(self, name: str) -> Optional[MemoryWeight]:
        """(routed [E, P, d] or None, shared [P, d] or None) of a per-memory weight; None if absent.
        GLA's low-rank decay gate gives `a_proj` as the product a_up a_down."""
        if name == "a_proj" and (self.a_down is not None or self.shared_a_down is not None):
            return (None if self.a_up is None else self.a_up @ self.a_down,
                    None if self.shared_a_up is None else self.shared_a_up @ self.shared_a_down)
        family = (getattr(self, name), getattr(self, f"shared_{name}", None))
        return None if family == (None, None) else family

    def _activation(self, t: torch.Tensor) -> torch.Tensor:
        """q / k / v's activation without the short conv (model.qkv_activation)."""
        return F.silu(t) if self.cfg.qkv_activation == "silu" else t

    def _features(self, q: torch.Tensor, k: torch.Tensor):
        """q and k [..., H * K] through the learned feature maps (model.feature_map), per head."""
        if self.q_feature is None:
            return q, k
        K = self.head_dim
        return (f(t.unflatten(-1, (-1, K))).flatten(-2) for f, t in ((self.q_feature, q), (self.k_feature, k)))

    def _decay_bias(self) -> Optional[torch.Tensor]:
        """[M, Kd] the low-rank decay gate's bias per memory (the shared one last), or None."""
        family = [t for t in (self.a_bias, None if self.shared_a_bias is None else self.shared_a_bias[None])
                  if t is not None]
        return torch.cat(family) if family else None

    def _memories(self, names) -> list[MemoryWeight]:
        return [w for w in map(self.memory_weight, names) if w is not None]

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper code's init: xavier-uniform (gain 2^-2.5) linears, A ~ U(0, 16), dt ~ logU."""
        gain = 2 ** -2.5
        for lin in (self.router, self.q_proj, self.g_proj, self.o_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=gain)
        for name in ("k_proj", "v_proj", "b_proj", "a_proj", "a_down", "a_up"):
            routed, shared = getattr(self, name), getattr(self, f"shared_{name}")
            for w in ([*routed] if routed is not None else []) + ([shared] if shared is not None else []):
                nn.init.xavier_uniform_(w, gain=gain)  # each memory's matrix on its own fans
        for bias in (self.a_bias, self.shared_a_bias):
            if bias is not None:
                bias.zero_()
        for feature in (self.q_feature, self.k_feature):
            if feature is not None:
                feature.reset_parameters()
        if self.rule.decay == "scalar":
            H = self.num_heads
            self.A_log.copy_(torch.empty(H).uniform_(0, 16).log())
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        if self.conv_size:
            bound = 1 / math.sqrt(self.conv_size)  # nn.Conv1d's default for a depthwise conv
            for name in ("q_conv", "k_conv", "v_conv"):
                w = self.conv_weight(name)  # drawn as one [M or 1, C, W] tensor, then split
                w = torch.empty(w.shape, dtype=w.dtype, device=w.device).uniform_(-bound, bound)
                routed, shared = getattr(self, name), getattr(self, f"shared_{name}", None)
                if routed is not None:
                    routed.copy_(w[:routed.shape[0]])
                if shared is not None:
                    shared.copy_(w[-1])
        self.o_norm.weight.fill_(1.0)

    def no_weight_decay(self) -> set[str]:
        return {"A_log", "dt_bias"}

    def conv_weight(self, name: str) -> torch.Tensor:
        """A short conv's weight [M, C, W] (one per memory, the shared one last) or [1, C, W] (one for all)."""
        family = self.memory_weight(name)
        return family[0] if family[1] is None else stack_memories([family])

    # ------------------------------------------------------------------------------ pieces
    def _projection_weights(self) -> tuple[torch.Tensor, list[int]]:
        """The per-memory weights of k | v | beta | decay (those present) stacked [M, sum P_i, d], and P_i."""
        families = self._memories(("k_proj", "v_proj", "b_proj", "a_proj"))
        stacked = stack_memories(families)
        return stacked, [(r if r is not None else sh[None]).shape[1] for r, sh in families]

    def _projection_groups(self) -> tuple[list[MemoryWeight], list[MemoryWeight]]:
        """The per-memory weights split for grouped_projection: the wide ones (k | v, and GLA's per-key
        decay) and the narrow per-head ones (beta, scalar decay) it projects apart."""
        wide = self._memories(("k_proj", "v_proj"))
        narrow = self._memories(("b_proj",))
        decay = self.memory_weight("a_proj")
        if decay is not None:
            (narrow if self.rule.decay == "scalar" else wide).append(decay)
        return wide, narrow

    def _gate_rows(self, narrow_rows: Optional[torch.Tensor], rest: torch.Tensor):
        """-> beta rows or None, decay rows or None: beta and a scalar decay from the narrow
        projection's rows [beta | decay], GLA's per-key decay from the columns after k | v (`rest`)."""
        if self.rule.decay == "vector":
            return narrow_rows, rest  # (the narrow rows are beta alone, if any)
        return self._split_gates(narrow_rows, [self._width(n) for n in ("b_proj", "a_proj") if self._width(n)])

    def _width(self, name: str) -> int:
        """Output rows of a per-memory projection (0: absent). Read off the weights' shapes (the
        low-rank decay gate's rows are its up projection's: no product is formed for a shape)."""
        if name == "a_proj" and (self.a_up is not None or self.shared_a_up is not None):
            name = "a_up"
        routed, shared = getattr(self, name), getattr(self, f"shared_{name}", None)
        return routed.shape[1] if routed is not None else shared.shape[0] if shared is not None else 0

    def _split(self, rows: torch.Tensor, sizes: list[int]):
        """[.., k | v | beta | decay] -> k, v, beta or None, decay or None."""
        k, v, rest = rows.split([sizes[0], sizes[1], sum(sizes[2:])], -1)
        return (k, v, *self._split_gates(rest, sizes[2:]))

    def _split_gates(self, rest: torch.Tensor, sizes: list[int]):
        """[.., beta | decay] (either may be absent) -> beta or None, decay or None."""
        pieces = list(rest.split(sizes, -1)) if sizes else []
        b = pieces.pop(0) if self._width("b_proj") else None
        a = pieces.pop(0) if self._width("a_proj") else None
        return b, a

    def _fused_gates(self, narrow_rows: Optional[torch.Tensor]):
        """_gates on the narrow projection's rows [A, beta | scalar decay] in one Triton kernel each way
        (kernels/triton/gates.py) -> (g or None, beta or None), float32."""
        from megamom.kernels.triton.gates import gates_fused
        if narrow_rows is None:
            return None, None
        scalar = self.rule.decay == "scalar"
        return gates_fused(narrow_rows, self.num_heads, self._width("b_proj") > 0,
                           self.A_log if scalar else None, self.dt_bias if scalar else None)

    def _gates(self, b: Optional[torch.Tensor], a: Optional[torch.Tensor], row_memory: Optional[torch.Tensor] = None):
        """-> (log-decay g in float32 or None, beta or None), per head (or per key for GLA).
        row_memory: each row's memory (the low-rank GLA gate's bias); None: a's rows are [.., M, Kd]."""
        beta = _f32(b).sigmoid() if b is not None else None
        g = None
        if self.rule.decay == "scalar":
            g = -_f32(self.A_log).exp() * F.softplus(_f32(a) + _f32(self.dt_bias))
        elif self.rule.decay == "vector":
            bias = self._decay_bias()
            if bias is not None:
                a = _f32(a) + _f32(bias if row_memory is None else bias.index_select(0, row_memory))
            g = F.logsigmoid(_f32(a)) / self.cfg.gla_gate_normalizer
        return g, beta

    def _slot_weights(self, router_out, N: int, device, dtype) -> torch.Tensor:
        cols = []
        if router_out is not None:
            cols.append(router_out.topk_weight)
        if self.shared:
            cols.append(torch.ones(N, 1, device=device, dtype=torch.promote_types(dtype, torch.float32)))
        return torch.cat(cols, 1)


    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor, num_docs: int,
                cache: Optional[MemoryLayerCache] = None, use_cache: bool = False,
                x_lowp: Optional[torch.Tensor] = None, routed: Optional[RouterOutput] = None, seq_slice=None):
        """x: [B, T, d]; doc_ids: [B*T] global document index (non-decreasing); x_lowp: x already in
        the autocast dtype, else cast here; routed: the router's output on x, else routed here (the
        block's norm does both: `lm.norm_and_route`). Returns (out [B, T, d], RouterStats or None, new
        cache or None). Under TP sequence parallelism x (and the routing) cover this rank's slice of
        the sequence; the region's seams gather the whole sequence and scatter the output back.
        seq_slice: under sequence parallelism, the slice of every sequence this rank holds
        (megamom.parallel.sequence_parallel.SequenceSlice): the convs start from the inputs before
        the slice and the scan from the state entering it, both brought from the earlier ranks (no
        cache then: CausalLM refuses one)."""
        B, T_here, d = x.shape
        if cache is not None and T_here == 1:
            return self._decode_step(x, cache)
        H, K, Vh = self.num_heads, self.head_dim, self.head_v_dim
        xf = x.reshape(-1, d)
        backend = resolve_backend(self.cfg.kernel_backend, x.device)  # once per forward
        _announce_kernels(self.rule, backend)

        fused = use_triton(xf, backend)  # the Triton kernels of the router, packing, conv, combine + norm
        # 1. router, on this rank's tokens (on the fast path it ran inside the block's norm kernel: `routed`)
        r = routed
        if r is None and self.router is not None:
            r = self.router(xf, fused)
        # one cast for the q, memory and gate projections (the router read xf), entering the region
        # outside of which the router stays: its input gradient is each rank's own
        xc = self.enter_region(x_lowp.reshape(B, T_here, d) if x_lowp is not None else cast_for_autocast(x))
        T = xc.shape[1]
        N = B * T
        xc = xc.reshape(N, d)
        if r is not None and T != T_here:  # the routing of the whole sequence
            r = RouterOutput(*(self.gather_tokens(t.view(B, T_here, -1)).reshape(N, -1) for t in
                               (r.logits, r.probs, r.topk_weight, r.topk_index)))
        # 2. dispatch: the memory-major rows of the memories held here
        packing = self.dispatcher(r.topk_index if r is not None else None, doc_ids, num_docs, fused)
        # 3. the memories: projections, conv, gates, one scan over every (memory, document) segment
        # (under expert parallelism the dispatcher runs them where each memory is held: `run`)
        o_rows, final_state, conv_state = self.dispatcher.run(
            xc, doc_ids, packing,
            lambda rows, p, sl: self._memory_experts(rows, p, cache, use_cache, backend, fused, sl), (H, Vh), fused,
            seq_slice)
        # 4. combine: each token's rows with its routing weights, gated norm, W_o
        # the routing weights scale rows inside the region (each tensor rank's heads): they enter it too
        slot_w = self.enter_replicated(self._slot_weights(r, N, x.device, x.dtype))
        o = self._combine_output(o_rows, packing, slot_w, xf, xc, fused)
        new_cache = None
        if (use_cache or cache is not None) and final_state is None:
            raise RuntimeError("decoding with a cache needs every memory on one rank; this layer's memories are "
                               "split over expert ranks: generate from the consolidated model (megamom convert, or "
                               "checkpoint.load_model_state_dict) or with use_cache=False")
        if use_cache or cache is not None:
            new_cache = MemoryLayerCache(final_state.view(self.num_memories, num_docs, H, K, Vh), conv_state)
        stats = self.router.stats(r, fused, B) if r is not None else None
        return self.exit_region(o.view(B, T, d)), stats, new_cache

    def _memory_experts(self, xc: torch.Tensor, packing, cache: Optional[MemoryLayerCache], use_cache: bool,
                        backend: str, fused: bool, seq_slice=None):
        """Steps 3-5 for the packed rows: -> (o rows [A, H, Vh], final states or None, conv state or None)."""
        H, K, Vh = self.num_heads, self.head_dim, self.head_v_dim
        A = packing.row_token.numel()
        q = self.q_proj(xc)  # [N, H*K]: one q per token, shared by its memories
        wide, narrow = self._projection_groups()
        rows, narrow_rows = grouped_projection(xc, wide, packing, fused, narrow,  # [A, k | v (| GLA decay)]
                                               keep_rows=self.scan_keep == "all" and torch.is_grad_enabled())

        conv_state = None
        if self.conv_size:
            init = cache.conv if cache is not None else None
            if seq_slice is not None:  # the inputs before the slice, from the earlier ranks
                Kd, Vd = self._width("k_proj"), self._width("v_proj")
                init = seq_slice.conv_halos({"q": self.dispatcher.gather(q, packing, fused), "k": rows[:, :Kd],
                                             "v": rows[:, Kd:Kd + Vd]}, packing, self.conv_size - 1)
            # the conv reads each memory row's q through the packing (no packed copy on the Triton path)
            q_rows, k_rows, v_rows, rest, conv_state = self._conv(q, rows, packing, init,
                                                                  use_cache or cache is not None, backend)
        else:  # no conv: model.qkv_activation (SiLU as fla's MoM and Gated DeltaNet layers, none as its GLA)
            Kd, Vd = self._width("k_proj"), self._width("v_proj")
            k_rows, v_rows, rest = rows.split([Kd, Vd, rows.shape[1] - Kd - Vd], 1)
            q_rows = self.dispatcher.gather(q, packing, fused)
            q_rows, k_rows, v_rows = map(self._activation, (q_rows, k_rows, v_rows))
        q_rows, k_rows = self._features(q_rows, k_rows)
        if fused and self.rule.decay != "vector":  # (GLA's per-key decay: torch; its scan is torch too)
            g, beta = self._fused_gates(narrow_rows)
        else:
            g, beta = self._gates(*self._gate_rows(narrow_rows, rest), packing.row_memory)
        scan_in = (self.rule, q_rows.view(1, A, H, K), k_rows.view(1, A, H, K), v_rows.view(1, A, H, Vh),
                   None if g is None else g.view(1, A, *g.shape[1:]) if self.rule.decay == "scalar" else
                   g.view(1, A, H, K), None if beta is None else beta.view(1, A, H))
        scan_args = dict(scale=K ** -0.5, chunk_size=self.cfg.chunk_size, backend=backend,
                         # (with the conv and no feature map the conv normalised them)
                         use_qk_l2norm=self.cfg.qk_norm == "l2" and (not self.conv_size or self.q_feature is not None),
                         keep=self.scan_keep if torch.is_grad_enabled() else "none")
        if seq_slice is not None:  # each row's first document goes on from the state the earlier ranks pass
            o_rows, final_state = seq_slice.memory_scan(*scan_in, packing, **scan_args), None
        else:
            o_rows, final_state = memory_scan(
                *scan_in, initial_state=cache.state.reshape(-1, H, K, Vh) if cache is not None else None,
                output_final_state=use_cache or cache is not None, cu_seqlens=packing.cu_seqlens, **scan_args)
        # squeeze, a view: indexing o_rows[0] would backward through a zero-filled full-size copy
        return o_rows.squeeze(0), final_state, conv_state

    def _combine_output(self, o_rows: torch.Tensor, packing, slot_w: torch.Tensor, xf: torch.Tensor, xc: torch.Tensor,
                        fused: bool):
        """Steps 6-7: weighted sum of each token's rows, gated per-head RMSNorm, W_o. On the GPU
        fast path one Triton kernel each way does the sum, the norm and the gate. The gate reads
        xc (the input cast for autocast); xf sets the norm's dtype on the torch path."""
        if fused:
            from megamom.kernels.triton.combine_norm import combine_gated_rmsnorm
            gate = self.g_proj(xc) if self.g_proj is not None else None
            o = combine_gated_rmsnorm(o_rows.reshape(o_rows.shape[0], -1), packing.slot_row, slot_w, gate,
                                      self.o_norm.weight, self.o_norm.eps, self.num_heads)
            return self.o_proj(o)
        return self._output(self.dispatcher.combine(o_rows, packing, slot_w), xf, xc)

    def _output(self, o: torch.Tensor, xf: torch.Tensor, xc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """o in xf's dtype through the gated norm and W_o; the gate reads xc (xf cast for autocast) if given."""
        gate = self.g_proj(xf if xc is None else xc).view(*o.shape) if self.g_proj is not None else None
        o = self.o_norm(o.to(xf.dtype), gate)
        return self.o_proj(o.reshape(o.shape[0], -1))

    def _conv(self, q, rows, packing, init: Optional[dict], want_state: bool, backend: str):
        """Step 4 for q [N, H*K] (one per token) and the k / v columns of the projection rows
        [A, k | v | ...]; the columns after k | v (GLA's per-key decay) come back as `rest` (on the
        Triton path all of rows takes one autograd node, so its gradient is written in one buffer).
        On the Triton path the conv reads each memory row's q through the packing (no packed copy of
        q is written or saved); elsewhere q is packed first. -> q, k, v, rest (packed rows), conv state
        (the last inputs of each segment) or None."""
        M = self.num_memories
        per_mem = self.cfg.per_memory_conv
        # the scan's q / k norm, fused here (not with a feature map: it comes after the map, in the scan)
        qk_group = self.head_dim if self.cfg.qk_norm == "l2" and self.q_feature is None else None
        tails = None
        if init is not None:
            tails = {n: t.reshape(-1, *t.shape[2:]).to(q.dtype if n == "q" else rows.dtype) for n, t in init.items()}
        kwargs = dict(cu_seqlens=packing.cu_seqlens, row_weight_index=packing.row_memory if per_mem else None,
                      output_final_state=want_state, activation="silu", backend=backend,
                      positions=packing.row_position)
        wq, wk, wv = (self.conv_weight(n) if per_mem else getattr(self, n)[0] for n in ("q_conv", "k_conv", "v_conv"))
        fused = use_triton(q, backend)
        gather_q = fused and tails is None and not want_state
        if not gather_q:
            q = self.dispatcher.gather(q, packing, fused)
        q, final_q = causal_conv1d_varlen(q, wq, initial_state=None if tails is None else tails["q"],
                                          l2norm_group=qk_group, **kwargs,
                                          gather=(packing.row_token, packing.slot_row) if gather_q else None)
        (k, v), rest, final_kv = causal_conv1d_varlen_split(
            rows, [wk, wv], initial_states=None if tails is None else [tails["k"], tails["v"]],
            l2norm_groups=[qk_group, None], **kwargs)
        state = None
        if want_state:
            state = {n: f.view(M, -1, *f.shape[1:]) for n, f in zip("qkv", [final_q] + final_kv)}
        return q, k, v, rest, state

    # ------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def _decode_step(self, x: torch.Tensor, cache: MemoryLayerCache):
        """One token per sequence: update only the selected memories, constant memory. On the
        Triton path a handful of kernels (_decode_step_fused), else torch ops."""
        if use_triton(x, self.cfg.kernel_backend) and self.q_feature is None:
            return self._decode_step_fused(x, cache)
        return self._decode_step_torch(x, cache)

    def _decode_weights(self):
        """(the rows of [q | every memory's k | v | beta | decay | output gate] stacked [*, d] for the
        decode step's one GEMM, each memory's row count, the q / k / v conv weights or None, the
        router's weight in float32 or None, the low-rank decay gate's bias per memory or None),
        built once while the weights stay as they are (inside `layers.inference_weights`)."""
        def build():
            stacked, sizes = self._projection_weights()
            parts = [self.q_proj.weight, stacked.reshape(-1, stacked.shape[-1])]
            if self.g_proj is not None:
                parts.append(self.g_proj.weight)
            convs = tuple(self.conv_weight(f"{n}_conv") for n in "qkv") if self.conv_size else None
            router = None if self.router is None else self.router.weight.float().contiguous()
            return torch.cat(parts), sum(sizes), convs, router, self._decay_bias()
        return cached_for_inference(self, "decode_weights", build)

    @torch.no_grad()
    def _decode_step_fused(self, x: torch.Tensor, cache: MemoryLayerCache):
        """_decode_step in five kernels: the router (top-k), one GEMM by the stacked weights, the
        step (kernels/triton/decode_step.py: two), the weighted sum with the gated norm, W_o."""
        from megamom.kernels.triton.combine_norm import combine_gated_rmsnorm
        from megamom.kernels.triton.decode_step import memory_decode_step
        from megamom.kernels.triton.router import route_forward
        B, _, d = x.shape
        H, K, Vh, M = self.num_heads, self.head_dim, self.head_v_dim, self.num_memories
        xf = x.reshape(B, d).contiguous()
        weight, P, convs, router, decay_bias = self._decode_weights()
        topw = topi = None
        if self.router is not None:
            _, _, topw, topi = route_forward(xf, router, self.topk)
        xf = self.enter_region(xf[:, None]).squeeze(1)
        y = F.linear(xf, weight)
        scalar = self.rule.decay == "scalar"
        o, slot_w, state, tails = memory_decode_step(
            y[:, :H * K], y[:, H * K:H * K + M * P].view(B, M, P), topi, topw, self.shared, cache.state, convs,
            tuple(cache.conv[n] for n in "qkv") if convs else None, head_dim=K, delta=self.rule.delta,
            decay=self.rule.decay, A_log=self.A_log if scalar else None, dt_bias=self.dt_bias if scalar else None,
            decay_bias=decay_bias, gla_normalizer=self.cfg.gla_gate_normalizer,
            silu=bool(self.conv_size) or self.cfg.qkv_activation == "silu", l2=self.cfg.qk_norm == "l2",
            scale=K ** -0.5, in_place=cache.update_in_place, out_dtype=xf.dtype)
        gate = y[:, H * K + M * P:] if self.g_proj is not None else None
        o = combine_gated_rmsnorm(o.view(M * B, H * Vh), _slot_rows(M, B, x.device), slot_w, gate,
                                  self.o_norm.weight, self.o_norm.eps, H)
        out = self.exit_region(self.o_proj(o)[:, None])
        conv = dict(zip("qkv", tails)) if tails is not None else None
        return out.view(B, 1, d), None, MemoryLayerCache(state, conv, cache.update_in_place)

    @torch.no_grad()
    def _decode_step_torch(self, x: torch.Tensor, cache: MemoryLayerCache):
        B, _, d = x.shape
        H, K, Vh, M = self.num_heads, self.head_dim, self.head_v_dim, self.num_memories
        xf = x.reshape(B, d)
        r = self.router(xf) if self.router is not None else None
        selected = torch.zeros(B, M, dtype=torch.bool, device=x.device)
        weight = torch.zeros(B, M, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        if r is not None:
            selected.scatter_(1, r.topk_index, True)
            weight.scatter_(1, r.topk_index, r.topk_weight)
        if self.shared:
            selected[:, -1] = True
            weight[:, -1] = 1.0
        xf = self.enter_region(xf[:, None]).squeeze(1)  # (decoding: tensor parallelism without its sequence split)
        stacked, sizes = self._projection_weights()
        y = F.linear(xf, stacked.reshape(-1, d)).view(B, M, -1)
        k, v, b, a = self._split(y, sizes)
        q = self.q_proj(xf)[:, None].expand(B, M, -1)
        conv_state = None
        if self.conv_size:
            conv_state = {}
            outs = []
            for name, t in (("q", q), ("k", k), ("v", v)):
                w = self.conv_weight(f"{name}_conv")
                tails = cache.conv[name].transpose(0, 1)  # [B, M, W-1, C]
                weight_m = w if self.cfg.per_memory_conv else w.expand(M, -1, -1)
                out_t, new_tails = causal_conv1d_step(
                    t.reshape(B * M, -1), weight_m.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * M, *w.shape[1:]),
                    tails.reshape(B * M, *tails.shape[2:]).to(t.dtype))
                new_tails = new_tails.view(B, M, *new_tails.shape[1:])
                keep = selected[:, :, None, None]
                conv_state[name] = torch.where(keep, new_tails, tails.to(new_tails.dtype)).transpose(0, 1)
                outs.append(F.silu(out_t))
            q, k, v = (o.view(B * M, H, -1) for o in outs)
        else:
            q, k, v = (self._activation(t).reshape(B * M, H, -1) for t in (q, k, v))
        q, k = self._features(q.reshape(B * M, -1), k.reshape(B * M, -1))
        q, k = q.view(B * M, H, -1), k.view(B * M, H, -1)
        g, beta = self._gates(b, a)
        if g is not None:
            g = g.reshape(B * M, H) if self.rule.decay == "scalar" else g.reshape(B * M, H, K)
        if beta is not None:
            beta = beta.reshape(B * M, H)
        state = cache.state.transpose(0, 1).reshape(B * M, H, K, Vh)
        o, new_state = memory_step(self.rule, q, k, v, g, beta, state, scale=K ** -0.5,
                                   use_qk_l2norm=self.cfg.qk_norm == "l2", backend=self.cfg.kernel_backend)
        new_state = torch.where(selected.view(B * M, 1, 1, 1), new_state, state)
        o = (o.view(B, M, H, Vh) * weight[:, :, None, None].to(o.dtype)).sum(1)
        out = self.exit_region(self._output(o, xf)[:, None]).squeeze(1)
        new_state = new_state.view(B, M, H, K, Vh).transpose(0, 1)
        if cache.update_in_place:
            cache.state.copy_(new_state)
            for name, tails in (conv_state or {}).items():
                cache.conv[name].copy_(tails)
            return out.view(B, 1, d), None, cache
        return out.view(B, 1, d), None, MemoryLayerCache(new_state.contiguous(), conv_state)


_SLOT_ROWS: dict = {}


def _slot_rows(M: int, B: int, device) -> torch.Tensor:
    """[B, M] the decode step's output row of (sequence, memory): memory-major, m * B + b."""
    key = (M, B, str(device))
    if key not in _SLOT_ROWS:
        _SLOT_ROWS[key] = torch.arange(M * B, device=device).view(M, B).t().contiguous()
    return _SLOT_ROWS[key]


_PER_MEMORY_PROJECTIONS = ("k_proj", "v_proj", "b_proj", "a_proj")
_PER_MEMORY_CONVS = ("q_conv", "k_conv", "v_conv")


def upgrade_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """A state dict (tensors, or shapes as tuples) saved while the shared memory was the last row of
    the stacked per-memory weights -> today's names: `k_proj` [E, ...] and `shared_k_proj` [...], the
    same for v / b / a and, with per-memory convs, q / k / v_conv. A current state dict comes back
    unchanged. Returns a new dict."""
    routed = cfg.num_memories if cfg.routed else 0
    shared = cfg.shared_mem if cfg.routed else True
    names = _PER_MEMORY_PROJECTIONS + (_PER_MEMORY_CONVS if cfg.per_memory_conv else ())
    if not shared or cfg.arch == "transformer":
        return dict(sd)
    out = dict(sd)
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        shape = tuple(value) if isinstance(value, tuple) else tuple(value.shape)
        if (leaf not in names or not prefix.endswith(".attn") or f"{prefix}.shared_{leaf}" in sd
                or len(shape) != 3 or shape[0] != routed + 1):
            continue
        if isinstance(value, tuple):
            rows, last = (routed, *shape[1:]), shape[1:]
        else:
            rows, last = value[:routed], value[routed]
        out[f"{prefix}.shared_{leaf}"] = last
        if routed:
            out[key] = rows
        else:
            del out[key]
    return out
