"""Chat-template rendering and tokenisation in worker threads, off the event loop.

Rendering a long chat and encoding tens of thousands of tokens takes long enough to stall every
open stream if it runs on the event loop. Fast tokenizers are not re-entrant, so each worker
thread works on its own copy of a tokenizer, made the first time the thread needs it and kept
for as long as the original lives. The pool is shared by every app in the process.

Jobs come in two lanes by the size of the request behind them: a few 4 MiB prompts take the
large lane's one thread for seconds each, and ordinary prompts keep the small lane's threads to
themselves instead of queueing behind them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from winnow.models import Tokenizer

T = TypeVar("T")

TOKENIZER_THREADS = 2  # the small lane
LARGE_LANE_THREADS = 1
# Requests of this many bytes or more (body, text, ids) go to the large lane.
LARGE_JOB_BYTES = 64 * 1024
# Niceness the worker threads add to the process's: on a host with few cores a long prompt's
# encoding competes with the engine's decode threads for CPU; the running streams win.
WORKER_NICENESS = 10
MAX_NICENESS = 19


def _start_worker() -> None:
    # tokenizers encodes on its own thread pool (rayon) unless told not to; without it the work
    # runs on this thread, which releases the GIL all the same and carries the niceness below.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.platform == "linux":  # elsewhere setpriority would renice the whole process
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + WORKER_NICENESS
        os.setpriority(os.PRIO_PROCESS, thread, min(niceness, MAX_NICENESS))


_small_lane = ThreadPoolExecutor(
    TOKENIZER_THREADS, thread_name_prefix="winnow-tokenizer", initializer=_start_worker
)
_large_lane = ThreadPoolExecutor(
    LARGE_LANE_THREADS, thread_name_prefix="winnow-tokenizer-large", initializer=_start_worker
)
_copies = threading.local()  # per thread: WeakKeyDictionary[original Tokenizer, its copy]


async def with_tokenizer(
    tokenizer: Tokenizer, job: Callable[[Tokenizer], T], *, size: int = 0
) -> T:
    """`job(copy)` on a worker thread, where `copy` is that thread's own copy of `tokenizer`;
    `size`: the bytes of the request behind the job, which pick its lane."""
    lane = _large_lane if size >= LARGE_JOB_BYTES else _small_lane
    return await asyncio.get_running_loop().run_in_executor(lane, _run, tokenizer, job)


def _run(tokenizer: Tokenizer, job: Callable[[Tokenizer], T]) -> T:
    copies: weakref.WeakKeyDictionary[Tokenizer, Tokenizer] | None = getattr(
        _copies, "by_original", None
    )
    if copies is None:
        copies = _copies.by_original = weakref.WeakKeyDictionary()
    own = copies.get(tokenizer)
    if own is None:
        own = copies[tokenizer] = tokenizer.copy()
    return job(own)
