"""Each communication of megamom.parallel.mappings against its definition, forward and backward
(float64, every rank's view), over the whole pool as one group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megamom.parallel import mappings as M
from megamom.parallel.layout import ParallelLayout
from megamom.parallel.topology import Topology


def _world_group():
    W = dist.get_world_size()
    return Topology(ParallelLayout(W, 1, 1, W, 1), dist.get_rank()).tensor  # the tensor group = the world


def _per_rank(shape, seed):
    """The value every rank r holds: rank-dependent, known to all ranks."""
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(seed + r), dtype=torch.float64)
            for r in range(dist.get_world_size())]


def check_all():
    g = _world_group()
    r, W = g.rank, g.size
    xs, gs = _per_rank((2, 4 * W, 3), 10), _per_rank((2, 4 * W, 3), 20)  # inputs, incoming gradients
    cases = {
        # name: (fn, forward from every rank's x, backward from every rank's incoming gradient)
        "copy_to_region": (lambda x: M.copy_to_region(x, g), lambda: xs[r], lambda: sum(gs)),
        "reduce_from_region": (lambda x: M.reduce_from_region(x, g), lambda: sum(xs), lambda: gs[r]),
        "gather_along": (lambda x: M.gather_along(x, 1, g), lambda: torch.cat(xs, 1),
                         lambda: sum(gg.reshape(2, -1, 3) for gg in _per_rank((2, 4 * W * W, 3), 30)).chunk(W, 1)[r]),
        "reduce_scatter_along": (lambda x: M.reduce_scatter_along(x, 1, g), lambda: sum(xs).chunk(W, 1)[r],
                                 lambda: torch.cat([gg[:, :4] for gg in gs], 1)),
        "split_along": (lambda x: M.split_along(x, 1, g), lambda: xs[r].chunk(W, 1)[r],
                        lambda: torch.cat([gg[:, :4] for gg in gs], 1)),
        "gather_from_split": (lambda x: M.gather_from_split(x, 1, g), lambda: torch.cat(xs, 1),
                              lambda: _per_rank((2, 4 * W * W, 3), 30)[r].chunk(W, 1)[r]),
    }
    for name, (fn, want_fwd, want_bwd) in cases.items():
        x = xs[r].clone().requires_grad_()
        y = fn(x)
        torch.testing.assert_close(y, want_fwd(), rtol=0, atol=1e-12, msg=f"{name} forward")
        if name in ("gather_along", "gather_from_split"):
            grad = _per_rank((2, 4 * W * W, 3), 30)[r].reshape(y.shape)
        elif name in ("reduce_scatter_along", "split_along"):
            grad = gs[r][:, :4]
        else:
            grad = gs[r]
        y.backward(grad)
        torch.testing.assert_close(x.grad, want_bwd(), rtol=0, atol=1e-12, msg=f"{name} backward")
    # all-to-all with uneven splits: rank r sends (r + d + 1) rows to rank d; the backward returns
    # every row's gradient to where the row came from
    send = [r + d + 1 for d in range(W)]
    recv = [s + r + 1 for s in range(W)]
    rows = torch.arange(sum(send), dtype=torch.float64)[:, None] + 100 * r
    x = rows.clone().requires_grad_()
    y = M.all_to_all(x, send, recv, g)
    starts = [sum(s2 + d + 1 for d in range(r)) for s2 in range(W)]  # where rank s's rows for me begin
    want = torch.cat([torch.arange(starts[s], starts[s] + recv[s], dtype=torch.float64)[:, None] + 100 * s
                      for s in range(W)])
    torch.testing.assert_close(y, want, rtol=0, atol=0, msg="all_to_all forward")
    (y * y).sum().backward()  # d/dx = 2 x, at the rows' sources
    torch.testing.assert_close(x.grad, 2 * rows, rtol=0, atol=0, msg="all_to_all backward")
    return True
