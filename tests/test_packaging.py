"""The installed package: one import namespace, nothing shadowing other packages, every
subpackage shipped, configs packaged."""
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import megamom

ROOT = Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package():
    if os.environ.get("MEGAMOM_EXPECT_INSTALLED") != "1":
        return  # a developer's editable install maps to the source tree; `make test` sets this
    path = Path(megamom.__file__).resolve()
    assert "site-packages" in path.parts, f"megamom imported from {path}, not the installed package"


TOP_LEVEL_FOLDERS = ("kernels", "tokenizer", "data_prep", "launchers", "configs")


def _resolves_to_our_folder(name: str, path: list[str] | None = None) -> bool:
    """Whether the top-level import `name` finds this checkout's folder of that name. Anything else
    is another package (Hugging Face's `kernels`, installed in a venv that may itself live inside
    the checkout, is not our tree)."""
    spec = (importlib.machinery.PathFinder.find_spec(name, path) if path is not None
            else importlib.util.find_spec(name))
    if spec is None:
        return False
    if spec.origin and spec.origin != "namespace":
        places = [Path(spec.origin).parent]
    else:
        places = [Path(p) for p in spec.submodule_search_locations or []]
    return any(place.resolve() == (ROOT / name).resolve() for place in places)


def test_no_top_level_shadowing():
    """`kernels` is Hugging Face's kernel hub package; ours lives at megamom.kernels only."""
    import megamom.kernels  # noqa: F401
    for name in TOP_LEVEL_FOLDERS:
        assert not _resolves_to_our_folder(name), f"top-level {name!r} resolves to our tree"


def test_shadowing_check_tells_a_package_inside_the_checkout_from_our_folder():
    """A fresh clone's `.venv/` lives inside the checkout, and transformers installs Hugging Face's
    `kernels` there: that is another package, not our `kernels/` folder."""
    venv_site = Path(tempfile.mkdtemp(prefix=".venv-shadow-test-", dir=ROOT)) / "site-packages"
    try:
        (venv_site / "kernels").mkdir(parents=True)
        (venv_site / "kernels" / "__init__.py").write_text("")
        assert not _resolves_to_our_folder("kernels", [str(venv_site)])
        assert _resolves_to_our_folder("kernels", [str(ROOT)])  # the check does see our folder
    finally:
        shutil.rmtree(venv_site.parent)


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


def test_running_from_the_checkout_root():
    """`python -m megamom.cli` / `python -m pytest` in the checkout root put it on sys.path: megamom
    then runs from the source tree (its top-level folders as megamom.kernels, ...) and takes the root
    off sys.path, so the top-level `kernels` is never our folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    code = ("import sys, importlib.util, megamom, megamom.kernels, megamom.data_prep; "
            "print(megamom.__file__); print(megamom.kernels.__file__); "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    megamom_file, kernels_file, top_kernels = r.stdout.split()
    assert Path(megamom_file) == ROOT / "megamom" / "__init__.py"
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert top_kernels == "None" or ROOT / "kernels" not in Path(top_kernels).parents
    r = subprocess.run([sys.executable, "-m", "megamom.cli", "--version"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"megamom {megamom.__version__}", r.stderr


def _module_level_imports(module: str, path: Path, is_package: bool, modules: set) -> set:
    """The megamom modules `module` imports when it is imported: its import statements outside
    functions (class bodies, if / try blocks included; `if TYPE_CHECKING:` left out). `from X import
    name` needs X.name when that is a module, else X itself (a name defined in X or its __init__);
    importing a submodule first runs its packages' __init__, except those `module` is inside."""
    import ast

    inside = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    found = set()

    def need(name: str):
        parts = name.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package in modules and package not in inside:
                found.add(package)
        if name in modules:
            found.add(name)

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    need(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module if is_package else module.rsplit(".", 1)[0]
                    base = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        need(f"{target}.{alias.name}")
                    else:
                        need(target)
                        if target in modules:
                            found.add(target)  # names defined in the module or package __init__ itself
            for field in ("body", "orelse", "finalbody", "handlers"):
                walk([n for n in getattr(node, field, None) or [] if isinstance(n, ast.AST)])

    walk(ast.parse(path.read_text(encoding="utf-8")).body)
    found.discard(module)
    return found


def test_no_module_level_import_cycle():
    """No cycle among the imports megamom's modules run when imported (megamom/ and the top-level
    folders installed as megamom.kernels, ...): a cycle makes the import order decide whether a name
    exists yet. Imports inside functions (optional dependencies: Triton, mosaicml-streaming) do not
    count."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files = {}
    for package, folder in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if any(part.startswith(".") for part in rel):
                continue
            is_package = rel[-1] == "__init__"
            files[".".join((package, *(rel[:-1] if is_package else rel)))] = (path, is_package)
    graph = {m: _module_level_imports(m, path, is_package, set(files)) for m, (path, is_package) in files.items()}
    assert "megamom.kernels.rules" in graph and graph["megamom.kernels"]  # the walk sees the mapped folders
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("module-level import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
