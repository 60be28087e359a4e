"""Parameter and FLOP accounting (for logs and MFU).

FLOPs count useful model work, not what an implementation happens to compute: a token pays for
the memories it is routed to (top-k + shared), the router, the MLP, the LM head and its share of
the chunked scan. Backward = 2x forward, so training FLOPs per token = 3x forward."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from megamom.kernels import get_rule


@dataclass
class ParamCount:
    total: int  # unique parameters (tied embeddings counted once)
    embedding: int
    activated: int  # parameters a token actually uses
    per_memory: int  # parameters of one memory in one layer (mom / linear)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _per_memory_params(cfg: ModelConfig, include_conv: bool = True) -> int:
    """Parameters one memory adds (its k/v/beta/decay projections, and its conv if per memory)."""
    rule = get_rule(cfg.update_rule)
    d, H, Kd, Vd = cfg.hidden_size, cfg.num_heads, cfg.key_dim, cfg.value_dim
    n = (Kd + Vd) * d
    n += H * d if rule.delta else 0
    if rule.decay == "vector" and cfg.gla_gate_rank:  # the low-rank gate: W_down, W_up and the bias
        n += cfg.gla_gate_rank * (d + Kd) + Kd
    else:
        n += {"scalar": H, "vector": Kd, None: 0}[rule.decay] * d
    if include_conv and cfg.use_short_conv and cfg.per_memory_conv:
        n += (2 * Kd + Vd) * cfg.conv_size
    return n


def count_parameters(model) -> ParamCount:
    cfg: ModelConfig = model.config
    total = sum(p.numel() for p in model.parameters())
    emb = model.model.embeddings.weight.numel()
    per_mem = 0 if cfg.arch == "transformer" else _per_memory_params(cfg)
    unused = cfg.num_layers * (cfg.num_memories - cfg.topk) * per_mem if cfg.arch == "mom" else 0
    return ParamCount(total=total, embedding=emb, activated=total - unused, per_memory=per_mem)


def scan_flops_per_row(cfg: ModelConfig) -> float:
    """Forward FLOPs of the chunked scan per (token, memory) row over all heads: intra-chunk
    K K^T and Q K^T (2CK each), the WY triangular solve (C(V+K), delta rules only), the
    intra-chunk output (2CV), state reads Q S and W S and the state update (2KV each)."""
    rule = get_rule(cfg.update_rule)
    C, K, V = cfg.chunk_size, cfg.head_dim, cfg.head_v_dim
    per_head = 2 * C * K + 2 * C * V + 4 * K * V
    if rule.delta:
        per_head += 2 * C * K + C * (V + K) + 2 * K * V
    return float(per_head * cfg.num_heads)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (forward, or forward + backward when training)."""
    d, L = cfg.hidden_size, cfg.num_layers
    mlp = 3 * d * cfg.mlp_hidden_size
    if cfg.arch == "transformer":
        kv = cfg.num_kv_heads or cfg.num_heads
        proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * kv)
        mixer = 2 * proj + 2 * cfg.num_heads * cfg.head_dim * seq_len  # causal QK^T + AV: 2 * 2HD * T/2
    else:
        rows = (cfg.topk + int(cfg.shared_mem)) if cfg.arch == "mom" else 1
        shared_proj = d * cfg.key_dim + d * cfg.value_dim * (2 if cfg.use_output_gate else 1)  # q, g, o
        router = d * cfg.num_memories if cfg.arch == "mom" else 0
        # matmul FLOPs of the projections; the conv (per memory or not) is counted once, below
        mixer = (2 * (shared_proj + router + rows * _per_memory_params(cfg, include_conv=False))
                 + rows * scan_flops_per_row(cfg))
        if cfg.use_short_conv:
            mixer += rows * 2 * cfg.conv_size * (2 * cfg.key_dim + cfg.value_dim)
    forward = L * (mixer + 2 * mlp) + 2 * d * cfg.vocab_size
    return 3 * forward if training else forward
