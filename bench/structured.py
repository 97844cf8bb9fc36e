"""Constrained decoding: what a grammar costs per engine step, and how long one takes to start.

Per-step cost: the engine on demo-large decoding B sequences at temperature 1, every row under
a JSON-schema grammar vs no row under one, run alternately in the same process (median step
time over the decode steps of each run); the mask fill and the bitmask kernel are also timed
alone. Start latency: `compile` (llguidance matcher + its first mask) for a typical 8-field
schema and for JSON mode, median over repeats; the one-time vocabulary index is shown apart.
Inter-token latency (`--itl`, on the small demo model): the gaps between one stream's tokens
before and while another request compiles a large schema and starts under it.

    .venv/bin/python bench/structured.py                 # batch 1, 16, 64
    .venv/bin/python bench/structured.py --batches 1 16  # a subset
    .venv/bin/python bench/structured.py --itl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from winnow.config import EngineConfig
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import load_model
from winnow.sampling.bitmask import apply_bitmask, words_for
from winnow.sampling.params import SamplingParams
from winnow.structured.llguidance_backend import LLGuidanceBackend
from winnow.structured.spec import GrammarSpec

PROMPT = [1, 1733, 1117, 29491, 2001, 2002, 2003, 2004]
DECODE_TOKENS = 24
# the rows stay inside one string for the whole run: masks are computed every step
LONG_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9.]+$"},
        "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["id", "name", "email", "age", "score", "active", "tags", "role"],
    "additionalProperties": False,
}


def decode_step_ms(engine: LLMEngine, batch: int, grammar: GrammarSpec | None, tag: str) -> float:
    """Median ms of the engine's decode-only steps for `batch` sequences."""
    for i in range(batch):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=DECODE_TOKENS, ignore_eos=True)
        engine.add_request(
            GenerationRequest(f"{tag}-{i}", PROMPT + [3000 + i], params, grammar=grammar)
        )
    engine.step()  # the prefill
    times = []
    while engine.has_work:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def byte_tokens(hf: Any, text: str) -> list[int]:
    """`text` as the demo tokenizer's byte-fallback pieces, one token per byte."""
    return [hf.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in text.encode()]


def component_ms(
    backend: LLGuidanceBackend, batch: int, vocab: int, hf: Any
) -> tuple[float, float, float]:
    """Median ms per step of the grammar's own work for `batch` rows inside a JSON string:
    filling the masks, applying masks to the logits (random bits, so that every word of every
    row bans something: the kernel's worst case), advancing every matcher by one token."""
    compiled = backend.compile(GrammarSpec("json_schema", json.dumps(LONG_SCHEMA)))
    matchers = [compiled.new_matcher(byte_tokens(hf, '{"text":"')) for _ in range(batch)]
    (letter,) = byte_tokens(hf, "a")
    out = np.empty((batch, words_for(vocab)), dtype=np.int32)
    logits = torch.randn(batch, vocab)
    rows = torch.arange(batch)
    bits = torch.randint(-(2**31), 2**31 - 1, (batch, words_for(vocab)), dtype=torch.int32)
    fills, applies, consumes = [], [], []
    for _ in range(15):
        start = time.perf_counter()
        backend.fill_bitmasks(matchers, out)
        fills.append(time.perf_counter() - start)
        start = time.perf_counter()
        apply_bitmask(logits, rows, bits)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        for matcher in matchers:
            matcher.consume(letter)
        consumes.append(time.perf_counter() - start)
    fill, apply, consume = (statistics.median(t) * 1000 for t in (fills, applies, consumes))
    return fill, apply, consume


def start_latency_ms(backend: LLGuidanceBackend, spec: GrammarSpec, repeats: int = 21) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.compile(spec)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def large_schema(fields: int = 300) -> dict:
    """Many distinct properties, each with its own pattern: a slow grammar to build."""
    properties = {
        f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1}}}-{i}[0-9]*$"}
        for i in range(fields)
    }
    return {"type": "object", "properties": properties, "required": list(properties)}


async def stream_gaps(engine: AsyncEngine, large: GrammarSpec) -> tuple[list[float], list[float]]:
    """Gaps (ms) between one stream's tokens before, and while, a large schema starts."""
    engine.start()
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=400, ignore_eos=True)
    stream = engine.submit(GenerationRequest("stream", PROMPT, params))
    arrivals: list[float] = []
    compile_window: list[float] = []

    async def start_large() -> None:
        compile_window.append(time.perf_counter())
        compiled = await asyncio.to_thread(engine.compile_grammar, large)
        constrained = SamplingParams(temperature=1.0, seed=2, max_tokens=8)
        engine.submit(GenerationRequest("large", PROMPT, constrained, grammar=large), compiled)
        compile_window.append(time.perf_counter())

    task = None
    async for output in stream:
        arrivals.extend(time.perf_counter() for choice in output.choices if choice.token_ids)
        if len(arrivals) == 200 and task is None:
            task = asyncio.ensure_future(start_large())
    assert task is not None
    await task
    gaps = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)]
    before = gaps[20:199]
    start, end = compile_window
    during = [
        (b - a) * 1000
        for a, b in zip(arrivals, arrivals[1:], strict=False)
        if b >= start and a <= end + 0.05
    ]
    return before, during


def itl(args: argparse.Namespace) -> None:
    config = EngineConfig(model="demo", max_num_seqs=4, max_num_batched_tokens=512)
    engine = AsyncEngine(lambda: LLMEngine(load_model("demo"), config), "demo")
    large = GrammarSpec("json_schema", json.dumps(large_schema()))
    backend = engine.engine.grammar_backend  # the one-time vocabulary index, not timed
    start = time.perf_counter()
    backend.compile(large)
    compile_ms = (time.perf_counter() - start) * 1000
    before, during = asyncio.run(stream_gaps(engine, large))
    engine.shutdown()
    print(f"large schema (300 patterned fields): compile {compile_ms:.0f} ms")
    print(
        f"stream gaps before: median {statistics.median(before):.1f} ms, max {max(before):.1f} ms"
    )
    print(
        f"stream gaps while it compiles and starts: max {max(during):.1f} ms ({len(during)} gaps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="alternations per batch size")
    parser.add_argument("--itl", action="store_true", help="inter-token latency only")
    args = parser.parse_args()
    if args.itl:
        itl(args)
        return
    loaded = load_model("demo-large", dtype="float32", device="cpu")
    vocab = loaded.config.vocab_size
    config = EngineConfig(
        model="demo-large", max_num_seqs=max(args.batches), max_num_batched_tokens=2048
    )
    engine = LLMEngine(loaded, config)
    start = time.perf_counter()
    backend = engine.grammar_backend
    index_ms = (time.perf_counter() - start) * 1000
    spec = GrammarSpec("json_schema", json.dumps(LONG_SCHEMA))
    print(f"demo-large, V={vocab}, {DECODE_TOKENS} decode steps per run, {args.rounds} rounds")
    print("| B | step ms, none | step ms, all | fill ms | apply ms | advance ms | grammar work |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for batch in args.batches:
        decode_step_ms(engine, batch, spec, f"warm{batch}")
        plain, constrained = [], []
        for r in range(args.rounds):
            plain.append(decode_step_ms(engine, batch, None, f"p{batch}-{r}"))
            constrained.append(decode_step_ms(engine, batch, spec, f"c{batch}-{r}"))
        base, with_grammar = statistics.median(plain), statistics.median(constrained)
        fill, apply, advance = component_ms(backend, batch, vocab, engine.tokenizer.hf)
        share = (fill + apply + advance) / base * 100
        cells = [f"{base:.1f}", f"{with_grammar:.1f}", f"{fill:.2f}", f"{apply:.2f}"]
        print(f"| {batch} | " + " | ".join([*cells, f"{advance:.2f}", f"{share:.2f}%"]) + " |")
    print()
    print(f"vocabulary index for llguidance (once per server): {index_ms:.0f} ms")
    typical = GrammarSpec("json_schema", json.dumps(TYPICAL_SCHEMA))
    for name, grammar in [("8-field schema", typical), ("json_object", GrammarSpec("json_object"))]:
        print(f"grammar start, {name}: {start_latency_ms(backend, grammar):.2f} ms (median)")


if __name__ == "__main__":
    main()
