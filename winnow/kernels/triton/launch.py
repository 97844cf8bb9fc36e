"""Host-side arguments every attention kernel launch shares: cache strides, scale, tile sizes."""

from __future__ import annotations

import math

import torch
import triton

# A window no sequence reaches: "no sliding window" without a second kernel variant.
NO_WINDOW = 1 << 30
# tl.dot needs every dimension of both operands to be at least 16 on NVIDIA GPUs.
MIN_DOT = 16


def cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(keys -> values, block, slot, kv head) element strides of a [2, blocks, block_size,
    kv_heads, head_dim] cache whose head_dim is contiguous."""
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    stride_kv, stride_block, stride_slot, stride_head, _ = kv_cache.stride()
    return stride_kv, stride_block, stride_slot, stride_head


def qk_scale(head_dim: int) -> float:
    """1/sqrt(head_dim) (SDPA's default) times log2(e): the kernels exponentiate with exp2."""
    return math.log2(math.e) / math.sqrt(head_dim)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products stay IEEE fp32 (tl.dot would otherwise round them to TF32 on GPUs);
    fp16/bf16 products are exact in the fp32 accumulator either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the attention kernels must widen their dot operands to fp32 (see attend_range):
    for bf16 under Triton's interpreter only."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def padded(n: int) -> int:
    """Power-of-two tile extent for n items, at least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def window_arg(sliding_window: int | None) -> int:
    return NO_WINDOW if sliding_window is None else sliding_window
