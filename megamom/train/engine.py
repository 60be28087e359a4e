"""The DeepSpeed engine of a run: ZeRO config, optimizer, schedule, and the safe checkpoint loader."""
from __future__ import annotations

import torch

from ..config import Config
from . import checkpoint as ckpt
from .cuda_graph import capture_ready_init
from .lr_schedule import WarmupCosine
from .optim import build_deepspeed_config, build_optimizer, param_groups


def build_engine(cfg: Config, model: torch.nn.Module, batching, precision: str, device: torch.device, mpu=None,
                 load_universal: bool = False):
    """-> (engine, lr scheduler). mpu: the topology's DeepSpeed adapter under tensor parallelism
    (ZeRO then works over the data group; megamom.parallel.topology). With CUDA graphs the engine is
    built on a side stream: built on the default stream, ZeRO-1/2's backward failed to capture
    (megamom/train/cuda_graph.py)."""
    import deepspeed
    t = cfg.train
    ds_config = build_deepspeed_config(cfg, batching, precision)
    if load_universal:  # the checkpoint to resume is in DeepSpeed's universal form (another layout)
        ds_config["checkpoint"] = {"load_universal": True}
    from ..parallel.expert_parallel import register_expert_groups
    register_expert_groups(model)  # (expert parallelism: DeepSpeed's MoE groups)
    groups = param_groups(model, t.weight_decay)
    optimizer = None if t.offload_optimizer else build_optimizer(groups, t, precision)

    def schedule(opt):
        return WarmupCosine(opt, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)

    with capture_ready_init(t.cuda_graph and device.type == "cuda"):
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                                       lr_scheduler=schedule, config=ds_config, mpu=mpu,
                                                       dist_init_required=False)
    if t.compile:
        engine.compile()
    ckpt.install_safe_loader(engine)  # DeepSpeed's files read with torch.load(weights_only=True)
    return engine, scheduler
