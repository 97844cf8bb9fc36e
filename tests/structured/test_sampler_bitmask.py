"""The grammar bitmask inside the sampler: where it applies, and what it must not touch."""

from __future__ import annotations

import numpy as np
import torch

from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

CPU = torch.device("cpu")
VOCAB = 100  # not a multiple of 32
EOS = 0


def make(rows: list[SamplingParams]) -> tuple[Sampler, list[int]]:
    sampler = Sampler(VOCAB, len(rows), CPU, eos_token_ids=[EOS])
    for key, params in enumerate(rows):
        sampler.add_row(key, params, 1000 + key, prompt_token_ids=[1, 2])
    return sampler, list(range(len(rows)))


def allowing(*token_sets: list[int]) -> torch.Tensor:
    bits = np.zeros((len(token_sets), words_for(VOCAB)), dtype=np.uint32)
    for row, tokens in enumerate(token_sets):
        for token in tokens:
            bits[row, token // 32] |= np.uint32(1 << (token % 32))
    return torch.from_numpy(bits.view(np.int32))


def logits_for(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


def test_a_greedy_row_with_a_mask_takes_the_best_allowed_token() -> None:
    """An all-greedy batch would take the plain-argmax shortcut; a masked row must not."""
    sampler, keys = make([SamplingParams(temperature=0.0)] * 2)
    logits = logits_for(2, 1)
    allowed = [5, 40, 99]
    token = int(allowed[int(logits[1, allowed].argmax())])
    masks = TokenMasks(np.array([1]), allowing(allowed))
    tokens = sampler.sample(logits, keys, masks).token_ids.tolist()
    assert tokens == [int(logits[0].argmax()), token]


def test_processed_distribution_is_banned_exactly_where_the_mask_is_clear() -> None:
    rows = [SamplingParams(), SamplingParams(top_k=20), SamplingParams(top_p=0.5)]
    sampler, keys = make(rows)
    logits = logits_for(3, 2)
    allowed = [list(range(0, VOCAB, 3)), [7, 64, 65, 99], list(range(50))]
    masks = TokenMasks(np.array([2, 0, 1]), allowing(allowed[2], allowed[0], allowed[1]))
    processed = sampler.processed_logits(logits, keys, masks)
    unmasked = sampler.processed_logits(logits, keys)
    for row in range(3):
        banned = torch.ones(VOCAB, dtype=torch.bool)
        banned[allowed[row]] = False
        assert torch.isneginf(processed[row, banned]).all()
    # the allowed tokens of the unthresholded row keep exactly their values
    assert torch.equal(processed[0, allowed[0]], unmasked[0, allowed[0]])


def test_the_grammar_wins_over_the_min_tokens_eos_ban() -> None:
    rows = [SamplingParams(temperature=0.0, min_tokens=5)] * 2
    sampler, keys = make(rows)
    logits = logits_for(2, 3)
    logits[:, EOS] = 100.0
    masks = TokenMasks(np.array([1]), allowing([EOS, 9]))
    tokens = sampler.sample(logits, keys, masks).token_ids.tolist()
    assert tokens[0] != EOS and tokens[1] == EOS  # banned without a grammar, allowed with one


def test_unmasked_rows_are_unchanged_by_masked_neighbours() -> None:
    rows = [SamplingParams(seed=1), SamplingParams(top_k=5), SamplingParams(temperature=0.0)]
    alone, keys = make(rows)
    beside, _ = make(rows)
    for step in range(6):
        logits = logits_for(3, 10 + step)
        masks = TokenMasks(np.array([1]), allowing([3, 4]))
        expected = alone.sample(logits, keys).token_ids.tolist()
        got = beside.sample(logits, keys, masks).token_ids.tolist()
        assert got[0] == expected[0] and got[2] == expected[2] and got[1] in (3, 4)
