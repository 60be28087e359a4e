"""MegaMoM: distributed pretraining of Mixture-of-Memories linear sequence models."""
from pathlib import Path as _Path

__version__ = "0.1.0"


def _source_tree_subpackages() -> None:
    """In a source checkout the top-level kernels/, tokenizer/, data_prep/, launchers/ and configs/
    folders are megamom.kernels, ... (pyproject's package-dir does this for installs). When megamom
    itself is imported from the checkout (`python -m megamom.cli` in the repo root, PYTHONPATH=repo),
    search the checkout root for subpackages too, so the same names resolve."""
    root = _Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file():
        __path__.append(str(root))  # noqa: F821  (the package's own __path__)
        # ... and the checkout root leaves sys.path (where `python -m` / `torchrun -m` put the current
        # directory): there its kernels/ would be found as the top-level `kernels`, shadowing Hugging
        # Face's package of that name, which transformers imports. megamom is imported already.
        import os
        import sys
        cwd = os.getcwd()
        sys.path[:] = [p for p in sys.path if _Path(p or cwd).resolve() != root]


_source_tree_subpackages()
