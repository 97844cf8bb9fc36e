"""Time to first token with and without a cached 1,000-token prefix, on a real server.

    .venv/bin/python bench/prefix_cache.py --model demo-large --prefix-len 1000 --runs 5

Each run sends a request whose system prompt is a fresh ~1,000-token text (nothing cached),
then a second request with the same system prompt and a different question. Prints both TTFTs
and their ratio (medians over runs); the target is a ratio <= 0.2.
"""

from __future__ import annotations

import argparse
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


def ttft(client: httpx.Client, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first content chunk, and the cached prompt tokens the server reported."""
    body = {
        "model": "bench",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, cached = 0.0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"' in line and not first and '"content":""' not in line:
                first = time.perf_counter() - start
            if '"usage"' in line and '"cached_tokens"' in line:
                cached = int(line.split('"cached_tokens":')[1].split("}")[0])
    return first, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    model_dir = build_demo_model(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    winnow = str(Path(sys.executable).parent / "winnow")
    command = [
        winnow,
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--log-level",
        "warning",
    ]
    log = Path(tempfile.mkdtemp(prefix="winnow-prefix-")) / "server.log"
    rng = random.Random(0)
    cold, warm, cached_tokens = [], [], []
    with running_server(command, url, log), httpx.Client(base_url=url, timeout=600) as client:
        ttft(client, "warm up", "hi")
        for run in range(args.runs):
            system = " ".join(rng.choice(WORDS) for _ in range(args.prefix_len))
            first, _ = ttft(client, system, f"Question {run}: what is this about?")
            second, cached = ttft(client, system, f"Question {run}: summarise it.")
            cold.append(first)
            warm.append(second)
            cached_tokens.append(cached)
            print(
                f"run {run}: cold {first * 1000:.0f} ms, warm {second * 1000:.0f} ms, "
                f"cached {cached} tokens",
                flush=True,
            )
    ratio = statistics.median(w / c for w, c in zip(warm, cold, strict=True))
    print(
        f"median TTFT: cold {statistics.median(cold) * 1000:.0f} ms, warm "
        f"{statistics.median(warm) * 1000:.0f} ms, ratio {ratio:.3f} (target <= 0.2); "
        f"cached tokens {statistics.median(cached_tokens):.0f}"
    )


if __name__ == "__main__":
    main()
