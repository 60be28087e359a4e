"""The parallel layout and the sharding plan (megamom.parallel): every divisibility rule named
before any work, TP-innermost rank order, expert groups inside DP x SP, and a placement for every
parameter of every architecture that splits evenly wherever the layout is valid."""
from pathlib import Path

import pytest

from megamom.config import ConfigError, load_config
from megamom.model import build_model
from megamom.parallel import ParallelLayout, check_supported, placement, sharding_plan

SMALL = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=4", "model.head_dim=16",
         "model.vocab_size=512", "model.intermediate_size=128"]
ARCHS = {
    "mom": ["model.arch=mom"],
    "mom-per-memory-conv": ["model.arch=mom", "model.per_memory_conv=true"],
    "gated-deltanet": ["model.arch=linear", "model.update_rule=gated_delta"],
    "gla": ["model.arch=linear", "model.update_rule=gla"],
    "transformer": ["model.arch=transformer", "model.num_kv_heads=2"],
}


def cfg_of(*overrides):
    from megamom.train.cli import default_config_path
    return load_config(default_config_path(), [*SMALL, *overrides])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_parameter_has_a_placement_that_splits_evenly(arch):
    cfg = cfg_of(*ARCHS[arch], "parallel.tensor=2", *(["parallel.expert=2"] if arch.startswith("mom") else []))
    model = build_model(cfg.model)
    plan = sharding_plan(model)
    assert set(plan) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        place = plan[name]
        if place.tensor_dim is not None:
            assert p.shape[place.tensor_dim] % cfg.parallel.tensor == 0, (name, tuple(p.shape))
        if place.expert_dim is not None and p.shape[place.expert_dim] > 1:  # (a conv shared by all: [1, C, W])
            assert p.shape[place.expert_dim] == cfg.model.num_memories, name  # the routed memories alone
            assert p.shape[place.expert_dim] % cfg.parallel.expert == 0, name
    kinds = {n.split("layers.0.")[-1]: (pl.tensor_dim, pl.expert_dim) for n, pl in plan.items()}
    assert kinds["mlp.gate_proj.weight"] == (0, None) and kinds["mlp.down_proj.weight"] == (1, None)
    assert kinds["attn.o_proj.weight"] == (1, None) and kinds["attn.q_proj.weight"] == (0, None)
    assert kinds["model.embeddings.weight"] == (0, None) and kinds["model.norm.weight"] == (None, None)
    if arch.startswith("mom"):
        assert kinds["attn.k_proj"] == (1, 0) and kinds["attn.router.weight"] == (None, None)
    if arch != "transformer":  # the shared memory (a linear model's only one) is dense: never split by experts
        assert kinds["attn.shared_k_proj"] == (0, None) and kinds["attn.shared_v_proj"] == (0, None)


def test_a_parameter_outside_the_plan_is_an_error():
    with pytest.raises(KeyError, match="model.layers.0.attn.new_thing"):
        placement("model.layers.0.attn.new_thing")


def test_rank_order_tensor_innermost_then_sequence_then_data():
    cfg = cfg_of("parallel.tensor=2", "parallel.sequence=2", "parallel.expert=2", "data.seq_len=128")
    lay = ParallelLayout.build(cfg, 8)
    assert (lay.data, lay.sequence, lay.tensor, lay.expert) == (2, 2, 2, 2)
    coords = [lay.coordinates(r) for r in range(8)]
    assert [c["tensor"] for c in coords] == [0, 1] * 4
    assert [c["sequence"] for c in coords] == [0, 0, 1, 1] * 2
    assert [c["data"] for c in coords] == [0] * 4 + [1] * 4
    assert len({(c["data"], c["sequence"], c["tensor"]) for c in coords}) == 8
    # with SP, an expert group is data ranks of one sequence index: the expert index is the data index mod EP
    assert [c["expert"] for c in coords] == [c["data"] % 2 for c in coords]


@pytest.mark.parametrize("overrides, world, fragments", [
    (["parallel.tensor=3"], 3, ["model.num_heads=4", "parallel.tensor=3", "whole heads"]),
    (["model.arch=transformer", "model.num_kv_heads=1", "parallel.tensor=2"], 2,
     ["model.num_kv_heads=1", "parallel.tensor=2"]),
    (["model.intermediate_size=129", "model.num_heads=2", "parallel.tensor=2"], 2,
     ["model.intermediate_size", "129", "parallel.tensor=2"]),
    (["model.vocab_size=501", "parallel.tensor=2"], 2, ["model.vocab_size=501", "pad it", "512"]),
    (["parallel.sequence=3", "data.seq_len=128"], 3, ["data.seq_len=128", "parallel.sequence=3"]),
    (["parallel.expert=3"], 3, ["model.num_memories=4", "parallel.expert=3", "whole memories"]),
    (["model.arch=linear", "parallel.expert=2"], 2, ["parallel.expert=2", "model.arch=mom"]),
    (["parallel.tensor=2"], 3, ["world size 3", "multiple of 2 processes"]),
    (["parallel.expert=4", "parallel.tensor=2"], 4, ["parallel.expert=4", "2 x 1 ranks"]),
    (["parallel.expert=2", "parallel.sequence=2", "data.seq_len=128"], 6,
     ["parallel.expert=2", "3 data-parallel ranks", "one sequence slice", "multiple of 4 processes"]),
])
def test_each_bad_layout_names_the_numbers_and_the_fix(overrides, world, fragments):
    with pytest.raises(ConfigError) as e:
        ParallelLayout.build(cfg_of(*overrides), world)
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_every_combination_of_parallel_modes_is_supported():
    check_supported(ParallelLayout.build(cfg_of("parallel.tensor=2", "parallel.expert=2", "parallel.sequence=2",
                                                "data.seq_len=128"), 16))
    check_supported(ParallelLayout.build(cfg_of("parallel.expert=2", "parallel.sequence=2", "data.seq_len=128"), 4))
    check_supported(ParallelLayout.build(cfg_of(), 4))  # data parallelism alone
    check_supported(ParallelLayout.build(cfg_of("parallel.tensor=2"), 4))  # and tensor parallelism
    check_supported(ParallelLayout.build(cfg_of("parallel.tensor=2", "parallel.expert=2"), 4))  # and experts
    check_supported(ParallelLayout.build(cfg_of("parallel.tensor=2", "parallel.sequence=2"), 4))  # and sequences


@pytest.mark.parametrize("setting, fragment", [("train.zero_stage=3", "use train.zero_stage=1 or 2"),
                                               ("train.compile=true", "compile=false"),
                                               ("train.offload_optimizer=true", "offload_optimizer=false")])
def test_settings_not_combined_with_sequence_parallelism_are_refused(setting, fragment):
    cfg = cfg_of("parallel.sequence=2", "data.seq_len=128", setting)
    with pytest.raises(ConfigError, match=rf"parallel.sequence=2 cannot be combined with {setting}.*{fragment}"):
        check_supported(ParallelLayout.build(cfg, 2), cfg)


@pytest.mark.parametrize("setting, fragment", [("train.zero_stage=3", "use train.zero_stage=1 or 2"),
                                               ("train.offload_optimizer=true", "offload_optimizer=false")])
def test_settings_not_combined_with_tensor_parallelism_are_refused(setting, fragment):
    cfg = cfg_of("parallel.tensor=2", setting)
    with pytest.raises(ConfigError, match=rf"parallel.tensor=2 cannot be combined with {setting}.*{fragment}"):
        check_supported(ParallelLayout.build(cfg, 2), cfg)
    check_supported(ParallelLayout.build(cfg, 2))  # (the layout alone is fine)


@pytest.mark.parametrize("setting, fragment", [("train.zero_stage=3", "use train.zero_stage=1 or 2"),
                                               ("train.compile=true", "compile=false"),
                                               ("train.offload_optimizer=true", "offload_optimizer=false")])
def test_settings_not_combined_with_expert_parallelism_are_refused(setting, fragment):
    cfg = cfg_of("parallel.expert=2", setting)
    with pytest.raises(ConfigError, match=rf"parallel.expert=2 cannot be combined with {setting}.*{fragment}"):
        check_supported(ParallelLayout.build(cfg, 2), cfg)


def test_resuming_at_another_sequence_size_under_expert_parallelism_reshards():
    """Which memories a rank holds depends on the sequence size when EP > 1 (expert groups are data
    ranks of one slice): a checkpoint of DP2 x SP2 x EP2 resumed on the same 4 ranks at DP4 x EP2 must
    go through the universal re-split, not DeepSpeed's native load of each rank's old partition."""
    from types import SimpleNamespace

    from megamom.config import Config
    from megamom.train.trainer import Trainer

    def decide(saved: dict, ours: dict):
        cfg = Config()
        cfg.train.zero_stage = 2
        me = SimpleNamespace(cfg=cfg, reshard=None, dist=SimpleNamespace(world_size=4),
                             topology=SimpleNamespace(**{k: SimpleNamespace(size=v) for k, v in ours.items()}),
                             _model_config_diff=lambda state: [])
        state = {"world_size": 4, "parallel": {"tensor": 1, **saved}, "config": {"train": {"zero_stage": 2}}}
        Trainer._check_config_compatible(me, state, Path("ckpt"))
        return me.reshard
    assert decide({"sequence": 2, "expert": 2}, {"tensor": 1, "sequence": 1, "expert": 2}) == (1, 2, 4)
    assert decide({"sequence": 2, "expert": 2}, {"tensor": 1, "sequence": 2, "expert": 2}) is None  # same layout
    assert decide({"sequence": 2, "expert": 1}, {"tensor": 1, "sequence": 1, "expert": 1}) is None  # (dense: same)
