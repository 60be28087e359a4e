"""Transformer++ attention: RoPE, grouped-query heads, flash-attn when importable on CUDA,
torch SDPA otherwise (the choice is logged once)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .cache import AttentionLayerCache
from .layers import ParallelRegion

log = logging.getLogger(__name__)
_announced: set[str] = set()


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore
        return flash_attn_func
    except Exception:
        return None


def attention_backend(cfg_impl: str, device: torch.device, has_segments: bool) -> str:
    impl = cfg_impl
    if impl == "auto":
        impl = "flash" if device.type == "cuda" and _flash_attn_func() is not None and not has_segments else "sdpa"
    if impl == "flash" and (device.type != "cuda" or _flash_attn_func() is None):
        raise RuntimeError("model.attn_impl=flash needs CUDA and the flash-attn package; use sdpa")
    if impl not in _announced:
        _announced.add(impl)
        log.info("attention implementation: %s", impl)
    return impl


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """positions: [B, T] -> cos, sin [B, T, 1, dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module, ParallelRegion):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        d, H, Hkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        self.q_proj = nn.Linear(d, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, Hkv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, Hkv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(H * self.head_dim, d, bias=False)

    # read off the weights: a tensor-parallel shard holds fewer heads
    @property
    def num_heads(self) -> int:
        return self.q_proj.weight.shape[0] // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.weight.shape[0] // self.head_dim

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: Optional[torch.Tensor],
                cache: Optional[AttentionLayerCache] = None, use_cache: bool = False, seq_slice=None):
        """seq_slice: under sequence parallelism (megamom.parallel.sequence_parallel.SequenceSlice) x
        is this rank's slice of the sequence: its queries attend to the keys and values of the whole
        sequence, all-gathered (positions are the whole sequence's)."""
        x = self.enter_region(x)  # (the whole sequence under TP sequence parallelism)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k = torch.cat([cache.k, k], 2)
            v = torch.cat([cache.v, v], 2)
        new_cache = AttentionLayerCache(k, v) if (use_cache or cache is not None) else None
        if seq_slice is not None:
            return self.exit_region(self.o_proj(self._sliced_attention(q, k, v, seq_slice))), None, None
        impl = attention_backend(self.cfg.attn_impl, x.device, segment_ids is not None)
        if impl == "flash":
            o = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            o = o.reshape(B, T, -1)
        else:
            rep = self.num_heads // self.num_kv_heads
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            L = k.shape[2]
            if segment_ids is not None:
                if cache is not None:
                    raise ValueError("document boundaries (segment_ids) are not supported with a cache")
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
            elif T == L:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # queries are the last T of L positions
                causal = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
            o = o.transpose(1, 2).reshape(B, T, -1)
        return self.exit_region(self.o_proj(o)), None, new_cache

    def _sliced_attention(self, q, k, v, sl) -> torch.Tensor:
        """q [B, H, L, D] of this rank's slice against k, v of every slice (gathered before the
        GQA repeat: fewer heads to move); SDPA with the causal mask shifted by the slice's start and
        the documents' mask. -> [B, L, H * D]."""
        B, _, L, _ = q.shape
        k, v = sl.gather(k, 2), sl.gather(v, 2)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        q_pos = torch.arange(sl.start, sl.start + L, device=q.device)
        mask = torch.arange(sl.total, device=q.device)[None, :] <= q_pos[:, None]  # [L, T]
        if sl.segment_ids is not None:
            seg = sl.segment_ids
            mask = mask & (seg[:, sl.start:sl.start + L, None] == seg[:, None, :])  # [B, L, T]
            mask = mask[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, L, -1)
