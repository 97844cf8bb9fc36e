"""The engine thread and its asyncio door: admission, abort, shutdown."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from winnow.config import EngineConfig
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.engine import LLMEngine
from winnow.engine.request import EngineDeadError, EngineOverloaded, GenerationRequest
from winnow.models import load_model
from winnow.sampling.params import SamplingParams

pytestmark = pytest.mark.anyio
LONG = SamplingParams(max_tokens=1500, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_engine(demo_model_dir: Path, **overrides: int) -> AsyncEngine:
    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=2, max_queue=2)
    for name, value in overrides.items():
        setattr(config, name, value)
    return AsyncEngine.from_config(config)


def request(request_id: str, params: SamplingParams = LONG) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 3, 100, 4], params)


async def test_the_model_is_built_on_the_engine_thread(demo_model_dir: Path) -> None:
    """The caller's thread must never start an OpenMP pool of its own (see AsyncEngine)."""
    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=2)
    built_on: list[threading.Thread] = []

    def build() -> LLMEngine:
        built_on.append(threading.current_thread())
        return LLMEngine(load_model(config.model), config)

    engine = AsyncEngine(build, "demo")
    engine.start()
    try:
        assert built_on[0] is not threading.current_thread()
        assert built_on[0].name == "winnow-engine"
        stream = engine.submit(request("r", SamplingParams(max_tokens=2, ignore_eos=True)))
        outputs = [output async for output in stream]
        assert outputs[-1].completion_tokens == 2
    finally:
        await asyncio.to_thread(engine.shutdown)


def test_a_failed_build_raises_in_the_caller() -> None:
    def build() -> LLMEngine:
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        AsyncEngine(build, "missing")


async def test_shutdown_fails_every_open_stream(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir)
    engine.start()
    streams = [engine.submit(request(f"r{i}")) for i in range(3)]
    await anext(streams[0])
    await asyncio.to_thread(engine.shutdown)
    for stream in streams:
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass


async def test_admission_counts_sequences_not_requests(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir)  # room for 2 running + 2 queued sequences
    engine.start()
    try:
        engine.submit(request("three", SamplingParams(n=3, max_tokens=1500, ignore_eos=True)))
        with pytest.raises(EngineOverloaded):
            engine.submit(request("two", SamplingParams(n=2, max_tokens=5)))
        engine.submit(request("one"))
    finally:
        await asyncio.to_thread(engine.shutdown)


async def test_abort_frees_everything_and_the_next_request_runs(demo_model_dir: Path) -> None:
    engine = make_engine(demo_model_dir)
    engine.start()
    try:
        stream = engine.submit(request("long"))
        await anext(stream)
        engine.abort("long")
        engine.abort("long")  # idempotent
        done = engine.submit(request("short", SamplingParams(max_tokens=3, ignore_eos=True)))
        outputs = [output async for output in done]
        assert outputs[-1].finished and outputs[-1].completion_tokens == 3
        # The engine thread refreshes its stats when it next goes idle.
        deadline = asyncio.get_running_loop().time() + 60

        def idle() -> bool:
            stats = engine.stats()
            no_requests = stats.running == stats.waiting == stats.num_requests == 0
            return no_requests and stats.kv_blocks_free == stats.kv_blocks_total

        while not idle() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert idle(), engine.stats()
    finally:
        await asyncio.to_thread(engine.shutdown)
