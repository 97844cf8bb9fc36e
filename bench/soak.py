"""Soak: mixed load with random cancellations against a real server for a bounded time.

    .venv/bin/python bench/soak.py --minutes 30 --clients 12

Each client loops: a streaming or non-streaming chat or text completion with a random length,
abandoned part-way with probability --cancel. Every finished stream is checked for well-formed
framing (`data:` events, one finish_reason per choice, `[DONE]` once and last, no error event);
every finished non-streaming answer for a 200 with choices and usage. Every --sample seconds one
row: the server's RSS, KV-cache usage, running and waiting requests. After the load stops the
engine must be empty again. Not a test: it prints figures for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from winnow.benchmark.process import free_port, wait_healthy
from winnow.benchmark.serve import WORDS
from winnow.models import build_demo_model

Row = tuple[float, ...]  # seconds, RSS MiB, KV usage, running, waiting


@dataclass
class Tally:
    finished: int = 0
    cancelled: int = 0
    refused: int = 0  # 429 at admission: the load is meant to exceed capacity at times
    malformed: list[str] = field(default_factory=list)


def request_body(rng: random.Random, chat: bool, stream: bool) -> tuple[str, dict[str, object]]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 200)))
    body: dict[str, object] = {
        "model": "soak",
        "max_tokens": rng.randint(1, 160),
        "stream": stream,
        "n": rng.choice([1, 1, 1, 2]),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
    }
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        return "/v1/chat/completions", body
    body["prompt"] = text
    return "/v1/completions", body


def stream_problem(events: list[str], n: int) -> str | None:
    """Why a finished SSE stream is malformed, or None."""
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return f"not ended by one [DONE]: {events[-2:]}"
    finished = set()
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except json.JSONDecodeError:
            return f"not one JSON event per line: {event[:200]!r}"
        if "error" in chunk:
            return f"error event: {event}"
        for choice in chunk["choices"]:
            if choice.get("finish_reason") is not None:
                if choice["index"] in finished:
                    return f"choice {choice['index']} finished twice"
                finished.add(choice["index"])
    return None if finished == set(range(n)) else f"finish_reason for {finished}, n={n}"


async def one_request(
    http: httpx.AsyncClient, rng: random.Random, cancel_rate: float, tally: Tally
) -> None:
    path, body = request_body(rng, chat=rng.random() < 0.7, stream=rng.random() < 0.6)
    cancel_after = rng.uniform(0.02, 2.0) if rng.random() < cancel_rate else None
    try:
        await asyncio.wait_for(run_request(http, path, body, tally), cancel_after)
    except TimeoutError:
        tally.cancelled += 1


async def run_request(
    http: httpx.AsyncClient, path: str, body: dict[str, object], tally: Tally
) -> None:
    if not body["stream"]:
        response = await http.post(path, json=body)
        if response.status_code == 429:
            tally.refused += 1
            return
        payload = response.json()
        if response.status_code != 200 or len(payload["choices"]) != body["n"]:
            tally.malformed.append(f"{response.status_code}: {response.text[:200]}")
        elif "usage" not in payload:
            tally.malformed.append("no usage")
        tally.finished += 1
        return
    async with http.stream("POST", path, json=body) as response:
        if response.status_code == 429:
            tally.refused += 1
            return
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
            elif line and not line.startswith(":"):
                tally.malformed.append(f"not an SSE line: {line[:200]}")
    problem = stream_problem(events, int(str(body["n"])))
    if problem:
        tally.malformed.append(problem)
    tally.finished += 1


async def client_loop(url: str, seed: int, until: float, cancel_rate: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < until:
            await one_request(http, rng, cancel_rate, tally)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gauges(url: str) -> dict[str, float]:
    names = {
        "winnow:kv_cache_usage_perc": "kv",
        "winnow:num_requests_running": "running",
        "winnow:num_requests_waiting": "waiting",
    }
    found = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name = line.partition("{")[0]
        if name in names:
            found[names[name]] = float(line.rsplit(" ", 1)[1])
    return found


async def sampler(url: str, pid: int, until: float, every_s: float) -> list[Row]:
    start = time.monotonic()
    rows = []
    while time.monotonic() < until:
        now = await asyncio.to_thread(gauges, url)
        row = (time.monotonic() - start, rss_mib(pid), now["kv"], now["running"], now["waiting"])
        rows.append(row)
        print(
            f"{row[0]:7.0f} s  RSS {row[1]:7.1f} MiB  KV {row[2] * 100:5.1f} %  "
            f"running {row[3]:3.0f}  waiting {row[4]:3.0f}",
            flush=True,
        )
        await asyncio.sleep(every_s)
    return rows


async def soak(url: str, pid: int, args: argparse.Namespace) -> tuple[Tally, list[Row]]:
    tally = Tally()
    until = time.monotonic() + args.minutes * 60
    clients = [client_loop(url, seed, until, args.cancel, tally) for seed in range(args.clients)]
    rows, *_ = await asyncio.gather(sampler(url, pid, until, args.sample), *clients)
    return tally, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--cancel", type=float, default=0.3, help="share of requests abandoned")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between rows")
    args = parser.parse_args()

    model_dir = build_demo_model(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="winnow-soak-")) / "server.log"
    command = [
        *(sys.executable, "-m", "winnow", "serve", str(model_dir), "--port", str(port)),
        *("--served-model-name", "soak", "--max-num-seqs", "16", "--max-queue", "16"),
        *("--log-level", "warning"),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, process)
        tally, rows = asyncio.run(soak(url, process.pid, args))
        time.sleep(2)
        after = gauges(url)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    warm = [row for row in rows if row[0] >= 60] or rows
    print(
        f"\n{tally.finished} finished, {tally.cancelled} cancelled, {tally.refused} refused (429), "
        f"{len(tally.malformed)} malformed"
    )
    for problem in tally.malformed[:10]:
        print("  malformed:", problem)
    print(
        f"RSS after warm-up: first {warm[0][1]:.1f} MiB, last {warm[-1][1]:.1f} MiB, "
        f"max {max(row[1] for row in warm):.1f} MiB"
    )
    print(
        f"2 s after the load: KV {after['kv'] * 100:.1f} %, running {after['running']:.0f}, "
        f"waiting {after['waiting']:.0f}; server exit code {process.returncode}"
    )


if __name__ == "__main__":
    main()
