"""The batched pipeline keeps the same survivors and picks the same token as the naive reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sampling.reference_sampler import reference_sample
from winnow.sampling.params import SamplingParams
from winnow.sampling.routes import Routes
from winnow.sampling.sampler import Sampler

EOS = (1,)
INF = math.inf
# a small value set, so ties (at the k-th value, at the max, in the nucleus) are common
TIED_VALUES = [-INF, -3.0, -1.0, 0.0, 0.5, 1.25, 2.0, 4.0]
FRAGILE = 1e-4

SETTINGS = settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Row:
    params: SamplingParams
    seed: int
    prompt: list[int]
    outputs: list[int] = field(default_factory=list)


def run_and_compare(
    vocab: int,
    rows: list[Row],
    steps: list[torch.Tensor],
    candidates: tuple[int, int] = (256, 4096),
) -> int:
    """Sample every step with a Sampler and the reference; returns how many rows were compared.

    candidates: the sampler's (open_candidates, wide_candidates); small ones force the fallbacks.
    """
    open_candidates, wide_candidates = candidates
    sampler = Sampler(
        vocab,
        len(rows) + 2,
        torch.device("cpu"),
        EOS,
        open_candidates=open_candidates,
        wide_candidates=wide_candidates,
    )
    keys = [100 + 7 * i for i in range(len(rows))]
    for key, row in zip(keys, rows, strict=True):
        sampler.add_row(key, row.params, row.seed, row.prompt, list(row.outputs))
    compared = 0
    for logits in steps:
        processed = sampler.processed_logits(logits, keys).numpy()
        tokens = sampler.sample(logits, keys).token_ids.tolist()
        for i, row in enumerate(rows):
            ref = reference_sample(
                logits[i].tolist(), row.params, row.seed, row.prompt, row.outputs, EOS
            )
            if ref.margin >= FRAGILE:
                compared += 1
                check_row(processed[i], tokens[i], ref)
            row.outputs.append(tokens[i])
    return compared


def check_row(processed: np.ndarray, token: int, ref) -> None:
    assert token == ref.token
    if ref.keep is None:  # greedy: processed values are z itself
        np.testing.assert_array_equal(processed, ref.z)
        return
    want = ref.keep & np.isfinite(ref.y)
    np.testing.assert_array_equal(np.isfinite(processed), want)
    np.testing.assert_array_equal(processed[want], ref.y[want])


@st.composite
def sampling_params(draw: st.DrawFn, vocab: int) -> SamplingParams:
    bias_ids = draw(st.lists(st.integers(0, vocab - 1), max_size=3, unique=True))
    bias_values = st.sampled_from([-100.0, -99.5, -2.5, -0.5, 0.5, 2.5, 99.5, 100.0])
    return SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, 0, 0, -1, 1, 2, 3, 5, vocab - 1, vocab, vocab + 5])),
        top_p=draw(st.sampled_from([1.0, 1.0, 1.0, 0.0, 0.3, 0.6, 0.9, 0.99])),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.3, 1.0])),
        xtc_probability=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
        xtc_threshold=draw(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5, 0.6])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.0, 0.7, 1.3])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.0, 0.4, -1.0])),
        presence_penalty=draw(st.sampled_from([0.0, 0.0, 0.7, -0.5])),
        logit_bias={i: draw(bias_values) for i in bias_ids},
        min_tokens=draw(st.integers(0, 3)),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=2))),
    )


@st.composite
def logits_row(draw: st.DrawFn, vocab: int) -> list[float]:
    # values come from a drawn numpy seed: far cheaper to generate than element-wise draws
    kind = draw(st.sampled_from(["tied", "tied", "random", "random", "one_finite", "two_finite"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "tied":
        values = rng.choice(TIED_VALUES, size=vocab)
        values[rng.integers(vocab)] = rng.choice(TIED_VALUES[1:])
    elif kind == "random":
        values = rng.normal(0.0, 4.0, size=vocab).astype(np.float32)
    else:
        values = np.full(vocab, -INF)
        count = 1 if kind == "one_finite" else 2
        values[rng.choice(vocab, size=count, replace=False)] = rng.choice(TIED_VALUES[1:], count)
    return values.tolist()


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Row], list[torch.Tensor], int]:
    vocab = draw(st.sampled_from([16, 40, 64]))
    ids = st.integers(0, vocab - 1)
    rows = [
        Row(
            draw(sampling_params(vocab)),
            draw(st.integers(-(2**63), 2**63 - 1)),
            draw(st.lists(ids, max_size=6)),
            draw(st.lists(ids, max_size=4)),
        )
        for _ in range(draw(st.integers(1, 5)))
    ]
    steps = [
        torch.tensor([draw(logits_row(vocab)) for _ in rows], dtype=torch.float32)
        for _ in range(draw(st.integers(1, 3)))
    ]
    return vocab, rows, steps, draw(st.sampled_from([(1, 1), (3, 4096), (256, 4096)]))


@SETTINGS
@given(scenarios())
def test_batched_pipeline_matches_reference(scenario) -> None:
    vocab, rows, steps, candidates = scenario
    run_and_compare(vocab, rows, steps, candidates)


def _row(logits: list[float], **params) -> tuple[Row, torch.Tensor]:
    return Row(SamplingParams(**params), seed=1234, prompt=[]), torch.tensor([logits])


def _compare(
    vocab: int, pairs: list[tuple[Row, torch.Tensor]], candidates: tuple[int, int] = (256, 4096)
) -> None:
    rows = [row for row, _ in pairs]
    steps = [torch.cat([logits for _, logits in pairs])]
    assert run_and_compare(vocab, rows, steps, candidates) == len(rows)


def _spread(vocab: int, values: dict[int, float], rest: float) -> list[float]:
    return [values.get(j, rest) for j in range(vocab)]


@pytest.fixture
def fallbacks(monkeypatch) -> dict[str, int]:
    """Counts the rows each fallback level (wider slice, exact sorted row) handles."""
    calls = {"widen": 0, "redo_exact": 0}
    for name in calls:
        original = getattr(Routes, name)

        def spy(routes, step, rows, _name=name, _original=original):
            calls[_name] += len(rows)
            return _original(routes, step, rows)

        monkeypatch.setattr(Routes, name, spy)
    return calls


@pytest.mark.parametrize("wide", [8, 4096])
def test_ties_at_kth_value_past_the_candidate_slice_are_kept(fallbacks, wide: int) -> None:
    # top_k=3 and 150 tokens tied at the 3rd value: far wider than the slice (3 + 16)
    vocab = 256
    logits = _spread(vocab, {5: 5.0, 9: 3.0} | {j: 1.0 for j in range(40, 190)}, 0.0)
    pairs = [_row(logits, top_k=3, temperature=0.9), _row(logits, top_k=3, top_p=0.6)]
    _compare(vocab, pairs, (256, wide))
    assert fallbacks["widen"] and bool(fallbacks["redo_exact"]) == (wide == 8)


@pytest.mark.parametrize("wide", [8, 4096])
def test_open_nucleus_wider_than_the_slice_is_exact(fallbacks, wide: int) -> None:
    vocab = 48
    flat = [0.1 * (j % 7) for j in range(vocab)]
    pairs = [_row(flat, top_p=0.95), _row(flat, min_p=0.5), _row(flat, top_p=0.2)]
    _compare(vocab, pairs, (4, wide))
    assert fallbacks["widen"] and bool(fallbacks["redo_exact"]) == (wide == 8)


@pytest.mark.parametrize("top_p", [0.0, 1.0])
def test_top_p_extremes_keep_tied_maxima(top_p: float) -> None:
    vocab = 16
    logits = _spread(vocab, {3: 2.0, 11: 2.0, 7: 1.0}, -1.0)
    _compare(vocab, [_row(logits, top_p=top_p, temperature=0.5), _row(logits, top_p=top_p)])


def test_min_p_one_keeps_only_the_maxima() -> None:
    vocab = 16
    logits = _spread(vocab, {2: 3.0, 14: 3.0}, 0.0)
    _compare(vocab, [_row(logits, min_p=1.0), _row(logits, min_p=1.0, top_k=4)])


def test_all_but_one_minus_inf() -> None:
    vocab = 16
    logits = _spread(vocab, {6: 0.3}, -INF)
    pairs = [
        _row(logits, top_k=5),
        _row(logits, top_p=0.5),
        _row(logits, min_p=0.2),
        _row(logits, temperature=1.3),
        _row(logits, xtc_probability=1.0, xtc_threshold=0.0),
        _row(logits, temperature=0.0),
    ]
    _compare(vocab, pairs, (3, 6))


@pytest.mark.parametrize(
    "high",
    [
        {},  # 0 tokens above the threshold
        {4: 6.0},  # 1
        {4: 4.0, 9: 4.0},  # 2, tied: the higher id stays
        {4: 3.0, 9: 3.5, 12: 3.2, 13: 3.0, 15: 3.1},  # many
    ],
)
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 0.6])
def test_xtc_removes_all_likely_tokens_but_the_least_likely(high, threshold) -> None:
    vocab = 16
    logits = _spread(vocab, high, 0.0)
    pairs = [
        _row(logits, xtc_probability=1.0, xtc_threshold=threshold),
        _row(logits, xtc_probability=1.0, xtc_threshold=threshold, top_k=6),
        _row(logits, xtc_probability=1.0, xtc_threshold=threshold, min_p=0.01),
    ]
    _compare(vocab, pairs, (4, 8))


def test_penalties_bias_and_bans_with_history() -> None:
    vocab = 16
    logits = _spread(vocab, {1: 5.0, 2: -2.0, 3: 2.0, 4: 1.5}, 0.25)
    row = Row(
        SamplingParams(
            temperature=0.0,
            repetition_penalty=1.5,
            frequency_penalty=0.5,
            presence_penalty=0.25,
            logit_bias={3: 100.0, 9: -100.0},
            min_tokens=5,
            stop_token_ids=(4,),
        ),
        seed=7,
        prompt=[2, 3, 3, 8],
        outputs=[3, 4, 4, 4],
    )
    run_and_compare(vocab, [row], [torch.tensor([logits])] * 3)
