"""Hugging Face model classes for megamom models (MoM, Gated DeltaNet / GLA and other one-memory
models, Transformer++), wrapping `megamom.model.CausalLM` itself: the weights, their names and the
computation are megamom's. Works with transformers 4.5x and 5.x.

This file ships inside every `megamom`-format export together with the megamom modules it needs
(see megamom.hf.bundle), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
works where megamom is not installed.

Conventions of Hugging Face causal LMs that differ from megamom's own forward:
  * `labels` are the input ids (shifted inside: position t predicts labels[t + 1]).
  * `attention_mask`: left padding is exact (each row is prefilled on its own tokens, so padding
    never enters a memory state); right padding is fine without a cache (causal: real tokens never
    see the padding) and refused with one.
  * `past_key_values` / `cache` is a `MegaMoMCache`: a recurrent state per memory layer whose size
    does not depend on the context length (K/V for attention layers of arch=transformer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..kernels.rules import triton_available
from ..model.cache import AttentionLayerCache, MemoryLayerCache, ModelCache, concat_rows
from ..model.layers import RMSNorm
from ..model.lm import CausalLM
from ..model.memory_mixer import MemoryMixer
from .configuration_megamom import MegaMoMConfig

# transformers 5.x names the cache field of model outputs `cache`; 4.x `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------------------- cache
def _index_batch(cache: ModelCache, index: torch.Tensor) -> ModelCache:
    layers = []
    for c in cache.layers:
        if isinstance(c, MemoryLayerCache):  # [M, B, ...]
            i = index.to(c.state.device)
            conv = None if c.conv is None else {k: v.index_select(1, i) for k, v in c.conv.items()}
            layers.append(MemoryLayerCache(c.state.index_select(1, i), conv))
        else:  # [B, H, L, D]
            i = index.to(c.k.device)
            layers.append(AttentionLayerCache(c.k.index_select(0, i), c.v.index_select(0, i)))
    return ModelCache(layers, cache.seen_tokens)


class MegaMoMCache(Cache):
    """Generation cache: megamom's `ModelCache` behind the interface `generate()` uses (a
    transformers `Cache`, so generate() never takes it for a legacy tuple; none of the base class's
    per-layer K/V machinery is used).

    Memory layers hold, per memory and head, a [head_dim, head_v_dim] state plus the last
    conv_size - 1 inputs of the short convolutions: constant size, whatever the context length.
    Attention layers (arch=transformer) hold growing K/V. Updated in place by every forward.
    Recurrent states cannot be rolled back, so decoding strategies that crop the cache (assisted /
    speculative decoding, contrastive search) are not available; greedy, sampling and beam search are.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, inner: Optional[ModelCache] = None):
        # (the base class's __init__, which sets up per-layer K/V caches, is deliberately not called)
        self.inner = inner

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.inner is None else int(self.inner.seen_tokens)

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    @property
    def is_linear(self) -> list:
        # transformers slices a prompt that continues from a cache by get_seq_length() unless every
        # layer says "linear"; this cache counts its tokens, so slicing is right.
        return [False] * len(self)

    def __len__(self) -> int:
        return 0 if self.inner is None else len(self.inner.layers)

    def nbytes(self) -> int:
        return 0 if self.inner is None else self.inner.nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.inner is not None:
            self.inner = _index_batch(self.inner, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.inner is not None:
            batch = self.inner.layers[0].state.shape[1] if isinstance(self.inner.layers[0], MemoryLayerCache) \
                else self.inner.layers[0].k.shape[0]
            self.reorder_cache(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent memory state cannot be rolled back to an earlier position; "
                                  "use greedy, sampling or beam search decoding")

    def __repr__(self) -> str:
        return f"MegaMoMCache(layers={len(self)}, seen_tokens={self.get_seq_length()}, bytes={self.nbytes()})"


@dataclasses.dataclass
class MegaMoMCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the parts of the loss (router losses of MoM models)."""

    lm_loss: Optional[torch.FloatTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    z_loss: Optional[torch.FloatTensor] = None


# ----------------------------------------------------------------------------------------- models
class MegaMoMPreTrainedModel(PreTrainedModel):
    config_class = MegaMoMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # Recurrent state: transformers must not build a DynamicCache, nor use strategies that crop it;
    # it takes a Cache object (transformers < 4.56 asks for the flag).
    _is_stateful = True
    _supports_cache_class = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """megamom's initialisation (CausalLM.reset_parameters), module by module: transformers
        calls this on children before parents, so a MemoryMixer re-initialises its own linears."""
        std = self.config.initializer_range
        if isinstance(module, MemoryMixer):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MegaMoMForCausalLM(MegaMoMPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegaMoMConfig):
        super().__init__(config)
        model_config = config.to_model_config()
        if model_config.kernel_backend == "triton" and not triton_available():
            # e.g. the remote code of an export, which ships the PyTorch kernels only
            model_config = dataclasses.replace(model_config, kernel_backend="auto")
        core = CausalLM(model_config)
        # The HF module tree is CausalLM's own (model.*, lm_head), so the state dict is megamom's;
        # `core` runs the forward on the very same submodules (not registered twice).
        self.model = core.model
        self.lm_head = core.lm_head  # None with tied embeddings (the embedding matrix is the head)
        object.__setattr__(self, "_core", core)
        # The per-head decay parameters stay float32 when the rest is loaded in bf16/fp16: exp(A_log)
        # in bf16 would move every memory's decay rate by up to ~1%. (Set per instance: only
        # scalar-decay rules have them, and transformers refuses names the model lacks.)
        names = {n.rsplit(".", 1)[-1] for n, _ in core.named_parameters()}
        self._keep_in_fp32_modules_strict = [n for n in ("A_log", "dt_bias") if n in names]
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value) -> None:
        if self.lm_head is None:
            raise ValueError("this model ties its output head to the input embeddings (tie_word_embeddings)")
        self.lm_head = self._core.lm_head = value

    def get_decoder(self):
        return self.model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', and when saved from an installed megamom, the model code is shipped
        too (as `megamom convert to-hf` does), so the directory loads where megamom is absent."""
        installed = __name__.startswith("megamom.")
        if installed:
            bundle = importlib.import_module("megamom.hf.bundle")  # (not part of the shipped code)
            self.config.auto_map = dict(bundle.AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if installed and kwargs.get("is_main_process", True):
            bundle.write_bundle(save_directory)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self._core.activation_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._core.activation_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._core.activation_checkpointing

    # ------------------------------------------------------------------ generation
    # generate() of a memory model goes through megamom's own generation where megamom is installed
    # (`megamom.generate.generate_batch`: prompts packed without padding, one CUDA graph per decode
    # step on CUDA), for the arguments it takes; anything else, and `fast_generate = False`, takes
    # transformers' loop over this forward. Both give the same greedy tokens.
    fast_generate = True
    _FAST_ARGS = {"attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                  "eos_token_id", "pad_token_id", "use_cache"}

    def generate(self, input_ids: Optional[torch.LongTensor] = None, **kwargs):
        fast = self._fast_generate(input_ids, kwargs)
        return fast if fast is not None else super().generate(input_ids, **kwargs)

    @torch.no_grad()
    def _fast_generate(self, input_ids, kwargs) -> Optional[torch.Tensor]:
        """The output of generate() through megamom.generate, or None where that does not apply."""
        if (not self.fast_generate or input_ids is None or self._core.config.arch == "transformer"
                or set(kwargs) - self._FAST_ARGS or kwargs.get("use_cache") is False):
            return None
        try:
            generation = importlib.import_module("megamom.generate")
            core = self._core if __name__.startswith("megamom.") else self._installed_core()
        except Exception:  # megamom not installed, or another version of it: transformers' loop
            return None
        gc = self.generation_config
        get = lambda name: kwargs[name] if kwargs.get(name) is not None else getattr(gc, name, None)  # noqa: E731
        eos, pad = get("eos_token_id"), get("pad_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                return None
            eos = eos[0]
        B, T = input_ids.shape
        max_new = get("max_new_tokens")
        if max_new is None:
            max_new = max((get("max_length") or 20) - T, 0)
        mask = kwargs.get("attention_mask")
        lengths = self._left_padding(mask, input_ids.shape, False, True) if mask is not None else None
        starts = (T - lengths).tolist() if lengths is not None else [0] * B  # (left padding is dropped)
        rows = [r[start:] for r, start in zip(input_ids.tolist(), starts)]
        sample = bool(get("do_sample"))
        new = generation.generate_batch(core, rows, max_new, temperature=get("temperature") or 1.0 if sample else 0.0,
                                        top_k=get("top_k") if sample else None,
                                        top_p=get("top_p") or 1.0 if sample else 1.0, eos_id=eos)
        width = max(map(len, new), default=0)
        filler = pad if pad is not None else (eos if eos is not None else 0)
        out = torch.full((B, T + width), filler, dtype=input_ids.dtype, device=input_ids.device)
        out[:, :T] = input_ids
        for b, row in enumerate(new):
            out[b, T:T + len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        return out

    def _installed_core(self):
        """The installed megamom's CausalLM on this model's very parameters (no copy)."""
        megamom_config = importlib.import_module("megamom.config")
        megamom_model = importlib.import_module("megamom.model")
        cfg = megamom_config.ModelConfig(**dataclasses.asdict(self._core.config))
        with torch.device("meta"):
            core = megamom_model.CausalLM(cfg)
        core.load_state_dict(self._core.state_dict(), assign=True)
        return core.eval()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[MegaMoMCache] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep=0, cache: Optional[MegaMoMCache] = None, segment_ids: Optional[torch.Tensor] = None,
                num_items_in_batch=None, token_type_ids=None, **kwargs):
        """position_ids are implied (positions continue from the cache; documents restart them
        through `segment_ids`, megamom's packed-document input); token_type_ids are ignored.
        `logits_to_keep` > 0 computes the logits of the last positions only."""
        if inputs_embeds is not None:
            raise ValueError("MegaMoMForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions:
            raise ValueError("output_attentions is not available: memory layers have no attention matrix")
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        hf_cache = self._as_cache(cache if cache is not None else past_key_values)
        prior = hf_cache.inner if hf_cache is not None else None
        if use_cache is None:
            use_cache = prior is not None or not self.training
        left = self._left_padding(attention_mask, input_ids.shape, prior is not None, use_cache)
        shifted = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0

        hidden_states = None
        if left is not None:
            if output_hidden_states:
                raise ValueError("output_hidden_states is not available for left-padded batches")
            logits, losses, new = self._forward_left_padded(input_ids, left, shifted, use_cache, keep)
        else:
            with self._capture_hidden_states(output_hidden_states) as captured:
                out = self._core(input_ids, labels=shifted, segment_ids=segment_ids, cache=prior,
                                 use_cache=use_cache, logits_to_keep=keep)
            if captured is not None:  # embeddings, blocks 0..L-2, final norm (the HF convention)
                hidden_states = tuple(captured[:-2] + captured[-1:])
            logits, new = out.logits, out.cache
            losses = (out.loss, out.lm_loss, out.aux_loss, out.z_loss)
        if not isinstance(logits_to_keep, int):  # a tensor of positions
            logits = logits[:, logits_to_keep.to(logits.device)]
        loss, lm_loss, aux_loss, z_loss = losses
        if loss is not None and num_items_in_batch is not None:  # sum over tokens / items (grad accumulation)
            n = (shifted != -100).sum()
            loss = loss - lm_loss + lm_loss * n / num_items_in_batch

        if new is not None:
            hf_cache = hf_cache if hf_cache is not None else MegaMoMCache()
            hf_cache.inner = new
        elif not use_cache:
            hf_cache = None
        if not return_dict:
            return tuple(v for v in (loss, logits, hf_cache, hidden_states) if v is not None)
        return MegaMoMCausalLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, lm_loss=lm_loss,
                                     aux_loss=aux_loss, z_loss=z_loss, **{_CACHE_FIELD: hf_cache})

    @staticmethod
    def _as_cache(given) -> Optional[MegaMoMCache]:
        if given is None or isinstance(given, MegaMoMCache):
            return given
        if hasattr(given, "get_seq_length") and given.get_seq_length() == 0:
            return None  # an empty cache of another kind (e.g. a DynamicCache made by the caller)
        raise TypeError(f"past_key_values must be a MegaMoMCache (returned by this model), got {type(given).__name__}")

    @staticmethod
    def _left_padding(attention_mask, shape, has_cache: bool, use_cache: bool) -> Optional[torch.Tensor]:
        """Row lengths when the batch is left padded (None when there is no padding, or right
        padding that cannot matter). Raises for padding a memory state would absorb."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, length] with 1 = token, 0 = padding")
        B, T = shape
        mask = attention_mask[:, -T:].bool()
        if bool(mask.all()):
            return None
        if has_cache:
            raise ValueError("padding in tokens that continue a cache is not supported: pad prompts on the left "
                             "and let generation append tokens")
        if attention_mask.shape[1] != T:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions for {T} input ids")
        lengths = mask.sum(1)
        pos = torch.arange(T, device=mask.device)
        if torch.equal(mask, pos[None] >= (T - lengths)[:, None]):
            if bool((lengths == 0).any()):
                raise ValueError("a row of the batch is all padding")
            return lengths
        if torch.equal(mask, pos[None] < lengths[:, None]) and not use_cache:
            return None  # right padding: causal, real tokens never see it (give padding labels -100)
        raise ValueError("attention_mask must be left padding (zeros, then ones) when a cache is built, e.g. "
                         "for generation (tokenizer.padding_side = 'left'); right padding only works without "
                         "a cache, and padding in the middle of a row is not supported")

    def _forward_left_padded(self, input_ids, lengths, shifted, use_cache: bool, keep: int):
        """Each row on its own tokens (padding never enters a memory), then re-assembled."""
        if use_cache and self._core.config.arch == "transformer":
            raise ValueError("batched generation of padded prompts needs a recurrent model (arch mom or linear); "
                             "with arch=transformer generate prompts of equal length, or one at a time")
        B, T = input_ids.shape
        width = keep or T
        logits, caches, parts = [], [], []
        for b in range(B):
            n = int(lengths[b])
            labels = None if shifted is None else shifted[b:b + 1, T - n:]
            out = self._core(input_ids[b:b + 1, T - n:], labels=labels, use_cache=use_cache,
                             logits_to_keep=min(keep, n) if keep else 0)
            logits.append(F.pad(out.logits, (0, 0, width - out.logits.shape[1], 0)))
            caches.append(out.cache)
            if labels is not None:
                parts.append((out, (labels != -100).sum()))
        losses = (None, None, None, None)
        if parts:
            # token-weighted mean of the rows' LM losses; mean of their router-loss terms
            # (loss - lm_loss: the coefficients are applied by CausalLM). Rows without labels skip.
            parts = [(o, c) for o, c in parts if c > 0] or parts[:1]
            counts = torch.stack([c for _, c in parts]).to(parts[0][0].lm_loss.dtype)
            lm = torch.stack([torch.nan_to_num(o.lm_loss) for o, _ in parts]) @ counts / counts.sum().clamp(min=1)
            router = torch.stack([o.loss - o.lm_loss for o, _ in parts]).nan_to_num().mean()
            aux = [o.aux_loss for o, _ in parts if o.aux_loss is not None]
            z = [o.z_loss for o, _ in parts if o.z_loss is not None]
            losses = (lm + router, lm, torch.stack(aux).mean() if aux else None, torch.stack(z).mean() if z else None)
        new = concat_rows(caches, T) if use_cache else None
        return torch.cat(logits, 0), losses, new

    @contextlib.contextmanager
    def _capture_hidden_states(self, enabled: bool):
        if not enabled:
            yield None
            return
        states: list = []
        hooks = [self.model.embeddings.register_forward_hook(lambda m, a, o: states.append(o))]
        # a block returns (x, MLP output, ...): the stream leaving it is their sum (the next norm adds them)
        hooks += [blk.register_forward_hook(lambda m, a, o: states.append(o[0] + o[1])) for blk in self.model.layers]
        # the final norm returns (stream, normed) when it also adds the last block's MLP output
        hooks.append(self.model.norm.register_forward_hook(
            lambda m, a, o: states.append(o[1] if isinstance(o, tuple) else o)))
        try:
            yield states
        finally:
            for h in hooks:
                h.remove()


if not __name__.startswith("megamom."):
    # Running as the shipped remote code: transformers before 4.57 does not mark the class, and
    # would then re-save a loaded model without its code files.
    MegaMoMForCausalLM._auto_class = "AutoModelForCausalLM"
