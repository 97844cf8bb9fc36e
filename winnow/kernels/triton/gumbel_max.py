"""The sampler's full-vocabulary Gumbel-max in one Triton pass per row (CUDA's free route).

Per row r of z [b, V]: the row key of (seed, position) in the Gumbel stream, then for every token
the counter hash, the noise, y = min(z / T, FLOAT32_MAX) and a running argmax (ties -> lowest
id); y is written back when asked. The arithmetic is winnow.sampling.noise's bit for bit:
32-bit hash words, u and both logs in float64, the score y - float32(ln(-ln u)) and an
IEEE-rounded division by T, so the picks equal the torch expression's
(tests/sampling/test_triton_gumbel.py, under the interpreter).

NaN logits count as -inf and +inf as FLOAT32_MAX, so the kernel also runs on a model's raw
logits. Row keys and token mixes are computed in the kernel (no per-step torch op); the hash
constants repeat noise.py's because a kernel reads only constexpr globals.

Two variants serve the sampler's fused step (`RowEdits`), each a constexpr so the plain pass
pays nothing for them:

* ADJUST: greedy rows (info[GREEDY_ROW]: the argmax of z, no noise), and stages 1-2 of the
  row before the pass, sparsely, in the sampler's order -- the
  repetition penalty over the prompt and output ids, frequency/presence over the distinct output
  ids, logit_bias, the min_tokens ban -- each touched token's value staged in a work row and
  marked in a per-row bitmask (atomic or: its old bits say whether an earlier stage wrote the
  token, whose staged value it then reads), a barrier between stages; the pass reads the model's
  logit or the staged value, and -inf where the grammar bitmask's bit is clear. After the pick,
  the row's penalty history records the token (its first occurrence's count, or a new entry),
  and the marks are cleared for the next call.
* LOGPROBS: the same pass keeps an online logsumexp of the values a row's logprobs are defined
  on (y for "processed", the loaded logits for "raw") and the picked token's value, and writes
  its logprob (floored like the sampler's) -- no second pass over the vocabulary.

Products and differences are not fused into FMAs (`enable_fp_fusion=False`), so the penalties
round as the torch operations do.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from winnow.kernels import sampler_edits as edits
from winnow.kernels.sampler_edits import INFO_FIELDS, RowEdits
from winnow.limits import LOGPROB_FLOOR as _LOGPROB_FLOOR

FMIX_1 = tl.constexpr(0x85EBCA6B)
FMIX_2 = tl.constexpr(0xC2B2AE35)
GUMBEL_STREAM = tl.constexpr(0x243F6A88)
TOKEN_SALT = tl.constexpr(0x13198A2E)
MASK32 = tl.constexpr(0xFFFFFFFF)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
LOGPROB_FLOOR = tl.constexpr(_LOGPROB_FLOOR)
BLOCK_V = 2048
SPARSE_BLOCK = 256  # ids per step of the sparse stages

# RowEdits.info's rows, as the kernel reads them
REP_PROMPT = tl.constexpr(edits.REP_PROMPT)
REP_OUTPUT = tl.constexpr(edits.REP_OUTPUT)
HISTORY = tl.constexpr(edits.HISTORY)
BIAS = tl.constexpr(edits.BIAS)
BAN = tl.constexpr(edits.BAN)
MASK_ROW = tl.constexpr(edits.MASK_ROW)
LOGPROB_MODE = tl.constexpr(edits.LOGPROB_MODE)
GREEDY_ROW = tl.constexpr(edits.GREEDY_ROW)
RAW_MODE = tl.constexpr(edits.RAW_MODE)


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * FMIX_1
    x = x ^ (x >> 13)
    x = x * FMIX_2
    return x ^ (x >> 16)


@triton.jit
def _loaded(ptrs, mask):
    """Logits as the sampler loads them: float32, NaN -> -inf, +inf -> FLOAT32_MAX."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.where(z != z, float("-inf"), tl.minimum(z, FLOAT32_MAX))


@triton.jit
def _touch(touched_row, ids, valid):
    """Mark `ids` as staged; True where an earlier stage had already staged the id."""
    bit = (tl.full(ids.shape, 1, tl.int32) << (ids & 31).to(tl.int32)).to(tl.int32)
    old = tl.atomic_or(touched_row + (ids >> 5), bit, mask=valid)
    return valid & ((old & bit) != 0)


@triton.jit
def _current(z_row, work_row, touched_row, ids, valid):
    """The value stages so far gave the ids (staged, or the loaded logit); marks them staged."""
    before = _touch(touched_row, ids, valid)
    staged = tl.load(work_row + ids, mask=before, other=0.0, cache_modifier=".cg")
    return tl.where(before, staged, _loaded(z_row + ids, valid & ~before))


@triton.jit
def _repeat(z_row, work_row, touched_row, ids_row, count, repetition, BLOCK: tl.constexpr):
    """The repetition penalty on the first `count` ids of a -1-padded id row."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, count, BLOCK):
        j = start + offs
        ids = tl.load(ids_row + j, mask=j < count, other=-1)
        valid = ids >= 0
        ids = tl.where(valid, ids, 0)
        z = _loaded(z_row + ids, valid)
        value = tl.where(z > 0, tl.math.div_rn(z, repetition), z * repetition)
        tl.store(work_row + ids, value, mask=valid)
        _touch(touched_row, ids, valid)


@triton.jit
def _edit_row(
    z_row, work_row, touched_row, info, stride_info, slot,
    prompt_ptr, stride_prompt, output_ptr, stride_output, counts_ptr, stride_counts,
    bias_ids_ptr, stride_bias_ids, bias_values_ptr, stride_bias_values, ban_ptr, stride_ban,
    penalties_ptr, stride_penalties, BLOCK: tl.constexpr,
):  # fmt: skip
    """Stages 1-2 of one row, sparsely, into its work row (see the module doc)."""
    offs = tl.arange(0, BLOCK)
    penalties = penalties_ptr + slot * stride_penalties
    repetition = tl.load(penalties)
    frequency = tl.load(penalties + 1)
    presence = tl.load(penalties + 2)
    # repetition, on the loaded logits: ids seen twice write the same value
    _repeat(z_row, work_row, touched_row, prompt_ptr + slot * stride_prompt,
            tl.load(info + REP_PROMPT * stride_info), repetition, BLOCK)  # fmt: skip
    _repeat(z_row, work_row, touched_row, output_ptr + slot * stride_output,
            tl.load(info + REP_OUTPUT * stride_info), repetition, BLOCK)  # fmt: skip
    tl.debug_barrier()
    # frequency and presence, once per distinct output id (its count is at its first occurrence)
    history = tl.load(info + HISTORY * stride_info)
    for start in range(0, history, BLOCK):
        j = start + offs
        inside = j < history
        ids = tl.load(output_ptr + slot * stride_output + j, mask=inside, other=-1)
        seen = tl.load(counts_ptr + slot * stride_counts + j, mask=inside, other=0)
        valid = inside & (ids >= 0) & (seen > 0)
        ids = tl.where(valid, ids, 0)
        z = _current(z_row, work_row, touched_row, ids, valid)
        value = z - seen.to(tl.float32) * frequency - presence
        tl.store(work_row + ids, value, mask=valid)
    tl.debug_barrier()
    bias = tl.load(info + BIAS * stride_info)
    for start in range(0, bias, BLOCK):
        j = start + offs
        inside = j < bias
        ids = tl.load(bias_ids_ptr + slot * stride_bias_ids + j, mask=inside, other=-1)
        delta = tl.load(bias_values_ptr + slot * stride_bias_values + j, mask=inside, other=0.0)
        valid = ids >= 0
        ids = tl.where(valid, ids, 0)
        z = _current(z_row, work_row, touched_row, ids, valid)
        tl.store(work_row + ids, z + delta, mask=valid)
    tl.debug_barrier()
    ban = tl.load(info + BAN * stride_info)
    for start in range(0, ban, BLOCK):
        j = start + offs
        ids = tl.load(ban_ptr + slot * stride_ban + j, mask=j < ban, other=-1)
        valid = ids >= 0
        ids = tl.where(valid, ids, 0)
        tl.store(work_row + ids, tl.full(ids.shape, float("-inf"), tl.float32), mask=valid)
        _touch(touched_row, ids, valid)
    tl.debug_barrier()


@triton.jit
def _record(token, info, stride_info, slot, output_ptr, stride_output, counts_ptr, stride_counts,
            BLOCK: tl.constexpr):  # fmt: skip
    """Append the picked token to a penalised row's history, as PenaltyHistory.record does."""
    history = tl.load(info + HISTORY * stride_info)
    output_row = output_ptr + slot * stride_output
    counts_row = counts_ptr + slot * stride_counts
    offs = tl.arange(0, BLOCK)
    first = history
    for start in range(0, history, BLOCK):
        j = start + offs
        ids = tl.load(output_row + j, mask=j < history, other=-1)
        first = tl.minimum(first, tl.min(tl.where(ids == token, j, history), axis=0))
    penalised = history >= 0
    seen = penalised & (first < history)
    count = tl.load(counts_row + first, mask=seen, other=0)
    tl.store(counts_row + first, count + 1, mask=seen)
    tl.store(output_row + history, token, mask=penalised)
    tl.store(counts_row + history, tl.where(seen, 0, 1).to(tl.int32), mask=penalised)


@triton.jit(
    do_not_specialize=[
        "rows_ptr", "positions_ptr", "seeds_ptr", "stride_seed", "temperature_ptr",
        "stride_temperature", "tokens_ptr", "info_ptr", "stride_info", "prompt_ptr",
        "stride_prompt", "output_ptr", "stride_output", "counts_ptr", "stride_counts",
        "bias_ids_ptr", "stride_bias_ids", "bias_values_ptr", "stride_bias_values", "ban_ptr",
        "stride_ban", "penalties_ptr", "bits_ptr", "lp_ptr",
    ]
)  # fmt: skip
def _gumbel_argmax_kernel(
    z_ptr, stride_z, y_ptr, stride_y, rows_ptr, positions_ptr, seeds_ptr, stride_seed,
    temperature_ptr, stride_temperature, tokens_ptr, vocab,
    info_ptr, stride_info, prompt_ptr, stride_prompt, output_ptr, stride_output,
    counts_ptr, stride_counts, bias_ids_ptr, stride_bias_ids, bias_values_ptr,
    stride_bias_values, ban_ptr, stride_ban, penalties_ptr, bits_ptr, stride_bits,
    touched_ptr, stride_touched, work_ptr, stride_work, lp_ptr,
    GATHER: tl.constexpr, WRITE_Y: tl.constexpr, ADJUST: tl.constexpr,
    LOGPROBS: tl.constexpr, BLOCK: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    """One program per row. GATHER: seeds and temperatures are per-slot tables read at
    rows_ptr[row]; otherwise they are per row. ADJUST / LOGPROBS: see the module doc."""
    row = tl.program_id(0).to(tl.int64)
    slot = row
    if GATHER:
        slot = tl.load(rows_ptr + row)
    seed = tl.load(seeds_ptr + slot * stride_seed)
    temperature = tl.load(temperature_ptr + slot * stride_temperature).to(tl.float32)
    position = tl.load(positions_ptr + row)
    key = _fmix32((seed & MASK32).to(tl.uint32) ^ GUMBEL_STREAM)
    key = _fmix32(key ^ ((seed >> 32) & MASK32).to(tl.uint32))
    key = _fmix32(key ^ (position & MASK32).to(tl.uint32))
    z_row = z_ptr + row * stride_z
    info = info_ptr + row
    touched_row = touched_ptr + row * stride_touched
    work_row = work_ptr + row * stride_work
    words = (vocab + 31) // 32
    if ADJUST:
        _edit_row(
            z_row, work_row, touched_row, info, stride_info, slot,
            prompt_ptr, stride_prompt, output_ptr, stride_output, counts_ptr, stride_counts,
            bias_ids_ptr, stride_bias_ids, bias_values_ptr, stride_bias_values, ban_ptr,
            stride_ban, penalties_ptr, stride_temperature, SPARSE,
        )  # fmt: skip
        mask_row = tl.load(info + MASK_ROW * stride_info)
        bits_row = bits_ptr + tl.maximum(mask_row, 0) * stride_bits
        greedy = tl.load(info + GREEDY_ROW * stride_info) != 0
        temperature = tl.where(greedy, 1.0, temperature)  # its own may be 0
    if LOGPROBS:
        raw_mode = tl.load(info + LOGPROB_MODE * stride_info) == RAW_MODE
        lse_max = tl.full((), float("-inf"), tl.float32)
        lse_sum = tl.full((), 0.0, tl.float32)
        best_value = tl.full((), float("-inf"), tl.float32)
    offs = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = tl.full((), 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + offs
        inside = ids < vocab
        loaded = _loaded(z_row + ids, inside)
        z = loaded
        if ADJUST:
            shift = (ids & 31).to(tl.int32)
            marks = tl.load(touched_row + (ids >> 5), mask=inside, other=0, cache_modifier=".cg")
            staged = inside & (((marks >> shift) & 1) != 0)
            z = tl.where(staged, tl.load(work_row + ids, mask=staged, cache_modifier=".cg"), z)
            allowed = tl.load(bits_row + (ids >> 5), mask=inside & (mask_row >= 0), other=-1)
            z = tl.where(((allowed >> shift) & 1) != 0, z, float("-inf"))
        y = tl.minimum(tl.math.div_rn(z, temperature), FLOAT32_MAX)
        if ADJUST:  # a greedy row's values are z itself (temperature 1 for its logprobs)
            y = tl.where(greedy, z, y)
        if WRITE_Y:
            tl.store(y_ptr + row * stride_y + ids, y, mask=inside)
        bits = _fmix32(key ^ _fmix32(ids.to(tl.uint32) ^ TOKEN_SALT))
        u = (bits.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2**-32
        score = y - tl.log(-tl.log(u)).to(tl.float32)
        if ADJUST:
            score = tl.where(greedy, y, score)
        score = tl.where(inside, score, float("-inf"))
        top = tl.max(score, axis=0)
        top_id = tl.min(tl.where(score == top, ids, vocab), axis=0)
        better = top > best
        if LOGPROBS:
            value = tl.where(raw_mode, loaded, y)
            block_max = tl.maximum(lse_max, tl.max(value, axis=0))
            shift_by = tl.where(block_max == float("-inf"), 0.0, block_max)
            lse_sum = lse_sum * tl.exp(lse_max - shift_by) + tl.sum(tl.exp(value - shift_by), 0)
            lse_max = block_max
            # the pick's value; token 0's while no score beats -inf (the pick is then token 0)
            at = tl.where(better, top_id, 0)
            picked = tl.max(tl.where(ids == at, value, float("-inf")), axis=0)
            best_value = tl.where(better | (start == 0), picked, best_value)
        best_id = tl.where(better, top_id, best_id)
        best = tl.where(better, top, best)
    tl.store(tokens_ptr + row, best_id.to(tl.int64))
    if LOGPROBS:
        logprob = best_value - (lse_max + tl.log(lse_sum))
        floored = (logprob != logprob) | (logprob == float("-inf"))
        logprob = tl.where(floored, LOGPROB_FLOOR, logprob)
        mode = tl.load(info + LOGPROB_MODE * stride_info)
        tl.store(lp_ptr + row, tl.where(mode == 0, float("nan"), logprob).to(tl.float64))
    if ADJUST:
        tl.debug_barrier()
        _record(best_id.to(tl.int64), info, stride_info, slot, output_ptr, stride_output,
                counts_ptr, stride_counts, SPARSE)  # fmt: skip
        for start in range(0, words, BLOCK):  # clear the marks
            w = start + offs
            tl.store(touched_row + w, tl.zeros((BLOCK,), tl.int32), mask=w < words)


def gumbel_argmax(
    z: torch.Tensor,
    positions: torch.Tensor,
    seeds: torch.Tensor,
    temperature: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    y_out: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    edits: RowEdits | None = None,
) -> torch.Tensor:
    """Per row of z [b, V] (unit inner stride): the lowest id with the largest
    min(z / T, FLOAT32_MAX) + gumbel noise of (seed, position, token).

    positions [b] int64. seeds (int64) and temperature (float32) are per row ([b], any stride),
    or, with `slots` [b] int64, per-slot tables read at slots[r] -- so the sampler's own
    parameter tables serve without a gather. y_out (same strides as z; may be z) receives y.
    `edits`: stages 1-2 and logprobs in the same pass, as its flags say (per-slot tables:
    needs `slots`); without it the plain pass runs on placeholders.
    """
    rows, vocab = z.shape
    assert z.stride(1) == 1 and positions.dtype == torch.int64 and seeds.dtype == torch.int64
    if tokens is None:
        tokens = torch.empty(rows, dtype=torch.int64, device=z.device)
    if rows == 0:
        return tokens
    if y_out is not None:
        assert y_out.stride() == z.stride() and y_out.dtype == torch.float32
    assert edits is None or slots is not None, "edits read per-slot tables"
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    e = edits if edits is not None else _unused(z.device)
    lp_out = e.lp_out if e.lp_out is not None else e.work  # read only by LOGPROBS
    _gumbel_argmax_kernel[(rows,)](
        z, z.stride(0), z if y_out is None else y_out, z.stride(0),
        positions if slots is None else slots, positions, seeds, seeds.stride(0),
        temperature, temperature.stride(0), tokens, vocab,
        e.info, e.info.stride(0), e.prompt, e.prompt.stride(0), e.output, e.output.stride(0),
        e.counts, e.counts.stride(0), e.bias_ids, e.bias_ids.stride(0), e.bias_values,
        e.bias_values.stride(0), e.ban_ids, e.ban_ids.stride(0), e.penalties, e.bitmask,
        e.bitmask.stride(0), e.touched, e.touched.stride(0), e.work, e.work.stride(0), lp_out,
        GATHER=slots is not None, WRITE_Y=y_out is not None,
        ADJUST=edits is not None and edits.adjust,
        LOGPROBS=edits is not None and edits.lp_out is not None,
        BLOCK=block, SPARSE=SPARSE_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return tokens


@functools.cache
def _unused(device: torch.device) -> RowEdits:
    """Placeholders for the arguments a variant does not read (one set per device, so the
    plain variants' signatures never change)."""
    ids = torch.full((1, 1), -1, dtype=torch.int64, device=device)
    values = torch.zeros((1, 1), dtype=torch.float32, device=device)
    marks = torch.zeros((1, 1), dtype=torch.int32, device=device)
    info = torch.zeros((INFO_FIELDS, 1), dtype=torch.int64, device=device)
    return RowEdits(info, ids, ids, marks, ids, values, ids, values[0], marks, marks, values,
                    adjust=False)  # fmt: skip
