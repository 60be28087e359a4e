"""Apply a layout to a plain model (torchtitan style: the model files know nothing of it).

`parallelize(model, topology)` takes a model built whole on every rank (same seed, so the same
weights as one process) and keeps this rank's tensor shard of each parameter, as the sharding plan
(`plan.py`) says: column-parallel rows of q / g / the memories' k / v / beta / decay and of the
MLP's gate / up, row-parallel columns of o_proj and down_proj, the per-head A_log / dt_bias and
conv channels, the vocabulary rows of the embedding and output layer. The sublayers' region seams
get the tensor group's copy / all-reduce, the loss becomes the vocabulary-parallel cross entropy,
and a replicated weight whose gradient each rank computes in part (the memories' output norm,
shared by every head) has it summed over the group. The fast GPU path (grouped GEMM, fused Triton
kernels) runs unchanged on each shard: the layers read their head counts off their weights."""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn

from ..errors import ConfigError
from .mappings import (copy_to_region, gather_along, gather_from_split, reduce_from_region, reduce_scatter_along,
                       sum_grad_over)
from .plan import is_memory_stack, placement, sharding_plan
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMLoss,
                              mark_sharded, shard)
from .topology import Group, Topology


def universal_checkpoint_info(plan: dict) -> dict:
    """How DeepSpeed's universal checkpoints (deepspeed.checkpoint.ds_to_universal, and loading with
    `checkpoint.load_universal`) merge and re-split each parameter over tensor ranks: the plan's
    replicated ones are taken once, the row-parallel ones joined along dim 1, the rest along dim 0.
    Saved with every checkpoint (as the module's `universal_checkpoint_info`), so any checkpoint can
    resume at another tensor size."""
    from deepspeed.checkpoint import constants as uc
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.TP_REPLICATED_PARAMETER_PATTERNS: [re.escape(n) + "$" for n, p in plan.items() if p.tensor_dim is None],
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [re.escape(n) + "$" for n, p in plan.items() if p.tensor_dim == 1],
    }


def parallelize(model, topology: Topology, sequence_parallel: bool = False):
    """Shard `model` (a megamom CausalLM) in place over `topology`'s tensor group (and its memories
    over the expert group), and split its sequences over the sequence group
    (megamom.parallel.sequence_parallel); returns it. A group of one changes nothing. sequence_parallel: Megatron's TP
    sequence parallelism (parallel.tensor_sequence_parallel): the residual stream, the norms and the
    routers hold this rank's slice of the sequence; every replicated weight then has its gradient
    summed over the group (each rank saw its slice of the tokens)."""
    tp = topology.tensor
    model.topology = topology
    plan = sharding_plan(model)  # before any change: a parameter with no place is an error here
    model.universal_checkpoint_info = universal_checkpoint_info(plan)
    if topology.expert.size > 1:
        _shard_memories(model, topology.expert, plan)
    if tp.size > 1:
        _shard_tensors(model, tp, plan, sequence_parallel)
    if topology.sequence.size > 1:  # last: its loss wraps the (vocabulary-parallel) loss
        from .sequence_parallel import split_sequence
        split_sequence(model, topology.sequence)
    return model


def _shard_tensors(model, tp: Group, plan: dict, sequence_parallel: bool) -> None:
    cfg = model.config
    sizes = {"model.vocab_size": cfg.vocab_size, "model.num_heads": cfg.num_heads,
             "the MLP width": cfg.mlp_hidden_size}
    if cfg.arch == "transformer":
        sizes["model.num_kv_heads"] = cfg.num_kv_heads or cfg.num_heads
    for what, size in sizes.items():  # (the layout checked these for a run; a direct call is checked here)
        if size % tp.size:
            raise ConfigError(f"{what}={size} does not split over parallel.tensor={tp.size}")
    names = {id(p): n for n, p in model.named_parameters()}

    sp = sequence_parallel
    embedding = VocabParallelEmbedding(model.model.embeddings, tp, sp)
    model.model.embeddings = embedding
    if model.lm_head is not None:
        ColumnParallelLinear.adopt(model.lm_head, tp)  # vocabulary rows, as the embedding's
    model.loss_fn = VocabParallelLMLoss(model.loss_fn.chunk_rows, tp, embedding.vocab_start, sp)

    for module in model.modules():
        if isinstance(module, nn.Linear) and not getattr(module.weight, "tensor_model_parallel", False):
            place = plan[names[id(module.weight)]]
            if place.tensor_dim is not None:
                (ColumnParallelLinear if place.tensor_dim == 0 else RowParallelLinear).adopt(module, tp)
    for name, p in model.named_parameters():
        place = plan[name]
        if place.tensor_dim is not None and not getattr(p, "tensor_model_parallel", False):
            p.data = shard(p.data, place.tensor_dim, tp)
            mark_sharded(p, place.tensor_dim)
        if place.partial_grad or (sp and place.tensor_dim is None):
            sum_grad_over(p, tp)
    for block in model.model.layers:
        for region in (block.attn, block.mlp):
            if sp:
                region.enter_region = partial(gather_along, dim=1, group=tp)
                region.exit_region = partial(reduce_scatter_along, dim=1, group=tp)
                region.gather_tokens = partial(gather_from_split, dim=1, group=tp)
            else:
                region.enter_region = partial(copy_to_region, group=tp)
                region.exit_region = partial(reduce_from_region, group=tp)
            region.enter_replicated = partial(copy_to_region, group=tp)
    model.tensor_sequence_parallel = sp


def expert_group_name(expert_size: int) -> str:
    """DeepSpeed's name for the expert groups of this size (deepspeed.utils.groups: "ep_size_<EP>")."""
    return f"ep_size_{expert_size}"


def is_expert_sharded(name: str, config) -> bool:
    """Whether the plan splits this parameter of a model with `config` over the expert group."""
    return is_memory_stack(name, config.arch, config.per_memory_conv)


def is_expert_param(param) -> bool:
    """A parameter split over the expert group (DeepSpeed's mark: `allreduce=False`)."""
    return getattr(param, "allreduce", True) is False


def _shard_memories(model, ep: Group, plan: dict) -> None:
    """Keep this expert rank's routed memories of every MoM layer, and give its layers the dispatcher
    that exchanges rows with the other expert ranks. The memory parameters are marked for DeepSpeed's
    MoE handling (`allreduce=False`, `group_name`): ZeRO reduces and partitions their gradients over the
    expert-data group, the ranks that hold the same memories."""
    from ..model.memory_mixer import MemoryMixer
    from .expert_parallel import ExpertParallelDispatcher
    E = model.config.num_memories
    for name, p in model.named_parameters():
        if is_expert_sharded(name, model.config):
            p.data = shard(p.data, plan[name].expert_dim, ep)
            p.allreduce = False
            p.group_name = expert_group_name(ep.size)
    for module in model.modules():
        if isinstance(module, MemoryMixer) and module.router is not None:
            module.dispatcher = ExpertParallelDispatcher(E, module.shared, ep)


def whole_shape(name: str, shape: tuple, tensor_size: int) -> tuple:
    """The shape of the whole parameter a tensor shard of `shape` belongs to."""
    dim = placement(name).tensor_dim
    if dim is None or tensor_size == 1:
        return tuple(shape)
    return tuple(s * tensor_size if i == dim else s for i, s in enumerate(shape))


def unshard(name: str, shards: list):
    """The whole parameter from its tensor shards (tensor rank order): concatenated along the
    plan's dimension, or the first copy of a replicated one."""
    dim = placement(name).tensor_dim
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim)


def local_shard(name: str, full, topology: Topology, config):
    """This rank's piece of one whole parameter of a model with `config` under `topology`: its expert
    rank's memories (a routed memories' stack), then its tensor shard."""
    ep = topology.expert
    if ep.size > 1 and is_expert_sharded(name, config):
        full = shard(full, placement(name).expert_dim, ep)
    return tensor_shard_of(name, full, topology.tensor.size, topology.tensor.rank)


def tensor_shard_of(name: str, full, tensor_size: int, tensor_rank: int):
    """The tensor-parallel shard of one full parameter (checkpoint resharding): the plan's
    dimension split evenly, or the full tensor for a replicated one."""
    dim = placement(name).tensor_dim
    if dim is None or tensor_size == 1:
        return full
    return shard(full, dim, Group(None, tuple(range(tensor_size)), tensor_rank))
