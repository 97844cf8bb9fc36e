"""The engine on the demo model, in-process: outputs do not depend on how work was scheduled."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.engine.helpers import run_all
from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest, RequestRejected
from winnow.models import LoadedModel, load_model
from winnow.sampling.params import SamplingParams

SHARED_PREFIX = list(range(1000, 1100))  # 100 tokens = 6 full blocks of 16


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def make_engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    config = EngineConfig(model="demo", max_num_seqs=16, max_num_batched_tokens=256)
    return LLMEngine(loaded, replace(config, **overrides))


def workload(count: int = 8) -> list[GenerationRequest]:
    """Seeded sampled requests sharing a long prefix, with different tails and lengths."""
    return [
        GenerationRequest(
            f"req-{i}",
            SHARED_PREFIX + [2000 + i] * (i + 1),
            SamplingParams(temperature=1.0, seed=100 + i, max_tokens=24 + i, ignore_eos=True),
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def reference(loaded: LoadedModel) -> dict[str, list[int]]:
    """Large pool, no prefix cache, whole prompts in one step."""
    return run_all(make_engine(loaded, enable_prefix_caching=False), workload())


def test_reference_run_generates_every_token(reference: dict[str, list[int]]) -> None:
    assert [len(t) for t in reference.values()] == [24 + i for i in range(8)]


def test_tiny_kv_pool_preempts_and_outputs_are_identical(
    loaded: LoadedModel, reference: dict[str, list[int]]
) -> None:
    engine = make_engine(loaded, num_kv_blocks=30, enable_prefix_caching=False)
    assert run_all(engine, workload()) == reference
    stats = engine.stats()
    assert stats.preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0


def test_chunked_prefill_gives_identical_outputs(
    loaded: LoadedModel, reference: dict[str, list[int]]
) -> None:
    engine = make_engine(loaded, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert run_all(engine, workload()) == reference


def test_prefix_cache_hits_and_outputs_are_identical(
    loaded: LoadedModel, reference: dict[str, list[int]]
) -> None:
    engine = make_engine(loaded)
    first, *rest = workload()
    outputs = run_all(engine, [first])
    engine.add_request(rest[0])
    cached = []
    while engine.has_work:
        for output in engine.step():
            cached.append(output.cached_tokens)
            outputs.setdefault(output.request_id, []).extend(output.choices[0].token_ids)
    assert cached and all(c == 96 for c in cached)  # 6 full blocks of the shared prefix
    outputs.update(run_all(engine, rest[1:]))
    assert outputs == reference


def test_half_precision_kv_cache(loaded: LoadedModel) -> None:
    """--kv-cache-dtype float16 on the fp32 demo model: the same memory holds twice the blocks,
    and a preempting, chunking run gives the tokens of a roomy one (the recomputed keys and
    values round to the same cache entries)."""
    budget = {"kv_cache_memory_gib": 0.002, "enable_prefix_caching": False}
    full = make_engine(loaded, **budget).stats().kv_blocks_total
    half = make_engine(loaded, kv_cache_dtype="float16", **budget).stats().kv_blocks_total
    assert abs(half - 2 * full) <= 1 and full > 2
    roomy = make_engine(loaded, kv_cache_dtype="float16", enable_prefix_caching=False)
    tight = make_engine(
        loaded,
        kv_cache_dtype="float16",
        num_kv_blocks=30,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )
    expected = run_all(roomy, workload())
    assert run_all(tight, workload()) == expected
    assert tight.stats().preemptions > 0
    assert roomy.runner.kv_caches[0].dtype == torch.float16


def test_abort_frees_every_block(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, enable_prefix_caching=False)
    for request in workload(4):
        engine.add_request(request)
    engine.step()
    engine.step()
    assert engine.stats().running == 4
    for request in workload(4):
        engine.abort(request.request_id)
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.num_requests == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert not engine.has_work


def test_requests_that_can_never_fit_are_rejected(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, max_model_len=512)
    assert engine.validate(GenerationRequest("ok", [5] * 10, SamplingParams(max_tokens=50))) == 50
    assert engine.validate(GenerationRequest("auto", [5] * 10, SamplingParams())) == 502
    with pytest.raises(RequestRejected) as too_long:
        engine.validate(GenerationRequest("long", [5] * 500, SamplingParams(max_tokens=20)))
    assert too_long.value.code == "context_length_exceeded"


def test_context_is_capped_to_what_the_kv_pool_holds(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, num_kv_blocks=8, max_model_len=512)
    assert engine.max_model_len == 7 * 16
    assert engine.validate(GenerationRequest("auto", [5] * 10, SamplingParams())) == 102
    with pytest.raises(RequestRejected) as pool:
        engine.validate(GenerationRequest("pool", [5] * 10, SamplingParams(max_tokens=200)))
    assert pool.value.code == "context_length_exceeded"


def test_n_choices_get_distinct_child_seeds(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    request = GenerationRequest(
        "n", [1, 2, 3], SamplingParams(n=3, seed=7, max_tokens=8, ignore_eos=True)
    )
    engine.add_request(request)
    seeds = [seq.seed for seq in engine.requests["n"].sequences]
    assert len(set(seeds)) == 3 and all(s != 7 + i for i, s in enumerate(seeds))
    by_choice: dict[int, list[int]] = {}
    while engine.has_work:
        for output in engine.step():
            assert output.seed == 7
            for choice in output.choices:
                by_choice.setdefault(choice.index, []).extend(choice.token_ids)
    assert sorted(by_choice) == [0, 1, 2] and all(len(t) == 8 for t in by_choice.values())
    assert len({tuple(t) for t in by_choice.values()}) == 3


def test_time_limit_ends_with_length_and_stop_reason(loaded: LoadedModel) -> None:
    engine = make_engine(loaded)
    request = GenerationRequest(
        "slow", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True, time_limit_ms=50)
    )
    engine.add_request(request)
    start = time.monotonic()
    last = None
    while engine.has_work:
        for output in engine.step():
            last = output
    assert last is not None and last.finished
    assert last.choices[0].finish_reason == "length"
    assert last.choices[0].stop_reason == "time_limit"
    assert last.completion_tokens < 1000 and time.monotonic() - start < 5
