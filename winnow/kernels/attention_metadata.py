"""The KV-cache view the engine hands to a model forward pass (the engine <-> models door)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache.

    Tokens of a step are flat: all new tokens of sequence 0, then of sequence 1, ...
    For sequence i, `query_lens[i]` new tokens are appended after `seq_lens[i] - query_lens[i]`
    tokens already in its cache, so after the step it holds `seq_lens[i]` tokens.
    Host lists mirror the tensors so that no backend needs a device->host sync.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    seq_lens_tensor: torch.Tensor  # [B] int64
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int
    # Set for decode steps that a CUDA graph replays (by DecodeGraphs): a bound on every length
    # the graph will ever be replayed with (max_model_len, in whole blocks). A backend then takes
    # its launch shapes (context splits) from it, never from `seq_lens`, which only describe the
    # capture's padding rows; each sequence's own range is read from `seq_lens_tensor`.
    graph_max_seq_len: int | None = None
    # What an attention backend derives once per step and reuses in every layer (masks, gather
    # indices). An AttentionMetadata describes exactly one step: build a new one per step.
    memo: dict[object, object] = field(default_factory=dict, repr=False, compare=False)
    # derived once per step from the host lists, read by every layer
    is_decode_only: bool = field(init=False)
    max_seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.is_decode_only = all(q == 1 for q in self.query_lens)
        self.max_seq_len = max(self.seq_lens, default=0)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from host lists; sequence i's new tokens get the slots after its cached ones."""
        slots: list[int] = []
        for q_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device).view(-1, width),
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.long, device=device),
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            block_size=block_size,
        )
