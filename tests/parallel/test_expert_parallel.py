"""Expert parallelism equals one process: memories split over EP = 2 and 4 ranks (with data
parallelism around them, and tensor parallelism inside), against the whole model in float64, for
the loss, the logits, the router losses, every gradient, and the parameters after one DeepSpeed step."""
import pytest

import cases_expert as cases


@pytest.mark.parametrize("world,expert,memories,topk", [(2, 2, 4, 2), (2, 2, 4, 1), (4, 4, 8, 2), (4, 2, 8, 1),
                                                        (4, 4, 4, 2)])
@pytest.mark.parametrize("shared", [True, False])
def test_forward_and_gradients_equal_one_process(pools, world, expert, memories, topk, shared):
    over = {"num_memories": memories, "topk": topk, "shared_mem": shared}
    exchanges = pools(world).run(cases.forward_and_grads, expert, 1, over)
    # rows did cross ranks: each rank sent some to every other expert rank
    assert all(sum(e["sent"]) - e["sent"][i % expert] > 0 for i, e in enumerate(exchanges))


@pytest.mark.parametrize("shared", [True, False])
def test_every_token_routed_to_one_memory(pools, shared):
    # memory 0 (expert rank 0) gets every token's first choice; top-1: expert rank 1 receives nothing
    over = {"topk": 1, "shared_mem": shared}
    exchanges = pools(2).run(cases.forward_and_grads, 2, 1, over, True, 0)
    assert all(e["sent"][1] == 0 for e in exchanges)
    assert exchanges[1]["received"] == [0, 0]


@pytest.mark.parametrize("name", [{"update_rule": "gla", "per_memory_conv": True}, {"update_rule": "delta"},
                                  {"update_rule": "gla", "gla_gate_rank": 4, "use_short_conv": False,
                                   "qkv_activation": "none"},
                                  {"update_rule": "linear_attn", "feature_map": "hadamard", "use_short_conv": False,
                                   "qkv_activation": "none", "use_output_gate": False},
                                  {"use_short_conv": False}, {"per_memory_conv": False}])
def test_other_update_rules_and_convs(pools, name):
    pools(2).run(cases.forward_and_grads, 2, 1, name)


def test_without_documents(pools):
    pools(2).run(cases.forward_and_grads, 2, 1, None, False)


@pytest.mark.parametrize("over,tensor_sequence_parallel", [(None, False), ({"shared_mem": False, "topk": 1}, False),
                                                             (None, True)])
def test_expert_and_tensor_parallelism(pools, over, tensor_sequence_parallel):
    # 4 ranks: TP 2 inside, EP 2 over the 2 data ranks of each tensor index
    pools(4).run(cases.forward_and_grads, 2, 2, over, True, None, 24, tensor_sequence_parallel)


@pytest.mark.parametrize("zero_stage,world,expert,tensor", [(1, 2, 2, 1), (2, 2, 2, 1), (1, 4, 2, 1), (2, 4, 2, 1),
                                                            (2, 4, 4, 1), (1, 4, 2, 2), (2, 4, 2, 2)])
def test_one_deepspeed_step_equals_one_process(pools, zero_stage, world, expert, tensor):
    over = {"num_memories": 8} if expert == 4 else None
    pools(world).run(cases.deepspeed_step, expert, tensor, zero_stage, 0.05, over)


@pytest.mark.parametrize("world,expert,tensor,over,zero_stage", [(2, 2, 1, None, 1),
                                                                 (4, 2, 1, {"per_memory_conv": True}, 2),
                                                                 (4, 2, 2, None, 2)])
def test_checkpoint_resumes_exactly_and_consolidates(pools, tmp_path, world, expert, tensor, over, zero_stage):
    paths = pools(world).run(cases.save_resume_consolidate, expert, tensor, str(tmp_path), over, zero_stage)
    assert len(set(paths)) == 1


@pytest.mark.parametrize("world,expert_from,expert_to,tensor,over", [(2, 2, 1, 1, None), (2, 1, 2, 1, None),
                                                                     (4, 2, 4, 1, {"num_memories": 8}),
                                                                     (4, 2, 1, 2, {"per_memory_conv": True})])
def test_a_checkpoint_resumes_at_another_expert_size(pools, tmp_path, world, expert_from, expert_to, tensor, over):
    assert all(pools(world).run(cases.reshard_resume, expert_from, expert_to, tensor, str(tmp_path), over))


def test_activation_checkpointing_under_expert_parallelism(pools):
    pools(2).run(cases.forward_and_grads, 2, 1, None, True, None, 24, False, True)
