"""Chat-template rendering and tokenisation in worker threads, off the event loop.

Rendering a long chat and encoding tens of thousands of tokens takes long enough to stall every
open stream if it runs on the event loop. Fast tokenizers are not re-entrant, so each worker
thread works on its own copy of the model's tokenizer, made the first time the thread needs it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from winnow.models import Tokenizer

if TYPE_CHECKING:
    from winnow.engine.async_engine import AsyncEngine

T = TypeVar("T")

TOKENIZER_THREADS = 2


class TokenizerPool:
    def __init__(self, engine: AsyncEngine, threads: int = TOKENIZER_THREADS) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="winnow-tokenizer")
        self._local = threading.local()

    async def run(self, job: Callable[[Tokenizer], T]) -> T:
        """`job(tokenizer)` on a worker thread, with that thread's own tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, job)

    def _call(self, job: Callable[[Tokenizer], T]) -> T:
        tokenizer: Tokenizer | None = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = self._engine.tokenizer.copy()
        return job(tokenizer)
