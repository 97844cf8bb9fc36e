"""One step's model inputs as host arrays, built with array operations over the whole batch.

Only what must come from each sequence's Python state is read per sequence (its computed-token
count, its new token ids, its block-table row); positions, slots and sample rows are derived for
all sequences at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from winnow.engine.block_tables import BlockTables
from winnow.engine.scheduler import ScheduledSequence
from winnow.engine.sequence import Sequence


@dataclass
class StepInputs:
    token_ids: np.ndarray  # [T] the step's flat new tokens, sequence after sequence
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] flat KV-cache slot of each new token
    query_lens: np.ndarray  # [B] new tokens per sequence
    seq_lens: np.ndarray  # [B] tokens in each sequence's cache after the step
    sample_rows: np.ndarray  # token rows whose logits are sampled, in scheduled order
    table_rows: np.ndarray  # [B] each sequence's row of the block tables
    max_blocks: int  # the longest block table among the step's sequences
    decode_only: bool

    @classmethod
    def build(
        cls, scheduled: list[ScheduledSequence], block_size: int, tables: BlockTables
    ) -> StepInputs:
        batch = len(scheduled)
        seqs, new, sampled = zip(*scheduled, strict=True) if batch else ((), (), ())
        query_lens = np.array(new, dtype=np.int64)
        starts = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        samples = np.array(sampled, dtype=np.bool_)
        seq_lens = starts + query_lens
        table_rows = tables.rows(seqs)
        decode_only = bool((query_lens == 1).all())
        if decode_only:
            if samples.all():  # each sequence's one new token is its last
                token_ids = np.array(
                    [s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1]
                     for s in seqs],
                    dtype=np.int64,
                )  # fmt: skip
            else:
                pairs = zip(seqs, starts.tolist(), strict=True)
                token_ids = np.fromiter((_token_at(s, p) for s, p in pairs), np.int64, batch)
            positions = starts
            token_rows = table_rows
            ends = np.arange(1, batch + 1, dtype=np.int64)
        else:
            token_ids = np.fromiter(
                (t for s, a, b in zip(seqs, starts.tolist(), seq_lens.tolist(), strict=True)
                 for t in s.token_ids_slice(a, b)),
                np.int64, int(query_lens.sum()),
            )  # fmt: skip
            ends = np.cumsum(query_lens)
            firsts = np.repeat(ends - query_lens - starts, query_lens)
            positions = np.arange(int(ends[-1]) if batch else 0, dtype=np.int64) - firsts
            token_rows = np.repeat(table_rows, query_lens)
        blocks = tables.host[token_rows, positions // block_size]
        slots = blocks * block_size + positions % block_size
        max_blocks = max(1, int(-(-seq_lens.max() // block_size))) if batch else 1
        return cls(
            token_ids=token_ids,
            positions=positions,
            slots=slots,
            query_lens=query_lens,
            seq_lens=seq_lens,
            sample_rows=(ends - 1)[samples],
            table_rows=table_rows,
            max_blocks=max_blocks,
            decode_only=decode_only,
        )


def _token_at(seq: Sequence, position: int) -> int:
    """The token at `position` of a sequence (prompt, then output)."""
    prompt = seq.request.request.prompt_token_ids
    if position < len(prompt):
        return prompt[position]
    return seq.output_token_ids[position - len(prompt)]
