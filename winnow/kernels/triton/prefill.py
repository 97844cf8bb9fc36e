"""Varlen causal attention for a step's new tokens over each sequence's paged cache: fresh
prompts, prompt chunks continuing after a cached prefix, and single-token decodes alike.

The step's new keys/values are already in the cache, so every key (cached prefix and the chunk
itself) is read in place from the paged cache; nothing is gathered. One program per (tile of
BLOCK_Q new tokens of one sequence, kv head); its tile's rows are BLOCK_Q tokens x the query heads
of that kv head's group, so a key tile is loaded once for the whole group.

The tiles of all sequences are numbered in one flat grid axis: sequence i's tiles start at
query_starts[i] // BLOCK_Q + i, which bounds the grid by T // BLOCK_Q + B and never by
B x (longest chunk), however many decodes share the step with one long prompt chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from winnow.kernels.triton.launch import (
    MIN_DOT,
    cache_strides,
    dot_precision,
    padded,
    qk_scale,
    upcast_dot,
    window_arg,
)
from winnow.kernels.triton.tile import attend_range

BLOCK_N = 64  # keys per inner-loop tile
MAX_TILE_ROWS = 64  # query rows (tokens x grouped heads) per program; a power of two >= 16
# Query rows x padded head_dim x element size squared that fit four warps' registers beside the
# key/value tiles, as built for sm_90 (tests/kernels/triton_cuda_compile.py): 64 rows of bf16 at
# head_dim 128; 32 at 256; fp32, whose IEEE dots run on the FMA units, 16 rows at 128 (64 fp32
# rows spilled 10 KB per thread to local memory, 64 bf16 rows at head_dim 256 56 bytes).
TILE_BUDGET = 64 * 128 * 2**2


@triton.jit
def _sequence_of_tile(query_starts_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """Binary search for the last sequence whose first tile is at or before `tile`."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs  # the answer lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_starts_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        lo = tl.where(first_tile <= tile, mid, lo)
        hi = tl.where(first_tile <= tile, hi, mid)
    return lo


# Arguments that change from step to step: Triton must not compile a variant per value.
@triton.jit(
    do_not_specialize=[
        "block_tables_ptr", "query_starts_ptr", "seq_lens_ptr", "num_seqs", "stride_table",
        "window",
    ]
)  # fmt: skip
def _prefill_kernel(
    q_ptr,
    out_ptr,
    cache_ptr,
    block_tables_ptr,
    query_starts_ptr,
    seq_lens_ptr,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_block,
    stride_slot,
    stride_head,
    stride_table,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    flat_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _sequence_of_tile(query_starts_ptr, num_seqs, flat_tile, BLOCK_Q)
    q_start = tl.load(query_starts_ptr + seq).to(tl.int32)
    q_len = tl.load(query_starts_ptr + seq + 1).to(tl.int32) - q_start
    tile = flat_tile - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:  # the grid's spare tiles
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    cached = seq_len - q_len

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = tile * BLOCK_Q + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (token < q_len) & (rows % GROUP_PAD < GROUP)
    io_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    flat_token = (q_start + token).to(tl.int64)
    q_ptrs = q_ptr + flat_token[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    q_pos = cached + token

    first = cached + tile * BLOCK_Q
    last = cached + tl.minimum(q_len, (tile + 1) * BLOCK_Q) - 1
    acc, row_max, row_sum = attend_range(
        q, q_pos, tl.maximum(first - window + 1, 0), last + 1, window,
        cache_ptr, block_tables_ptr + seq.to(tl.int64) * stride_table, kv_head * stride_head,
        stride_kv, stride_block, stride_slot, qk_scale,
        BLOCK_Q * GROUP_PAD, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, PRECISION, UPCAST_DOT,
    )  # fmt: skip
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    o_ptrs = out_ptr + flat_token[:, None] * stride_ot + heads[:, None] * stride_oh
    tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def tile_rows_for(element_size: int, block_d: int) -> int:
    """Query rows per program for this element size and padded head_dim (a power of two)."""
    return max(MIN_DOT, min(MAX_TILE_ROWS, TILE_BUDGET // (element_size**2 * block_d)))


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> torch.Tensor:
    """q [T, Hq, D]: sequence i's new tokens are rows query_starts[i]:query_starts[i + 1], the
    last of its seq_lens[i] tokens, all already written to the cache -> output [T, Hq, D]."""
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    tile_rows = tile_rows_for(q.element_size(), padded(head_dim))
    block_q = max(1, tile_rows // group_pad)  # rows: tile_rows, or one token's padded group
    num_seqs = seq_lens.shape[0]
    grid = (q.shape[0] // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, out, kv_cache, block_tables, query_starts, seq_lens, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache_strides(kv_cache), block_tables.stride(0),
        qk_scale(head_dim), window_arg(sliding_window),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=BLOCK_N,
        BLOCK_D=padded(head_dim), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype),
    )  # fmt: skip
    return out
