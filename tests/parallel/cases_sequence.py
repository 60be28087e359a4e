"""What each rank of the pool runs for the sequence-parallel tests: a tiny float64 model, once whole
(the single-process reference, computed on every rank alike) and once with every sequence split over
the sequence ranks (and heads over tensor ranks), compared for the loss, the logits, the router
losses, every gradient and the parameters after one DeepSpeed step."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megamom.config import ModelConfig
from megamom.model import build_model
from megamom.parallel.layout import ParallelLayout
from megamom.parallel.parallelize import local_shard, parallelize
from megamom.parallel.topology import Topology

from cases_tensor import MODELS, _close

_topologies: dict = {}

RULES = {  # every rule of the registry, as a MoM layer and as a one-memory layer
    "mom_gated_delta": dict(arch="mom", update_rule="gated_delta", num_memories=4, topk=2),
    "mom_delta": dict(arch="mom", update_rule="delta", num_memories=4, topk=2),
    "mom_gla": dict(arch="mom", update_rule="gla", num_memories=4, topk=2, per_memory_conv=True),
    "mom_scalar_decay": dict(arch="mom", update_rule="scalar_decay", num_memories=4, topk=1, shared_mem=False),
    "mom_linear_attn": dict(arch="mom", update_rule="linear_attn", num_memories=2, topk=1),
    "gated_deltanet": dict(arch="linear", update_rule="gated_delta"),
    "gla": dict(arch="linear", update_rule="gla"),
    "transformer": MODELS["transformer"],
}


def model_config(name: str, **over) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, intermediate_size=64,
                chunk_size=8, loss_chunk_size=7, tie_word_embeddings=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    base.update(RULES[name])
    base.update(over)
    return ModelConfig(**base)


def topology(sequence: int, tensor: int = 1, expert: int = 1) -> Topology:
    W = dist.get_world_size()
    key = (sequence, tensor, expert)
    if key not in _topologies:  # new_group is collective: built once per layout, in the same order everywhere
        layout = ParallelLayout(W, W // (sequence * tensor), sequence, tensor, expert)
        _topologies[key] = Topology(layout, dist.get_rank())
    return _topologies[key]


def documents(B: int, T: int, seed: int, edges: tuple = ()) -> torch.Tensor:
    """[B, T] document numbers: random starts (about one in eight tokens), plus a start at each of
    `edges` in row 0 (a document beginning exactly at a slice edge); row 1 has one document that
    crosses every slice."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 0.12
    starts[:, 0] = False
    for e in edges:
        starts[0, e] = True
    if B > 1:
        starts[1] = False
    return torch.cumsum(starts.long(), 1)


def batch(B: int, T: int, seed: int, edges: tuple = ()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:].clone(), documents(B, T, seed, edges)


def _mean_over(x: torch.Tensor, group) -> torch.Tensor:
    x = x.detach().clone()
    if group.size > 1:
        dist.all_reduce(x, group=group.group)
    return x / group.size


def _reduced_grad(p, top: Topology) -> torch.Tensor:
    """What ZeRO does with a gradient: the mean over the data x sequence ranks; a routed memory's
    (expert parallelism) summed over the ranks that hold it (the other ranks' tokens reached it
    through the all-to-all already) and divided by the same count."""
    from megamom.parallel.parallelize import is_expert_param
    g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    group = top.expert_data if is_expert_param(p) else top.data_sequence
    if group.size > 1:
        dist.all_reduce(g, group=group.group)
    return g / top.data_sequence.size


def forward_and_grads(name: str, sequence: int, tensor: int = 1, over: dict | None = None, segments: bool = True,
                      T: int = 24, edges: tuple = (), tensor_sequence_parallel: bool = False,
                      checkpointing: bool = False, force_memory: int | None = None, a_log: float | None = None,
                      expert: int = 1):
    """The whole sequence's loss, logits, router losses and every gradient (each the mean over the
    sequence and data ranks, as DeepSpeed and the logs take it) equal the whole model's on one process.
    expert > 1: the memories split over expert groups of data ranks (SP x EP)."""
    torch.set_default_dtype(torch.float64)
    cfg = model_config(name, **(over or {}))
    top = topology(sequence, tensor, expert)
    data = top.data.size
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    whole = build_model(cfg)
    if force_memory is not None:
        from cases_expert import _force_routing
        _force_routing(ref, force_memory)
        _force_routing(whole, force_memory)
    if a_log is not None:  # every scalar decay near 0 (large A_log) or near 1 (very negative A_log)
        for model in (ref, whole):
            for n, p in model.named_parameters():
                if n.endswith("A_log"):
                    p.data.fill_(a_log)
    par = parallelize(whole, top, tensor_sequence_parallel)
    par.activation_checkpointing = checkpointing  # (the recomputation runs the exchanges again)
    batches = [batch(3, T, 100 + r, edges) for r in range(data)]
    for ids, labels, seg in batches:  # every data rank's micro-batch, losses averaged
        (ref(ids, labels=labels, segment_ids=seg if segments else None).loss / data).backward()
    ids, labels, seg = batches[top.data.rank]
    out = par(ids, labels=labels, segment_ids=seg if segments else None, return_logits=True)
    out.loss.backward()
    ref_one = ref(ids, labels=labels, segment_ids=seg if segments else None, return_logits=True)
    sp = top.sequence
    _close(_mean_over(out.loss, sp), ref_one.loss.detach(), "loss")
    _close(_mean_over(out.lm_loss, sp), ref_one.lm_loss.detach(), "lm loss")
    L = T // sequence
    _close(out.logits, ref_one.logits[:, sp.rank * L:(sp.rank + 1) * L], "logits of this slice")
    if ref_one.aux_loss is not None:
        _close(_mean_over(out.aux_loss, sp), ref_one.aux_loss.detach(), "load-balancing loss")
        _close(_mean_over(out.z_loss, sp), ref_one.z_loss.detach(), "z loss")
        for s, r in zip(out.router_stats, ref_one.router_stats):
            _close(s.token_fraction, r.token_fraction, "memory shares")
    ref_params = dict(ref.named_parameters())
    bad = []
    for n, p in par.named_parameters():
        g = _reduced_grad(p, top)
        want = local_shard(n, ref_params[n].grad, top, cfg)
        try:
            _close(g, want, f"grad of {n}")
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad)
    torch.set_default_dtype(torch.float32)
    return out.loss.item()


def deepspeed_step(name: str, sequence: int, tensor: int, zero_stage: int, grad_clip: float = 0.05,
                   expert: int = 1):
    """One optimizer step through DeepSpeed at DP x SP (x TP): every parameter equals the whole
    model's after the same step on the data ranks' micro-batches (AdamW, clipping by the global norm).
    To 1e-6: ZeRO-1/2 step float32 master weights."""
    from megamom.config import Config

    from cases_tensor import deepspeed_engine, one_process_step, step_and_compare
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    cfg.model = model_config(name)
    cfg.train.zero_stage, cfg.train.grad_clip, cfg.train.lr, cfg.train.weight_decay = zero_stage, grad_clip, 1e-2, 0.1
    cfg.train.adam_eps = 1.0  # (a well-conditioned update: see cases_tensor.deepspeed_step)
    top = topology(sequence, tensor, expert)
    ref, ref_norm = one_process_step(cfg, top.data.size, grad_clip)
    torch.manual_seed(0)
    engine = deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top)
    norm = step_and_compare(engine, top, ref, ref_norm, grad_clip, lambda n, t: local_shard(n, t, top, cfg.model))
    torch.set_default_dtype(torch.float32)
    return norm


def save_resume_consolidate(sequence: int, tensor: int, root: str, zero_stage: int = 2, expert: int = 1):
    """ZeRO-1/2 at DP x SP (x TP), float64: exact resume and consolidation (cases_tensor.resume_and_consolidate;
    each rank's logits are its slice of the whole batch's)."""
    from megamom.config import Config

    from cases_tensor import resume_and_consolidate
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    cfg.model = model_config("mom_gated_delta")
    cfg.train.zero_stage, cfg.train.lr, cfg.train.grad_clip = zero_stage, 1e-2, 0.05
    top = topology(sequence, tensor, expert)
    path = resume_and_consolidate(cfg, top, root, lambda x: _gather_slices(x, top.sequence))
    torch.set_default_dtype(torch.float32)
    return path


def _gather_slices(x: torch.Tensor, group) -> torch.Tensor:
    """[B, T / P, ...] slices -> [B, T, ...] (no autograd)."""
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return torch.cat(parts, 1)
