"""Optimizer, parameter groups and the DeepSpeed config."""
from __future__ import annotations

import torch

from ..config import Config


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings, A_log and dt_bias."""
    no_decay_names = model.no_weight_decay_names()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in no_decay_names else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        # expert parallelism: the memories split over expert ranks go to groups of their own, which
        # ZeRO reduces and partitions over the expert-data group (megamom.parallel.expert_parallel)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


class AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that skips its update when a gradient is non-finite, for the one setup where DeepSpeed
    does not: see `needs_nonfinite_guard`. The engine reads `overflow` to count the step as skipped
    (and not advance the lr schedule). The check costs a device-to-host sync every step. Over
    several ranks the verdict is all-reduced: a tensor-parallel rank holds its shard of the
    gradients only, and every rank must skip the same steps."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = self.param_groups[0]["params"][0].device
        bad = (torch.stack([~g.isfinite().all() for g in grads]).any().float() if grads
               else torch.zeros((), device=device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.overflow = bool(bad)
        if self.overflow:
            return None
        return super().step(closure)


def needs_nonfinite_guard(zero_stage: int, precision: str) -> bool:
    """Whether DeepSpeed (0.19) would step the optimizer through a non-finite gradient.

    - ZeRO 1/2 (stage_1_and_2.py) and ZeRO 3 (stage3.py) compute the global grad norm every step
      (zero_optimization.compute_grad_norm, default on, not turned off here) and mark the step as an
      overflow when it is inf/NaN, in fp32, bf16 and fp16 alike (fp16 also checks the gradients).
    - ZeRO 0 with fp16 or bf16 wraps the optimizer in FP16_Optimizer / FP16_UnfusedOptimizer
      (engine._do_optimizer_sanity_check: FP16 / DDP_BFLOAT16), whose step() runs CheckOverflow and
      skips.
    - ZeRO 0 with fp32 steps the client optimizer directly, so only this one needs the guard."""
    return zero_stage == 0 and precision == "fp32"


def build_optimizer(groups: list[dict], t, precision: str) -> torch.optim.Optimizer:
    cls = AdamWSkipNonFinite if needs_nonfinite_guard(t.zero_stage, precision) else torch.optim.AdamW
    return cls(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)


def build_deepspeed_config(cfg: Config, batching, precision: str) -> dict:
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage > 0:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    ds = {
        "train_micro_batch_size_per_gpu": batching.micro,
        "gradient_accumulation_steps": batching.accum,
        # DeepSpeed counts sequence ranks as data ranks (Topology.mpu): its batch counts their slices
        "train_batch_size": batching.global_batch * batching.sequence,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if t.offload_optimizer:
        if t.zero_stage == 0:
            from ..config import ConfigError
            raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1")
        # Offload runs DeepSpeed's CPU Adam (JIT-built on first use), configured here.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2],
                                                       "eps": t.adam_eps, "weight_decay": t.weight_decay}}
    return ds
