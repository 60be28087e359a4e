"""Config validation (clear errors naming the key and the fix), parameter init per the spec,
the weight-decay exclusions, and a tiny model that really learns a fixed batch."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megamom.config import ConfigError, ModelConfig, load_config, parse_overrides
from megamom.model import CausalLM, MemoryMixer

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, overrides, fragments", [
    ("model:\n  num_memory: 8\n", [], ["model.num_memory", "did you mean", "model.num_memories"]),
    ("modle:\n  topk: 2\n", [], ["modle", "did you mean", "model"]),
    ("model:\n  topk: two\n", [], ["model.topk", "'two'", "expected int"]),
    ("model:\n  hidden_size: 64.5\n", [], ["model.hidden_size", "expected int"]),
    ("model:\n  shared_mem: 1\n", [], ["model.shared_mem", "expected bool"]),
    ("model: 3\n", [], ["model", "mapping"]),
    ("model:\n  num_memories: 4\n  topk: 5\n", [], ["model.topk=5", "model.num_memories=4", "lower topk"]),
    ("model:\n  update_rule: gated_delt\n", [], ["model.update_rule", "did you mean", "gated_delta"]),
    ("model:\n  arch: mamba\n", [], ["model.arch", "mom", "linear", "transformer"]),
    ("model:\n  chunk_size: 48\n", [], ["model.chunk_size=48", "power of two"]),
    ("model:\n  num_memories: 0\n", [], ["model.num_memories=0", "> 0"]),
    ("model:\n  conv_size: 1\n", [], ["model.conv_size=1", "use_short_conv"]),
    ("model:\n  aux_loss_coef: -0.1\n", [], ["aux_loss_coef", ">= 0"]),
    ("model:\n  arch: transformer\n  num_heads: 4\n  num_kv_heads: 3\n", [], ["num_kv_heads", "multiple"]),
    ("parallel:\n  tensor: 3\n", [], ["num_heads=4", "parallel.tensor=3"]),
    ("parallel:\n  expert: 3\n", [], ["parallel.expert=3", "num_memories"]),
    ("model:\n  scan_keep: everything\n", [], ["model.scan_keep", "'none', 'states', 'all'"]),
    # CUDA graphs replay fixed shapes and parameter addresses: what would break that is refused
    ("train:\n  cuda_graph: true\n", [], ["train.cuda_graph=true", "data.reset_at_doc_boundaries=true",
                                          "number of documents", "train.cuda_graph=false"]),
    ("train:\n  cuda_graph: true\n  zero_stage: 3\ndata:\n  reset_at_doc_boundaries: false\n", [],
     ["train.zero_stage=3", "gathers and frees the parameters", "use train.zero_stage=0, 1 or 2"]),
    ("train:\n  cuda_graph: true\n  activation_checkpointing: true\n  compile: true\n"
     "data:\n  reset_at_doc_boundaries: false\n", [],
     ["train.activation_checkpointing=true", "train.compile=true"]),
    # the same kind of mistakes from the command line
    ("model:\n  topk: 2\n", ["model.topk=9"], ["model.topk=9", "num_memories"]),
    ("model:\n  topk: 2\n", ["model.topkk=1"], ["model.topkk", "did you mean", "model.topk"]),
    ("model:\n  topk: 2\n", ["model.hidden_size=true"], ["model.hidden_size", "expected int"]),
    ("model:\n  topk: 2\n", ["model.topk"], ["model.topk", "dotted.key=value"]),
    ("model:\n  topk: 2\n", ["model=3", "model.topk=2"], ["conflicts"]),
    ("model:\n  topk: 2\n", ["model..topk=2"], ["empty key part"]),
])
def test_bad_configs_name_the_key_and_the_fix(tmp_path, yaml_text, overrides, fragments):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} missing from the message: {msg}"


def test_config_scan_keeps_mirror_the_kernels():
    from megamom.config import SCAN_KEEPS
    from megamom.kernels.utils import SCAN_KEEPS as KERNEL_SCAN_KEEPS
    assert SCAN_KEEPS == KERNEL_SCAN_KEEPS


@pytest.mark.parametrize("keep", ["states", "all"])
def test_scan_keep_reaches_the_scan_only_with_gradients(monkeypatch, keep):
    """model.scan_keep is what the layer asks of the scan when a backward can follow; under no_grad
    (evaluation, generation) nothing is kept."""
    import megamom.model.memory_mixer as mm
    seen = []
    scan = mm.memory_scan
    monkeypatch.setattr(mm, "memory_scan", lambda *a, **kw: seen.append(kw["keep"]) or scan(*a, **kw))
    cfg = ModelConfig(arch="mom", hidden_size=32, num_heads=2, head_dim=8, num_memories=3, topk=2, vocab_size=64,
                      num_layers=1, chunk_size=16, scan_keep=keep)
    cfg.validate()
    layer = MemoryMixer(cfg)
    x = torch.randn(2, 20, 32)
    layer(x, torch.arange(2).repeat_interleave(20), 2)
    with torch.no_grad():
        layer(x, torch.arange(2).repeat_interleave(20), 2)
    assert seen == [keep, "none"]


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_good_config_and_typed_overrides(tmp_path):
    cfg = load_config(TINY_YAML, ["model.hidden_size=32", "model.update_rule=gla", "train.lr=1",
                                  "model.num_kv_heads=null", "model.shared_mem=false"])
    assert cfg.model.hidden_size == 32 and isinstance(cfg.model.hidden_size, int)
    assert cfg.model.update_rule == "gla" and cfg.model.shared_mem is False
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int coerced to float
    assert cfg.model.num_kv_heads is None
    assert cfg.model.num_memories == 4 and cfg.model.topk == 2  # from tiny.yaml
    assert parse_overrides(["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}
    # overrides win over the file; an override may also fix an invalid file value
    path = write(tmp_path, "model:\n  num_memories: 2\n  topk: 3\n")
    assert load_config(path, ["model.topk=1"]).model.topk == 1


def test_mlp_width_rule():
    assert ModelConfig(hidden_size=1024, hidden_ratio=3).mlp_hidden_size == 2048
    assert ModelConfig(hidden_size=2048, hidden_ratio=4).mlp_hidden_size == 5632
    assert ModelConfig(hidden_size=100, hidden_ratio=3).mlp_hidden_size == 256
    assert ModelConfig(hidden_size=100, intermediate_size=96).mlp_hidden_size == 96


# ------------------------------------------------------------------------------------------------
# Init
# ------------------------------------------------------------------------------------------------

def init_cfg(**kw):
    base = dict(arch="mom", vocab_size=300, hidden_size=64, num_layers=8, num_heads=4, head_dim=16,
                num_memories=4, topk=2)
    base.update(kw)
    return ModelConfig(**base)


def test_init_decay_parameters():
    torch.manual_seed(0)
    model = CausalLM(init_cfg())
    A = torch.cat([layer.attn.A_log.detach().exp() for layer in model.model.layers])
    dt = torch.cat([F.softplus(layer.attn.dt_bias.detach()) for layer in model.model.layers])
    assert A.numel() == dt.numel() == 32
    assert (A > 0).all() and (A <= 16).all() and A.max() > 8 and A.min() < 8  # U(0, 16)
    assert (dt >= 1e-4 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert dt.min() < 0.01 < dt.max()  # log-uniform over [1e-3, 0.1]: both decades are hit
    # dt_bias is the inverse softplus of dt: dt_bias = dt + log(-expm1(-dt)) (check exactly)
    dt64 = dt.double()
    torch.testing.assert_close(torch.cat([layer.attn.dt_bias.detach() for layer in model.model.layers]).double(),
                               dt64 + torch.log(-torch.expm1(-dt64)), atol=1e-5, rtol=1e-5)


def _xavier_bound(fan_out, fan_in, gain=2 ** -2.5):
    return gain * math.sqrt(6 / (fan_in + fan_out))


def test_init_mom_linears_are_xavier_with_small_gain():
    torch.manual_seed(1)
    mixer = CausalLM(init_cfg(num_layers=1)).model.layers[0].attn
    assert isinstance(mixer, MemoryMixer)
    mats = {"router": mixer.router.weight, "q_proj": mixer.q_proj.weight, "g_proj": mixer.g_proj.weight,
            "o_proj": mixer.o_proj.weight}
    for name in ("k_proj", "v_proj", "b_proj", "a_proj"):
        for m in range(getattr(mixer, name).shape[0]):  # each memory's matrix on its own fans
            mats[f"{name}[{m}]"] = getattr(mixer, name)[m]
        mats[f"shared_{name}"] = getattr(mixer, f"shared_{name}")
    for name, w in mats.items():
        w = w.detach()
        bound = _xavier_bound(*w.shape)
        assert w.abs().max() <= bound + 1e-7, name
        assert w.abs().max() > 0.9 * bound, name  # uniform over the whole range
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.2 * bound / math.sqrt(3), name
    assert torch.equal(mixer.o_norm.weight.detach(), torch.ones_like(mixer.o_norm.weight))
    conv_bound = 1 / math.sqrt(mixer.q_conv.shape[-1])
    for w in (mixer.q_conv, mixer.k_conv, mixer.v_conv):
        assert w.abs().max() <= conv_bound and w.std() > 0.3 * conv_bound


def test_init_embeddings_mlp_norms():
    torch.manual_seed(2)
    model = CausalLM(init_cfg(num_layers=2))
    emb = model.model.embeddings.weight.detach()
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    for layer in model.model.layers:
        assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 0.003
        assert torch.equal(layer.attn_norm.weight.detach(), torch.ones(64))
        assert torch.equal(layer.mlp_norm.weight.detach(), torch.ones(64))
    assert model.lm_head is None and model.output_weight is model.model.embeddings.weight  # tied


@pytest.mark.parametrize("arch,rule,tied", [("mom", "gated_delta", True), ("linear", "gla", False),
                                            ("transformer", "gated_delta", True)])
def test_no_weight_decay_names(arch, rule, tied):
    model = CausalLM(init_cfg(arch=arch, update_rule=rule, num_layers=2, tie_word_embeddings=tied))
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay_names()
    assert nwd <= set(names)
    must = {n for n in names if "norm" in n or "embeddings" in n or n.endswith(("A_log", "dt_bias"))}
    assert must <= nwd, must - nwd
    assert "model.embeddings.weight" in nwd and "model.norm.weight" in nwd
    if arch == "mom":
        assert {"model.layers.0.attn.A_log", "model.layers.0.attn.dt_bias",
                "model.layers.0.attn.o_norm.weight"} <= nwd
    # the matrices do decay
    decayed = set(names) - nwd
    assert "model.layers.0.mlp.up_proj.weight" in decayed
    assert "model.layers.1.attn.q_proj.weight" in decayed
    if arch != "transformer":  # the shared memory's (a linear model's only memory), and the routed ones'
        assert {"model.layers.0.attn.shared_k_proj", "model.layers.0.attn.shared_v_proj"} <= decayed
    if arch == "mom":
        assert {"model.layers.0.attn.k_proj", "model.layers.0.attn.v_proj"} <= decayed
    if not tied:
        assert "lm_head.weight" in decayed


# ------------------------------------------------------------------------------------------------
# Wiring of the network (spec step 7) and the paper's configs
# ------------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("arch,tied", [("mom", True), ("transformer", False)])
def test_blocks_are_prenorm_residual_with_swiglu(arch, tied):
    """logits = head(RMSNorm(blocks(emb))) with h = x + mixer(RMSNorm(x)), out = h + SwiGLU(RMSNorm(h));
    the mixer is used as a black box here (test_mom_layer_reference checks it)."""
    cfg = ModelConfig(arch=arch, vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, head_dim=4,
                      chunk_size=4, tie_word_embeddings=tied, intermediate_size=24)
    torch.manual_seed(3)
    model = CausalLM(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))  # norm weights matter
        ids = torch.randint(0, 30, (2, 9))
        x = model.model.embeddings.weight[ids]
        eps = cfg.norm_eps
        for layer in model.model.layers:
            h_in = _rms(x, layer.attn_norm.weight, eps)
            if arch == "transformer":
                pos = torch.arange(9).expand(2, 9)
                mixed = layer.attn(h_in, pos, None)[0]
            else:
                mixed = layer.attn(h_in, torch.arange(2).repeat_interleave(9), 2)[0]
            h = x + mixed
            n = _rms(h, layer.mlp_norm.weight, eps)
            swiglu = F.silu(n @ layer.mlp.gate_proj.weight.t()) * (n @ layer.mlp.up_proj.weight.t())
            x = h + swiglu @ layer.mlp.down_proj.weight.t()
        head = model.model.embeddings.weight if tied else model.lm_head.weight
        want = _rms(x, model.model.norm.weight, eps) @ head.t()
        torch.testing.assert_close(model(ids).logits, want, atol=1e-12, rtol=0)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (24, 16)


@pytest.mark.parametrize("name,d,ratio,mlp", [("mom-340m", 1024, 3, 2048), ("mom-1.3b", 2048, 4, 5632),
                                              ("mom-340m-paper", 1024, 3, 2048), ("mom-1.3b-paper", 2048, 4, 5632)])
def test_paper_configs_match_the_spec_table(name, d, ratio, mlp):
    m = load_config(TINY_YAML.parent / f"{name}.yaml").model
    assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.head_dim, m.expand_v) == ("mom", 24, d, 4, 256, 1)
    assert (m.num_memories, m.topk, m.shared_mem, m.update_rule) == (4, 2, True, "gated_delta")
    assert (m.hidden_ratio, m.mlp_hidden_size, m.vocab_size, m.tie_word_embeddings) == (ratio, mlp, 32000, True)
    assert m.aux_loss_coef == 0.01 and m.conv_size == 4 and m.use_short_conv and m.qk_norm == "l2"
    if name.endswith("-paper"):  # the authors' run: their balance loss, init, steps, no resets
        cfg = load_config(TINY_YAML.parent / f"{name}.yaml")
        assert m.aux_loss_form == "paper" and m.rescale_residual_init and not cfg.data.reset_at_doc_boundaries
        tokens = cfg.train.max_steps * cfg.train.global_batch_size * cfg.data.seq_len
        assert tokens == (15 if name.startswith("mom-340m") else 100) * 2 ** 30 and cfg.train.warmup_steps == 1024


# ------------------------------------------------------------------------------------------------
# It learns
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mom", "linear"])
def test_tiny_model_fits_a_fixed_batch(arch):
    cfg = load_config(TINY_YAML, [f"model.arch={arch}", "model.hidden_size=32", "model.head_dim=16",
                                  "model.vocab_size=64", "model.num_layers=2", "model.chunk_size=16"]).model
    torch.manual_seed(0)
    model = CausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for step in range(30):
        out = model(inputs, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:  # every parameter is wired into the loss
            dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
            assert not dead, dead
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.lm_loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.3  # starts at chance
    assert losses[-1] < 0.2 * losses[0], losses  # memorises the batch (reaches ~0.06 from ~4.2)


def test_flops_do_not_depend_on_per_memory_conv():
    """A per-memory conv does the same work as a shared one: its weights are not matmul FLOPs."""
    from megamom.model.counting import flops_per_token

    a = ModelConfig(arch="mom", per_memory_conv=False)
    b = ModelConfig(arch="mom", per_memory_conv=True)
    assert flops_per_token(a, 2048) == flops_per_token(b, 2048)


def test_generate_rejects_bad_arguments_and_restores_training_mode():
    from megamom.generate import generate
    from megamom.model import build_model

    model = build_model(ModelConfig(arch="mom", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                    head_dim=8, num_memories=2, topk=1))
    model.train()
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match="top_k=-2"):
        generate(model, ids, 2, temperature=1.0, top_k=-2)
    with pytest.raises(IndexError):
        generate(model, torch.full((1, 3), 99), 2)  # a token id outside the vocabulary fails inside
    assert model.training  # ... and the model is back in training mode


# ------------------------------------------------------------------------------------------------
# One autocast cast of a layer input shared by its linears (layers.cast_for_autocast)
# ------------------------------------------------------------------------------------------------

def test_shared_autocast_cast_leaves_the_forward_unchanged(monkeypatch):
    """Autocast casts each linear's float32 input to bf16; casting once beforehand (cast_for_autocast,
    or the MoM block's norm writing its output in both dtypes) gives the same bf16 values, so the
    model's output is bitwise the same (only the input gradients are summed in bf16 instead of
    float32: close, not equal). Outside autocast the input is returned as is."""
    from megamom.model import layers, lm, memory_mixer, router

    x = torch.randn(3, 5)
    assert layers.cast_for_autocast(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.cast_for_autocast(x).dtype == torch.bfloat16
        assert layers.cast_for_autocast(x.double()).dtype == torch.float64  # only float32 is cast
    assert layers.cast_for_autocast(torch.empty(2, 2, device="meta")).device.type == "meta"

    cfg = load_config(TINY_YAML).model
    torch.manual_seed(0)
    model = CausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), model.model.embeddings.weight.grad.clone()
    loss, grad = run()
    monkeypatch.setattr(layers, "cast_for_autocast", lambda t: t)
    monkeypatch.setattr(memory_mixer, "cast_for_autocast", lambda t: t)

    def no_shared_cast(norm, x, residual, dtype, router_weight, topk):  # the MoM block's norm: float32 out
        s, y = norm(x, residual) if residual is not None else (x, norm(x))
        return s, y, y, router.route(y.reshape(-1, y.shape[-1]), router_weight, topk)
    monkeypatch.setattr(lm, "norm_and_route", no_shared_cast)
    loss_ref, grad_ref = run()
    assert torch.equal(loss, loss_ref)
    rel = ((grad - grad_ref).norm() / grad_ref.norm()).item()
    assert 0 < rel < 2e-2, rel  # 0 would mean the monkeypatch did not reach the model


def _old_layout(sd: dict, cfg) -> dict:
    """A state dict as saved while the shared memory was the last row of the stacked weights."""
    old = dict(sd)
    for key in list(sd):
        prefix, _, leaf = key.rpartition(".")
        if leaf.startswith("shared_"):
            name = leaf[len("shared_"):]
            routed = sd.get(f"{prefix}.{name}")
            parts = ([routed] if routed is not None else []) + [sd[key][None]]
            old[f"{prefix}.{name}"] = torch.cat(parts, 0)
            del old[key]
    return old


@pytest.mark.parametrize("overrides", [dict(arch="mom"), dict(arch="mom", per_memory_conv=True),
                                       dict(arch="mom", shared_mem=False), dict(arch="linear"),
                                       dict(arch="linear", per_memory_conv=True, update_rule="gla")])
def test_checkpoints_from_before_the_shared_memory_had_its_own_parameters_still_load(overrides):
    """The shared memory's weights were row E of k_proj, v_proj, ... (and of per-memory convs): the
    key mapping gives today's names, and the loaded model computes the same function."""
    from megamom.model.memory_mixer import upgrade_state_dict
    cfg = init_cfg(num_layers=2, **overrides)
    torch.manual_seed(0)
    model = CausalLM(cfg).double()
    sd = model.state_dict()
    old = _old_layout(sd, cfg)
    if cfg.arch == "mom" and not cfg.shared_mem:
        assert old.keys() == sd.keys()  # nothing to map
    else:
        assert old.keys() != sd.keys()
    new = upgrade_state_dict(old, cfg)
    assert new.keys() == sd.keys() and all(torch.equal(new[k], sd[k]) for k in sd)
    shapes = upgrade_state_dict({k: tuple(v.shape) for k, v in old.items()}, cfg)
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    assert upgrade_state_dict(sd, cfg).keys() == sd.keys()  # today's names pass through
    again = CausalLM(cfg).double()
    again.load_state_dict(new, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_rescaled_residual_init_divides_the_output_projections_by_sqrt_2L():
    from megamom.config import ModelConfig
    from megamom.model import build_model
    for arch in ("mom", "transformer"):
        cfg = ModelConfig(arch=arch, vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, head_dim=16)
        torch.manual_seed(0)
        plain = build_model(cfg)
        torch.manual_seed(0)
        scaled = build_model(dataclasses.replace(cfg, rescale_residual_init=True))
        rescaled = {f"model.layers.{i}.{n}.weight" for i in range(3) for n in ("attn.o_proj", "mlp.down_proj")}
        p = dict(plain.named_parameters())
        for n, q in scaled.named_parameters():
            want = p[n] / 6 ** 0.5 if n in rescaled else p[n]
            torch.testing.assert_close(q, want, rtol=0, atol=0, msg=n)


def test_matched_baselines_have_moms_parameters_or_state():
    """configs/*-params.yaml: MoM-340M's total (or activated) parameters within 1%; the *-state ones:
    one memory holding MoM's total (5 memories) or activated (top-2 + shared) state per layer."""
    from megamom.model.counting import count_parameters

    def counts(name):
        cfg = load_config(TINY_YAML.parent / f"{name}.yaml")
        with torch.device("meta"):
            pc = count_parameters(CausalLM(cfg.model))
        m = cfg.model
        memories = m.num_memories + int(m.shared_mem) if m.arch == "mom" else 1
        return pc, m.num_heads * m.head_dim * m.head_v_dim, memories

    mom, mom_state, mom_memories = counts("mom-340m")
    for name, want in (("gdn-340m-params", mom.total), ("transformer-340m-params", mom.total),
                       ("gdn-340m-activated-params", mom.activated)):
        got = counts(name)[0].total
        assert abs(got - want) <= 0.01 * want, (name, got, want)
    assert counts("gdn-340m-total-state")[1] == mom_memories * mom_state
    assert counts("gdn-340m-activated-state")[1] == 3 * mom_state  # top-2 + shared


def test_the_papers_gla_layer_equals_flash_linear_attentions(fla_import):
    """model.update_rule=gla with gla_gate_rank=16-style low-rank gate, no conv, no q/k norm and no
    q/k/v activation is fla's GatedLinearAttention layer (the GLA of the MoM paper's variants): with
    fla's weights mapped in, the output equals fla's layer computed by hand from fla's recurrent
    reference: q, k, v projections, gk = logsigmoid(W_up W_down x + b) / 16, the
    recurrence, per-head RMSNorm times swish(g), o_proj. Also one token at a time (decoding)."""
    import torch.nn.functional as F

    from megamom.model.memory_mixer import MemoryMixer
    gla_layers = fla_import("fla.layers.gla")
    naive = fla_import("fla.ops.gla.naive")
    torch.manual_seed(0)
    d, H, rank, eps = 32, 2, 4, 1e-5
    theirs = gla_layers.GatedLinearAttention(hidden_size=d, expand_k=0.5, expand_v=1.0, num_heads=H,
                                             use_short_conv=False, gate_low_rank_dim=rank, norm_eps=eps).double()
    for p in theirs.parameters():  # (fla zero-inits nothing here, but make every weight count)
        torch.nn.init.normal_(p, std=0.3)
    K, V = d // 2 // H, d // H
    cfg = ModelConfig(arch="linear", update_rule="gla", hidden_size=d, num_heads=H, head_dim=K, expand_v=V // K,
                      gla_gate_rank=rank, use_short_conv=False, qk_norm="none", qkv_activation="none", norm_eps=eps,
                      vocab_size=16, num_layers=1, chunk_size=8)
    ours = MemoryMixer(cfg).double()
    mapping = {"q_proj.weight": theirs.q_proj.weight, "shared_k_proj": theirs.k_proj.weight,
               "shared_v_proj": theirs.v_proj.weight, "shared_a_down": theirs.gk_proj[0].weight,
               "shared_a_up": theirs.gk_proj[1].weight, "shared_a_bias": theirs.gk_proj[1].bias,
               "g_proj.weight": theirs.g_proj.weight, "o_norm.weight": theirs.g_norm_swish_gate.weight,
               "o_proj.weight": theirs.o_proj.weight}
    ours.load_state_dict({k: v.detach() for k, v in mapping.items()}, strict=True)
    B, T = 2, 19
    x = torch.randn(B, T, d, dtype=torch.float64)

    def fla_by_hand(x):
        q, k, v = (f(x).view(B, -1, H, n) for f, n in ((theirs.q_proj, K), (theirs.k_proj, K), (theirs.v_proj, V)))
        gk = F.logsigmoid(theirs.gk_proj(x)).view(B, -1, H, K) / theirs.gate_logit_normalizer
        o, _ = naive.naive_recurrent_gla(q, k, v, gk)
        o = o.double()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * theirs.g_norm_swish_gate.weight
        o = o * F.silu(theirs.g_proj(x).view(B, -1, H, V))
        return theirs.o_proj(o.reshape(B, -1, H * V))

    doc_ids = torch.arange(B).repeat_interleave(T)
    with torch.no_grad():
        want = fla_by_hand(x)
        got = ours(x, doc_ids, B)[0]
        # (fla's naive reference runs its recurrence in float32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        _, _, cache = ours(x[:, :7], doc_ids.view(B, T)[:, :7].reshape(-1), B, use_cache=True)
        steps = []
        for t in range(7, T):  # decoding from the prefix's state, one token at a time
            out, _, cache = ours(x[:, t:t + 1], doc_ids.view(B, T)[:, t], B, cache=cache)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, 1), got[:, 7:], rtol=1e-9, atol=1e-10)


def test_the_authors_linear_attention_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mom-linear-attn-340m-paper.yaml")
    with torch.device("meta"):
        layer = CausalLM(cfg.model).model.layers[0].attn
    assert layer.q_feature.layer1.weight.shape == (256, 256) and layer.g_proj is None and layer.q_conv is None


@pytest.mark.parametrize("name,memories", [("gla-340m-paper", 1), ("mom-gla-340m-paper", 5)])
def test_the_papers_gla_configs(name, memories):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        layer = CausalLM(cfg.model).model.layers[0].attn
    assert layer.a_proj is None and layer.q_conv is None  # the low-rank gate, no conv
    downs = [t for t in (layer.a_down, layer.shared_a_down) if t is not None]
    assert sum(t.numel() // (16 * 1024) for t in downs) == memories
    assert layer.memory_weight("a_proj")[1].shape == (4 * 128, 1024)  # the product W_up W_down


def test_the_authors_linear_attention_layer_equals_flash_linear_attentions(fla_import):
    """model.update_rule=linear_attn with feature_map=hadamard, no conv, no q/k norm, no activation
    and no output gate is fla's LinearAttention layer with its default `elementwise_product` feature
    map (the MoM authors' linear-attention memories): with fla's weights mapped in, the output equals
    fla's layer computed by hand from fla's recurrent reference; also one token at a time."""
    from megamom.model.memory_mixer import MemoryMixer
    la_layers = fla_import("fla.layers.linear_attn")
    naive = fla_import("fla.ops.linear_attn.naive")
    torch.manual_seed(0)
    d, H, eps = 32, 2, 1e-5
    theirs = la_layers.LinearAttention(hidden_size=d, expand_k=1.0, expand_v=1.0, num_heads=H, norm_eps=eps).double()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    K = d // H
    cfg = ModelConfig(arch="linear", update_rule="linear_attn", hidden_size=d, num_heads=H, head_dim=K,
                      feature_map="hadamard", use_short_conv=False, qk_norm="none", qkv_activation="none",
                      use_output_gate=False, norm_eps=eps, vocab_size=16, num_layers=1, chunk_size=8)
    ours = MemoryMixer(cfg).double()
    mapping = {"q_proj.weight": theirs.q_proj.weight, "shared_k_proj": theirs.k_proj.weight,
               "shared_v_proj": theirs.v_proj.weight, "o_norm.weight": theirs.norm.weight,
               "o_proj.weight": theirs.o_proj.weight}
    for ours_name, fmap in (("q_feature", theirs.feature_map_q), ("k_feature", theirs.feature_map_k)):
        for n, t in fmap.state_dict().items():
            mapping[f"{ours_name}.{n}"] = t
    ours.load_state_dict({k: v.detach() for k, v in mapping.items()}, strict=True)
    B, T = 2, 19
    x = torch.randn(B, T, d, dtype=torch.float64)

    def fla_by_hand(x):
        q, k, v = (f(x).view(B, -1, H, K) for f in (theirs.q_proj, theirs.k_proj, theirs.v_proj))
        q, k = theirs.feature_map_q(q), theirs.feature_map_k(k)
        o, _ = naive.naive_recurrent_linear_attn(q, k, v)
        o = o.double()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * theirs.norm.weight
        return theirs.o_proj(o.reshape(B, -1, H * K))

    doc_ids = torch.arange(B).repeat_interleave(T)
    with torch.no_grad():
        want = fla_by_hand(x)
        got = ours(x, doc_ids, B)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # (fla's reference runs in float32)
        _, _, cache = ours(x[:, :7], doc_ids.view(B, T)[:, :7].reshape(-1), B, use_cache=True)
        steps = []
        for t in range(7, T):
            out, _, cache = ours(x[:, t:t + 1], doc_ids.view(B, T)[:, t], B, cache=cache)
            steps.append(out)
        torch.testing.assert_close(torch.cat(steps, 1), got[:, 7:], rtol=1e-9, atol=1e-10)


def test_transformer_equals_hugging_face_llama():
    """The Transformer++ baseline is Llama: with its weights mapped into transformers'
    LlamaForCausalLM (RoPE, grouped-query attention, SwiGLU MLP, RMSNorm, tied embeddings), the
    logits are the same, with documents packed in rows (segment_ids) against each
    document run alone."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = ModelConfig(arch="transformer", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, rope_theta=500.0, norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = CausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in ours.parameters():  # (norm weights away from 1: every weight counts)
            p.add_(torch.randn_like(p) * 0.2)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=True,
        max_position_embeddings=128, attention_bias=False, mlp_bias=False)).double().eval()
    names = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        names.update({p + "attn_norm.weight": p + "input_layernorm.weight",
                      p + "mlp_norm.weight": p + "post_attention_layernorm.weight"})
        names.update({p + f"attn.{n}.weight": p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")})
        names.update({p + f"mlp.{n}.weight": p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")})
    sd = {names[k]: v for k, v in ours.state_dict().items()}
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    llama.tie_weights()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # (both compute the rotary angles in float32: ~1e-6 apart in float64 logits of size ~1)
        want = llama(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=2e-5)
        seg = torch.tensor([[0] * 15 + [1] * 25] * 2)
        packed = ours(ids, segment_ids=seg).logits
        torch.testing.assert_close(packed[:, 15:], llama(ids[:, 15:]).logits, rtol=0, atol=2e-5)
        assert (want - llama(ids.flip(1)).logits.flip(1)).abs().max() > 0.1  # (the comparison can fail)


def test_counting_the_papers_gla_gate_and_the_conv_activation_rule():
    from megamom.model.counting import count_parameters
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mom-gla-340m-paper.yaml").model
    with torch.device("meta"):
        model = CausalLM(cfg)
    layer = model.model.layers[0].attn
    one = sum(getattr(layer, n)[0].numel() for n in ("k_proj", "v_proj", "a_down", "a_up", "a_bias"))
    counted = count_parameters(model)
    assert counted.per_memory == one
    assert counted.activated == counted.total - cfg.num_layers * (cfg.num_memories - cfg.topk) * one
    with pytest.raises(ConfigError, match="qkv_activation='none' applies without the short conv"):
        ModelConfig(arch="mom", update_rule="gla", qkv_activation="none").validate()


def test_inference_weights_are_kept_only_inside_their_context():
    """Stacked decode weights are built once per context and rebuilt after an in-place update;
    outside a context (an evaluation pass during training) nothing is kept; a CUDA graph's holder
    keeps what it read after the context drops it."""
    from megamom.model.layers import cached_for_inference, held_inference_weights, inference_weights
    model = CausalLM(ModelConfig(arch="mom", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, head_dim=8,
                                 num_memories=2, topk=1))
    mixer = model.model.layers[0].attn
    builds = []

    def stacked():
        builds.append(1)
        return torch.cat([mixer.q_proj.weight, mixer.o_proj.weight.t()])
    with torch.no_grad():
        a, b = cached_for_inference(mixer, "w", stacked), cached_for_inference(mixer, "w", stacked)
        assert len(builds) == 2 and a is not b and held_inference_weights(model) == []
        with inference_weights(model):
            a, b = cached_for_inference(mixer, "w", stacked), cached_for_inference(mixer, "w", stacked)
            assert len(builds) == 3 and a is b
            with inference_weights(model):  # nested: the inner exit keeps them
                pass
            assert cached_for_inference(mixer, "w", stacked) is a and len(builds) == 3
            mixer.q_proj.weight.add_(1.0)  # an in-place update (an optimizer step) rebuilds them
            c = cached_for_inference(mixer, "w", stacked)
            assert len(builds) == 4 and torch.equal(c[:16], mixer.q_proj.weight)
            held = held_inference_weights(model)
        assert len(held) == 1 and held[0] is c
        assert held_inference_weights(model) == []
    with inference_weights(model):  # under autograd: built every time, inside the graph
        assert cached_for_inference(mixer, "w", stacked).requires_grad and held_inference_weights(model) == []
