"""The MoM authors' released checkpoints (OpenSparseLLMs/MoM, `mom_gated_deltanet`, the layout of
the Hugging Face hub's linear-moe-hub/MoM-Gated-Deltanet-340M and -1.3B) -> megamom, read-only.

Their layout is flash-linear-attention's `mom` one (convert/fla_format.py) but for: model_type
`mom_gated_deltanet` and its config keys (`num_memories` / `single_kv_proj`, spelled `num_experts` /
`single_expert` before the authors renamed them; `use_gate` for the output gate; their defaults
where a key is absent); the MLP's gate and up projections fused in one `gate_proj` [2 I, d] (gate
rows first: `gate, y = gate_proj(x).chunk(2, -1)`); a per-head `attn.D` that their forward never
reads (dropped). What their code computes differently (docs/fidelity.md): a routed memory keeps at
most capacity x T tokens of a sequence (the most recent; megamom is dropless), which drops nothing at
their released capacity 1.0; their chunk mode casts the decay to bf16."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from . import fla_format
from .errors import ConvertError

MODEL_TYPE = "mom_gated_deltanet"
# MomGatedDeltaNetConfig's defaults (mom_naive/models/mom_gated_deltanet/configuration_mom_gated_deltanet.py)
DEFAULTS = dict(hidden_size=2048, expand_v=2, use_gate=True, use_short_conv=True, conv_size=4, head_dim=256,
                num_heads=6, max_position_embeddings=2048, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
                num_hidden_layers=21, norm_first=False, norm_eps=1e-6, attn=None, vocab_size=32000,
                tie_word_embeddings=False, initializer_range=0.02, num_memories=8, topk=2, capacity=1.0,
                aux_loss_scale=0.01, shared_mem=False, single_kv_proj=False)
RENAMED = {"num_experts": "num_memories", "single_expert": "single_kv_proj"}  # the authors' first spellings


def paper_config(fc: dict) -> dict:
    """The authors' config.json with their defaults filled in and today's key names."""
    if fc.get("model_type") != MODEL_TYPE:
        raise ConvertError(f"model_type {fc.get('model_type')!r} is not the MoM authors' {MODEL_TYPE!r}")
    values = dict(DEFAULTS)
    for key, value in fc.items():
        values[RENAMED.get(key, key)] = value
    return values


def from_paper_config(fc: dict) -> tuple[ModelConfig, dict]:
    """(megamom ModelConfig, the equivalent fla `mom` config) of the authors' config.json."""
    pc = paper_config(fc)
    if pc.get("norm_first"):
        raise ConvertError("norm_first=true (a norm inside the memory layer) is not in megamom's MoM layer: this "
                           "checkpoint cannot be converted")
    fla = {k: v for k, v in pc.items() if k not in ("use_gate", "norm_first", "capacity")}
    fla.update(model_type=fla_format.MODEL_TYPE, use_output_gate=bool(pc["use_gate"]))
    return fla_format.from_fla_config(fla), fla


def from_paper_state_dict(sd: dict, cfg: ModelConfig, fc: dict) -> dict:
    """The authors' tensors -> megamom names: the fused MLP split into gate and up, `D` dropped, the
    rest as fla's (convert/fla_format.py)."""
    out = {}
    for name, t in sd.items():
        if name.endswith(".attn.D"):
            continue
        if name.endswith(".mlp.gate_proj.weight"):
            if t.shape[0] != 2 * cfg.mlp_hidden_size:
                raise ConvertError(f"{name} has {t.shape[0]} rows; the authors' fused MLP has 2 x intermediate "
                                   f"size = {2 * cfg.mlp_hidden_size} (gate rows, then up rows)")
            out[name], out[name.replace("gate_proj", "up_proj")] = t.chunk(2, 0)
            continue
        out[name] = t
    memories = {int(k.split(".")[5]) for k in out if ".attn.k_proj." in k and k.split(".")[5].isdigit()}
    if memories and len(memories) != cfg.num_memories:
        raise ConvertError(f"the checkpoint holds {len(memories)} routed memories per layer (attn.k_proj.0 .. "
                           f"{max(memories)}) but its config says num_memories={cfg.num_memories}")
    return fla_format.from_fla_state_dict(out, cfg, fc)


def to_paper_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """megamom tensors in the authors' layout (tests write synthetic checkpoints of theirs with it)."""
    out = {}
    for name, t in fla_format.to_fla_state_dict(sd, cfg).items():
        if name.endswith(".mlp.up_proj.weight"):
            continue
        if name.endswith(".mlp.gate_proj.weight"):
            t = torch.cat([t, sd[name.replace("gate_proj", "up_proj")]], 0)
        out[name] = t
        if name.endswith(".attn.A_log"):
            out[name[: -len("A_log")] + "D"] = torch.ones_like(t)
    return out
