"""`winnow bench serve`: load-test any OpenAI-compatible server with streaming chat requests.

Metric definitions follow `vllm bench serve`: TTFT is the time to the first content chunk,
TPOT = (E2E - TTFT) / (output tokens - 1) per request, ITL is every gap between content chunks,
E2E is the whole request. Throughputs divide totals by the wall time of the whole run.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "stone",
    "light",
    "water",
    "garden",
]


@dataclass
class BenchArgs:
    base_url: str
    model: str
    num_prompts: int = 32
    concurrency: int = 32
    input_len: int = 128
    output_len: int = 128
    request_rate: float = float("inf")
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    extensions: bool = (
        True  # send min_tokens / ignore_eos (servers that reject unknown fields: off)
    )


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    first_error: str = ""


def make_prompt(rng: random.Random, input_len: int) -> str:
    """About `input_len` tokens of common words (one token each for typical vocabularies)."""
    return " ".join(rng.choice(WORDS) for _ in range(input_len))


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Lines of an SSE body, split at line feeds only: str.splitlines (and httpx's aiter_lines)
    also break at U+2028, U+0085 and other characters a JSON string may hold unescaped."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8")


async def one_request(client: httpx.AsyncClient, args: BenchArgs, prompt: str) -> RequestResult:
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.extensions:
        body.update(min_tokens=args.output_len, ignore_eos=True)
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in sse_lines(response.aiter_bytes()):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        result.error = repr(exc)
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no content received"
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {
        "mean": statistics.fmean(values) * 1000,
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
    }


def summarise(results: list[RequestResult], duration: float) -> Summary:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return Summary(
        completed=len(done),
        errors=len(results) - len(done),
        duration_s=duration,
        request_throughput=len(done) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(prompt_tokens + output_tokens) / duration,
        ttft_ms=percentiles([r.ttft for r in done]),
        tpot_ms=percentiles(tpots),
        itl_ms=percentiles([gap for r in done for gap in r.itls]),
        e2e_ms=percentiles([r.e2e for r in done]),
        first_error=next((r.error for r in results if not r.ok), ""),
    )


async def run_benchmark(args: BenchArgs, progress: bool = True) -> Summary:
    rng = random.Random(args.seed)
    prompts = [make_prompt(rng, args.input_len) for _ in range(args.num_prompts)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    gate = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=args.num_prompts, desc="Requests", unit="req", disable=not progress)

    async def guarded(client: httpx.AsyncClient, prompt: str, delay: float) -> RequestResult:
        await asyncio.sleep(delay)
        async with gate:
            result = await one_request(client, args, prompt)
        bar.update()
        return result

    delays, at = [], 0.0
    for _ in prompts:
        delays.append(at)
        if args.request_rate != float("inf"):
            at += rng.expovariate(args.request_rate)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout_s, limits=limits
    ) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(guarded(client, p, d) for p, d in zip(prompts, delays, strict=True))
        )
        duration = time.perf_counter() - start
    bar.close()
    return summarise(list(results), duration)


def format_summary(summary: Summary) -> str:
    lines = [
        f"completed requests      {summary.completed}",
        f"errors                  {summary.errors}"
        + (f" (first: {summary.first_error[:200]})" if summary.errors else ""),
        f"duration (s)            {summary.duration_s:.2f}",
        f"request throughput      {summary.request_throughput:.2f} req/s",
        f"output throughput       {summary.output_throughput:.1f} tok/s",
        f"total token throughput  {summary.total_token_throughput:.1f} tok/s",
        f"{'(ms)':24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats: dict[str, float] = getattr(summary, name)
        row = "".join(f"{stats[k]:10.1f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name[:-3].upper():24}{row}")
    return "\n".join(lines)


def summary_dict(summary: Summary) -> dict[str, Any]:
    return asdict(summary)
