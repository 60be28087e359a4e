"""Checkpoint conversion end to end, from real trainer checkpoints (ZeRO-1, ZeRO-2, and ZeRO-3 written
by 2 processes under torchrun): the export loads with transformers in a subprocess where megamom is
not importable (the installed transformers 5.x; 4.57 and 4.50 when they can be installed), its
logits equal megamom's (fp32, <= 1e-5) and greedy generations are identical; fla exports load into
flash-linear-attention's MomForCausalLM with strict=True; round trips are exact; bad input gives a
clear error and leaves nothing behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamom.config import model_config_from_dict
from megamom.convert.errors import ConvertError
from megamom.convert.from_hf import from_hf
from megamom.convert.hf_io import read_weights
from megamom.convert.to_hf import to_hf
from megamom.generate import generate
from megamom.model import CausalLM
from megamom.train.checkpoint import load_model_state_dict, read_trainer_state

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.head_dim=8", "model.chunk_size=16",
        "train.micro_batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "train.lr=1e-2",
        "train.eval_every=0", "train.eval_steps=1", "train.log_every=1", "--sample-prompt="]
RUNS = {  # name: (processes, overrides)
    "mom-zero1": (1, ["train.zero_stage=1"]),
    "transformer-zero2": (1, ["train.zero_stage=2", "model.arch=transformer", "model.num_kv_heads=1",
                              "model.tie_word_embeddings=false"]),
    "mom-zero3-2proc": (2, ["train.zero_stage=3", "model.num_memories=3", "model.topk=1", "model.expand_v=2"]),
    "gla-zero2": (1, ["train.zero_stage=2", "model.arch=linear", "model.update_rule=gla",
                      "model.per_memory_conv=true"]),
}
PROMPTS = ["And God said", "In the beginning God created the heaven"]
NEW_TOKENS = 8
CLEAN_SCRIPT = r'''
import importlib.abc, importlib.util, json, sys

class NoMegamom(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megamom" or name.startswith("megamom."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the export must not need megamom)")

sys.meta_path.insert(0, NoMegamom())
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import megamom
    raise SystemExit("megamom is importable")
except ModuleNotFoundError:
    pass
exports, prompts, new_tokens, out_file = json.loads(sys.argv[1])
results = {"transformers": transformers.__version__}
for name, path in exports.items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    rows = [[tok.bos_token_id] + tok(p)["input_ids"] for p in prompts]
    r = {"module": type(model).__module__, "ids": rows, "logits": [], "greedy": []}
    with torch.no_grad():
        for row in rows:
            x = torch.tensor([row])
            r["logits"].append(model(x).logits[0])
            r["greedy"].append(model.generate(x, max_new_tokens=new_tokens, do_sample=False)[0, len(row):].tolist())
        if model.config.arch != "transformer":  # the prompts as one left-padded batch
            T = max(map(len, rows))
            x = torch.tensor([[tok.pad_token_id] * (T - len(row)) + row for row in rows])
            mask = torch.tensor([[0] * (T - len(row)) + [1] * len(row) for row in rows])
            out = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
            r["batch"] = out[:, T:].tolist()
    if name == "mom-zero1":  # save_pretrained of the remote-code model ships the code again
        resaved = out_file[:-len("results.pt")] + "resaved"  # (no dot: transformers 4.50 imports the dir name)
        model.save_pretrained(resaved)
        again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
        with torch.no_grad():
            r["resaved_equal"] = torch.equal(again(torch.tensor([rows[0]])).logits[0], r["logits"][0])
    results[name] = r
torch.save(results, out_file)
'''


def _train(env, exe, out_dir, nproc, overrides):
    args = ["train", *TINY, f"train.out_dir={out_dir}", *overrides]
    cmd = [exe, *args] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc-per-node={nproc}", "-m", "megamom.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"training failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return Path(out_dir)


@pytest.fixture(scope="module")
def env(megamom_cache, tmp_path_factory):
    e = dict(os.environ, MEGAMOM_CACHE=str(megamom_cache), OMP_NUM_THREADS="1",
             HF_HOME=str(tmp_path_factory.mktemp("hf-home")))
    e.pop("MEGAMOM_FAULT", None)
    return e


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """name -> run directory (train.out_dir) of a real 2-step training run."""
    exe = str(Path(sys.executable).parent / "megamom")
    root = tmp_path_factory.mktemp("runs")
    return {name: _train(env, exe, root / name, nproc, ov) for name, (nproc, ov) in RUNS.items()}


def step_dir(run: Path) -> Path:
    return run / "checkpoints" / "step_00000002"


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, run in runs.items():  # the run directory: the newest complete checkpoint is taken
        out[name] = to_hf(str(run), str(root / name), echo=lambda m: None,
                          max_shard_size="200KB" if name == "mom-zero3-2proc" else "5GB")
    return out


def megamom_reference(ckpt: Path):
    state = read_trainer_state(ckpt)
    model = CausalLM(model_config_from_dict(state["config"]["model"])).eval()
    model.load_state_dict(load_model_state_dict(ckpt), strict=True)
    from megamom.tokenizer import load_tokenizer
    return model, load_tokenizer(state["tokenizer"]["path"])


# ------------------------------------------------------------------------------------------- layout
def test_checkpoints_are_the_zero_layouts_asked_for(runs):
    z3 = step_dir(runs["mom-zero3-2proc"])
    assert len(list(z3.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
    for name in ("mom-zero1", "transformer-zero2"):
        assert list(step_dir(runs[name]).glob("*zero_pp_rank_0_*optim_states.pt"))
        assert read_trainer_state(step_dir(runs[name]))["config"]["train"]["zero_stage"] == int(name[-1])


def test_export_layout(exports, runs):
    d = exports["mom-zero1"]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json", "configuration_megamom.py", "modeling_megamom.py"} <= names
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "megamom" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == config["bos_token_id"] == 1
    assert "trust_remote_code=True" in (d / "README.md").read_text()
    sharded = exports["mom-zero3-2proc"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    assert not (sharded / "model.safetensors").exists()
    assert not list(d.parent.glob(".*tmp*"))  # nothing left from staging


def test_export_code_has_no_import_cycle(exports):
    """transformers 4.x walks the remote code's relative imports (indented ones too) in a loop that
    never ends on a cycle (`dynamic_module_utils.get_relative_import_files` compares names with and
    without ".py"): loading then hangs, so the shipped modules must import each other acyclically."""
    import re
    d = exports["mom-zero1"]
    graph = {f.stem: set(re.findall(r"^\s*from\s+\.(\S+)\s+import", f.read_text(), flags=re.MULTILINE))
             for f in d.glob("*.py")}
    assert "megamom_model_router" in graph["megamom_model_memory_mixer"]  # (the walk sees the real imports)
    state: dict = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import cycle in the exported code: " + " -> ".join(path + [m]))
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph.get(m, ())):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


# ------------------------------------------------------------------------------------------- transformers
OLDER = {  # transformers 4.x releases checked besides the installed one, with the pins they need
    "4.57": ["transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2"],
    "4.50": ["transformers==4.50.3", "huggingface_hub==0.36.2", "tokenizers==0.21.4"],  # pyproject's floor
}


def _older_transformers(request, version: str) -> str:
    """A directory holding an older transformers (+ its hub / tokenizers pins), installed once into
    the pytest cache; the subprocess puts it first on sys.path (torch etc. come from this venv)."""
    given = os.environ.get(f"MEGAMOM_TEST_TRANSFORMERS_{version.replace('.', '_')}")
    if given:
        return given
    target = Path(request.config.cache.mkdir(f"transformers-{version}"))
    if not (target / "transformers" / "__init__.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               *OLDER[version], "requests", "urllib3", "idna", "certifi", "charset_normalizer"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            pytest.skip(f"cannot install transformers {version} for the compatibility check: {r.stderr[-300:]}")
    return str(target)


@pytest.mark.parametrize("transformers_version", ["installed", *OLDER])
def test_export_loads_without_megamom_and_matches(transformers_version, exports, runs, env, tmp_path, request):
    sub_env = dict(env, HF_HOME=str(tmp_path / "hf"))
    if transformers_version != "installed":
        sub_env["PYTHONPATH"] = _older_transformers(request, transformers_version)
    out_file = tmp_path / "results.pt"
    arg = json.dumps([{k: str(v) for k, v in exports.items()}, PROMPTS, NEW_TOKENS, str(out_file)])
    r = subprocess.run([sys.executable, "-c", CLEAN_SCRIPT, arg], cwd=tmp_path, env=sub_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    results = torch.load(out_file, weights_only=True)
    if transformers_version != "installed":
        assert results["transformers"].startswith(transformers_version + ".")
    for name, run in runs.items():
        res = results[name]
        assert res["module"].startswith("transformers_modules."), res["module"]  # the shipped remote code
        model, tok = megamom_reference(step_dir(run))
        for prompt, row, logits, greedy in zip(PROMPTS, res["ids"], res["logits"], res["greedy"]):
            assert row == [tok.bos_id] + tok.encode(prompt)  # the exported tokenizer gives identical ids
            x = torch.tensor([row])
            with torch.no_grad():
                ref = model(x).logits[0]
            assert (logits - ref).abs().max() <= 1e-5, name
            ours = generate(model, x, NEW_TOKENS)[0, len(row):].tolist()
            assert greedy == ours, name
            with torch.no_grad():  # and greedy = argmax of the parallel forward over the whole output
                full = model(torch.tensor([row + greedy])).logits[0]
            assert full[len(row) - 1:-1].argmax(-1).tolist() == greedy
        if "batch" in res:
            assert res["batch"] == res["greedy"], name  # left padding is exact
    assert results["mom-zero1"]["resaved_equal"]


# ------------------------------------------------------------------------------------------- fla format
@pytest.mark.parametrize("name", ["mom-zero1", "mom-zero3-2proc"])
def test_fla_export_loads_into_flash_linear_attention(name, runs, tmp_path, fla_import):
    fla_models = fla_import("fla.models")
    out = to_hf(str(runs[name]), str(tmp_path / "fla"), fmt="fla", echo=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mom" and config["architectures"] == ["MomForCausalLM"]
    model = fla_models.MomForCausalLM(fla_models.MomConfig(**config))
    sd = read_weights(out)
    assert ("lm_head.weight" in sd) == (not config["tie_word_embeddings"])
    if config["tie_word_embeddings"]:
        sd["lm_head.weight"] = sd["model.embeddings.weight"]
    model.load_state_dict(sd, strict=True)
    theirs = model.state_dict()
    assert all(theirs[k].shape == v.shape and torch.equal(theirs[k], v) for k, v in sd.items())
    cfg = model_config_from_dict(read_trainer_state(step_dir(runs[name]))["config"]["model"])
    assert theirs["model.layers.0.attn.k_proj.0.weight"].shape == (cfg.key_dim, cfg.hidden_size)
    assert theirs["model.layers.0.attn.v_conv1d.weight"].shape == (cfg.value_dim, 1, cfg.conv_size)
    # and through transformers' Auto classes, as users load it
    from transformers import AutoModelForCausalLM
    auto = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(auto).__name__ == "MomForCausalLM"
    assert all(torch.equal(auto.state_dict()[k], v) for k, v in sd.items())


# ------------------------------------------------------------------------------------------- round trips
def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,fmt", [("mom-zero1", "megamom"), ("transformer-zero2", "megamom"),
                                      ("gla-zero2", "megamom"), ("mom-zero3-2proc", "fla")])
def test_round_trip_is_exact(name, fmt, runs, tmp_path):
    quiet = dict(echo=lambda m: None)
    ckpt = step_dir(runs[name])
    hf1 = to_hf(str(ckpt), str(tmp_path / "hf1"), fmt=fmt, **quiet)
    back = from_hf(str(hf1), str(tmp_path / "ckpt"), **quiet)
    assert _same_tensors(load_model_state_dict(back), load_model_state_dict(ckpt))
    s0, s1 = read_trainer_state(ckpt), read_trainer_state(back)
    assert s1["config"]["model"] == s0["config"]["model"]
    assert s1["tokenizer"]["hash"] == s0["tokenizer"]["hash"] and s1["weights_only"] is True
    hf2 = to_hf(str(back), str(tmp_path / "hf2"), fmt=fmt, **quiet)
    assert _same_tensors(read_weights(hf1), read_weights(hf2))
    assert json.loads((hf1 / "config.json").read_text()) == json.loads((hf2 / "config.json").read_text())


def test_bf16_export(runs, tmp_path):
    ckpt = step_dir(runs["mom-zero1"])
    out = to_hf(str(ckpt), str(tmp_path / "bf16"), dtype="bf16", echo=lambda m: None)
    sd = read_weights(out)
    original = load_model_state_dict(ckpt)
    for k, v in sd.items():
        keep32 = k.endswith(("A_log", "dt_bias"))  # per-head decay stays float32
        assert v.dtype == (torch.float32 if keep32 else torch.bfloat16), k
        assert torch.equal(v, original[k].to(v.dtype))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_hf(str(out), str(tmp_path / "ckpt"), echo=lambda m: None)
    assert all(torch.equal(t, sd[k].float()) for k, t in load_model_state_dict(back).items())


def test_command_line(runs, env, tmp_path):
    exe = str(Path(sys.executable).parent / "megamom")
    r = subprocess.run([exe, "convert", "to-hf", "--checkpoint", str(runs["mom-zero1"]), "--out", str(tmp_path / "hf"),
                        "--verify"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "hf")  # stdout: the output path only
    assert "verified" in r.stderr
    r = subprocess.run([exe, "convert", "from-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ckpt" / "COMPLETE.json").is_file()


# ------------------------------------------------------------------------------------------- bad input
def _nothing_left(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _expect(match: str, fn, *args, **kwargs):
    with pytest.raises(ConvertError, match=match):
        fn(*args, echo=lambda m: None, **kwargs)


def test_bad_checkpoints(runs, tmp_path):
    out = tmp_path / "out"
    _expect("does not exist", to_hf, str(tmp_path / "nope"), str(out))
    partial = tmp_path / "partial"
    shutil.copytree(step_dir(runs["mom-zero1"]), partial)
    (partial / "COMPLETE.json").unlink()
    _expect("incomplete", to_hf, str(partial), str(out))
    interrupted = tmp_path / "run" / "checkpoints" / ".tmp-step_00000004"
    interrupted.mkdir(parents=True)
    _expect("no complete checkpoint", to_hf, str(tmp_path / "run"), str(out))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    _expect("not a megamom checkpoint", to_hf, str(other), str(out))
    missing_shard = tmp_path / "z3"
    shutil.copytree(step_dir(runs["mom-zero3-2proc"]), missing_shard)
    next(missing_shard.glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    _expect("cannot read the weights", to_hf, str(missing_shard), str(out))
    assert _nothing_left(out)


def test_bad_requests(runs, exports, tmp_path):
    out = tmp_path / "out"
    mom = str(runs["mom-zero1"])
    _expect("unknown format 'onnx'", to_hf, mom, str(out), fmt="onnx")
    _expect("unknown dtype", to_hf, mom, str(out), dtype="fp8")
    _expect("Hugging Face model directory", to_hf, str(exports["mom-zero1"]), str(out))
    _expect(r"model.arch='transformer'", to_hf, str(runs["transformer-zero2"]), str(out), fmt="fla")
    with pytest.raises(ConvertError) as e:
        to_hf(str(runs["gla-zero2"]), str(out), fmt="fla", echo=lambda m: None)
    message = str(e.value)
    assert "update_rule='gla'" in message and "per_memory_conv" in message and "--format megamom" in message
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect("not empty", to_hf, mom, str(out))
    assert (out / "keep.txt").read_text() == "mine"
    out.joinpath("keep.txt").unlink()
    out.rmdir()
    assert _nothing_left(out)


def test_tokenizer_mismatch(runs, tmp_path):
    from megamom.tokenizer import TrainSpec, train_tokenizer
    text = tmp_path / "other.txt"
    text.write_text("a completely different corpus of words\n" * 50 + "with other pieces in it\n" * 50)
    other = train_tokenizer([str(text)], tmp_path / "other-tok", TrainSpec(vocab_size=300), log=lambda *a: None)
    out = tmp_path / "out"
    _expect("tokenizer mismatch", to_hf, str(runs["mom-zero1"]), str(out), tokenizer=str(other))
    _expect("does not exist", to_hf, str(runs["mom-zero1"]), str(out), tokenizer=str(tmp_path / "missing"))
    assert _nothing_left(out)
    done = to_hf(str(runs["mom-zero1"]), str(out), no_tokenizer=True, echo=lambda m: None)
    assert not (done / "tokenizer.json").exists() and (done / "model.safetensors").is_file()


def test_bad_hf_directories(exports, tmp_path):
    out = tmp_path / "out"
    _expect("does not exist", from_hf, str(tmp_path / "nope"), str(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect("no config.json", from_hf, str(empty), str(out))
    llama = tmp_path / "llama"
    shutil.copytree(exports["mom-zero1"], llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _expect("unknown format", from_hf, str(llama), str(out))
    (llama / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    _expect("wrong shape", from_hf, str(llama), str(out))
    sharded = tmp_path / "sharded"
    shutil.copytree(exports["mom-zero3-2proc"], sharded)
    next(sharded.glob("model-00002-of-*.safetensors")).unlink()
    _expect("missing", from_hf, str(sharded), str(out))
    assert _nothing_left(out)


@pytest.mark.parametrize("single_kv_proj", [False, True])
def test_from_a_checkpoint_saved_by_flash_linear_attention(single_kv_proj, tmp_path, fla_import):
    """A checkpoint fla itself wrote (fla's defaults: untied head, intermediate size derived from
    hidden_ratio; or one k/v/beta/decay projection shared by all memories) converts to megamom."""
    fla_models = fla_import("fla.models")
    config = fla_models.MomConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=128,
                                  num_memories=3, topk=2, shared_mem=True, single_kv_proj=single_kv_proj,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = fla_models.MomForCausalLM(config)
    model.save_pretrained(tmp_path / "fla")
    theirs = read_weights(tmp_path / "fla")
    ckpt = from_hf(str(tmp_path / "fla"), str(tmp_path / "ckpt"), echo=lambda m: None)
    cfg = model_config_from_dict(read_trainer_state(ckpt)["config"]["model"])
    assert (cfg.arch, cfg.num_memories, cfg.topk, cfg.shared_mem, cfg.tie_word_embeddings) == ("mom", 3, 2, True, False)
    assert cfg.mlp_hidden_size == theirs["model.layers.0.mlp.gate_proj.weight"].shape[0]
    ours = load_model_state_dict(ckpt)
    CausalLM(cfg).load_state_dict(ours, strict=True)
    p = "model.layers.1.attn."
    assert torch.equal(ours[p + "router.weight"], theirs[p + "gate.weight"])
    assert torch.equal(ours[p + "q_conv"][0], theirs[p + "q_conv1d.weight"][:, 0])
    for m in range(3):
        want = theirs[p + ("shared_k.weight" if single_kv_proj else f"k_proj.{m}.weight")]
        assert torch.equal(ours[p + "k_proj"][m], want)
    assert torch.equal(ours[p + "shared_k_proj"], theirs[p + "shared_k.weight"])
    if not single_kv_proj:  # and back to fla: the same tensors
        again = to_hf(str(ckpt), str(tmp_path / "fla2"), fmt="fla", no_tokenizer=True, echo=lambda m: None)
        assert _same_tensors(read_weights(again), theirs)


def test_cli_errors_exit_2_and_name_the_problem(tmp_path, capsys):
    from megamom.cli import main
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "from-hf", "--out", str(tmp_path / "o")]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spelling", ["num_memories", "num_experts"])
def test_from_a_checkpoint_in_the_mom_authors_layout(spelling, tmp_path, capsys):
    """A synthetic checkpoint in the MoM authors' released layout (`mom_gated_deltanet`: per-memory
    Linears, `shared_k/v/b/a`, `gate`, depthwise q/k/v_conv1d, the MLP's gate and up fused in one
    gate_proj, an unused `D`), written from a megamom model with their key names, shapes and config
    keys (also the first spellings num_experts / single_expert), imports to the same logits."""
    from megamom.cli import main
    from megamom.config import ModelConfig
    from megamom.convert.hf_io import write_safetensors
    from megamom.convert.paper_format import to_paper_state_dict
    cfg = ModelConfig(arch="mom", vocab_size=128, hidden_size=64, num_layers=2, num_heads=2, head_dim=16,
                      num_memories=3, topk=2, shared_mem=True, hidden_ratio=3, intermediate_size=None,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    theirs = to_paper_state_dict(model.state_dict(), cfg)
    I = cfg.mlp_hidden_size
    assert theirs["model.layers.0.mlp.gate_proj.weight"].shape == (2 * I, 64) and "model.layers.0.attn.D" in theirs
    assert "model.layers.0.attn.k_proj.2.weight" in theirs and "model.layers.0.mlp.up_proj.weight" not in theirs
    fc = {"model_type": "mom_gated_deltanet", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2,
          "head_dim": 16, "expand_v": 1, "vocab_size": 128, spelling: 3, "topk": 2, "shared_mem": True,
          ("single_kv_proj" if spelling == "num_memories" else "single_expert"): False, "hidden_ratio": 3,
          "intermediate_size": None, "tie_word_embeddings": True, "use_gate": True, "capacity": 1.0,
          "norm_eps": cfg.norm_eps, "max_position_embeddings": 2048}
    src = tmp_path / "paper"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(fc))
    write_safetensors(theirs, src, 1 << 30)
    code = main(["convert", "from-hf", "--model", str(src), "--out", str(tmp_path / "ckpt"), "--format",
                 "mom-paper"])
    err = capsys.readouterr().err
    assert code == 0, err
    back = model_config_from_dict(read_trainer_state(tmp_path / "ckpt")["config"]["model"])
    assert (back.num_memories, back.mlp_hidden_size, back.shared_mem, back.per_memory_conv) == (3, I, True, False)
    imported = CausalLM(back).eval()
    imported.load_state_dict(load_model_state_dict(tmp_path / "ckpt"), strict=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids, return_logits=True).logits, model(ids, return_logits=True).logits,
                                   rtol=0, atol=0)
    # a wrong --format, and a fused MLP of the wrong width, are refused naming the fix
    assert main(["convert", "from-hf", "--model", str(src), "--out", str(tmp_path / "x"), "--format", "fla"]) == 2
    assert "'mom-paper' format" in capsys.readouterr().err and not (tmp_path / "x").exists()
    theirs["model.layers.1.mlp.gate_proj.weight"] = theirs["model.layers.1.mlp.gate_proj.weight"][:-2]
    write_safetensors(theirs, src, 1 << 30)
    assert main(["convert", "from-hf", "--model", str(src), "--out", str(tmp_path / "y")]) == 2
    assert "2 x intermediate size" in capsys.readouterr().err and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------- lm-evaluation-harness
LM_EVAL_TASK = """task: megamom_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
LM_EVAL_DOCS = [("In the beginning God created the", ["heaven", "table", "river"], 0),
                ("And God said, Let there be", ["light", "cheese", "Tuesday"], 0),
                ("And God called the light", ["Night", "Day", "Sea"], 1)]


@pytest.mark.parametrize("name", ["mom-zero1", "transformer-zero2"])
def test_lm_evaluation_harness_scores_an_export_as_megamom_does(name, exports, runs, env, tmp_path):
    """lm-evaluation-harness (`lm_eval --model hf`, trust_remote_code) on a local multiple-choice task:
    every choice's log-likelihood equals megamom's own (the continuation's tokens given the context,
    float32), and the accuracy is the share of documents whose answer scores highest."""
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in LM_EVAL_DOCS))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    exe = str(Path(sys.executable).parent / "lm_eval")
    r = subprocess.run([exe, "--model", "hf", "--model_args", f"pretrained={exports[name]},trust_remote_code=True,"
                        "dtype=float32", "--tasks", "megamom_tiny", "--include_path", str(tmp_path), "--device", "cpu",
                        "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                       env=dict(env, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_megamom_tiny_*.jsonl")
               for line in f.read_text().splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["megamom_tiny"]
    model, tok = megamom_reference(step_dir(runs[name]))
    right = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        question, choices, answer = LM_EVAL_DOCS[s["doc_id"]]
        context = tok.encode(question)
        ours = []
        for choice in choices:
            whole = tok.encode(f"{question} {choice}")
            assert whole[:len(context)] == context
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids[:, :-1], return_logits=True).logits.double().log_softmax(-1)[0]
            ours.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        theirs = [float(resp[0]) for resp in s["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3, (s["doc_id"], ours, theirs)
        right += max(range(len(ours)), key=ours.__getitem__) == answer
    assert len(samples) == len(LM_EVAL_DOCS)
    assert abs(results["acc,none"] - right / len(LM_EVAL_DOCS)) < 1e-9
