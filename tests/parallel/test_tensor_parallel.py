"""Tensor parallelism equals one process: TP = 2 and 4 (and DP 2 x TP 2) against the whole model in
float64, for the loss, the logits, every gradient, and the parameters after one DeepSpeed step."""
import pytest

import cases_tensor as cases


@pytest.mark.parametrize("name", list(cases.MODELS))
@pytest.mark.parametrize("world,tensor,data", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_forward_and_gradients_equal_one_process(pools, name, world, tensor, data):
    # (4 key / value heads at TP=4: each rank holds whole ones)
    over = {"num_kv_heads": 4} if name == "transformer" and tensor == 4 else None
    results = pools(world).run(cases.forward_and_grads, name, tensor, data, True, over)
    # the tensor ranks of one data rank computed the same loss
    assert len({round(r["loss"], 12) for r in results[:tensor]}) == 1


# (ZeRO-0 reduces float64 gradients over a data group of more than one rank nowhere: DeepSpeed's
# buffered all-reduce takes 16- and 32-bit floats only)
@pytest.mark.parametrize("zero_stage,world,tensor,data", [(0, 2, 2, 1), (0, 4, 4, 1), (1, 2, 2, 1), (1, 4, 2, 2),
                                                          (2, 2, 2, 1), (2, 4, 2, 2)])
def test_one_deepspeed_step_equals_one_process(pools, zero_stage, world, tensor, data):
    pools(world).run(cases.deepspeed_step, "mom_gated_delta", tensor, data, zero_stage, 0.05)


@pytest.mark.parametrize("name", list(cases.MODELS))
@pytest.mark.parametrize("world,tensor,data", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_tensor_sequence_parallelism_equals_one_process(pools, name, world, tensor, data):
    over = {"num_kv_heads": 4} if name == "transformer" and tensor == 4 else None
    pools(world).run(cases.forward_and_grads, name, tensor, data, True, over, False, True)


@pytest.mark.parametrize("name", ["mom_gated_delta", "transformer"])
def test_activation_checkpointing_under_tensor_parallelism(pools, name):
    pools(2).run(cases.forward_and_grads, name, 2, 1, True, None, True)


PAPER_VARIANTS = {  # the authors' GLA and linear-attention memories (docs/fidelity.md)
    "gla": {"update_rule": "gla", "gla_gate_rank": 4, "use_short_conv": False, "qk_norm": "none",
            "qkv_activation": "none", "per_memory_conv": False},
    "linear_attn": {"update_rule": "linear_attn", "feature_map": "hadamard", "use_short_conv": False,
                    "qk_norm": "none", "qkv_activation": "none", "use_output_gate": False, "per_memory_conv": False},
}


@pytest.mark.parametrize("variant", list(PAPER_VARIANTS))
@pytest.mark.parametrize("tensor_sequence_parallel", [False, True])
def test_the_papers_gla_and_linear_attention(pools, variant, tensor_sequence_parallel):
    # the low-rank decay gate's down projection and the feature maps serve every head: their
    # gradients are summed over the tensor group
    pools(4).run(cases.forward_and_grads, "mom_gla", 2, 2, True, PAPER_VARIANTS[variant], False,
                 tensor_sequence_parallel)


def test_no_segments_and_untied_output_layer(pools):
    pools(2).run(cases.forward_and_grads, "mom_gated_delta", 2, 1, False, {"tie_word_embeddings": False})


@pytest.mark.parametrize("zero_stage,world,tensor", [(0, 2, 2), (1, 4, 2), (2, 4, 4)])
def test_checkpoint_consolidates_to_the_whole_model_and_reshards(pools, tmp_path, zero_stage, world, tensor):
    paths = pools(world).run(cases.save_consolidate_reshard, "mom_gated_delta", tensor, zero_stage, str(tmp_path))
    assert len(set(paths)) == 1


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_nonfinite_gradient_in_one_shard_skips_the_step_on_every_rank(pools, zero_stage):
    assert all(pools(2).run(cases.nonfinite_shard_skips_everywhere, zero_stage))


@pytest.mark.parametrize("world,tensor_from,tensor_to", [(2, 2, 1), (2, 2, 2), (2, 1, 1), (4, 2, 4), (4, 4, 2)])
def test_a_checkpoint_resumes_at_another_tensor_size(pools, tmp_path, world, tensor_from, tensor_to):
    assert all(pools(world).run(cases.reshard_resume, "mom_gated_delta", tensor_from, tensor_to, str(tmp_path)))
