"""Shared helpers for the reference (pure PyTorch) kernels: varlen segment bookkeeping and
chunk padding. Layout everywhere: tokens [B, T, H, ...]; with `cu_seqlens` B must be 1 and the
packed sequence holds len(cu_seqlens)-1 segments (empty segments allowed)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


L2NORM_EPS = 1e-6  # the q / k L2 norm's (MoM spec, fla); the Triton kernels use the same
# What a chunked scan's backward may take from its forward instead of recomputing it
# (gated_delta_rule/chunk_triton.py: chunk_scan_triton's keep); megamom.config mirrors it.
SCAN_KEEPS = ("none", "states", "all")


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (the convention of the MoM spec and fla)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 stays float64 (the reference precision); everything else computes in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def num_segments(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def row_positions(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """Position of each packed row in its segment (int32), without a host sync."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=N)
    return (torch.arange(N, device=cu.device) - cu[seg]).to(torch.int32)


def check_varlen(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], initial_state: Optional[torch.Tensor]):
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed), got {x.shape[0]}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor")
    n = num_segments(x, cu_seqlens)
    if initial_state is not None and initial_state.shape[0] != n:
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {n} sequences")


class ChunkLayout:
    """Maps a (possibly varlen-packed) sequence onto zero-padded chunks [S, NC, C].

    Padding rows must act as identity steps: the callers zero k, v, beta and the log-decay there.
    One host sync (the longest segment) is needed to size the padded tensor."""

    def __init__(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], chunk_size: int):
        self.chunk_size = C = chunk_size
        B, T = x.shape[:2]
        self.T = T
        self.varlen = cu_seqlens is not None
        if not self.varlen:
            self.S = B
            self.NC = max(1, -(-T // C))
        else:
            cu = cu_seqlens.long()
            lens = cu[1:] - cu[:-1]
            self.S = lens.numel()
            max_len = int(lens.max()) if self.S > 0 else 0
            self.NC = max(1, -(-max_len // C))
            seg = torch.repeat_interleave(torch.arange(self.S, device=x.device), lens, output_size=T)
            pos = torch.arange(T, device=x.device) - cu[seg]
            self.dest = seg * (self.NC * C) + pos

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, *rest] -> [S, NC, C, *rest] (zeros in the padding)."""
        C, NC = self.chunk_size, self.NC
        rest = x.shape[2:]
        if not self.varlen:
            pad = NC * C - self.T
            if pad:
                x = F.pad(x, (0, 0) * len(rest) + (0, pad))
            return x.reshape(self.S, NC, C, *rest)
        out = x.new_zeros(self.S * NC * C, *rest)
        out = out.index_copy(0, self.dest, x[0])
        return out.view(self.S, NC, C, *rest)

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """[S, NC, C, *rest] -> [B, T, *rest]."""
        rest = y.shape[3:]
        if not self.varlen:
            return y.reshape(self.S, -1, *rest)[:, : self.T]
        return y.reshape(-1, *rest)[self.dest].unsqueeze(0)


def cumulative_decay(g: torch.Tensor, dt: torch.dtype):
    """g: [..., C] per-head log-decays -> (G cumulative in float64, Gamma_causal [..., C, C] incl.
    the diagonal, in dt). Float64 because with strong decay the true dg is ~exp(g) << 1 while the
    gradient paths through exp(G_i - G_j) carry O(1) pairs that cancel exactly (the diagonal, the
    last row): in float32 their rounding left dg 40% off at g ~ -20; float64 keeps it at 1e-7.
    Callers take exp of G in float64 too and cast the result to dt."""
    C = g.shape[-1]
    G = g.to(torch.float64).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    return G, diff.exp().to(dt)


def segment_bounds(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(batch index, start, end) per sequence; used by the naive loops only."""
    if cu_seqlens is None:
        return [(b, 0, x.shape[1]) for b in range(x.shape[0])]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def recurrence(step, q, k, v, gates: list, scale: Optional[float], initial_state, output_final_state: bool,
               cu_seqlens, use_qk_l2norm: bool):
    """The naive definition of a scan: `step(q_t, k_t, v_t, *gates_t, state, scale)` applied token
    by token to each sequence (float32 state, float64 when the inputs are float64). gates: the
    per-token gate tensors [B, T, H(, K)] the rule takes (None entries are passed through)."""
    check_varlen(q, cu_seqlens, initial_state)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v)
    if use_qk_l2norm:
        q, k = l2norm(q.to(dt)), l2norm(k.to(dt))
    o = torch.zeros(*v.shape, dtype=dt, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(segment_bounds(q, cu_seqlens)):
        S = (initial_state[n].to(dt) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dt, device=q.device))[None]
        for t in range(start, end):
            gates_t = [None if x is None else x[b, t][None].to(dt) for x in gates]
            ot, S = step(q[b, t][None].to(dt), k[b, t][None].to(dt), v[b, t][None].to(dt), *gates_t, S, scale)
            o[b, t] = ot[0]
        finals.append(S[0])
    final = None
    if output_final_state:
        final = torch.stack(finals) if finals else torch.zeros(0, H, K, V, dtype=dt, device=q.device)
    return o.to(v.dtype), final
