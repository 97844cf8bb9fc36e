"""Decode graphs at tp = 2: `--kernels triton` on this CPU (Triton's interpreter, gloo) runs the
CUDA-graph path's buckets and padding eagerly on both ranks. Generations equal tp = 1, and the
worker rank ran exactly rank 0's sequence of buckets (it compares the trace rank 0 sends with
its stop and exits non-zero when they differ)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the workers inherit it
pytest.importorskip("triton")

from tests.engine.helpers import run_all  # noqa: E402
from winnow.config import EngineConfig  # noqa: E402
from winnow.distributed.launcher import WorkerDied, start_tensor_parallel  # noqa: E402
from winnow.distributed.step_input import Stop  # noqa: E402
from winnow.engine.decode_graphs import DecodeGraphs  # noqa: E402
from winnow.engine.engine import LLMEngine  # noqa: E402
from winnow.engine.request import GenerationRequest  # noqa: E402
from winnow.models import load_model  # noqa: E402
from winnow.sampling.params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU run")

# max_model_len 512: a bucket's decode runs in two context splits (fewer to interpret)
CONFIG = EngineConfig(
    model="demo", max_num_seqs=4, num_kv_blocks=64, max_model_len=512, kernels="triton"
)


def requests() -> list[GenerationRequest]:
    """Three requests, greedy and seeded, finishing one after another: decode batches of 3
    (padded to bucket 4), 2 and 1."""
    return [
        GenerationRequest(
            f"r{i}",
            [1000 + 37 * i + j for j in range(3 + 20 * i)],
            SamplingParams(
                temperature=0.0 if i % 2 else 1.0, seed=5 + i, max_tokens=6 - 2 * i, ignore_eos=True
            ),
        )
        for i in range(3)
    ]


def recorded_sizes(graphs: DecodeGraphs) -> list[int]:
    """The bucket of every decode step `graphs` runs from now on."""
    sizes: list[int] = []
    forward = graphs._forward
    graphs._forward = lambda size, host: sizes.append(size) or forward(size, host)  # type: ignore[method-assign]
    return sizes


def test_tp2_decode_buckets_match_tp1_and_every_rank(demo_model_dir: Path) -> None:
    reference = LLMEngine(
        load_model(str(demo_model_dir), cpu_kernels_enabled=False),
        replace(CONFIG, kernels="auto", cpu_kernels=False),
    )
    expected = run_all(reference, requests())
    assert reference.runner.decode_graphs is None

    deaths: list[WorkerDied] = []
    threads = torch.get_num_threads()
    config = replace(CONFIG, tensor_parallel_size=2)
    workers, tp = start_tensor_parallel(config, deaths.append)
    try:
        engine = LLMEngine(
            load_model(str(demo_model_dir), tp=tp, kernels="triton"), config, workers
        )
        graphs = engine.runner.decode_graphs
        assert graphs is not None and not graphs.capture and graphs.sizes == [1, 2, 4]
        sizes = recorded_sizes(graphs)
        assert run_all(engine, requests()) == expected
    finally:
        engine.close(clean=True)
        torch.set_num_threads(threads)
    assert sizes == [4, 2, 2, 1, 1]  # 3 rows padded to 4, then 2, then 1
    assert (graphs.replays, deaths) == (len(sizes), [])
    # the worker received rank 0's trace with the stop, found its own equal and exited 0
    assert [process.exitcode for process in workers.processes] == [0]


def test_a_different_bucket_trace_is_reported(demo_model_dir: Path) -> None:
    loaded = load_model(str(demo_model_dir), cpu_kernels_enabled=False)
    engine = LLMEngine(loaded, replace(CONFIG, kernels="auto", cpu_kernels=False))
    engine.runner.use_decode_graphs(4, engine.max_model_len, capture=False)
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    run_all(engine, requests()[:2])  # buckets 2, 2, 2, 1, 1
    assert Stop.of(graphs).mismatch(graphs, 1) is None
    other = Stop(graphs.replays, graphs.trace ^ 1)
    assert other.mismatch(graphs, 1) == (
        f"rank 1 ran 5 decode-graph steps (bucket trace {graphs.trace:#x}), "
        f"rank 0 ran 5 (trace {graphs.trace ^ 1:#x})"
    )
    assert Stop().mismatch(graphs, 1) is not None
