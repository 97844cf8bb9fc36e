"""Triton launches observed under the interpreter, each with the variant the GPU compiler would
build for it: Triton's own specialisation of its arguments for an sm_90 target (what keys its
kernel cache on a GPU), so a test can count the variants a run compiles without a GPU."""

from __future__ import annotations

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
