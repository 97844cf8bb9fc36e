"""Compile every kernel variant before serving: Triton compiles a kernel on its first launch
with each new specialisation (seconds each on a GPU), which would stall every stream mid-serving.

A variant is fixed by the constexprs and by what Triton specialises of the other arguments: the
dtypes, and the 16-divisibility of each pointer and integer it is not told to leave alone
(`do_not_specialize` in the kernels: every argument that changes from step to step). What is
left depends only on the tensors' layout, which `layout_key` captures; `warm_up` launches each
kernel once in every variant that layout can take (decode with and without context splits).
A forward that hands over un-rotated q and k (with cos/sin) has its own variants: the decode
kernel with RoPE and the KV write folded in, and the prefill's RoPE + KV-write kernel.
The sampler's Gumbel-max depends only on the vocabulary and the logits' dtype:
`warm_up_sampler` launches each of its variants.
"""

from __future__ import annotations

import itertools

import torch

from winnow.kernels import sampler_edits as edits
from winnow.kernels.triton.decode import paged_decode, rope_paged_decode
from winnow.kernels.triton.gumbel_max import gumbel_argmax
from winnow.kernels.triton.kv_write import write_kv
from winnow.kernels.triton.pointwise import rope_qk
from winnow.kernels.triton.prefill import paged_prefill

# Triton's widest pointer specialisation: 16-byte alignment.
ALIGNMENT = 16


def layout_key(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, *rope: torch.Tensor
) -> tuple[object, ...]:
    """What fixes the kernels' specialisations of a forward over these tensors (and cos/sin, if
    given): dtypes, the shapes the kernels take as constexprs, and what Triton keys on of each
    stride (equal to 1, divisible by 16) and pointer (16-byte aligned)."""
    tensors = (q, k, v, kv_cache, *rope)
    return (
        q.device,
        tuple(t.dtype for t in tensors),
        q.shape[1:],
        kv_cache.shape[2:],
        tuple(_specialised(stride) for t in tensors for stride in t.stride()),
        tuple(t.data_ptr() % ALIGNMENT == 0 for t in tensors),
    )


def _specialised(value: int) -> object:
    return "one" if value == 1 else value % ALIGNMENT == 0


def warm_up(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch every kernel variant for tensors laid out as q [T, Hq, D], k/v [T, Hkv, D] and the
    cache (q and k un-rotated when `rope` holds cos/sin [T, 1, D / 2]), on one row of each: its
    key/value write is skipped (slot -1) and its attention reads slot 0 of block 0 (never handed
    out), so neither the cache nor any output changes."""
    if q.shape[0] == 0:
        return
    device = q.device
    no_slot = torch.full((1,), -1, dtype=torch.int64, device=device)
    table = torch.zeros((1, 1), dtype=torch.int64, device=device)
    seq_lens = torch.ones(1, dtype=torch.int64, device=device)
    query_starts = torch.tensor([0, 1], dtype=torch.int64, device=device)
    if rope is None:
        write_kv(kv_cache, k[:1], v[:1], no_slot)
        for splits in (1, 2):  # the direct decode, and the split one with its merge
            paged_decode(q[:1], kv_cache, table, seq_lens, None, splits)
        paged_prefill(q[:1], kv_cache, table, query_starts, seq_lens, None)
        return
    cos, sin = rope[0][:1], rope[1][:1]
    for splits in (1, 2):
        rope_paged_decode(
            q[:1], k[:1], v[:1], cos, sin, kv_cache, no_slot, table, seq_lens, None, splits
        )
    rotated, _ = rope_qk(q[:1], k[:1], cos, sin, v[:1], kv_cache, no_slot)
    paged_prefill(rotated, kv_cache, table, query_starts, seq_lens, None)


def warm_up_sampler(vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Launch every Gumbel-max variant the sampler uses for `vocab` and `dtype` logits, on one
    row of zeros with nothing to edit: the fused step (plain, with stages 1-2, logprobs, both)
    and, for float32, the pipeline's free route on a block of its work buffer (y written or
    not, at either alignment a block's start can have)."""
    words = -(-vocab // 32)
    z = torch.zeros((2, vocab), dtype=dtype, device=device)
    index = torch.zeros(1, dtype=torch.int64, device=device)  # slot 0, position 0
    seeds = torch.zeros((1, 2), dtype=torch.int64, device=device)
    floats = torch.ones((1, 8), dtype=torch.float32, device=device)
    info = torch.zeros((edits.INFO_FIELDS, 1), dtype=torch.int64, device=device)
    info[edits.HISTORY], info[edits.MASK_ROW], info[edits.LOGPROB_MODE] = -1, -1, 1
    ids = torch.full((1, 1), -1, dtype=torch.int64, device=device)
    counts = torch.zeros((1, 1), dtype=torch.int32, device=device)
    marks = torch.zeros((1, words), dtype=torch.int32, device=device)
    work = torch.empty((1, vocab), dtype=torch.float32, device=device)
    lp = torch.empty(1, dtype=torch.float64, device=device)
    for adjust, logprobs in itertools.product((False, True), repeat=2):
        plan = edits.RowEdits(
            info, ids, ids, counts, ids, floats[:, :1], ids, floats[:, 5], marks, marks, work,
            adjust=adjust, lp_out=lp if logprobs else None,
        )  # fmt: skip
        gumbel_argmax(z[:1], index, seeds[:, 0], floats[:, 0], slots=index, edits=plan)
    if dtype != torch.float32:
        return
    for row in (0, 1):
        block = z[row : row + 1]
        for y_out in (block, None):
            gumbel_argmax(block, index, seeds[:, 0], floats[:, 0], y_out=y_out)
