"""Decode attention (one new token per sequence) read in place from the paged KV cache.

One program per (sequence, kv head, context split): it loads the group of query heads that share
that kv head as the rows of one tile, so each key/value is read once for the whole group (no
K/V repeat). Long contexts are split over several programs (flash-decoding): each writes its
normalised partial output and log-sum-exp, and a second kernel merges the splits.

`rope_paged_decode` is the same launch with RoPE and the KV write folded in (ROPE_KV): it takes
the new token's un-rotated q, k and v, rotates q (and k) in registers, and takes the new token's
own key and value from registers rather than the cache: every program reads the cache only below
the new position (written in earlier steps), and the one program of each (sequence, kv head)
whose split holds the new position adds its contribution and stores its k and v into the cache.
No program ever reads a slot another program of the same launch writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from winnow.kernels.triton.launch import (
    cache_strides,
    dot_precision,
    padded,
    qk_scale,
    upcast_dot,
    window_arg,
)
from winnow.kernels.triton.tile import attend_range

BLOCK_N = 64  # keys per inner-loop tile
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the merge than it saves
MAX_SPLITS = 32  # a power of two: the merge kernel's one tile of splits


# Arguments that change from step to step: Triton must not compile a variant per value.
@triton.jit(
    do_not_specialize=[
        "slots_ptr", "block_tables_ptr", "seq_lens_ptr", "stride_table", "window", "num_splits"
    ]
)  # fmt: skip
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    out_ptr,
    partial_ptr,
    lse_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_block,
    stride_slot,
    stride_head,
    stride_table,
    qk_scale,
    window,
    num_splits,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    ROPE_KV: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * per_split
    split_hi = tl.minimum(seq_len, split_lo + per_split)

    group = tl.arange(0, ROWS)
    heads = kv_head * GROUP + group
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (group < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=io_mask, other=0.0)
    newest = seq_len - 1
    q_pos = tl.full([ROWS], 0, dtype=tl.int32) + newest
    cached_hi = split_hi
    if ROPE_KV:
        # rotate_half: position d pairs with d +- HEAD_DIM / 2 and frequency d mod HEAD_DIM / 2
        d_mask = offs_d < HEAD_DIM
        first = offs_d < HEAD_DIM // 2
        pair = tl.where(first, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        freq = tl.where(first, offs_d, offs_d - HEAD_DIM // 2)
        angle = seq.to(tl.int64) * stride_cos + freq
        cos = tl.load(cos_ptr + angle, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + angle, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.where(first, -sin, sin)
        q_pair = tl.load(q_rows + pair[None, :], mask=io_mask, other=0.0)
        q = q.to(tl.float32) * cos[None, :] + q_pair.to(tl.float32) * sin[None, :]
        q = q.to(q_ptr.dtype.element_ty)  # rounded as a separate RoPE kernel stores it
        k_row = k_ptr + seq.to(tl.int64) * stride_kt + kv_head * stride_kh
        k_new = tl.load(k_row + offs_d, mask=d_mask, other=0.0).to(tl.float32) * cos
        k_new += tl.load(k_row + pair, mask=d_mask, other=0.0).to(tl.float32) * sin
        k_new = k_new.to(k_ptr.dtype.element_ty).to(cache_ptr.dtype.element_ty)
        v_row = v_ptr + seq.to(tl.int64) * stride_vt + kv_head * stride_vh + offs_d
        v_new = tl.load(v_row, mask=d_mask, other=0.0).to(cache_ptr.dtype.element_ty)
        # the program whose split holds the newest position owns the new token (none in a
        # padding row); the others read the cache below it
        owner = (split_lo <= newest) & (newest < split_hi)
        slot = tl.load(slots_ptr + seq)
        dst = cache_ptr + slot.to(tl.int64) * stride_slot + kv_head * stride_head + offs_d
        write = d_mask & owner & (slot >= 0)
        tl.store(dst, k_new, mask=write)
        tl.store(dst + stride_kv, v_new, mask=write)
        cached_hi = tl.minimum(split_hi, newest)

    acc, row_max, row_sum = attend_range(
        q, q_pos, split_lo, cached_hi, window,
        cache_ptr, block_tables_ptr + seq.to(tl.int64) * stride_table, kv_head * stride_head,
        stride_kv, stride_block, stride_slot, qk_scale,
        ROWS, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, PRECISION, UPCAST_DOT,
    )  # fmt: skip
    if ROPE_KV:
        # the new token's key and value, as attend_range would read them from the cache:
        # rounded to the compute dtype, p rounded before P @ V
        compute = q_ptr.dtype.element_ty
        k_dot = k_new.to(compute).to(tl.float32)
        score = tl.sum(q.to(tl.float32) * k_dot[None, :], 1) * qk_scale
        score = tl.where(owner, score, float("-inf"))
        new_max = tl.maximum(row_max, score)
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(score - new_max)
        row_sum = row_sum * alpha + p
        p_dot = p.to(compute).to(tl.float32)
        acc = acc * alpha[:, None] + p_dot[:, None] * v_new.to(compute).to(tl.float32)[None, :]
        row_max = new_max
    # An empty split (row_sum == 0) stores zeros and a log-sum-exp of -inf: it weighs nothing.
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    if SPLIT:
        row = (seq * NUM_HEADS + heads).to(tl.int64) * num_splits + split
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        lse = tl.where(row_sum > 0, row_max + tl.log2(safe_sum), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=group < GROUP)
    else:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
        tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """out = sum_s 2^lse_s * partial_s / sum_s 2^lse_s, one program per (sequence, query head)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    row = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + splits
    lse = tl.load(lse_ptr + row, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    parts_mask = split_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    parts = tl.load(partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=parts_mask)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def split_count(batch: int, num_kv_heads: int, context_len: int, target_programs: int) -> int:
    """How many splits to cut each context into: enough programs to fill `target_programs`
    (a few per GPU core), no split shorter than MIN_SPLIT_TOKENS, at most MAX_SPLITS."""
    wanted = triton.cdiv(target_programs, batch * num_kv_heads)
    worthwhile = triton.cdiv(context_len, MIN_SPLIT_TOKENS)
    return max(1, min(wanted, worthwhile, MAX_SPLITS))


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    num_splits: int,
) -> torch.Tensor:
    """q [B, Hq, D], one token per sequence (row b is sequence b's newest token, already written
    to the cache) -> attention output [B, Hq, D] over that sequence's `seq_lens[b]` cached keys.
    A padding row (seq_lens[b] == 0, as a fixed-size batch has) gives zeros."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    return _launch(q, None, kv_cache, block_tables, seq_lens, sliding_window, num_splits)


def rope_paged_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    num_splits: int,
) -> torch.Tensor:
    """`paged_decode` of the new tokens' un-rotated q [B, Hq, D], k/v [B, Hkv, D] (any token and
    head strides, head_dim contiguous), rotated by cos/sin [B, 1, D / 2] (halves layout) in the
    same launch, which also stores the rotated k and v into the flat cache `slots` [B] (a padding
    row, seq_lens[b] == 0, stores nothing)."""
    _, _, block_size, _, _ = kv_cache.shape
    _, stride_block, stride_slot, _ = cache_strides(kv_cache)
    if stride_block != block_size * stride_slot:
        raise ValueError("the KV cache's blocks must be contiguous to address it by flat slot")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("rope_paged_decode needs q, k and v with a contiguous head_dim")
    half = q.shape[-1] // 2
    cos2, sin2 = cos.reshape(-1, half), sin.reshape(-1, half)
    if cos2.stride(-1) != 1 or sin2.stride(0) != cos2.stride(0) or sin2.stride(-1) != 1:
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    rope = (k, v, cos2, sin2, slots)
    return _launch(q, rope, kv_cache, block_tables, seq_lens, sliding_window, num_splits)


def _launch(
    q: torch.Tensor,
    rope: tuple[torch.Tensor, ...] | None,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    num_splits: int,
) -> torch.Tensor:
    """The decode kernel (with RoPE and the KV write when `rope` holds k, v, cos, sin, slots),
    then the merge of its splits."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = num_heads // num_kv_heads
    split = num_splits > 1
    partial = lse = out  # unused without splits
    if split:
        partial = q.new_empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32)
        lse = q.new_empty((batch, num_heads, num_splits), dtype=torch.float32)
    k, v, cos, sin, slots = rope if rope is not None else (q, q, q, q, seq_lens)  # unused
    block_d = padded(head_dim)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k, v, cos, sin, slots, out, partial, lse, kv_cache, block_tables, seq_lens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), out.stride(0), out.stride(1),
        *cache_strides(kv_cache), block_tables.stride(0),
        qk_scale(head_dim), window_arg(sliding_window), num_splits,
        NUM_HEADS=num_heads, GROUP=group, ROWS=padded(group), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, PRECISION=dot_precision(q.dtype),
        UPCAST_DOT=upcast_dot(q.dtype), SPLIT=split, ROPE_KV=rope is not None,
    )  # fmt: skip
    if split:
        _merge_splits_kernel[(batch, num_heads)](
            partial, lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, SPLITS=MAX_SPLITS, BLOCK_D=block_d,
            HEAD_DIM=head_dim,
        )  # fmt: skip
    return out
