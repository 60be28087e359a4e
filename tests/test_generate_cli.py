"""`megamom generate`: from a Hugging Face export and from a trainer checkpoint, greedy output equal to
megamom's own generation (BOS first only where the training documents had it, one packed batch for
several prompts, from --prompt or a --prompts-file), a single prompt streamed, reproducible sampling,
clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamom.cli import main
from megamom.config import model_config_from_dict
from megamom.convert.to_hf import to_hf
from megamom.generate import generate
from megamom.model import CausalLM
from megamom.tokenizer import load_tokenizer
from megamom.train.checkpoint import load_model_state_dict, read_trainer_state

PROMPTS = ["And God said", "In the beginning God created the heaven and the earth"]


@pytest.fixture(scope="module")
def trained(megamom_cache, tmp_path_factory):
    """(run directory, Hugging Face export) of a real 2-step training run (ZeRO-1)."""
    root = tmp_path_factory.mktemp("gen")
    env = dict(os.environ, MEGAMOM_CACHE=str(megamom_cache), OMP_NUM_THREADS="1")
    env.pop("MEGAMOM_FAULT", None)
    exe = str(Path(sys.executable).parent / "megamom")
    run = root / "run"
    r = subprocess.run([exe, "train", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                        "model.head_dim=8", "model.chunk_size=16", "train.micro_batch_size=2", "train.max_steps=2",
                        "train.warmup_steps=1", "train.lr=1e-2", "train.eval_every=0", "train.eval_steps=1",
                        "--sample-prompt=", f"train.out_dir={run}"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    export = to_hf(str(run), str(root / "hf"), echo=lambda m: None)
    return run, export, env


def reference(run: Path, prompt: str, n: int, bos: bool = False) -> list:
    """megamom's own greedy generation; the prompt starts with BOS only if asked (the shipped corpus
    is prepared without BOS, so by default the model never saw one)."""
    ckpt = run / "checkpoints" / "step_00000002"
    state = read_trainer_state(ckpt)
    model = CausalLM(model_config_from_dict(state["config"]["model"])).eval()
    model.load_state_dict(load_model_state_dict(ckpt))
    tok = load_tokenizer(state["tokenizer"]["path"])
    row = ([tok.bos_id] if bos else []) + tok.encode(prompt)
    out = generate(model, torch.tensor([row]), n, eos_id=tok.eos_id)[0, len(row):].tolist()
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_greedy_batch_equals_megamom(source, trained, capsys):
    run, export, _ = trained
    model = export if source == "export" else run
    args = ["--model", str(model), "--max-new-tokens", "6", "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in results] == PROMPTS
    tok = load_tokenizer(export)
    for r in results:
        assert r["new_token_ids"] == reference(run, r["prompt"], 6)
        assert r["completion"] == tok.decode(r["new_token_ids"])
    assert "tokens/s" in err
    capsys.readouterr()  # (what loading the references printed)
    code, again, err = run_cli(capsys, *args, "--no-cuda-graph")  # (decoding from Python; CUDA graphs need a GPU)
    assert code == 0 and again == out, err


def test_prompts_file_and_streaming(trained, tmp_path, capsys):
    run, export, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    code, out, err = run_cli(capsys, "--model", str(export), "--max-new-tokens", "6", "--json", "--prompts-file",
                             str(prompts))
    assert code == 0, err
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["new_token_ids"] for r in results] == [reference(run, p, 6) for p in PROMPTS]
    # one prompt streams: the prompt, the completion as it comes, a newline; the same text as unstreamed
    want = load_tokenizer(export).decode(reference(run, PROMPTS[1], 6))
    capsys.readouterr()  # (what loading the reference printed)
    code, out, err = run_cli(capsys, "--model", str(export), "--max-new-tokens", "6", "--prompt", PROMPTS[1])
    assert code == 0, err
    assert out == PROMPTS[1] + want + "\n"
    code, _, err = run_cli(capsys, "--model", str(export))
    assert code == 2 and "no prompt" in err
    code, _, err = run_cli(capsys, "--model", str(export), "--prompt", "x", "--top-p", "0")
    assert code == 2 and "--top-p" in err


def test_prompts_start_as_the_training_documents_did(trained, capsys):
    """The run recorded that its documents (the shipped corpus, default prep: EOS only) had no BOS; the
    export carries it; generate follows it unless told otherwise (--bos)."""
    from megamom.convert.to_hf import BOS_KEY
    run, export, _ = trained
    state = read_trainer_state(run / "checkpoints" / "step_00000002")
    assert state["tokenizer"]["documents_start_with_bos"] is False
    assert json.loads((Path(export) / "config.json").read_text())[BOS_KEY] is False
    code, out, err = run_cli(capsys, "--model", str(export), "--max-new-tokens", "6", "--json", "--bos",
                             "--prompt", PROMPTS[0])
    assert code == 0, err
    assert json.loads(out)["new_token_ids"] == reference(run, PROMPTS[0], 6, bos=True)


def test_documents_start_with_bos_is_read_off_the_manifests(tmp_path):
    from megamom.data_prep.prep import documents_start_with_bos
    for name, bos in (("a", True), ("b", False), ("c", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"settings": {"add_bos": bos}}))
    assert documents_start_with_bos([tmp_path / "a", tmp_path / "c"]) is True
    assert documents_start_with_bos([str(tmp_path / "b")]) is False
    assert documents_start_with_bos([tmp_path / "a", tmp_path / "b"]) is None  # they disagree
    assert documents_start_with_bos([tmp_path / "missing"]) is None  # not a local prepared dataset


def test_console_script_and_sampling(trained):
    run, export, env = trained
    exe = str(Path(sys.executable).parent / "megamom")
    cmd = [exe, "generate", "--model", str(export), "--prompt", PROMPTS[0], "--max-new-tokens", "5",
           "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    a = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    b = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]
    assert a.stdout.startswith(PROMPTS[0]) and a.stdout == b.stdout


def test_errors(trained, tmp_path, capsys):
    run, export, _ = trained
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "--model", str(export), "--prompt", "x", "--max-new-tokens", "0")
    assert code == 2 and "--max-new-tokens" in err
    fla_like = tmp_path / "fla"
    fla_like.mkdir()
    (fla_like / "config.json").write_text(json.dumps({"model_type": "mom"}))
    code, _, err = run_cli(capsys, "--model", str(fla_like), "--prompt", "x", "--device", "cpu")
    assert code == 2 and "CUDA" in err
    (fla_like / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(capsys, "--model", str(fla_like), "--prompt", "x", "--device", "cpu")
    assert code == 2 and "model_type 'llama'" in err
