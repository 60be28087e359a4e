"""Typed configuration: dataclasses, YAML files, dotted CLI overrides, validation up front.

A config file is YAML with the sections of :class:`Config`. Every key is checked against the
dataclass fields before any work starts: unknown keys (with the closest known key suggested),
wrong types and inconsistent values raise :class:`ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError  # noqa: F401  (raised here, and imported from here by callers)



# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

ARCHS = ("mom", "linear", "transformer")
UPDATE_RULES = ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn")
QK_NORMS = ("l2", "none")
QKV_ACTIVATIONS = ("silu", "none")
FEATURE_MAPS = ("none", "hadamard")
ATTN_IMPLS = ("auto", "sdpa", "flash", "eager")
KERNEL_BACKENDS = ("auto", "torch", "triton")
SHUFFLE_ALGOS = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")
AUX_LOSS_FORMS = ("switch", "paper")


# Model settings that choose an implementation, not the function computed: a checkpoint resumes
# and converts across them.
IMPLEMENTATION_ONLY_KEYS = ("kernel_backend", "attn_impl", "loss_chunk_size", "scan_keep")
# model.scan_keep: kernels.utils.SCAN_KEEPS, written out here so that the config imports no torch
# (tests/test_model_misc.py checks that the two agree)
SCAN_KEEPS = ("none", "states", "all")


@dataclass
class ModelConfig:
    """The network. `arch`: mom (mixture of memories), linear (one memory: Gated DeltaNet, GLA, ...)
    or transformer (Transformer++: RoPE, SwiGLU, RMSNorm)."""

    arch: str = "mom"
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 4
    head_dim: int = 256
    expand_v: int = 1
    # Linear-memory mixer (arch mom / linear)
    update_rule: str = "gated_delta"
    num_memories: int = 4
    topk: int = 2
    shared_mem: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    per_memory_conv: bool = False  # False = one conv for all memories (as flash-linear-attention)
    use_output_gate: bool = True
    qk_norm: str = "l2"
    chunk_size: int = 64
    gla_gate_normalizer: float = 16.0
    # GLA's per-key decay projection: 0 a full-rank [K, d] matrix per memory; r > 0 the GLA paper's
    # (and fla's, and the MoM authors') low-rank gate with a bias, W_up [K, r] W_down [r, d] x + b
    gla_gate_rank: int = 0
    # q / k / v's activation without the short conv (with it: the conv's SiLU): silu as fla's MoM and
    # Gated DeltaNet layers; none as fla's GLA layer (and the MoM authors' GLA variant)
    qkv_activation: str = "silu"
    # linear attention's learned feature map of q and k: hadamard is fla's `elementwise_product`
    # (per head, (W1 x + b1) * (W2 x + b2), one for q and one for k, shared by the memories)
    feature_map: str = "none"
    # Attention (arch transformer)
    num_kv_heads: Optional[int] = None
    rope_theta: float = 10000.0
    attn_impl: str = "auto"
    # MLP and the rest
    hidden_ratio: float = 3.0
    intermediate_size: Optional[int] = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    # the MoM authors' init (GPT-2's): the residual branches' output projections (the mixer's o_proj,
    # the MLP's down_proj) divided by sqrt(2 num_layers) after their init
    rescale_residual_init: bool = False
    # Router losses. aux_loss_form: "switch" (Megatron's: E sum_e f_e P_e over the micro-batch, f the
    # share of routed slots, P the mean full-softmax probability; 1 when balanced) or "paper" (the MoM
    # authors': per layer and per sequence, P the softmax over the top-k logits, f the share of tokens
    # choosing e; k when balanced, so k times stronger at the same coefficient). Mean over layers.
    aux_loss_coef: float = 0.01
    aux_loss_form: str = "switch"
    z_loss_coef: float = 0.0
    # Kernels: auto = Triton on CUDA when available, torch reference elsewhere.
    kernel_backend: str = "auto"
    # Rows per chunk of the fused output projection + cross entropy (no [tokens, vocab] logits
    # in training); 0 = plain logits and F.cross_entropy.
    loss_chunk_size: int = 4096
    # What the Triton scan's backward takes from the forward instead of recomputing it: none (the
    # least memory), states (chunk states + v_new), all (+ w, and the MoM layer's packed token rows
    # its projection's weight gradient reads): more memory for a faster step (benchmarks/RESULTS.md).
    # auto: the trainer picks the most that fits the GPU by `megamom plan`'s estimate (none elsewhere).
    scan_keep: str = "none"

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        return self.head_dim * self.expand_v

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @property
    def mlp_hidden_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 256 * math.ceil(self.hidden_size * self.hidden_ratio * 2 / 3 / 256)

    @property
    def memories_total(self) -> int:
        """Routed memories plus the shared one (a linear model has exactly one memory)."""
        if self.arch == "linear":
            return 1
        return self.num_memories + int(self.shared_mem)

    @property
    def routed(self) -> bool:
        return self.arch == "mom"

    def validate(self) -> None:
        _choice("model.arch", self.arch, ARCHS)
        _choice("model.update_rule", self.update_rule, UPDATE_RULES)
        _choice("model.qk_norm", self.qk_norm, QK_NORMS)
        _choice("model.qkv_activation", self.qkv_activation, QKV_ACTIVATIONS)
        _choice("model.feature_map", self.feature_map, FEATURE_MAPS)
        if self.qkv_activation != "silu" and self.use_short_conv and self.arch != "transformer":
            raise ConfigError(f"model.qkv_activation={self.qkv_activation!r} applies without the short conv (the "
                              f"conv's own activation is SiLU): set model.use_short_conv=false or "
                              f"model.qkv_activation=silu")
        if self.feature_map != "none" and self.update_rule != "linear_attn":
            raise ConfigError(f"model.feature_map={self.feature_map!r} is linear attention's: set "
                              f"model.update_rule=linear_attn or model.feature_map=none")
        _choice("model.aux_loss_form", self.aux_loss_form, AUX_LOSS_FORMS)
        _choice("model.attn_impl", self.attn_impl, ATTN_IMPLS)
        _choice("model.kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _choice("model.scan_keep", self.scan_keep, SCAN_KEEPS + ("auto",))
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "expand_v",
                    "chunk_size", "max_position_embeddings"):
            _positive(f"model.{key}", getattr(self, key))
        _positive("model.norm_eps", self.norm_eps)
        _positive("model.hidden_ratio", self.hidden_ratio)
        _positive("model.initializer_range", self.initializer_range)
        if self.intermediate_size is not None:
            _positive("model.intermediate_size", self.intermediate_size)
        if self.loss_chunk_size < 0:
            raise ConfigError(f"model.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 = plain cross entropy)")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError("model.aux_loss_coef and model.z_loss_coef must be >= 0")
        if self.arch == "transformer":
            kv = self.num_kv_heads or self.num_heads
            if self.num_heads % kv:
                raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of "
                                  f"model.num_kv_heads={kv} (grouped-query attention)")
            if self.head_dim % 2:
                raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
            return
        if self.arch == "mom":
            _positive("model.num_memories", self.num_memories)
            _positive("model.topk", self.topk)
            if self.topk > self.num_memories:
                raise ConfigError(f"model.topk={self.topk} exceeds model.num_memories={self.num_memories}: "
                                  "a token cannot be routed to more memories than exist; lower topk or "
                                  "raise num_memories")
        if self.gla_gate_rank < 0:
            raise ConfigError(f"model.gla_gate_rank={self.gla_gate_rank} must be >= 0 (0: a full-rank decay "
                              f"projection; e.g. 16: the GLA paper's low-rank gate)")
        if self.gla_gate_rank and self.update_rule != "gla":
            raise ConfigError(f"model.gla_gate_rank={self.gla_gate_rank} is GLA's decay gate; model.update_rule="
                              f"{self.update_rule!r} has none: set model.gla_gate_rank=0 or model.update_rule=gla")
        if self.use_short_conv and self.conv_size < 2:
            raise ConfigError(f"model.conv_size={self.conv_size} must be >= 2 (or set model.use_short_conv=false)")
        if self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"model.chunk_size={self.chunk_size} must be a power of two (e.g. 64)")


@dataclass
class DataConfig:
    """Where training samples come from (filled in by the data pipeline)."""

    paths: list = field(default_factory=list)  # prepared dataset dirs (local or remote)
    weights: Optional[list] = None  # mixture weights, one per path
    cache_dir: Optional[str] = None  # local cache for remote paths
    seq_len: int = 2048
    tokenizer: Optional[str] = None  # sentencepiece .model or HF tokenizer dir
    num_workers: int = 0
    shuffle: bool = True
    reset_at_doc_boundaries: bool = True
    # Streaming (mosaicml-streaming) knobs; the defaults suit most runs. A fixed num_canonical_nodes
    # keeps the sample order when a run resumes on a different number of nodes.
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    num_canonical_nodes: Optional[int] = None
    cache_limit: Optional[str] = None  # e.g. "50gb": evict downloaded shards of remote paths beyond it
    predownload: Optional[int] = None  # samples to download ahead (default: 8 x batch size)
    download_timeout: float = 60.0

    def validate(self) -> None:
        _positive("data.seq_len", self.seq_len)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        _choice("data.shuffle_algo", self.shuffle_algo, SHUFFLE_ALGOS)
        for key in ("shuffle_block_size", "num_canonical_nodes", "predownload"):
            if getattr(self, key) is not None:
                _positive(f"data.{key}", getattr(self, key))
        _positive("data.download_timeout", self.download_timeout)
        if not isinstance(self.paths, list) or not all(isinstance(p, str) and p for p in self.paths):
            raise ConfigError(f"data.paths={self.paths!r} must be a list of dataset directories or URLs "
                              "(e.g. data.paths=[data/web, s3://bucket/code])")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ConfigError(f"data.weights has {len(self.weights)} entries but data.paths has "
                              f"{len(self.paths)}: give one weight per dataset")
        if self.weights is not None and any(float(w) < 0 for w in self.weights):
            raise ConfigError("data.weights must be non-negative")


@dataclass
class TrainConfig:
    """Optimisation and the run loop."""

    out_dir: str = "runs/default"
    seed: int = 42
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: Optional[int] = None  # checked = micro * accum * data-parallel size
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100  # <= max_steps (checked)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    zero_stage: int = 1
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    cuda_graph: bool = False  # replay each micro-batch's forward + backward from CUDA graphs (megamom.train.cuda_graph)
    log_every: int = 10
    eval_every: int = 0
    eval_steps: int = 20
    save_every: int = 0
    keep_last: int = 3
    max_nonfinite_in_row: int = 5
    # a warning when a memory's share of the routed slots (over the data-parallel ranks) stays under
    # collapse_share x its balanced share (1 / num_memories) for collapse_logs logged steps in a row
    collapse_share: float = 0.1
    collapse_logs: int = 10
    allow_config_change_on_resume: bool = False
    init_from: Optional[str] = None  # checkpoint whose weights start a NEW run (e.g. from `convert from-hf`)

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "keep_last",
                    "max_nonfinite_in_row", "eval_steps", "collapse_logs"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        for key in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "collapse_share"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        if self.warmup_steps > self.max_steps:  # the lr would never reach train.lr
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}: "
                              "lower train.warmup_steps or raise train.max_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be within [0, 1]")
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallelism is what remains of the world after TP x SP x EP."""

    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    # Megatron's sequence parallelism inside the tensor group: activations outside the tensor
    # regions (norms, residual stream, router) split along the sequence, all-gather / reduce-scatter
    # at the regions' edges instead of all-reduces (activation memory / TP, same bytes moved)
    tensor_sequence_parallel: bool = False

    def validate(self) -> None:
        for key in ("tensor", "sequence", "expert"):
            _positive(f"parallel.{key}", getattr(self, key))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        from .parallel.layout import check_config  # every split of a sharded dimension is even
        check_config(self)
        if self.train.cuda_graph:
            self._check_cuda_graph()
        return self

    def _check_cuda_graph(self) -> None:
        """What train.cuda_graph cannot replay (megamom/train/cuda_graph.py says why)."""
        t = self.train
        why = {"data.reset_at_doc_boundaries=true": (self.data.reset_at_doc_boundaries,
                                                     "the number of documents per batch changes the shapes"),
               f"train.zero_stage={t.zero_stage}": (
                   t.zero_stage == 3, "ZeRO-3 gathers and frees the parameters around each forward, the graph "
                                      "needs them at fixed addresses; use train.zero_stage=0, 1 or 2"),
               "train.activation_checkpointing=true": (t.activation_checkpointing, "not tested with graphs"),
               "train.compile=true": (t.compile, "not tested with graphs"),
               "train.offload_optimizer=true": (t.offload_optimizer, "not tested with graphs")}
        bad = [f"{k} ({reason})" for k, (hit, reason) in why.items() if hit]
        if bad:
            raise ConfigError("train.cuda_graph=true cannot be combined with " + "; ".join(bad)
                              + ": change those settings or set train.cuda_graph=false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, checking
# ---------------------------------------------------------------------------------------------

def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}{extra}")


def _positive(key: str, value: Any) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value!r} must be > 0")


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a value against a field annotation. Returns (ok, value)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if annotation is Any:
        return True, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if annotation is list or origin is list:
        return isinstance(value, list), value
    if annotation is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, annotation), value


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if args:
        return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _apply(obj: Any, values: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            extra = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r} (from {source}){extra}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} (from {source}) must be a mapping of its keys, got {value!r}")
            _apply(current, value, f"{dotted}.", source)
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(f"{dotted}={value!r} (from {source}) has type {type(value).__name__}; "
                              f"expected {_type_name(hints[key])}")
        setattr(obj, key, coerced)


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.num_memories=8", "train.lr=1e-3"]` -> nested dict with YAML-typed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value "
                              "(e.g. model.num_memories=8)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return tree


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Build a validated Config from (in order) defaults, `base`, a YAML file and overrides."""
    cfg = Config()
    if base:
        _apply(cfg, base, "", "defaults")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections "
                              f"(model:, data:, train:, parallel:), got {type(data).__name__}")
        _apply(cfg, data, "", str(path))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "", "command line")
    return cfg.validate()


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = ModelConfig()
    _apply(cfg, data, "model.", "dict")
    cfg.validate()
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
