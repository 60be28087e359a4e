"""`megamom plan`: per-GPU memory and communication of the layouts a config can train with on N
GPUs, and which fit, best first.

What is exact and what is estimated:
- parameters per GPU: counted from the model (built on the meta device) and the sharding plan;
- gradients and optimizer state per ZeRO stage: DeepSpeed's mixed-precision layout (bf16 module
  weights and gradients; fp32 master weights, Adam moments and gradient partition), divided over
  the data group where the stage partitions them;
- activations per micro-batch: an analytic count of what the backward keeps per token and layer
  (`activation_bytes_per_token`, below), by architecture, `model.scan_keep` and activation
  checkpointing, with what the scan keeps fitted to mom-340m's measured peaks (H200). Checked on
  the trainer's engine on one H100: within 12% for mom-340m, transformer-340m and mom-1.3b at two
  micro-batch sizes each (benchmarks/RESULTS.md). Not yet checked under tensor parallelism or with
  activation checkpointing.
- communication per optimizer step: bytes each GPU sends in the tensor group (ring all-reduce /
  all-gather / reduce-scatter) and in the data group (ZeRO's gradient and parameter exchanges).
- expert parallelism (MoM): each GPU holds 1 / EP of the routed memories' projections (and their
  convs when per memory); ZeRO partitions their gradients and optimizer state over the expert-data
  group (data x sequence / EP ranks), so the optimizer state per GPU is the same as without EP and
  the module weights (and ZeRO-1's gradients) shrink; the activations stay (an owner runs as many
  rows as it sends on average); each MoM layer's all-to-all sends the routed rows' hidden states out
  and their outputs back, forward and backward.
- sequence parallelism: each GPU holds 1 / SP of every sequence's activations, plus what the state
  passing keeps per sample (every rank's memory summaries, gathered, and the extended scan of the
  slice's last document) or, for Transformer++, the whole sequence's keys and values per layer
  (gathered); ZeRO partitions over data x sequence. `longest_context`: the longest sequence one
  micro-batch row can have at that layout (activation checkpointing, scan_keep none), an estimate of
  the same kind, not yet checked against a run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import ConfigError

GiB = 2 ** 30
HEADROOM = 0.9  # the allocator's fragmentation and the CUDA context: plan to 90% of the card


@dataclass
class Estimate:
    tensor: int
    data: int
    zero: int
    checkpointing: bool
    scan_keep: str
    params: float  # bytes per GPU
    grads: float
    optimizer: float
    activations: float
    tensor_comm: float  # bytes sent per GPU per optimizer step
    data_comm: float
    sequence: int = 1
    longest_context: int = 0  # tokens of one sequence at micro-batch 1 (0: not computed)
    expert: int = 1
    expert_comm: float = 0.0  # bytes sent per GPU per optimizer step by the memories' all-to-alls

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _parameter_split(cfg, tensor: int) -> tuple[int, int, int]:
    """(parameters of the whole model, dense and routed-memory parameters of one tensor rank)."""
    import torch

    from ..model import build_model
    from .plan import is_memory_stack, sharding_plan
    m = cfg.model
    with torch.device("meta"):
        model = build_model(m)
    plan = sharding_plan(model)
    total = dense = stacks = 0
    for n, p in model.named_parameters():
        total += p.numel()
        local = p.numel() // (tensor if plan[n].tensor_dim is not None else 1)
        if is_memory_stack(n, m.arch, m.per_memory_conv):
            stacks += local
        else:
            dense += local
    return total, dense, stacks


def parameter_counts(cfg, tensor: int) -> tuple[int, int]:
    """(parameters of the whole model, parameters held by one tensor rank)."""
    total, dense, stacks = _parameter_split(cfg, tensor)
    return total, dense + stacks


def local_parameters(cfg, tensor: int, expert: int) -> tuple[int, int]:
    """(dense parameters, routed-memory parameters) held by one GPU at this tensor and expert size
    (expert divides the memories: each stack splits evenly)."""
    _, dense, stacks = _parameter_split(cfg, tensor)
    return dense, stacks // expert


def state_bytes(local_params: int, data: int, zero: int, precision: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per GPU for `local_params` parameters."""
    if precision == "fp32":
        weights, grads, optim = 4.0, 4.0, 8.0  # Adam's two moments; the weights are the master copy
    else:  # bf16 / fp16: the module's 16-bit weights and gradients, fp32 master + moments + grad partition
        weights, grads, optim = 2.0, 2.0, 16.0
    n = local_params
    if zero == 0:
        return weights * n, grads * n, optim * n
    if zero == 1:
        return weights * n, grads * n, optim * n / data
    if zero == 2:
        return weights * n, grads * n / data, optim * n / data
    return weights * n / data, grads * n / data, optim * n / data  # ZeRO-3


def activation_bytes_per_token(cfg, tensor: int, sequence_parallel: bool, scan_keep: str,
                               checkpointing: bool) -> float:
    """Bytes the backward keeps per token, summed over the layers (16-bit activations, fp32 where
    the model keeps fp32: the residual stream, the norms' inputs, the scan's chunk states).
    Per-head tensors are split over the tensor group; the residual stream, the norms and the router
    only with TP sequence parallelism. With activation checkpointing a layer keeps its input alone
    and one layer's activations are live again during its recomputation."""
    m = cfg.model
    d, L, F = m.hidden_size, m.num_layers, m.mlp_hidden_size
    tp, outside = tensor, (tensor if sequence_parallel else 1)
    Kd, Vd = m.num_heads * m.head_dim, m.num_heads * m.head_v_dim
    norms = 2 * (4 * d + 2 * d) / outside  # fp32 input and 16-bit output of the two norms
    mlp = 2 * (3 * F) / tp  # gate | up and the activation's output
    if m.arch == "transformer":
        kv = (m.num_kv_heads or m.num_heads) * m.head_dim
        mixer = 2 * (Kd + 2 * kv + Kd) / tp + 4 * m.num_heads / tp  # q, k, v, output; the softmax's log-sum-exp
    else:
        R = (m.topk + int(m.shared_mem)) if m.arch == "mom" else 1  # memory rows per token
        gates = m.num_heads * 2  # beta and a scalar decay, per head (GLA's per-key decay: Kd)
        rows = R * (Kd + Vd + gates)  # the per-memory projections' outputs
        conv = R * (2 * Kd + Vd) if m.use_short_conv else 0  # the conv's outputs (q, k, v rows)
        out = R * Vd + 3 * Vd  # each memory's output rows; combined, gate, normed
        mixer = 2 * (Kd + rows + conv + out) / tp + 2 * m.num_memories * 4 / outside * (m.arch == "mom")
        # what the scan keeps beyond "none" grows with its chunk states (H K V per chunk of every row's
        # segment); bytes per state element fitted to mom-340m's measured peaks (B8 T2048, graphs, H200:
        # none 34.7, states <= 49.8, all 47.4 GiB; "all" keeps w, u and the rows but frees what states
        # recomputes from them)
        state_elems = R * m.num_heads * m.head_dim * m.head_v_dim / m.chunk_size / tp
        mixer += {"none": 0.0, "states": 3.35, "all": 2.8}[scan_keep] * state_elems
    per_layer = norms + mlp + mixer
    if checkpointing:
        return L * (4 * d / outside) + per_layer
    return L * per_layer + 4 * d / outside  # (+ the final norm's input)


def sequence_parallel_bytes(cfg, tensor: int, sequence: int, T: int, checkpointing: bool) -> float:
    """Bytes per GPU and per micro-batch row that sequence parallelism keeps beyond 1 / SP of the
    activations: memory layers keep every rank's summary of each (memory, sample) [H, K, K + V]
    float32 as gathered, the folded entering state, and the extended scan's rows of the slice's last
    document (at most the slice: its k and [v | 0] per memory row); Transformer++ keeps the whole
    sequence's keys and values of each layer for the attention's backward (one layer's with
    activation checkpointing)."""
    if sequence == 1:
        return 0.0
    m = cfg.model
    layers = 1 if checkpointing else m.num_layers
    if m.arch == "transformer":
        kv = (m.num_kv_heads or m.num_heads) * m.head_dim / tensor
        return layers * 2 * 2 * kv * T  # 16-bit k and v
    M = (m.num_memories + int(m.shared_mem)) if m.arch == "mom" else 1
    R = (m.topk + int(m.shared_mem)) if m.arch == "mom" else 1
    H, K, V = m.num_heads / tensor, m.head_dim, m.head_v_dim
    summaries = 4 * M * H * K * (K + V) * (sequence + 2)  # gathered, this rank's, the folded state
    extended = 2 * R * H * (K + V + K) * T / sequence  # the slice's rows: k, [v | 0]
    return layers * (summaries + extended)


def longest_context(cfg, tensor: int, sequence: int, fixed: float, budget: float) -> int:
    """The longest sequence (tokens, a multiple of 1024 x SP) one micro-batch row can have when the
    parameters, gradients and optimizer state take `fixed` bytes: activation checkpointing, the scan
    keeping nothing; 0 when even 1024 x SP tokens do not fit."""
    per_token = activation_bytes_per_token(cfg, tensor, cfg.parallel.tensor_sequence_parallel, "none", True)
    step = 1024 * sequence

    def fits(T: int) -> bool:
        return fixed + T / sequence * per_token + sequence_parallel_bytes(cfg, tensor, sequence, T, True) <= budget
    if not fits(step):
        return 0
    lo, hi = 1, 2
    while fits(hi * step):
        lo, hi = hi, hi * 2
        if hi > 2 ** 24:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def expert_communication(cfg, expert: int, checkpointing: bool, tokens_per_step: int) -> float:
    """Bytes one GPU sends per optimizer step in its expert group: per MoM layer, the (EP - 1) / EP of
    its top-k rows owned elsewhere leave as hidden states [d] and come back as outputs [H Vh] (16-bit),
    each way again in the backward (and once more in a recomputed forward)."""
    m = cfg.model
    if expert == 1 or m.arch != "mom":
        return 0.0
    rows = m.topk * tokens_per_step * (expert - 1) / expert
    forward = rows * 2 * (m.hidden_size + m.num_heads * m.head_v_dim)  # out (hidden states) and back (outputs)
    return m.num_layers * forward * (3 if checkpointing else 2)


def communication(cfg, tensor: int, data: int, zero: int, local_params: int, sequence_parallel: bool,
                  checkpointing: bool, tokens_per_step: int, precision: str) -> tuple[float, float]:
    """Bytes one GPU sends per optimizer step in the tensor group and in the data group (ring
    collectives: an all-reduce sends 2 (n-1)/n of its size, an all-gather or reduce-scatter (n-1)/n)."""
    m = cfg.model
    act = 2 * cfg.model.hidden_size * tokens_per_step  # one [tokens, d] 16-bit activation of the local batch
    tp_comm = 0.0
    if tensor > 1:
        ring = 2 * (tensor - 1) / tensor  # all-reduce, or all-gather + reduce-scatter: the same bytes
        per_sublayer = 2 * ring * act  # forward and backward
        if checkpointing:
            per_sublayer += ring * act / 2  # the recomputed forward's
        tp_comm = (2 * m.num_layers + 2) * per_sublayer  # + the embedding and the loss's input
    grad_bytes = 2 if precision != "fp32" else 4
    dp_comm = 0.0
    if data > 1:
        ring = (data - 1) / data
        dp_comm = 2 * ring * grad_bytes * local_params  # gradient reduction (+ ZeRO's parameter all-gather)
        if zero == 3:
            dp_comm *= 1.5  # parameters gathered in the forward and again in the backward
    return tp_comm, dp_comm


def plan_layouts(cfg, gpus: int, gpu_mem_gib: float, precision: str = "bf16") -> list[Estimate]:
    """Every supported layout of `gpus` GPUs (data x sequence x tensor) with its best fitting
    (checkpointing, scan_keep), or its smallest one when none fits, and its longest context;
    fitting ones first, best first."""
    m = cfg.model
    micro, T = cfg.train.micro_batch_size, cfg.data.seq_len
    accum = cfg.train.grad_accum
    keeps = ("all", "states", "none") if m.arch != "transformer" else ("none",)
    budget = HEADROOM * gpu_mem_gib * GiB
    out = []
    for tensor in [t for t in (1, 2, 4, 8) if gpus % t == 0]:
        if any(n % tensor for n in (m.num_heads, m.mlp_hidden_size, m.vocab_size, m.num_kv_heads or m.num_heads)):
            continue
        _, dense, all_stacks = _parameter_split(cfg, tensor)
        for sequence in [s for s in (1, 2, 4, 8) if (gpus // tensor) % s == 0]:
            if T % (sequence * (tensor if cfg.parallel.tensor_sequence_parallel else 1)):
                continue
            data = gpus // (tensor * sequence)
            tokens = micro * T // sequence
            # expert groups: data ranks of one slice when SP > 1 (parallel/topology.py)
            experts = [e for e in (1, 2, 4, 8) if e == 1 or (m.arch == "mom" and m.num_memories % e == 0
                                                            and (data if sequence > 1 else data * sequence) % e == 0)]
            for expert in experts:
                stacks = all_stacks // expert
                zeros = (1, 2) if expert > 1 else (0, 1, 2, 3) if tensor == 1 and sequence == 1 else (0, 1, 2)
                for zero in zeros:  # (memories partitioned over the expert-data group: data x sequence / EP)
                    weights, grads, optim = (a + b for a, b in zip(
                        state_bytes(dense, data * sequence, zero, precision),
                        state_bytes(stacks, data * sequence // expert, zero, precision)))
                    options = []
                    for checkpointing in (False, True):
                        for keep in keeps:
                            act = tokens * activation_bytes_per_token(
                                cfg, tensor, cfg.parallel.tensor_sequence_parallel, keep, checkpointing)
                            act += micro * sequence_parallel_bytes(cfg, tensor, sequence, T, checkpointing)
                            tpc, dpc = communication(cfg, tensor, data * sequence, zero, dense,
                                                     cfg.parallel.tensor_sequence_parallel, checkpointing,
                                                     tokens * accum, precision)
                            dpc += communication(cfg, 1, data * sequence // expert, zero, stacks, False, False, 0,
                                                 precision)[1]  # (the memories' reduction: expert-data group)
                            epc = expert_communication(cfg, expert, checkpointing, tokens * accum)
                            options.append(Estimate(tensor, data, zero, checkpointing, keep, weights, grads, optim,
                                                    act, tpc, dpc, sequence, expert=expert, expert_comm=epc))
                    fitting = [e for e in options if e.total <= budget]
                    best = fitting[0] if fitting else min(options, key=lambda e: e.total)
                    best.longest_context = longest_context(cfg, tensor, sequence, weights + grads + optim, budget)
                    out.append(best)

    def rank(e: Estimate):
        # fits first; then less tensor, sequence and expert parallelism (their exchanges sit on the
        # critical path), no recomputation, the scan keeping more, a lower ZeRO stage (fewer
        # exchanges), less memory
        return (e.total > budget, e.tensor * e.sequence, e.expert, e.checkpointing, keeps.index(e.scan_keep), e.zero,
                e.total)
    return sorted(out, key=rank)


def choose_scan_keep(cfg, tensor: int, data: int, gpu_mem_bytes: float, precision: str) -> str:
    """model.scan_keep=auto: the most the scan keeps (all, states, none) whose estimated peak fits
    the GPU at this layout, ZeRO stage and micro-batch; none when nothing does."""
    _, local = parameter_counts(cfg, tensor)
    fixed = sum(state_bytes(local, data, cfg.train.zero_stage, precision))
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    for keep in ("all", "states"):
        act = tokens * activation_bytes_per_token(cfg, tensor, cfg.parallel.tensor_sequence_parallel, keep,
                                                  cfg.train.activation_checkpointing)
        if fixed + act <= HEADROOM * gpu_mem_bytes:
            return keep
    return "none"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")


def run(args) -> int:
    from ..config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: give the number of GPUs of the job (>= 1)")
    total, _ = parameter_counts(cfg, 1)
    m = cfg.model
    print(f"{m.arch} {total / 1e6:.0f}M parameters, micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.seq_len} tokens, {args.precision}, {args.gpus} GPUs of {args.gpu_mem:g} GiB "
          f"(planned to {HEADROOM:.0%}); TP sequence parallelism "
          f"{'on' if cfg.parallel.tensor_sequence_parallel else 'off'}")
    print("GiB per GPU; activations are an estimate (within 12% of measured peaks on one GPU, "
          "benchmarks/RESULTS.md); comm = GB sent per GPU per optimizer step")
    head = (f"{'layout':<24}{'ZeRO':>5}{'ckpt':>6}{'keep':>8}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}"
            f"{'total':>8}{'TP comm':>9}{'DP comm':>9}{'EP comm':>9}{'longest':>10}  fits")
    print(head)
    for e in plan_layouts(cfg, args.gpus, args.gpu_mem, args.precision):
        fits = e.total <= HEADROOM * args.gpu_mem * GiB
        longest = f"{e.longest_context // 1024}K" if e.longest_context else "-"
        layout = f"DP{e.data} x SP{e.sequence} x TP{e.tensor}" + (f", EP{e.expert}" if e.expert > 1 else "")
        print(f"{layout:<24}{e.zero:>5}{'yes' if e.checkpointing else 'no':>6}"
              f"{e.scan_keep:>8}{e.params / GiB:>8.1f}{e.grads / GiB:>8.1f}{e.optimizer / GiB:>8.1f}"
              f"{e.activations / GiB:>8.1f}{e.total / GiB:>8.1f}{e.tensor_comm / 1e9:>9.2f}{e.data_comm / 1e9:>9.2f}"
              f"{e.expert_comm / 1e9:>9.2f}{longest:>10}  {'yes' if fits else 'no'}")
    print("longest = the longest sequence at micro-batch 1 with activation checkpointing and scan_keep none; "
          "EP = the routed memories split over expert groups of data ranks (MoM)")
    return 0
