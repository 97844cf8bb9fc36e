"""The arithmetic of a split: which heads and vocabulary rows a rank holds, the layout of ranks
over nodes, and the KV pool the ranks agree on."""

from __future__ import annotations

import transformers

from winnow.distributed.layout import RankLayout
from winnow.distributed.partition import Partition
from winnow.engine.memory_plan import KVCachePlan, agree_on_blocks
from winnow.models import ModelConfig


def config(kv_heads: int) -> ModelConfig:
    return ModelConfig.from_hf_config(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=8,
            num_key_value_heads=kv_heads,
            num_hidden_layers=1,
        )  # fmt: skip
    )


def test_kv_heads_split_or_replicate_with_the_query_heads_that_read_them() -> None:
    # 2 KV heads over 4 ranks: ranks 0-1 hold KV head 0 (query heads 0-3), ranks 2-3 head 1
    assert [Partition(config(2), rank, 4).kv_head_start for rank in range(4)] == [0, 0, 1, 1]
    assert {Partition(config(2), rank, 4).num_kv_heads for rank in range(4)} == {1}
    # 4 KV heads over 2 ranks: two each
    assert [Partition(config(4), rank, 2).kv_head_start for rank in range(2)] == [0, 2]
    slice_k = Partition(config(1), 3, 4).source_slice("self_attn.k_proj")
    assert slice_k == (0, 0, 8)  # MQA: every rank reads the one KV head (head_dim 8)


def test_vocabulary_shards_are_padded_equal() -> None:
    parts = [Partition(config(2), rank, 2) for rank in range(2)]
    assert [(p.vocab_start, p.vocab_per_rank, p.vocab_rows) for p in parts] == [
        (0, 49, 49),
        (49, 49, 48),
    ]


def test_ranks_over_nodes() -> None:
    layout = RankLayout(8, 2, 1, "10.0.0.1", 29500)
    layout.check()
    assert list(layout.local_ranks) == [4, 5, 6, 7]


def test_the_pool_is_the_smallest_ranks() -> None:
    plan = KVCachePlan(num_blocks=101, max_model_len=1600, capped=False)
    agreed = agree_on_blocks(plan, 51, 16)
    assert agreed == KVCachePlan(num_blocks=51, max_model_len=800, capped=True)
    assert agree_on_blocks(plan, 200, 16) == plan
