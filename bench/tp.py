"""Tensor parallel on this CPU: step time at tp = 2 vs tp = 1, and the share of a tp = 2 step
that rank 0 spends in the step-input broadcast, the all-reduces and the logit gather.

    .venv/bin/python bench/tp.py --model demo-large --runs 5

Both runs drive the model as the engine does (flat step inputs through `run_step`): one
prefill step of --prefill-tokens over 4 sequences, then --decode-steps decode steps of those 4
sequences plus 4 more of 128 cached tokens each (batch 8), with the torch reference kernels
(what every rank runs at tp > 1). Each run is a fresh process per rank: tp = 1 one process on
all cores, tp = 2 two gloo ranks of half the cores each. Collective times are rank 0's wall
time inside each call, waiting for the other rank included. Prints medians over --runs and
the ratio to tp = 1.
CPU tensor parallel is not a speed-up here: the share is the figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from winnow.distributed import step_input
from winnow.distributed.group import TensorParallel, cpu_group, init_group, leave_group
from winnow.distributed.layout import RankLayout
from winnow.distributed.step_input import StepInput, flat_step, run_step
from winnow.models import allocate_kv_cache, load_model

BLOCK = 16


def timed(fn: Callable[..., Any], totals: dict[str, float], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def steps(prefill_tokens: int, decode_steps: int) -> list[StepInput]:
    """The step inputs of one run (identical on every rank)."""
    rng = np.random.default_rng(0)
    per_seq = prefill_tokens // 4
    tables = [list(range(1 + i * 24, 1 + (i + 1) * 24)) for i in range(8)]
    prompts = [rng.integers(100, 30000, per_seq).tolist() for _ in range(4)]
    out = [flat_step(prompts, [0] * 4, tables[:4], [True] * 4, BLOCK)]
    for index in range(decode_steps):
        starts = [per_seq + index] * 4 + [128 + index] * 4
        tokens = [[int(rng.integers(100, 30000))] for _ in range(8)]
        out.append(flat_step(tokens, starts, tables, [True] * 8, BLOCK))
    return out


def run(
    model: str, tp: TensorParallel | None, inputs: list[StepInput], totals: dict[str, float]
) -> list[float]:
    """Per-step wall times of rank 0 (after one warm-up pass over the same inputs)."""
    loaded = load_model(model, dtype="float32", device="cpu", cpu_kernels_enabled=False, tp=tp)
    caches = allocate_kv_cache(loaded.model.layer_config, 200, BLOCK, torch.float32, "cpu")
    driver = tp is None or tp.is_driver
    times = []
    for warm in (True, False):
        totals.clear()
        for step in inputs:
            start = time.perf_counter()
            if tp is not None:
                if driver:
                    step_input.send_step(step, cpu_group())
                else:
                    step = step_input.receive_step(cpu_group()) or step
            run_step(loaded.model, caches, step, BLOCK, torch.device("cpu"))
            if not warm:
                times.append(time.perf_counter() - start)
    return times


def rank_main(rank: int, size: int, port: int, model: str, args: tuple[int, int], out: Any) -> None:
    """One rank in a fresh process with its share of the cores (size 1: no group at all)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    totals: dict[str, float] = defaultdict(float)
    tp = None
    if size > 1:
        tp, _ = init_group(rank, size, "127.0.0.1", port, torch.device("cpu"))
        tp.all_reduce = timed(tp.all_reduce, totals, "all-reduce")  # type: ignore[method-assign]
        tp.gather_last_dim = timed(tp.gather_last_dim, totals, "gather")  # type: ignore[method-assign]
        step_input.send_step = timed(step_input.send_step, totals, "broadcast")  # type: ignore[assignment]
    times = run(model, tp, steps(*args), totals)
    if rank == 0:
        out.put((times, dict(totals)))
    leave_group()


def spawn_run(size: int, model: str, args: tuple[int, int]) -> tuple[list[float], dict[str, float]]:
    context = multiprocessing.get_context("spawn")
    port = RankLayout(size, 1, 0, "127.0.0.1", 0).with_port().master_port
    out = context.Queue()
    ranks = [
        context.Process(target=rank_main, args=(rank, size, port, model, args, out))
        for rank in range(size)
    ]
    for process in ranks:
        process.start()
    result = out.get(timeout=1200)
    for process in ranks:
        process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=16)
    opts = parser.parse_args()
    args = (opts.prefill_tokens, opts.decode_steps)
    prefill1, decode1, prefill2, decode2 = [], [], [], []
    shares: dict[str, list[float]] = defaultdict(list)
    for _ in range(opts.runs):
        times, _ = spawn_run(1, opts.model, args)
        prefill1.append(times[0])
        decode1.append(statistics.median(times[1:]))
        times, totals = spawn_run(2, opts.model, args)
        prefill2.append(times[0])
        decode2.append(statistics.median(times[1:]))
        for name in ("broadcast", "all-reduce", "gather"):
            shares[name].append(totals.get(name, 0.0) / sum(times))
    med = statistics.median
    print(f"model {opts.model}, {os.cpu_count()} cores, medians over {opts.runs} runs")
    print(f"prefill step ({opts.prefill_tokens} tokens): tp=1 {med(prefill1) * 1e3:.1f} ms, "
          f"tp=2 {med(prefill2) * 1e3:.1f} ms ({med(prefill2) / med(prefill1):.2f}x)")  # fmt: skip
    print(f"decode step (batch 8): tp=1 {med(decode1) * 1e3:.1f} ms, "
          f"tp=2 {med(decode2) * 1e3:.1f} ms ({med(decode2) / med(decode1):.2f}x)")  # fmt: skip
    for name, values in shares.items():
        print(f"tp=2 share of rank 0's step time in {name}: {med(values) * 100:.1f}%")


if __name__ == "__main__":
    main()
