"""Triton launches observed under the interpreter, each with the variant the GPU compiler would
build for it: Triton's own specialisation of its arguments for an sm_90 target (what keys its
kernel cache on a GPU), so a test can count the variants a run compiles without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Launch:
    kernel: str
    variant: tuple[object, ...]  # the specialisation: one variant compiled per distinct value
    args: dict[str, Any]  # every argument by name


_binders: dict[object, Any] = {}


def _binder(kernel: InterpretedFunction) -> Any:
    """Triton's argument binder for the kernel as `triton.jit` would compile it for sm_90."""
    if kernel.fn not in _binders:
        jit = JITFunction(kernel.fn, **kernel.kwargs)
        backend = make_backend(HOPPER)
        _binders[kernel.fn] = create_function_from_signature(jit.signature, jit.params, backend)
    return _binders[kernel.fn]


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Every interpreted kernel launch inside the block, in order."""
    launches: list[Launch] = []
    run = InterpretedFunction.run

    def recording_run(self: InterpretedFunction, *args: Any, grid: Any, warmup: bool, **kw: Any):
        bound, specialization, options = _binder(self)(*args, **kw)
        variant = (tuple(specialization), tuple(sorted(options.items())))
        launches.append(Launch(self.fn.__name__, variant, bound))
        return run(self, *args, grid=grid, warmup=warmup, **kw)

    InterpretedFunction.run = recording_run  # type: ignore[method-assign]
    try:
        yield launches
    finally:
        InterpretedFunction.run = run  # type: ignore[method-assign]


def compile_for_sm90(module: str, timeout: int) -> list[str]:
    """Run a compile script (`python -m module`) with the real GPU compiler, not the
    interpreter; its stdout lines, one per variant built. Fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns while the default is unset
    result = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout.splitlines()
