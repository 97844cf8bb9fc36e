"""The one-call C step for rows whose only stages before the pick are penalties, logit_bias and
the min_tokens ban (gumbel_max.c's winnow_gumbel_step: penalties read from the history tables,
bias and bans from theirs, Gumbel-max over the model's logits, the token recorded): the full
pipeline's picks and history, and the reference sampler's picks, on both ISAs, with rows
reordered and dropped between steps."""

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
EOS, STOP = 1, 2
EXTRA = 1000  # the key of `make`'s extra row
# the output histories hold 17 ids: a ban lasts min_tokens - 17 of the row's steps
EXPIRES = 27  # EDITED[0]'s min_tokens, with a bias that makes EOS win once the ban is over
_rng = np.random.default_rng(4)
# 20 distinct ids with biases that move them up and down
TWENTY = dict(
    zip(
        _rng.choice(VOCAB, 20, replace=False).tolist(),
        _rng.uniform(-6, 6, 20).tolist(),
        strict=True,
    )
)
EDITED = [
    SamplingParams(logit_bias={EOS: 60.0, 8: -100.0, 17: -100.0, 0: 3.0}, min_tokens=EXPIRES),
    SamplingParams(
        temperature=0.7,
        frequency_penalty=1.5,
        presence_penalty=0.3,
        logit_bias={5: 4.0, VOCAB - 2: -2.0, 40: 2.0, 150: 5.0},
        min_tokens=37,
        stop_token_ids=[STOP],
    ),
    SamplingParams(  # its ban is over already
        repetition_penalty=1.3,
        presence_penalty=-0.5,
        logit_bias={VOCAB - 5: 2.5, VOCAB - 2: 1.0, 0: -3.0, EOS: 4.0},
        min_tokens=10,
    ),
    SamplingParams(  # bans on penalised ids
        temperature=1.3, repetition_penalty=0.6, min_tokens=30, stop_token_ids=[5, VOCAB - 2]
    ),
    SamplingParams(frequency_penalty=-1.0, logit_bias=TWENTY),
    SamplingParams(temperature=2.0, repetition_penalty=1.1, logit_bias={VOCAB - 1: 6.0, 3: -1.0}),
    SamplingParams(temperature=0.8, min_tokens=22),  # a ban alone
    SamplingParams(temperature=0.9),  # nothing to apply
]


def histories(key: int) -> tuple[list[int], list[int]]:
    """A prompt and an output with repeats, ids 0 and the tail's among them."""
    rng = np.random.default_rng(key)
    prompt = [0, VOCAB - 1, VOCAB - 5, *rng.integers(0, VOCAB, 30 + 7 * key).tolist(), 0]
    output = [*rng.integers(0, 60, 12).tolist(), VOCAB - 2, VOCAB - 2, 5, 5, 5]
    return prompt, output


def make(seed: int, rows: list[SamplingParams] = PARAMS) -> Sampler:
    """A sampler with `rows` under keys 0, 1, ... and one more row (key EXTRA) with
    temperature 1 only, for `piped_step`."""
    sampler = Sampler(VOCAB, len(rows) + 1, torch.device("cpu"), eos_token_ids=[EOS])
    for key, params in enumerate(rows):
        prompt, output = histories(key)
        sampler.add_row(key, params, seed=seed + key, prompt_token_ids=prompt,
                        output_token_ids=output)  # fmt: skip
    sampler.add_row(EXTRA, SamplingParams(), seed=0, prompt_token_ids=[0])
    return sampler


def piped_step(sampler: Sampler, logits: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """The full pipeline's tokens for `keys`: the extra row joins the batch with a grammar
    bitmask that allows everything, which sends the step through the pipeline that copies every
    row into the work buffer (the other rows' min_tokens bans stay)."""
    vocab = logits.shape[1]
    everything = torch.full((1, words_for(vocab)), -1, dtype=torch.int32)
    masks = TokenMasks(np.array([len(keys)]), everything)
    rows = torch.cat([logits, torch.zeros(1, vocab)])
    return sampler.sample(rows, [*keys, EXTRA], masks).token_ids[:-1]


def counted(monkeypatch: pytest.MonkeyPatch, tables: str = "history") -> list[bool]:
    """Records, per call of the one-call step, whether it had `tables` ("history": penalty
    tables, "edits": logit_bias / min_tokens ban tables)."""
    calls: list[bool] = []
    step = gumbel_max.plain_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get(tables) is not None)
        return step(*args, **kwargs)

    monkeypatch.setattr(gumbel_max, "plain_step", spy)
    return calls


def logits_for(keys: list[int], step: int, seen: dict[int, list[int]], generator) -> torch.Tensor:
    """LM-like rows whose strongest tokens are the rows' history (prompt and output, so
    penalised tokens win and lose), EOS and STOP (so bans matter) and as many others, with NaN
    and +inf on some steps, on history tokens too."""
    logits = torch.randn(len(keys), VOCAB, generator=generator) * (0.5 + step % 3)
    logits[:, [EOS, STOP]] += 6.0
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
@pytest.mark.parametrize("rows", ["penalties", "bias and bans"])
def test_picks_and_history_match_the_pipeline(isa, threads: int, rows: str, monkeypatch) -> None:
    """The pipeline on the same rows (it copies every row and applies stages 1-2 in C), and the
    sampler without the C kernels (torch's stages and noise, as on a CPU without AVX2): same
    tokens step after step, with rows reordered and left out, and the same history tables.
    "bias and bans": logit_bias (+-100 too) on penalised tokens and others, on NaN and +inf
    logits and on a banned id, min_tokens bans on penalised ids, over and expiring mid-run."""
    params = PARAMS if rows == "penalties" else EDITED
    calls = counted(monkeypatch, "history" if rows == "penalties" else "edits")
    seed = -(2**62) + 10 * threads  # both halves of the seeds matter
    plain, piped, torch_only = make(seed, params), make(seed, params), make(seed, params)
    torch_only._routes.fused_cpu, torch_only._routes.mix_table = False, None
    plain._work.fill_(math.nan)  # the pipeline's work buffer: the step leaves it alone
    generator = torch.Generator().manual_seed(threads)
    order = np.random.default_rng(threads)
    seen = {key: sum(histories(key), []) for key in range(len(params))}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    won = 0
    try:
        for step in range(40):
            keys = order.permutation(len(params))[: len(params) - step % 3].tolist()
            logits = logits_for(keys, step, seen, generator)
            expected = piped_step(piped, logits, keys)
            tokens = plain.sample(logits, keys).token_ids
            assert torch.equal(tokens, expected), step
            assert torch.equal(torch_only.sample(logits, keys).token_ids, expected), step
            for key, token in zip(keys, tokens.tolist(), strict=True):
                won += token in seen[key]
                seen[key].append(token)
    finally:
        torch.set_num_threads(previous)
    assert calls.count(True) == 40 and won >= 80  # the step ran; penalised tokens won often
    assert plain._work.isnan().all()
    if rows == "bias and bans":  # EOS is banned, then wins by its bias
        picks = seen[0][len(sum(histories(0), [])) :]
        expiry = EXPIRES - len(histories(0)[1])
        assert EOS not in picks[:expiry] and picks[expiry:].count(EOS) >= len(picks[expiry:]) // 2
    for other in (piped._history, torch_only._history):
        for mine, theirs in (
            (plain._history.output, other.output),
            (plain._history.counts, other.counts),
        ):
            assert np.array_equal(mine.lengths, theirs.lengths)
            width = int(mine.lengths.max())
            assert torch.equal(mine.data[:, :width], theirs.data[:, :width])


@pytest.mark.parametrize("rows", ["penalties", "bias and bans"])
def test_picks_match_the_reference_sampler(isa, rows: str, monkeypatch) -> None:
    """docs/sampling.md read naively, one row at a time: penalties in float32, then logit_bias
    and the min_tokens ban (expiring on the way for two rows), then the Gumbel-max pick (rows
    whose history ties or straddles nothing float-sensitive)."""
    params = PARAMS if rows == "penalties" else EDITED
    calls = counted(monkeypatch, "history" if rows == "penalties" else "edits")
    sampler = make(2**62 + 77, params)
    keys = list(range(len(params)))
    generator = torch.Generator().manual_seed(8)
    prompts = {key: histories(key)[0] for key in keys}
    outputs = {key: histories(key)[1] for key in keys}
    for step in range(12):
        seen = {key: prompts[key] + outputs[key] for key in keys}
        logits = logits_for(keys, step, seen, generator)
        tokens = sampler.sample(logits, keys).token_ids.tolist()
        clean = logits.nan_to_num(nan=-math.inf, posinf=torch.finfo(torch.float32).max)
        for key, token in zip(keys, tokens, strict=True):
            seed = 2**62 + 77 + key
            with np.errstate(over="ignore"):  # float32 max / T < 1 is +inf there too
                ref = reference_sample(clean[key].tolist(), params[key], seed, prompts[key],
                                       outputs[key], [EOS])  # fmt: skip
            assert token == ref.token, (step, key)
            outputs[key].append(token)
    assert calls == [True] * 12


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


def test_ties_with_a_biased_penalised_token(isa) -> None:
    """Scores tied bit for bit between a penalised, biased token and another, the penalised one
    at the lower id, at the higher id, and both penalised and biased (listed high id first): the
    lowest id wins each time, so a value off by one rounding either way (the bias added before
    the presence penalty, say) changes a pick."""
    vocab, low, high = 1031, 300, 900
    z, presence = np.float32(16.0), np.float32(0.5)
    # a bias for which the order of the two float32 operations matters here
    bias = next(
        b
        for b in np.linspace(0.1, 0.4, 31, dtype=np.float32)
        if (z - presence) + b != (z + b) - presence
    )
    rows = [[low], [high], [high, low]]  # each row's penalised and biased ids
    sampler = Sampler(vocab, len(rows), torch.device("cpu"), eos_token_ids=[1])
    logits = torch.full((len(rows), vocab), -math.inf)

    def score(logit: np.float32, edited: bool, a: np.float32) -> np.float32:
        return ((logit - presence) + bias if edited else logit) - a

    for key, output in enumerate(rows):
        bias_ids = dict.fromkeys(output, float(bias))
        params = SamplingParams(presence_penalty=float(presence), logit_bias=bias_ids)
        sampler.add_row(key, params, seed=key, prompt_token_ids=[2], output_token_ids=output)
        row_key = noise.row_keys(
            torch.tensor(key), torch.tensor(1 + len(output)), noise.GUMBEL_STREAM
        )
        bits = noise.hash_bits(row_key, noise.token_mix(torch.tensor([low, high])))
        a = dict(zip((low, high), gumbel_max.noise_floats(bits).numpy(), strict=True))
        edited, other = output[-1], low + high - output[-1]
        target = score(z, True, a[edited])
        # the other token's logit: a float near the guess whose score is exactly `target`
        both = other in output
        guess = target + a[other] + (presence - bias if both else np.float32(0))
        near, up, down = [guess], guess, guess
        for _ in range(64):
            up, down = np.nextafter(up, np.inf), np.nextafter(down, -np.inf)
            near += [up, down]
        logits[key, edited] = float(z)
        logits[key, other] = float(next(c for c in near if score(c, both, a[other]) == target))
    assert sampler.sample(logits, [0, 1, 2]).token_ids.tolist() == [low, low, low]


@pytest.mark.parametrize("vocab", [7, 16, 1025])
def test_small_and_block_edge_vocabularies(isa, vocab: int, monkeypatch) -> None:
    """No full 16-token block, exactly one, one past a word of blocks: the pipeline's picks, for
    penalised rows and a row that also has a bias (on the last id and a banned one) and a ban
    that expires half way, one step with nothing but its banned ids finite."""
    calls = counted(monkeypatch)
    rng = np.random.default_rng(vocab)
    rows = [(rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 6).tolist()) for _ in "abc"]
    edits = dict(logit_bias={vocab - 1: 2.0, int(rng.integers(1, vocab - 1)): -1.5, 0: 1.0},
                 min_tokens=6 + 15, stop_token_ids=[vocab - 1])  # fmt: skip

    def make_small() -> Sampler:
        sampler = Sampler(vocab, 4, torch.device("cpu"), eos_token_ids=[0])
        for key, (prompt, output) in enumerate(rows):
            penalties = dict(frequency_penalty=-1.5 + 2 * key, repetition_penalty=1.4 - 0.6 * key)
            params = (
                SamplingParams(temperature=0.6 + key, presence_penalty=0.5, **penalties)
                if key < 2
                else SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, **edits)
            )
            sampler.add_row(key, params, seed=99 * key, prompt_token_ids=prompt,
                            output_token_ids=output)  # fmt: skip
        sampler.add_row(EXTRA, SamplingParams(), seed=0, prompt_token_ids=[0])
        return sampler

    plain, piped = make_small(), make_small()
    generator = torch.Generator().manual_seed(vocab)
    for step in range(30):
        logits = torch.randn(3, vocab, generator=generator) * 3
        keys = [step % 2, 2, 1 - step % 2]
        if step == 7:
            logits[1] = -math.inf
            logits[1, [0, vocab - 1]] = 5.0
        expected = piped_step(piped, logits, keys)
        assert torch.equal(plain.sample(logits, keys).token_ids, expected), step
    assert calls.count(True) == 30
