"""The CPU step that reads the model's logits in place (step.Source: only the tokens stages 1-2
touch are copied) against the step that copies every row into the work buffer first (which a
grammar bitmask forces): same tokens, step after step, over every stage and its fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from winnow.kernels.cpu import gumbel_max, row_stats
from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

pytestmark = pytest.mark.skipif(
    not (gumbel_max.available() and row_stats.available()), reason="no C sampler kernels here"
)

VOCAB = 3001
PARAMS = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingParams(repetition_penalty=1.3, logit_bias={5: 4.0, 17: -100.0}, top_k=20),
    SamplingParams(temperature=1.2, min_p=0.05, min_tokens=3),
    SamplingParams(temperature=0.9, top_p=0.6, xtc_probability=0.7, xtc_threshold=0.1),
    SamplingParams(temperature=0.8, xtc_probability=0.9, xtc_threshold=0.05),
    SamplingParams(temperature=0.0, frequency_penalty=1.0, logit_bias={9: 3.0}),
    SamplingParams(temperature=1.0, top_p=0.999),  # a nucleus wider than the first slice
    SamplingParams(temperature=2.0, top_p=0.5, presence_penalty=2.0),  # flat: bounds disagree
    SamplingParams(temperature=1.0),
]


def make(open_candidates: int) -> tuple[Sampler, list[int]]:
    sampler = Sampler(VOCAB, len(PARAMS), torch.device("cpu"), eos_token_ids=[0, 1],
                      open_candidates=open_candidates, wide_candidates=64)  # fmt: skip
    for key, params in enumerate(PARAMS):
        prompt = list(range(2 + key, 40 + 3 * key, 3))
        sampler.add_row(key, params, seed=1000 + key, prompt_token_ids=prompt)
    return sampler, list(range(len(PARAMS)))


@pytest.mark.parametrize("open_candidates", [8, 256])
def test_in_place_step_picks_what_the_copying_step_picks(open_candidates: int) -> None:
    """Also what the torch expressions alone pick (the routes without the C kernels, as on a
    CPU without AVX2)."""
    sourced, keys = make(open_candidates)
    copied, _ = make(open_candidates)
    torch_only, _ = make(open_candidates)
    torch_only._routes.fused_cpu, torch_only._routes.mix_table = False, None
    everything = TokenMasks(np.array([9]), torch.full((1, words_for(VOCAB)), -1, dtype=torch.int32))
    generator = torch.Generator().manual_seed(open_candidates)
    picks = 0
    for step in range(25):
        logits = torch.randn(len(keys), VOCAB, generator=generator) * (1 + step % 3)
        logits[:, :: 97 + step] += 6.0
        if step % 4 == 1:
            logits[0, 7], logits[1, 11], logits[2, 13] = math.nan, math.inf, math.inf
            logits[7, :100] = math.nan
        if step % 4 == 3:
            logits[8] = 0.0  # every token tied
        expected = copied.sample(logits, keys, everything).token_ids
        tokens = sourced.sample(logits, keys).token_ids
        assert torch.equal(tokens, expected), step
        assert torch.equal(torch_only.sample(logits, keys).token_ids, expected), step
        picks += len(keys)
    assert picks == 250


def test_in_place_step_copies_only_the_patched_tokens() -> None:
    """Penalties and bias on the free route: the work buffer receives the touched tokens (the
    history and the biased ids) and nothing else; the C pass reads the rest from the logits."""
    sampler = Sampler(VOCAB, 2, torch.device("cpu"), eos_token_ids=[0])
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.2, logit_bias={3: 2.0})
    for key in range(2):
        sampler.add_row(key, params, seed=key, prompt_token_ids=[5, 6], output_token_ids=[7, 8])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    sampler._work.fill_(math.nan)
    sampler.sample(logits, [0, 1])
    written = (~sampler._work[: 2 * VOCAB].view(2, VOCAB).isnan()).nonzero()[:, 1]
    assert sorted(set(written.tolist())) == [3, 7, 8]
