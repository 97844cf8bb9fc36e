"""How long do hostile requests stall the event loop (and with it every stream)? The longest
`GET /health` probe (one every 50 ms) while each hostile case is sent, against the longest in a
quiet window of `--quiet` seconds just before it, on a real server.

    .venv/bin/python bench/hostile_stall.py                      # this checkout's winnow
    git worktree add --detach /tmp/before <commit>
    .venv/bin/python bench/hostile_stall.py --source /tmp/before  # that tree's, same venv

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
RUN_FROM = """
import runpy, sys
if {source!r}:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path.insert(0, {source!r})
import winnow
print("serving", winnow.__file__, flush=True)
sys.argv[0] = "winnow"
runpy.run_module("winnow", run_name="__main__")
"""
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


class Prober:
    """`GET /health` every 50 ms on its own connection: each probe's start and latency. The
    route does nothing, so its latency is how long the event loop was busy elsewhere, whatever
    share of the CPU the engine gets on a loaded host."""

    def __init__(self, url: str) -> None:
        self.probes: list[tuple[float, float]] = []
        self._task = asyncio.create_task(self._run(url))

    async def _run(self, url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=None) as http:
            while True:
                started = time.perf_counter()
                await http.get("/health")
                self.probes.append((started, time.perf_counter() - started))
                await asyncio.sleep(0.05)

    def largest(self, start: float, end: float) -> float:
        """The longest probe that was in flight during [start, end]."""
        return max((lat for t, lat in self.probes if t <= end and t + lat >= start), default=0.0)

    def stop(self) -> None:
        self._task.cancel()


async def run_case(
    url: str, bodies: list[bytes], prober: Prober, quiet_s: float
) -> tuple[float, float, list[int | str]]:
    """(longest probe in the `quiet_s` before the case, longest during it, status codes)."""
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
    await asyncio.sleep(0.5)  # the probe in flight at the end returns
    busy = prober.largest(started, finished)
    quiet = prober.largest(started - quiet_s, started - 0.1)
    return quiet, busy, list(codes)


async def measure(url: str, crash: bool, repeats: int, quiet_s: float) -> None:
    encoded = {
        name: [json.dumps(b).encode() for b in bodies] for name, bodies in cases(crash).items()
    }
    prober = Prober(url)
    await asyncio.sleep(quiet_s)
    for name, bodies in encoded.items():
        quiet, busy, codes = [], [], []
        for _ in range(repeats):
            await asyncio.sleep(quiet_s + 1.0)  # the last case's stall is over
            q, b, c = await run_case(url, bodies, prober, quiet_s)
            quiet.append(q)
            busy.append(b)
            codes = c
        q_med, b_med = statistics.median(quiet), statistics.median(busy)
        print(
            f"{name:24s} quiet {q_med * 1000:7.0f} ms  during {b_med * 1000:7.0f} ms  "
            f"ratio {b_med / q_med:6.1f}  status {codes}",
            flush=True,
        )
    prober.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="serve the winnow package of this source tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds of the quiet window")
    parser.add_argument("--crash-case", action="store_true", help="also the 30,000-name case")
    args = parser.parse_args()

    model_dir = build_demo_model("demo")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The package comes from --source ahead of this venv's editable install (whose import hook
    # would otherwise win over sys.path). The CPU kernels are off: the stall is the HTTP side's.
    command = [
        *(sys.executable, "-c", RUN_FROM.format(source=args.source or "")),
        *("serve", str(model_dir), "--port", str(port), "--no-cpu-kernels"),
        *("--served-model-name", MODEL, "--log-level", "warning"),
    ]
    log = Path(tempfile.mkdtemp(prefix="winnow-hostile-stall-")) / "server.log"
    print(f"server: winnow from {args.source or 'this venv'}; log {log}")
    with running_server(command, url, log):
        asyncio.run(measure(url, args.crash_case, args.repeats, args.quiet))


if __name__ == "__main__":
    main()
