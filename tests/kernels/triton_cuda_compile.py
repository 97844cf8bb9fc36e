"""Compile every Triton kernel (attention, fused pointwise) ahead of time for NVIDIA GPUs, on a
machine without one.

The interpreter accepts constructs the GPU compiler rejects (and the reverse): this runs the real
compiler down to a cubin for each kernel in the shapes the backend launches, so a kernel that
would fail to build on the GPU fails here. Run as a script in a process without TRITON_INTERPRET
(the interpreter replaces the kernels at import time):
    python -m tests.kernels.triton_cuda_compile [--all]
By default it builds for Hopper only: each kernel in bf16, and once in fp32 each kernel kind whose
dots must stay IEEE fp32; --all builds every kernel in both pairings for Ampere and Hopper.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from winnow.kernels.triton import decode, kv_write, pointwise, prefill

# NVIDIA generations: Ampere (A100) and Hopper (H100/H200).
ARCHITECTURES = (80, 90)


def signature(kernel: triton.JITFunction, pointers: dict[str, str], constants: dict) -> dict:
    """Triton's signature strings: the given element types for pointers, fp32 for the scale and
    the norm's epsilon, int32 for every other runtime argument (strides, lengths)."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = "*" + pointers[name]
        else:
            types[name] = "fp32" if name in ("qk_scale", "eps") else "i32"
    return types


def kernel_builds(dtype: str, cache_dtype: str) -> list[tuple[triton.JITFunction, dict, dict]]:
    """(kernel, pointer element types, constexprs) of each launch for one dtype pairing."""
    precision = "ieee" if dtype == "fp32" else "tf32"
    tables = {"block_tables_ptr": "i64", "seq_lens_ptr": "i64"}
    io = {"q_ptr": dtype, "out_ptr": dtype, "cache_ptr": cache_dtype, **tables}
    tile = dict(BLOCK_N=64, BLOCK_D=128, HEAD_DIM=128, BLOCK_SIZE=16, PRECISION=precision)
    tile["UPCAST_DOT"] = False
    return [
        (
            kv_write._write_kv_kernel,
            {"k_ptr": dtype, "v_ptr": dtype, "cache_ptr": cache_dtype, "slots_ptr": "i64"},
            dict(NUM_KV_HEADS=8, HEADS_PAD=8, BLOCK_D=128, HEAD_DIM=128),
        ),
        *(
            (
                decode._decode_kernel,
                {**io, "partial_ptr": "fp32", "lse_ptr": "fp32"},
                dict(NUM_HEADS=32, GROUP=4, ROWS=16, SPLIT=split, **tile),
            )
            for split in (False, True)
        ),
        (
            decode._merge_splits_kernel,
            {"partial_ptr": "fp32", "lse_ptr": "fp32", "out_ptr": dtype},
            dict(NUM_HEADS=32, SPLITS=16, BLOCK_D=128, HEAD_DIM=128),
        ),
        (
            prefill._prefill_kernel,
            {**io, "query_starts_ptr": "i64"},
            dict(GROUP=7, GROUP_PAD=8, BLOCK_Q=8, **tile),
        ),
        (
            pointwise._rms_norm_kernel,
            {"x_ptr": dtype, "delta_ptr": dtype, "weight_ptr": dtype, "out_ptr": dtype},
            dict(N=4096, BLOCK=4096, HAS_DELTA=True),
        ),
        (
            pointwise._silu_mul_kernel,
            {"gate_up_ptr": dtype, "out_ptr": dtype},
            dict(N=14336, BLOCK=pointwise.SILU_BLOCK),
        ),
        (
            pointwise._rope_kv_kernel,
            {
                **{
                    f"{name}_ptr": dtype for name in ("q", "k", "v", "cos", "sin", "q_out", "k_out")
                },
                "cache_ptr": cache_dtype,
                "slots_ptr": "i64",
            },
            dict(
                NUM_Q_HEADS=32,
                NUM_KV_HEADS=8,
                Q_HEADS_PAD=32,
                KV_HEADS_PAD=8,
                HALF=64,
                HALF_PAD=64,
                WRITE_CACHE=True,
            ),
        ),
    ]


def main(argv: list[str]) -> int:
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    every = "--all" in argv
    for arch in ARCHITECTURES if every else ARCHITECTURES[-1:]:
        for dtype, cache_dtype in (("bf16", "bf16"), ("fp32", "fp16")):
            for kernel, pointers, constants in kernel_builds(dtype, cache_dtype):
                # Quick: fp32 only where IEEE dots are built (the direct decode repeats the split)
                has_dot = "PRECISION" in constants and constants.get("SPLIT", True)
                if not every and dtype == "fp32" and not has_dot:
                    continue
                source = ASTSource(kernel, signature(kernel, pointers, constants), constants)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm["cubin"], kernel.__name__
                print(f"sm_{arch} {dtype}/{cache_dtype} {kernel.__name__}: cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
