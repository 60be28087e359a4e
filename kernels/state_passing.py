"""State passing across slices of a sequence (the algorithm of sequence parallelism), for every
update rule of the registry.

Every rule's update over a slice is affine in the state that enters it:  S_out = T S_in + S  with
S the slice's final state from zero and T [K, K] its transition (the identity for linear attention,
a scalar per head, a diagonal for GLA, a full matrix for the delta rules). Both come out of one
chunked scan of the slice with the value dimension extended by K columns, values [v | 0] from the
state [0 | I]: the state's columns evolve independently, so the first V columns end as S and the
last K as T (`slice_summary`, the generic form of gated_delta_rule/transition.py).

A rank holding slice r of every sequence then needs the state entering it: fold the summaries of
the slices before it, E_0 = 0, E_{r+1} = T_r E_r + S_r (`fold_states`, float32 or float64), and
scan its slice again from E_r. `scan_in_slices` does all of it in one process for P slices of each
sequence (the slices as a batch of P B sequences, one summary scan and one rerun): the reference the
distributed version is checked against, differentiable end to end."""
from __future__ import annotations

from typing import Optional

import torch

from .rules import get_rule, memory_scan


def slice_summary(rule, k, v, g=None, beta=None, chunk_size: int = 64, use_qk_l2norm: bool = False,
                  backend: str = "auto", cu_seqlens: Optional[torch.Tensor] = None,
                  carries: Optional[torch.Tensor] = None):
    """k [B, T, H, K], v [B, T, H, V] (g, beta as memory_scan takes them; or B = 1 and the sequences
    given by cu_seqlens) -> (T [N, H, K, K], S [N, H, K, V]) per sequence, in float32 (float64 inputs
    stay float64). carries [N] (optional): 0 where a sequence's transition is not wanted (its T is 0)."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    _, _, H, K = k.shape
    N = k.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    V = v.shape[-1]
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    v_ext = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], -1)
    eye = torch.eye(K, dtype=dt, device=k.device).expand(N, H, K, K)
    if carries is not None:
        eye = eye * carries.to(dt).view(N, 1, 1, 1)
    h0 = torch.cat([torch.zeros(N, H, K, V, dtype=dt, device=k.device), eye], -1)
    _, final = memory_scan(rule, torch.zeros_like(k), k, v_ext, g, beta, initial_state=h0, output_final_state=True,
                           cu_seqlens=cu_seqlens, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm,
                           backend=backend)
    return final[..., V:], final[..., :V]


def fold_states(T: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """T [P, N, H, K, K], S [P, N, H, K, V]: the summaries of P consecutive slices -> the state
    entering each slice [P, N, H, K, V] (zero for the first)."""
    entering = [torch.zeros_like(S[0])]
    for r in range(S.shape[0] - 1):
        entering.append(torch.einsum("nhij,nhjv->nhiv", T[r], entering[-1]) + S[r])
    return torch.stack(entering)


def scan_in_slices(rule, q, k, v, g=None, beta=None, slices: int = 2, scale: Optional[float] = None,
                   chunk_size: int = 64, use_qk_l2norm: bool = False, backend: str = "auto"):
    """memory_scan over [B, T, ...] computed as `slices` ranks would: each sequence cut into equal
    slices, each slice summarised, the summaries folded, each slice scanned again from the state
    entering it. -> (o [B, T, H, V], final state [B, H, K, V]), equal to the whole-sequence scan."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    B, T = k.shape[:2]
    if T % slices:
        raise ValueError(f"sequence length {T} does not split into {slices} equal slices")
    L = T // slices

    def as_slices(t):  # [B, T, ...] -> [P * B, L, ...], slice-major
        return None if t is None else t.reshape(B, slices, L, *t.shape[2:]).transpose(0, 1).reshape(
            slices * B, L, *t.shape[2:])

    qs, ks, vs, gs, bs = map(as_slices, (q, k, v, g, beta))
    Tr, Sr = slice_summary(rule, ks, vs, gs, bs, chunk_size, use_qk_l2norm, backend)
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    entering = fold_states(Tr.view(slices, B, H, K, K), Sr.view(slices, B, H, K, V))
    o, final = memory_scan(rule, qs, ks, vs, gs, bs, scale=scale, initial_state=entering.reshape(slices * B, H, K, V),
                           output_final_state=True, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm,
                           backend=backend)
    o = o.reshape(slices, B, L, H, V).transpose(0, 1).reshape(B, T, H, V)
    return o, final.view(slices, B, H, K, V)[-1]
