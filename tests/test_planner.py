"""`megamom plan`: the per-GPU memory of parameters / gradients / optimizer state by ZeRO stage,
the activation estimate against mom-340m's measured peaks, communication, and the layouts that
fit, best first; model.scan_keep=auto picks by it."""
import subprocess
from pathlib import Path

import pytest

from megamom.config import load_config
from megamom.parallel import planner

GiB = 2 ** 30


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cfg_of(name, *over):
    return load_config(str(CONFIGS / name), list(over))


def test_states_per_zero_stage_are_divided_over_the_data_group():
    n, dp = 1000, 4
    assert planner.state_bytes(n, dp, 0, "bf16") == (2000, 2000, 16000)
    assert planner.state_bytes(n, dp, 1, "bf16") == (2000, 2000, 4000)
    assert planner.state_bytes(n, dp, 2, "bf16") == (2000, 500, 4000)
    assert planner.state_bytes(n, dp, 3, "bf16") == (500, 500, 4000)
    assert planner.state_bytes(n, 1, 1, "fp32") == (4000, 4000, 8000)


def test_tensor_parallel_parameters_follow_the_sharding_plan():
    cfg = cfg_of("mom-340m.yaml")
    total, local1 = planner.parameter_counts(cfg, 1)
    _, local2 = planner.parameter_counts(cfg, 2)
    assert local1 == total
    # everything but the norms, the routers and the memories' output norms is split in two
    m = cfg.model
    replicated = m.num_layers * (2 * m.hidden_size + m.num_memories * m.hidden_size + m.head_v_dim) + m.hidden_size
    assert local2 == (total - replicated) // 2 + replicated


@pytest.mark.parametrize("batch,T,keep,measured", [(8, 2048, "none", 34.7), (8, 2048, "all", 47.4),
                                                   (1, 32768, "none", 68.4), (1, 32768, "all", 92.7)])
def test_activation_estimate_within_20_percent_of_measured_peaks(batch, T, keep, measured):
    """benchmarks/RESULTS.md: mom-340m, one GPU, CUDA graphs (H200 peaks of bench_model.py, whose
    optimizer is torch's AdamW over float32 weights: the planner's fp32 state layout)."""
    cfg = cfg_of("mom-340m.yaml", f"train.micro_batch_size={batch}", f"data.seq_len={T}")
    _, local = planner.parameter_counts(cfg, 1)
    estimate = (sum(planner.state_bytes(local, 1, 0, "fp32"))
                + batch * T * planner.activation_bytes_per_token(cfg, 1, False, keep, False)) / GiB
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)


def test_scan_keep_auto_takes_the_most_that_fits():
    cfg = cfg_of("mom-340m.yaml", "train.micro_batch_size=1", "data.seq_len=32768")
    assert planner.choose_scan_keep(cfg, 1, 1, 141 * GiB, "bf16") == "all"  # an H200
    assert planner.choose_scan_keep(cfg, 1, 1, 80 * GiB, "bf16") == "none"  # an H100: "all" runs out there
    cfg = cfg_of("mom-340m.yaml")
    assert planner.choose_scan_keep(cfg, 1, 1, 80 * GiB, "bf16") == "all"  # B8 T2048 on an H100


def test_layouts_best_first_and_what_less_memory_costs():
    cfg = cfg_of("mom-1.3b.yaml")
    plans = planner.plan_layouts(cfg, 8, 80)
    # (4 heads: no TP=8)
    assert {(e.data, e.sequence, e.tensor) for e in plans} == {(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1),
                                                               (4, 1, 2), (2, 2, 2), (1, 4, 2), (2, 1, 4), (1, 2, 4)}
    fitting = [e for e in plans if e.total <= planner.HEADROOM * 80 * GiB]
    assert fitting and plans[: len(fitting)] == fitting  # those that fit come first
    tp2 = [e for e in plans if e.tensor == 2 and e.sequence == 1 and e.zero == 1 and e.expert == 1][0]
    tp1 = [e for e in plans if e.tensor == 1 and e.sequence == 1 and e.zero == 1 and e.expert == 1][0]
    assert tp2.params == pytest.approx(tp1.params / 2, rel=0.02)
    assert tp1.tensor_comm == 0 and tp2.tensor_comm > 0 and tp2.data_comm < tp1.data_comm


def test_sequence_parallelism_trains_longer_contexts():
    cfg = cfg_of("mom-340m.yaml")
    plans = {(e.sequence, e.tensor, e.zero): e for e in planner.plan_layouts(cfg, 8, 80) if e.expert == 1}
    longest = [plans[(s, 1, 2)].longest_context for s in (1, 2, 4, 8)]
    assert all(b > 1.7 * a for a, b in zip(longest, longest[1:])), longest  # nearly linear in SP
    assert longest[0] >= 64 * 1024 and all(n % 1024 == 0 for n in longest)
    # a sequence rank holds half the activations of the same micro-batch (plus every rank's memory
    # summaries per sample), and the optimizer state is partitioned over data x sequence: the same as
    # over the data ranks without SP
    sp2, dp = plans[(2, 1, 2)], plans[(1, 1, 2)]
    assert sp2.optimizer == pytest.approx(dp.optimizer)
    assert (sp2.checkpointing, sp2.scan_keep) == (dp.checkpointing, dp.scan_keep)
    per_token = planner.activation_bytes_per_token(cfg, 1, False, dp.scan_keep, dp.checkpointing)
    extra = planner.sequence_parallel_bytes(cfg, 1, 2, cfg.data.seq_len, dp.checkpointing)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    assert sp2.activations == pytest.approx(tokens / 2 * per_token + cfg.train.micro_batch_size * extra)
    assert sp2.activations < dp.activations
    # Transformer++ keeps the whole sequence's keys and values: its longest context grows less
    t = {(e.sequence, e.zero): e for e in planner.plan_layouts(cfg_of("transformer-340m.yaml"), 8, 80)
         if e.tensor == 1}
    assert t[(8, 2)].longest_context / t[(1, 2)].longest_context < longest[3] / longest[0]


def test_expert_parallelism_splits_the_memories_weights_not_the_optimizer_state():
    cfg = cfg_of("mom-340m.yaml", "model.num_memories=8")
    plans = {(e.data, e.sequence, e.tensor, e.expert, e.zero): e for e in planner.plan_layouts(cfg, 8, 80)}
    assert {k[3] for k in plans} == {1, 2, 4, 8}
    assert all(k[4] in (1, 2) for k in plans if k[3] > 1)  # (ZeRO-1/2 only with experts)
    ep1, ep4 = plans[(8, 1, 1, 1, 1)], plans[(8, 1, 1, 4, 1)]
    dense, stacks = planner.local_parameters(cfg, 1, 1)
    assert planner.local_parameters(cfg, 1, 4) == (dense, stacks // 4)
    assert ep4.params == pytest.approx(ep1.params - 2 * stacks * 3 / 4)  # bf16 module weights of 3/4 of the memories
    assert ep4.optimizer == pytest.approx(ep1.optimizer)  # partitioned over data / EP instead: the same share
    assert ep1.expert_comm == 0 and ep4.expert_comm > 0
    # with SP an expert group is data ranks of one slice: EP divides DP
    assert {(k[0], k[3]) for k in plans if k[1] == 2 and k[2] == 1} == {(4, 1), (4, 2), (4, 4)}
    assert all(e.expert == 1 for e in planner.plan_layouts(cfg_of("gdn-340m.yaml"), 8, 80))


def test_cli_prints_the_table_and_checks_its_input(megamom_exe):
    r = subprocess.run([megamom_exe, "plan", "--config", str(CONFIGS / "mom-1.3b.yaml"), "--gpus", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("DP")]
    assert rows and rows[0].endswith("yes") and any("DP4 x SP1 x TP2" in line for line in rows)
    assert any("DP1 x SP8 x TP1" in line for line in rows)
    r = subprocess.run([megamom_exe, "plan", "--gpus", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--gpus 0" in r.stderr


@pytest.mark.parametrize("config,batch,keep,measured", [
    ("mom-340m", 8, "all", 50.7), ("mom-340m", 4, "all", 29.6), ("transformer-340m", 8, "none", 18.3),
    ("transformer-340m", 4, "none", 12.0), ("mom-1.3b", 4, "none", 42.8), ("mom-1.3b", 2, "none", 34.3)])
def test_estimate_within_20_percent_of_the_trainers_engine(config, batch, keep, measured):
    """benchmarks/RESULTS.md: benchmarks/bench_memory.py on one H100 (DeepSpeed ZeRO-1, bf16, T=2048)."""
    cfg = cfg_of(f"{config}.yaml", f"train.micro_batch_size={batch}", "data.seq_len=2048")
    _, local = planner.parameter_counts(cfg, 1)
    estimate = (sum(planner.state_bytes(local, 1, 1, "bf16"))
                + batch * 2048 * planner.activation_bytes_per_token(cfg, 1, False, keep, False)) / GiB
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)
