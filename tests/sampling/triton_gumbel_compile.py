"""Compile the sampler's Triton Gumbel-max for an H100 (sm_90) on a machine without a GPU: every
variant the sampler launches (float32 and bf16 logits, per-slot tables or per-row values, y
written or not), each checked for register spills and shared memory like the attention kernels
(tests/kernels/triton_cuda_compile.py). Run in a process without TRITON_INTERPRET:
    python -m tests.sampling.triton_gumbel_compile
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.runtime.jit import JITFunction

from tests.kernels.triton_cuda_compile import (
    H100_SHARED_BYTES,
    Variant,
    compile_instead_of_launching,
    resource_usage,
)
from winnow.kernels.triton import gumbel_max


def main() -> int:
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    variants: list[Variant] = []
    original = JITFunction.run
    rows, vocab, slots = 4, 131072, 8
    positions = torch.zeros(rows, dtype=torch.int64)
    table = torch.zeros(slots, 2, dtype=torch.int64)
    floats = torch.ones(slots, 8)
    try:
        JITFunction.run = compile_instead_of_launching(variants, "sampler")  # type: ignore[method-assign]
        for dtype in (torch.float32, torch.bfloat16):  # the plain step on the model's logits
            z = torch.empty(rows, vocab, dtype=dtype)
            gumbel_max.gumbel_argmax(z, positions, table[:, 0], floats[:, 0], slots=positions)
        z = torch.empty(rows, vocab)  # the pipeline's free route, with and without y
        for y_out in (z, None):
            gumbel_max.gumbel_argmax(z, positions, table[:rows, 0], floats[:rows, 0], y_out=y_out)
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
    failures = 0
    for variant in variants:
        usage = resource_usage(variant.compiled.asm["cubin"])
        shared = variant.compiled.metadata.shared
        ptx = variant.compiled.asm["ptx"]
        ok = usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0
        ok = ok and shared <= H100_SHARED_BYTES
        ok = ok and "div.rn.f32" in ptx and "div.full" not in ptx  # IEEE division by T
        failures += not ok
        print(
            f"sm_90 {variant.kernel}: REG {usage.get('REG')} LOCAL {usage.get('LOCAL')} "
            f"STACK {usage.get('STACK')} shared {shared} {'ok' if ok else 'FAIL'}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
