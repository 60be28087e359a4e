"""A micro-batch's forward and backward replayed from CUDA graphs (train.cuda_graph).

Why: the model issues a few thousand small kernels per step from Python. The CPU takes longer to
issue mom-340m's forward than the GPU takes to run it, so the GPU idles between kernels, and a loop
that waits on the GPU once a step (a loss read on the host) loses the whole issue time again.
Replaying a captured graph issues each pass with one launch (what it gains: benchmarks/RESULTS.md).

What capture needs, and why the config refuses the rest (TrainConfig / Trainer):
- fixed shapes and no host sync: true of the model without document boundaries (memory segment sizes
  stay on the device). With data.reset_at_doc_boundaries the number of documents per batch sets the
  shapes, and is read on the host.
- parameters at fixed addresses: ZeRO-3 gathers and frees them around each forward. The graph reads
  the addresses it was captured with; `check_parameters` compares them each step, so a run whose
  parameters moved stops with an error instead of training stale weights.
- activation checkpointing, torch.compile, optimizer offload and fp16: not tested with graphs.
- DeepSpeed's ZeRO-1 and ZeRO-2: only with the engine built under a side stream
  (`capture_ready_init`, as torch's docs ask of DDP before graph capture); built on the default
  stream their backward capture fails.

torch.cuda.make_graphed_callables captures one graph for the forward and one for the backward, in
one private memory pool. The backward returns the parameters' gradients as outputs, so they reach
.grad through the usual accumulation (and DeepSpeed's gradient hooks) outside the graph."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..model.lm import LMOutput


@contextlib.contextmanager
def capture_ready_init(enabled: bool):
    """Build the DeepSpeed engine inside this when its steps will be captured (enabled, CUDA): the
    engine is then initialised on a side stream, not the default one.

    Why: initialised on the default (legacy) stream, the ZeRO-1 and ZeRO-2 steps failed to capture:
    inside the backward capture's torch.autograd.grad, "operation would make the legacy stream depend
    on a capturing blocking stream" (cudaErrorStreamCaptureImplicit), with torch's warning that an
    AccumulateGrad node's stream (the stream current when it was made) is not the capture's.
    Initialised under a side stream, as torch's CUDA-graph docs ask of DDP, ZeRO-1 and ZeRO-2 in bf16
    and fp32 capture, and their replayed steps equal eager ones (gradients, logged terms, weights after
    three steps: tests/gpu/test_cuda_graph_gpu.py; the trainer's loop on one GPU: that file's trainer
    case; on two data-parallel ranks: the same comparison run as a script on two H200s)."""
    if not enabled or not torch.cuda.is_available():
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def check_setup(train_cfg, device: torch.device, precision: str) -> None:
    """What train.cuda_graph needs of the run beyond its config: a CUDA device, and not fp16 (its loss
    scaler skips steps on the host; untested). The config refuses the rest: ZeRO-3 (parameters
    move), document resets (shapes change), activation checkpointing, compile and optimizer offload
    (untested). Replayed steps equal eager ones (tests/gpu/test_cuda_graph_gpu.py): torch's AdamW and
    DeepSpeed ZeRO-0, 1 and 2, in bf16 and fp32, with the engine built under `capture_ready_init`
    as the trainer builds it; and the trainer's own loop (ZeRO-2, bf16) on one GPU and on two
    data-parallel ranks, whose gradient reduction runs in DeepSpeed's hooks outside the graph."""
    from ..config import ConfigError
    if not train_cfg.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, this run is on {device.type}; "
                          f"set train.cuda_graph=false")
    if precision == "fp16":
        raise ConfigError("train.cuda_graph=true is not tested with train.precision=fp16; use bf16 or fp32, or set "
                          "train.cuda_graph=false")


class _LossTerms(nn.Module):
    """model(input_ids, labels) as tensors only (graph outputs): the loss (differentiable), then
    detached terms for logging: lm_loss, aux_loss, z_loss, per routed layer [aux_loss] and
    [token fraction per memory]."""

    def __init__(self, model: nn.Module, autocast_dtype: Optional[torch.dtype]):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        # autocast inside the captured forward only: the backward must be captured outside it, as
        # an eager loss.backward() runs (ops in custom backward functions would otherwise run in
        # bf16). Its weight cache stays off: cached casts would outlive the capture.
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            out = self.model(input_ids, labels=labels, return_logits=False)
        zero = out.lm_loss.detach().new_zeros(())
        stats = out.router_stats
        layer_aux = torch.stack([s.aux_loss.detach() for s in stats]) if stats else zero.new_zeros(0)
        fraction = torch.stack([s.token_fraction for s in stats]) if stats else zero.new_zeros(0, 0)
        return (out.loss, out.lm_loss.detach(), zero if out.aux_loss is None else out.aux_loss.detach(),
                zero if out.z_loss is None else out.z_loss.detach(), layer_aux, fraction)


class _GraphedRouterStats:
    """A routed layer's statistics as the trainer logs them (aux_loss, token_fraction), detached graph
    outputs; unlike RouterStats it has no per-layer z_loss (the mean over layers is LMOutput.z_loss)."""

    def __init__(self, aux_loss: torch.Tensor, token_fraction: torch.Tensor):
        self.aux_loss, self.token_fraction = aux_loss, token_fraction


class GraphedLoss:
    """Training forward + backward of `model` for input_ids / labels of one shape, from CUDA graphs;
    autocast_dtype: run the forward under autocast to that dtype (float32 weights), else as is.

    Captured on the first call (a few warm-up passes first, on a side stream, as
    make_graphed_callables does); later calls copy their inputs into the captured buffers and replay.
    Returns an LMOutput with loss (backward replays the backward graph), lm_loss, aux_loss, z_loss
    and router_stats; the tensors are overwritten by the next call, so read them before it."""

    def __init__(self, model: nn.Module, autocast_dtype: Optional[torch.dtype] = None, warmup_iters: int = 3):
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.warmup_iters = warmup_iters
        self.shape: Optional[tuple] = None
        self._graphed = None
        self._params: list[tuple[str, nn.Parameter, int]] = []
        self._hooks: list = []
        self._grad_buffers: set[int] = set()  # addresses of the backward graph's gradient outputs

    def _capture(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if input_ids.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the batch on a CUDA device, got {input_ids.device}")
        self.shape = tuple(input_ids.shape)
        self._params = [(n, p, p.data_ptr()) for n, p in self.model.named_parameters()]
        try:
            self._graphed = torch.cuda.make_graphed_callables(
                _LossTerms(self.model, self.autocast_dtype), (input_ids.clone(), labels.clone()),
                num_warmup_iters=self.warmup_iters)
        except Exception as e:
            raise RuntimeError(f"capturing the training step in a CUDA graph failed ({type(e).__name__}: {e}); "
                               f"train with train.cuda_graph=false") from e
        # The backward graph hands out its own static buffers as the gradients, and autograd keeps such
        # a buffer as .grad when .grad is None (nobody else references it). That is right until the
        # next replay overwrites the buffer: a .grad still holding it then (kept for accumulation over
        # micro-batches, or zeroed in place instead of set to None) is copied out first
        # (`_release_grads`). A copy of every gradient after every backward did the same at ~2.2 ms a
        # mom-340m step (H200); this copies once per accumulation window, and not at all for a loop
        # that steps and sets the gradients to None after each micro-batch. The buffers stay the same
        # for the graph's life: once every hooked parameter's buffer is noted, the hooks go
        # (`_release_grads`; a backward over a subset of the parameters notes only those).
        self._hooks = [p.register_hook(self._note_buffer) for p in self.model.parameters() if p.requires_grad]

    def _note_buffer(self, grad: torch.Tensor) -> None:
        self._grad_buffers.add(grad.data_ptr())

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _release_grads(self) -> None:
        """Before a replay: copy out each .grad that is one of the backward graph's buffers. Once
        every hooked parameter's buffer is noted, the hooks are removed (a Python call per parameter
        and backward, for addresses that do not change)."""
        if self._hooks and len(self._grad_buffers) >= len(self._hooks):
            self._remove_hooks()
        for p in self.model.parameters():
            if p.grad is not None and p.grad.data_ptr() in self._grad_buffers:
                p.grad = p.grad.clone()

    def close(self) -> None:
        """Drop the graphs and remove the gradient hooks; a later call captures anew."""
        self._release_grads()  # the graphs' buffers must not stay the caller's gradients
        self._remove_hooks()
        self._grad_buffers = set()
        self._graphed = self.shape = None

    def check_parameters(self) -> None:
        """The graph reads the parameter addresses of its capture: refuse to go on if any moved."""
        now = list(self.model.named_parameters())
        if len(now) != len(self._params):
            raise RuntimeError(f"the model has {len(now)} parameters, {len(self._params)} when the CUDA graph was "
                               f"captured; train with train.cuda_graph=false")
        for (name, p0, ptr), (_, p) in zip(self._params, now):
            if p is not p0 or p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {name} moved in memory since the CUDA graph was captured (its "
                                   f"storage was replaced): the graph would train stale weights; train with "
                                   f"train.cuda_graph=false")

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> LMOutput:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {list(labels.shape)} and input_ids {list(input_ids.shape)} differ in shape")
        if self._graphed is None:
            self._capture(input_ids, labels)
        else:
            if tuple(input_ids.shape) != self.shape:
                raise ValueError(f"the CUDA graph was captured for batches of shape {list(self.shape)}, got "
                                 f"{list(input_ids.shape)}: graphs replay fixed shapes (train with "
                                 f"train.cuda_graph=false for batches of changing shape)")
            self.check_parameters()
            self._release_grads()
        loss, lm_loss, aux, z, layer_aux, fraction = self._graphed(input_ids, labels)
        stats = [_GraphedRouterStats(a, f) for a, f in zip(layer_aux, fraction)]
        return LMOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux if stats else None, z_loss=z if stats else None,
                        router_stats=stats)


def engine_forward(engine, graphed: GraphedLoss, input_ids: torch.Tensor, labels: torch.Tensor) -> LMOutput:
    """`graphed` in place of engine(input_ids, labels=labels). The replay bypasses engine.forward;
    of its bookkeeping (DeepSpeed 0.19.8) this does the ZeRO optimizers' per-step flag reset. Its
    backward hooks on the outputs are not registered, as in the eager path: DeepSpeed finds no
    tensor in the LMOutput dataclass there, and engine.backward scales the loss itself."""
    clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
    if clear is not None:
        clear()
    return graphed(input_ids, labels)
