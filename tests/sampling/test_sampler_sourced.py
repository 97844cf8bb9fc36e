"""The CPU step that reads the model's logits in place (step.Source: only the tokens stages 1-2
touch are copied) against the step that copies every row into the work buffer first (which a
grammar bitmask forces): same tokens, step after step, over every stage and its fallbacks."""

from __future__ import annotations

import dataclasses
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


def awkward_logits(rows: int, step: int, generator: torch.Generator) -> torch.Tensor:
    """Step `step`'s logits: strong tokens over a random bulk; NaN, +inf and a NaN run on some
    steps, a row of ties on others."""
    logits = torch.randn(rows, VOCAB, generator=generator) * (1 + step % 3)
    logits[:, :: 97 + step] += 6.0
    if step % 4 == 1:
        logits[0, 7], logits[1, 11], logits[2, 13] = math.nan, math.inf, math.inf
        logits[7, :100] = math.nan
    if step % 4 == 3:
        logits[8] = 0.0  # every token tied
    return logits


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
        logits = awkward_logits(len(keys), step, generator)
        expected = copied.sample(logits, keys, everything).token_ids
        tokens = sourced.sample(logits, keys).token_ids
        assert torch.equal(tokens, expected), step
        assert torch.equal(torch_only.sample(logits, keys).token_ids, expected), step
        picks += len(keys)
    assert picks == 250


def test_in_place_step_copies_only_the_patched_tokens() -> None:
    """Penalties and bias on the free and thresholded routes: the work buffer receives the
    touched tokens (the history and the biased ids) and nothing else; the C passes read the rest
    from the logits. (The top_k row keeps the batch off the one-call step, which writes nothing
    there.)"""
    sampler = Sampler(VOCAB, 2, torch.device("cpu"), eos_token_ids=[0])
    for key in range(2):
        params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.2, logit_bias={3: 2.0},
                                top_k=20 * key)  # fmt: skip
        sampler.add_row(key, params, seed=key, prompt_token_ids=[5, 6], output_token_ids=[7, 8])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    sampler._work.fill_(math.nan)
    sampler.sample(logits, [0, 1])
    written = (~sampler._work[: 2 * VOCAB].view(2, VOCAB).isnan()).nonzero()[:, 1]
    assert sorted(set(written.tolist())) == [3, 7, 8]


TRUNCATED = [
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=1.2, min_p=0.05),
    SamplingParams(temperature=0.9, top_p=0.6, top_k=40),
    SamplingParams(temperature=1.5, top_p=0.3),  # a heavy bulk: the bounds often disagree
    SamplingParams(temperature=0.05, top_p=0.9),  # the bulk's share of the normaliser is 0
    SamplingParams(temperature=1.0, top_p=0.8, min_p=0.02),
]


@pytest.mark.parametrize("vocab", [3001, 40000])  # the scan without / with a guessed threshold
def test_plain_truncated_step_picks_what_the_pipeline_picks(vocab: int, monkeypatch) -> None:
    """Batches of temperature + truncation rows skip the pipeline (Sampler._plain_truncated)
    and pick what the copying pipeline and the torch expressions pick, NaN and inf rows
    included; rows whose normaliser bounds disagree take the exact one; a batch with a slice
    that may miss a survivor (a row of ties) runs the pipeline instead."""

    def sampler(open_candidates: int = 256) -> Sampler:
        out = Sampler(vocab, len(TRUNCATED), torch.device("cpu"), eos_token_ids=[0],
                      open_candidates=open_candidates, wide_candidates=64)  # fmt: skip
        for key, params in enumerate(TRUNCATED):
            out.add_row(key, params, seed=2000 + key, prompt_token_ids=[3 + key])
        return out

    plain, copied, torch_only = sampler(), sampler(), sampler()
    torch_only._routes.fused_cpu, torch_only._routes.mix_table = False, None
    narrow = sampler(open_candidates=8)  # most of its slices overflow: the pipeline widens
    taken, exact = [], [0]

    def plain_step(logits, slots):
        out = Sampler._plain_truncated(plain, logits, slots)
        taken.append(out is not None)
        return out

    def source_mass(*args, **kwargs):
        exact[0] += 1
        return row_stats_source_mass(*args, **kwargs)

    row_stats_source_mass = row_stats.source_mass
    monkeypatch.setattr(plain, "_plain_truncated", plain_step)
    monkeypatch.setattr(row_stats, "source_mass", source_mass)
    everything = TokenMasks(np.array([0]), torch.full((1, words_for(vocab)), -1, dtype=torch.int32))
    keys = list(range(len(TRUNCATED)))
    generator = torch.Generator().manual_seed(vocab)
    for step in range(24):
        logits = torch.randn(len(keys), vocab, generator=generator) * (2 + step % 3)
        logits[:, :: 97 + step] += 8.0
        # row 4: a hundred strong tokens over a bulk with about half the mass, so the cut
        # often lies within the bulk's bounds
        logits[4] = torch.randn(vocab, generator=generator)
        logits[4, :: vocab // 100] += 5.0 + 1.5 * math.log(vocab / 3001)
        if step % 4 == 1:
            logits[0, 7], logits[1, 11], logits[2, 13] = math.nan, math.inf, math.inf
            logits[6, :100] = math.nan
        if step % 6 == 3:
            logits[3] = 0.0  # every token tied: the slice overflows
        expected = copied.sample(logits, keys, everything).token_ids
        assert torch.equal(plain.sample(logits, keys).token_ids, expected), step
        assert torch.equal(torch_only.sample(logits, keys).token_ids, expected), step
        assert torch.equal(narrow.sample(logits, keys).token_ids, expected), step
    assert any(taken) and not all(taken) and exact[0] > 0


def test_nucleus_cut_within_the_bounds_picks_what_the_torch_step_picks() -> None:
    """Rows crafted so that the top_p cut lies next to the bulk's share of the normaliser
    (top_p a hair above or below the mass before the third of three strong tokens, a tenth of
    the mass in the bulk): decided by the bounds or by the exact normaliser, the plain step's
    picks over many positions are the torch expressions' (where the third token survives it is
    picked about a third of the time, so a wrong cut shows)."""
    vocab, rows = 40000, 12
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(rows, vocab, generator=generator)
    bulk = torch.exp(logits.double()).sum(1)
    strong = torch.log(bulk * 3.0)  # each strong token ~ 30% of the mass, the bulk ~ 10%
    for r in range(rows):
        logits[r, [101, 2002, 30003]] = strong[r].float() + torch.tensor([0.1, -0.1, 0.0])
    z = row_stats.total_mass(logits, torch.ones(rows))  # exp(y - max y) summed: the normaliser
    weights = torch.exp(logits[:, [101, 2002, 30003]].double() - logits.amax(1, keepdim=True))
    ranked, order = weights.sort(1, descending=True)
    before_third = (ranked[:, :2].sum(1) / z).tolist()
    third = torch.tensor([101, 2002, 30003])[order[:, 2]]
    offsets = [-1e-2, -2e-3, -5e-4, 5e-4, 2e-3, 1e-2] * 2

    def sampler(fused: bool) -> Sampler:
        out = Sampler(vocab, rows, torch.device("cpu"), eos_token_ids=[0])
        for r in range(rows):
            top_p = before_third[r] * (1 + offsets[r])
            out.add_row(r, SamplingParams(top_p=top_p), seed=r, prompt_token_ids=[1])
        if not fused:
            out._routes.fused_cpu, out._routes.mix_table = False, None
        return out

    plain, torch_only = sampler(True), sampler(False)
    keys = list(range(rows))
    kept = torch.tensor(offsets) > 0
    thirds = torch.zeros(rows, dtype=torch.int64)
    for _ in range(40):
        tokens = plain.sample(logits, keys).token_ids
        assert torch.equal(tokens, torch_only.sample(logits, keys).token_ids)
        thirds += tokens == third
    assert bool((thirds[kept] > 0).all()) and not bool(thirds[~kept].any())


@pytest.mark.parametrize("modes", [("raw",), ("processed",), ("raw", "processed")])
@pytest.mark.parametrize("open_candidates", [8, 256])
def test_in_place_step_with_logprobs_gives_the_copying_step_s_logprobs(
    isa, modes: tuple[str, ...], open_candidates: int, monkeypatch
) -> None:
    """Logprobs steps read the model's logits in place too (no load of every row: raw rows'
    normaliser and top-k straight from the logits, thresholded rows' processed values from
    their slice and its survivor mask): the tokens, logprobs and top logprobs of the copying
    step, bit for bit, over every route, its fallbacks and NaN / inf / tied rows."""

    def make_lp() -> tuple[Sampler, list[int]]:
        out = Sampler(VOCAB, len(PARAMS), torch.device("cpu"), eos_token_ids=[0, 1],
                      open_candidates=open_candidates, wide_candidates=64)  # fmt: skip
        for key, params in enumerate(PARAMS):
            mode = modes[key % len(modes)]
            params = dataclasses.replace(
                params, logprobs=True, top_logprobs=5 - key % 3, logprobs_mode=mode
            )
            prompt = list(range(2 + key, 40 + 3 * key, 3))
            out.add_row(key, params, seed=1000 + key, prompt_token_ids=prompt)
        return out, list(range(len(PARAMS)))

    (sourced, keys), (copied, _) = make_lp(), make_lp()
    loads: list[int] = []
    load_logits = sourced._load_logits
    monkeypatch.setattr(sourced, "_load_logits", lambda *a: loads.append(1) or load_logits(*a))
    everything = TokenMasks(np.array([9]), torch.full((1, words_for(VOCAB)), -1, dtype=torch.int32))
    generator = torch.Generator().manual_seed(open_candidates + len(modes))
    for step in range(12):
        logits = awkward_logits(len(keys), step, generator)
        expected = copied.sample(logits, keys, everything)
        out = sourced.sample(logits, keys)
        assert torch.equal(out.token_ids, expected.token_ids), step
        for name in ("logprobs", "top_token_ids", "top_logprobs"):
            got, want = getattr(out, name), getattr(expected, name)
            assert got is not None and want is not None
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (step, name)
            assert torch.equal(got.isnan(), want.isnan()), (step, name)
    assert not loads  # no step copied every row into the work buffer


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "one-biased"])
def test_greedy_rows_with_raw_top_logprobs_are_not_loaded(isa, patched: bool, monkeypatch) -> None:
    """Greedy rows with nothing patched take their token from their raw top logprobs (the
    cleaned logits' top-k by value, then id: the argmax with ties to the lowest id) instead of
    loading their rows; with one patched greedy row the block is loaded and picked as before.
    Tokens and logprobs are the copying step's, bit for bit (ties, NaN, +inf, all -inf rows)."""
    rows = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=k) for k in (1, 3, 0, 2)]
    if patched:
        rows[3] = dataclasses.replace(rows[3], logit_bias={4: 1.0})
    rows.append(SamplingParams(temperature=0.8, top_k=5, logprobs=True, top_logprobs=2))

    def make_greedy() -> Sampler:
        out = Sampler(VOCAB, len(rows), torch.device("cpu"), eos_token_ids=[0])
        for key, params in enumerate(rows):
            out.add_row(key, params, seed=key, prompt_token_ids=[1, 2])
        return out

    sourced, copied = make_greedy(), make_greedy()
    loaded: list[int] = []
    load = sourced._routes.load
    monkeypatch.setattr(sourced._routes, "load", lambda s, r: loaded.extend(r) or load(s, r))
    everything = TokenMasks(np.array([4]), torch.full((1, words_for(VOCAB)), -1, dtype=torch.int32))
    keys = list(range(len(rows)))
    generator = torch.Generator().manual_seed(7)
    for step in range(8):
        logits = torch.randint(0, 3, (len(rows), VOCAB), generator=generator).float()  # ties
        if step % 2:
            logits[0, 5], logits[1, 9], logits[1, 900] = math.nan, math.inf, math.inf
            logits[2] = -math.inf
            logits[3, :50] = math.nan
        expected = copied.sample(logits, keys, everything)
        out = sourced.sample(logits, keys)
        assert torch.equal(out.token_ids, expected.token_ids), step
        for name in ("logprobs", "top_token_ids", "top_logprobs"):
            got, want = getattr(out, name), getattr(expected, name)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (step, name)
    # the greedy work rows (0-3); the top_k row's ties make it widen, which loads it
    assert bool(set(loaded) & {0, 1, 2, 3}) == patched
