"""Our paged model vs transformers' reference, per architecture: prefill, decode, mixed batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from tests.models.helpers import (
    ARCHITECTURES,
    PagedRunner,
    hf_logits,
    make_hf_model,
    save_hf_model,
)
from tests.tolerances import assert_within, logit_tolerance
from winnow.models import LoadedModel, load_model


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, LoadedModel]:
    hf = make_hf_model(request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_model(str(path), dtype="float32", device="cpu")


def random_tokens(n: int, seed: int, vocab: int = 97) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_prefill_matches_hf(pair: tuple[transformers.PreTrainedModel, LoadedModel]) -> None:
    hf, ours = pair
    tokens = random_tokens(19, seed=1)
    (logits,) = PagedRunner(ours).step([("a", tokens)])
    assert logits.dtype == torch.float32
    assert_within(logits, hf_logits(hf, tokens), logit_tolerance(hf))


def test_decode_steps_match_hf(pair: tuple[transformers.PreTrainedModel, LoadedModel]) -> None:
    hf, ours = pair
    tokens = random_tokens(16, seed=2)
    reference = hf_logits(hf, tokens)
    runner = PagedRunner(ours)
    runner.step([("a", tokens[:9])])
    for pos in range(9, len(tokens)):
        (logits,) = runner.step([("a", [tokens[pos]])])
        assert_within(logits[0], reference[pos], logit_tolerance(hf))


def test_mixed_batch_matches_hf(pair: tuple[transformers.PreTrainedModel, LoadedModel]) -> None:
    """One forward holding decodes, fresh prefills and a chunked prefill over shuffled blocks."""
    hf, ours = pair
    # Per sequence, the token ranges fed in three steps: a warm-up batch of fresh prefills, the
    # mixed batch, then one decode-only batch (the batched fast path) for everybody.
    plan = {
        "decode_long": [(0, 13), (13, 14), (14, 15)],
        "fresh": [None, (0, 7), (7, 8)],
        "chunked": [(0, 6), (6, 17), (17, 18)],
        "decode_short": [(0, 3), (3, 4), (4, 5)],
        "fresh1": [None, (0, 1), (1, 2)],
    }
    seqs = {
        name: random_tokens(steps[-1][1], seed=10 + i)
        for i, (name, steps) in enumerate(plan.items())
    }
    reference = {name: hf_logits(hf, tokens) for name, tokens in seqs.items()}
    runner = PagedRunner(ours, seed=3)
    for step in range(3):
        batch = [(name, steps[step]) for name, steps in plan.items() if steps[step] is not None]
        out = runner.step([(name, seqs[name][a:b]) for name, (a, b) in batch])
        for (name, (a, b)), logits in zip(batch, out, strict=True):
            assert_within(logits, reference[name][a:b], logit_tolerance(hf))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_load_runs(arch: str, tmp_path: Path) -> None:
    hf = make_hf_model(arch)
    ours = load_model(str(save_hf_model(hf, tmp_path)), dtype="bfloat16", device="cpu")
    assert ours.dtype == torch.bfloat16
    assert next(ours.model.parameters()).dtype == torch.bfloat16
    tokens = random_tokens(9, seed=4)
    runner = PagedRunner(ours)
    (logits,) = runner.step([("a", tokens)])
    (step,) = runner.step([("a", [5])])
    assert logits.dtype == torch.float32
    reference = hf_logits(hf, tokens + [5])
    torch.testing.assert_close(logits, reference[:-1], atol=0.2, rtol=0.05)
    torch.testing.assert_close(step[0], reference[-1], atol=0.2, rtol=0.05)
