"""The fused C Gumbel-max (winnow/kernels/cpu/gumbel_max.c) against the torch expression of the
same pick: identical tokens and y for many seeds, temperatures and awkward rows, on both ISAs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.sampling.test_sampler_edges import vocabulary_ops
from winnow.kernels.cpu import gumbel_max
from winnow.sampling import noise
from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

pytestmark = pytest.mark.skipif(not gumbel_max.available(), reason="no AVX2 C kernel here")

FLOAT32_MAX = torch.finfo(torch.float32).max


def torch_pick(z: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor):
    vocab = z.shape[1]
    y = (z / temperature[:, None]).clamp_(max=FLOAT32_MAX)
    mixed = noise.token_mix(torch.arange(vocab))
    scratch = noise.NoiseScratch(vocab, torch.device("cpu"))
    return noise.gumbel_argmax(y, keys, mixed, None, scratch), y


def test_noise_values_match_torch_bit_for_bit() -> None:
    """a = float32(log(-log u)) from libm and from torch's float64 logs, over 2**20 random hash
    values plus the extremes of u (the kernel's exact scores and bucket bounds use it)."""
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 2**32, (1 << 20,), generator=generator, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    bits = torch.cat([bits, edges, (torch.arange(4096) << 20) | 0xFFFFF])
    expected = noise.uniform(bits).log_().neg_().log_().to(torch.float32)
    assert torch.equal(gumbel_max.noise_floats(bits), expected)


@pytest.mark.parametrize("vocab", [131072, 32003, 7])
def test_picks_and_y_match_the_torch_reference(isa, vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    rows, picks = 40, 0
    for trial in range(4 if vocab > 1000 else 60):
        z = torch.randn(rows, vocab, generator=generator) * (0.5 + 3 * trial)
        z[::5, : vocab // 2] = -torch.inf  # half the row banned
        z[3, -1] = FLOAT32_MAX  # clamps to float32 max once divided by T < 1
        z[7] = -torch.inf  # nothing allowed: token 0
        temperature = torch.rand(rows, generator=generator) * 1.5 + 0.05
        temperature[:8] = 1.0
        seeds = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
        positions = torch.randint(0, 1 << 20, (rows,), generator=generator)
        keys = noise.row_keys(seeds, positions, noise.GUMBEL_STREAM)
        expected, y = torch_pick(z, temperature, keys)
        y_out = torch.full_like(z, float("nan"))
        mix = gumbel_max.mix_table(noise.token_mix(torch.arange(vocab)))
        assert torch.equal(gumbel_max.gumbel_argmax(z, temperature, keys, mix, y_out), expected)
        assert torch.equal(y_out, y)
        assert torch.equal(gumbel_max.gumbel_argmax(z, temperature, keys, mix), expected)
        picks += rows
    assert int(expected[7]) == 0 and picks >= 160


def key_for_bits(token: int, bits: int) -> int:
    """The row key whose hash for `token` is `bits`: fmix32 undone step by step (each of its
    steps is a bijection on 32 bits), then the token's mix XORed out."""
    x = bits ^ (bits >> 16)
    x = (x * pow(0xC2B2AE35, -1, 1 << 32)) & noise.MASK32
    x = x ^ (x >> 13) ^ (x >> 26)
    x = (x * pow(0x85EBCA6B, -1, 1 << 32)) & noise.MASK32
    x ^= x >> 16
    assert int(noise.fmix32(torch.tensor(x))) == bits
    return x ^ int(noise.token_mix(torch.tensor(token)))


@pytest.mark.parametrize("patched", [False, True], ids=["in_pass", "patched"])
def test_tokens_whose_noise_sits_on_the_pruning_bound_still_win(isa, patched: bool) -> None:
    """The pass drops a token whose score bound (read off the hash bits: leading zeros of ~bits,
    or a float's bits) cannot beat the best so far. Plant, for each w = ~bits where a bound is
    tightest (w = 0 and 1, powers of two and one below, the largest w), a token that beats the
    row's only other token by 1e-4 (far above float32 rounding near |score| <= 23): it must
    win, as in the torch reference; also as a patched token, scored after the pass."""
    vocab, token, margin = 64, 37, 1e-4
    flipped = [0, 1, 2, 3, 2**32 - 1] + [(1 << k) + d for k in range(2, 32) for d in (-1, 0)]
    rows = [(w, t) for w in flipped for t in (1.0, 0.37, 2.5)]
    keys = torch.tensor([key_for_bits(token, noise.MASK32 ^ w) for w, _ in rows])
    temperature = torch.tensor([t for _, t in rows])
    z = torch.full((len(rows), vocab), -torch.inf)
    z[:, 0] = 0.0
    first = noise.hash_bits(keys, noise.token_mix(torch.tensor(0)))
    planted = noise.hash_bits(keys, noise.token_mix(torch.tensor(token)))
    best = -gumbel_max.noise_floats(first).double()
    z[:, token] = ((best + margin + gumbel_max.noise_floats(planted)) * temperature).float()
    expected, _ = torch_pick(z, temperature, keys)
    assert (expected == token).all()
    mix = gumbel_max.mix_table(noise.token_mix(torch.arange(vocab)))
    if not patched:
        assert torch.equal(gumbel_max.gumbel_argmax(z, temperature, keys, mix), expected)
        return
    patch, read = z.clone(), z.clone()
    read[:, token] = 0.0  # the pass must take the token's value from the patch
    patch_ids = torch.full((len(rows), 2), -1)
    patch_ids[:, 0] = token
    picked = gumbel_max.gumbel_argmax(
        read, temperature, keys, mix, patch_ids=patch_ids, patch=patch
    )
    assert torch.equal(picked, expected)


def test_in_place_over_a_strided_block(isa) -> None:
    """The sampler passes a block of its work buffer and writes y over z."""
    generator = torch.Generator().manual_seed(11)
    work = torch.randn(10, 5000, generator=generator)
    z = work[2:8, :4096]
    temperature = torch.full((6,), 0.7)
    keys = noise.row_keys(torch.arange(6), torch.arange(6) * 3, noise.GUMBEL_STREAM)
    expected, y = torch_pick(z.clone(), temperature, keys)
    outside = work[:, 4096:].clone()
    mix = gumbel_max.mix_table(noise.token_mix(torch.arange(4096)))
    assert torch.equal(gumbel_max.gumbel_argmax(z, temperature, keys, mix, z), expected)
    assert torch.equal(z, y) and torch.equal(work[:, 4096:], outside)


def test_draws_follow_the_softmax() -> None:
    """Chi-squared over many seeds on a small row: the kernel samples softmax(z / T)."""
    vocab, draws = 6, 60000
    z = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5, -torch.inf]]).expand(draws, vocab).contiguous()
    temperature = torch.full((draws,), 0.8)
    keys = noise.row_keys(
        torch.arange(draws), torch.zeros(draws, dtype=torch.int64), noise.GUMBEL_STREAM
    )
    mix = gumbel_max.mix_table(noise.token_mix(torch.arange(vocab)))
    counts = torch.bincount(gumbel_max.gumbel_argmax(z, temperature, keys, mix), minlength=vocab)
    assert counts[5] == 0
    expected = torch.softmax(z[0, :5].double() / 0.8, 0) * draws
    chi2 = float(((counts[:5].double() - expected) ** 2 / expected).sum())
    p = float(
        torch.special.gammaincc(torch.tensor(2.0, dtype=torch.float64), torch.tensor(chi2 / 2))
    )
    assert p > 1e-4


def test_plain_temperature_step_picks_what_the_pipeline_picks() -> None:
    """Temperature-only rows take the one-pass step on the model's logits (no torch op over a
    row); an all-allowing
    grammar mask (which changes nothing) sends the same rows through the full pipeline. NaN,
    +inf, float32-max and all -inf rows included; both advance their positions alike."""
    vocab, rows = 4099, 6
    temperatures = [1.0, 0.3, 1.7, 1.0, 0.9, 2.0]

    def make() -> Sampler:
        sampler = Sampler(vocab, rows, torch.device("cpu"), eos_token_ids=[0])
        for key, t in enumerate(temperatures):
            sampler.add_row(
                key, SamplingParams(temperature=t), seed=100 + key, prompt_token_ids=[1]
            )
        return sampler

    plain, piped = make(), make()
    everything = TokenMasks(np.array([0]), torch.full((1, words_for(vocab)), -1, dtype=torch.int32))
    generator = torch.Generator().manual_seed(4)
    keys = list(range(rows))
    for step in range(20):
        logits = torch.randn(rows, vocab, generator=generator) * 2
        if step % 2:
            logits[0, 7], logits[1, 11], logits[2, 13] = math.nan, math.inf, FLOAT32_MAX
            logits[2, 14], logits[3] = math.inf, -math.inf
            logits[4, :5] = math.nan
        expected = piped.sample(logits, keys, everything).token_ids
        out, ops = vocabulary_ops(lambda: plain.sample(logits, keys), vocab)  # noqa: B023
        assert torch.equal(out.token_ids, expected)
        assert ops == 0  # one C pass, no whole-row torch op


def test_reads_reordered_rows_with_patched_tokens(isa) -> None:
    """Rows read from the model's logits by `order`, some tokens' values from the work buffer:
    the pick of the cleaned, patched rows (both ISAs; the patched tokens include winners)."""
    generator = torch.Generator().manual_seed(12)
    vocab = 40007
    logits = torch.randn(9, vocab, generator=generator) * 2
    logits[1, 3], logits[2, 4] = math.nan, math.inf
    order = torch.tensor([4, 1, 8, 2, 0, 6])
    patch_ids = torch.randint(-1, vocab, (6, 33), generator=generator)
    work = torch.randn(6, vocab, generator=generator) * 2
    work[:3, patch_ids[:3, 0].clamp(min=0)] = 30.0  # patched tokens that win
    rows = logits.nan_to_num(nan=-torch.inf, posinf=FLOAT32_MAX, neginf=-torch.inf)[order]
    for r in range(6):
        ids = patch_ids[r][patch_ids[r] >= 0]
        rows[r, ids] = work[r, ids]
    temperature = torch.tensor([1.0, 0.5, 1.3, 0.8, 1.0, 2.0])
    mix = gumbel_max.mix_table(noise.token_mix(torch.arange(vocab)))
    for step in range(6):
        keys = noise.row_keys(torch.arange(6) + 50, torch.full((6,), step), noise.GUMBEL_STREAM)
        expected, _ = torch_pick(rows, temperature, keys)
        tokens = gumbel_max.gumbel_argmax(
            logits, temperature, keys, mix, order=order, patch_ids=patch_ids, patch=work
        )
        assert torch.equal(tokens, expected)


def slice_row_params(floats, top_k, seeds, positions, mass) -> np.ndarray:
    from winnow.sampling.routes import slice_rows

    params = slice_rows(floats.numpy(), top_k.numpy(), seeds.numpy(), positions.numpy())
    params["total_mass"] = params["total_mass_hi"] = mass.numpy()
    return params


def test_slice_pick_is_the_torch_pick_on_the_slice() -> None:
    """The C pick on a candidate slice against Routes._pick (top_k, top_p with and without
    top_k, min_p, XTC, ties everywhere, an all -inf row): same tokens and overflow flags."""
    from winnow.sampling.routes import Routes
    from winnow.sampling.step import (
        MIN_P,
        MIN_P_V,
        NUM_FLAGS,
        NUM_FLOATS,
        TEMPERATURE,
        TOP_K,
        TOP_P,
        TOP_P_V,
        XTC,
        XTC_PROB,
        XTC_THRESHOLD,
        RowParams,
    )  # fmt: skip

    vocab = 5000
    routes = Routes(vocab, 16, torch.device("cpu"))
    assert routes.mix_table is not None
    generator = torch.Generator().manual_seed(0)
    rows = 0

    def chance(p: float, yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand(16, generator=generator) < p, yes, no)

    for trial in range(120):
        n = (8, 64, 300)[trial % 3]
        z = torch.randn(16, vocab, generator=generator) * (1 + trial % 4)
        if trial % 5 == 0:
            z = torch.randint(0, 4, (16, vocab), generator=generator).float()
        z[0] = -torch.inf
        values, ids = z.topk(n, dim=1)
        floats = torch.zeros(16, NUM_FLOATS)
        floats[:, TEMPERATURE] = torch.rand(16, generator=generator) + 0.2
        floats[:, TOP_P_V] = chance(0.6, torch.rand(16, generator=generator), torch.ones(16))
        floats[:, MIN_P_V] = chance(0.4, torch.rand(16, generator=generator) * 0.3, torch.zeros(16))
        floats[:, XTC_PROB] = chance(0.4, torch.rand(16, generator=generator), torch.zeros(16))
        floats[:, XTC_THRESHOLD] = torch.rand(16, generator=generator) * 0.6 - 0.05
        top_k = chance(0.5, torch.randint(1, n + 1, (16,), generator=generator), torch.zeros(16))
        top_k = top_k.long()
        seeds = torch.randint(-(2**62), 2**62, (16,), generator=generator)
        positions = torch.randint(0, 10**6, (16,), generator=generator)
        flags = np.zeros((16, NUM_FLAGS), dtype=bool)
        flags[:, TOP_K], flags[:, TOP_P] = top_k > 0, floats[:, TOP_P_V] < 1
        flags[:, MIN_P] = floats[:, MIN_P_V] > 0
        flags[:, XTC] = (floats[:, XTC_PROB] > 0) & (floats[:, XTC_THRESHOLD] <= 0.5)
        mass = torch.rand(16, generator=generator, dtype=torch.float64) * 100 + 1
        params = RowParams(flags, np.arange(16), floats, top_k, seeds, positions)
        expected = routes._pick((values, ids), params, mass)
        records = slice_row_params(floats, top_k, seeds, positions, mass)
        tokens, overflow, undecided = gumbel_max.slice_pick(values, ids, records, routes.mix_table)
        assert torch.equal(tokens, expected.tokens)
        assert torch.equal(overflow, expected.overflow) and not bool(undecided.any())
        rows += 16
    assert rows == 1920


def test_slice_pick_flags_rows_whose_normaliser_bounds_disagree() -> None:
    """top_p without top_k under bounds [lo, hi]: the rows whose survivors differ between the
    two are flagged; the others pick what the exact normaliser (anywhere between) picks."""
    vocab, n = 1000, 16
    values = torch.linspace(5.0, 0.0, n).expand(4, n).contiguous()
    ids = torch.arange(n).expand(4, n).contiguous()
    floats = torch.zeros(4, 8)
    floats[:, 0], floats[:, 1] = 1.0, 0.5
    mix = gumbel_max.mix_table(noise.token_mix(torch.arange(vocab)))
    weights = torch.exp(values[0] - values[0, 0]).double()
    exact = float(weights.sum()) * 1.5
    zeros = torch.zeros(4, dtype=torch.int64)
    records = slice_row_params(
        floats, zeros, zeros, zeros, torch.full((4,), exact, dtype=torch.float64)
    )
    records["total_mass_hi"][1] = exact * 1.0000001  # no survivor changes
    records["total_mass"][2], records["total_mass_hi"][2] = exact / 1.5, exact * 1.5
    tokens, _, undecided = gumbel_max.slice_pick(values, ids, records, mix)
    assert undecided.tolist() == [False, False, True, False]
    assert tokens[1] == tokens[0]
