"""The remote code of a `megamom`-format export: the real megamom source files, flattened.

`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` imports `modeling_megamom.py`
from the export directory. Transformers' dynamic-module loader (4.5x and 5.x alike) copies that
file and, recursively, every module it imports as `from .name import ...` -- only modules in the
same directory (`name.py`), no packages. So the bundle is flat: each megamom module the wrappers
need (found by following imports, starting from `megamom.hf.configuration_megamom` and
`megamom.hf.modeling_megamom`) is copied as one file, `megamom.model.lm` -> `megamom_model_lm.py`,
with its megamom imports (relative or absolute) rewritten to the flat names.

Imports of modules that are deliberately left out (the Triton kernels: the export runs on the
PyTorch reference kernels, with no triton import) become `raise ImportError(...)`; megamom only
imports those lazily inside `try` blocks or behind a backend check, so the kernel dispatcher falls
back to the torch path. Any other import form this rewriter does not understand fails loudly at
export time (and in the tests), never in a user's process.

There is no second copy of the model in the repository: the bundle is generated from the installed
megamom at every export.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import megamom

ENTRY_MODULES = ("megamom.hf.configuration_megamom", "megamom.hf.modeling_megamom")
# config.json's pointer from the Auto classes to the bundled classes
AUTO_MAP = {"AutoConfig": "configuration_megamom.MegaMoMConfig",
            "AutoModelForCausalLM": "modeling_megamom.MegaMoMForCausalLM"}
# Left out of the bundle: the Triton paths (CUDA-only, need triton) and sequence-parallel helpers.
EXCLUDED_PREFIXES = (
    "megamom.kernels.triton",  # megamom.kernels.triton (package) and megamom.kernels.triton_ops
    "megamom.kernels.gated_delta_rule.chunk_triton",  # and the parts it composes:
    "megamom.kernels.gated_delta_rule.chunk_bwd",
    "megamom.kernels.gated_delta_rule.chunk_h",
    "megamom.kernels.gated_delta_rule.chunk_index",
    "megamom.kernels.gated_delta_rule.chunk_o",
    "megamom.kernels.gated_delta_rule.wy",
    "megamom.kernels.gated_delta_rule.fused_recurrent",
    "megamom.kernels.gated_delta_rule.transition",
    "megamom.kernels.gla.chunk_triton",
    "megamom.kernels.gla.fused_recurrent",
    "megamom.kernels.short_conv.conv_triton",
)


class BundleError(RuntimeError):
    """The megamom sources use an import form the bundler cannot flatten."""


def flat_name(module: str) -> str:
    """megamom.model.lm -> megamom_model_lm; the wrapper modules keep their own names (auto_map)."""
    if module in ENTRY_MODULES:
        return module.rsplit(".", 1)[1]
    return module.replace(".", "_")


def _excluded(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") or module.startswith(p + "_") for p in EXCLUDED_PREFIXES)


def _source(module: str) -> tuple[str, bool]:
    """(source text, is_package) of an installed megamom module."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot locate the source of {module!r} (installed megamom without sources?)")
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module named by a `from X import ...` statement inside `module`."""
    if node.level == 0:
        return node.module or ""
    package = module if is_package else module.rsplit(".", 1)[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise BundleError(f"{module}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _rewrite(module: str) -> tuple[str, list[str]]:
    """The flattened source of one module and the megamom modules it needs."""
    text, is_package = _source(module)
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []  # (lineno, col, end_lineno, end_col, replacement)
    needed: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "megamom" or alias.name.startswith("megamom."):
                    raise BundleError(f"{module}: `import {alias.name}` cannot be bundled; use `from ... import ...`")
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _resolve(node, module, is_package)
        if not (target == "megamom" or target.startswith("megamom.")):
            continue
        if node.module is None:  # `from . import name`: names must be submodules that are left out
            subs = [f"{target}.{a.name}" for a in node.names]
            if not all(_excluded(s) for s in subs):
                raise BundleError(f"{module}: `from {'.' * node.level} import ...` of bundled modules is not "
                                  f"supported; import names from the module instead")
            replacement = f"raise ImportError({', '.join(subs)!r} ' is not part of the Hugging Face export')"
        elif _excluded(target):
            replacement = f"raise ImportError({target!r} ' is not part of the Hugging Face export')"
        else:
            if target == "megamom" or not _is_module(target):
                raise BundleError(f"{module}: cannot bundle the import of {target!r}")
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            replacement = f"from .{flat_name(target)} import {names}"
            needed.append(target)
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, replacement))
    for lineno, col, end_lineno, end_col, replacement in sorted(edits, reverse=True):
        head = lines[lineno - 1][:col]
        tail = lines[end_lineno - 1][end_col:]
        lines[lineno - 1:end_lineno] = [head + replacement + tail]
    origin = module.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    header = (f"# Bundled by `megamom convert to-hf` from megamom {megamom.__version__} ({origin}),\n"
              f"# megamom imports flattened. Generated file: edit the megamom sources instead.\n")
    return header + "".join(lines), needed


def bundle_sources() -> dict[str, str]:
    """{file name: source} of every module the export's remote code needs."""
    texts: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    queue = list(ENTRY_MODULES)
    while queue:
        module = queue.pop(0)
        if module in texts:
            continue
        texts[module], deps[module] = _rewrite(module)
        name = flat_name(module) + ".py"
        if name in owner:
            raise BundleError(f"{module} and {owner[name]} flatten to the same file {name}")
        owner[name] = module
        queue.extend(deps[module])
    for entry in ENTRY_MODULES:
        texts[entry] += _direct_imports(entry, deps)
    return {flat_name(m) + ".py": text for m, text in texts.items()}


def _direct_imports(entry: str, deps: dict[str, list[str]]) -> str:
    """transformers 4.x copies, for a local directory, only the modules the entry file imports
    itself (5.x and Hub repositories follow imports recursively): import the rest here too."""
    closure, stack = set(), list(deps[entry])
    while stack:
        m = stack.pop()
        if m not in closure:
            closure.add(m)
            stack.extend(deps[m])
    rest = sorted(closure - set(deps[entry]), key=flat_name)
    if not rest:
        return ""
    lines = ["", "", "# Every bundled module this file needs, imported directly: transformers 4.x copies only",
             "# the modules an entry file imports itself when loading from a local directory."]
    lines += [f"from .{flat_name(m)} import __name__ as _bundled_{flat_name(m)}  # noqa: E402,F401" for m in rest]
    return "\n".join(lines) + "\n"


def write_bundle(out_dir: str | Path) -> list[str]:
    """Write the remote code into an export directory; returns the file names."""
    out = Path(out_dir)
    files = bundle_sources()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return sorted(files)
