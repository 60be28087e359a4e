"""Sequence parallelism equals one process: every sequence split over SP = 2 and 4 ranks (with data
parallelism around them and tensor parallelism inside), against the whole model in float64, for the
loss, the logits, the router losses and every gradient, and the parameters after one DeepSpeed step.
The micro-batch's row 0 has documents starting at random and (where asked) exactly at slice edges,
row 1 one document crossing every slice; chunk size 8, so T=24 puts slice edges mid-chunk and T=32
on chunk boundaries."""
import pytest

import cases_sequence as cases


@pytest.mark.parametrize("name", list(cases.RULES))
@pytest.mark.parametrize("world,T,edges", [(2, 24, ()), (4, 32, (8, 24))])
def test_every_rule(pools, name, world, T, edges):
    pools(world).run(cases.forward_and_grads, name, world, 1, None, True, T, edges)


@pytest.mark.parametrize("world,T,edges", [(2, 32, (16,)), (4, 24, (6, 12, 18))])
@pytest.mark.parametrize("name", ["mom_gated_delta", "transformer"])
def test_documents_starting_at_slice_edges(pools, world, T, edges, name):
    pools(world).run(cases.forward_and_grads, name, world, 1, None, True, T, edges)


@pytest.mark.parametrize("name", ["mom_gated_delta", "mom_gla", "transformer"])
def test_without_documents(pools, name):
    pools(4).run(cases.forward_and_grads, name, 4, 1, None, False, 24)


@pytest.mark.parametrize("over", [{"conv_size": 2}, {"use_short_conv": False}, {"per_memory_conv": True},
                                  {"num_memories": 8, "topk": 1},
                                  {"update_rule": "gla", "gla_gate_rank": 4, "use_short_conv": False,
                                   "qkv_activation": "none", "qk_norm": "none"}])
def test_convs_and_memories_with_few_rows(pools, over):
    # 8 memories top-1 over 6-token slices: most memories have no row in most slices, and a conv's
    # halo comes from several ranks back
    pools(4).run(cases.forward_and_grads, "mom_gated_delta", 4, 1, over, True, 24)


def test_the_papers_balance_loss(pools):
    # per-sequence counts summed over the slices of each sequence
    pools(4).run(cases.forward_and_grads, "mom_gated_delta", 4, 1, {"aux_loss_form": "paper"}, True, 24)


@pytest.mark.parametrize("shared", [True, False])
def test_every_token_routed_to_one_memory(pools, shared):
    pools(2).run(cases.forward_and_grads, "mom_gated_delta", 2, 1, {"topk": 1, "shared_mem": shared}, True, 24,
                 (), False, False, 0)


@pytest.mark.parametrize("a_log", [6.0, -12.0])
def test_decays_near_zero_and_one(pools, a_log):
    # A_log 6: decays ~e^-280 per token (each token forgets the state); -12: ~1 - 4e-6 (nothing forgets)
    pools(4).run(cases.forward_and_grads, "mom_gated_delta", 4, 1, None, True, 32, (8, 24), False, False, None, a_log)


def test_data_and_sequence_parallelism(pools):
    pools(4).run(cases.forward_and_grads, "mom_gated_delta", 2)  # DP 2 x SP 2


@pytest.mark.parametrize("name", ["mom_gated_delta", "transformer", "gla"])
@pytest.mark.parametrize("tensor_sequence_parallel", [False, True])
def test_tensor_and_sequence_parallelism(pools, name, tensor_sequence_parallel):
    pools(4).run(cases.forward_and_grads, name, 2, 2, None, True, 24, (), tensor_sequence_parallel)


def test_activation_checkpointing(pools):
    pools(2).run(cases.forward_and_grads, "mom_gated_delta", 2, 1, None, True, 24, (), False, True)


@pytest.mark.parametrize("world,sequence,tensor,zero_stage,name", [
    (2, 2, 1, 1, "mom_gated_delta"), (2, 2, 1, 2, "mom_gated_delta"), (4, 2, 1, 2, "mom_gated_delta"),
    (4, 4, 1, 1, "gated_deltanet"), (4, 2, 2, 2, "mom_gated_delta"), (2, 2, 1, 2, "transformer")])
def test_one_deepspeed_step_equals_one_process(pools, world, sequence, tensor, zero_stage, name):
    pools(world).run(cases.deepspeed_step, name, sequence, tensor, zero_stage)


@pytest.mark.parametrize("world,sequence,tensor,zero_stage", [(2, 2, 1, 1), (4, 2, 2, 2)])
def test_checkpoint_resumes_exactly_and_consolidates(pools, tmp_path, world, sequence, tensor, zero_stage):
    paths = pools(world).run(cases.save_resume_consolidate, sequence, tensor, str(tmp_path), zero_stage)
    assert len(set(paths)) == 1


@pytest.mark.parametrize("over,force_memory", [
    (None, None), ({"shared_mem": False, "topk": 1}, None), ({"update_rule": "delta"}, None),
    ({"update_rule": "gla", "per_memory_conv": True}, None), ({"num_memories": 8, "topk": 1}, None),
    ({"topk": 1, "shared_mem": False}, 0), ({"aux_loss_form": "paper"}, None)])
def test_sequence_and_expert_parallelism(pools, over, force_memory):
    # DP 2 x SP 2, the memories over expert groups of the 2 data ranks of each slice; with every
    # token sent to memory 0 (top-1, no shared memory) expert rank 1 receives no row and still
    # passes the states of the documents crossing its slice
    pools(4).run(cases.forward_and_grads, "mom_gated_delta", 2, 1, over, True, 24, (), False, False, force_memory,
                 None, 2)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_one_deepspeed_step_with_sequence_and_expert_parallelism(pools, zero_stage):
    pools(4).run(cases.deepspeed_step, "mom_gated_delta", 2, 1, zero_stage, 0.05, 2)


def test_checkpoint_resumes_exactly_and_consolidates_with_sequence_and_expert_parallelism(pools, tmp_path):
    paths = pools(4).run(cases.save_resume_consolidate, 2, 1, str(tmp_path), 2, 2)
    assert len(set(paths)) == 1


def test_eight_ranks_sequence_and_expert_parallelism_consolidates(pools, tmp_path):
    # DP 4 x SP 2, EP 2: a memory stack's ZeRO partitions are spread over data x sequence ranks of
    # both sequence indices (expert-data groups {0,1,4,5} and {2,3,6,7}); consolidation joins them
    paths = pools(8).run(cases.save_resume_consolidate, 2, 1, str(tmp_path), 2, 2)
    assert len(set(paths)) == 1
