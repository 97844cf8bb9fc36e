"""The grammar threads: a compile that overflows a small stack runs to completion on theirs.

llguidance's compiler recurses once per `required` name: 30,000 names overflowed an 8 MiB
stack and killed the server with SIGSEGV (27,000 compiled). The same overflow, scaled down so
the test stays cheap: 3,000 names need more than a 256 KiB stack, which a child process proves
by dying, while the pool's threads compile them. (The 30,000-name case itself needs about a
minute of compile; `bench/hostile_stall.py --crash-case` runs it.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from winnow.server.grammar_pool import GRAMMAR_STACK_BYTES, BigStackPool, run_grammar_job

pytestmark = pytest.mark.anyio

NAMES = 3000
SMALL_STACK_BYTES = 256 * 1024
COMPILE = """
import sys
import llguidance
from winnow.server.grammar_pool import BigStackPool

tokenizer = llguidance.LLTokenizer(sys.argv[1])
schema = {"type": "object", "required": [f"k{i}" for i in range(int(sys.argv[2]))]}

def compile_schema() -> str:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    return matcher.get_error()

print("error:", BigStackPool("test", 1, int(sys.argv[3])).submit(compile_schema).result())
"""


def compile_in_child(demo_model_dir: Path, stack_bytes: int) -> subprocess.CompletedProcess[str]:
    tokenizer = str(demo_model_dir / "tokenizer.json")
    command = [sys.executable, "-c", COMPILE, tokenizer, str(NAMES), str(stack_bytes)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_compile_that_overflows_a_small_stack_completes_on_the_pools(
    demo_model_dir: Path,
) -> None:
    small = compile_in_child(demo_model_dir, SMALL_STACK_BYTES)
    assert small.returncode < 0, small.stdout + small.stderr  # killed by a signal
    big = compile_in_child(demo_model_dir, GRAMMAR_STACK_BYTES)
    assert big.returncode == 0, big.stderr
    assert big.stdout.strip() == "error:"


async def test_jobs_run_on_the_pools_threads_and_raise_there() -> None:
    def fail() -> None:
        raise ValueError("from the job")

    with pytest.raises(ValueError, match="from the job"):
        await run_grammar_job(fail)


async def test_a_job_past_its_deadline_is_a_timeout() -> None:
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError):
            await run_grammar_job(release.wait, timeout_s=0.01)
    finally:
        release.set()


def test_a_job_cancelled_while_queued_never_runs() -> None:
    pool = BigStackPool("test", 1, GRAMMAR_STACK_BYTES)
    release = threading.Event()
    ran: list[str] = []
    blocker = pool.submit(release.wait)
    queued = pool.submit(lambda: ran.append("queued"))
    assert queued.cancel()
    release.set()
    assert blocker.result(timeout=10) is True
    pool.submit(lambda: None).result(timeout=10)
    assert ran == []
