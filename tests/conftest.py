"""Shared fixtures. The default dataset (tokenizer + shards of the shipped corpus) is built once
per session into a temporary cache that every test and subprocess shares via MEGAMOM_CACHE."""
import os
import sys
from pathlib import Path

import pytest

# Subprocesses of the tests (`python -m megamom.cli`, torchrun, the deepspeed launcher) must import
# the installed megamom, not the source tree in the working directory: Python 3.11+ then does not
# put the cwd / script directory first on sys.path.
os.environ.setdefault("PYTHONSAFEPATH", "1")

# Imported before any test module: run as `python -m pytest` in the checkout root, megamom then
# comes from the source tree and takes the root off sys.path, where its kernels/ folder would
# shadow Hugging Face's `kernels` package (transformers imports it).
import megamom  # noqa: E402,F401


@pytest.fixture(scope="session")
def megamom_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("megamom-cache")
    from megamom.data import ensure_default_dataset
    ensure_default_dataset(cache / "default-data", seq_len=128)
    return cache


@pytest.fixture
def megamom_env(megamom_cache) -> dict:
    env = dict(os.environ)
    env["MEGAMOM_CACHE"] = str(megamom_cache)
    env.pop("MEGAMOM_FAULT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session")
def megamom_exe() -> str:
    return str(Path(sys.executable).parent / "megamom")


@pytest.fixture(scope="session")
def fla_import():
    """import_module for flash-linear-attention's modules (a test-only reference, pinned in the dev
    extra). Under the README's test command (MEGAMOM_EXPECT_INSTALLED) its absence fails the test;
    elsewhere (a bare `pytest` without the dev extra) the test skips, saying how to install it."""
    import importlib

    def load(module: str):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            if os.environ.get("MEGAMOM_EXPECT_INSTALLED"):
                pytest.fail(f"{module} does not import ({e}): the dev extra pins flash-linear-attention; reinstall "
                            "with `make test`")
            pytest.skip("flash-linear-attention not installed (pip install '.[dev]'; `make test` fails instead)")
    return load


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip where there is no CUDA device, with one reason that says how to run
    them (CI is CPU-only; benchmarks/README.md says how to run them on a CUDA machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test, no CUDA device here (CI is CPU-only): run `pytest -m gpu` on a GPU "
                                   "machine, see benchmarks/README.md")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
