"""Per-row state: seeds are batch-independent, penalty history is incremental, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.sampling.reference_sampler import reference_sample
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

VOCAB = 300
EOS = (2,)
CPU = torch.device("cpu")
PROMPT = [5, 9, 9, 40, 41, 299]
CONFIGS = {
    "temperature": SamplingParams(temperature=0.9),
    "top_k_top_p": SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
    "min_p_xtc": SamplingParams(min_p=0.02, xtc_probability=0.5, xtc_threshold=0.05),
    "xtc_only": SamplingParams(xtc_probability=0.7, xtc_threshold=0.02),
    "penalised": SamplingParams(
        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.6, top_k=50
    ),
    "greedy_penalised": SamplingParams(temperature=0.0, repetition_penalty=1.2, min_tokens=3),
}


def step_logits(step: int, rows: int, salt: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + salt)
    return torch.randn(rows, VOCAB, generator=generator) * 2.5


def run_alone(params: SamplingParams, steps: int) -> list[int]:
    sampler = Sampler(VOCAB, 4, CPU, EOS)
    sampler.add_row(7, params, 99, PROMPT)
    return [sampler.sample(step_logits(s, 1), [7]).token_ids.item() for s in range(steps)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seeded_row_ignores_its_batch(name: str) -> None:
    params, steps = CONFIGS[name], 6
    alone = run_alone(params, steps)
    for order_seed in (0, 1):
        sampler = Sampler(VOCAB, 32, CPU, EOS)
        keys = list(range(100, 116))
        for i, key in enumerate(keys):  # neighbours with every kind of setting
            other = list(CONFIGS.values())[i % len(CONFIGS)]
            sampler.add_row(key, other, 1000 + i, [i, i + 1])
        sampler.add_row(7, params, 99, PROMPT)
        batch = keys + [7]
        got = []
        for s in range(steps):
            order = np.random.default_rng(order_seed * 100 + s).permutation(len(batch))
            logits = step_logits(s, len(batch), salt=order_seed + 1)
            position = int(np.flatnonzero(np.asarray(batch)[order] == 7)[0])
            logits[position] = step_logits(s, 1)[0]
            tokens = sampler.sample(logits, [batch[i] for i in order]).token_ids
            got.append(tokens[position].item())
        assert got == alone


def test_same_seed_same_tokens_different_seed_differs() -> None:
    params = CONFIGS["temperature"]
    assert run_alone(params, 8) == run_alone(params, 8)
    sampler = Sampler(VOCAB, 4, CPU, EOS)
    sampler.add_row(7, params, 100, PROMPT)
    other = [sampler.sample(step_logits(s, 1), [7]).token_ids.item() for s in range(8)]
    assert other != run_alone(params, 8)


def test_penalties_after_many_steps_equal_the_full_history() -> None:
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.5
    )
    sampler = Sampler(VOCAB, 4, CPU, EOS)
    sampler.add_row(1, params, 3, PROMPT, [9, 9])
    sampler.add_row(2, CONFIGS["top_k_top_p"], 4, [1])  # a neighbour with its own history
    outputs = [9, 9]
    for s in range(12):
        # few distinct logits so the penalties make the greedy row repeat and switch tokens
        logits = step_logits(s, 2).round() / 2
        logits[0, :12] += 6.0
        processed = sampler.processed_logits(logits, [1, 2])[0].numpy()
        ref = reference_sample(logits[0].tolist(), params, 3, PROMPT, outputs, EOS)
        np.testing.assert_array_equal(processed, ref.z)
        token = sampler.sample(logits, [1, 2]).token_ids[0].item()
        assert token == ref.token
        outputs.append(token)
    assert len(set(outputs)) > 2 and len(set(outputs)) < len(outputs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_after_preemption_is_exact(name: str) -> None:
    params, steps, cut = CONFIGS[name], 10, 4
    uninterrupted = run_alone(params, steps)
    sampler = Sampler(VOCAB, 4, CPU, EOS)
    sampler.add_row(7, params, 99, PROMPT)
    generated = [sampler.sample(step_logits(s, 1), [7]).token_ids.item() for s in range(cut)]
    sampler.remove_row(7)
    sampler.add_row(8, CONFIGS["penalised"], 5, [3, 4, 5])  # takes the freed slot
    sampler.add_row(7, params, 99, PROMPT, generated)
    for s in range(cut, steps):
        logits = torch.cat([step_logits(s, 1, salt=9), step_logits(s, 1)])
        generated.append(sampler.sample(logits, [8, 7]).token_ids[1].item())
    assert generated == uninterrupted


def test_a_reused_slot_starts_clean() -> None:
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=2.0)
    sampler = Sampler(VOCAB, 1, CPU, EOS)
    sampler.add_row(1, penalised, 0, list(range(50)))
    for s in range(5):
        sampler.sample(step_logits(s, 1), [1])
    sampler.remove_row(1)
    sampler.add_row(2, penalised, 0, [7])
    logits = step_logits(9, 1)
    ref = reference_sample(logits[0].tolist(), penalised, 0, [7], [], EOS)
    np.testing.assert_array_equal(sampler.processed_logits(logits, [2])[0].numpy(), ref.z)


def test_history_grows_past_its_initial_capacity() -> None:
    params = SamplingParams(temperature=0.5, frequency_penalty=0.1, top_k=5)
    sampler = Sampler(VOCAB, 2, CPU, EOS)
    sampler.add_row(1, params, 1, [])
    sampler.add_row(2, SamplingParams(presence_penalty=1.0), 2, list(range(VOCAB)))
    outputs: list[int] = []
    for s in range(40):
        logits = step_logits(s, 2)
        ref = reference_sample(logits[0].tolist(), params, 1, [], outputs, EOS)
        outputs.append(sampler.sample(logits, [1, 2]).token_ids[0].item())
        assert outputs[-1] == ref.token


def test_row_bookkeeping_errors() -> None:
    sampler = Sampler(VOCAB, 1, CPU, EOS)
    sampler.add_row(1, SamplingParams(), 0, [])
    with pytest.raises(ValueError):
        sampler.add_row(1, SamplingParams(), 0, [])
    with pytest.raises(RuntimeError):
        sampler.add_row(2, SamplingParams(), 0, [])
    with pytest.raises(KeyError):
        sampler.sample(step_logits(0, 1), [3])
    with pytest.raises(ValueError):
        sampler.sample(step_logits(0, 2), [1, 1])
    with pytest.raises(ValueError):
        sampler.sample(step_logits(0, 2), [1])
    sampler.remove_row(1)
    sampler.add_row(2, SamplingParams(), 0, [])
