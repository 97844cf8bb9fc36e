"""The fused C Gumbel-max (winnow/kernels/cpu/gumbel_max.c) against the torch expression of the
same pick: identical tokens and y for many seeds, temperatures and awkward rows, on both ISAs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from winnow.kernels.cpu import gumbel_max
from winnow.sampling import noise
from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

pytestmark = pytest.mark.skipif(not gumbel_max.available(), reason="no AVX2 C kernel here")

FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.fixture(params=[True, False], ids=["avx512", "avx2"])
def isa(request):
    if request.param and not gumbel_max.use_avx512(True):
        pytest.skip("no AVX-512 on this CPU")
    gumbel_max.use_avx512(request.param)
    yield request.param
    gumbel_max.use_avx512(True)


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
    """Temperature-only rows take the one-pass step on the model's logits; an all-allowing
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
        assert torch.equal(plain.sample(logits, keys).token_ids, expected)
