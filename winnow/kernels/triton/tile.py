"""The inner loop both attention kernels share: a tile of query rows against a range of keys read
in place from the paged cache, with an online (running max / running sum) softmax.

Scores live in the log2 domain (`qk_scale` already holds log2(e) / sqrt(head_dim)) so the
exponentials are `exp2`. The running max starts at a large finite negative value rather than
-inf, so a row that sees only masked keys in a tile keeps alpha = 1 and p = 0 instead of NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Below any real score, above -inf: exp2(-inf - NO_SCORE) == 0 and exp2(NO_SCORE - NO_SCORE) == 1.
NO_SCORE = tl.constexpr(-1.0e30)


@triton.jit
def attend_range(
    q,  # [ROWS, BLOCK_D] queries in the compute dtype
    q_pos,  # [ROWS] absolute position of each row's query token
    kv_lo,  # first key position to visit
    kv_hi,  # one past the last key position to visit (and the sequence's valid length bound)
    window,  # a query at p sees keys in (p - window, p]
    cache_ptr,  # this layer's cache, keys at offset 0, values at offset stride_kv
    table_ptr,  # this sequence's row of the block table
    head_offset,  # element offset of the kv head within a slot
    stride_kv,
    stride_block,
    stride_slot,
    qk_scale,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """-> (unnormalised output [ROWS, BLOCK_D] fp32, running max [ROWS], running sum [ROWS]).

    Keys/values are rounded to the queries' dtype and the probabilities to it before P @ V, as
    an fp16/bf16 tensor-core dot does. UPCAST_DOT then widens the (already rounded) operands to
    fp32 for the dot itself: Triton's interpreter multiplies bf16 as raw 16-bit integers, and
    since products of bf16 values are exact in fp32, the widened dot gives what the GPU does.
    """
    compute = q.dtype
    if UPCAST_DOT:
        q = q.to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([ROWS], NO_SCORE, dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < kv_hi
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        slot = block * stride_block + (pos % BLOCK_SIZE) * stride_slot + head_offset
        ptrs = cache_ptr + slot[:, None] + offs_d[None, :]
        tile_mask = in_range[:, None] & d_mask[None, :]
        k = tl.load(ptrs, mask=tile_mask, other=0.0).to(compute).to(q.dtype)
        v = tl.load(ptrs + stride_kv, mask=tile_mask, other=0.0).to(compute).to(q.dtype)

        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        behind = q_pos[:, None] - pos[None, :]
        allowed = in_range[None, :] & (behind >= 0) & (behind < window)
        scores = tl.where(allowed, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        pv = tl.dot(p.to(compute).to(q.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        row_max = new_max
    return acc, row_max, row_sum
