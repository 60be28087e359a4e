"""The remote code of `megamom`-format exports is generated from the installed megamom sources:
flat, no megamom / triton imports left, every relative import resolvable the way transformers'
loader resolves it (4.x: only the entry file's own imports are copied), and the bundled kernel
dispatcher runs the PyTorch path."""
import ast
import importlib
import re
import sys

import pytest
import torch

from megamom.hf.bundle import ENTRY_MODULES, BundleError, bundle_sources, flat_name, write_bundle

REL = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)  # transformers' own pattern


@pytest.fixture(scope="module")
def files():
    return bundle_sources()


def test_bundle_is_flat_and_self_contained(files):
    assert {"configuration_megamom.py", "modeling_megamom.py", "megamom_model_lm.py",
            "megamom_model_memory_mixer.py", "megamom_kernels_rules.py", "megamom_kernels_short_conv_conv.py",
            "megamom_kernels_gated_delta_rule_chunk.py", "megamom_kernels_gla_chunk.py"} <= set(files)
    for name, text in files.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("megamom", "triton") for a in node.names), name
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in ("megamom", "triton"), (name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, (name, ast.unparse(node))
        for target in REL.findall(text):
            assert f"{target}.py" in files, (name, target)
    assert not any("triton" in n for n in files)


def test_entry_files_import_every_module_they_need_directly(files):
    """transformers 4.x copies, for a local directory, only the modules the entry file imports."""
    def closure(name):
        seen, stack = set(), [name]
        while stack:
            for t in REL.findall(files[stack.pop() + ".py"]):
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return seen
    for entry in ENTRY_MODULES:
        name = flat_name(entry)
        assert closure(name) <= set(REL.findall(files[name + ".py"])), entry


def test_bundle_imports_as_a_package_and_uses_torch_kernels(files, tmp_path, monkeypatch):
    pkg = tmp_path / "bundled_megamom"
    pkg.mkdir()
    write_bundle(pkg)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rules = importlib.import_module("bundled_megamom.megamom_kernels_rules")
        assert rules.triton_available() is False
        assert rules.resolve_backend("auto", torch.device("cuda")) == "torch"
        lm = importlib.import_module("bundled_megamom.megamom_model_lm")
        config = importlib.import_module("bundled_megamom.megamom_config")
        assert lm.CausalLM.__module__ == "bundled_megamom.megamom_model_lm"
        cfg = config.ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, head_dim=4,
                                 chunk_size=4)
        torch.manual_seed(0)
        bundled = lm.CausalLM(cfg)
        from megamom.config import ModelConfig
        from megamom.model import CausalLM
        ours = CausalLM(ModelConfig(**cfg.__dict__))
        ours.load_state_dict(bundled.state_dict())
        x = torch.randint(0, 32, (2, 7))
        assert torch.equal(bundled(x).logits, ours(x).logits)
    finally:
        for m in [m for m in sys.modules if m.startswith("bundled_megamom")]:
            del sys.modules[m]


def test_header_names_the_source(files):
    assert files["megamom_model_lm.py"].startswith("# Bundled by `megamom convert to-hf` from megamom")
    assert "(megamom/model/lm.py)" in files["megamom_model_lm.py"].splitlines()[0]
    assert BundleError.__doc__
