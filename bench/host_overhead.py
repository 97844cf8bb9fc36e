"""Host time of one engine decode step, the model's forward replaced by a stub.

B sequences decode together (greedy, ignore_eos) on the demo model's engine; the forward returns
preallocated hidden states and logits at once, so what is left is the engine's own Python and the
inputs it stages: scheduling, the model runner's inputs (eager path and the CUDA-graph path run
eagerly), the sampler, appending tokens and the stop checks on ids. Times are CPU time of the
calling thread (`time.thread_time`, torch on one thread), so that other processes on a loaded host
do not count; each figure is the median over the timed steps.

"total" is the engine thread's step (`LLMEngine.step_tokens`) and "total - sampler" the host time
the issue's target is about: the Python and staging that serialise with the forward (the sampler's
time here is mostly its pass over the logits, device work on a GPU; it has its own bench).
"output thread" is the text of the step (`OutputProcessor.process`: detokenisation, stop strings,
the per-request outputs): host time too, reported apart, as the server runs it on its own thread
on an accelerator (while the engine thread runs the next step); on a CPU it follows the step on
the engine thread, so there the two add up. On a checkout without the output thread (`step_tokens`
missing), the engine thread's step is `LLMEngine.step()`, text included ("append" holds the
detokenisation and stop checks), and "output thread" is absent.

    .venv/bin/python bench/host_overhead.py
    .venv/bin/python bench/host_overhead.py --compare-with /path/to/other/checkout
    .venv/bin/python bench/host_overhead.py --text logprobs   # or stop

--text asks every request for more than plain text: `stop` two stop strings that never match
(the holdback's scan on every token), `logprobs` the sampled token's logprob and 5 top ones.

--compare-with runs the same measurement on another checkout's code (in a subprocess, turn about
with this one's, `--rounds` times) and prints this checkout's time over it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import load_model
from winnow.sampling.params import SamplingParams

PROMPT_LEN = 40
BATCHES = (1, 64, 256)
TEXT_PARAMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "stop": {"stop": ["\n\n\n", "zqzqx"]},
    "logprobs": {"logprobs": True, "top_logprobs": 5},
}


class StubModel(torch.nn.Module):
    """Stands in for the model: hidden rows and logits from preallocated tensors."""

    def __init__(self, model: Any, max_tokens: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the runner reads the device from it
        self.hidden = torch.zeros(max_tokens, 1)
        self.logits = torch.zeros(max_tokens, model.config.vocab_size)
        rows = torch.arange(max_tokens)
        # each row its own ordinary token (not a special one, which detokenises to nothing)
        self.logits[rows, 1000 + rows * 37 % 20000] = 1.0
        self.config = model.config
        self.tp = None  # one process: no tensor-parallel group

    def forward(self, input_ids: torch.Tensor, *args: object) -> torch.Tensor:
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]


def timed(record: dict[str, list[float]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            record.setdefault(name, []).append(time.thread_time() - start)

    return wrapper


def measure(batch: int, steps: int, graphs: bool, text: str) -> dict[str, float]:
    """Median milliseconds per decode step: total and its parts."""
    loaded = load_model("demo")
    config = EngineConfig(
        model="demo", max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * PROMPT_LEN),
        seed=0, max_model_len=PROMPT_LEN + steps + 64,
    )  # fmt: skip
    engine = LLMEngine(loaded, config)
    stub = StubModel(loaded.model, max(2048, batch * PROMPT_LEN))
    engine.runner.model = stub  # type: ignore[assignment]
    if graphs:
        engine.runner.use_decode_graphs(batch, engine.max_model_len, capture=False)
    record: dict[str, list[float]] = {}
    engine.scheduler.schedule = timed(record, "schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    engine.runner.execute = timed(record, "inputs", engine.runner.execute)  # type: ignore[method-assign]
    engine.sampler.sample = timed(record, "sampler", engine.sampler.sample)  # type: ignore[method-assign]
    engine._append_tokens = timed(record, "append", engine._append_tokens)  # type: ignore[method-assign]
    step_tokens = getattr(engine, "step_tokens", None)
    params = SamplingParams(
        temperature=0.0, max_tokens=steps + 16, ignore_eos=True, **TEXT_PARAMS[text]
    )
    for i in range(batch):
        prompt = [(i * 31 + j * 7) % 30000 + 100 for j in range(PROMPT_LEN)]
        engine.add_request(GenerationRequest(f"r{i}", prompt, params))
    while any(seq.num_computed_tokens < PROMPT_LEN for seq in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    record.clear()
    totals = []
    for _ in range(steps):
        start = time.thread_time()
        if step_tokens is None:
            engine.step()
            totals.append(time.thread_time() - start)
            continue
        result = step_tokens()
        totals.append(time.thread_time() - start)
        start = time.thread_time()
        engine.stop_sequences(engine.output_processor.process(result)[1])
        record.setdefault("output thread", []).append(time.thread_time() - start)
    medians = {name: 1e3 * statistics.median(times) for name, times in record.items()}
    medians["total"] = 1e3 * statistics.median(totals)
    medians["total - sampler"] = 1e3 * statistics.median(
        t - s for t, s in zip(totals, record["sampler"], strict=True)
    )
    return medians


def run_here(steps: int, text: str) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    return {
        f"B={batch} {'graph path' if graphs else 'eager path'}": measure(batch, steps, graphs, text)
        for batch in BATCHES
        for graphs in (False, True)
    }


def run_in(checkout: Path, steps: int, text: str) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    script = Path(__file__).resolve()
    out = subprocess.run(
        [sys.executable, str(script), "--json", "--steps", str(steps), "--text", text],
        env=env, cwd=checkout, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, dict[str, float]] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-with", type=Path)
    parser.add_argument("--text", choices=tuple(TEXT_PARAMS), default="plain")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(run_here(args.steps, args.text)))
        return
    here = Path(__file__).resolve().parents[1]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"this": [], "other": []}
    for _ in range(args.rounds if args.compare_with else 1):
        runs["this"].append(run_in(here, args.steps, args.text))
        if args.compare_with:
            runs["other"].append(run_in(args.compare_with, args.steps, args.text))
    for case in runs["this"][0]:
        parts = runs["this"][0][case]
        line = ", ".join(
            f"{name} {statistics.median(r[case][name] for r in runs['this']):.3f}" for name in parts
        )
        print(f"{case}: {line} (ms)")
        if runs["other"]:
            compare(runs, case)


def compare(runs: dict[str, list[dict[str, dict[str, float]]]], case: str) -> None:
    """This checkout over the other: the engine thread without the sampler, and where both have
    an output thread, its time and the sum of the two (a CPU runs the text on the engine
    thread)."""

    def median(side: str, *names: str) -> float:
        return statistics.median(sum(r[case][name] for name in names) for r in runs[side])

    rows = [("engine thread without the sampler", ("total - sampler",))]
    if all("output thread" in r[case] for side in runs.values() for r in side):
        rows += [
            ("output thread (text)", ("output thread",)),
            ("both, as a CPU runs them", ("total - sampler", "output thread")),
        ]
    for label, names in rows:
        ours, theirs = median("this", *names), median("other", *names)
        print(f"    {label}: {ours:.3f} ms vs {theirs:.3f} ms ({ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
