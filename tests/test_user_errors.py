"""Everyday mistakes give one clear line naming the bad thing and the fix, before any work, and leave
nothing behind: an unwritable --out, `megamom eval` on a run directory or on something that is no
checkpoint, overrides eval does not take, a dataset without the split asked for, warmup longer than
the run, a malformed JSON line. Finished outputs get the modes the umask gives (not mkdtemp's 0700).
One tiny tokenizer, model checkpoint (via `convert from-hf`: no training) and dataset serve all."""
import gzip
import json
import os
from pathlib import Path

import pytest

from megamom.assets import corpus_path
from megamom.cli import main
from megamom.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{"text": .jsonl, "tok", "run": run directory (train.out_dir), "step": its checkpoint,
    "data": dataset without a val split, "hf": a Hugging Face export}."""
    from megamom.config import model_config_from_dict
    from megamom.convert.from_hf import from_hf
    from megamom.convert.to_hf import write_export
    from megamom.data_prep import PrepSettings, prepare
    from megamom.model import CausalLM
    from megamom.tokenizer import TrainSpec, load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("made")
    texts = [json.loads(line)["text"] for line in gzip.open(corpus_path(), "rt", encoding="utf-8")][:20]
    text = root / "a.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(train_tokenizer([str(text)], root / "tok", TrainSpec(vocab_size=400), log=lambda m: None))
    cfg = model_config_from_dict(dict(vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, head_dim=8,
                                      chunk_size=16, num_memories=2, topk=1, max_position_embeddings=64))
    (root / "hf").mkdir()
    write_export(root / "hf", cfg, CausalLM(cfg).state_dict(), tokenizer=tok)
    step = from_hf(str(root / "hf"), str(root / "run" / "checkpoints" / "step_00000000"), echo=lambda m: None)
    prepare([str(text)], root / "data", tok, PrepSettings(seq_len=64), progress=False, log=lambda m: None)
    return {"text": text, "tok": root / "tok", "run": root / "run", "step": step, "data": root / "data",
            "hf": root / "hf"}


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ unwritable --out
def test_an_unwritable_out_is_one_line_naming_it_and_the_os_reason(made, tmp_path, capsys):
    """Under a regular file nothing can be made (as root too, where a chmod would not stop it)."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    out = afile / "sub"
    want = f"--out '{out}' is not writable (Not a directory: '{afile}'); choose another directory"
    commands = {
        "prep": ["prep", made["text"], "--out", out, "--tokenizer", made["tok"], "--no-progress"],
        "tokenizer": ["tokenizer", "train", made["text"], "--out", out, "--vocab-size", "400"],
        "convert to-hf": ["convert", "to-hf", "--checkpoint", made["run"], "--out", out],
        "convert from-hf": ["convert", "from-hf", "--model", made["hf"], "--out", out],
    }
    for name, args in commands.items():
        code, stdout, stderr = cli(capsys, *args)
        assert (code, stdout, stderr) == (2, "", f"megamom {name}: error: {want}\n"), name
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    from megamom.data_prep import PrepError, prepare  # the library call says the same
    with pytest.raises(PrepError) as e:
        prepare([str(made["text"])], out, str(made["tok"]), progress=False, log=lambda m: None)
    assert str(e.value) == want


# ------------------------------------------------------------------------------------ megamom eval
def eval_json(capsys, *args) -> dict:
    code, stdout, stderr = cli(capsys, "eval", *args)
    assert code == 0, stderr
    return json.loads(stdout)


def test_eval_reports_each_dataset_of_a_mixture(made, tmp_path, capsys):
    from megamom.data_prep import PrepSettings, prepare
    from megamom.tokenizer import load_tokenizer
    texts = [json.loads(line)["text"] for line in gzip.open(corpus_path(), "rt", encoding="utf-8")][20:40]
    other = tmp_path / "b.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    second = tmp_path / "data2"
    prepare([str(other)], second, load_tokenizer(made["tok"]), PrepSettings(seq_len=64), progress=False,
            log=lambda m: None)
    common = ["--checkpoint", made["step"], "--split", "train", "--max-batches", "2"]
    both = eval_json(capsys, *common, "--data", made["data"], second)
    alone = [eval_json(capsys, *common, "--data", d) for d in (made["data"], second)]
    assert set(both["datasets"]) == {str(made["data"]), str(second)}
    for d, one in zip((made["data"], second), alone):
        got = both["datasets"][str(d)]
        assert got["tokens"] == one["tokens"] and abs(got["loss"] - one["loss"]) < 1e-9, (got, one)
        assert "datasets" not in one  # one dataset: the plain report
    assert both["tokens"] > 0 and 5.0 < both["loss"] < 7.0


def test_eval_takes_a_run_directory_and_names_what_is_no_checkpoint(made, tmp_path, capsys):
    common = ["--data", made["data"], "--split", "train", "--max-batches", "2"]
    by_step = eval_json(capsys, "--checkpoint", made["step"], *common)
    assert eval_json(capsys, "--checkpoint", made["run"], *common) == by_step  # its newest checkpoint
    assert by_step["step"] == 0 and by_step["tokens"] == 2 * 8 * 64 and 5.0 < by_step["loss"] < 7.0  # ~ln(400)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    for d in (empty, other):
        code, stdout, stderr = cli(capsys, "eval", "--checkpoint", d, *common)
        assert (code, stdout) == (2, "")
        assert stderr == (f"megamom eval: error: '{d}' is not a megamom checkpoint (no COMPLETE.json / "
                          "trainer_state.json) nor a run directory with checkpoints/; pass a step_* directory "
                          "(…/checkpoints/step_XXXXXXXX) or a train.out_dir\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other"] and not any(empty.iterdir())


def test_eval_takes_data_and_implementation_overrides_and_names_the_rest(made, capsys):
    common = ["--checkpoint", made["run"], "--data", made["data"], "--split", "train", "--max-batches", "2"]
    plain = eval_json(capsys, *common)
    # after --data (which takes several values) and before the options alike
    assert eval_json(capsys, *common, "model.kernel_backend=torch", "data.num_workers=0") == plain
    assert eval_json(capsys, "model.loss_chunk_size=0", *common) == pytest.approx(plain)
    code, _, stderr = cli(capsys, "eval", *common, "train.lr=1", "model.hidden_size=8")
    assert code == 2
    assert stderr == ("megamom eval: config error: megamom eval does not take train.lr, model.hidden_size: it takes "
                      "data.* (but not data.paths: pass --data) and model.kernel_backend, model.attn_impl, "
                      "model.loss_chunk_size, model.scan_keep (the model and the training settings are the "
                      "checkpoint's)\n")
    code, _, stderr = cli(capsys, "eval", *common, "data.seq_len=32")  # reaches the loader's check of the dataset
    assert code == 2 and f"data.seq_len=32 but '{made['data']}' was prepared with seq_len=64" in stderr
    code, _, stderr = cli(capsys, "eval", *common, "data.seqlen=32")
    assert code == 2 and "unknown config key 'data.seqlen'" in stderr and "did you mean 'data.seq_len'?" in stderr


def test_eval_of_a_split_the_dataset_lacks(made, capsys):
    code, stdout, stderr = cli(capsys, "eval", "--checkpoint", made["run"], "--data", made["data"])  # --split val
    assert (code, stdout) == (2, "")
    assert stderr == (f"megamom eval: config error: dataset '{made['data']}' has no 'val' split; prepare it with one "
                      "(`megamom prep ... --val-fraction 0.01`) or pass --split train\n")


# ------------------------------------------------------------------------------------ config, data
def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["train.max_steps=20"])  # tiny.yaml warms up for 30 steps
    assert str(e.value) == ("train.warmup_steps=30 exceeds train.max_steps=20: lower train.warmup_steps or raise "
                            "train.max_steps")
    assert load_config(CONFIGS / "tiny.yaml", ["train.max_steps=30"]).train.warmup_steps == 30  # equal is fine
    assert load_config(None).train.warmup_steps <= load_config(None).train.max_steps  # the defaults
    shipped = sorted(CONFIGS.glob("*.yaml"))
    assert len(shipped) >= 6
    for path in shipped:
        t = load_config(path).train
        assert 0 < t.warmup_steps <= t.max_steps, path.name


def test_malformed_json_message_reads_once(made, tmp_path):
    from megamom.data_prep import prepare
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "cut off\n{"text": "no end')  # json's messages end in "at"
    m = prepare([str(src)], tmp_path / "out", str(made["tok"]), progress=False, log=lambda m: None)
    assert [b["detail"] for b in m["errors"]] == ["Invalid control character at column 18",
                                                  "Unterminated string starting at column 10"]
    assert m["errors"][1]["message"].startswith(f"{src}:3: document rejected [malformed_json] (Unterminated string "
                                                "starting at column 10): not a JSON object")


# ------------------------------------------------------------------------------------ output modes
def modes(root: Path) -> dict:
    """{oct mode: kinds} over a tree (root included)."""
    found: dict = {}
    for p in [root, *root.rglob("*")]:
        found.setdefault(oct(p.stat().st_mode & 0o777), set()).add("dir" if p.is_dir() else "file")
    return found


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_modes_the_umask_gives(made, tmp_path, capsys, mask):
    from megamom.data_prep import prepare
    old = os.umask(mask)
    try:
        code, _, stderr = cli(capsys, "convert", "to-hf", "--checkpoint", made["run"], "--out", tmp_path / "hf")
        assert code == 0, stderr
        prepare([str(made["text"])], tmp_path / "data", str(made["tok"]), progress=False, log=lambda m: None)
    finally:
        os.umask(old)
    want = {oct(0o777 & ~mask): {"dir"}, oct(0o666 & ~mask): {"file"}}
    assert modes(tmp_path / "hf") == want  # safetensors writes 0600, mkdtemp makes 0700: both fixed
    assert modes(tmp_path / "data") == want
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "data" / "manifest.json").is_file()
