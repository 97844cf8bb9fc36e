"""Empirical token frequencies match the distribution the spec defines (fixed seeds: no flakes)."""

from __future__ import annotations

import pytest
import torch

from winnow.sampling.noise import child_seed
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.3, 0.0, -0.2, -0.5, -0.8, -1.0])
ROWS, STEPS = 1000, 20  # 20 000 draws: many seeds, and many positions per seed


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "a truncated token was sampled"
    statistic = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    dof = torch.tensor((int(support.sum()) - 1) / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2.0))


def draw_counts(params: SamplingParams, seed: int) -> torch.Tensor:
    vocab = len(LOGITS)
    sampler = Sampler(vocab, ROWS, torch.device("cpu"), eos_token_ids=[])
    keys = list(range(ROWS))
    for key in keys:
        sampler.add_row(key, params, child_seed(seed, key), prompt_token_ids=[5, 6, 7])
    counts = torch.zeros(vocab, dtype=torch.float64)
    logits = LOGITS.expand(ROWS, vocab).contiguous()
    for _ in range(STEPS):
        tokens = sampler.sample(logits, keys).token_ids
        counts += torch.bincount(tokens, minlength=vocab).double()
    return counts


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_temperature_only_matches_softmax(temperature: float) -> None:
    counts = draw_counts(SamplingParams(temperature=temperature), seed=11)
    assert chi2_pvalue(counts, torch.softmax(LOGITS / temperature, 0)) > 1e-4


def test_truncated_sampling_matches_the_renormalised_survivors() -> None:
    # top_k=6 keeps ids 0..5; top_p=0.8 of those keeps 0..3 (mass above id 3: 0.72, id 4: 0.84)
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.8)
    y = LOGITS / 0.9
    q = torch.softmax(y[:6], 0)
    before = torch.cumsum(q, 0) - q
    kept = torch.zeros(len(LOGITS), dtype=torch.bool)
    kept[:6] = before < 0.8
    assert kept.tolist() == [True] * 4 + [False] * 8
    probs = torch.where(kept, torch.exp(y), 0.0)
    counts = draw_counts(params, seed=12)
    assert chi2_pvalue(counts, probs / probs.sum()) > 1e-4


def test_min_p_sampling_matches_the_renormalised_survivors() -> None:
    params = SamplingParams(min_p=0.3)
    kept = LOGITS.max() + torch.log(torch.tensor(0.3)) <= LOGITS
    probs = torch.where(kept, torch.exp(LOGITS), 0.0)
    counts = draw_counts(params, seed=13)
    assert chi2_pvalue(counts, probs / probs.sum()) > 1e-4
