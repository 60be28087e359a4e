"""The router's counts_reduce seam (a layout that splits a sequence over ranks sums the slot and token
counts over them): the torch path and the fused Triton path (under TRITON_INTERPRET=1 on CPU) give
the balance loss of the whole group, each rank's gradient for its own tokens, wired from the layer."""
import json
import os
import subprocess
import sys

import torch

from megamom.config import ModelConfig
from megamom.model import MemoryMixer
from megamom.model.router import RouterOutput, load_balancing_loss, router_losses, router_z_loss


def doubled(counts, total):
    """Two ranks that saw the same tokens: the counts summed over them are twice one rank's."""
    return 2 * counts, 2 * total

SCRIPT = r"""
import json, sys, torch
from megamom.model.router import route, router_losses
torch.manual_seed(0)
N, d, E, k = 37, 16, 5, 2
x = torch.randn(N, d)
w = torch.randn(E, d) * 0.5
other = torch.randn(N, d)  # the tokens of the "other rank"
out = {}
for name, fused in (("torch", False), ("fused", True)):
    r = route(x, w, k)
    logits = r.logits.detach().requires_grad_()
    probs = logits.softmax(-1)
    ro = type(r)(logits, probs, r.topk_weight, r.topk_index)
    counts_other = torch.bincount(route(other, w, k).topk_index.reshape(-1), minlength=E).float()
    reduce = lambda c, t: (c + counts_other, t + N)
    aux, z, f = router_losses(ro, E, fused, reduce)
    (3 * aux + 5 * z).backward()
    out[name] = {"aux": aux.item(), "z": z.item(), "f": f.tolist(), "grad": logits.grad.reshape(-1).tolist()}
json.dump(out, sys.stdout)
"""


def test_torch_path_reduced_counts_are_the_groups_balance_loss():
    torch.manual_seed(1)
    logits = torch.randn(20, 4, dtype=torch.float64)
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    alone, f1 = load_balancing_loss(probs, idx, 4)
    twice, f2 = load_balancing_loss(probs, idx, 4, doubled)
    # the same tokens twice: f is unchanged, P_e = (this rank's probability sums) / (both ranks' tokens)
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(twice, alone / 2)
    # the whole group's losses are the sums of the ranks' losses, each computed with the reduced counts
    r = RouterOutput(logits, probs, probs.topk(2, -1).values, idx)
    aux, z, _ = router_losses(r, 4, False, doubled)
    torch.testing.assert_close(2 * aux, alone)
    torch.testing.assert_close(2 * z, router_z_loss(logits))


def test_fused_path_takes_reduced_counts_like_the_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               MEGAMOM_TRITON_CFG=json.dumps({"router_loss_fwd": {"BM": 8, "BP": 2}, "router_loss_bwd": {"BM": 8}}))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    a, b = res["torch"], res["fused"]
    assert abs(a["aux"] - b["aux"]) <= 1e-6 * abs(a["aux"]) and abs(a["z"] - b["z"]) <= 1e-6 * abs(a["z"])
    torch.testing.assert_close(torch.tensor(b["f"]), torch.tensor(a["f"]), atol=1e-7, rtol=0)
    torch.testing.assert_close(torch.tensor(b["grad"]), torch.tensor(a["grad"]), atol=1e-6, rtol=1e-5)


def test_the_layer_wires_its_routers_counts_reduce():
    cfg = ModelConfig(arch="mom", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
                      num_memories=4, topk=2)
    torch.manual_seed(0)
    mixer = MemoryMixer(cfg).double()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    doc = torch.zeros(12, dtype=torch.long)
    _, alone, _ = mixer(x, doc, 1)
    seen = []

    def reduce(counts, total):
        seen.append((counts.clone(), float(total)))
        return 2 * counts, 2 * total
    mixer.router.counts_reduce = reduce
    _, reduced, _ = mixer(x, doc, 1)
    assert len(seen) == 1 and seen[0][1] == 12 and seen[0][0].sum() == 12 * 2
    torch.testing.assert_close(reduced.aux_loss, alone.aux_loss / 2)
    torch.testing.assert_close(reduced.token_fraction, alone.token_fraction)
