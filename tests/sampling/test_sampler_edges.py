"""Greedy semantics, stage skipping, min_tokens, logit_bias and non-finite logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

CPU = torch.device("cpu")
VOCAB = 128


def make(rows: list[SamplingParams], vocab: int = VOCAB, eos=(0,)) -> tuple[Sampler, list[int]]:
    sampler = Sampler(vocab, len(rows), CPU, eos_token_ids=eos)
    for key, params in enumerate(rows):
        sampler.add_row(key, params, 1000 + key, prompt_token_ids=[1, 2])
    return sampler, list(range(len(rows)))


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def test_positive_infinity_wins_lowest_id_first() -> None:
    sampler, keys = make(
        [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=4)]
    )
    logits = random_logits(3, 5)
    logits[:, [90, 17, 33]] = math.inf
    assert sampler.sample(logits, keys).token_ids.tolist() == [17, 17, 17]


def test_top_k_one_equals_greedy() -> None:
    rows = [SamplingParams(top_k=1, temperature=t) for t in (0.1, 1.0, 2.0)]
    sampler, keys = make(rows + [SamplingParams(temperature=0.0)])
    for step in range(10):
        logits = random_logits(1, step).expand(4, VOCAB).contiguous()
        tokens = sampler.sample(logits, keys).token_ids
        assert tokens.tolist() == [int(logits[0].argmax())] * 4


def test_temperature_zero_ignores_every_sampling_stage() -> None:
    aggressive = dict(top_k=3, top_p=0.1, min_p=0.9, xtc_probability=1.0, xtc_threshold=0.0)
    sampler, keys = make([SamplingParams(temperature=0.0, **aggressive)])
    for step in range(5):
        logits = random_logits(1, step)
        logits[0, 77] = logits.max() + 1e-3  # a unique argmax XTC would otherwise remove
        assert sampler.sample(logits, keys).token_ids.item() == 77


def test_greedy_ties_go_to_the_lowest_id() -> None:
    sampler, keys = make([SamplingParams(temperature=1e-6)])
    logits = torch.zeros(1, VOCAB)
    logits[0, [90, 40, 60]] = 5.0
    assert sampler.sample(logits, keys).token_ids.item() == 40


class VocabularyOps(TorchDispatchMode):
    """Counts the torch ops (views aside) dispatched on a tensor of at least `size` elements,
    input or output: the whole-row work a step does in torch rather than in one numpy or C
    pass."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.count = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no data moves
            return out
        tensors = [
            t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)
        ]
        self.count += any(t.numel() >= self.size for t in tensors)
        return out


def vocabulary_ops(run, size: int = VOCAB):
    with VocabularyOps(size) as ops:
        result = run()
    return result, ops.count


def test_greedy_only_batch_is_a_plain_argmax() -> None:
    """No torch op touches a vocabulary-sized tensor: the step is one numpy argmax."""
    sampler, keys = make([SamplingParams(temperature=0.0)] * 3)
    logits = random_logits(3, 0)
    out, ops = vocabulary_ops(lambda: sampler.sample(logits, keys))
    assert out.token_ids.tolist() == logits.argmax(1).tolist()
    assert ops == 0


def test_plain_greedy_shortcut_matches_the_pipeline(monkeypatch) -> None:
    """Greedy rows with nothing else to apply skip the pipeline and pick what it picks (ties,
    -inf logits); rows whose maximum is NaN or inf, or a row with more to do, take the pipeline
    (its per-step setup, `Sampler._prepare`, runs)."""
    plain, keys = make([SamplingParams(temperature=0.0)] * 4)
    piped, _ = make([SamplingParams(temperature=0.0, logprobs=True)] * 4)
    prepared: list[int] = []
    prepare = plain._prepare
    monkeypatch.setattr(plain, "_prepare", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    generator = torch.Generator().manual_seed(3)
    for step in range(12):
        logits = torch.randint(0, 3, (4, VOCAB), generator=generator).float()  # many ties
        logits[1, ::3] = -math.inf
        if step >= 8:  # rows with a NaN, a +inf, only -inf
            logits[0, 5], logits[1, 9], logits[2] = math.nan, math.inf, -math.inf
        expected = piped.sample(logits, keys).token_ids.tolist()
        prepared.clear()
        out = plain.sample(logits, keys)
        assert out.token_ids.tolist() == expected
        assert bool(prepared) == (step >= 8)
    plain.remove_row(keys[3])
    plain.add_row(9, SamplingParams(temperature=0.0, repetition_penalty=1.3), 5, [1])
    prepared.clear()
    plain.sample(random_logits(4, 1), keys[:3] + [9])
    assert prepared


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    sampler, keys = make([params], eos=(0, 7))
    logits = torch.zeros(1, VOCAB)
    logits[0, [0, 5, 7]] = torch.tensor([9.0, 8.0, 7.0])
    logits[0, 30] = 1.0
    tokens = [sampler.sample(logits, keys).token_ids.item() for _ in range(5)]
    assert tokens == [30, 30, 30, 0, 0]


def test_logit_bias_is_exactly_additive() -> None:
    params = SamplingParams(temperature=0.0, logit_bias={3: 100.0, 4: -100.0, 5: 0.125})
    sampler, keys = make([params])
    logits = random_logits(1, 1)
    z = sampler.processed_logits(logits, keys)[0]
    assert z[3] == logits[0, 3] + 100.0 and z[4] == logits[0, 4] - 100.0
    assert z[5] == logits[0, 5] + 0.125
    assert sampler.sample(logits, keys).token_ids.item() == 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.2, xtc_probability=1.0),
        SamplingParams(xtc_probability=1.0, xtc_threshold=0.0),
        SamplingParams(repetition_penalty=1.5, logit_bias={3: 1.0}, min_tokens=2),
    ],
    ids=["greedy", "free", "top_k", "top_p", "min_p_xtc", "xtc_zero", "penalised"],
)
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_non_finite_logits_never_raise(params: SamplingParams, mode: str) -> None:
    params = SamplingParams(**{**params.__dict__, "logprobs": True, "top_logprobs": 3})
    params = SamplingParams(**{**params.__dict__, "logprobs_mode": mode})
    sampler, keys = make([params] * 5)
    logits = random_logits(5, 2)
    logits[0] = math.nan  # every logit NaN
    logits[1] = -math.inf  # every logit -inf
    logits[2, ::2] = math.nan  # NaN tokens are never chosen
    logits[3, [17, 33]] = math.inf  # +inf: the largest float32 (XTC / penalties still apply)
    logits[4, :] = -math.inf
    logits[4, [8, 9]] = math.nan
    for _ in range(2):
        out = sampler.sample(logits, keys)
        tokens = out.token_ids.tolist()
        assert tokens[0] == 0 and tokens[1] == 0 and tokens[4] == 0
        assert all(0 <= t < VOCAB for t in tokens)
        if params.xtc_probability == 0 or params.xtc_threshold > 0:
            # (XTC at threshold 0 keeps only the least likely token, which may be a NaN one)
            assert tokens[2] % 2 == 1
            assert tokens[3] in (17, 33)
        for field in (out.logprobs, out.top_logprobs):
            assert field is not None
            assert not np.isnan(field.numpy()).any() and not np.isinf(field.numpy()).any()


def test_vocab_smaller_than_top_logprobs() -> None:
    sampler, keys = make([SamplingParams(logprobs=True, top_logprobs=20)], vocab=8)
    out = sampler.sample(random_logits(1, 0, vocab=8), keys)
    assert out.top_token_ids is not None and out.top_token_ids.shape == (1, 8)
