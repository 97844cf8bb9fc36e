"""The CUDA-graph decode path (static buffers, batch-size buckets, padding, slicing), run on the
CPU with each capture replaced by an eager forward over the same buffers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.helpers import run_all
from winnow.config import EngineConfig
from winnow.engine.decode_graphs import DecodeGraphs, graph_batch_sizes
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import AttentionMetadata, LoadedModel, allocate_kv_cache, load_model
from winnow.sampling.params import SamplingParams

BLOCK = 16


@pytest.fixture(scope="module", params=["c-kernels", "torch"])
def loaded(request: pytest.FixtureRequest, demo_model_dir: Path) -> LoadedModel:
    enabled = request.param == "c-kernels"
    return load_model(str(demo_model_dir), device="cpu", cpu_kernels_enabled=enabled)


def test_batch_size_ladder_and_buckets() -> None:
    assert graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(4) == [1, 2, 4]
    assert graph_batch_sizes(1) == [1]
    model = load_model("demo", device="cpu", cpu_kernels_enabled=False)
    caches = allocate_kv_cache(model.config, 4, BLOCK, torch.float32, "cpu")
    graphs = DecodeGraphs(model.model, caches, 20, 8, BLOCK, capture=False)
    buckets = {batch: graphs.bucket(batch) for batch in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20)}
    assert buckets == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 20, 20: 20}
    with pytest.raises(ValueError, match="exceeds"):
        graphs.bucket(21)


def test_graph_path_gives_the_plain_paths_tokens(loaded: LoadedModel) -> None:
    """Seven requests of different prompt and output lengths: the decode batch shrinks from 7
    to 1 through buckets 8, 4, 2, 1 (padded rows in most steps), greedy and seeded sampling."""
    requests = [
        GenerationRequest(
            f"r{i}",
            [1000 + 37 * i + j for j in range(3 + 5 * i)],
            SamplingParams(
                temperature=0.0 if i % 2 else 1.0, seed=7 + i, max_tokens=3 + 2 * i, ignore_eos=True
            ),
        )
        for i in range(7)
    ]
    config = EngineConfig(model="demo", max_num_seqs=8, max_num_batched_tokens=256)
    plain = LLMEngine(loaded, config)
    expected = run_all(plain, requests)
    graphed = LLMEngine(loaded, config)
    graphed.runner.use_decode_graphs(8, graphed.max_model_len, capture=False)
    graphs = graphed.runner.decode_graphs
    assert graphs is not None
    sizes: list[int] = []
    forward = graphs._forward
    graphs._forward = lambda size, host: sizes.append(size) or forward(size, host)  # type: ignore[method-assign]
    assert run_all(graphed, requests) == expected
    assert {len(tokens) for tokens in expected.values()} == {3, 5, 7, 9, 11, 13, 15}
    assert set(sizes) == {1, 2, 4, 8}


def test_padding_rows_write_only_block_zero(loaded: LoadedModel) -> None:
    padding_rows_write_only_block_zero(loaded)


def padding_rows_write_only_block_zero(loaded: LoadedModel) -> None:
    """Three sequences in bucket 4: the one padding row writes only into block 0; the real rows
    write their own slots and give the plain forward's hidden states (fp32 throughout: the
    tolerance covers the matmul's summation order for another row count)."""
    config = loaded.config
    generator = torch.Generator().manual_seed(3)
    caches = allocate_kv_cache(config, 8, BLOCK, torch.float32, "cpu")
    for cache in caches:
        cache.copy_(torch.randn(cache.shape, generator=generator))
    before = [cache.clone() for cache in caches]
    tables = [[1, 2], [3], [5, 6]]
    seq_lens = [20, 5, 17]
    positions = torch.tensor([n - 1 for n in seq_lens])
    input_ids = torch.tensor([11, 22, 33])
    plain_caches = [cache.clone() for cache in caches]
    attn = AttentionMetadata.build([1, 1, 1], seq_lens, tables, BLOCK)
    expected = loaded.model(input_ids, positions, plain_caches, attn)

    graphs = DecodeGraphs(loaded.model, caches, 8, 4, BLOCK, capture=False)
    padded_tables = torch.tensor([[1, 2], [3, 0], [5, 6]])
    hidden = graphs.run(
        input_ids, positions, attn.slot_mapping, padded_tables, torch.tensor(seq_lens), seq_lens
    )
    assert hidden.shape == expected.shape
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    real_slots = set(attn.slot_mapping.tolist())
    for cache, old, plain in zip(caches, before, plain_caches, strict=True):
        changed = (cache != old).flatten(1, 2).flatten(2).any(-1).any(0)  # per flat slot
        changed_slots = set(changed.nonzero().flatten().tolist())
        assert real_slots <= changed_slots
        assert changed_slots - real_slots <= set(range(BLOCK))  # block 0 only
        # real blocks as the plain path's (torch's matmul may round a batch of 4 rows apart
        # from one of 3 in the last bits, which later layers' keys and values carry)
        torch.testing.assert_close(cache[:, 1:], plain[:, 1:], atol=1e-5, rtol=1e-5)
