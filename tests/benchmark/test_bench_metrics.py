"""The serving benchmark's metric definitions (vllm bench serve's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from winnow.benchmark.serve import RequestResult, percentiles, sse_lines, summarise


def test_percentiles_in_milliseconds() -> None:
    stats = percentiles([0.001 * i for i in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(51.0)
    assert stats["p90"] == pytest.approx(90.0)
    assert stats["p99"] == pytest.approx(99.0)
    assert percentiles([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_summary_uses_tpot_definition_and_counts_errors() -> None:
    results = [
        RequestResult(
            ok=True, prompt_tokens=10, output_tokens=5, ttft=0.2, e2e=1.0, itls=[0.2, 0.2, 0.2, 0.2]
        ),
        RequestResult(
            ok=True, prompt_tokens=10, output_tokens=3, ttft=0.4, e2e=0.8, itls=[0.2, 0.2]
        ),
        RequestResult(ok=False, error="HTTP 429"),
    ]
    summary = summarise(results, duration=2.0)
    assert summary.completed == 2 and summary.errors == 1
    assert summary.first_error == "HTTP 429"
    assert summary.output_throughput == pytest.approx(4.0)
    assert summary.total_token_throughput == pytest.approx(14.0)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.tpot_ms["mean"] == pytest.approx(200.0)  # (1.0-0.2)/4 and (0.8-0.4)/2
    assert summary.ttft_ms["mean"] == pytest.approx(300.0)
    assert summary.itl_ms["p50"] == pytest.approx(200.0)


def test_sse_lines_split_at_line_feeds_only() -> None:
    """A JSON string may carry U+2028 or U+0085 unescaped (llama.cpp's does); they are not line
    ends for SSE. Lines may also straddle network chunks, and end in CRLF."""
    event = 'data: {"content": "a\u2028b\u0085c"}'
    body = f"{event}\r\n\r\ndata: [DONE]\n".encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    async def collect() -> list[str]:
        return [line async for line in sse_lines(chunks())]

    assert asyncio.run(collect()) == [event, "", "data: [DONE]"]
