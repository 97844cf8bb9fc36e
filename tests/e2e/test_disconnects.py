"""Disconnect storm against a real server: clients that leave mid-flight free everything."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx

from tests.e2e.conftest import ServerProcess

STORM_STREAMS = 48
STORM_BLOCKING = 24
SETTLE_S = 2.0


def engine_gauges(metrics_text: str) -> dict[str, float]:
    """running, waiting and KV usage from the Prometheus text of /metrics."""
    wanted = {
        "winnow:num_requests_running": "running",
        "winnow:num_requests_waiting": "waiting",
        "winnow:kv_cache_usage_perc": "kv_usage",
    }
    gauges = {}
    for line in metrics_text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted:
            gauges[wanted[name]] = float(rest.rsplit(" ", 1)[1])
    assert set(gauges) == set(wanted.values()), metrics_text
    return gauges


def long_chat(stream: bool, i: int) -> dict[str, object]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": stream,
    }


async def leave_mid_stream(http: httpx.AsyncClient, i: int, rng: random.Random) -> None:
    """Read a few events (or none), then close the connection."""
    events_to_read = rng.choice([0, 1, 3, 8])
    async with http.stream("POST", "/v1/chat/completions", json=long_chat(True, i)) as response:
        assert response.status_code in (200, 429)
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= events_to_read:
                break


async def leave_while_waiting(http: httpx.AsyncClient, i: int, rng: random.Random) -> None:
    """A non-streaming request abandoned after a random wait."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            http.post("/v1/chat/completions", json=long_chat(False, i)), rng.uniform(0.05, 1.5)
        )


async def storm(base_url: str) -> float:
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=STORM_STREAMS + STORM_BLOCKING)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        clients = [leave_mid_stream(http, i, rng) for i in range(STORM_STREAMS)]
        clients += [leave_while_waiting(http, i, rng) for i in range(STORM_BLOCKING)]
        rng.shuffle(clients)
        await asyncio.gather(*clients)
    return time.monotonic()


def test_disconnect_storm_frees_everything(server: ServerProcess) -> None:
    metrics_url = server.base_url + "/metrics"
    baseline = engine_gauges(httpx.get(metrics_url).text)
    assert baseline["running"] == baseline["waiting"] == 0

    everyone_left = asyncio.run(storm(server.base_url))
    gauges = engine_gauges(httpx.get(metrics_url).text)
    while gauges != baseline and time.monotonic() < everyone_left + SETTLE_S:
        time.sleep(0.05)
        gauges = engine_gauges(httpx.get(metrics_url).text)
    assert gauges == baseline, f"{SETTLE_S} s after the storm: {gauges}, baseline {baseline}"

    reply = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Still there?"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
