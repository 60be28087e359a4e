"""Compile every Triton launch for a GPU target WITHOUT a GPU (CI, developer machines).

`compile_only()` patches `JITFunction.run` so that a launch compiles the kernel for the given
target (default Hopper, sm_90) with Triton's bundled ptxas instead of running it; the wrappers can
then be driven with CPU tensors (their outputs stay uninitialised). Catches front-end errors
(e.g. constexpr misuse), unsupported dot shapes and shared-memory / register overuse before a
GPU run. `ptxas -v` gives registers and spills per kernel.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction


@dataclass
class Compiled:
    name: str
    constexprs: dict
    options: dict
    shared: int
    registers: int
    spill_bytes: int


def _ptxas_report(ptx: str, arch: str) -> tuple[int, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return (int(regs[-1]) if regs else -1, int(spills[-1]) if spills else -1)


@contextlib.contextmanager
def compile_only(capability: int = 90, ptxas_report: bool = True):
    """Within the context, kernel launches compile for cuda:`capability` and return; yields the
    list of Compiled records (one per distinct specialisation)."""
    target = GPUTarget("cuda", capability, 32)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    records: list[Compiled] = []
    seen = set()
    original = JITFunction.run

    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        # Same specialisation as JITFunction.run (16-byte alignment / divisibility attributes enable
        # cp.async pipelining and change shared-memory use), minus the driver.
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (self.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               repr(options))
        if key in seen:
            return None
        seen.add(key)
        ck = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        regs, spills = _ptxas_report(ck.asm["ptx"], arch) if ptxas_report else (-1, -1)
        shared = getattr(ck.metadata, "shared", -1)
        names = [p.name for p in self.params]
        consts = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and v is not None}
        records.append(Compiled(self.__name__, consts,
                                {"num_warps": options.num_warps, "num_stages": options.num_stages}, shared, regs,
                                spills))
        return None

    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = original
