"""Scatter a step's new keys/values into their paged-cache slots, rounding to the cache dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from winnow.kernels.triton.launch import cache_strides


@triton.jit(do_not_specialize=["slots_ptr"])  # a step's slots sit anywhere in a staging buffer
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slots_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_slot,
    stride_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per new token: all its kv heads. A negative slot (a padding row) is skipped."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + offs_d, mask=mask)
    dst = cache_ptr + slot.to(tl.int64) * stride_slot + heads * stride_head + offs_d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k/v [T, Hkv, D] -> flat cache slots `slots` [T] (block * block_size + offset)."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    stride_kv, stride_block, stride_slot, stride_head = cache_strides(kv_cache)
    if stride_block != block_size * stride_slot:
        raise ValueError("the KV cache's blocks must be contiguous to address it by flat slot")
    if slots.numel() == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _write_kv_kernel[(slots.shape[0],)](
        k, v, kv_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        stride_kv, stride_slot, stride_head,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim,
    )  # fmt: skip
