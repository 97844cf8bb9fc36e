"""The KV-cache view the engine hands to a model forward pass (the engine <-> models door)."""

from __future__ import annotations

from dataclasses import dataclass

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
    query_start_loc: torch.Tensor  # [B + 1] int64: cumulative query_lens, starting at 0
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)
