"""Counter-based noise: every random number is a pure function of (seed, position, token, stream).

    u = (hash32(seed, position, token_id, stream) + 0.5) / 2**32        g = -ln(-ln u)

No global RNG is touched, so a seeded row draws the same numbers whatever else shares the batch,
at any batch size or order. The hash is computed with plain int64 tensor ops that stay below
2**63 (32-bit values times constants in [-2**31, 2**31)), so CPU and CUDA agree bit for bit.

hash32 = fmix32(row_key(seed, position, stream) ^ token_mix(token_id)), where

    row_key    = fmix32(fmix32(fmix32((seed & M) ^ stream) ^ (seed >> 32 & M)) ^ (position & M))
    token_mix  = fmix32((token_id & M) ^ TOKEN_SALT)

and fmix32 is the MurmurHash3 32-bit finaliser (a bijection with full avalanche). Gumbel noise
uses GUMBEL_STREAM; the XTC coin of a step is u of token 0 in XTC_STREAM.
"""

from __future__ import annotations

import secrets
from typing import TypeVar

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
GUMBEL_STREAM = 0x243F6A88
XTC_STREAM = 0x85A308D3
TOKEN_SALT = 0x13198A2E
_FMIX_1 = 0x85EBCA6B
_FMIX_2 = 0xC2B2AE35
_MASK64 = (1 << 64) - 1
_CHILD_SALT = 0x9E3779B97F4A7C15


def _signed32(c: int) -> int:
    """The int32 that is congruent to `c` mod 2**32, so x * c never leaves int64 for x < 2**32."""
    return c - (1 << 32) if c >= 1 << 31 else c


_FMIX_1_S = _signed32(_FMIX_1)
_FMIX_2_S = _signed32(_FMIX_2)

# int64 tensors or, for a few host values (cheaper per op), int64 numpy arrays
Ints = TypeVar("Ints", torch.Tensor, np.ndarray)


def fmix32(x: Ints) -> Ints:
    """MurmurHash3 finaliser on int64 tensors (or arrays) holding values in [0, 2**32); returns
    a new one."""
    x = x ^ (x >> 16)
    x = (x * _FMIX_1_S) & MASK32
    x = x ^ (x >> 13)
    x = (x * _FMIX_2_S) & MASK32
    return x ^ (x >> 16)


def fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In-place fmix32 (x and tmp same shape, int64); for full-vocabulary blocks."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(_FMIX_1_S).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 13, out=tmp))
    x.mul_(_FMIX_2_S).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def row_keys(seeds: Ints, positions: Ints, stream: int) -> Ints:
    """Per-row 32-bit keys (int64) for int64 `seeds` and `positions` in one noise stream (both
    tensors or both numpy arrays: the same values)."""
    h = fmix32((seeds & MASK32) ^ stream)
    h = fmix32(h ^ ((seeds >> 32) & MASK32))
    return fmix32(h ^ (positions & MASK32))


def token_mix(token_ids: torch.Tensor) -> torch.Tensor:
    """Per-token 32-bit mix (int64); the sampler keeps this for the whole vocabulary."""
    return fmix32((token_ids & MASK32) ^ TOKEN_SALT)


def hash_bits(keys: torch.Tensor, mixed_tokens: torch.Tensor) -> torch.Tensor:
    """hash32 for broadcastable row keys and mixed token ids."""
    return fmix32(keys ^ mixed_tokens)


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """u = (bits + 0.5) / 2**32 in float64 (exact, never 0 or 1)."""
    return (bits.to(torch.float64) + 0.5) * 2.0**-32


def gumbel(bits: torch.Tensor) -> torch.Tensor:
    """g = -ln(-ln u) as float32, computed in float64 so u near 1 keeps its precision."""
    return uniform(bits).log_().neg_().log_().neg_().to(torch.float32)


def perturb_(
    y: torch.Tensor, bits: torch.Tensor, wide: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out = y + gumbel(bits), through preallocated float64 `wide` and float32 `out`.

    Bit-identical to y + gumbel(bits): y - ln(-ln u) with both logs in float64.
    """
    scale = torch.full((), 2.0**-32, dtype=torch.float64, device=bits.device)  # stays float64
    torch.mul(bits, scale, out=wide).add_(2.0**-33).log_().neg_().log_()
    return torch.sub(y, out.copy_(wide), out=out)


def child_seed(seed: int, index: int) -> int:
    """Seed of choice `index` of a request with `seed`: a 64-bit hash of (seed, index), signed."""
    x = _splitmix64((seed & _MASK64) ^ _CHILD_SALT)
    x = _splitmix64((x + index * _CHILD_SALT + 1) & _MASK64)
    return x - (1 << 64) if x >= 1 << 63 else x


def random_seed() -> int:
    """A fresh random 63-bit seed (non-negative int64) for requests that bring none."""
    return secrets.randbits(63)


def _splitmix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class NoiseScratch:
    """Reusable buffers for full-vocabulary noise, `rows` x `vocab` at a time.

    Large fresh allocations are slow on CPU (page faults on every step), so blocks of at most
    `max_elements` are computed in preallocated int64 / float64 / float32 buffers.
    """

    def __init__(self, vocab: int, device: torch.device, max_elements: int = 1 << 22) -> None:
        self.vocab = vocab
        self.device = device
        self.block_rows = max(1, max_elements // vocab)
        self._buffers: tuple[torch.Tensor, ...] = ()

    def buffers(self, rows: int) -> tuple[torch.Tensor, ...]:
        rows = min(rows, self.block_rows)
        if not self._buffers or self._buffers[0].shape[0] < rows:
            shape = (rows, self.vocab)
            self._buffers = tuple(
                torch.empty(shape, dtype=dtype, device=self.device)
                for dtype in (torch.int64, torch.int64, torch.float64, torch.float32)
            )
        return self._buffers


def gumbel_argmax(
    y: torch.Tensor,
    keys: torch.Tensor,
    mixed_tokens: torch.Tensor,
    keep: torch.Tensor | None,
    scratch: NoiseScratch,
) -> torch.Tensor:
    """argmax_j (y_j + g_j) per row over the kept tokens, ties -> lowest id.

    y [b, V] float32, keys [b] row keys of the Gumbel stream, mixed_tokens [V] = token_mix(ids).
    A kept -inf token still beats every removed one, so a row never returns a removed token.
    """
    rows = y.shape[0]
    tokens = torch.empty(rows, dtype=torch.int64, device=y.device)
    bits, tmp, wide, out = scratch.buffers(rows)
    for start in range(0, rows, scratch.block_rows):
        stop = min(start + scratch.block_rows, rows)
        n = stop - start
        block = torch.bitwise_xor(keys[start:stop, None], mixed_tokens, out=bits[:n])
        score = perturb_(y[start:stop], fmix32_(block, tmp[:n]), wide[:n], out[:n])
        if keep is not None:
            lowest = torch.finfo(score.dtype).min
            score.clamp_(min=lowest).masked_fill_(keep[start:stop].logical_not(), -torch.inf)
        torch.argmax(score, dim=1, out=tokens[start:stop])
    return tokens
