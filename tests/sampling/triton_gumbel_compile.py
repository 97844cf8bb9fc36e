"""Compile the sampler's Triton Gumbel-max for an H100 (sm_90) on a machine without a GPU: every
variant the sampler launches (float32 and bf16 logits, per-slot tables or per-row values, y
written or not, the fused step with stages 1-2, logprobs or both), each checked for register
spills and shared memory like the attention kernels (tests/kernels/triton_cuda_compile.py), for
an IEEE division by T and for float32 products left unfused. Run in a process without
TRITON_INTERPRET:
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
from winnow.kernels.triton.warm_up import warm_up_sampler


def main() -> int:
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    variants: list[Variant] = []
    original = JITFunction.run
    rows, vocab = 4, 131072
    positions = torch.zeros(rows, dtype=torch.int64)
    floats = torch.ones(rows, 8)
    try:
        JITFunction.run = compile_instead_of_launching(variants, "sampler")  # type: ignore[method-assign]
        for dtype in (torch.float32, torch.bfloat16):  # every variant the sampler warms up
            warm_up_sampler(vocab, torch.device("cpu"), dtype)
        z = torch.empty(rows, vocab)  # the pipeline's exact redo, on per-row values
        gumbel_max.gumbel_argmax(z, positions, positions, floats[:, 0])
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
        ok = ok and "fma.rn.f32" not in ptx  # penalties round as torch's separate operations
        failures += not ok
        print(
            f"sm_90 {variant.kernel}: REG {usage.get('REG')} LOCAL {usage.get('LOCAL')} "
            f"STACK {usage.get('STACK')} shared {shared} {'ok' if ok else 'FAIL'}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
