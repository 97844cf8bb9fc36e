"""A naive reading of docs/sampling.md, one row at a time in plain Python / NumPy (tests only).

Independent of the batched pipeline on purpose: no tensors, no candidate slices, no sorting
tricks, and its own pure-Python hash. Scaled logits stay float32 (as the spec says); masses are
summed in float64, so comparisons that land within `margin` of a threshold may legitimately
differ from the float32 pipeline -- tests skip those rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from winnow.sampling.noise import GUMBEL_STREAM, TOKEN_SALT, XTC_STREAM
from winnow.sampling.params import SamplingParams

M32 = 0xFFFFFFFF


def fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def hash32(seed: int, position: int, token: int, stream: int) -> int:
    """The documented counter-based hash of (seed, position, token, stream), on Python ints."""
    h = fmix32((seed & M32) ^ stream)
    h = fmix32(h ^ ((seed >> 32) & M32))
    h = fmix32(h ^ (position & M32))
    return fmix32(h ^ fmix32((token & M32) ^ TOKEN_SALT))


def uniform(seed: int, position: int, token: int, stream: int) -> float:
    return (hash32(seed, position, token, stream) + 0.5) / 2**32


def gumbel_row(seed: int, position: int, vocab: int) -> np.ndarray:
    """g_j = -ln(-ln u_j) for every token, float32."""
    u = np.array([uniform(seed, position, j, GUMBEL_STREAM) for j in range(vocab)])
    return (-np.log(-np.log(u))).astype(np.float32)


@dataclass
class Reference:
    token: int
    z: np.ndarray  # float32 after penalties, bias, bans
    y: np.ndarray | None  # float32 z / T (None when greedy)
    keep: np.ndarray | None  # final survivors (None when greedy)
    margin: float  # distance of the closest float-sensitive comparison to its threshold


def reference_sample(
    logits: Sequence[float],
    params: SamplingParams,
    seed: int,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    eos_ids: Sequence[int],
) -> Reference:
    z = np.array(logits, dtype=np.float32)
    position = len(prompt_ids) + len(output_ids)

    # 1 penalties
    r = np.float32(params.repetition_penalty)
    for j in set(prompt_ids) | set(output_ids):
        z[j] = z[j] / r if z[j] > 0 else z[j] * r
    freq, pres = np.float32(params.frequency_penalty), np.float32(params.presence_penalty)
    for j, c in Counter(output_ids).items():
        z[j] = z[j] - np.float32(c) * freq - np.float32(c > 0) * pres
    # 2 request constraints
    for j, bias in params.logit_bias.items():
        z[j] = z[j] + np.float32(bias)
    if len(output_ids) < params.min_tokens:
        for j in set(eos_ids) | set(params.stop_token_ids):
            z[j] = -np.inf
    # 3 greedy
    if params.temperature < 1e-5:
        return Reference(int(np.argmax(z)), z, None, None, math.inf)
    with np.errstate(invalid="ignore", divide="ignore"):  # rows that are entirely -inf
        return _sample(z, params, seed, position)


def _sample(z: np.ndarray, params: SamplingParams, seed: int, position: int) -> Reference:
    vocab = len(z)
    # 4 temperature
    y = z / np.float32(params.temperature)
    yd = y.astype(np.float64)
    top = yd.max()
    margin = math.inf
    # 5 truncation
    keep = np.ones(vocab, dtype=bool)
    if 0 < params.top_k < vocab:
        kth = np.sort(yd)[::-1][params.top_k - 1]
        keep &= yd >= kth
    if params.top_p < 1.0:
        w = np.where(keep, np.exp(yd - top), 0.0)
        q = w / w.sum()
        above = np.array([q[yd > yd[j]].sum() for j in range(vocab)])
        near = above[keep & (above > 0)]  # above == 0 (the top group) is exact in any precision
        margin = min(margin, float(np.abs(near - params.top_p).min()) if near.size else math.inf)
        keep &= above < params.top_p
    if params.min_p > 0:
        threshold = top + math.log(params.min_p)
        finite = yd[np.isfinite(yd) & (yd < top)]  # the top group is kept whatever the rounding
        margin = min(margin, float(np.abs(finite - threshold).min()) if finite.size else math.inf)
        keep &= yd >= threshold
    keep |= yd == top  # always keep at least one token: the most likely (all tied with it)
    coin = uniform(seed, position, 0, XTC_STREAM)
    if coin < np.float32(params.xtc_probability) and params.xtc_threshold <= 0.5:
        w = np.where(keep, np.exp(yd - top), 0.0)
        q = w / w.sum()
        if params.xtc_threshold > 0:  # q >= 0 holds in any precision
            margin = min(margin, float(np.abs(q[keep] - params.xtc_threshold).min()))
        chosen = [j for j in range(vocab) if keep[j] and q[j] >= params.xtc_threshold]
        if len(chosen) >= 2:
            keeper = min(chosen, key=lambda j: (yd[j], -j))
            for j in chosen:
                keep[j] = j == keeper
    # 6 sample
    score = np.where(keep, y + gumbel_row(seed, position, vocab), -np.inf).astype(np.float32)
    token = int(np.flatnonzero(keep & (score == score.max()))[0])
    return Reference(token, z, y, keep, margin)
