"""megamom checkpoint -> Hugging Face model directory.

    config.json, generation_config.json, model.safetensors (or shards + index), tokenizer files,
    README.md, and for --format megamom the model code (configuration_megamom.py,
    modeling_megamom.py and the megamom modules they import, see megamom.hf.bundle).

Everything cheap is checked first (checkpoint complete, config valid, format expressible,
tokenizer the one the model was trained with, output directory free); the export is written into
a temporary directory and renamed into place only when complete."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

import megamom

from ..config import ModelConfig
from ..hf.bundle import AUTO_MAP, write_bundle
from . import fla_format
from .errors import ConvertError
from .hf_io import parse_size, read_weights, write_safetensors
from .model_card import render
from .outdir import check_out, staged
from .source import open_checkpoint, tokenizer_path
from .tokenizer_files import load_checked, write_tokenizer

log = logging.getLogger("megamom.convert")
FORMATS = ("megamom", "fla")
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
# per-head decay parameters stay float32 in every export (the HF classes keep them float32 too)
FP32_LEAVES = ("A_log", "dt_bias")


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "unknown"


def cast_weights(sd: dict, dtype: torch.dtype) -> dict:
    out = {}
    for name, t in sd.items():
        keep = t.is_floating_point() and name.rsplit(".", 1)[-1] in FP32_LEAVES
        target = torch.float32 if keep else dtype
        # a copy either way: the checkpoint's tensors may be views of one flat buffer (ZeRO)
        out[name] = t.to(target if t.is_floating_point() else t.dtype, copy=True)
    return out


# config.json key: whether the training documents began with BOS (a prompt should, then, and only then)
BOS_KEY = "megamom_documents_start_with_bos"


def megamom_config_json(cfg: ModelConfig, token_ids: dict, dtype_name: str) -> dict:
    data = dataclasses.asdict(cfg)
    return {"model_type": "megamom", "architectures": ["MegaMoMForCausalLM"], "auto_map": dict(AUTO_MAP),
            **data, **{k: token_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            "torch_dtype": dtype_name, "dtype": dtype_name, "transformers_version": _transformers_version(),
            "megamom_version": megamom.__version__}


def to_hf(checkpoint: str, out: str, fmt: str = "megamom", dtype: str = "fp32", tokenizer: Optional[str] = None,
          no_tokenizer: bool = False, max_shard_size: str = "5GB", overwrite: bool = False, verify: bool = False,
          echo: Callable[[str], None] = log.info) -> Path:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    parse_size(max_shard_size)  # a bad size fails before any work
    if verify and fmt != "megamom":
        raise ConvertError("--verify loads the export with transformers; it needs --format megamom")
    src = open_checkpoint(checkpoint)
    cfg = src.model_config
    if fmt == "fla":
        fla_format.check_expressible(cfg)
    out_path = check_out(out, overwrite, inputs=(src.path,))
    tok = None
    if not no_tokenizer:
        tpath = tokenizer_path(src, tokenizer)
        if tpath is None:
            raise ConvertError(f"checkpoint {str(src.path)!r} records no tokenizer; pass --tokenizer PATH "
                               f"or --no-tokenizer")
        tok = load_checked(tpath, src.tokenizer_ref.get("hash"), cfg.vocab_size)

    echo(f"reading {src.path} (step {src.step})")
    sd = src.load_weights()
    with staged(out_path) as tmp:
        params, written = write_export(tmp, cfg, sd, fmt=fmt, dtype=dtype, tokenizer=tok,
                                       documents_start_with_bos=src.tokenizer_ref.get("documents_start_with_bos"),
                                       max_shard_size=max_shard_size, step=src.step,
                                       tokens_seen=src.state.get("tokens_seen"),
                                       source="/".join(src.path.resolve().parts[-3:]))  # no local paths in the card
        if verify:
            diff = verify_export(tmp, cfg)
            echo(f"verified: the export's logits equal megamom's (max abs diff {diff:.2e})")
        echo(f"wrote {written['weights']} weight file(s), {written['tokenizer']} tokenizer file(s), "
             f"{written['code']} code file(s)")
    echo(f"exported {params:,} parameters to {out_path} ({fmt} format, {DTYPES[dtype][1]})")
    if fmt == "megamom" and "." in out_path.name:
        echo(f"note: transformers before 4.57 cannot load remote code from a directory whose name has a dot "
             f"({out_path.name!r}); rename it for those versions")
    return out_path


def write_export(out_dir: Path, cfg: ModelConfig, sd: dict, fmt: str = "megamom", dtype: str = "fp32",
                 tokenizer=None, max_shard_size: str | int = "5GB", step: int = 0, tokens_seen: Optional[int] = None,
                 source: str = "(in memory)", documents_start_with_bos: Optional[bool] = None) -> tuple[int, dict]:
    """Write an export of megamom weights `sd` (megamom names) into an existing empty directory.
    documents_start_with_bos: whether the training documents began with BOS (None: not known),
    recorded in config.json for `megamom generate`. Returns (parameter count, {"weights",
    "tokenizer", "code": number of files})."""
    out_dir = Path(out_dir)
    torch_dtype, dtype_name = DTYPES[dtype]
    sd = cast_weights(sd, torch_dtype)
    params = sum(t.numel() for t in sd.values())
    token_ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                              "pad_token_id": tokenizer.pad_id}
    if fmt == "megamom":
        config = megamom_config_json(cfg, token_ids, dtype_name)
        code = write_bundle(out_dir)
    else:
        config = fla_format.to_fla_config(cfg, token_ids, dtype_name, _transformers_version())
        sd = fla_format.to_fla_state_dict(sd, cfg)
        code = []
    if documents_start_with_bos is not None:
        config[BOS_KEY] = documents_start_with_bos
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: v for k, v in token_ids.items() if v is not None}
    (out_dir / "generation_config.json").write_text(
        json.dumps({**gen, "transformers_version": _transformers_version()}, indent=2) + "\n")
    files = write_safetensors(sd, out_dir, parse_size(max_shard_size))
    tok_files = []
    if tokenizer is not None:
        max_len = cfg.max_position_embeddings if cfg.arch == "transformer" else None
        tok_files = write_tokenizer(tokenizer, out_dir, max_len)
    (out_dir / "README.md").write_text(render(
        cfg, fmt, params=params, dtype=dtype_name, step=step, tokens_seen=tokens_seen,
        tokenizer_hash=None if tokenizer is None else tokenizer.hash, source=source,
        megamom_version=megamom.__version__))
    return params, {"weights": len(files), "tokenizer": len(tok_files), "code": len(code)}


@torch.no_grad()
def verify_export(export_dir: Path, cfg: ModelConfig, atol: float = 1e-4) -> float:
    """Load the export through transformers' remote-code path and compare its logits with megamom's
    CausalLM holding the same (exported) weights, on a random batch."""
    from transformers import AutoModelForCausalLM

    from ..model import CausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True, dtype=torch.float32)
    ref = CausalLM(cfg)
    ref.load_state_dict({k: v.float() for k, v in read_weights(export_dir).items()}, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a = hf.eval()(ids).logits
    b = ref.eval()(ids).logits
    diff = float((a - b).abs().max())
    if not diff <= atol:
        raise ConvertError(f"verification failed: the exported model's logits differ from megamom's by {diff:.3e}")
    return diff
