"""Engine settings behind vLLM's flags: --seed, --max-logprobs, and the periodic stats line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from winnow.config import EngineConfig
from winnow.engine.engine import EngineStats, LLMEngine
from winnow.engine.request import GenerationRequest, RequestRejected
from winnow.engine.stats_log import format_stats, log_stats_periodically
from winnow.models import LoadedModel, load_model
from winnow.sampling.params import SamplingParams

PROMPT = list(range(1000, 1010))


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def make_engine(loaded: LoadedModel, **fields: object) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(model="demo", num_kv_blocks=16, **fields))  # type: ignore[arg-type]


def unseeded_run(engine: LLMEngine, count: int) -> list[tuple[int, list[int]]]:
    """(seed used, tokens) of `count` unseeded sampled requests, in order."""
    for i in range(count):
        params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
        engine.add_request(GenerationRequest(f"r{i}", PROMPT, params))
    results: dict[str, tuple[int, list[int]]] = {f"r{i}": (0, []) for i in range(count)}
    while engine.has_work:
        for output in engine.step():
            seed, tokens = results[output.request_id]
            results[output.request_id] = (output.seed, tokens + output.choices[0].token_ids)
    return [results[f"r{i}"] for i in range(count)]


def test_a_server_seed_makes_unseeded_requests_repeatable(loaded: LoadedModel) -> None:
    first = unseeded_run(make_engine(loaded, seed=7), 3)
    again = unseeded_run(make_engine(loaded, seed=7), 3)
    other = unseeded_run(make_engine(loaded, seed=8), 3)
    assert first == again
    assert len({seed for seed, _ in first}) == 3  # each request still gets its own seed
    assert [seed for seed, _ in first] != [seed for seed, _ in other]
    assert all(0 <= seed < 2**63 for seed, _ in first)


def test_without_a_server_seed_requests_get_fresh_seeds(loaded: LoadedModel) -> None:
    seeds = [seed for seed, _ in unseeded_run(make_engine(loaded), 2)]
    seeds += [seed for seed, _ in unseeded_run(make_engine(loaded), 2)]
    assert len(set(seeds)) == 4


def test_max_logprobs_caps_top_logprobs(loaded: LoadedModel) -> None:
    engine = make_engine(loaded, max_logprobs=2)
    within = SamplingParams(max_tokens=1, logprobs=True, top_logprobs=2)
    engine.validate(GenerationRequest("ok", PROMPT, within))
    beyond = SamplingParams(max_tokens=1, logprobs=True, top_logprobs=3)
    with pytest.raises(RequestRejected, match="at most 2") as rejected:
        engine.validate(GenerationRequest("no", PROMPT, beyond))
    assert rejected.value.param == "top_logprobs"


def stats(running: int, free: int) -> EngineStats:
    return EngineStats(
        running=running,
        waiting=1,
        num_requests=running + 1,
        kv_blocks_total=40,
        kv_blocks_free=free,
        kv_blocks_cached=3,
        preemptions=0,
    )


def test_stats_line() -> None:
    line = format_stats(stats(running=2, free=30))
    assert "Running: 2 reqs" in line and "Waiting: 1 reqs" in line
    assert "KV cache usage: 25.0%" in line


def test_stats_are_logged_only_when_they_change(caplog: pytest.LogCaptureFixture) -> None:
    timeline = [stats(1, 30), stats(1, 30), stats(2, 20), stats(2, 20)]
    calls = 0

    def current() -> EngineStats:
        nonlocal calls
        calls += 1
        return timeline[min(calls, len(timeline)) - 1]

    async def run() -> None:
        task = asyncio.create_task(log_stats_periodically(current, 0.001))
        deadline = asyncio.get_running_loop().time() + 30
        while calls < len(timeline) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)
        task.cancel()
        assert calls >= len(timeline)

    with caplog.at_level(logging.INFO, logger="winnow.engine.stats_log"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "winnow.engine.stats_log"]
    assert [line.split(",")[0] for line in lines] == ["Running: 1 reqs", "Running: 2 reqs"]
