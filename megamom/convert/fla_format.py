"""flash-linear-attention's `mom` checkpoint format (model_type "mom", MomForCausalLM): config keys
and tensor names (see docs/convert.md and the MoM spec), both directions.

What maps: a MoM model with the gated delta rule, one short convolution shared by all memories,
L2-normalised q/k. megamom stacks the routed memories' projections [E, out, d] and keeps the
shared memory's apart (`shared_k_proj`, ...); fla keeps one Linear per routed memory (`k_proj.{m}`)
and `shared_k/v/b/a`. megamom's router is fla's `gate`; conv weights [1, C, W] are fla's Conv1d
weights [C, 1, W].

megamom-only settings that do not change what the model computes (router-loss coefficients,
chunk size, kernel choice, ...) travel in config.json under "megamom_extra", so an fla export
converts back to exactly the same megamom config."""
from __future__ import annotations

import dataclasses

import torch

from ..config import IMPLEMENTATION_ONLY_KEYS, ConfigError, ModelConfig, model_config_from_dict
from .errors import ConvertError

MODEL_TYPE = "mom"
ARCHITECTURE = "MomForCausalLM"
EXTRA_KEY = "megamom_extra"
_PER_MEMORY = (("k_proj", "k_proj", "shared_k"), ("v_proj", "v_proj", "shared_v"),
               ("b_proj", "b_proj", "shared_b"), ("a_proj", "a_proj", "shared_a"))
_CONVS = (("q_conv", "q_conv1d"), ("k_conv", "k_conv1d"), ("v_conv", "v_conv1d"))
# ModelConfig fields fla has no key for; they do not change the function (see module docstring).
_NOT_IN_FLA = ("aux_loss_coef", "aux_loss_form", "rescale_residual_init", "z_loss_coef", "chunk_size",
               "num_kv_heads", "rope_theta", "gla_gate_normalizer", "gla_gate_rank",
               "qkv_activation") + IMPLEMENTATION_ONLY_KEYS


def refusal_reasons(cfg: ModelConfig) -> list[str]:
    """Why a megamom model cannot be written as fla's `mom` (empty list: it can)."""
    reasons = []
    if cfg.arch != "mom":
        reasons.append(f"model.arch={cfg.arch!r}: fla's `mom` format holds Mixture-of-Memories models only")
    if cfg.update_rule != "gated_delta":
        reasons.append(f"model.update_rule={cfg.update_rule!r}: fla's MoM layer implements the gated delta rule only")
    if cfg.per_memory_conv:
        reasons.append("model.per_memory_conv=true: fla's MoM layer shares one short convolution between all memories")
    if not cfg.use_short_conv:
        reasons.append("model.use_short_conv=false: fla's MoM layer always has the short convolution")
    if cfg.qk_norm != "l2":
        reasons.append(f"model.qk_norm={cfg.qk_norm!r}: fla's MoM layer always L2-normalises q and k")
    return reasons


def check_expressible(cfg: ModelConfig) -> None:
    reasons = refusal_reasons(cfg)
    if reasons:
        raise ConvertError("this model cannot be written in flash-linear-attention's `mom` format: "
                           + "; ".join(reasons) + ". Export it with --format megamom (loads with "
                           "AutoModelForCausalLM and trust_remote_code=True, no fla needed)")


def to_fla_config(cfg: ModelConfig, token_ids: dict, dtype_name: str, transformers_version: str) -> dict:
    check_expressible(cfg)
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "attn_mode": "chunk",
        "mom_backend": "gated_deltanet",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "expand_v": cfg.expand_v,
        "use_short_conv": True,
        "conv_size": cfg.conv_size,
        "use_output_gate": cfg.use_output_gate,
        "hidden_ratio": cfg.hidden_ratio,
        "intermediate_size": cfg.mlp_hidden_size,  # explicit: fla rounds hidden_ratio * d slightly differently
        "hidden_act": "swish",
        "norm_eps": cfg.norm_eps,
        "num_memories": cfg.num_memories,
        "topk": cfg.topk,
        "capacity": 1.0,
        "shared_mem": cfg.shared_mem,
        "single_kv_proj": False,
        "aux_loss_scale": cfg.aux_loss_coef,
        "use_layer_wise_balance": True,
        "attn": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        **{k: token_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "transformers_version": transformers_version,
        EXTRA_KEY: dataclasses.asdict(cfg),
    }


def _fla_intermediate_size(d: int, ratio: float) -> int:
    """fla GatedMLP's default width: int(d * ratio * 2/3) rounded up to a multiple of 256."""
    size = int(d * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def from_fla_config(fc: dict) -> ModelConfig:
    """megamom ModelConfig of an fla `mom` config.json (refusing what megamom cannot compute)."""
    if fc.get("model_type") != MODEL_TYPE:
        raise ConvertError(f"model_type {fc.get('model_type')!r} is not fla's {MODEL_TYPE!r}")
    reasons = []
    if fc.get("attn"):
        reasons.append("`attn` puts softmax-attention layers between the MoM layers (hybrid model)")
    if fc.get("attnres_block_size") is not None:
        reasons.append("`attnres_block_size` (attention residuals) is set")
    if fc.get("mom_backend", "gated_deltanet") != "gated_deltanet":
        reasons.append(f"mom_backend={fc.get('mom_backend')!r} (only gated_deltanet)")
    if not fc.get("use_short_conv", True):
        reasons.append("use_short_conv=false")
    if fc.get("hidden_act", "swish") not in ("swish", "silu"):
        reasons.append(f"hidden_act={fc.get('hidden_act')!r} (only swish)")
    expand_v = fc.get("expand_v", 1.0)
    if float(expand_v) != int(expand_v):
        reasons.append(f"expand_v={expand_v} is not an integer")
    if reasons:
        raise ConvertError("this flash-linear-attention `mom` model cannot be converted to megamom: "
                           + "; ".join(reasons))
    d = int(fc.get("hidden_size", 2048))
    ratio = fc.get("hidden_ratio") or 4
    inter = fc.get("intermediate_size") or _fla_intermediate_size(d, ratio)
    values = dict(
        arch="mom", update_rule="gated_delta", vocab_size=fc.get("vocab_size", 32000), hidden_size=d,
        num_layers=fc.get("num_hidden_layers", 24), num_heads=fc.get("num_heads", 4),
        head_dim=fc.get("head_dim", 256), expand_v=int(expand_v), num_memories=fc.get("num_memories", 4),
        topk=fc.get("topk", 2), shared_mem=bool(fc.get("shared_mem", True)), use_short_conv=True,
        conv_size=fc.get("conv_size", 4), per_memory_conv=False, use_output_gate=bool(fc.get("use_output_gate", True)),
        qk_norm="l2", hidden_ratio=ratio, intermediate_size=inter, norm_eps=fc.get("norm_eps", 1e-6),
        tie_word_embeddings=bool(fc.get("tie_word_embeddings", False)),
        max_position_embeddings=fc.get("max_position_embeddings", 2048),
        initializer_range=fc.get("initializer_range", 0.02), aux_loss_coef=fc.get("aux_loss_scale", 0.01))
    extra = fc.get(EXTRA_KEY)
    if isinstance(extra, dict):  # written by megamom: restore what fla has no key for
        values.update({k: extra[k] for k in _NOT_IN_FLA if k in extra})
        if "aux_loss_coef" not in extra:
            values["aux_loss_coef"] = fc.get("aux_loss_scale", 0.01)
        if extra.get("intermediate_size") is None and "hidden_ratio" in extra:
            derived = dataclasses.replace(ModelConfig(), hidden_size=d, hidden_ratio=extra["hidden_ratio"])
            if derived.mlp_hidden_size == inter:
                values.update(intermediate_size=None, hidden_ratio=extra["hidden_ratio"])
    try:
        return model_config_from_dict(values)
    except ConfigError as e:
        raise ConvertError(f"the flash-linear-attention config does not give a valid megamom model: {e}") from None


def to_fla_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    check_expressible(cfg)
    E = cfg.num_memories
    out = {}
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        if ".attn." not in name:
            out[name] = t
        elif leaf == "weight" and prefix.endswith(".attn.router"):
            out[prefix[: -len("router")] + "gate.weight"] = t
        elif leaf in {ours for ours, _, _ in _PER_MEMORY}:
            _, routed, _ = next(m for m in _PER_MEMORY if m[0] == leaf)
            for m in range(E):
                out[f"{prefix}.{routed}.{m}.weight"] = t[m]
        elif leaf in {f"shared_{ours}" for ours, _, _ in _PER_MEMORY}:
            _, _, shared = next(m for m in _PER_MEMORY if f"shared_{m[0]}" == leaf)
            out[f"{prefix}.{shared}.weight"] = t
        elif leaf in dict(_CONVS):
            out[f"{prefix}.{dict(_CONVS)[leaf]}.weight"] = t[0].unsqueeze(1)  # [1, C, W] -> [C, 1, W]
        else:
            out[name] = t
    return out


def from_fla_state_dict(sd: dict, cfg: ModelConfig, fc: dict) -> dict:
    """fla tensors -> megamom names (routed memories' Linears stacked, the shared memory's apart). fla's
    single_kv_proj (every memory uses the shared projections) is expanded into identical copies."""
    E, single = cfg.num_memories, bool(fc.get("single_kv_proj", False))
    sd = dict(sd)
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        emb = sd.get("model.embeddings.weight")
        if emb is not None and not torch.equal(head, emb):
            raise ConvertError("tie_word_embeddings is true but lm_head.weight differs from model.embeddings.weight")
    out, used = {}, set()
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    for i in layers:
        p = f"model.layers.{i}.attn."

        def take(key: str) -> torch.Tensor:
            if key not in sd:
                raise ConvertError(f"flash-linear-attention checkpoint lacks {key}")
            used.add(key)
            return sd[key]

        if f"{p}gate.weight" in sd:
            out[f"{p}router.weight"] = take(f"{p}gate.weight")
        for ours, routed, shared in _PER_MEMORY:
            if single:
                w = take(f"{p}{shared}.weight")
                mats = [w] * E
            else:
                mats = [take(f"{p}{routed}.{m}.weight") for m in range(E)]
            out[p + ours] = torch.stack(mats)
            if cfg.shared_mem:
                out[p + f"shared_{ours}"] = take(f"{p}{shared}.weight")
        for ours, theirs in _CONVS:
            w = take(f"{p}{theirs}.weight")
            if w.dim() != 3 or w.shape[1] != 1:
                raise ConvertError(f"{p}{theirs}.weight has shape {tuple(w.shape)}; "
                                   f"expected a depthwise conv [C, 1, W]")
            out[p + ours] = w[:, 0].unsqueeze(0)
    for k, t in sd.items():
        if k not in used and not k.endswith(".attn.gate.weight"):
            out[k] = t
    return out
