"""Counter-based noise: matches its documented formula, is uniform, and never uses a global RNG."""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.sampling.reference_sampler import gumbel_row, hash32
from winnow.sampling import noise
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler


def chi2_pvalue(statistic: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


def torch_bits(seeds: list[int], positions: list[int], tokens: torch.Tensor, stream: int):
    keys = noise.row_keys(torch.tensor(seeds), torch.tensor(positions), stream)
    return noise.hash_bits(keys[:, None], noise.token_mix(tokens)[None, :])


def test_hash_matches_the_python_formula() -> None:
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF, -987654321]
    positions = [0, 1, 7, 4095, 2**31 - 1, 12, 3]
    tokens = torch.tensor([0, 1, 2, 31999, 131071, 65536])
    for stream in (noise.GUMBEL_STREAM, noise.XTC_STREAM):
        bits = torch_bits(seeds, positions, tokens, stream)
        expected = [
            [hash32(s, p, t, stream) for t in tokens.tolist()]
            for s, p in zip(seeds, positions, strict=True)
        ]
        assert bits.tolist() == expected


def test_gumbel_matches_the_formula_and_is_finite_at_the_extremes() -> None:
    seed, position, vocab = 42, 17, 64
    bits = torch_bits([seed], [position], torch.arange(vocab), noise.GUMBEL_STREAM)[0]
    np.testing.assert_allclose(
        noise.gumbel(bits).numpy(), gumbel_row(seed, position, vocab), 0, 1e-6
    )
    extremes = noise.gumbel(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1]))
    assert torch.isfinite(extremes).all()
    assert extremes[-1] > extremes[-2] > extremes[2] > extremes[1] > extremes[0]
    assert math.isclose(extremes[-1].item(), -math.log(-math.log1p(-0.5 / 2**32)), rel_tol=1e-6)


def test_in_place_variants_agree() -> None:
    x = torch.randint(0, 2**32, (3, 50), generator=torch.Generator().manual_seed(0))
    y = torch.randn(3, 50)
    expected = y + noise.gumbel(noise.fmix32(x))
    hashed = noise.fmix32_(x.clone(), torch.empty_like(x))
    out = noise.perturb_(y, hashed, torch.empty(3, 50, dtype=torch.float64), torch.empty(3, 50))
    assert torch.equal(out, expected)


def test_uniforms_are_uniform() -> None:
    # 2**18 draws over many seeds, positions and tokens, in 64 equal bins
    seeds = [noise.child_seed(5, i) for i in range(64)]
    bits = torch_bits(seeds, list(range(64)), torch.arange(4096), noise.GUMBEL_STREAM).flatten()
    u = noise.uniform(bits)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    expected = len(u) / 64
    assert chi2_pvalue(float(((counts - expected) ** 2 / expected).sum()), 63) > 1e-4
    # every output bit is a fair coin, and consecutive tokens are not correlated
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).double().mean(1)
    assert (ones - 0.5).abs().max() < 0.005
    lag = np.corrcoef(u[:-1].numpy(), u[1:].numpy())[0, 1]
    assert abs(lag) < 0.01


def test_streams_and_neighbouring_seeds_are_unrelated() -> None:
    tokens = torch.arange(20000)
    a = noise.uniform(torch_bits([9], [3], tokens, noise.GUMBEL_STREAM))[0].numpy()
    b = noise.uniform(torch_bits([9], [3], tokens, noise.XTC_STREAM))[0].numpy()
    c = noise.uniform(torch_bits([10], [3], tokens, noise.GUMBEL_STREAM))[0].numpy()
    d = noise.uniform(torch_bits([9], [4], tokens, noise.GUMBEL_STREAM))[0].numpy()
    for other in (b, c, d):
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.03


def test_sampling_ignores_the_global_rng() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))

    def sample() -> list[int]:
        sampler = Sampler(64, 4, torch.device("cpu"), eos_token_ids=[2])
        for key in range(4):
            sampler.add_row(
                key, SamplingParams(temperature=1.0), seed=11 + key, prompt_token_ids=[1]
            )
        return sampler.sample(logits, list(range(4))).token_ids.tolist()

    torch.manual_seed(0)
    first = sample()
    torch.manual_seed(1)
    torch.rand(1000)
    assert sample() == first


def test_child_seeds_are_hashes_not_offsets() -> None:
    for seed in (0, 1, 12345, -1, 2**63 - 1, -(2**63)):
        children = [noise.child_seed(seed, i) for i in range(16)]
        assert len(set(children)) == 16
        assert all(c != seed + i for i, c in enumerate(children))
        assert all(-(2**63) <= c < 2**63 for c in children)
        assert children == [noise.child_seed(seed, i) for i in range(16)]
    assert noise.child_seed(1, 0) != noise.child_seed(0, 1)


def test_random_seed_is_63_bit() -> None:
    seeds = {noise.random_seed() for _ in range(64)}
    assert len(seeds) == 64
    assert all(0 <= s < 2**63 for s in seeds)
