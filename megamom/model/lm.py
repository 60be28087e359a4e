"""Causal language model shared by all architectures: embeddings, pre-norm blocks
(h = x + mixer(norm(x)); out = h + SwiGLU(norm(h)); each residual add fused into the next norm), final
norm, (tied) LM head.

Module names follow flash-linear-attention's (model.embeddings, model.layers.{i}.attn_norm /
attn / mlp_norm / mlp, model.norm, lm_head) so checkpoint conversion is a renaming."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megamom.kernels import use_triton

from ..config import ModelConfig
from .attention import Attention
from .cache import ModelCache
from .layers import RMSNorm, SwiGLU, autocast_target_dtype
from .loss import LMLoss
from .memory_mixer import MemoryMixer
from .router import RouterOutput, route


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_coef * aux_loss + z_coef * z_loss
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # mean over routed layers (1.0 = balanced)
    z_loss: Optional[torch.Tensor] = None
    router_stats: list = field(default_factory=list)  # RouterStats per routed layer
    cache: Optional[ModelCache] = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernel_backend)
        self.attn = Attention(cfg, layer_idx) if cfg.arch == "transformer" else MemoryMixer(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernel_backend)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_hidden_size, cfg.kernel_backend)

    def forward(self, x, ctx: dict, cache=None, use_cache: bool = False, residual=None):
        """The residual stream entering the block is x + residual (residual: the previous block's MLP
        output, None for the first block), added inside the attention norm's kernel. Returns (x, MLP
        output, router stats, cache): the stream leaving the block is x + MLP output, added by the
        next norm. One fused add + norm per residual add, no gradient sums on the stream."""
        lowp = autocast_target_dtype(x)
        decoding = cache is not None and x.shape[1] == 1  # (the decode step routes its one token itself)
        if isinstance(self.attn, MemoryMixer) and self.attn.router is not None and lowp != x.dtype and not decoding:
            # the router reads the norm's output in float32, the projections in bf16: routed in the norm
            x, a, a_lowp, routed = norm_and_route(self.attn_norm, x, residual, lowp, self.attn.router.weight,
                                                  self.attn.topk)
            h, stats, new_cache = self.attn(a if a is not None else a_lowp, ctx["doc_ids"], ctx["num_docs"], cache,
                                            use_cache, x_lowp=a_lowp, routed=routed, seq_slice=ctx.get("slice"))
        else:
            if residual is None:
                a = self.attn_norm(x)
            else:
                x, a = self.attn_norm(x, residual)
            if isinstance(self.attn, Attention):
                h, stats, new_cache = self.attn(a, ctx["positions"], ctx["segment_ids"], cache, use_cache,
                                                seq_slice=ctx.get("slice"))
            else:
                h, stats, new_cache = self.attn(a, ctx["doc_ids"], ctx["num_docs"], cache, use_cache,
                                                seq_slice=ctx.get("slice"))
        x, y = self.mlp_norm(x, h, out_dtype=autocast_target_dtype(x))  # y goes straight into matmuls
        return x, self.mlp(y), stats, new_cache


def norm_and_route(norm: RMSNorm, x: torch.Tensor, residual: Optional[torch.Tensor], dtype: torch.dtype,
                   router_weight: torch.Tensor, topk: int):
    """The MoM block's attention norm and its layer's router: -> (s = x + residual, or x without one;
    RMSNorm(s) in float32, or None on the Triton path; the same in dtype (the projections' input); the
    router's `RouterOutput` on the float32 one). On the Triton path one kernel each way does the add,
    the norm and the router (logits, softmax, top-k): the float32 output the router reads never
    leaves registers. Elsewhere the norm, a cast and `router.route`."""
    if use_triton(x, norm.backend):
        from megamom.kernels.triton.rmsnorm import rms_norm_route
        out = rms_norm_route(x, residual, norm.weight, norm.eps, dtype, router_weight, topk)
        return (out[0] if residual is not None else x), None, out[-5], RouterOutput(*out[-4:])
    s, y = norm(x, residual) if residual is not None else (x, norm(x))
    return s, y, y.to(dtype), route(y.reshape(-1, y.shape[-1]), router_weight, topk)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernel_backend)


def document_index(segment_ids: Optional[torch.Tensor], B: int, T: int, device) -> tuple[torch.Tensor, int]:
    """Global document id of every token (flattened [B*T], non-decreasing) and their number.
    segment_ids: [B, T] per-row document numbers starting at 0, non-decreasing."""
    if segment_ids is None:
        return torch.arange(B, device=device).repeat_interleave(T), B
    per_row = segment_ids[:, -1].long() + 1
    offsets = F.pad(per_row.cumsum(0)[:-1], (1, 0))
    return (segment_ids.long() + offsets[:, None]).reshape(-1), int(per_row.sum())


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (for rotary embeddings)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - start


def _context(segment_ids: Optional[torch.Tensor], B: int, T: int, offset: int, device) -> dict:
    """The blocks' per-token context: global document ids, their number, positions (rotary)."""
    doc_ids, num_docs = document_index(segment_ids, B, T, device)
    if segment_ids is not None:
        positions = document_positions(segment_ids)
    else:
        positions = (torch.arange(T, device=device) + offset).expand(B, T)
    return {"doc_ids": doc_ids, "num_docs": num_docs, "positions": positions, "segment_ids": segment_ids}


class CausalLM(nn.Module):
    # sequence parallelism's seam (megamom.parallel.sequence_parallel.SequenceSplit): the whole
    # micro-batch -> this rank's slice of every sequence and the blocks' context; None on one rank
    sequence_split = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.loss_fn = LMLoss(cfg.loss_chunk_size, cfg.kernel_backend)  # no parameters: the state dict is unchanged
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        nn.init.normal_(self.model.embeddings.weight, 0.0, std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for block in self.model.layers:
            for lin in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                nn.init.normal_(lin.weight, 0.0, std)
            if isinstance(block.attn, Attention):
                for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj):
                    nn.init.normal_(lin.weight, 0.0, std)
            else:
                block.attn.reset_parameters()
            block.attn_norm.weight.fill_(1.0)
            block.mlp_norm.weight.fill_(1.0)
            if self.config.rescale_residual_init:
                for lin in (block.attn.o_proj, block.mlp.down_proj):
                    lin.weight.div_((2 * self.config.num_layers) ** 0.5)
        self.model.norm.weight.fill_(1.0)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embeddings.weight if self.lm_head is None else self.lm_head.weight

    def no_weight_decay_names(self) -> set[str]:
        """Parameters kept out of weight decay: norms, biases, embeddings, A_log, dt_bias."""
        names = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() < 2 or "norm" in name or "embeddings" in name or leaf == "A_log" or leaf.endswith("bias"):
                names.add(name)
        return names

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, cache: Optional[ModelCache] = None,
                use_cache: bool = False, logits_to_keep: int = 0, return_logits: bool = True,
                logits_at: Optional[torch.Tensor] = None) -> LMOutput:
        """input_ids, labels: [B, T] with labels[t] the target of position t (-100 = ignore).
        segment_ids: [B, T] document number per token (memories and attention reset at
        document starts); with use_cache (memory models) the cache then holds one row per document,
        in order (several prompts prefilled as one packed row: megamom.generate.generate_batch).
        logits_to_keep > 0 computes logits for the last positions only; logits_at [n] for these
        positions of every row."""
        cfg = self.config
        if segment_ids is not None and (cache is not None or (use_cache and cfg.arch == "transformer")):
            # a cache continues one sequence per row; an attention cache of packed documents would mix them
            raise ValueError("segment_ids (packed documents) cannot continue a cache, nor fill an attention "
                             "cache; generate with one document per row and segment_ids=None")
        offset = cache.seen_tokens if cache is not None else 0
        if self.sequence_split is not None:  # this rank's slice of the sequences (labels too)
            if use_cache or cache is not None:
                raise ValueError("a cache cannot be used with a sequence split over ranks; generate from the "
                                 "consolidated model")
            input_ids, labels, ctx = self.sequence_split(input_ids, labels, segment_ids)
            B, T = input_ids.shape
            x = self.model.embeddings(input_ids)
        else:
            B, T = input_ids.shape
            x = self.model.embeddings(input_ids)
            if cache is not None and T == 1 and cfg.arch != "transformer":  # a decode step reads no positions
                ctx = {"doc_ids": None, "num_docs": B, "positions": None, "segment_ids": None}
            else:
                ctx = _context(segment_ids, B, T, offset, x.device)
        layer_caches = cache.layers if cache is not None else [None] * len(self.model.layers)
        new_caches, stats = [], []
        residual = None
        for block, layer_cache in zip(self.model.layers, layer_caches):
            if self.activation_checkpointing and self.training and layer_cache is None and not use_cache:
                x, residual, st, nc = checkpoint(block, x, ctx, None, False, residual, use_reentrant=False)
            else:
                x, residual, st, nc = block(x, ctx, layer_cache, use_cache, residual)
            new_caches.append(nc)
            if st is not None:
                stats.append(st)
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[1]
        out = LMOutput(router_stats=stats)
        if use_cache or cache is not None:
            out.cache = ModelCache(new_caches, offset + T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        elif logits_at is not None:
            x = x[:, logits_at]
        if return_logits:
            out.logits = self.loss_fn.logits(x, self.output_weight)
        if labels is not None:
            # training passes no logits: the loss then never holds [tokens, vocab] (megamom.model.loss)
            out.lm_loss = self.loss_fn(x, self.output_weight, labels, out.logits)
            loss = out.lm_loss
            if stats:
                out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
                out.z_loss = torch.stack([s.z_loss for s in stats]).mean()
                if cfg.aux_loss_coef:
                    loss = loss + cfg.aux_loss_coef * out.aux_loss
                if cfg.z_loss_coef:
                    loss = loss + cfg.z_loss_coef * out.z_loss
            out.loss = loss
        return out
