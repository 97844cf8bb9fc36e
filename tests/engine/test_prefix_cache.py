"""Prefix caching in the block manager and the scheduler, without a model."""

from __future__ import annotations

from tests.engine.test_scheduler import BLOCK, make_seq, plan, run_step
from winnow.engine.block_manager import BlockManager, block_hash
from winnow.engine.scheduler import Scheduler


def fill(manager: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and register every full one, as the engine does."""
    table: list[int] = []
    assert manager.grow(table, len(tokens))
    parent = b""
    for i in range(len(tokens) // BLOCK):
        parent = block_hash(parent, tokens[i * BLOCK : (i + 1) * BLOCK])
        manager.register(table[i], parent)
    return table


def test_hash_chains_over_the_whole_prefix() -> None:
    first = block_hash(b"", [1, 2, 3, 4])
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(
        block_hash(b"", [9, 2, 3, 4]), [5, 6, 7, 8]
    )
    assert first == block_hash(b"", [1, 2, 3, 4])


def test_match_takes_references_and_stops_at_first_miss() -> None:
    manager = BlockManager(10, BLOCK)
    tokens = list(range(1, 11))  # 2 full blocks + 2 tokens
    table = fill(manager, tokens)
    blocks, hashes = manager.match_prefix(tokens[:8] + [99, 99, 99, 99])
    assert blocks == table[:2] and len(hashes) == 2
    manager.free(table)  # the matcher still holds the two full blocks
    assert manager.num_free_blocks == 9 - 2
    assert manager.match_prefix([1, 2, 3, 99])[0] == []


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    manager = BlockManager(5, BLOCK)  # 4 usable
    a = fill(manager, list(range(100, 108)))  # 2 blocks
    b = fill(manager, list(range(200, 208)))  # 2 blocks
    manager.free(list(a))
    manager.free(list(b))
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 4
    taken: list[int] = []
    assert manager.grow(taken, 2 * BLOCK)  # evicts a's blocks first (freed first), tail first
    assert taken == [a[1], a[0]]
    assert manager.match_prefix(list(range(100, 108)))[0] == []
    assert manager.match_prefix(list(range(200, 208)))[0] == b


def test_reusing_a_cached_block_protects_it_from_eviction() -> None:
    manager = BlockManager(3, BLOCK)  # 2 usable
    a = fill(manager, [1, 2, 3, 4])
    manager.free(list(a))
    hit, _ = manager.match_prefix([1, 2, 3, 4])
    assert hit == a
    other: list[int] = []
    assert manager.grow(other, BLOCK) and other[0] not in a
    assert not manager.grow(other, 2 * BLOCK)


def test_disabled_prefix_caching_never_matches() -> None:
    manager = BlockManager(5, BLOCK, enable_prefix_caching=False)
    table = fill(manager, [1, 2, 3, 4, 5])
    manager.free(table)
    assert manager.match_prefix([1, 2, 3, 4, 5]) == ([], [])
    assert manager.num_cached_blocks == 0


def test_scheduler_starts_from_the_cached_prefix() -> None:
    manager = BlockManager(50, BLOCK)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    first = make_seq(0, prompt_len=10)
    cached = fill(manager, first.prompt_token_ids)  # stands in for a finished earlier request
    manager.free(list(cached))
    again = make_seq(1, prompt_len=10)  # same prompt tokens 1..10
    scheduler.add(again)
    assert plan(run_step(scheduler)) == [(1, 2)]  # 8 tokens (2 blocks) come from the cache
    assert again.block_table[:2] == cached[:2]
    assert again.num_cached_prompt_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    manager = BlockManager(50, BLOCK)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    manager.free(fill(manager, make_seq(0, prompt_len=8).prompt_token_ids))
    seq = make_seq(1, prompt_len=8)
    scheduler.add(seq)
    assert plan(run_step(scheduler)) == [(1, 4)]  # last block recomputed: only 1 block reused
    assert seq.num_cached_prompt_tokens == 4
