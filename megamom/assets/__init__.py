"""Files shipped inside the package: the default training corpus (see PROVENANCE.md)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent
KJV = HERE / "kjv.jsonl.gz"  # King James Bible, one chapter per line: {"text", "book", "chapter"}


def corpus_path() -> Path:
    return KJV
