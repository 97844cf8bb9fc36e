"""A server process's life: 503 "loading" before the model is up, a SIGTERM drain that ends
every stream well-formed and exits 0, and a second signal that stops the drain at once, quietly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import start_server
from winnow.benchmark.process import free_port

# The long streams must not finish within it: a quiet 2-core EPYC decodes ~380 tokens/s per
# stream here, which took them through 1,900 of their 2,000 tokens in 5 s; 1.5 s leaves a machine
# 3.5x as fast still unable to finish them.
SHUTDOWN_TIMEOUT_S = 1.5
# Lengths spread so that on a slow or a fast machine some stream still runs at SIGTERM and can
# finish within the shutdown timeout.
SHORT_TOKENS = [5, 10, 20, 40, 80, 160]
LONG_TOKENS = 2000  # the demo model's context is 2048


@dataclass
class StreamLog:
    events: list[str] = field(default_factory=list)  # every SSE data payload, in order
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None  # when the finish_reason chunk arrived

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(event) for event in self.events if event != "[DONE]"]


def chat(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "demo",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def read_stream(http: httpx.AsyncClient, body: dict[str, Any], log: StreamLog) -> None:
    """Record one SSE response, checking the framing of every event on the way."""
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            *events, buffer = buffer.split("\n\n")
            for event in events:
                if event.startswith(":"):
                    continue
                assert event.startswith("data: ") and "\n" not in event, event
                payload = event.removeprefix("data: ")
                log.events.append(payload)
                if payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    log.first_token.set()
                if choices[0].get("finish_reason") is not None:
                    log.finished_at = time.monotonic()
        assert buffer == ""


def assert_well_formed(log: StreamLog) -> str:
    """A stream ends with `[DONE]` after either a finish_reason chunk or one error event;
    returns which ("finished" or "error")."""
    assert log.events and log.events[-1] == "[DONE]", log.events[-3:]
    assert log.events.count("[DONE]") == 1
    last = json.loads(log.events[-2])
    if "error" in last:
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert last["error"]["type"] == "service_unavailable"
        assert all("error" not in chunk for chunk in log.chunks[:-1])
        return "error"
    assert last["choices"][0]["finish_reason"] == "length"
    return "finished"


async def drain_while_streaming(server_url: str, process: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        short = [StreamLog() for _ in SHORT_TOKENS]
        long = [StreamLog() for _ in range(2)]
        lengths = [*SHORT_TOKENS, *(LONG_TOKENS for _ in long)]
        streams = [
            asyncio.create_task(read_stream(http, chat(tokens, stream=True), log))
            for log, tokens in zip([*short, *long], lengths, strict=True)
        ]
        blocking = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat(LONG_TOKENS, stream=False))
        )
        await asyncio.wait_for(asyncio.gather(*(log.first_token.wait() for log in long)), 60)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        health = await http.get("/health")
        while health.status_code == 200:  # the signal is handled between two loop iterations
            await asyncio.sleep(0.01)
            health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = await http.post("/v1/chat/completions", json=chat(4, stream=False))
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "service_unavailable"

        await asyncio.wait_for(asyncio.gather(*streams), 60)
        ended = await asyncio.wait_for(blocking, 60)
    assert [assert_well_formed(log) for log in long] == ["error", "error"]
    for log in short:
        assert_well_formed(log)
    # At least one shorter stream was still running at SIGTERM and was let finish.
    assert any(log.finished_at is not None and log.finished_at > signalled for log in short)
    assert ended.status_code == 503
    assert ended.json()["error"]["type"] == "service_unavailable"


def wait_ready_seeing_loading(url: str, process: subprocess.Popen[bytes]) -> list[httpx.Response]:
    """Poll from the moment the port binds until /health is 200; returns what another route
    answered while /health said "loading"."""
    loading: list[httpx.Response] = []
    deadline = time.monotonic() + 300  # a crowded machine can take minutes to import torch
    while time.monotonic() < deadline and process.poll() is None:
        try:
            health = httpx.get(url + "/health", timeout=5)
            models = httpx.get(url + "/v1/models", timeout=5)
            live = httpx.get(url + "/livez", timeout=5)
        except httpx.TransportError:
            time.sleep(0.005)
            continue
        if health.status_code == 200:
            return loading
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert live.status_code == 200, live.text  # liveness does not wait for the model
        loading.append(models)
        time.sleep(0.05)  # leave the GIL to the loading engine thread
    raise AssertionError("the server did not become ready")


def test_loading_then_serving_then_a_sigterm_drain(demo_model_dir: Path, tmp_path: Path) -> None:
    """The port answers 503 "loading" before the model is ready (and other routes 503 +
    Retry-After); SIGTERM while 8 streams run lets those that can finish, ends the rest with an
    error event and `[DONE]`, refuses new requests meanwhile, and exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "winnow", "serve", str(demo_model_dir)),
                *("--port", str(port), "--served-model-name", "demo"),
                *("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--max-num-seqs", "16"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        loading = wait_ready_seeing_loading(url, process)
        assert loading, "the port was not bound before the model was ready"
        # 503 + Retry-After while loading (or 200 when loading ended between the two requests)
        assert {response.status_code for response in loading} <= {200, 503}
        refused = next(response for response in loading if response.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["message"].startswith("The model is loading")

        asyncio.run(drain_while_streaming(url, process))
        assert process.wait(timeout=30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        process.kill()


async def signal_twice_while_streaming(server_url: str, process: subprocess.Popen[bytes]) -> None:
    """A long stream runs; SIGINT starts the drain, a second SIGINT (as Ctrl-C on `make serve`
    delivers it) comes while the drain waits for the stream."""
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        log = StreamLog()
        stream = asyncio.create_task(read_stream(http, chat(LONG_TOKENS, stream=True), log))
        await asyncio.wait_for(log.first_token.wait(), 120)
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while (await http.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "the server never started draining"
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(stream, 60)
    assert assert_well_formed(log) == "error"


def test_a_second_signal_during_the_drain_ends_the_server_quietly(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    server = start_server(demo_model_dir, log_path, "--shutdown-timeout", "600")
    try:
        asyncio.run(signal_twice_while_streaming(server.base_url, server.process))
        assert server.process.wait(timeout=60) == 0, server.log()  # not the 600 s drain
        log = server.log()
        assert "Traceback" not in log and "ERROR" not in log, log
        assert log.count("ending 1 request(s) still running on a second signal") == 1, log
    finally:
        server.process.kill()
