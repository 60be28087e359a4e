"""Shared machinery of the Triton kernels (imported as `megamom.kernels.triton`).

Importing this package raises ImportError where Triton is missing, which is what
`megamom.kernels.rules.triton_available()` relies on.

Conventions of every chunked kernel: tokens are packed [T_total, H, D] (B=1 plus cu_seqlens; a
dense [B, T] batch is turned into B segments of length T), one program per (chunk, head) or per
(segment, head, value block). `Varlen` holds the chunk bookkeeping, built on the device (no host
sync), computed once in forward and reused by backward."""
from __future__ import annotations

from .launch import _DEFAULT_CFG, _ENV_CFG, INTERPRET, launch_cfg, next_pow2  # noqa: F401  (ImportError: no Triton)
from .varlen import Varlen, _prepare_varlen_torch, chunk_table, prepare_varlen  # noqa: F401
