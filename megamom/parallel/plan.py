"""The sharding plan: for every parameter of every architecture, the dimension tensor parallelism
splits (or none: replicated over the tensor group) and the dimension expert parallelism splits
(the routed memories). Parallelisation, optimizer groups, gradient clipping and checkpoint
consolidation all read it from here, so a new parameter that is not in the plan is an error, not a
silent replica.

Megatron's names: a column-parallel linear splits its output rows (dim 0 of the weight), a
row-parallel one its input columns (dim 1), and the vocabulary-parallel embedding / output layer
its vocabulary rows."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Placement:
    tensor_dim: Optional[int]  # split over the tensor group along this dim; None: a full copy on each
    expert_dim: Optional[int]  # split over the expert group along this dim (routed memories)
    why: str
    # replicated, but each tensor rank computes part of its gradient (a weight shared by heads that
    # are split over the group): the gradient is summed over the tensor group
    partial_grad: bool = False


COLUMN = Placement(0, None, "column-parallel: output rows split (its heads / MLP columns)")
ROW = Placement(1, None, "row-parallel: input columns split, outputs summed over the tensor group")
REPLICATED = Placement(None, None, "replicated: every rank holds it; gradients summed where ranks saw different tokens")
PER_HEAD = Placement(0, None, "one value per head: split with the heads")
MEMORY_ROWS = Placement(1, 0, "[routed memories, rows, d]: memories over experts, head rows over the tensor group")
SHARED_MEMORY = Placement(0, None, "the shared memory's [rows, d] or [channels, taps]: dense on every expert rank, "
                                   "head rows over the tensor group")
MEMORY_CONV = Placement(1, 0, "[memories or 1, channels, taps]: channels with the heads (memories over experts "
                              "when each memory has its own conv)")

# first match wins; patterns are matched against the full parameter name
_PLAN: list[tuple[str, Placement]] = [
    (r"model\.embeddings\.weight", Placement(0, None, "vocabulary-parallel embedding (and tied output layer)")),
    (r"lm_head\.weight", Placement(0, None, "vocabulary-parallel output layer")),
    (r"(model\.norm|\.attn_norm|\.mlp_norm)\.weight", REPLICATED),
    (r"\.mlp\.(gate_proj|up_proj)\.weight", COLUMN),
    (r"\.mlp\.down_proj\.weight", ROW),
    # memory layers (MemoryMixer)
    (r"\.attn\.router\.weight", Placement(None, None, "the router: replicated, every rank routes its own tokens")),
    # GLA's low-rank decay gate: the down projection [memories, rank, d] serves every head
    (r"\.attn\.a_down$", Placement(None, 0, "[routed memories, rank, d]: memories over experts; every head reads "
                                            "it, so each tensor rank's gradient is summed over the group",
                                   partial_grad=True)),
    (r"\.attn\.shared_a_down$", Placement(None, None, "the shared memory's [rank, d]: every head reads it, its "
                                                      "gradient summed over the tensor group", partial_grad=True)),
    (r"\.attn\.(k_proj|v_proj|b_proj|a_proj|a_up|a_bias)$", MEMORY_ROWS),
    (r"\.attn\.shared_(a_up|a_bias)$", SHARED_MEMORY),
    (r"\.attn\.shared_(k_proj|v_proj|b_proj|a_proj|q_conv|k_conv|v_conv)$", SHARED_MEMORY),
    (r"\.attn\.(q_conv|k_conv|v_conv)$", MEMORY_CONV),
    (r"\.attn\.(A_log|dt_bias)$", PER_HEAD),
    (r"\.attn\.(q_feature|k_feature)\.layer[12]\.(weight|bias)", Placement(
        None, None, "linear attention's feature map, shared by every head: each tensor rank's gradient covers "
                    "its heads, summed over the group", partial_grad=True)),
    (r"\.attn\.o_norm\.weight", Placement(None, None, "the per-head norm's weight, shared by every head: each "
                                                    "tensor rank's gradient covers its heads, summed over the group",
                                          partial_grad=True)),
    # memory layers and attention alike
    (r"\.attn\.(q_proj|k_proj|v_proj|g_proj)\.weight", COLUMN),
    (r"\.attn\.o_proj\.weight", ROW),
]


def placement(name: str) -> Placement:
    for pattern, place in _PLAN:
        if re.search(pattern, name):
            return place
    raise KeyError(f"parameter {name!r} has no place in megamom.parallel.plan; add a pattern for it")


def is_memory_stack(name: str, arch: str, per_memory_conv: bool) -> bool:
    """Whether a parameter is a stack of the routed memories, which expert parallelism splits: their
    projections, and their convs when each memory has its own (one conv for all, [1, C, W], is not)."""
    place = placement(name)
    if place.expert_dim is None or arch != "mom":
        return False
    return place is not MEMORY_CONV or bool(per_memory_conv)


def sharding_plan(model) -> dict[str, Placement]:
    """Every parameter of `model` with its placement (KeyError naming one that has none)."""
    return {name: placement(name) for name, _ in model.named_parameters()}
