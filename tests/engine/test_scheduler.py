"""Block manager and scheduler, driven without a model: the test plays the engine's part."""

from __future__ import annotations

import pytest

from winnow.engine.block_manager import BlockManager
from winnow.engine.request import GenerationRequest
from winnow.engine.scheduler import Scheduler, SchedulerOutput
from winnow.engine.sequence import RequestState, Sequence, SequenceStatus
from winnow.sampling.params import SamplingParams

BLOCK = 4


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 100) -> Sequence:
    request = GenerationRequest(f"r{seq_id}", list(range(1, prompt_len + 1)), SamplingParams())
    state = RequestState(request, seed=0, max_tokens=max_tokens, deadline=None)
    seq = Sequence(seq_id=seq_id, request=state, index=0, seed=0)
    state.sequences.append(seq)
    return seq


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule, then do the engine's bookkeeping: tokens computed, one token per sampling seq."""
    out = scheduler.schedule()
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.output_token_ids.append(7)
    return out


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(item.seq.seq_id, item.num_new_tokens) for item in out.scheduled]


def test_block_manager_grows_and_frees() -> None:
    manager = BlockManager(num_blocks=5, block_size=BLOCK)
    assert manager.num_free_blocks == 4
    table: list[int] = []
    assert manager.grow(table, 5)
    assert len(table) == 2 and 0 not in table
    assert manager.grow(table, 8) and len(table) == 2
    assert not manager.grow(table, 17)
    assert len(table) == 2 and manager.num_free_blocks == 2
    manager.free(table)
    assert table == [] and manager.num_free_blocks == 4


def test_block_manager_needs_two_blocks() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=BLOCK)


def test_chunked_prefill_under_token_budget() -> None:
    scheduler = Scheduler(BlockManager(200, BLOCK), max_num_seqs=8, max_num_batched_tokens=16)
    long = make_seq(0, prompt_len=40)
    scheduler.add(long)
    chunks = [plan(run_step(scheduler)) for _ in range(3)]
    assert chunks == [[(0, 16)], [(0, 16)], [(0, 8)]]
    assert long.output_token_ids == [7]  # sampled only when the prompt was complete
    assert plan(run_step(scheduler)) == [(0, 1)]


def test_decodes_keep_flowing_while_a_long_prompt_prefills() -> None:
    scheduler = Scheduler(BlockManager(200, BLOCK), max_num_seqs=8, max_num_batched_tokens=16)
    short = make_seq(0, prompt_len=3)
    scheduler.add(short)
    run_step(scheduler)
    scheduler.add(make_seq(1, prompt_len=60))
    for _ in range(4):
        step = plan(run_step(scheduler))
        assert step[0] == (0, 1)  # the running decode goes first, every step
        assert step[1] == (1, 15)
    assert len(short.output_token_ids) == 5


def test_fcfs_admission_and_max_num_seqs() -> None:
    scheduler = Scheduler(BlockManager(200, BLOCK), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(i, prompt_len=5) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert plan(run_step(scheduler)) == [(0, 5), (1, 5)]
    assert [s.seq_id for s in scheduler.waiting] == [2]
    scheduler.remove(seqs[0])
    assert plan(run_step(scheduler)) == [(1, 1), (2, 5)]


def test_waiting_sequence_that_does_not_fit_blocks_the_queue() -> None:
    scheduler = Scheduler(BlockManager(4, BLOCK), max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add(make_seq(0, prompt_len=8))
    scheduler.add(make_seq(1, prompt_len=8))
    scheduler.add(make_seq(2, prompt_len=1))
    assert plan(run_step(scheduler)) == [(0, 8)]
    assert [s.seq_id for s in scheduler.waiting] == [1, 2]  # FCFS: seq 2 does not jump ahead


def test_preemption_drops_newest_and_requeues_it_first() -> None:
    manager = BlockManager(5, BLOCK)  # 4 usable blocks = 16 tokens
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq(0, prompt_len=7), make_seq(1, prompt_len=7)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: 2 blocks each, pool full, each has 8 tokens
    assert manager.num_free_blocks == 0
    out = run_step(scheduler)  # both decode the 8th token: still fits
    assert plan(out) == [(0, 1), (1, 1)] and not out.preempted
    out = run_step(scheduler)  # 9th token needs a third block: the newest is preempted
    assert out.preempted == [new]
    assert plan(out) == [(0, 1)]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert new.block_table == [] and scheduler.waiting[0] is new
    assert new.output_token_ids == [7, 7]  # kept: recomputed, not regenerated
    scheduler.remove(old)
    out = run_step(scheduler)
    assert plan(out) == [(1, 9)]  # prompt + both outputs recomputed in one go


def test_preempting_itself_when_it_is_the_newest() -> None:
    manager = BlockManager(3, BLOCK)  # 2 usable blocks
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    first, second = make_seq(0, prompt_len=3), make_seq(1, prompt_len=4)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)  # one block each; only the second's is full
    out = run_step(scheduler)  # the second, the newest, needs a block: it yields its own
    assert out.preempted == [second]
    assert plan(out) == [(0, 1)]
    assert len(first.block_table) == 1 and manager.num_free_blocks == 1
