"""The one-call C step for rows whose only stage before the pick is a penalty (gumbel_max.c's
winnow_gumbel_step: penalties read from the history tables, Gumbel-max over the model's logits,
the token recorded): the full pipeline's picks and history, and the reference sampler's picks,
on both ISAs, with rows reordered and dropped between steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.sampling.reference_sampler import reference_sample
from winnow.kernels.cpu import gumbel_max, row_stats
from winnow.sampling import noise
from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

pytestmark = pytest.mark.skipif(
    not (gumbel_max.available() and row_stats.available()), reason="no C sampler kernels here"
)

VOCAB = 5003  # not a multiple of 16: the patched ids include the scalar tail's
PARAMS = [
    SamplingParams(frequency_penalty=0.2, presence_penalty=0.1),
    SamplingParams(temperature=0.7, frequency_penalty=1.5),
    SamplingParams(temperature=1.3, presence_penalty=-2.0),  # history tokens win often
    SamplingParams(frequency_penalty=-1.0, presence_penalty=0.5),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4),
    SamplingParams(temperature=0.9, repetition_penalty=0.6),  # raises positive logits
    SamplingParams(temperature=2.0, repetition_penalty=1.1, presence_penalty=-1.0),
    SamplingParams(temperature=0.8),  # no penalty: its slot's history is not read
]


def histories(key: int) -> tuple[list[int], list[int]]:
    """A prompt and an output with repeats, ids 0 and the tail's among them."""
    rng = np.random.default_rng(key)
    prompt = [0, VOCAB - 1, VOCAB - 5, *rng.integers(0, VOCAB, 30 + 7 * key).tolist(), 0]
    output = [*rng.integers(0, 60, 12).tolist(), VOCAB - 2, VOCAB - 2, 5, 5, 5]
    return prompt, output


def make(seed: int) -> Sampler:
    sampler = Sampler(VOCAB, len(PARAMS), torch.device("cpu"), eos_token_ids=[1])
    for key, params in enumerate(PARAMS):
        prompt, output = histories(key)
        sampler.add_row(key, params, seed=seed + key, prompt_token_ids=prompt,
                        output_token_ids=output)  # fmt: skip
    return sampler


def counted(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call of the one-call step, whether it had penalty tables."""
    calls: list[bool] = []
    step = gumbel_max.plain_step

    def spy(*args, **kwargs):
        calls.append((args[5] if len(args) > 5 else kwargs.get("history")) is not None)
        return step(*args, **kwargs)

    monkeypatch.setattr(gumbel_max, "plain_step", spy)
    return calls


def logits_for(keys: list[int], step: int, seen: dict[int, list[int]], generator) -> torch.Tensor:
    """LM-like rows whose strongest tokens are the rows' history (prompt and output, so
    penalised tokens win and lose) and as many others, with NaN and +inf on some steps, on
    history tokens too."""
    logits = torch.randn(len(keys), VOCAB, generator=generator) * (0.5 + step % 3)
    for row, key in enumerate(keys):
        ids = torch.tensor(seen[key])
        ids = torch.cat([ids, torch.randint(0, VOCAB, ids.shape, generator=generator)])
        logits[row, ids] += 3.0 + torch.rand(len(ids), generator=generator) * 4
    if step % 5 == 2:
        logits[0, seen[keys[0]][-1]] = math.nan
        logits[-1, seen[keys[-1]][-1]] = math.inf
        logits[len(keys) // 2, 17] = math.inf
        logits[1, 100:200] = math.nan
    return logits


@pytest.mark.parametrize("threads", [1, 3])
def test_picks_and_history_match_the_pipeline(isa, threads: int, monkeypatch) -> None:
    """The pipeline runs on the same rows when a grammar bitmask that allows everything is in
    the step (it copies every row and applies the penalties in C), and without the C kernels
    (torch's penalties and noise, as on a CPU without AVX2): same tokens step after step, with
    rows reordered and left out, and the same history tables."""
    calls = counted(monkeypatch)
    seed = -(2**62) + 10 * threads  # both halves of the seeds matter
    plain, piped, torch_only = make(seed), make(seed), make(seed)
    torch_only._routes.fused_cpu, torch_only._routes.mix_table = False, None
    everything = torch.full((1, words_for(VOCAB)), -1, dtype=torch.int32)
    generator = torch.Generator().manual_seed(threads)
    order = np.random.default_rng(threads)
    seen = {key: sum(histories(key), []) for key in range(len(PARAMS))}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    won = 0
    try:
        for step in range(40):
            keys = order.permutation(len(PARAMS))[: len(PARAMS) - step % 3].tolist()
            logits = logits_for(keys, step, seen, generator)
            masks = TokenMasks(np.array([0]), everything)
            expected = piped.sample(logits, keys, masks).token_ids
            tokens = plain.sample(logits, keys).token_ids
            assert torch.equal(tokens, expected), step
            assert torch.equal(torch_only.sample(logits, keys).token_ids, expected), step
            for key, token in zip(keys, tokens.tolist(), strict=True):
                won += token in seen[key]
                seen[key].append(token)
    finally:
        torch.set_num_threads(previous)
    assert calls.count(True) == 40 and won >= 80  # the step ran; penalised tokens won often
    for other in (piped._history, torch_only._history):
        for mine, theirs in (
            (plain._history.output, other.output),
            (plain._history.counts, other.counts),
        ):
            assert np.array_equal(mine.lengths, theirs.lengths)
            width = int(mine.lengths.max())
            assert torch.equal(mine.data[:, :width], theirs.data[:, :width])


def test_picks_match_the_reference_sampler(isa, monkeypatch) -> None:
    """docs/sampling.md read naively, one row at a time: penalties in float32, then the
    Gumbel-max pick (rows whose history ties or straddles nothing float-sensitive)."""
    calls = counted(monkeypatch)
    sampler = make(2**62 + 77)
    keys = list(range(len(PARAMS)))
    generator = torch.Generator().manual_seed(8)
    prompts = {key: histories(key)[0] for key in keys}
    outputs = {key: histories(key)[1] for key in keys}
    for step in range(6):
        seen = {key: prompts[key] + outputs[key] for key in keys}
        logits = logits_for(keys, step, seen, generator)
        tokens = sampler.sample(logits, keys).token_ids.tolist()
        clean = logits.nan_to_num(nan=-math.inf, posinf=torch.finfo(torch.float32).max)
        for key, token in zip(keys, tokens, strict=True):
            seed = 2**62 + 77 + key
            with np.errstate(over="ignore"):  # float32 max / T < 1 is +inf there too
                ref = reference_sample(clean[key].tolist(), PARAMS[key], seed, prompts[key],
                                       outputs[key], [1])  # fmt: skip
            assert token == ref.token, (step, key)
            outputs[key].append(token)
    assert calls == [True] * 6


def test_exact_ties_go_to_the_lowest_id(isa) -> None:
    """Scores tied bit for bit (built from the noise values) between a penalised token and an
    untouched one, either id lower, and between two penalised tokens listed high id first: the
    lowest id wins, whichever way the ids are held."""
    vocab, low, high, presence = 1031, 300, 900, np.float32(0.5)
    outputs = [[low], [high], [high, low]]  # the penalised ids of each row
    sampler = Sampler(vocab, 3, torch.device("cpu"), eos_token_ids=[1])
    logits = torch.full((3, vocab), -math.inf)
    for key, output in enumerate(outputs):
        sampler.add_row(key, SamplingParams(presence_penalty=float(presence)), seed=key,
                        prompt_token_ids=[2], output_token_ids=output)  # fmt: skip
        row_key = noise.row_keys(
            torch.tensor(key), torch.tensor(1 + len(output)), noise.GUMBEL_STREAM
        )
        bits = noise.hash_bits(row_key, noise.token_mix(torch.tensor([low, high])))
        a_low, a_high = gumbel_max.noise_floats(bits).numpy()
        score = np.float32(10.0) - presence - a_low if low in output else np.float32(10.0) - a_low
        # the other token's logit: the float whose score (penalised or not) is exactly `score`
        shift = presence if high in output else np.float32(0.0)
        z = np.float32(score + a_high + shift)
        candidates = [z, *(np.nextafter(z, d, dtype=np.float32) for d in (np.inf, -np.inf))]
        z = next(c for c in candidates if (c - shift) - a_high == score)
        logits[key, low] = 10.0
        logits[key, high] = float(z)
    assert sampler.sample(logits, [0, 1, 2]).token_ids.tolist() == [low, low, low]


@pytest.mark.parametrize("vocab", [7, 16, 1025])
def test_small_and_block_edge_vocabularies(isa, vocab: int, monkeypatch) -> None:
    """No full 16-token block, exactly one, one past a word of blocks: the pipeline's picks."""
    calls = counted(monkeypatch)
    rng = np.random.default_rng(vocab)
    rows = [(rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 6).tolist()) for _ in "ab"]

    def make_small() -> Sampler:
        sampler = Sampler(vocab, 2, torch.device("cpu"), eos_token_ids=[0])
        for key, (prompt, output) in enumerate(rows):
            penalties = dict(frequency_penalty=-1.5 + 2 * key, repetition_penalty=1.4 - 0.6 * key)
            params = SamplingParams(temperature=0.6 + key, presence_penalty=0.5, **penalties)
            sampler.add_row(key, params, seed=99 * key, prompt_token_ids=prompt,
                            output_token_ids=output)  # fmt: skip
        return sampler

    plain, piped = make_small(), make_small()
    everything = TokenMasks(np.array([0]), torch.full((1, words_for(vocab)), -1, dtype=torch.int32))
    generator = torch.Generator().manual_seed(vocab)
    for step in range(30):
        logits = torch.randn(2, vocab, generator=generator) * 3
        keys = [step % 2, 1 - step % 2]
        expected = piped.sample(logits, keys, everything).token_ids
        assert torch.equal(plain.sample(logits, keys).token_ids, expected), step
    assert calls.count(True) == 30
