"""What each rank of the pool runs for the tensor-parallel tests: a tiny float64 model, once whole
(the single-process reference, computed on every rank alike) and once parallelized over the pool's
layout, compared for the loss, the logits, every gradient and the parameters after one optimizer
step through DeepSpeed."""
from __future__ import annotations


import torch
import torch.distributed as dist

from megamom.config import Config, ModelConfig
from megamom.model import build_model
from megamom.parallel.layout import ParallelLayout
from megamom.parallel.parallelize import parallelize, tensor_shard_of
from megamom.parallel.topology import Topology

ATOL = 1e-10
_topologies: dict = {}

MODELS = {
    "mom_gated_delta": dict(arch="mom", update_rule="gated_delta", num_memories=4, topk=2),
    "mom_gla": dict(arch="mom", update_rule="gla", num_memories=4, topk=2, per_memory_conv=True),
    "gated_deltanet": dict(arch="linear", update_rule="gated_delta"),
    "transformer": dict(arch="transformer", num_kv_heads=2),
}


def model_config(name: str, **over) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, intermediate_size=64,
                chunk_size=8, loss_chunk_size=7, tie_word_embeddings=True)
    base.update(MODELS[name])
    base.update(over)
    return ModelConfig(**base)


def topology(data: int, tensor: int) -> Topology:
    key = (data, tensor)
    if key not in _topologies:  # new_group is collective: built once per layout, in the same order on every rank
        _topologies[key] = Topology(ParallelLayout(dist.get_world_size(), data, 1, tensor, 1), dist.get_rank())
    return _topologies[key]


def batch(micro: int, T: int, seed: int, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (micro, T + 1), generator=g)
    seg = torch.cumsum((torch.rand(micro, T, generator=g) < 0.08).long(), 1)
    return ids[:, :-1], ids[:, 1:].clone(), seg


def deepspeed_engine(cfg: Config, model, top: Topology, universal: bool = False):
    """The trainer's DeepSpeed set-up (megamom.train.optim: AdamW, groups, ZeRO config) for `model`
    over `top` (the tensor group as mpu), fp32, 2 rows per data rank. universal: it will load a
    checkpoint in DeepSpeed's universal form."""
    import deepspeed

    from megamom.train.optim import build_deepspeed_config, build_optimizer, param_groups
    from megamom.train.trainer import Batching
    from megamom.parallel.expert_parallel import register_expert_groups
    register_expert_groups(model)
    groups = param_groups(model, cfg.train.weight_decay)
    ds = build_deepspeed_config(cfg, Batching(2, 1, top.data.size, top.sequence.size), "fp32")
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, mpu=top.mpu(),
                                      optimizer=build_optimizer(groups, cfg.train, "fp32"), dist_init_required=False)
    return engine


def _close(a, b, what, atol=ATOL):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol * max(1.0, b.abs().max().item()), f"{what}: max |diff| {err:.3e}"


def forward_and_grads(name: str, tensor: int, data: int = 1, segments: bool = True, over: dict | None = None,
                      checkpointing: bool = False, sequence_parallel: bool = False):
    """Loss, gathered logits and every gradient of the TP model equal the whole model's (each rank's
    shard of them); with data > 1 the whole model's are the mean over the data ranks' batches."""
    torch.set_default_dtype(torch.float64)
    cfg = model_config(name, **(over or {}))
    top = topology(data, tensor)
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    par = parallelize(build_model(cfg), top, sequence_parallel)
    par.activation_checkpointing = checkpointing  # (the blocks' collectives run again in the recomputation)
    dp = top.data.rank
    batches = [batch(2, 24, 100 + r) for r in range(data)]
    # reference: every data rank's micro-batch, losses averaged (what data parallelism averages)
    ref_loss = 0.0
    for ids, labels, seg in batches:
        out = ref(ids, labels=labels, segment_ids=seg if segments else None)
        (out.loss / data).backward()
        ref_loss += out.loss.item() / data
    ids, labels, seg = batches[dp]
    out = par(ids, labels=labels, segment_ids=seg if segments else None)
    out.loss.backward()
    ref_one = ref(ids, labels=labels, segment_ids=seg if segments else None, return_logits=True)
    _close(out.loss.detach(), ref_one.loss.detach(), "loss")
    if out.logits is not None:
        _close(out.logits, ref_one.logits, "logits")
    ref_params = dict(ref.named_parameters())
    bad = []
    for n, p in par.named_parameters():
        g = p.grad
        if data > 1:  # what the data group's all-reduce does
            g = g.clone()
            dist.all_reduce(g, group=top.data.group)
            g /= data
        want = tensor_shard_of(n, ref_params[n].grad, top.tensor.size, top.tensor.rank)
        assert g.shape == want.shape, (n, g.shape, want.shape)
        try:
            _close(g, want, f"grad of {n}")
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad)
    torch.set_default_dtype(torch.float32)
    return {"loss": out.loss.item(), "params": sum(p.numel() for p in par.parameters())}


def deepspeed_step(name: str, tensor: int, data: int, zero_stage: int, grad_clip: float):
    """One optimizer step through DeepSpeed (ZeRO-`zero_stage`, the tensor group as its mpu): every
    parameter shard equals the whole model's after the same step (AdamW, gradient clipping by the
    global norm, which counts every replica once and every shard once). To 1e-6: ZeRO-1/2 step
    float32 master weights (the gradients are float64 here), and ZeRO-0 runs in float32 (its
    gradient all-reduce takes 16- and 32-bit floats only)."""
    dtype = torch.float32 if zero_stage == 0 else torch.float64
    torch.set_default_dtype(dtype)
    cfg = Config()
    cfg.model = model_config(name)
    cfg.train.zero_stage, cfg.train.grad_clip, cfg.train.lr, cfg.train.weight_decay = zero_stage, grad_clip, 1e-2, 0.1
    # Adam's first step is nearly blind to the gradient's scale (g / (|g| + eps)); a large eps makes
    # the update about lr * g, so a gradient averaged or clipped wrongly shows in the parameters
    cfg.train.adam_eps = 1.0
    top = topology(data, tensor)

    ref, ref_norm = one_process_step(cfg, data, grad_clip)
    torch.manual_seed(0)
    par = parallelize(build_model(cfg.model), top)
    engine = deepspeed_engine(cfg, par, top)
    norm = step_and_compare(engine, top, ref, ref_norm, grad_clip,
                            lambda n, t: tensor_shard_of(n, t, top.tensor.size, top.tensor.rank))
    torch.set_default_dtype(torch.float32)
    return float(norm)


def one_process_step(cfg: Config, data: int, grad_clip: float):
    """The reference of a DeepSpeed step: one process, the data ranks' micro-batches (batch(2, 24,
    100 + data rank)) as accumulated gradients of mean losses, clipped, one AdamW step. -> (model,
    the gradient norm before clipping)."""
    from megamom.train.optim import build_optimizer, param_groups
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    ref_opt = build_optimizer(param_groups(ref, cfg.train.weight_decay), cfg.train, "fp32")
    for r in range(data):
        ids, labels, seg = batch(2, 24, 100 + r)
        (ref(ids, labels=labels, segment_ids=seg).loss / data).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip)
    ref_opt.step()
    return ref, ref_norm


def step_and_compare(engine, top: Topology, ref, ref_norm, grad_clip: float, shard_of, atol: float = 1e-6) -> float:
    """One step of `engine` on this data rank's micro-batch; its global gradient norm equals the
    reference's (DeepSpeed accumulates it in float32), the step clipped, and every parameter equals
    shard_of(name, the reference's parameter). -> the norm."""
    ids, labels, seg = batch(2, 24, 100 + top.data.rank)
    engine.backward(engine(ids, labels=labels, segment_ids=seg).loss)
    engine.step()
    norm = engine.get_global_grad_norm()
    if norm is None:  # ZeRO-0 in fp32 clips (deepspeed.runtime.utils.clip_grad_norm_) but keeps no norm
        norm = ref_norm
    assert abs(float(norm) - float(ref_norm)) <= 1e-5 * float(ref_norm), (float(norm), float(ref_norm))
    assert float(ref_norm) > grad_clip, "the test must clip"
    ref_params = dict(ref.named_parameters())
    bad = []
    for n, p in engine.module.named_parameters():
        try:
            _close(p.detach(), shard_of(n, ref_params[n].detach()), f"{n} after one step", atol)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad) + f" (norm {float(norm)} vs {float(ref_norm)})"
    return float(norm)


def resume_and_consolidate(cfg: Config, top: Topology, root: str, gather_logits=lambda x: x) -> str:
    """ZeRO-1/2 at `top`'s layout: a run checkpoint after one step; an engine built afresh and loaded
    from it takes the next step to the same parameters as the original engine (exact resume); the
    consolidation (checkpoint.load_model_state_dict) is the whole model, whose logits equal the
    parallel model's (`gather_logits`: this rank's logits -> the whole batch's). -> the checkpoint."""
    from pathlib import Path

    from megamom.train import checkpoint as ckpt

    def engine():
        torch.manual_seed(0)
        return deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top)

    def step(e, seed):
        ids, labels, seg = batch(2, 24, seed + top.data.rank)
        e.backward(e(ids, labels=labels, segment_ids=seg).loss)
        e.step()

    a = engine()
    step(a, 1)
    state = {"step": 1, "run_id": "t", "world_size": dist.get_world_size(), "config": cfg.to_dict(),
             "parallel": {"tensor": top.tensor.size, "sequence": top.sequence.size, "expert": top.expert.size}}
    path = ckpt.save_checkpoint(a, Path(root), 1, state, {}, dist.get_rank(), 2)
    ids, labels, seg = batch(2, 24, 50)
    logits = gather_logits(a.module(ids, segment_ids=seg).logits.detach())
    step(a, 2)
    b = engine()
    ckpt.check_shapes(path, b.module, upgrade=False)
    ckpt.load_engine_checkpoint(b, path.parent, path.name)
    step(b, 2)
    for (n, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), f"{n} differs after the resumed step: {(p - q).abs().max().item():.3e}"
    whole_sd = ckpt.load_model_state_dict(path)
    whole = build_model(cfg.model)
    whole.load_state_dict({k: v.to(torch.float64) for k, v in whole_sd.items()})
    _close(whole(ids, segment_ids=seg).logits.detach(), logits, "logits of the consolidated model", 1e-6)
    dist.barrier()
    return str(path)


def save_consolidate_reshard(name: str, tensor: int, zero_stage: int, root: str):
    """One DeepSpeed step at TP=`tensor`, saved as a run checkpoint; rank 0 consolidates it
    (checkpoint.load_model_state_dict) into the whole model, whose logits equal the TP model's; every
    rank reshards the whole weights at TP=`tensor` again and gets its own parameters back. float64
    (ZeRO-1/2 keep float32 master weights of them: to 1e-6), ZeRO-0 in float32 (DeepSpeed's
    all-reduce takes no float64; its module weights come back bitwise)."""
    from megamom.train import checkpoint as ckpt
    dtype = torch.float32 if zero_stage == 0 else torch.float64
    torch.set_default_dtype(dtype)
    cfg = Config()
    cfg.model = model_config(name)
    cfg.train.zero_stage = zero_stage
    top = topology(dist.get_world_size() // tensor, tensor)
    torch.manual_seed(0)
    engine = deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top)
    ids, labels, seg = batch(2, 24, 7)
    engine.backward(engine(ids, labels=labels, segment_ids=seg).loss)
    engine.step()
    state = {"step": 1, "run_id": "test", "world_size": dist.get_world_size(), "config": cfg.to_dict(),
             "parallel": {"tensor": tensor, "sequence": 1, "expert": 1}}
    path = ckpt.save_checkpoint(engine, __import__("pathlib").Path(root), 1, state, {}, dist.get_rank(), 2)
    logits = engine.module(ids, segment_ids=seg).logits.detach()
    whole_sd = ckpt.load_model_state_dict(path)
    whole = build_model(cfg.model)
    whole.load_state_dict({k: v.to(dtype) for k, v in whole_sd.items()})
    _close(whole(ids, segment_ids=seg).logits.detach(), logits, "logits of the consolidated model", 1e-5 if
           zero_stage == 0 else 1e-6)
    for n, p in engine.module.named_parameters():
        _close(tensor_shard_of(n, whole_sd[n].to(dtype), top.tensor.size, top.tensor.rank), p.detach(),
               f"{n} resharded", 0.0 if zero_stage == 0 else 1e-6)
    # the same weights at every other tensor size of this world give the same logits
    for other in (t for t in (1, 2, 4) if t != tensor and dist.get_world_size() % t == 0):
        moved = build_model(cfg.model)
        moved.load_state_dict({k: v.to(dtype) for k, v in whole_sd.items()})
        moved = parallelize(moved, topology(dist.get_world_size() // other, other))
        _close(moved(ids, segment_ids=seg).logits.detach(), logits, f"logits resharded to TP={other}",
               1e-5 if zero_stage == 0 else 1e-6)
    dist.barrier()
    torch.set_default_dtype(torch.float32)
    return str(path)


def nonfinite_shard_skips_everywhere(zero_stage: int):
    """A non-finite gradient in one tensor rank's shard: every rank skips the step (the replicated
    weights stay equal across the group) and every weight is unchanged."""
    torch.set_default_dtype(torch.float32)
    cfg = Config()
    cfg.model = model_config("mom_gated_delta")
    cfg.train.zero_stage = zero_stage
    top = topology(dist.get_world_size() // 2, 2)
    torch.manual_seed(0)
    engine = deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ids, labels, seg = batch(2, 24, 3)
    out = engine(ids, labels=labels, segment_ids=seg)
    poison = engine.module.model.layers[0].attn.q_proj.weight  # a tensor shard
    if top.tensor.rank == 1:
        poison.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    engine.backward(out.loss)
    engine.step()
    assert not engine.was_step_applied(), "the step must be skipped on every rank"
    for n, p in engine.module.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed in a skipped step"
    return True


def _whole(name: str, shard: torch.Tensor, top: Topology) -> torch.Tensor:
    """The whole parameter from every tensor rank's shard of it."""
    from megamom.parallel.parallelize import unshard
    if top.tensor.size == 1:
        return shard.detach()
    pieces = [torch.empty_like(shard) for _ in range(top.tensor.size)]
    dist.all_gather(pieces, shard.detach().contiguous(), group=top.tensor.group)
    return unshard(name, pieces)


def reshard_resume(name: str, tensor_from: int, tensor_to: int, root: str):
    """A ZeRO-1 checkpoint saved at TP=`tensor_from` resumes at TP=`tensor_to` (same world: the
    data-parallel size changes too) through DeepSpeed's universal form: the next step of the
    resumed engine gives the parameters the original engine's next step gives."""
    from pathlib import Path

    from megamom.train import checkpoint as ckpt
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    cfg.model = model_config(name)
    cfg.train.zero_stage, cfg.train.lr, cfg.train.grad_clip = 1, 1e-2, 0.05
    cfg.train.adam_eps = 1.0  # (a well-conditioned update: see deepspeed_step)
    W = dist.get_world_size()

    def engine_at(tensor, universal=False):
        top = topology(W // tensor, tensor)
        torch.manual_seed(0)
        return deepspeed_engine(cfg, parallelize(build_model(cfg.model), top), top, universal), top

    def step(engine, top, seed):  # the same global batch at any layout: each data rank its rows of it
        ids, labels, seg = batch(2 * W, 24, seed)
        per = 2 * W // top.data.size
        rows = slice(top.data.rank * per, (top.data.rank + 1) * per)
        out = engine(ids[rows], labels=labels[rows], segment_ids=seg[rows])
        engine.backward(out.loss)
        engine.step()

    root = Path(root)
    a, top_a = engine_at(tensor_from)
    step(a, top_a, 1)
    state = {"step": 1, "run_id": "t", "world_size": W, "config": cfg.to_dict(),
             "parallel": {"tensor": tensor_from, "sequence": 1, "expert": 1}}
    path = ckpt.save_checkpoint(a, root, 1, state, {}, dist.get_rank(), 2)
    step(a, top_a, 2)  # the reference: the original layout's next step
    want = {n: p.detach().clone() for n, p in a.module.named_parameters()}
    if dist.get_rank() == 0:
        ckpt.to_universal(path, root / "universal")
    dist.barrier()
    b, top_b = engine_at(tensor_to, universal=True)
    b.load_checkpoint(str(root), tag="universal", load_optimizer_states=True, load_lr_scheduler_states=True)
    step(b, top_b, 2)
    bad = []
    for n, p in b.module.named_parameters():
        try:
            _close(_whole(n, p, top_b), _whole(n, want[n], top_a), f"{n} after the resumed step", 1e-6)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "; ".join(bad)
    torch.set_default_dtype(torch.float32)
    return True
