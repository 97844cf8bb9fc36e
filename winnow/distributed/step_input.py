"""The flat step input rank 0 broadcasts each step, and the forward every rank runs on it.

A step is a handful of int64 arrays (token ids, positions, KV slots, block tables, sequence and
query lengths, the rows to sample); it travels as one header broadcast and one payload
broadcast over the gloo group. Workers hold no scheduler state: this is all they see.

A decode step that fits the decode graphs carries the bucket rank 0 chose, and every rank runs
(on CUDA replays) that bucket: the collectives inside the graphs pair up only if all ranks
replay the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from winnow.kernels import AttentionMetadata

if TYPE_CHECKING:
    from winnow.engine.decode_graphs import DecodeGraphs
    from winnow.models.llama import LlamaForCausalLM

_HEADER = 6  # kind, tokens, sequences, table width, sampled rows, decode bucket (0: none)
_STEP, _STOP = 1, 2


@dataclass
class StepInput:
    """One step, flat: tokens of sequence 0, then of sequence 1, ..."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T]
    block_tables: np.ndarray  # [B, W], padded with 0
    seq_lens: np.ndarray  # [B]
    query_lens: np.ndarray  # [B]
    sample_rows: np.ndarray  # [S]: rows of the flat tokens whose logits are sampled
    bucket: int = 0  # a decode step's padded batch size in the decode graphs; 0: plain forward

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.block_tables
        header = torch.tensor(
            [
                _STEP,
                len(self.input_ids),
                tables.shape[0],
                tables.shape[1],
                len(self.sample_rows),
                self.bucket,
            ]
        )
        parts = [
            self.input_ids,
            self.positions,
            self.slots,
            tables.reshape(-1),
            self.seq_lens,
            self.query_lens,
            self.sample_rows,
        ]
        payload = torch.from_numpy(np.concatenate([p.astype(np.int64, copy=False) for p in parts]))
        return header, payload

    @classmethod
    def unpack(cls, header: torch.Tensor, payload: torch.Tensor) -> StepInput:
        _, tokens, seqs, width, rows, bucket = header.tolist()
        flat = payload.numpy()
        sizes = [tokens, tokens, tokens, seqs * width, seqs, seqs, rows]
        ids, positions, slots, tables, seq_lens, query_lens, sample_rows = np.split(
            flat, np.cumsum(sizes)[:-1]
        )
        return cls(
            ids,
            positions,
            slots,
            tables.reshape(seqs, width),
            seq_lens,
            query_lens,
            sample_rows,
            bucket,
        )


@dataclass(frozen=True)
class Stop:
    """Rank 0's last word: how many decode steps it ran through the decode graphs and the
    trace of their buckets (`DecodeGraphs.trace`), for the workers to compare with theirs."""

    replays: int = 0
    trace: int = 0

    @classmethod
    def of(cls, graphs: DecodeGraphs | None) -> Stop:
        return cls() if graphs is None else cls(graphs.replays, graphs.trace)

    def mismatch(self, graphs: DecodeGraphs | None, rank: int) -> str | None:
        """Why rank `rank`'s decode buckets differ from rank 0's, or None."""
        mine = Stop.of(graphs)
        if mine == self:
            return None
        return (
            f"rank {rank} ran {mine.replays} decode-graph steps (bucket trace {mine.trace:#x}), "
            f"rank 0 ran {self.replays} (trace {self.trace:#x})"
        )


def send_step(step: StepInput, group: dist.ProcessGroup | None) -> None:
    """Rank 0: hand this step to every worker."""
    header, payload = step.pack()
    dist.broadcast(header, src=0, group=group)
    dist.broadcast(payload, src=0, group=group)


def send_stop(group: dist.ProcessGroup | None, stop: Stop) -> None:
    """Rank 0: tell every worker to leave its loop."""
    dist.broadcast(torch.tensor([_STOP, stop.replays, stop.trace, 0, 0, 0]), src=0, group=group)


def receive_step(group: dist.ProcessGroup | None) -> StepInput | Stop:
    """Workers: the next step, or rank 0's `Stop`."""
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    if int(header[0]) == _STOP:
        return Stop(int(header[1]), int(header[2]))
    _, tokens, seqs, width, rows, _ = header.tolist()
    payload = torch.empty(3 * tokens + seqs * width + 2 * seqs + rows, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group)
    return StepInput.unpack(header, payload)


@torch.inference_mode()
def run_step(
    model: LlamaForCausalLM,
    kv_caches: list[torch.Tensor],
    step: StepInput,
    block_size: int,
    device: torch.device,
    graphs: DecodeGraphs | None = None,
) -> torch.Tensor:
    """The forward on one rank: float32 logits of the sampled rows (rank 0: [S, vocab]; other
    ranks: their vocabulary shard's, already sent to rank 0). A step with a bucket runs
    through `graphs`, in that bucket."""
    rows = torch.from_numpy(step.sample_rows).to(device)
    if step.bucket:
        if graphs is None:
            raise RuntimeError("rank 0 sent a decode-graph step to a rank without decode graphs")
        hidden = graphs.run(
            torch.from_numpy(step.input_ids),
            torch.from_numpy(step.positions),
            torch.from_numpy(step.slots),
            torch.from_numpy(np.ascontiguousarray(step.block_tables)),
            torch.from_numpy(step.seq_lens),
            step.seq_lens.tolist(),
            size=step.bucket,
        )
        return model.compute_logits(hidden[rows])
    attn = AttentionMetadata(
        slot_mapping=torch.from_numpy(step.slots).to(device),
        block_tables=torch.from_numpy(np.ascontiguousarray(step.block_tables)).to(device),
        seq_lens_tensor=torch.from_numpy(step.seq_lens).to(device),
        query_lens=step.query_lens.tolist(),
        seq_lens=step.seq_lens.tolist(),
        block_size=block_size,
    )
    ids = torch.from_numpy(step.input_ids).to(device)
    positions = torch.from_numpy(step.positions).to(device)
    hidden = model(ids, positions, kv_caches, attn)
    return model.compute_logits(hidden[rows])


def flat_step(
    tokens: list[list[int]],
    starts: list[int],
    tables: list[list[int]],
    samples: list[bool],
    block_size: int,
) -> StepInput:
    """A step from, per sequence: its new tokens, the position of the first, its block table
    and whether its last token is sampled."""
    width = max(len(table) for table in tables)
    block_tables = np.zeros((len(tables), width), dtype=np.int64)
    positions, slots, ids, sample_rows = [], [], [], []
    query_lens = np.asarray([len(t) for t in tokens], dtype=np.int64)
    seq_lens = np.asarray(starts, dtype=np.int64) + query_lens
    num_tokens = 0
    for row, (new, start, table, sampled) in enumerate(
        zip(tokens, starts, tables, samples, strict=True)
    ):
        block_tables[row, : len(table)] = table
        pos = np.arange(start, start + len(new), dtype=np.int64)
        positions.append(pos)
        slots.append(block_tables[row, pos // block_size] * block_size + pos % block_size)
        ids.extend(new)
        num_tokens += len(new)
        if sampled:
            sample_rows.append(num_tokens - 1)
    return StepInput(
        np.asarray(ids, dtype=np.int64),
        np.concatenate(positions),
        np.concatenate(slots),
        block_tables,
        seq_lens,
        query_lens,
        np.asarray(sample_rows, dtype=np.int64),
    )
