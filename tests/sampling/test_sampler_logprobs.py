"""Logprobs: raw = the model's log_softmax, processed = after everything, top-k ties -> lower id."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.sampling.reference_sampler import reference_sample
from winnow.kernels.cpu import row_stats
from winnow.limits import LOGPROB_FLOOR
from winnow.sampling.logprob_ops import floor_logprobs
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

CPU = torch.device("cpu")
VOCAB = 200


def make(rows: list[SamplingParams], vocab: int = VOCAB, **kwargs) -> tuple[Sampler, list[int]]:
    sampler = Sampler(vocab, len(rows), CPU, eos_token_ids=[0], **kwargs)
    for key, params in enumerate(rows):
        sampler.add_row(key, params, 50 + key, prompt_token_ids=[3, 4, 4])
    return sampler, list(range(len(rows)))


def logits_for(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_raw_logprobs_are_the_model_log_softmax() -> None:
    rows = [
        SamplingParams(logprobs=True, top_logprobs=5),
        SamplingParams(
            logprobs=True,
            top_logprobs=3,
            temperature=0.4,
            top_k=7,
            repetition_penalty=1.5,
            logit_bias={11: 100.0},
        ),
        SamplingParams(logprobs=True, temperature=0.0, presence_penalty=2.0, top_logprobs=1),
    ]
    sampler, keys = make(rows)
    for step in range(3):
        logits = logits_for(3, seed=step)
        out = sampler.sample(logits, keys)
        expected = torch.log_softmax(logits, dim=1)
        assert out.logprobs is not None and out.top_token_ids is not None
        assert out.top_logprobs is not None
        chosen = expected.gather(1, out.token_ids[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs, chosen, atol=1e-5, rtol=0)
        top_values, top_ids = expected.topk(5, dim=1)
        for row, width in enumerate([5, 3, 1]):  # each row gets its own top_logprobs
            assert torch.equal(out.top_token_ids[row, :width], top_ids[row, :width])
            assert (out.top_token_ids[row, width:] == -1).all()
            torch.testing.assert_close(
                out.top_logprobs[row, :width], top_values[row, :width], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("vocab", [20, 5000])
def test_top_logprobs_ties_go_to_the_lower_id(vocab: int) -> None:
    # half the vocabulary tied at the k-th value: topk alone would pick arbitrary ids
    logits = torch.zeros(1, vocab)
    logits[0, 1::2] = 0.5
    logits[0, vocab - 2] = 2.0
    logits[0, vocab // 2] = 1.0
    sampler, keys = make([SamplingParams(logprobs=True, top_logprobs=6)], vocab)
    out = sampler.sample(logits, keys)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids[0].tolist() == [vocab - 2, vocab // 2, 1, 3, 5, 7]
    values = out.top_logprobs[0]
    assert torch.all(values[:-1] >= values[1:])


def test_processed_logprobs_floor_removed_tokens() -> None:
    params = SamplingParams(
        logprobs=True, top_logprobs=6, logprobs_mode="processed", top_k=3, temperature=0.5
    )
    sampler, keys = make([params])
    logits = logits_for(1, seed=3)
    ref = reference_sample(logits[0].tolist(), params, 50, [3, 4, 4], [], [0])
    out = sampler.sample(logits, keys)
    assert ref.keep is not None and ref.y is not None
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.logprobs is not None
    y = torch.from_numpy(np.where(ref.keep, ref.y, -np.inf))
    expected = torch.log_softmax(y, 0)
    survivors = torch.argsort(-y)[:3].tolist()
    removed = [j for j in range(VOCAB) if j not in survivors][:3]
    assert out.top_token_ids[0].tolist() == survivors + removed
    torch.testing.assert_close(out.top_logprobs[0, :3], expected[survivors], atol=1e-5, rtol=0)
    assert out.top_logprobs[0, 3:].tolist() == [LOGPROB_FLOOR] * 3
    assert out.token_ids[0].item() in survivors
    torch.testing.assert_close(out.logprobs[0], expected[out.token_ids[0]], atol=1e-5, rtol=0)


def test_processed_logprobs_of_greedy_and_free_rows() -> None:
    greedy = SamplingParams(
        temperature=0.0,
        logprobs=True,
        logprobs_mode="processed",
        top_logprobs=2,
        repetition_penalty=2.0,
        logit_bias={9: -5.0},
    )
    free = SamplingParams(temperature=1.5, logprobs=True, logprobs_mode="processed")
    raw = SamplingParams(temperature=1.5, logprobs=True)
    sampler, keys = make([greedy, free, raw])
    logits = logits_for(3, seed=4)
    z = torch.from_numpy(reference_sample(logits[0].tolist(), greedy, 50, [3, 4, 4], [], [0]).z)
    out = sampler.sample(logits, keys)
    assert out.logprobs is not None and out.top_token_ids is not None
    expected_greedy = torch.log_softmax(z, 0)  # greedy rows: after penalties/bias/bans, T=1
    assert out.token_ids[0].item() == int(torch.argmax(z))
    torch.testing.assert_close(out.logprobs[0], expected_greedy.max(), atol=1e-5, rtol=0)
    assert out.top_token_ids[0].tolist() == expected_greedy.topk(2).indices.tolist()
    expected_free = torch.log_softmax(logits[1] / 1.5, 0)[out.token_ids[1]]
    torch.testing.assert_close(out.logprobs[1], expected_free, atol=1e-5, rtol=0)
    expected_raw = torch.log_softmax(logits[2], 0)[out.token_ids[2]]
    torch.testing.assert_close(out.logprobs[2], expected_raw, atol=1e-5, rtol=0)
    assert out.top_token_ids[1:].tolist() == [[-1, -1], [-1, -1]]  # they asked for none
    assert out.top_logprobs is not None and torch.isnan(out.top_logprobs[1:]).all()


def test_processed_logprobs_of_a_redone_row() -> None:
    # ties at the k-th value past the candidate slice send the row down the exact path
    vocab = 64
    logits = torch.zeros(1, vocab)
    logits[0, 5], logits[0, 20:60] = 3.0, 1.0
    params = SamplingParams(logprobs=True, logprobs_mode="processed", top_k=2, top_logprobs=3)
    sampler, keys = make([params], vocab)
    out = sampler.sample(logits, keys)
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.top_logprobs is not None
    kept = torch.where(logits[0] >= 1.0, logits[0], -torch.inf)
    expected = torch.log_softmax(kept, 0)
    torch.testing.assert_close(out.logprobs[0], expected[out.token_ids[0]], atol=1e-5, rtol=0)
    assert out.top_token_ids[0].tolist() == [5, 20, 21]
    torch.testing.assert_close(out.top_logprobs[0], expected[[5, 20, 21]], atol=1e-5, rtol=0)


def test_no_logprob_fields_when_nobody_asks_and_k_zero_when_only_sampled() -> None:
    sampler, keys = make([SamplingParams(), SamplingParams(temperature=0.0)])
    out = sampler.sample(logits_for(2), keys)
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    sampler, keys = make([SamplingParams(logprobs=True), SamplingParams()])
    out = sampler.sample(logits_for(2), keys)
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.top_token_ids.shape == (2, 0)
    assert torch.isfinite(out.logprobs[0]) and torch.isnan(out.logprobs[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    rows = [
        SamplingParams(logprobs=True, top_logprobs=2, top_k=10),
        SamplingParams(temperature=0.0, logprobs=True, logprobs_mode="processed"),
    ]
    sampler, keys = make(rows)
    logits = logits_for(2).to(dtype)
    out = sampler.sample(logits, keys)
    assert out.logprobs is not None
    expected = torch.log_softmax(logits.float()[0], 0)[out.token_ids[0]]
    torch.testing.assert_close(out.logprobs[0], expected, atol=1e-5, rtol=0)
    assert out.token_ids[1].item() == int(torch.argmax(logits[1].float()))


def _mixed_rows(top_logprobs: int) -> list[SamplingParams]:
    """Processed-logprob rows of every route (greedy, free, free with XTC, top_k, top_p, min_p,
    XTC on a slice; some with fewer survivors than top_logprobs) and one raw row."""
    processed = dict(logprobs=True, top_logprobs=top_logprobs, logprobs_mode="processed")
    xtc = dict(xtc_probability=1.0, xtc_threshold=0.1)
    return [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, **processed),
        SamplingParams(temperature=1.3, **processed),
        SamplingParams(temperature=0.7, top_k=3, **processed),
        SamplingParams(temperature=0.8, top_p=0.9, **processed),
        SamplingParams(min_p=0.1, **processed),
        SamplingParams(top_k=40, xtc_probability=1.0, xtc_threshold=0.05, **processed),
        SamplingParams(top_p=0.6, **xtc, **processed),
        SamplingParams(temperature=0.5, top_k=10, logprobs=True, top_logprobs=top_logprobs),
        SamplingParams(temperature=0.5, top_p=0.3, frequency_penalty=0.5, **processed),
        SamplingParams(temperature=1.1, **xtc, **processed),
        SamplingParams(temperature=1.2, top_p=0.95, **processed),
        SamplingParams(temperature=1.5, top_p=0.995, **processed),
    ]


def _counted(run: Callable, name: str, calls: list[str]) -> Callable:
    def counted(*args):
        calls.append(name)
        return run(*args)

    return counted


@pytest.mark.parametrize("top_logprobs", [0, 1, 5, 20])
@pytest.mark.parametrize("candidates", [(256, 4096), (4, 8)], ids=["default", "narrow"])
def test_processed_logprobs_of_every_route_are_those_of_its_dense_rows(
    isa, top_logprobs: int, candidates: tuple[int, int]
) -> None:
    """Thresholded rows take their processed logprobs from the candidate slice; each row's
    values are, bit for bit, row_logprobs over its dense processed row (`processed_logits`:
    survivors at y, every other token -inf), whatever its route, in a batch of all routes.
    The wide top_p rows take widen, and with (4, 8) candidates redo_exact too. vocab 1003
    with its last ids strong: survivors among the last vocab % 8, where row_mass takes expf."""
    vocab = 1003
    rows = _mixed_rows(top_logprobs)
    open_candidates, wide_candidates = candidates
    sampler, keys = make(
        rows, vocab, open_candidates=open_candidates, wide_candidates=wide_candidates
    )
    fallbacks: list[str] = []  # each fallback the steps take, by name
    for name in ("widen", "redo_exact"):
        run = getattr(sampler._routes, name)
        setattr(sampler._routes, name, _counted(run, name, fallbacks))
    processed = torch.tensor([params.logprobs_mode == "processed" for params in rows])
    for step in range(3):
        logits = logits_for(len(rows), vocab, seed=20 + step)
        logits[:, vocab - 4 :] += 6.0
        dense = sampler.processed_logits(logits, keys)
        out = sampler.sample(logits, keys)
        assert out.logprobs is not None and out.top_token_ids is not None
        assert out.top_logprobs is not None and out.top_token_ids.shape == (len(rows), top_logprobs)
        lse, values, ids = row_stats.row_logprobs(dense, top_logprobs)
        chosen = dense.gather(1, out.token_ids[:, None])[:, 0]
        assert torch.equal(out.logprobs[processed], floor_logprobs(chosen - lse)[processed])
        assert torch.equal(out.top_token_ids[processed], ids[processed])
        top = floor_logprobs(values - lse[:, None])
        assert torch.equal(out.top_logprobs[processed], top[processed])
        survivors = torch.isfinite(dense).sum(1)
        for row in np.flatnonzero(processed.numpy() & (survivors < top_logprobs).numpy()):
            past = int(survivors[row])  # the lowest removed ids, at the floor
            removed = torch.isneginf(dense[row]).nonzero()[:, 0][: top_logprobs - past]
            assert torch.equal(out.top_token_ids[row, past:], removed)
            assert (out.top_logprobs[row, past:] == LOGPROB_FLOOR).all()
        expected_raw = torch.log_softmax(logits[7], 0)[out.token_ids[7]]
        torch.testing.assert_close(out.logprobs[7], expected_raw, atol=1e-5, rtol=0)
    assert (survivors[processed] < 5).any()  # some row has fewer survivors than asked for
    assert "widen" in fallbacks  # the top_p 0.95 / 0.995 rows overflow their first slice
    assert ("redo_exact" in fallbacks) == (wide_candidates == 8)


def test_processed_logprobs_of_free_rows_with_xtc() -> None:
    """Free rows with XTC (with threshold 0 in the batch: a whole-row mask, written into y as
    -inf for the logprobs) against the naive reference's survivors; threshold 0 leaves one."""
    rows = [
        SamplingParams(
            temperature=1.1,
            xtc_probability=1.0,
            xtc_threshold=threshold,
            logprobs=True,
            top_logprobs=3,
            logprobs_mode="processed",
        )
        for threshold in (0.0, 0.1)
    ]
    sampler, keys = make(rows)
    logits = logits_for(2, seed=5)
    out = sampler.sample(logits, keys)
    assert out.logprobs is not None and out.top_token_ids is not None
    assert out.top_logprobs is not None
    for row, params in enumerate(rows):
        ref = reference_sample(logits[row].tolist(), params, 50 + row, [3, 4, 4], [], [0])
        assert ref.keep is not None and ref.y is not None
        expected = torch.log_softmax(torch.from_numpy(np.where(ref.keep, ref.y, -np.inf)), 0)
        assert out.token_ids[row].item() == ref.token
        torch.testing.assert_close(out.logprobs[row], expected[ref.token], atol=1e-5, rtol=0)
        top = sorted(range(VOCAB), key=lambda j: (-expected[j].item(), j))[:3]
        assert out.top_token_ids[row].tolist() == top
        torch.testing.assert_close(
            out.top_logprobs[row], floor_logprobs(expected[top]).float(), atol=1e-5, rtol=0
        )
    assert int((out.top_logprobs[0] > LOGPROB_FLOOR).sum()) == 1
