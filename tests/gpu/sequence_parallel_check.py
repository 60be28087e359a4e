"""Sequence parallelism's GPU path on one GPU: 4 sequence ranks (four processes on cuda:0, gloo with a
CPU round trip for the collectives, since NCCL refuses two ranks on one GPU) running the Triton
kernels in float32, against the whole model on the same kernels and the float64 torch reference:
relative errors of the loss, this rank's logits and the worst parameter gradient, one JSON line per
model. A document starts exactly at the slice edge; another crosses it.

    python tests/gpu/sequence_parallel_check.py OUT.jsonl [model ...]"""
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4  # rank 0 (nothing enters), two middle ranks (summaries with and without transitions), the last
MODELS = {"mom_gated_delta": dict(arch="mom", update_rule="gated_delta", num_memories=4, topk=2),
          "gated_deltanet": dict(arch="linear", update_rule="gated_delta"),
          "transformer": dict(arch="transformer", num_kv_heads=2)}


def cpu_round_trip():
    from megamom.parallel import mappings, sequence_parallel
    ag, rs = mappings._all_gather_single, mappings._reduce_scatter_single

    def all_gather(out, x, group=None):
        o = out.cpu(); ag(o, x.cpu(), group=group); out.copy_(o)

    def reduce_scatter(out, x, group=None):
        o = out.cpu(); rs(o, x.cpu(), group=group); out.copy_(o)

    def all_reduce_(x, group, op=dist.ReduceOp.SUM):
        if group.size > 1:
            c = x.cpu(); dist.all_reduce(c, op=op, group=group.group); x.copy_(c)
        return x
    mappings._all_gather_single, mappings._reduce_scatter_single = all_gather, reduce_scatter
    mappings.all_reduce_ = sequence_parallel.all_reduce_ = all_reduce_


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def main(rank, world, name, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_round_trip()
    from megamom.config import ModelConfig
    from megamom.model import build_model
    from megamom.parallel import parallelize as par_mod
    from megamom.parallel.layout import ParallelLayout
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # (parallelize records DeepSpeed's checkpoint constants; none are needed here)
        par_mod.universal_checkpoint_info = lambda plan: {}
    parallelize = par_mod.parallelize
    from megamom.parallel.topology import Topology
    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=2, head_dim=128, intermediate_size=512,
                      aux_loss_coef=0.01, z_loss_coef=0.001, **MODELS[name])
    top = Topology(ParallelLayout(world, 1, world, 1, 1), rank)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, T = 2, 4096
    ids = torch.randint(0, 512, (B, T + 1), generator=g)
    starts = torch.rand(B, T, generator=g) < 1 / 700
    starts[:, 0] = False
    starts[0, T // world] = True  # a document starting exactly at a slice edge
    starts[1] = False  # one document across the slices
    seg = torch.cumsum(starts.long(), 1)
    inputs = dict(input_ids=ids[:, :-1].to(dev), labels=ids[:, 1:].to(dev), segment_ids=seg.to(dev))

    def run(model):
        out = model(**inputs, return_logits=True)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    ref64, g64 = run(build_model(dataclasses.replace(cfg, kernel_backend="torch")).to(dev, torch.float64))
    torch.manual_seed(0)
    whole, gw = run(build_model(cfg).to(dev))
    torch.manual_seed(0)
    part, gs = run(parallelize(build_model(cfg).to(dev), top))
    L = T // world
    here = slice(rank * L, (rank + 1) * L)

    def squares(a, b):  # (|a - b|^2, |b|^2) of this rank's slice, summed over the ranks below
        return [((a.double() - b.double()) ** 2).sum().item(), (b.double() ** 2).sum().item()]
    sums = torch.tensor([squares(whole.logits[:, here], ref64.logits[:, here]),
                         squares(part.logits, ref64.logits[:, here]), [part.loss.item(), 0.0]], dtype=torch.float64)
    dist.all_reduce(sums)
    grads_sp = {}
    for n, t in gs.items():  # the mean over the sequence ranks (as DeepSpeed takes it)
        c = t.cpu()
        dist.all_reduce(c)
        grads_sp[n] = c.to(dev) / world
    ref_loss = ref64.loss.item()
    row = {"rule": name,
           "loss whole": abs(whole.loss.item() - ref_loss) / abs(ref_loss),
           "loss SP": abs(sums[2, 0].item() / world - ref_loss) / abs(ref_loss),
           "logits whole": (sums[0, 0] / sums[0, 1]).sqrt().item(),
           "logits SP": (sums[1, 0] / sums[1, 1]).sqrt().item(),
           "grads whole": max(rel(gw[n], g64[n]) for n in g64),
           "grads SP": max(rel(grads_sp[n], g64[n]) for n in g64)}
    if rank == 0:
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    for name in sys.argv[2:] or MODELS:  # (GLA's scan is the torch one on the GPU too: tested on the CPU)
        mp.spawn(main, args=(WORLD, name, out), nprocs=WORLD)
    rows = [json.loads(l) for l in open(out)]
    keys = list(rows[0])
    print(" ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:>14}" if isinstance(r[k], str) else f"{r[k]:>14.2e}" for k in keys))
