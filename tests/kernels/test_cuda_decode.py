"""The decode path on a real GPU (skipped without CUDA; bench/gpu_check.sh runs it there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.helpers import run_all
from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import load_model
from winnow.sampling.params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_graphs_give_the_eager_tokens(demo_model_dir: Path) -> None:
    """bf16 on the GPU (the CUDA default), batches shrinking through several graph sizes: the
    replayed graphs give the eager path's tokens, and the pinned-input path runs."""
    loaded = load_model(str(demo_model_dir), device="cuda")
    assert loaded.dtype == torch.bfloat16
    requests = [
        GenerationRequest(
            f"r{i}",
            [1000 + 13 * i + j for j in range(4 + 9 * i)],
            SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True),
        )
        for i in range(6)
    ]
    config = EngineConfig(model="demo", max_num_seqs=16, num_kv_blocks=256)
    eager = LLMEngine(loaded, EngineConfig(**{**vars(config), "enforce_eager": True}))
    assert eager.runner.decode_graphs is None and eager.runner.staging.pinned
    expected = run_all(eager, requests)
    graphed = LLMEngine(loaded, config)
    # the default CUDA kernels (Triton attention) are graph-safe: decode steps are captured
    assert loaded.kernels.decode_graphs
    graphs = graphed.runner.decode_graphs
    assert graphs is not None and graphs.capture and set(graphs.graphs) == set(graphs.sizes)
    assert run_all(graphed, requests) == expected


def test_profiled_kv_plan_on_cuda(demo_model_dir: Path) -> None:
    """Without --num-kv-blocks the cache is sized after a profiling forward and fits the card."""
    loaded = load_model(str(demo_model_dir), device="cuda")
    engine = LLMEngine(loaded, EngineConfig(model="demo", gpu_memory_utilization=0.5))
    free, total = torch.cuda.mem_get_info()
    assert engine.config.max_num_seqs == 256 and engine.config.max_num_batched_tokens == 8192
    assert engine.stats().kv_blocks_total > 0
    assert total - free <= 0.6 * total  # the plan kept to the utilization, give or take
