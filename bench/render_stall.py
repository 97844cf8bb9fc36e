"""Do long prompts stall running streams? ITL p99 of 8 streams while 30k-token chats are rendered
and tokenised, against their ITL p99 without that, on a real server.

    .venv/bin/python bench/render_stall.py --prompt-tokens 30000 --window 15

Phase 1 measures the inter-token latency of 8 running streams for `--window` seconds. Phase 2
measures it again while a client sends chats of ~`--prompt-tokens` tokens to /tokenize back to
back (the same template rendering and tokenisation a chat request goes through). Prints both p99s
and their ratio; the target is a ratio <= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from winnow.benchmark.process import free_port, running_server
from winnow.benchmark.serve import WORDS
from winnow.models import build_demo_model

STREAMS = 8


async def stream_gaps(http: httpx.AsyncClient, stop: asyncio.Event, gaps: list[float]) -> None:
    """Keep one stream running until `stop`; record the gaps between its content chunks."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Write forever."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    while not stop.is_set():
        last = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if stop.is_set():
                    break
                if not line.startswith("data: {") or '"content":"' not in line:
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now


async def long_prompts(http: httpx.AsyncClient, stop: asyncio.Event, text: str) -> int:
    """Send `text` as a chat to /tokenize again and again until `stop`; returns how many."""
    sent = 0
    messages = [{"role": "user", "content": text}]
    while not stop.is_set():
        response = await http.post("/tokenize", json={"model": "bench", "messages": messages})
        response.raise_for_status()
        sent += 1
    return sent


async def measure(url: str, window_s: float, long_text: str | None) -> tuple[float, int, int]:
    """ITL p99 (s) of the streams over the window, the gaps counted, long prompts sent."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        stop = asyncio.Event()
        gaps: list[float] = []
        streams = [asyncio.create_task(stream_gaps(http, stop, gaps)) for _ in range(STREAMS)]
        await asyncio.sleep(min(2.0, window_s / 4))  # every stream past its prefill
        gaps.clear()
        prompts = asyncio.create_task(long_prompts(http, stop, long_text)) if long_text else None
        await asyncio.sleep(window_s)
        stop.set()
        await asyncio.gather(*streams)
        sent = await prompts if prompts else 0
    return statistics.quantiles(gaps, n=100)[98], len(gaps), sent


def long_text_of(url: str, tokens: int) -> str:
    """Random words that tokenise to about `tokens` tokens as a chat."""
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    text = " ".join(words)
    counted = httpx.post(
        url + "/tokenize", json={"model": "bench", "messages": [{"role": "user", "content": text}]}
    ).json()["count"]
    scale = tokens / counted
    return " ".join(rng.choice(WORDS) for _ in range(int(len(words) * scale)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt-tokens", type=int, default=30000)
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per phase")
    args = parser.parse_args()

    model_dir = build_demo_model(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    winnow = str(Path(sys.executable).parent / "winnow")
    command = [
        *(winnow, "serve", str(model_dir), "--port", str(port)),
        *("--served-model-name", "bench", "--log-level", "warning"),
    ]
    log = Path(tempfile.mkdtemp(prefix="winnow-render-stall-")) / "server.log"
    with running_server(command, url, log):
        text = long_text_of(url, args.prompt_tokens)
        quiet_p99, quiet_n, _ = asyncio.run(measure(url, args.window, None))
        print(f"without long prompts: ITL p99 {quiet_p99 * 1000:.1f} ms ({quiet_n} gaps)")
        busy_p99, busy_n, sent = asyncio.run(measure(url, args.window, text))
        print(
            f"with {sent} chats of ~{args.prompt_tokens} tokens rendered and tokenised: "
            f"ITL p99 {busy_p99 * 1000:.1f} ms ({busy_n} gaps)"
        )
    print(f"ratio {busy_p99 / quiet_p99:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
