"""CLI: subcommands, dotted overrides, clear errors (exit code 2) before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

from megamom.cli import main
from megamom.config import ConfigError, parse_overrides

EXE = str(Path(sys.executable).parent / "megamom")


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)


def test_info_reports_paper_sizes(capsys):
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["info", "--config", str(configs / "mom-340m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "total 512.4M" in out  # the paper's 340M MoM with 4 memories + shared: 512M incl. memories
    assert "activated 411.3M" in out
    assert main(["info", "--config", str(configs / "transformer-340m.yaml")]) == 0
    assert "total 341.1M" in capsys.readouterr().out


def test_override_errors_name_the_key():
    r = run("info", "model.num_memroies=3")
    assert r.returncode == 2
    assert "unknown config key 'model.num_memroies'" in r.stderr and "did you mean 'model.num_memories'" in r.stderr
    r = run("info", "model.topk=9")
    assert r.returncode == 2 and "model.topk=9 exceeds model.num_memories=4" in r.stderr
    r = run("info", "model.hidden_size=big")
    assert r.returncode == 2 and "model.hidden_size='big'" in r.stderr and "expected int" in r.stderr
    r = run("info", "--config", "/nonexistent.yaml")
    assert r.returncode == 2 and "/nonexistent.yaml" in r.stderr and "does not exist" in r.stderr
    r = run("nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_parse_overrides_types():
    tree = parse_overrides(["model.num_memories=8", "train.lr=1e-3", "model.shared_mem=false", "data.paths=[a, b]"])
    assert tree == {"model": {"num_memories": 8, "shared_mem": False}, "train": {"lr": "1e-3"},
                    "data": {"paths": ["a", "b"]}}
    from megamom.config import load_config
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 string, coerced for floats
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["model.num_memories"])
