"""Decode speed on a CPU shared with another busy process: alone, and beside a one-core hog.

    .venv/bin/python bench/shared_host.py --runs 3

Serves the default model (SmolLM2-135M-Instruct) three ways, one after the other: the defaults,
`OMP_WAIT_POLICY=PASSIVE` (OpenMP threads sleep at once instead of spinning between parallel
regions) and `--num-threads 1`. For each, single-stream greedy decode tok/s (64 tokens, after a
warm-up request) with the machine to itself and then while a busy-looping process holds one core.
Prints medians over `--runs` rounds and each setting's ratio to the defaults measured in the
same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from winnow.benchmark.process import free_port, running_server
from winnow.models.default_model import DEFAULT_MODEL

TOKENS = 64
SETTINGS: dict[str, tuple[list[str], list[str]]] = {  # name: (env prefix, extra serve args)
    "defaults": ([], []),
    "OMP_WAIT_POLICY=PASSIVE": (["OMP_WAIT_POLICY=PASSIVE"], []),
    "--num-threads 1": ([], ["--num-threads", "1"]),
}


def busy_loop() -> None:
    while True:
        pass


def decode_rate(url: str) -> float:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Write a story."}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    start = time.perf_counter()
    httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
    return TOKENS / (time.perf_counter() - start)


def measure(env: list[str], extra: list[str], log: Path) -> tuple[float, float]:
    """(tok/s alone, tok/s beside the hog) for one server."""
    url = f"http://127.0.0.1:{free_port()}"
    command = ["env", *env, sys.executable, "-m", "winnow", "serve", "--port", url.rsplit(":")[-1]]
    command += ["--max-model-len", "1024", "--log-level", "warning", *extra]
    with running_server(command, url, log):
        decode_rate(url)  # warm-up
        alone = decode_rate(url)
        hog = multiprocessing.Process(target=busy_loop, daemon=True)
        hog.start()
        try:
            beside = decode_rate(url)
        finally:
            hog.kill()
            hog.join()
    return alone, beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="winnow-shared-host-"))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    for run in range(args.runs):
        for name, (env, extra) in SETTINGS.items():
            alone, beside = measure(env, extra, log_dir / "server.log")
            results[name].append((alone, beside))
            print(f"  run {run + 1} {name}: alone {alone:.1f} tok/s, beside a hog {beside:.1f}")
    base_alone = statistics.median(a for a, _ in results["defaults"])
    base_beside = statistics.median(b for _, b in results["defaults"])
    print(f"\nmedians of {args.runs} runs, single-stream greedy decode of {TOKENS} tokens")
    print(f"{'setting':26}{'alone':>8}{'ratio':>7}{'beside hog':>12}{'ratio':>7}")
    for name, pairs in results.items():
        alone = statistics.median(a for a, _ in pairs)
        beside = statistics.median(b for _, b in pairs)
        print(
            f"{name:26}{alone:8.1f}{alone / base_alone:7.2f}"
            f"{beside:12.1f}{beside / base_beside:7.2f}"
        )


if __name__ == "__main__":
    main()
