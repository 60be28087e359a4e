"""The installed package: one import namespace, nothing shadowing other packages, every
subpackage shipped, configs packaged."""
import importlib
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import megamom

ROOT = Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package():
    if os.environ.get("MEGAMOM_EXPECT_INSTALLED") != "1":
        return  # a developer's editable install maps to the source tree; `make test` sets this
    path = Path(megamom.__file__).resolve()
    assert "site-packages" in path.parts, f"megamom imported from {path}, not the installed package"


def test_no_top_level_shadowing():
    """`kernels` is Hugging Face's kernel hub package; ours lives at megamom.kernels only."""
    import megamom.kernels  # noqa: F401
    for name in ("kernels", "tokenizer", "data_prep", "launchers", "configs"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            assert ROOT not in Path(spec.origin).resolve().parents, f"top-level {name!r} resolves to our tree"


def test_every_package_is_listed_in_pyproject():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    mapping = conf["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if not any(part.startswith((".", "__")) for part in rel.parts):
                found.add(name)
    missing = found - listed
    assert not missing, f"packages not listed in pyproject.toml (they would not be installed): {sorted(missing)}"
    for name in listed:
        importlib.import_module(name)


def test_packaged_configs_and_console_script():
    from importlib import resources
    names = {p.name for p in resources.files("megamom.configs").iterdir()}
    assert {"tiny.yaml", "mom-340m.yaml", "mom-1.3b.yaml", "transformer-340m.yaml", "gdn-340m.yaml",
            "gla-340m.yaml"} <= names
    exe = Path(sys.executable).parent / "megamom"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"megamom {megamom.__version__}"
