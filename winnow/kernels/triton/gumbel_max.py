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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FMIX_1 = tl.constexpr(0x85EBCA6B)
FMIX_2 = tl.constexpr(0xC2B2AE35)
GUMBEL_STREAM = tl.constexpr(0x243F6A88)
TOKEN_SALT = tl.constexpr(0x13198A2E)
MASK32 = tl.constexpr(0xFFFFFFFF)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
BLOCK_V = 2048


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * FMIX_1
    x = x ^ (x >> 13)
    x = x * FMIX_2
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    z_ptr,
    stride_z,
    y_ptr,
    stride_y,
    rows_ptr,
    positions_ptr,
    seeds_ptr,
    stride_seed,
    temperature_ptr,
    stride_temperature,
    tokens_ptr,
    vocab,
    GATHER: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row. GATHER: seeds and temperatures are per-slot tables read at
    rows_ptr[row]; otherwise they are per row."""
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
    offs = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = tl.full((), 0, tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + offs
        inside = ids < vocab
        z = tl.load(z_ptr + row * stride_z + ids, mask=inside, other=float("-inf"))
        z = z.to(tl.float32)
        z = tl.where(z != z, float("-inf"), tl.minimum(z, FLOAT32_MAX))
        y = tl.minimum(tl.math.div_rn(z, temperature), FLOAT32_MAX)
        if WRITE_Y:
            tl.store(y_ptr + row * stride_y + ids, y, mask=inside)
        bits = _fmix32(key ^ _fmix32(ids.to(tl.uint32) ^ TOKEN_SALT))
        u = (bits.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2**-32
        score = y - tl.log(-tl.log(u)).to(tl.float32)
        score = tl.where(inside, score, float("-inf"))
        top = tl.max(score, axis=0)
        top_id = tl.min(tl.where(score == top, ids, vocab), axis=0)
        better = top > best
        best_id = tl.where(better, top_id, best_id)
        best = tl.where(better, top, best)
    tl.store(tokens_ptr + row, best_id.to(tl.int64))


def gumbel_argmax(
    z: torch.Tensor,
    positions: torch.Tensor,
    seeds: torch.Tensor,
    temperature: torch.Tensor,
    *,
    slots: torch.Tensor | None = None,
    y_out: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row of z [b, V] (unit inner stride): the lowest id with the largest
    min(z / T, FLOAT32_MAX) + gumbel noise of (seed, position, token).

    positions [b] int64. seeds (int64) and temperature (float32) are per row ([b], any stride),
    or, with `slots` [b] int64, per-slot tables read at slots[r] -- so the sampler's own
    parameter tables serve without a gather. y_out (same strides as z; may be z) receives y.
    """
    rows, vocab = z.shape
    assert z.stride(1) == 1 and positions.dtype == torch.int64 and seeds.dtype == torch.int64
    if tokens is None:
        tokens = torch.empty(rows, dtype=torch.int64, device=z.device)
    if rows == 0:
        return tokens
    if y_out is not None:
        assert y_out.stride() == z.stride() and y_out.dtype == torch.float32
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    _gumbel_argmax_kernel[(rows,)](
        z, z.stride(0), z if y_out is None else y_out, z.stride(0),
        positions if slots is None else slots, positions, seeds, seeds.stride(0),
        temperature, temperature.stride(0), tokens, vocab,
        GATHER=slots is not None, WRITE_Y=y_out is not None, BLOCK=block,
    )  # fmt: skip
    return tokens
