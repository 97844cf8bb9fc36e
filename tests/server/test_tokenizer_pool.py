"""The tokenizer worker threads: off the event loop, each on its own copy, at lower priority."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from winnow.models import Tokenizer
from winnow.server.tokenizer_pool import MAX_NICENESS, WORKER_NICENESS, with_tokenizer

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
