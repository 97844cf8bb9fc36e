"""Serving under pressure, against real server processes: prefix cache, preemption, admission."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ServerProcess, start_server, stop_server

SYSTEM = "You are a meticulous assistant. " * 30  # a long shared system prompt


def seeded_request(i: int) -> dict[str, object]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": f"Tell me about number {i}."}],
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": 500 + i,
        "ignore_eos": True,
    }


def complete(server: ServerProcess, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny_pool_server(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tiny") / "server.log"
    proc = start_server(demo_model_dir, log, "--num-kv-blocks", "20", "--max-num-seqs", "8")
    yield proc
    stop_server(proc)


def test_shared_prefix_reports_cached_tokens_and_same_output(server: ServerProcess) -> None:
    body = {
        "model": "demo",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    first = complete(server, body)
    second = complete(server, body)
    first_usage, second_usage = first["usage"], second["usage"]
    assert isinstance(first_usage, dict) and isinstance(second_usage, dict)
    assert second_usage["prompt_tokens_details"]["cached_tokens"] > 100
    assert second_usage["prompt_tokens"] == first_usage["prompt_tokens"]
    assert second["choices"] == first["choices"]


def test_tiny_kv_pool_preempts_yet_every_output_matches(
    server: ServerProcess, tiny_pool_server: ServerProcess
) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        squeezed = list(pool.map(lambda i: complete(tiny_pool_server, seeded_request(i)), range(8)))
    roomy = [complete(server, seeded_request(i)) for i in range(8)]
    assert [r["choices"] for r in squeezed] == [r["choices"] for r in roomy]
    assert all(r["usage"]["completion_tokens"] == 48 for r in squeezed)  # type: ignore[index]
    assert "preempted" in tiny_pool_server.log()


def test_beyond_the_queue_limit_is_429(demo_model_dir: Path, tmp_path: Path) -> None:
    proc = start_server(
        demo_model_dir, tmp_path / "server.log", "--max-num-seqs", "1", "--max-queue", "1"
    )
    long_body = {**seeded_request(0), "max_tokens": 1000, "stream": True}
    try:
        with httpx.Client(base_url=proc.base_url, timeout=60) as client:
            streams = [
                client.stream("POST", "/v1/chat/completions", json=long_body) for _ in range(2)
            ]
            running, queued = (s.__enter__() for s in streams)
            assert running.status_code == 200  # headers go out once the request is admitted
            lines = running.iter_lines()  # kept alive: dropping it closes the response
            next(lines)
            assert queued.status_code == 200  # admitted, waiting for the running one
            rejected = client.post("/v1/chat/completions", json=seeded_request(1))
            assert rejected.status_code == 429
            assert int(rejected.headers["retry-after"]) >= 1
            assert rejected.json()["error"]["type"] == "rate_limit_error"
            for stream in streams:
                stream.__exit__(None, None, None)  # disconnect: both requests are aborted
            deadline = time.monotonic() + 10
            while True:  # the server notices the disconnects asynchronously
                accepted = client.post(
                    "/v1/chat/completions", json={**seeded_request(2), "max_tokens": 4}
                )
                if accepted.status_code != 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert accepted.status_code == 200
            assert json.loads(accepted.text)["usage"]["completion_tokens"] == 4
    finally:
        stop_server(proc)


def test_half_precision_kv_cache_serves(demo_model_dir: Path, tmp_path: Path) -> None:
    proc = start_server(demo_model_dir, tmp_path / "server.log", "--kv-cache-dtype", "bfloat16")
    try:
        reply = complete(proc, seeded_request(0))
        assert reply["usage"]["completion_tokens"] == 48  # type: ignore[index]
        assert "tokens, bfloat16), max_model_len" in proc.log()
    finally:
        stop_server(proc)
