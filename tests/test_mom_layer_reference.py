"""The MoM layer against a slow, per-token reference written from the spec
(/work/shared/docs/mom-spec.md, "One MoM layer"), in float64: outputs and the gradients of every
parameter and of the input, for every update rule and layer option, with document boundaries.

The reference below walks each sample token by token and keeps, per memory, its own recurrent
state and its own conv history (the raw q/k/v inputs of the tokens routed to it, zeros before its
first one). It shares no code with megamom: the only coupling is MemoryMixer's parameter names
and shapes, which the reference reads:
  router.weight [E, d]; q_proj.weight [Kd, d] (every memory's); k_proj [E, Kd, d]; v_proj [E, Vd, d];
  b_proj [E, H, d]; a_proj [E, H or Kd, d] of the routed memories and shared_k_proj [Kd, d], ... of
  the shared one (memory index E); A_log, dt_bias [H]; q_conv/k_conv/v_conv [1, C, W] (one for all)
  or, per memory, [E, C, W] and shared_q_conv [C, W], ...; g_proj.weight [Vd, d]; o_norm.weight [Vh];
  o_proj.weight [d, Vd].
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megamom.config import ModelConfig
from megamom.model import CausalLM, MemoryMixer
from megamom.model.router import route

DT = torch.float64
ATOL = 1e-10
RULES = ("gated_delta", "delta", "gla", "scalar_decay", "linear_attn")


def make_cfg(**kw) -> ModelConfig:
    base = dict(arch="mom", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, head_dim=4,
                num_memories=4, topk=2, chunk_size=4, kernel_backend="torch")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


@torch.no_grad()
def spread_parameters(module: torch.nn.Module, seed: int) -> None:
    """Random values of a useful size for every parameter, so that every term of the layer shows:
    varied routing, gates away from 0 and 1, norm weight != 1, decays between ~0.02 and ~0.99."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=gen, dtype=DT)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape, dtype=DT).uniform_(math.log(0.3), math.log(3.0), generator=gen))
        elif leaf == "dt_bias":
            p.copy_(0.5 * r)
        elif "norm" in name:
            p.copy_(1 + 0.3 * r)
        elif leaf.endswith("conv"):
            p.copy_(0.6 * r)
        elif name.startswith("router"):
            p.copy_(0.8 * r)
        else:
            p.copy_(r / math.sqrt(p.shape[-1]))


def make_mixer(cfg: ModelConfig, seed: int = 0) -> MemoryMixer:
    torch.manual_seed(seed)
    mixer = MemoryMixer(cfg).to(DT)
    spread_parameters(mixer, seed)
    return mixer


# ------------------------------------------------------------------------------------------------
# The reference: one token at a time, straight from the spec
# ------------------------------------------------------------------------------------------------

def _silu(x):
    return x * torch.sigmoid(x)


def _l2(x, eps=1e-6):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def _short_conv(history, j, weight):
    """Causal depthwise conv at the newest entry of `history` (this memory's own inputs only):
    y[c] = sum_i weight[c, W-1-i] * x_{t-i}[c], zeros before the memory's first token."""
    W = weight.shape[-1]
    y = 0
    for i in range(W):
        if len(history) - 1 - i >= 0:
            y = y + weight[:, W - 1 - i] * history[len(history) - 1 - i][j]
    return y


def _of_memory(P: dict, name: str, m: int, E: int) -> torch.Tensor:
    """Memory m's weight: a row of the routed stack, or the shared memory's own (m == E)."""
    return P[name][m] if m < E else P[f"shared_{name}"]


def reference_layer(P: dict, cfg: ModelConfig, x: torch.Tensor, segment_ids=None) -> torch.Tensor:
    """P: parameter name -> tensor (MemoryMixer's names); x: [B, T, d]; segment_ids: [B, T]
    document number per token (memories and conv histories restart at each document start)."""
    B, T, d = x.shape
    H, K, Vh = cfg.num_heads, cfg.head_dim, cfg.head_dim * cfg.expand_v
    routed = cfg.arch == "mom"
    E = cfg.num_memories if routed else 0
    shared = cfg.shared_mem if routed else True
    M = E + int(shared)
    W = cfg.conv_size if cfg.use_short_conv else 0
    scale = K ** -0.5
    eye = torch.eye(K, dtype=x.dtype)
    outputs = []
    for b in range(B):
        for t in range(T):
            if t == 0 or (segment_ids is not None and segment_ids[b, t] != segment_ids[b, t - 1]):
                state = [torch.zeros(H, K, Vh, dtype=x.dtype) for _ in range(M)]
                history = [[] for _ in range(M)]
            xt = x[b, t]
            # 1. router: softmax (in at least float32: float64 here), top-k, renormalise
            chosen = []
            if routed:
                p = torch.softmax(P["router.weight"] @ xt, -1)
                top = sorted(range(E), key=lambda e: -float(p[e].detach()))[: cfg.topk]
                total = sum(p[e] for e in top)
                chosen = [(e, p[e] / total) for e in top]
            if shared:
                chosen.append((E, 1.0))  # 5. shared memory: every token, weight 1
            o = torch.zeros(H, Vh, dtype=x.dtype)
            for m, w in chosen:
                # 2. projections: q shared, k / v / beta / decay from memory m's own weights
                q_in = P["q_proj.weight"] @ xt
                k_in = _of_memory(P, "k_proj", m, E) @ xt
                v_in = _of_memory(P, "v_proj", m, E) @ xt
                if W:
                    history[m].append((q_in, k_in, v_in))
                    def conv(name):  # memory m's own conv, or the one every memory shares
                        return _of_memory(P, name, m, E) if cfg.per_memory_conv else P[name][0]
                    q = _silu(_short_conv(history[m], 0, conv("q_conv")))
                    k = _silu(_short_conv(history[m], 1, conv("k_conv")))
                    v = _silu(_short_conv(history[m], 2, conv("v_conv")))
                else:
                    q, k, v = _silu(q_in), _silu(k_in), _silu(v_in)
                q, k, v = q.reshape(H, K), k.reshape(H, K), v.reshape(H, Vh)
                if cfg.qk_norm == "l2":
                    q, k = _l2(q), _l2(k)
                S = state[m]
                kv = k[:, :, None] * v[:, None, :]  # k v^T per head
                rule = cfg.update_rule
                if rule in ("gated_delta", "delta"):
                    beta = torch.sigmoid(_of_memory(P, "b_proj", m, E) @ xt)  # [H]
                    alpha = torch.ones(H, dtype=x.dtype)
                    if rule == "gated_delta":
                        gt = -torch.exp(P["A_log"]) * F.softplus(_of_memory(P, "a_proj", m, E) @ xt + P["dt_bias"])
                        alpha = torch.exp(gt)
                    kk = k[:, :, None] * k[:, None, :]
                    S = alpha[:, None, None] * ((eye - beta[:, None, None] * kk) @ S) + beta[:, None, None] * kv
                elif rule == "gla":
                    a = (F.logsigmoid(_of_memory(P, "a_proj", m, E) @ xt) / cfg.gla_gate_normalizer).reshape(H, K)
                    S = torch.exp(a)[:, :, None] * S + kv  # diag(a_t) S + k v^T
                elif rule == "scalar_decay":
                    gt = -torch.exp(P["A_log"]) * F.softplus(_of_memory(P, "a_proj", m, E) @ xt + P["dt_bias"])
                    S = torch.exp(gt)[:, None, None] * S + kv
                else:  # linear_attn
                    S = S + kv
                state[m] = S
                o_m = torch.einsum("hkv,hk->hv", S, scale * q)  # S^T (s q)
                o = o + w * o_m  # 4. weighted sum of the selected memories
            # 6. per-head RMSNorm * weight * swish(x W_g), then W_o
            y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + cfg.norm_eps) * P["o_norm.weight"]
            if cfg.use_output_gate:
                y = y * _silu((P["g_proj.weight"] @ xt).reshape(H, Vh))
            outputs.append(P["o_proj.weight"] @ y.reshape(-1))
    return torch.stack(outputs).reshape(B, T, d)


# ------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------

def global_doc_ids(segment_ids, B, T):
    """Global document index per flattened token, written independently of megamom.model.lm."""
    if segment_ids is None:
        return torch.arange(B).repeat_interleave(T), B
    ids, offset = [], 0
    for b in range(B):
        ids.append(segment_ids[b].long() + offset)
        offset += int(segment_ids[b, -1]) + 1
    return torch.cat(ids), offset


def compare(cfg, B=2, T=13, segment_ids=None, seed=0, atol=ATOL):
    mixer = make_mixer(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(B, T, cfg.hidden_size, generator=gen, dtype=DT)
    upstream = torch.randn(B, T, cfg.hidden_size, generator=gen, dtype=DT)

    doc_ids, num_docs = global_doc_ids(segment_ids, B, T)
    x_impl = x.clone().requires_grad_()
    out, stats, _ = mixer(x_impl, doc_ids, num_docs)
    (out * upstream).sum().backward()

    P = {n: p.detach().clone().requires_grad_() for n, p in mixer.named_parameters()}
    x_ref = x.clone().requires_grad_()
    ref = reference_layer(P, cfg, x_ref, segment_ids)
    (ref * upstream).sum().backward()

    assert out.dtype == DT
    assert ref.abs().max() > 0.05  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(x_impl.grad, x_ref.grad, atol=atol, rtol=0)
    names = [n for n, _ in mixer.named_parameters()]
    assert sorted(names) == sorted(P)
    for name, p in mixer.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, P[name].grad, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    return mixer, x, out, stats


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_mom_every_rule(rule):
    compare(make_cfg(update_rule=rule))


@pytest.mark.parametrize("rule", RULES)
def test_mom_every_rule_per_memory_conv_no_shared(rule):
    compare(make_cfg(update_rule=rule, per_memory_conv=True, shared_mem=False), seed=1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("per_memory_conv", [True, False])
def test_mom_shared_and_conv_layouts(shared, per_memory_conv):
    compare(make_cfg(shared_mem=shared, per_memory_conv=per_memory_conv), seed=2)


@pytest.mark.parametrize("rule", ["gated_delta", "gla"])
def test_mom_without_short_conv(rule):
    compare(make_cfg(update_rule=rule, use_short_conv=False), seed=3)


@pytest.mark.parametrize("topk", [1, 4])
def test_mom_topk_extremes(topk):
    compare(make_cfg(topk=topk, num_memories=4), seed=4)


def test_mom_topk1_leaves_memories_empty_in_some_samples():
    """topk=1 with many memories and short samples: some (memory, sample) pairs get no token (empty
    segments), and memories start late in the sample (their conv must see zeros before)."""
    cfg = make_cfg(topk=1, num_memories=6, chunk_size=2)
    mixer, x, _, _ = compare(cfg, B=3, T=5, seed=5)
    idx = route(x.reshape(-1, cfg.hidden_size), mixer.router.weight, 1).topk_index.view(3, 5)
    per_sample = [set(row.tolist()) for row in idx]
    assert any(len(s) < 6 for s in per_sample)  # an empty (memory, sample) segment exists
    assert any(row[0] != row[1] for row in idx)  # some memory's first token is not the sample's first


def test_mom_options_output_gate_qk_norm_expand_v_conv_size():
    compare(make_cfg(use_output_gate=False, qk_norm="none", expand_v=2, conv_size=3), seed=6)


def test_mom_long_chunk():
    """One chunk holds every memory's whole subsequence (chunk_size 64 > T)."""
    compare(make_cfg(chunk_size=64), T=20, seed=7)


@pytest.mark.parametrize("rule", RULES)
def test_linear_arch_every_rule(rule):
    cfg = make_cfg(arch="linear", update_rule=rule)
    mixer, *_ = compare(cfg, seed=8)
    assert mixer.router is None and mixer.k_proj is None and mixer.num_memories == 1  # the shared memory alone


def test_linear_arch_without_conv():
    compare(make_cfg(arch="linear", use_short_conv=False, per_memory_conv=True), seed=9)


SEGMENTS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2],
                         [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("cfg_kw", [
    dict(),
    dict(update_rule="gla", per_memory_conv=True),
    dict(topk=1, shared_mem=False),
    dict(arch="linear"),
])
def test_document_boundaries_reset_memories_and_convs(cfg_kw):
    cfg = make_cfg(**cfg_kw)
    mixer, x, out, _ = compare(cfg, segment_ids=SEGMENTS, seed=10)
    # each document alone, as its own one-sample batch, gives the same outputs
    with torch.no_grad():
        for b in range(SEGMENTS.shape[0]):
            for doc in SEGMENTS[b].unique().tolist():
                pos = (SEGMENTS[b] == doc).nonzero().flatten()
                s, e = int(pos[0]), int(pos[-1]) + 1
                alone, _, _ = mixer(x[b:b + 1, s:e], torch.zeros(e - s, dtype=torch.long), 1)
                torch.testing.assert_close(alone[0], out[b, s:e], atol=ATOL, rtol=0)
    # and the boundaries matter: without them the later documents come out different
    with torch.no_grad():
        joined, _, _ = mixer(x, *global_doc_ids(None, *SEGMENTS.shape))
    assert (joined[0, 5:] - out[0, 5:]).abs().max() > 1e-3


def test_document_index_matches_hand_count():
    from megamom.model.lm import document_index
    ids, n = document_index(SEGMENTS, *SEGMENTS.shape, "cpu")
    ref_ids, ref_n = global_doc_ids(SEGMENTS, *SEGMENTS.shape)
    assert n == ref_n == 5
    assert torch.equal(ids, ref_ids)


def test_float32_layer_close_to_float64_reference():
    """The float32 path (router softmax and gates in float32, per the spec) stays close to the
    float64 definition."""
    cfg = make_cfg()
    mixer = make_mixer(cfg, 11)
    x = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(11), dtype=DT)
    P = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    ref = reference_layer(P, cfg, x)
    out, _, _ = mixer.float()(x.float(), torch.arange(2).repeat_interleave(13), 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_bfloat16_layer_runs_in_float32_inside():
    """bf16 activations and weights (the GPU training dtype): output in bf16, close to the float64
    definition at bf16 accuracy; gradients reach every parameter."""
    cfg = make_cfg()
    mixer = make_mixer(cfg, 13)
    x = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(13), dtype=DT)
    P = {n: p.detach().to(torch.bfloat16).double() for n, p in mixer.named_parameters()}
    ref = reference_layer(P, cfg, x.to(torch.bfloat16).double())
    mixer = mixer.to(torch.bfloat16)
    out, stats, _ = mixer(x.to(torch.bfloat16), torch.arange(2).repeat_interleave(13), 2)
    assert out.dtype == torch.bfloat16 and stats.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in mixer.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_router_precision(dtype):
    """Softmax and top-k weights in float32 for low-precision inputs; float64 stays float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen).to(dtype)
    w = torch.randn(4, 8, generator=gen).to(dtype)
    r = route(x, w, 2)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert r.probs.dtype == r.logits.dtype == r.topk_weight.dtype == want
    ref = torch.softmax(x.double() @ w.double().t(), -1)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(r.probs.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ["mom", "linear", "transformer"])
def test_model_with_segments_equals_documents_run_alone(arch):
    """CausalLM level: a packed row of documents = each document run on its own (2 layers; for the
    transformer, attention is masked to the document and rotary positions restart)."""
    cfg = make_cfg(arch=arch, num_layers=2, vocab_size=40)
    torch.manual_seed(12)
    model = CausalLM(cfg).to(DT)
    spread_parameters(model, 12)
    ids = torch.randint(0, 40, SEGMENTS.shape, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        packed = model(ids, segment_ids=SEGMENTS).logits
        for b in range(SEGMENTS.shape[0]):
            for doc in SEGMENTS[b].unique().tolist():
                pos = (SEGMENTS[b] == doc).nonzero().flatten()
                s, e = int(pos[0]), int(pos[-1]) + 1
                alone = model(ids[b:b + 1, s:e]).logits[0]
                torch.testing.assert_close(alone, packed[b, s:e], atol=ATOL, rtol=0)
