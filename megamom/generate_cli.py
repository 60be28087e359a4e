"""`megamom generate --model DIR --prompt TEXT`: text from a Hugging Face export (megamom format, or
flash-linear-attention `mom` format where fla and CUDA are available) or straight from a megamom
checkpoint. megamom models run megamom's own generation (megamom.generate.generate_batch: prompts
of any lengths prefilled together as one packed row, the constant-memory recurrent cache, each
prompt stopping at its EOS); fla's through the Hugging Face `generate()`. Several --prompt (or a
--prompts-file, one prompt per line) give one batch; a single prompt streams to the terminal.
Greedy unless --temperature > 0."""
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
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompts-file", help="a text file of prompts, one per line (blank lines skipped)")
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
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="decode a memory model step by step from Python (default on CUDA: one CUDA graph per step)")
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
                   top_p: float = 1.0, bos: bool = True, stop_at_eos: bool = True, seed: int = 0,
                   on_text=None, cuda_graph: bool = True) -> list[dict]:
    """bos: start every prompt with the BOS token (`prompt_bos` says what the model expects).
    on_text(text): with one prompt, called with each new piece of the completion (streaming).
    cuda_graph: a megamom memory model on CUDA decodes through one CUDA graph per step."""
    import torch
    device = next(hf.parameters()).device
    rows = [([tok.bos_id] if bos and tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
    if not all(rows):
        raise GenerateError("an empty prompt needs the BOS token (the tokenizer has none, or --no-bos was given)")
    core = getattr(hf, "_core", None)  # a megamom model: megamom's own generation
    if core is not None:
        return _generate_megamom(core, tok, prompts, rows, max_new_tokens, temperature, top_k, top_p, stop_at_eos,
                                 seed, on_text, cuda_graph)
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


def _generate_megamom(model, tok, prompts, rows, max_new_tokens, temperature, top_k, top_p, stop_at_eos, seed,
                      on_text, cuda_graph=True) -> list[dict]:
    import torch

    from .generate import generate_batch
    eos = tok.eos_id if stop_at_eos else None
    device = model.output_weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    streamed = {"ids": [], "text": ""}

    def stream(nxt):  # the completion so far, decoded whole (a piece may change the previous text's end)
        if eos is not None and eos in streamed["ids"]:
            return  # (the steps after EOS repeat it until the host looks)
        streamed["ids"].append(int(nxt[0]))
        ids = streamed["ids"][:-1] if streamed["ids"][-1] == eos else streamed["ids"]
        text = tok.decode(ids)
        if text.startswith(streamed["text"]) and len(text) > len(streamed["text"]):
            on_text(text[len(streamed["text"]):])
            streamed["text"] = text

    try:
        news = generate_batch(model, rows, max_new_tokens, temperature, top_k or None, top_p, eos, generator,
                              on_tokens=stream if on_text is not None and len(rows) == 1 else None,
                              cuda_graph=None if cuda_graph else False)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    results = []
    for prompt, row in zip(prompts, news):
        row = row[:-1] if eos is not None and row and row[-1] == eos else row
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
        prompts = list(args.prompt)
        if args.prompts_file:
            path = Path(args.prompts_file).expanduser()
            if not path.is_file():
                raise GenerateError(f"--prompts-file {args.prompts_file!r} does not exist")
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise GenerateError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
        if not 0 < args.top_p <= 1:
            raise GenerateError(f"--top-p {args.top_p} must be in (0, 1]")
        hf, tok = load(args.model, device, args.dtype, args.tokenizer)
        from .convert.to_hf import BOS_KEY  # (in the export's config.json; set from a checkpoint's state by load)
        bos = args.bos if args.bos is not None else prompt_bos(tok, getattr(hf.config, BOS_KEY, None))
        stream = len(prompts) == 1 and not args.json
        printed: list[str] = []

        def show(piece: str) -> None:
            printed.append(piece)
            print(piece, end="", flush=True)
        if stream:
            print(prompts[0], end="", flush=True)
        t0 = time.perf_counter()
        results = generate_texts(hf, tok, prompts, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, bos=bos, stop_at_eos=not args.ignore_eos, seed=args.seed,
                                 on_text=show if stream else None, cuda_graph=args.cuda_graph)
    except GenerateError as e:
        print(f"megamom generate: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        elif stream:  # the rest of the completion (a piece whose decoding was still changing), then a newline
            shown = "".join(printed)
            print(r["completion"][len(shown):] if r["completion"].startswith(shown) else "")
        else:
            print(r["prompt"] + r["completion"] + ("\n" if len(results) > 1 else ""))
    n = sum(len(r["new_token_ids"]) for r in results)
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s on {device}]", file=sys.stderr)
    return 0
