"""The engine at tp = 2 (this process is rank 0, one spawned worker rank) against tp = 1:
greedy and seeded generations identical, with prefix-cache hits and forced preemptions;
structured output and n > 1 at tp = 2. One group serves every test (module scope)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.structured.conftest import Choice, run_all
from winnow.config import EngineConfig
from winnow.distributed.launcher import WorkerDied, start_tensor_parallel
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import load_model
from winnow.sampling.params import SamplingParams
from winnow.structured.spec import GrammarSpec

PREFIX = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 shared by every prompt
# A pool of 14 blocks: the 8 requests below need up to 5 blocks each, so some are preempted.
CONFIG = EngineConfig(
    model="demo", max_num_seqs=8, max_num_batched_tokens=128, num_kv_blocks=14, seed=7
)


def workload() -> list[GenerationRequest]:
    """Greedy and seeded requests sharing a prefix; 32 tokens each."""
    return [
        GenerationRequest(
            f"req-{i}",
            PREFIX + [2000 + i] * (i + 1),
            SamplingParams(
                temperature=0.0 if i % 2 else 1.0, seed=100 + i, max_tokens=32, ignore_eos=True
            ),
        )
        for i in range(8)
    ]


def tokens(results: dict[str, dict[int, Choice]]) -> dict[str, list[int]]:
    return {rid: choices[0].token_ids for rid, choices in results.items()}


@pytest.fixture(scope="module")
def tp1_engine(demo_model_dir: Path) -> LLMEngine:
    return LLMEngine(load_model(str(demo_model_dir), cpu_kernels_enabled=False), CONFIG)


@pytest.fixture(scope="module")
def tp2_engine(demo_model_dir: Path) -> Iterator[LLMEngine]:
    deaths: list[WorkerDied] = []
    threads = torch.get_num_threads()
    config = replace(CONFIG, tensor_parallel_size=2)
    workers, tp = start_tensor_parallel(config, deaths.append)
    engine = LLMEngine(load_model(str(demo_model_dir), tp=tp), config, workers)
    yield engine
    engine.close(clean=True)
    torch.set_num_threads(threads)
    assert deaths == []
    assert [process.exitcode for process in workers.processes] == [0]


def test_tp2_generations_equal_tp1_with_prefix_hits_and_preemption(
    tp1_engine: LLMEngine, tp2_engine: LLMEngine
) -> None:
    expected = tokens(run_all(tp1_engine, workload()))
    got = tokens(run_all(tp2_engine, workload()))
    assert got == expected
    assert all(len(t) == 32 for t in got.values())
    stats = tp2_engine.stats()
    assert stats.preemptions > 0
    assert tp2_engine.block_manager.num_cached_blocks > 0  # the shared prefix was cached
    # a second round hits the prefix cache from its first step
    assert tokens(run_all(tp2_engine, workload()[:2])) == {
        key: expected[key] for key in ("req-0", "req-1")
    }


def test_structured_output_and_n_at_tp2(tp2_engine: LLMEngine) -> None:
    spec = GrammarSpec("json_schema", json.dumps({"enum": ["yes", "no"]}))
    requests = [
        GenerationRequest(
            "json",
            [1, 1733, 1117],
            SamplingParams(temperature=1.0, seed=3, max_tokens=40),
            grammar=spec,
        ),
        GenerationRequest(
            "n3", [1, 1733], SamplingParams(temperature=1.0, seed=4, n=3, max_tokens=8)
        ),
    ]
    results = run_all(tp2_engine, requests)
    document = results["json"][0]
    assert document.finish_reason == "stop" and json.loads(document.text) in ("yes", "no")
    assert sorted(results["n3"]) == [0, 1, 2]
    assert all(len(choice.token_ids) == 8 for choice in results["n3"].values())
