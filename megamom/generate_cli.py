"""`megamom generate --model DIR --prompt TEXT`: text from a Hugging Face export (megamom format, or
flash-linear-attention `mom` format where fla and CUDA are available) or straight from a megamom
checkpoint, through the Hugging Face classes and `generate()` with the constant-memory recurrent
cache. Several --prompt give one left-padded batch. Greedy unless --temperature > 0."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class GenerateError(ValueError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face export (megamom convert to-hf), or a megamom checkpoint / run directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: the export's dtype (checkpoints: fp32)")
    p.add_argument("--tokenizer", help="tokenizer (default: the one in the export / recorded by the checkpoint)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None,
                     help="start prompts with the BOS token (default: as the training documents did, recorded in "
                          "the export or checkpoint; where that is unknown, when the tokenizer has one)")
    bos.add_argument("--no-bos", dest="bos", action="store_false", help="do not start prompts with the BOS token")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (text and token ids)")


def _dtype_kwargs(dtype):
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def prompt_bos(tok, documents_start_with_bos) -> bool:
    """Whether a prompt starts with BOS: as the model's training documents did where that is known
    (`megamom prep --bos`; the default prep separates documents by EOS alone, so a BOS there is a
    token the model never saw), else when the tokenizer has one."""
    has = getattr(tok, "bos_id", None) is not None and tok.bos_id >= 0
    return has and (documents_start_with_bos is None or bool(documents_start_with_bos))


def load(model: str, device, dtype: str = "auto", tokenizer: str | None = None):
    """(Hugging Face model in eval mode on `device`, megamom Tokenizer). The model's config carries
    what the training documents began with (`convert.to_hf.BOS_KEY`) where it is known."""
    import torch

    from .convert.errors import ConvertError
    from .tokenizer import TokenizerError, load_tokenizer
    torch_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    path = Path(model).expanduser()
    if not path.exists():
        raise GenerateError(f"--model {model!r} does not exist")
    config_file = path / "config.json"
    try:
        if config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type")
            if model_type == "megamom":
                from .hf.modeling_megamom import MegaMoMForCausalLM
                hf = MegaMoMForCausalLM.from_pretrained(str(path), **_dtype_kwargs(torch_dtype or "auto"))
            elif model_type == "mom":
                if device.type != "cuda":
                    raise GenerateError("flash-linear-attention's MoM runs on CUDA only; on CPU convert the model "
                                        "to megamom format (megamom convert from-hf, then to-hf)")
                try:
                    import fla  # noqa: F401  (registers model_type "mom")
                except ImportError:
                    raise GenerateError("this is a flash-linear-attention `mom` model: pip install "
                                        "flash-linear-attention (or convert it to megamom format)") from None
                from transformers import AutoModelForCausalLM
                hf = AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwargs(torch_dtype or "auto"))
            else:
                raise GenerateError(f"{str(config_file)!r} has model_type {model_type!r}; expected 'megamom' or 'mom'")
            tok_path = Path(tokenizer).expanduser() if tokenizer else path
            tok = load_tokenizer(tok_path)
        else:
            from .convert.source import open_checkpoint, tokenizer_path
            from .convert.tokenizer_files import load_checked
            from .hf.configuration_megamom import MegaMoMConfig
            from .hf.modeling_megamom import MegaMoMForCausalLM
            src = open_checkpoint(path)
            tpath = tokenizer_path(src, tokenizer)
            if tpath is None:
                raise GenerateError(f"checkpoint {str(src.path)!r} records no tokenizer; pass --tokenizer")
            tok = load_checked(tpath, src.tokenizer_ref.get("hash"), src.model_config.vocab_size)
            from .convert.to_hf import BOS_KEY
            hf = MegaMoMForCausalLM(MegaMoMConfig.from_model_config(
                src.model_config, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                **{BOS_KEY: src.tokenizer_ref.get("documents_start_with_bos")}))
            hf.load_state_dict(src.load_weights(), strict=True)
            if torch_dtype is not None:
                hf.to(torch_dtype)
    except (ConvertError, TokenizerError) as e:
        raise GenerateError(str(e)) from None
    return hf.to(device).eval(), tok


def generate_texts(hf, tok, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, bos: bool = True, stop_at_eos: bool = True) -> list[dict]:
    """bos: start every prompt with the BOS token (`prompt_bos` says what the model expects)."""
    import torch
    device = next(hf.parameters()).device
    rows = [([tok.bos_id] if bos and tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
    if not all(rows):
        raise GenerateError("an empty prompt needs the BOS token (the tokenizer has none, or --no-bos was given)")
    T = max(len(r) for r in rows)
    pad = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    eos = tok.eos_id if stop_at_eos else None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad, eos_token_id=eos)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, **kwargs)
    results = []
    for prompt, row in zip(prompts, out[:, T:].tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        results.append({"prompt": prompt, "completion": tok.decode(row), "new_token_ids": row})
    return results


def run(args) -> int:
    import torch
    if args.max_new_tokens < 1:
        print("megamom generate: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        print("megamom generate: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        hf, tok = load(args.model, device, args.dtype, args.tokenizer)
        from .convert.to_hf import BOS_KEY  # (in the export's config.json; set from a checkpoint's state by load)
        bos = args.bos if args.bos is not None else prompt_bos(tok, getattr(hf.config, BOS_KEY, None))
        t0 = time.perf_counter()
        results = generate_texts(hf, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, bos=bos, stop_at_eos=not args.ignore_eos)
    except GenerateError as e:
        print(f"megamom generate: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(r["prompt"] + r["completion"] + ("\n" if len(results) > 1 else ""))
    n = sum(len(r["new_token_ids"]) for r in results)
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s on {device}]", file=sys.stderr)
    return 0
