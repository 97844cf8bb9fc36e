"""Grammar work -- a schema's shape and meta-validation checks, then its compilation -- on a few
threads of its own, each with a large stack, with a deadline.

llguidance compiles on the calling thread's stack and recurses per schema element: a `required`
list of 30,000 names overflowed an 8 MiB stack (SIGSEGV, the whole server gone). The schema
bounds in `winnow.limits` keep schemas far below that; the large stack is the margin for what
the bounds do not foresee. The work is request-sized, so it never runs on the event loop; a
compile past the deadline is the client's 400, while its thread finishes in the background
(llguidance's fuel limits end it).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

GRAMMAR_THREADS = 2
GRAMMAR_STACK_BYTES = 512 * 1024 * 1024  # reserved address space; pages are touched on use only
COMPILE_TIMEOUT_S = 10.0


class BigStackPool:
    """A fixed number of daemon threads with `stack_bytes` stacks, started on first use."""

    def __init__(self, name: str, threads: int, stack_bytes: int) -> None:
        self._name = name
        self._threads = threads
        self._stack_bytes = stack_bytes
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def submit(self, job: Callable[[], T]) -> Future[T]:
        self._start()
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            previous = threading.stack_size(self._stack_bytes)
            try:
                for index in range(self._threads):
                    name = f"{self._name}-{index}"
                    threading.Thread(target=self._work, name=name, daemon=True).start()
            finally:
                threading.stack_size(previous)
            self._started = True

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)


_pool = BigStackPool("winnow-grammar", GRAMMAR_THREADS, GRAMMAR_STACK_BYTES)


async def run_grammar_job(job: Callable[[], T], timeout_s: float = COMPILE_TIMEOUT_S) -> T:
    """`job()` on a grammar thread; TimeoutError after `timeout_s` (the job may run on)."""
    return await asyncio.wait_for(asyncio.wrap_future(_pool.submit(job)), timeout_s)
