"""How long do hostile requests stall a running stream? The largest gap between two chunks of a
streamed chat while each hostile case is sent, against the largest gap in a quiet window of
`--quiet` seconds just before it, on a real server.

    .venv/bin/python bench/hostile_stall.py                      # this checkout's winnow
    .venv/bin/python bench/hostile_stall.py --winnow /work/main/.venv/bin/winnow   # another's

Cases: a 20,000-property schema in `response_format` and in a tool's `parameters`, a 3.8 MB
`stop_token_ids` list, four 4 MB prompts at once, and (`--crash-case`) the 30,000-name
`required` list that crashed llguidance. Each case runs `--repeats` times; the medians are
printed with their ratio to the quiet gap, and the status codes the case got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from winnow.benchmark.process import free_port, running_server
from winnow.models import build_demo_model

MODEL = "bench"
USER = [{"role": "user", "content": "Write forever."}]


def names(count: int) -> list[str]:
    return [f"k{i}" for i in range(count)]


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def cases(crash: bool) -> dict[str, list[dict[str, Any]]]:
    wide = {"type": "object", "properties": {n: {"type": "string"} for n in names(20_000)}}
    tool = {"type": "function", "function": {"name": "f", "parameters": wide}}
    chat = {"model": MODEL, "messages": USER, "max_tokens": 4}
    prompt = {"model": MODEL, "messages": [{"role": "user", "content": "x " * 2_000_000}]}
    found = {
        "schema-20k-properties": [{**chat, "response_format": response_format(wide)}],
        "tool-20k-properties": [{**chat, "tools": [tool], "tool_choice": "required"}],
        "stop-token-ids-3.8MB": [{**chat, "stop_token_ids": list(range(1, 480_000))}],
        "four-4MB-prompts": [{**prompt, "max_tokens": 4}] * 4,
    }
    if crash:
        required = {"type": "object", "required": names(30_000)}
        found["required-30k-names"] = [{**chat, "response_format": response_format(required)}]
    return found


class Stream:
    """One streamed chat, kept running; the arrival time of each content chunk."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.arrivals: list[float] = []
        self._task = asyncio.create_task(self._run(http))

    async def _run(self, http: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "messages": USER, "max_tokens": 100_000, "stream": True}
        body["ignore_eos"] = True
        while True:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line:
                        self.arrivals.append(time.perf_counter())

    def largest_gap(self, start: float, end: float, *, closed: bool = True) -> float:
        """The largest gap between chunks over [start, end], from the last chunk before it;
        `closed`: up to the first chunk after it too (which may come only once a stall ends)."""
        before = [t for t in self.arrivals if t < start][-1:]
        inside = [t for t in self.arrivals if start <= t <= end]
        after = [t for t in self.arrivals if t > end][:1] if closed else []
        times = before + inside + after
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=end - start)

    def stop(self) -> None:
        self._task.cancel()


async def run_case(
    url: str, bodies: list[bytes], stream: Stream, quiet_s: float
) -> tuple[float, float, list[int | str]]:
    """(largest gap in the `quiet_s` before the case, largest gap during it, status codes)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        started = time.perf_counter()
        headers = {"Content-Type": "application/json"}

        async def send(body: bytes) -> int | str:
            try:
                reply = await http.post("/v1/chat/completions", content=body, headers=headers)
            except httpx.HTTPError as exc:  # the server died
                return type(exc).__name__
            return reply.status_code

        codes = await asyncio.gather(*(send(body) for body in bodies))
        finished = time.perf_counter()
    await asyncio.sleep(0.5)  # the next chunk closes the last gap
    busy = stream.largest_gap(started, finished)
    quiet = stream.largest_gap(started - quiet_s, started, closed=False)
    return quiet, busy, list(codes)


async def measure(url: str, crash: bool, repeats: int, quiet_s: float) -> None:
    encoded = {
        name: [json.dumps(b).encode() for b in bodies] for name, bodies in cases(crash).items()
    }
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        stream = Stream(http)
        await asyncio.sleep(quiet_s)
        for name, bodies in encoded.items():
            quiet, busy, codes = [], [], []
            for _ in range(repeats):
                await asyncio.sleep(quiet_s + 1.0)  # the last case's stall is over
                q, b, c = await run_case(url, bodies, stream, quiet_s)
                quiet.append(q)
                busy.append(b)
                codes = c
            q_med, b_med = statistics.median(quiet), statistics.median(busy)
            print(
                f"{name:24s} quiet gap {q_med * 1000:7.0f} ms  gap during {b_med * 1000:7.0f} ms  "
                f"ratio {b_med / q_med:6.1f}  status {codes}",
                flush=True,
            )
        stream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--winnow", default=str(Path(sys.executable).parent / "winnow"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds of the quiet window")
    parser.add_argument("--crash-case", action="store_true", help="also the 30,000-name case")
    args = parser.parse_args()

    model_dir = build_demo_model("demo")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *(args.winnow, "serve", str(model_dir), "--port", str(port)),
        *("--served-model-name", MODEL, "--log-level", "warning"),
    ]
    log = Path(tempfile.mkdtemp(prefix="winnow-hostile-stall-")) / "server.log"
    print(f"server: {args.winnow}; log {log}")
    with running_server(command, url, log):
        asyncio.run(measure(url, args.crash_case, args.repeats, args.quiet))


if __name__ == "__main__":
    main()
