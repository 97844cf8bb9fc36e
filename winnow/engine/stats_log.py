"""The periodic stats line `vllm serve` logs (turned off by --disable-log-stats)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from winnow.engine.engine import EngineStats

logger = logging.getLogger(__name__)


def format_stats(stats: EngineStats) -> str:
    used = stats.kv_blocks_total - stats.kv_blocks_free
    usage = 100.0 * used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
    return (
        f"Running: {stats.running} reqs, Waiting: {stats.waiting} reqs, "
        f"KV cache usage: {usage:.1f}%, cached blocks: {stats.kv_blocks_cached}, "
        f"preemptions: {stats.preemptions}"
    )


async def log_stats_periodically(stats: Callable[[], EngineStats], interval_s: float) -> None:
    """Every `interval_s` one INFO line, skipped while nothing changed (idle servers are quiet)."""
    previous: EngineStats | None = None
    while True:
        await asyncio.sleep(interval_s)
        current = stats()
        if current != previous:
            logger.info(format_stats(current))
            previous = current
