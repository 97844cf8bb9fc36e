"""The tokenizer worker threads: off the event loop, each on its own copy, at lower priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from winnow.models import Tokenizer
from winnow.server.tokenizer_pool import (
    LARGE_JOB_BYTES,
    LARGE_LANE_THREADS,
    MAX_NICENESS,
    WORKER_NICENESS,
    with_tokenizer,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


async def test_jobs_run_on_a_worker_thread_with_its_own_copy(tokenizer: Tokenizer) -> None:
    def job(own: Tokenizer) -> tuple[int, Tokenizer, list[int]]:
        return threading.get_ident(), own, own.encode("hello world")

    thread, copy, ids = await with_tokenizer(tokenizer, job)
    assert thread != threading.get_ident()
    assert copy is not tokenizer and copy.hf is not tokenizer.hf
    assert ids == tokenizer.encode("hello world")
    again_thread, again_copy, _ = await with_tokenizer(tokenizer, job)
    if again_thread == thread:  # the same worker keeps its copy
        assert again_copy is copy


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
async def test_workers_yield_the_cpu_to_the_engine(tokenizer: Tokenizer) -> None:
    """Encoding runs on the niced worker itself, not on tokenizers' own (un-niced) thread pool."""
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def niceness(_: Tokenizer) -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert await with_tokenizer(tokenizer, niceness) == min(ours + WORKER_NICENESS, MAX_NICENESS)
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"


async def test_an_ordinary_prompt_never_waits_behind_large_ones(tokenizer: Tokenizer) -> None:
    """While every large-lane thread is busy, a small job still runs, on the small lane."""
    release = threading.Event()
    loop = asyncio.get_running_loop()
    large = [
        loop.create_task(with_tokenizer(tokenizer, lambda _: release.wait(), size=LARGE_JOB_BYTES))
        for _ in range(LARGE_LANE_THREADS + 1)
    ]
    try:
        name = await asyncio.wait_for(
            with_tokenizer(tokenizer, lambda _: threading.current_thread().name, size=100), 30
        )
        assert not name.startswith("winnow-tokenizer-large")
    finally:
        release.set()
    assert all(await asyncio.gather(*large))


async def test_large_jobs_run_on_the_large_lane(tokenizer: Tokenizer) -> None:
    name = await with_tokenizer(
        tokenizer, lambda _: threading.current_thread().name, size=LARGE_JOB_BYTES
    )
    assert name.startswith("winnow-tokenizer-large")
