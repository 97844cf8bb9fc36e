"""Compile every Triton kernel variant the server launches for an H100 (sm_90), on a machine
without a GPU, and check each against the hardware's limits: the attention backend's and the
decoder layer's fused pointwise kernels (RMSNorm with its residual add, RoPE with the KV write,
SiLU x up), and the decode kernel with RoPE and the KV write folded in.

The interpreter accepts constructs the GPU compiler rejects (and the reverse), and says nothing
of registers: this runs the backend's start-up `warm_up` for the layouts of real models with each
launch replaced by a compile for sm_90, so every variant is built with the very specialisation
(dtypes, constexprs, 16-divisibility of its arguments) a GPU run would give it. Each cubin must
use no local memory (register spills) and at most the shared memory an H100 block may have.
Run as a script in a process without TRITON_INTERPRET (the interpreter replaces the kernels at
import time); prints one line per variant and exits non-zero on a failure:
    python -m tests.kernels.triton_cuda_compile [LAYOUT ...]
Triton's compile cache makes a rerun take seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from torch import Tensor
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from winnow.kernels.triton import pointwise
from winnow.kernels.triton.warm_up import warm_up

HOPPER = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


@dataclass(frozen=True)
class Layout:
    """One model's attention shapes and dtypes."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    cache_dtype: torch.dtype
    intermediate: int
    block_size: int = 16

    def tensors(self, tokens: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v and a layer's cache laid out as the model hands them to the backend: q and k
        fresh from the rotary embedding, v a view into the fused qkv projection's output."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = torch.empty(tokens, (h + 2 * kv) * d, dtype=self.dtype)
        q = torch.empty(tokens, h, d, dtype=self.dtype)
        k = torch.empty(tokens, kv, d, dtype=self.dtype)
        v = qkv[:, (h + kv) * d :].view(tokens, kv, d)
        cache = torch.zeros(2, 4, self.block_size, kv, d, dtype=self.cache_dtype)
        return q, k, v, cache

    def rope_tensors(
        self, tokens: int = 4
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """q, k, v as un-rotated views of the qkv output, the cache, and (cos, sin) [T, 1, D / 2]
        in the activation dtype: what the RoPE-fused path hands the backend's warm-up."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = torch.empty(tokens, (h + 2 * kv) * d, dtype=self.dtype)
        q = qkv[:, : h * d].view(tokens, h, d)
        k = qkv[:, h * d : (h + kv) * d].view(tokens, kv, d)
        v = qkv[:, (h + kv) * d :].view(tokens, kv, d)
        cache = torch.zeros(2, 4, self.block_size, kv, d, dtype=self.cache_dtype)
        cos = torch.empty(tokens, 1, d // 2, dtype=self.dtype)
        return q, k, v, cache, (cos, torch.empty_like(cos))

    def pointwise_launches(self, tokens: int = 4) -> None:
        """Call the layer's pointwise kernels on tensors laid out as the model hands them over:
        q, k and v views of the qkv output, cos/sin [T, 1, D / 2] in the activation dtype, the
        residual stream and the gate/up output contiguous, per-head q/k norms (Qwen3) on views."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        hidden = h * d
        qkv = torch.empty(tokens, (h + 2 * kv) * d, dtype=self.dtype)
        q = qkv[:, : h * d].view(tokens, h, d)
        k = qkv[:, h * d : (h + kv) * d].view(tokens, kv, d)
        v = qkv[:, (h + kv) * d :].view(tokens, kv, d)
        cos = torch.empty(tokens, 1, d // 2, dtype=self.dtype)
        sin = torch.empty(tokens, 1, d // 2, dtype=self.dtype)
        cache = torch.zeros(2, 4, self.block_size, kv, d, dtype=self.cache_dtype)
        slots = torch.zeros(tokens, dtype=torch.int64)
        residual = torch.empty(tokens, hidden, dtype=self.dtype)
        weight = torch.empty(hidden, dtype=self.dtype)
        pointwise.rms_norm(residual, weight, 1e-6)
        pointwise.rms_norm(residual, weight, 1e-6, torch.empty_like(residual))
        pointwise.rms_norm(q, torch.empty(d, dtype=self.dtype), 1e-6)
        pointwise.rms_norm(k, torch.empty(d, dtype=self.dtype), 1e-6)
        pointwise.rope_qk(q, k, cos, sin, v, cache, slots)
        pointwise.rope_qk(q, k, cos, sin)
        pointwise.silu_mul(torch.empty(tokens, 2 * self.intermediate, dtype=self.dtype))


BF16, F32 = torch.bfloat16, torch.float32
LAYOUTS = [
    Layout("llama-3-8b", 32, 8, 128, BF16, BF16, 14336),
    Layout("qwen2.5-0.5b", 14, 2, 64, BF16, BF16, 4864),
    Layout("head-dim-256", 8, 1, 256, BF16, BF16, 8192),
    Layout("llama-3-8b-fp32", 32, 8, 128, F32, F32, 14336),
]


@dataclass
class Variant:
    layout: str
    kernel: str
    compiled: Any


def compile_instead_of_launching(variants: list[Variant], layout: str) -> Any:
    """A JITFunction.run that builds the launch's variant for sm_90 and launches nothing."""
    backend = make_backend(HOPPER)
    binders: dict[str, Any] = {}

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        name = self.fn.__name__
        if name not in binders:
            binders[name] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[name](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound, specialization, options
        )
        source = ASTSource(self, signature, constexprs, attrs)
        compiled = triton.compile(source, target=HOPPER, options=options.__dict__)
        if all(v.layout != layout or v.compiled.hash != compiled.hash for v in variants):
            variants.append(Variant(layout, name, compiled))  # each of a layout's variants once

    return run


def resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's REG / STACK / SHARED / LOCAL figures of the cubin's one kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(cuobjdump), "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"\b([A-Z]+):(\d+)", text)}


def main(names: list[str]) -> int:
    """Every layout, or those named."""
    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    variants: list[Variant] = []
    original = JITFunction.run
    try:
        for layout in [lay for lay in LAYOUTS if not names or lay.name in names]:
            JITFunction.run = compile_instead_of_launching(variants, layout.name)  # type: ignore[method-assign]
            warm_up(*layout.tensors())
            warm_up(*layout.rope_tensors())
            layout.pointwise_launches()
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
    failures = 0
    for variant in variants:
        usage = resource_usage(variant.compiled.asm["cubin"])
        shared = variant.compiled.metadata.shared
        ok = usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0
        ok = ok and shared <= H100_SHARED_BYTES
        failures += not ok
        print(
            f"sm_90 {variant.layout} {variant.kernel}: REG {usage.get('REG')} "
            f"LOCAL {usage.get('LOCAL')} STACK {usage.get('STACK')} shared {shared} "
            f"{'ok' if ok else 'FAIL'}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
