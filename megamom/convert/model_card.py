"""The short model card (README.md) of an export."""
from __future__ import annotations

from typing import Optional

from ..config import ModelConfig

_ARCH = {
    "mom": "Mixture-of-Memories (MoM) linear sequence model",
    "linear": "linear recurrent sequence model (one memory)",
    "transformer": "Transformer++ (RoPE, SwiGLU, RMSNorm)",
}


def render(cfg: ModelConfig, fmt: str, *, params: int, dtype: str, step: int, tokens_seen: Optional[int],
           tokenizer_hash: Optional[str], source: str, megamom_version: str) -> str:
    kind = _ARCH[cfg.arch]
    if cfg.arch != "transformer":
        kind += f", update rule `{cfg.update_rule}`"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- megamom", f"- {cfg.arch}"]
    if cfg.arch == "mom":
        lines += ["- mixture-of-memories", "- linear-attention"]
    lines += ["---", "", f"# {kind}", "",
              f"Converted with `megamom convert to-hf --format {fmt}` (megamom {megamom_version}) from "
              f"checkpoint `{source}` (step {step}" + (f", {tokens_seen:,} training tokens" if tokens_seen else "")
              + ").", "",
              "| | |", "|---|---|",
              f"| parameters | {params:,} |",
              f"| layers x hidden size | {cfg.num_layers} x {cfg.hidden_size} |",
              f"| heads x head dim | {cfg.num_heads} x {cfg.head_dim} |"]
    if cfg.arch == "mom":
        lines.append(f"| memories / top-k / shared memory | {cfg.num_memories} / {cfg.topk} / "
                     f"{'yes' if cfg.shared_mem else 'no'} |")
    lines += [f"| vocabulary | {cfg.vocab_size} |", f"| weights | {dtype} |",
              f"| tokenizer | {tokenizer_hash or 'not included'} |", "", "## Use", ""]
    if fmt == "megamom":
        lines += ["```python",
                  "import torch",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
                  "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
                  "ids = torch.tensor([[tok.bos_token_id] + tok(\"And God said\")[\"input_ids\"]])",
                  "out = model.generate(ids, max_new_tokens=64)",
                  "print(tok.decode(out[0]))",
                  "```", "",
                  "The model code ships in this directory (`modeling_megamom.py` and the megamom modules it "
                  "imports, PyTorch kernels); megamom itself is not needed. Generation keeps a recurrent "
                  "state per memory whose size does not grow with the context"
                  + (" (attention layers keep a K/V cache)." if cfg.arch == "transformer" else ".")
                  + " Batched prompts must be padded on the left.", ""]
    else:
        lines += ["```python",
                  "import fla  # registers model_type \"mom\" with transformers",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "```", "",
                  "flash-linear-attention's `MomForCausalLM` (Triton kernels, CUDA). It computes the same "
                  "function in evaluation mode; in training mode fla's layer runs the short convolution "
                  "across memory and sample boundaries, and it weighs the load-balancing loss differently "
                  "(see megamom's docs/convert.md).", ""]
    lines += ["The exported tokenizer adds no BOS/EOS; the training data began each document with the BOS "
              "token where the tokenizer has one, so prepend it to prompts.",
              "", "Convert back for further pretraining: `megamom convert from-hf --model PATH --out DIR`.", ""]
    return "\n".join(lines)
