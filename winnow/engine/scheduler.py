"""Which sequences run this step, and with how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from winnow.engine.block_manager import BlockManager
from winnow.engine.sequence import Sequence, SequenceStatus


class ScheduledSequence(NamedTuple):
    """`samples`: this step brings the sequence up to date, so its last logits are sampled.
    (A named tuple: one is built per sequence per step, and a frozen dataclass costs more.)
    """

    seq: Sequence
    num_new_tokens: int
    samples: bool

    @classmethod
    def plan(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        done = seq.num_computed_tokens + num_new_tokens == seq.num_tokens
        return cls(seq, num_new_tokens, done)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """FCFS with a per-step token budget.

    Running sequences go first (decodes and unfinished prefill chunks), then waiting ones are
    admitted in arrival order while the budget, `max_num_seqs` and free blocks allow; a prompt
    longer than the remaining budget is prefilled in chunks over several steps. A sequence being
    admitted first takes the cached blocks of its longest cached prefix. When a running
    sequence needs a block and none is free, the newest running sequence is preempted: its
    blocks are dropped and it goes back to the front of the queue to be recomputed.
    """

    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._free_blocks(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        block_size = self.block_manager.block_size
        running, scheduled = self.running, out.scheduled
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            num_tokens = seq.num_prompt_tokens + len(seq.output_token_ids)
            computed = seq.num_computed_tokens
            target = num_tokens if num_tokens <= computed + budget else computed + budget
            num_new = target - computed
            # a decode mostly fits the blocks it holds: only a new block asks the block manager
            if len(seq.block_table) * block_size < target and not self._reserve(seq, num_new, out):
                continue  # seq itself was preempted; the list shifted under index
            scheduled.append(ScheduledSequence(seq, num_new, target == num_tokens))
            budget -= num_new
            index += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]  # holds no blocks: preemption and failed admission free them
            self._take_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.grow(seq.block_table, seq.num_computed_tokens + num_new):
                self._free_blocks(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence.plan(seq, num_new))
            budget -= num_new
        return out

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start `seq` from its longest cached prefix; its last token is always recomputed,
        since sampling needs that token's logits."""
        blocks, hashes = self.block_manager.match_prefix(seq.token_ids_slice(0, seq.num_tokens - 1))
        seq.block_table.extend(blocks)
        seq.block_hashes.extend(hashes)
        seq.num_computed_tokens = len(blocks) * self.block_manager.block_size
        if not seq.output_token_ids:
            seq.num_cached_prompt_tokens = seq.num_computed_tokens

    def _free_blocks(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _reserve(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Make room for `num_new` more tokens of `seq`, preempting the newest running sequences
        if needed. False when `seq` itself had to be preempted. Victims sit at or after `seq` in
        `running`, so none of them has been scheduled yet in this step."""
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.grow(seq.block_table, target):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
