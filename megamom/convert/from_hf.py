"""Hugging Face model directory (megamom's own `megamom` format, flash-linear-attention's `mom`, or
the MoM authors' `mom_gated_deltanet`)
-> a megamom weights checkpoint, to continue pretraining from.

The output is a checkpoint directory in the trainer's layout, readable wherever a checkpoint is
(`load_model_state_dict`, `megamom eval`, `megamom convert to-hf`, `megamom generate`):

    mp_rank_00_model_states.pt   {"module": fp32 state dict} (DeepSpeed's ZeRO-0 module file)
    trainer_state.json           step 0, the full config (model from config.json), tokenizer {path, hash},
                                 "weights_only": true
    COMPLETE.json                written last
    tokenizer/                   the export's tokenizer files, when it has them

It holds weights only -- no optimizer, scheduler, data-loader or RNG state, which a Hugging Face
model does not have -- so training STARTS from it (a new run initialised with these weights, see
docs/convert.md), it does not resume a run."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

import megamom

from ..config import Config, ConfigError, ModelConfig, model_config_from_dict
from ..model.memory_mixer import upgrade_state_dict
from . import fla_format, paper_format
from .errors import ConvertError
from .hf_io import read_weights
from .outdir import check_out, staged
from .source import check_state_dict

log = logging.getLogger("megamom.convert")
MODEL_FILE = "mp_rank_00_model_states.pt"


def megamom_config_from_json(fc: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return model_config_from_dict({k: v for k, v in fc.items() if k in names})
    except ConfigError as e:
        raise ConvertError(f"config.json does not give a valid megamom model: {e}") from None


def read_hf_config(model_dir: Path) -> tuple[str, ModelConfig, dict]:
    """(format, megamom ModelConfig, raw config.json) of a Hugging Face model directory."""
    if not model_dir.is_dir():
        raise ConvertError(f"model directory {str(model_dir)!r} does not exist")
    cfile = model_dir / "config.json"
    if not cfile.is_file():
        hint = (" (it is a megamom checkpoint: use `megamom convert to-hf`)"
                if (model_dir / "trainer_state.json").is_file() or (model_dir / "checkpoints").is_dir() else "")
        raise ConvertError(f"{str(model_dir)!r} is not a Hugging Face model directory: no config.json{hint}")
    try:
        fc = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{str(cfile)!r} is not valid JSON: {e}") from None
    model_type = fc.get("model_type")
    if model_type == "megamom":
        return "megamom", megamom_config_from_json(fc), fc
    if model_type == fla_format.MODEL_TYPE:
        return "fla", fla_format.from_fla_config(fc), fc
    if model_type == paper_format.MODEL_TYPE:
        cfg, fla = paper_format.from_paper_config(fc)
        return "mom-paper", cfg, fla
    raise ConvertError(f"unknown format: {str(cfile)!r} has model_type {model_type!r}; megamom converts "
                       f"'megamom' (its own exports), 'mom' (flash-linear-attention's MoM) and "
                       f"'{paper_format.MODEL_TYPE}' (the MoM authors' released checkpoints)")


def _tokenizer_files(model_dir: Path) -> list[Path]:
    from ..tokenizer.hf import HF_TOKENIZER_FILES
    from ..tokenizer.load import MARKER
    return [model_dir / n for n in (*HF_TOKENIZER_FILES, MARKER) if (model_dir / n).is_file()]


FORMATS = ("megamom", "fla", "mom-paper")  # model_type megamom, mom, mom_gated_deltanet


def from_hf(model_dir: str, out: str, overwrite: bool = False, echo: Callable[[str], None] = log.info,
            fmt: str | None = None) -> Path:
    """fmt: the format the caller expects (None: whatever config.json's model_type says)."""
    src = Path(model_dir).expanduser()
    expected = fmt
    fmt, cfg, fc = read_hf_config(src)
    raw = json.loads((src / "config.json").read_text())  # (for the authors' format fc is the equivalent fla config)
    if expected is not None and expected != fmt:
        raise ConvertError(f"{str(src)!r} is in the {fmt!r} format (config.json model_type "
                           f"{raw.get('model_type')!r}), not {expected!r}: drop --format (it is read off "
                           f"config.json) or point --model elsewhere")
    capacity = paper_format.paper_config(raw)["capacity"] if fmt == "mom-paper" else 1.0
    if capacity < 1.0:
        echo(f"note: capacity={capacity}: the authors' code keeps at most capacity x T of a sequence's tokens per "
             f"memory (the most recent); megamom is dropless, so outputs equal theirs only where no memory "
             f"receives more (docs/fidelity.md)")
    out_path = check_out(out, overwrite, inputs=(src,))
    tok_files = _tokenizer_files(src)
    tok = None
    if tok_files:
        from ..tokenizer import TokenizerError, load_tokenizer
        try:
            tok = load_tokenizer(src)
        except TokenizerError as e:
            raise ConvertError(f"the tokenizer files in {str(src)!r} do not load: {e}") from None
        if tok.vocab_size > cfg.vocab_size:
            raise ConvertError(f"the tokenizer in {str(src)!r} has {tok.vocab_size} tokens but the model only "
                               f"{cfg.vocab_size}: it is not this model's tokenizer")
    else:
        echo(f"note: {src} holds no tokenizer files; the checkpoint records no tokenizer")

    echo(f"reading {src} ({fmt} format)")
    sd = read_weights(src)
    if fmt == "fla":
        sd = fla_format.from_fla_state_dict(sd, cfg, fc)
    elif fmt == "mom-paper":
        sd = paper_format.from_paper_state_dict(sd, cfg, fc)
    else:
        sd = upgrade_state_dict(sd, cfg)  # an export of older megamom
    if fmt == "megamom" and cfg.tie_word_embeddings and "lm_head.weight" in sd:
        if not torch.equal(sd["lm_head.weight"], sd.get("model.embeddings.weight", sd["lm_head.weight"])):
            raise ConvertError("tie_word_embeddings is true but lm_head.weight differs from the embeddings")
        sd.pop("lm_head.weight")
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    check_state_dict(sd, cfg, f"{str(src)!r}")

    final_tok = out_path.resolve() / "tokenizer"
    with staged(out_path) as tmp:
        tok_ref = {"path": None, "hash": None}
        if tok is not None:
            (tmp / "tokenizer").mkdir()
            for f in tok_files:
                shutil.copyfile(f, tmp / "tokenizer" / f.name)
            tok_ref = {"path": str(final_tok), "hash": tok.hash}
        from .to_hf import BOS_KEY
        if fc.get(BOS_KEY) is not None:  # (what the training documents began with, as the export says)
            tok_ref["documents_start_with_bos"] = bool(fc[BOS_KEY])
        torch.save({"module": sd, "megamom_weights_only": True}, tmp / MODEL_FILE)
        config = Config()
        config.model = cfg
        config.data.tokenizer = tok_ref["path"]
        config.data.seq_len = cfg.max_position_embeddings
        state = {"step": 0, "tokens_seen": 0, "skipped_steps": 0, "world_size": None, "weights_only": True,
                 "config": config.to_dict(), "tokenizer": tok_ref,
                 "source": {"format": fmt, "path": str(src.resolve())},
                 "megamom_version": megamom.__version__}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        (tmp / "COMPLETE.json").write_text(json.dumps({"step": 0, "time": time.time(), "world_size": None}))
    echo(f"wrote megamom weights checkpoint {out_path} ({sum(v.numel() for v in sd.values()):,} parameters)")
    return out_path
