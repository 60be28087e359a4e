"""Tokenizer files of an export: the data pipeline's Hugging Face export (identical ids), checked
against the hash the checkpoint recorded, so a model never ships with the wrong tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .errors import ConvertError


def load_checked(path: Path, recorded_hash: Optional[str], model_vocab: int):
    """Load a tokenizer and check it is the one the model was trained with."""
    from ..tokenizer import TokenizerError, load_tokenizer
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        raise ConvertError(f"tokenizer: {e}. Pass --tokenizer with the tokenizer the model was trained with, "
                           f"or --no-tokenizer to export the weights alone") from None
    if recorded_hash and tok.hash != recorded_hash:
        raise ConvertError(f"tokenizer mismatch: the checkpoint was trained with tokenizer {recorded_hash[:23]}… but "
                           f"{str(path)!r} is {tok.hash[:23]}…; pass --tokenizer with the training tokenizer "
                           f"(or --no-tokenizer)")
    if tok.vocab_size > model_vocab:
        raise ConvertError(f"tokenizer {str(path)!r} has {tok.vocab_size} tokens but the model only "
                           f"{model_vocab} (model.vocab_size): not the model's tokenizer")
    return tok


def write_tokenizer(tok, dest: Path, model_max_length: Optional[int] = None) -> list[str]:
    """Write the Hugging Face tokenizer files of `tok` into `dest` (an export directory)."""
    if tok.kind == "sentencepiece":
        from ..tokenizer import export_hf
        tmp = dest / ".tokenizer-export"
        export_hf(tok.model_proto, tmp, model_max_length=model_max_length)
        names = []
        for f in sorted(tmp.iterdir()):
            f.rename(dest / f.name)
            names.append(f.name)
        tmp.rmdir()
        return names
    from ..tokenizer.hf import HF_TOKENIZER_FILES
    src = Path(tok.path)
    names = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
    for n in names:
        shutil.copyfile(src / n, dest / n)
    return names
