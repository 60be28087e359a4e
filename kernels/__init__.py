"""MegaMoM kernels (imported as `megamom.kernels`).

Each op has a `naive` definition (per-token recurrence), a `chunk` implementation and a
recurrent `step` for decoding, side by side; `rules.memory_scan` dispatches to Triton on CUDA
and to the PyTorch reference elsewhere."""
from .rules import (RULES, UpdateRule, get_rule, memory_scan, memory_scan_naive, memory_step, resolve_backend,
                    use_triton)
from .short_conv import causal_conv1d_step, causal_conv1d_varlen, causal_conv1d_varlen_split
from .utils import l2norm

__all__ = ["RULES", "UpdateRule", "get_rule", "memory_scan", "memory_scan_naive", "memory_step",
           "resolve_backend", "use_triton", "causal_conv1d_varlen", "causal_conv1d_varlen_split",
           "causal_conv1d_step", "l2norm"]
