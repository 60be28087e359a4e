"""What each rank of the pool runs for the expert-parallel tests: a tiny float64 MoM model, once
whole (the single-process reference, computed on every rank alike) and once with its memories split
over the expert ranks (and heads over tensor ranks), compared for the loss, the logits, the router
losses, every gradient and the parameters after one DeepSpeed step."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megamom.config import Config, ModelConfig
from megamom.model import build_model
from megamom.parallel.layout import ParallelLayout
from megamom.parallel.parallelize import is_expert_param, local_shard, parallelize
from megamom.parallel.topology import Topology

from cases_tensor import _close, batch

_topologies: dict = {}


def model_config(**over) -> ModelConfig:
    base = dict(arch="mom", update_rule="gated_delta", num_memories=4, topk=2, vocab_size=128, hidden_size=32,
                num_layers=2, num_heads=4, head_dim=8, intermediate_size=64, chunk_size=8, loss_chunk_size=7,
                tie_word_embeddings=True, aux_loss_coef=0.01, z_loss_coef=0.001)
    base.update(over)
    return ModelConfig(**base)


def topology(expert: int, tensor: int = 1) -> Topology:
    W = dist.get_world_size()
    key = (expert, tensor)
    if key not in _topologies:  # new_group is collective: built once per layout, in the same order everywhere
        _topologies[key] = Topology(ParallelLayout(W, W // tensor, 1, tensor, expert), dist.get_rank())
    return _topologies[key]


def _force_routing(model, memory: int) -> None:
    """Every token of every layer to `memory` first: the routers get a large bias towards it (the
    router has no bias of its own: its forward is replaced by route() plus one)."""
    from megamom.model.router import RouterOutput

    def biased(router):
        def forward(x, fused=False):
            logits = torch.nn.functional.linear(x, router.weight)
            logits = logits + 20.0 * (torch.arange(logits.shape[1]) == memory)
            probs = logits.softmax(-1)
            w, idx = probs.topk(router.topk, dim=-1)
            return RouterOutput(logits, probs, w / w.sum(-1, keepdim=True), idx)
        return forward

    for block in model.model.layers:
        block.attn.router.forward = biased(block.attn.router)


def reduced_grad(name: str, p, top: Topology, num_memories: int) -> torch.Tensor:
    """What ZeRO does with a gradient: the mean over the data ranks, a routed memory's over the
    ranks that hold it (its other ranks' tokens reached it through the all-to-all already)."""
    g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    group = top.expert_data if is_expert_param(p) else top.data
    if group.size > 1:
        dist.all_reduce(g, group=group.group)
    return g / top.data.size


def forward_and_grads(expert: int, tensor: int = 1, over: dict | None = None, segments: bool = True,
                      force_memory: int | None = None, T: int = 24, tensor_sequence_parallel: bool = False,
                      checkpointing: bool = False):
    torch.set_default_dtype(torch.float64)
    cfg = model_config(**(over or {}))
    top = topology(expert, tensor)
    data = top.data.size
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    whole = build_model(cfg)
    if force_memory is not None:
        _force_routing(ref, force_memory)
        _force_routing(whole, force_memory)
    par = parallelize(whole, top, tensor_sequence_parallel)
    par.activation_checkpointing = checkpointing  # (the recomputation runs the all-to-alls again)
    batches = [batch(2, T, 100 + r) for r in range(data)]
    ref_stats = []
    for ids, labels, seg in batches:  # every data rank's micro-batch, losses averaged
        out = ref(ids, labels=labels, segment_ids=seg if segments else None)
        (out.loss / data).backward()
        ref_stats.append((out.aux_loss.item(), out.z_loss.item()))
    ids, labels, seg = batches[top.data.rank]
    out = par(ids, labels=labels, segment_ids=seg if segments else None, return_logits=True)
    out.loss.backward()
    ref_one = ref(ids, labels=labels, segment_ids=seg if segments else None, return_logits=True)
    _close(out.loss.detach(), ref_one.loss.detach(), "loss")
    _close(out.logits, ref_one.logits, "logits")
    _close(out.aux_loss.detach(), ref_one.aux_loss.detach(), "load-balancing loss")
    _close(out.z_loss.detach(), ref_one.z_loss.detach(), "z loss")
    ref_params = dict(ref.named_parameters())
    bad = []
    for n, p in par.named_parameters():
        g = reduced_grad(n, p, top, cfg.num_memories)
        want = local_shard(n, ref_params[n].grad, top, cfg)
        assert g.shape == want.shape, (n, g.shape, want.shape)
        try:
            _close(g, want, f"grad of {n}")
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad)
    exchange = par.model.layers[0].attn.dispatcher.last_exchange
    torch.set_default_dtype(torch.float32)
    return exchange


def deepspeed_step(expert: int, tensor: int, zero_stage: int, grad_clip: float, over: dict | None = None):
    """One optimizer step through DeepSpeed at DP x EP (x TP): every parameter equals the whole
    model's after the same step on the data ranks' micro-batches (AdamW, clipping by the global
    norm, which counts each memory once). To 1e-6: ZeRO-1/2 step float32 master weights."""
    from cases_tensor import deepspeed_engine, one_process_step, step_and_compare
    dtype = torch.float32 if zero_stage == 0 else torch.float64
    torch.set_default_dtype(dtype)
    cfg = Config()
    cfg.model = model_config(**(over or {}))
    cfg.train.zero_stage, cfg.train.grad_clip, cfg.train.lr, cfg.train.weight_decay = zero_stage, grad_clip, 1e-2, 0.1
    cfg.train.adam_eps = 1.0  # (a well-conditioned update: see cases_tensor.deepspeed_step)
    top = topology(expert, tensor)

    ref, ref_norm = one_process_step(cfg, top.data.size, grad_clip)
    torch.manual_seed(0)
    engine = deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top)
    norm = step_and_compare(engine, top, ref, ref_norm, grad_clip, lambda n, t: local_shard(n, t, top, cfg.model))
    torch.set_default_dtype(torch.float32)
    return float(norm)


def save_resume_consolidate(expert: int, tensor: int, root: str, over: dict | None = None, zero_stage: int = 2):
    """ZeRO-1/2 at DP x EP (x TP), float64: exact resume and consolidation (cases_tensor.resume_and_consolidate)."""
    from cases_tensor import resume_and_consolidate
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    cfg.model = model_config(**(over or {}))
    cfg.train.zero_stage, cfg.train.lr, cfg.train.grad_clip = zero_stage, 1e-2, 0.05
    path = resume_and_consolidate(cfg, topology(expert, tensor), root)
    torch.set_default_dtype(torch.float32)
    return path


def _whole_params(engine, top: Topology) -> dict:
    """Every parameter whole: memory stacks gathered over the expert group, then tensor shards."""
    from cases_tensor import _whole
    out = {}
    for n, p in engine.module.named_parameters():
        t = p.detach()
        if is_expert_param(p) and top.expert.size > 1:
            pieces = [torch.empty_like(t) for _ in range(top.expert.size)]
            dist.all_gather(pieces, t.contiguous(), group=top.expert.group)
            t = torch.cat(pieces, 0)
        out[n] = _whole(n, t, top)
    return out


def reshard_resume(expert_from: int, expert_to: int, tensor: int, root: str, over: dict | None = None):
    """A ZeRO-1 checkpoint saved at EP=`expert_from` resumes at EP=`expert_to` (same world and
    tensor size) through the universal form written by checkpoint.to_universal_by_name: the next step
    of the resumed engine gives the whole parameters the original engine's next step gives."""
    from pathlib import Path

    from megamom.train import checkpoint as ckpt

    from cases_tensor import deepspeed_engine
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    cfg.model = model_config(**(over or {}))
    cfg.train.zero_stage, cfg.train.lr, cfg.train.grad_clip = 1, 1e-2, 0.05
    cfg.train.adam_eps = 1.0  # (a well-conditioned update: see cases_tensor.deepspeed_step)

    def engine_at(expert, universal=False):
        top = topology(expert, tensor)
        torch.manual_seed(0)
        return deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top, universal), top

    def step(e, top, seed):
        ids, labels, seg = batch(2, 24, seed + top.data.rank)
        e.backward(e(ids, labels=labels, segment_ids=seg).loss)
        e.step()

    root = Path(root)
    a, top_a = engine_at(expert_from)
    step(a, top_a, 1)
    state = {"step": 1, "run_id": "t", "world_size": dist.get_world_size(), "config": cfg.to_dict(),
             "parallel": {"tensor": tensor, "sequence": 1, "expert": expert_from}}
    path = ckpt.save_checkpoint(a, root, 1, state, {}, dist.get_rank(), 2)
    step(a, top_a, 2)
    want = _whole_params(a, top_a)
    if dist.get_rank() == 0:
        ckpt.to_universal_by_name(path, root / "universal")
    dist.barrier()
    b, top_b = engine_at(expert_to, universal=True)
    ckpt.load_engine_checkpoint(b, root, "universal")
    step(b, top_b, 2)
    got = _whole_params(b, top_b)
    bad = []
    for n in want:
        try:
            _close(got[n], want[n], f"{n} after the resumed step", 1e-6)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad)
    torch.set_default_dtype(torch.float32)
    return True
